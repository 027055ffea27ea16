"""Writing files so that nothing a user saved is lost: atomic replaces, failures named, outputs checked first.

    atomic_write(path, lambda tmp: ...)   # write a temporary file, then os.replace: never a half-written file
    write_json(path, obj)                 # the same for JSON, never over a file that is not JSON
    check_writable_dir(out_dir, "--out-dir")   # before any long work: a file in the way is refused at once
    check_apart(outputs, inputs, fix)     # no writer writes over (or into) a path it was given to read
    check_replace(path, "--out", ours, overwrite, what)   # only a file of ours is replaced, and only when asked
    remove_stale_temps(folder)            # what a killed run (kill -9, a power cut) left half-written
    lock_output(out_dir, "--out-dir")     # one run at a time on an output; release_locks() at the end

Every checkpoint, adapter, picture, .npz and JSON the scripts write goes through ``atomic_write``
(an adapter folder through ``temp_folder``). Every temporary file or folder is named
``.NAME.PID-XXXXXXXX.sd-tmp`` beside its target (PID: the process that writes it), so a later run
recognises what a killed one left and removes it: only names of this pattern, and only those whose
process is gone (owner_gone).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import time
import zipfile

from errors import UserError

TEMP_SUFFIX = ".sd-tmp"
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)-[a-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")
# the files of an adapter folder (PEFT's layout, written by adapter.py): the folder and its files are one thing
ADAPTER_FILE_NAMES = ("adapter_model.safetensors", "adapter_config.json", "training_state.pt")
# what a fine-tune writes beside its adapter as it runs: a run stopped before its first save leaves only these,
# and the folder is still that run's (its rerun replaces it with --overwrite, as an adapter)
RUN_LOG_NAMES = ("loss.csv", "loss_curve.png", "previews", "tensorboard", "data_preview.png")


class WriteError(UserError):
    """A file that could not be written (disk full, no permission, a folder in the way); the earlier file is intact."""


# ------------------------------------------------------------------ temporaries

def _temp_prefix(path):
    return f".{os.path.basename(os.path.abspath(path))}.{os.getpid()}-"


def temp_folder(path):
    """A fresh, empty temporary folder beside ``path`` (made now), named so a later run can clean it up."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, once=True)
    return tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)


def is_temp_name(name):
    """Whether a file or folder name is one of our temporaries (``.NAME.PID-XXXXXXXX.sd-tmp``)."""
    return _TEMP_NAME.match(name) is not None


def _proc_stat(pid):
    """(state, start time in seconds since boot) of process ``pid`` from /proc/PID/stat; None where it cannot be
    read (no /proc: not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        return fields[0], int(fields[19]) / os.sysconf("SC_CLK_TCK")  # state; field 22, starttime, in ticks
    except (OSError, ValueError, IndexError):
        return None


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def owner_gone(pid, mtime):
    """Whether the process that last changed a file at ``mtime`` (wall clock) under PID ``pid`` has ended: no
    process has that PID, it is a zombie, or the one that has it started after the file was last changed (the
    PID was used again). The start time is compared in the clock /proc counts it in (since boot, in ticks),
    never against a wall-clock start rebuilt from /proc/stat's whole-second boot time, which is up to a second
    early and so took a temporary written just before a kill -9 for a live run's."""
    if not _running(pid):
        return True
    proc = _proc_stat(pid)
    if proc is None:  # no /proc: a running PID may be the writer
        return False
    state, started = proc
    changed = time.clock_gettime(time.CLOCK_BOOTTIME) - (time.time() - mtime)  # the file's mtime, since boot
    # a tick of slack: /proc rounds the start down to a tick, which can only make a later start look earlier
    return state in ("Z", "X") or started > changed + 1 / os.sysconf("SC_CLK_TCK")


_swept = set()


def remove_stale_temps(folder, log=print, once=False):
    """Remove the temporaries an interrupted run left in ``folder`` (not below it); returns how many.

    Only names of our pattern whose process has ended (owner_gone): a temporary another live run is
    writing right now is never touched. ``once``: skip a folder already swept by this process (what
    every write does on its way)."""
    real = os.path.realpath(folder)
    if once and real in _swept:
        return 0
    _swept.add(real)
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet (nothing to clean), or unreadable (the write itself will say why)
        return 0
    removed = 0
    for name in names:
        m = _TEMP_NAME.match(name)
        if not m:
            continue
        p = os.path.join(folder, name)
        try:
            if not owner_gone(int(m["pid"]), os.lstat(p).st_mtime):
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        removed += 1
    if removed:
        log(f"removed {removed} temporary {'file' if removed == 1 else 'files'} left by an interrupted run in "
            f"{folder}")
    return removed


