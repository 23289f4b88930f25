"""The only module that touches host files.

Theory of operation
-------------------
A :class:`Storage` wraps one open file descriptor (the qcow2 file, an external data file, or a raw
backing file).  Reads are positional (``os.preadv`` straight into the caller's buffer, so a
contiguous host run costs one system call and no copy).  Writes are positional too, and every write
first asks the :class:`~qcow2.overlap.OverlapGuard` attached to the storage whether the byte range
overlaps metadata other than the types the caller says the write may touch (``ign``, as QEMU calls
it).  A write the guard refuses never reaches the file: the guard raises ``OverlapError`` (after
signalling corruption on the image).  No other module calls ``os.pwrite``/``os.write`` on an image;
a test greps the package to prove it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import Protocol

from .errors import BackingError, Qcow2Error, ReadOnlyError, RequestError


class WriteGuard(Protocol):
    def check_write(self, host_offset: int, length: int, ign: int) -> None:
        """Raise OverlapError when the write would touch metadata not in ``ign``."""


class Storage:
    """A host file opened for positional I/O.

    ``pread``/``readinto`` past end of file return zeros for the missing part (a qcow2 file may end
    before the last cluster its tables mention only if it is damaged; callers that care check
    :attr:`size` themselves).
    """

    def __init__(self, path: str, writable: bool = False, *, create: bool = False,
                 what: str = "image", sync: bool = True):
        if not path:
            raise Qcow2Error("The 'file' block driver requires a file name")
        self.path = path
        self.writable = writable or create
        self.sync = sync          # False: flush() does not fsync (QEMU's cache=unsafe)
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            if create:
                raise Qcow2Error(f"Could not create '{path}': {e.strerror or e}") from None
            raise _open_error(path, e, what) from None
        try:
            st = os.fstat(self.fd)
        except OSError as e:  # pragma: no cover - fstat on a fresh fd does not fail in practice
            os.close(self.fd)
            raise Qcow2Error(f"Could not stat '{path}': {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise Qcow2Error(f"'file' driver requires '{path}' to be a regular file")
        self.guard: WriteGuard | None = None
        self._lock = threading.Lock()
        self._size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Current length of the host file in bytes."""
        return self._size

    def allocated_size(self) -> int:
        """Bytes the host file occupies on disk (``st_blocks * 512``), as qemu-img's actual-size."""
        return os.fstat(self.fd).st_blocks * 512

    def readinto(self, buf, host_offset: int) -> None:
        """Fill ``buf`` (a writable buffer) from ``host_offset``; zeros past end of file.

        Offsets past the end (even absurd ones from a damaged table) cost no system call.
        """
        view = memoryview(buf).cast("B")
        total = len(view)
        if host_offset < 0:
            raise RequestError(f"negative host offset {host_offset}")
        done = 0
        readable = max(0, min(total, self._size - host_offset))
        while done < readable:
            try:
                n = os.preadv(self.fd, [view[done:readable]], host_offset + done)
            except OSError as e:
                raise Qcow2Error(f"Could not read '{self.path}' at 0x{host_offset + done:x}: "
                                 f"{e.strerror}") from None
            if n == 0:
                break
            done += n
        if done < total:
            view[done:] = bytes(total - done)

    def pread(self, length: int, host_offset: int) -> bytes:
        """Return ``length`` bytes at ``host_offset`` (zeros past end of file)."""
        buf = bytearray(length)
        self.readinto(buf, host_offset)
        return bytes(buf)

    def pread_in_file(self, length: int, host_offset: int, unit: int = 1) -> bytes:
        """Like :meth:`pread` but returns only the whole ``unit``-byte items that exist in the
        file (possibly fewer bytes), so that a size read from a hostile image never sizes an
        allocation past the file.  A table cut by the end of the file reads as its existing
        entries (the missing ones are zero, as QEMU reads them)."""
        n = max(0, min(length, self._size - host_offset))
        return self.pread(n - n % unit, host_offset)

    def data_runs(self, host_offset: int, length: int) -> list[tuple[int, bool]]:
        """Split the range into ``(length, is_data)`` runs by ``SEEK_DATA``/``SEEK_HOLE``; holes
        and the part past end of file are not data."""
        out: list[tuple[int, bool]] = []
        end = host_offset + length
        pos = host_offset
        while pos < end:
            try:
                data_start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to end of file
                data_start = end
            if data_start > pos:
                n = min(data_start, end) - pos
                out.append((n, False))
            else:
                try:
                    hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                except OSError:
                    hole = end
                n = min(hole, end) - pos
                out.append((n, True))
            pos += n
        return out

    # -- writing ---------------------------------------------------------------------------------
    def pwrite(self, data, host_offset: int, ign: int = 0) -> int:
        """Write ``data`` at ``host_offset`` after the guard has cleared the range.

        ``ign`` is the mask of metadata types the write is allowed to overlap (the table being
        rewritten in place).  Raises ``OverlapError`` (nothing written) when the guard refuses.
        """
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        view = memoryview(data).cast("B")
        if host_offset < 0:
            raise RequestError(f"negative host offset {host_offset}")
        if self.guard is not None and len(view):
            self.guard.check_write(host_offset, len(view), ign)
        done = 0
        while done < len(view):
            try:
                done += os.pwritev(self.fd, [view[done:]], host_offset + done)
            except OSError as e:
                raise Qcow2Error(f"Could not write '{self.path}' at 0x{host_offset + done:x}: "
                                 f"{e.strerror}") from None
        end = host_offset + len(view)
        with self._lock:
            if end > self._size:
                self._size = end
        return len(view)

    def allocate(self, host_offset: int, length: int, ign: int = 0) -> None:
        """Reserve zero-filled host blocks for ``[host_offset, +length)`` (``posix_fallocate``),
        after the guard has cleared the range; the file grows if needed.  Where the file system
        cannot, nothing happens: the range then reads as zeros from holes, which is the same."""
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        if self.guard is not None and length:
            self.guard.check_write(host_offset, length, ign)
        try:
            os.posix_fallocate(self.fd, host_offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            raise Qcow2Error(f"Could not allocate space in '{self.path}' at 0x{host_offset:x}: "
                             f"{e.strerror}") from None
        with self._lock:
            self._size = max(self._size, host_offset + length)

    def truncate(self, length: int) -> None:
        """Set the host file length (only growing or shrinking past the last metadata)."""
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        try:
            os.ftruncate(self.fd, length)
        except OSError as e:      # EFBIG past the file system's limit, ENOSPC, EIO ...
            raise Qcow2Error(f"Could not resize file: {e.strerror or e}") from None
        self._size = length

    def flush(self) -> None:
        """Make every write so far durable (fsync), unless the file was opened with
        ``sync=False``."""
        if self.writable and self.sync:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_error(path: str, e: OSError, what: str) -> Qcow2Error:
    reason = e.strerror or str(e)
    cls = BackingError if what == "backing file" else Qcow2Error
    if e.errno == errno.EISDIR:
        reason = "Is a directory"
    return cls(f"Could not open '{path}': {reason}")
