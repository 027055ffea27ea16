"""Writing files so that nothing a user saved is lost: atomic replaces, failures named, outputs checked first.

    atomic_write(path, lambda tmp: ...)   # write a temporary file, then os.replace: never a half-written file
    write_json(path, obj)                 # the same for JSON, never over a file that is not JSON
    check_writable_dir(out_dir, "--out-dir")   # before any long work: a file in the way is refused at once

Every checkpoint, adapter, picture, .npz and JSON the scripts write goes through ``atomic_write``.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile

from errors import UserError


class WriteError(UserError):
    """A file that could not be written (disk full, no permission, a folder in the way); the earlier file is intact."""


def atomic_write(path, write):
    """Call ``write(tmp_path)`` and move the result over ``path`` in one step (os.replace).

    A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one; a write that
    fails (a full disk, a file-size limit, no permission) is one WriteError naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise WriteError(f"cannot write {path!r}: it is a folder")
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
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