# ------------------------------------------------------------------ one run per output

LOCK_NAME = ".sd-lock"  # inside an output folder (beside an output file: .NAME.sd-lock) while a run writes there
_held = {}  # lock file -> (its open descriptor, whether taking it made the folder), for release_locks


class FolderInUse(WriteError):
    """Another live run writes to the same output."""


def lock_path(target, folder=True):
    """The lock file of an output: inside it for a folder (train.py's --out-dir, an adapter), beside it for a file."""
    if folder:
        return os.path.join(target, LOCK_NAME)
    return os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}{LOCK_NAME}")


def _holder(fd):
    """(PID, command) the lock file's holder wrote into it; ("?", "?") before it has written them."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid, _, command = os.read(fd, 4096).decode("utf-8", "replace").partition("\n")
    except OSError:
        return "?", "?"
    return pid.strip() or "?", " ".join(command.split()) or "?"


def _busy(target, flag, fd):
    pid, command = _holder(fd)
    return FolderInUse(f"{flag} {str(target)!r} is in use by another run (PID {pid}: {command}); wait for it to "
                       f"end, or pass another {flag}")


def check_not_in_use(target, flag, folder=True):
    """Before any work: refuse an output another live run holds (lock_output), writing nothing."""
    path = lock_path(target, folder)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # no lock file: no run holds it (or it cannot be read, and taking it will say why)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(target, flag, fd) from None
    except OSError:  # a file system without locks: nothing to learn here
        pass
    finally:
        os.close(fd)


def lock_output(target, flag, folder=True, log=print):
    """Hold ``target`` (an output folder, or file) for this run: an OS lock (fcntl.flock) on its lock file, which
    the OS drops when the process ends, however it ends. A second run refuses in one line naming this one's PID
    and command; a lock file a killed run left is taken over, and that is said. Makes the folder if needed.
    release_locks removes the file and drops the lock."""
    path = lock_path(target, folder)
    made = not os.path.isdir(os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(10):  # the holder may remove the file between our open and our lock: then lock the new one
        try:  # never through a link: the file is truncated once locked, and must be this folder's own
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise WriteError(f"{flag} {str(target)!r}: its lock file {path!r} cannot be opened ({why}); if it is "
                             "not a run's lock, move it away") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WriteError(f"{flag} {str(target)!r}: {path!r} is not a lock file (not a regular file); move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _busy(target, flag, fd)
            os.close(fd)
            raise error from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise FolderInUse(f"{flag} {str(target)!r}: its lock file {path!r} keeps changing; another run is starting "
                          f"there: wait for it, or pass another {flag}")
    pid, command = _holder(fd)
    if pid != "?":
        log(f"took over the lock {path} left by PID {pid} ({command}), which is no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{' '.join(shlex.join(sys.orig_argv).split())[:500]}\n".encode(), 0)
    _held[path] = fd, made
    return path


def release_locks():
    """Drop every output lock this process holds, removing its file first (while still held, so no other run can
    lock the file that is being removed). A folder the lock made is removed too if the run left it empty (it
    stopped before writing anything)."""
    while _held:
        path, (fd, made) = _held.popitem()
        try:
            os.remove(path)
        except OSError:  # gone already: the lock still drops below
            pass
        os.close(fd)
        if made:
            try:
                os.rmdir(os.path.dirname(path))
            except OSError:  # not empty: the run's files are in it
                pass


# ------------------------------------------------------------------ writing

def atomic_write(path, write):
    """Call ``write(tmp_path)`` and move the result over ``path`` in one step (os.replace).

    A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one; a write that
    fails (a full disk, a file-size limit, no permission) is one WriteError naming ``path``. A kill
    -9 can leave the temporary file; the next write into the folder removes it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise WriteError(f"cannot write {path!r}: it is a folder")
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder, once=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it the file: safe across a power cut
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        os_error = _os_error_in(e)
        if os_error is None:  # a RuntimeError that is not a failed write: a bug, not the disk
            raise
        raise WriteError(_write_failure(path, os_error)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _os_error_in(e):
    """The OSError behind a failed write: ``e`` itself, or what torch.save's RuntimeError ("unexpected pos")
    was raised while handling (torch writes through a Python file object, whose OSError is the context)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__context__ or e.__cause__, seen + 1
    return None


def _write_failure(path, e):
    what = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk is full ({what})"
    elif e.errno == errno.EFBIG:
        why = f"the file is larger than this system allows ({what})"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = f"a file stands where a folder should be ({what})"
    else:
        why = what
    return f"could not write {path!r}: {why}; the earlier file there, if any, is unchanged"


# ------------------------------------------------------------------ checks before any work

def check_writable_dir(path, flag):
    """Refuse at once a folder the run would write into but cannot (a file in the way); creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise WriteError(f"{flag} {path!r} is a file, not a folder; pass a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):  # the nearest part of the path that exists must be a writable folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise WriteError(f"{flag} {path!r}: {probe!r} is a file, so this folder cannot be made")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{flag} {path!r}: {probe!r} is not writable")


def check_writable_file(path, flag):
    """Refuse at once an output file path that cannot be written: a folder there, or a folder that cannot be made."""
    if os.path.isdir(path):
        raise WriteError(f"{flag} {path!r} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    check_writable_dir(folder, f"the folder of {flag}")


def same_file(a, b):
    """Whether two paths name the same file (either may not exist yet)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _whole(path):
    """The resolved path of what ``path`` belongs to: a file of an adapter folder is that folder."""
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    if os.path.basename(real) in ADAPTER_FILE_NAMES and any(
            os.path.isfile(os.path.join(folder, n)) for n in ADAPTER_FILE_NAMES[:2]):
        return folder
    return real


def same_thing(a, b):
    """Whether two paths name one thing: the same file resolved, or an adapter folder and a file inside it."""
    return _whole(a) == _whole(b)


def _inside(inner, outer):
    return inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_apart(outputs, inputs, fix):
    """Refuse a run whose output is one of its inputs: the same file, or a file inside an input adapter folder
    (or an output folder holding an input). ``outputs``/``inputs`` are (flag, path) pairs; a None path is skipped.

    Paths are compared resolved (os.path.realpath: symlinks and ``a/../a`` name the same thing), and
    an adapter folder and the files inside it count as one."""
    for out_flag, out in outputs:
        if out is None:
            continue
        w_out = _whole(out)
        for in_flag, given in inputs:
            if given is None:
                continue
            w_in = _whole(given)
            if w_out == w_in:
                how = "is"
            elif _inside(w_out, w_in):
                how = "is inside"
            elif _inside(w_in, w_out):
                how = "holds"
            else:
                continue
            raise WriteError(f"{out_flag} {str(out)!r} {how} {in_flag} {str(given)!r}: a run never writes over a "
                             f"file it reads; {fix}")


def file_kind(path):
    """What ``path`` holds, from its first bytes: 'missing', 'adapter folder', 'folder', 'empty folder',
    'checkpoint' (torch.save's zip), 'npz', 'zip', 'png', 'json', 'safetensors' or 'other'."""
    if not os.path.lexists(path):
        return "missing"
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if n != LOCK_NAME]  # a run's lock (one a killed run left) is no content
        if any(n in ADAPTER_FILE_NAMES for n in names) or (
                names and all(n in RUN_LOG_NAMES or n.endswith(TEMP_SUFFIX) for n in names)):
            return "adapter folder"
        return "folder" if names else "empty folder"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = os.path.getsize(path)
    except OSError:
        return "other"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip"
        if any(n.endswith("data.pkl") for n in names):
            return "checkpoint"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "other"


def check_replace(path, flag, ours, overwrite=None, what="a file of ours"):
    """Before any work: ``path`` is free, or holds ``what`` (a kind in ``ours``, or ``ours(path)`` true).

    A file of another kind is never replaced, whatever the flags. One of ours is replaced only with
    --overwrite when ``overwrite`` is False; None: this output is updated in place by design (pictures
    and samples of a rerun). An empty folder counts as free."""
    kind = file_kind(path)
    if kind in ("missing", "empty folder"):
        return
    mine = ours(path) if callable(ours) else kind in ours
    if not mine:
        shown = kind if kind not in ("other", "zip") else "a file of another kind"
        raise WriteError(f"{flag} {str(path)!r} holds {_article(shown)}, not {what}, so it is left as it is (even "
                         f"with --overwrite); pass another {flag}")
    if overwrite is False:
        raise WriteError(f"{flag} {str(path)!r} already holds {what}; pass --overwrite to replace it, or another "
                         f"{flag}")


def _article(kind):
    if kind.startswith("a "):
        return kind
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def write_json(path, obj):
    """``obj`` as indented JSON, written atomically; never over a file that is not JSON (a checkpoint, a picture)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head and head[:1] not in (b"{", b"["):
            raise WriteError(f"{path!r} exists and is not a JSON file, so it is left as it is; write the JSON "
                             "elsewhere")

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)
