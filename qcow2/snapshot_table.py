"""Reading the internal snapshot table from the image file, as QEMU 7.2 reads it.

Theory of operation
-------------------
The table is ``nb_snapshots`` variable-length entries from ``snapshots_offset``, each starting on
an 8-byte boundary (layout in :mod:`qcow2.snapshot`).  It is walked entry by entry through a read
window (one ``pread`` per MiB), so a hostile count or length never sizes an allocation: the bytes
read all lie in the first 64 MiB of the table plus one entry (extra data past QEMU's 1024-byte
limit is skipped, never read), and reads past the end of the file are zeros, as QEMU's are.

Two limits make a table unusable for a normal open; each raises :class:`SnapshotTableError` with
QEMU's message and its hint line: more than 1024 bytes of extra data in an entry, and an entry
ending more than 64 MiB after the start of the table.  ``repair=True`` is how ``qemu-img check -r
all`` reads the table instead: the extra data is cut to 1024 bytes (the id and name are still
read after the whole declared extra data), and the entries from the first one ending past 64 MiB
on are dropped; the result lists both for the checker to report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import constants as C
from .errors import FormatError
from .snapshot import (SNAPSHOT_ENTRY_HEADER_SIZE, SnapshotEntry, make_snapshot_entry,
                       unpack_entry_header)

if TYPE_CHECKING:  # pragma: no cover
    from .storage import Storage

__all__ = ["SnapshotTableError", "SnapshotReadError", "TableRead", "read_snapshot_table",
           "table_location_valid", "EXTRA_DATA_HINT", "overhanging_hint", "MAX_READ_END"]

_WINDOW = 1 << 20
MAX_READ_END = C.INT64_MAX & ~((1 << 30) - 1)
"""QEMU's block layer fails a read ending past this host offset (EIO) instead of reading zeros."""
EXTRA_DATA_HINT = "You can force-remove this extra metadata with qemu-img check -r all"


def overhanging_hint(nb_overhanging: int) -> str:
    """QEMU's hint for a table with too many entries or too many bytes."""
    return (f"You can force-remove all {nb_overhanging} overhanging snapshots with qemu-img "
            "check -r all")


class SnapshotTableError(FormatError):
    """The snapshot table breaks one of QEMU's limits.  ``str()`` is QEMU's two lines: ``reason``,
    the message scripts match, then ``hint`` (how ``check -r all`` repairs it).  ``index``,
    ``field`` and ``value`` name the entry and the offending value (``extra_data_size`` in bytes,
    or ``table_size``: the bytes from the table start to the end of that entry)."""

    def __init__(self, reason: str, hint: str, index: int, field: str, value: int):
        super().__init__(f"{reason}\n{hint}")
        self.reason = reason
        self.hint = hint
        self.index = index
        self.field = field
        self.value = value


class SnapshotReadError(FormatError):
    """A read of the table QEMU's block layer would refuse (ending past :data:`MAX_READ_END`)."""

    def __init__(self, host_offset: int, length: int):
        super().__init__("Failed to read snapshot table: Input/output error")
        self.host_offset = host_offset
        self.length = length


@dataclass
class TableRead:
    """The entries read, and what a repairing read changed.

    ``table_size`` is the number of bytes from the start of the table to the end of the last entry
    kept, as QEMU counts it (the whole declared extra data included); ``extra_cut`` lists
    ``(entry index, declared extra_data_size)`` of entries whose extra data was cut to 1024 bytes;
    ``nb_overhanging`` is the number of entries dropped at the 64 MiB limit."""

    entries: list[SnapshotEntry] = field(default_factory=list)
    table_size: int = 0
    extra_cut: list[tuple[int, int]] = field(default_factory=list)
    nb_overhanging: int = 0


class _Window:
    """Reads of the table through a sliding buffer: one ``pread`` per MiB, zeros past EOF."""

    def __init__(self, file: "Storage", table_offset: int):
        self._file = file
        self._base = table_offset
        self._start = 0
        self._buf = b""

    def read(self, pos: int, length: int) -> bytes:
        """``length`` bytes at table position ``pos`` (at most one entry's worth here)."""
        if length and self._base + pos + length > MAX_READ_END:
            raise SnapshotReadError(self._base + pos, length)
        rel = pos - self._start
        if rel < 0 or rel + length > len(self._buf):
            self._start = pos
            self._buf = self._file.pread(max(length, _WINDOW), self._base + pos)
            rel = 0
        return self._buf[rel:rel + length]


def table_location_valid(table_offset: int, nb_snapshots: int, cluster_size: int) -> bool:
    """QEMU's test of the header's table location: cluster aligned, and the minimal table
    (``nb_snapshots`` bare entries) ends inside a signed 64-bit offset."""
    return not (table_offset & (cluster_size - 1)
                or nb_snapshots * SNAPSHOT_ENTRY_HEADER_SIZE > C.INT64_MAX - table_offset)


def read_snapshot_table(file: "Storage", table_offset: int, nb_snapshots: int, *,
                        repair: bool = False) -> TableRead:
    """Read ``nb_snapshots`` entries at ``table_offset`` (see the module docstring).

    Raises :class:`SnapshotTableError` for a table QEMU refuses (unless ``repair``),
    :class:`SnapshotReadError` where QEMU cannot read, and :class:`FormatError` for more than
    65536 entries.  O(table size) time, O(1 MiB + entries)
    memory."""
    if nb_snapshots < 0 or nb_snapshots > C.QCOW_MAX_SNAPSHOTS:
        raise FormatError(f"Too many snapshots: nb_snapshots {nb_snapshots} > "
                          f"{C.QCOW_MAX_SNAPSHOTS}")
    window = _Window(file, table_offset)
    out = TableRead()
    pos = 0
    for index in range(nb_snapshots):
        pos = (pos + 7) & ~7
        fixed = unpack_entry_header(window.read(pos, SNAPSHOT_ENTRY_HEADER_SIZE))
        pos += SNAPSHOT_ENTRY_HEADER_SIZE
        id_len, name_len, extra_len = fixed[2], fixed[3], fixed[8]
        if extra_len <= C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:       # one read for the rest
            body = window.read(pos, extra_len + id_len + name_len)
            extra = body[:extra_len]
            id_raw = body[extra_len:extra_len + id_len]
            name_raw = body[extra_len + id_len:]
        elif not repair:
            raise SnapshotTableError(
                f"Too much extra metadata in snapshot table entry {index}", EXTRA_DATA_HINT,
                index, "extra_data_size", extra_len)
        else:                   # keep 1024 bytes; the id and name follow the declared length
            out.extra_cut.append((index, extra_len))
            extra = window.read(pos, C.QCOW_MAX_SNAPSHOT_EXTRA_DATA)
            id_raw = window.read(pos + extra_len, id_len)
            name_raw = window.read(pos + extra_len + id_len, name_len)
        pos += extra_len + id_len + name_len
        if pos > C.QCOW_MAX_SNAPSHOTS_SIZE:
            if not repair:
                raise SnapshotTableError("Snapshot table is too big",
                                         overhanging_hint(nb_snapshots - index), index,
                                         "table_size", pos)
            out.nb_overhanging = nb_snapshots - index
            break
        out.entries.append(make_snapshot_entry(
            fixed, extra, id_raw.decode("utf-8", "surrogateescape"),
            name_raw.decode("utf-8", "surrogateescape")))
        out.table_size = pos
    return out
