"""Reading the files a user names, so that no file can hang a run, fill its memory or be written over.

    read_regular(path, "--config", limit)    # the bytes of a regular file: a FIFO or device refused unread
    npz_members(path, "--data")              # {name: (shape, dtype)} from an .npz's headers, no array loaded
    folder_files(folder, "--data")           # every file under a folder, resolved; a symlink loop named
    check_inputs_apart(outputs, inputs, fix) # files.check_apart, each input folder's files included

Every file a script reads (``--config``, ``--data`` and the files in it) goes through here, so it is
known to be a file of a bounded size before a byte of it is read, and it can be checked against every
output, resolved, as the checkpoint and the adapter are (files.check_apart).
"""
from __future__ import annotations

import errno
import math
import os
import stat
import zipfile

import numpy as np

from errors import UserError
from files import check_apart

CONFIG_MAX_BYTES = 1 << 20  # a config.json is about 3 KB; a megabyte is already a mistake (or /dev/urandom)
# an .npz of digits: MNIST's 70,000 28x28 images are 55 MB; more than this is no set of digits
NPZ_MAX_BYTES = 1 << 30
FOLDER_MAX_FILES = 200_000  # more files than any digit set holds: a --data of / would walk the whole disk


class InputError(UserError):
    """A file given to read that cannot be read as one: a FIFO, a device, too large, a symlink loop."""


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path, flag):
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{flag} {str(path)!r}: no such file") from None
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r} cannot be read: {_why(e)}") from None


def _why(e):
    if e.errno == errno.ELOOP:
        return "a symlink loop (a link that leads back to itself); point it at a real file"
    return os.strerror(e.errno) if e.errno else str(e)


def check_regular(path, flag, limit=None):
    """Refuse, without opening it, what is not a regular file (a FIFO would block, a device never ends), or one
    larger than ``limit`` bytes; returns its size."""
    st = _stat(path, flag)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{flag} {str(path)!r} is {_kind(st.st_mode)}, not a file; pass a regular file")
    if limit is not None and st.st_size > limit:
        raise InputError(f"{flag} {str(path)!r} is {st.st_size:,} bytes, more than the {limit:,} such a file can "
                         "be; pass the right file")
    return st.st_size


def read_regular(path, flag, limit):
    """The bytes of the regular file ``path``, at most ``limit`` of them: stat first, then open with O_NONBLOCK
    (so a FIFO put there since cannot block) and check again that what was opened is a regular file."""
    check_regular(path, flag, limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r} cannot be read: {_why(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped between the stat and the open
            raise InputError(f"{flag} {str(path)!r} is {_kind(mode)}, not a file; pass a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # a file that grows as it is read is still read no further than this
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r} cannot be read: {_why(e)}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"{flag} {str(path)!r} is more than the {limit:,} bytes such a file can be; pass the "
                         "right file")
    return data


def npz_members(path, flag, max_bytes=NPZ_MAX_BYTES):
    """{name: (shape, dtype)} of the arrays in the .npz ``path``, read from each member's .npy header
    (numpy.lib.format) before any array is loaded: a header that claims 1e8 images is refused here, in
    bytes, instead of ending in a MemoryError; an object array (a pickle: loading it runs code) is refused."""
    check_regular(path, flag)
    what = f"{flag} {str(path)!r}"
    out, total = {}, 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise InputError(f"{what} holds {info.filename!r}, which is not an array; an .npz holds "
                                     "only .npy arrays (numpy.savez writes one)")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                name = info.filename[:-len(".npy")]
                if dtype.hasobject:
                    raise InputError(f"{what}: array {name!r} holds Python objects, which are never loaded (loading "
                                     "them would run code); save plain numbers, e.g. images as uint8")
                total += math.prod(shape) * dtype.itemsize
                if total > max_bytes:
                    raise InputError(f"{what}: its arrays claim more than {max_bytes:,} bytes ({name!r} has shape "
                                     f"{shape}, {dtype}); no set of digits is that large")
                out[name] = (tuple(shape), dtype)
    except InputError:
        raise
    # not a zip (a pickle, an .npy, text), a damaged member or header
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, NotImplementedError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{what} is not a readable .npz ({why[:200]}); numpy.savez writes one") from None
    return out


def folder_files(folder, flag, limit=FOLDER_MAX_FILES):
    """Every file under ``folder`` (links followed, each resolved once): what a run reading the folder reads.
    A symlink loop, or a link to nowhere, is named; a folder of more than ``limit`` files is refused."""
    found = []
    try:
        root = os.stat(folder)
    except OSError as e:
        raise InputError(f"{flag} {str(folder)!r} cannot be read: {_why(e)}") from None
    stack = [(folder, frozenset([(root.st_dev, root.st_ino)]))]  # each folder with the folders above it
    while stack:
        here, above = stack.pop()
        try:
            names = sorted(os.listdir(here))
        except OSError as e:
            raise InputError(f"{flag} {str(here)!r} cannot be read: {_why(e)}") from None
        for n in names:
            p = os.path.join(here, n)
            try:
                st = os.stat(p)
            except OSError as e:
                raise InputError(f"{flag}: {p!r} cannot be read: {_why(e)}") from None
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in above:  # a link to a folder above it: walked, it would never end
                    raise InputError(f"{flag}: {p!r} leads back to a folder above it (a symlink loop); remove "
                                     "the link")
                stack.append((p, above | {key}))
            else:
                found.append((p, os.path.realpath(p)))
            if len(found) > limit:
                raise InputError(f"{flag} {str(folder)!r} holds more than {limit:,} files; pass the folder of "
                                 "the digits themselves")
    return found


def check_inputs_apart(outputs, inputs, fix):
    """files.check_apart with each input that is a folder (``--data``) expanded into its files, links resolved:
    a digit in --data that is a link into the output folder is an input like any other."""
    expanded = []
    for flag, given in inputs:
        expanded.append((flag, given))
        if given is not None and os.path.isdir(given):
            expanded += [(f"a file of {flag}", real) for _, real in folder_files(given, flag)]
    check_apart(outputs, expanded, fix)
