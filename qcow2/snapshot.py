"""The internal snapshot table codec (entries <-> bytes). No I/O.

Theory of operation
-------------------
The snapshot table is a run of variable-length entries, each starting on an 8-byte
boundary: a 40-byte fixed part (``_ENTRY_HEADER``), ``extra_data_size`` bytes of extra
data, the id string, the name, then zero padding to 8. The extra data is versioned by
its length: 8 bytes add a 64-bit VM state size (which then overrides the 32-bit
field), 16 add the virtual disk size at snapshot time, 24 add the instruction count.
Anything past what we know is kept verbatim in :attr:`SnapshotEntry.extra`, so a table
written by a newer QEMU survives a rewrite.

The known extra fields are also exposed as attributes; on encoding the attributes win
over the raw ``extra`` bytes (they are written into it), so ``entry.replace(disk_size=x)``
does what it says.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Iterable

from . import constants as C
from .errors import FormatError, Qcow2Error, RequestError

__all__ = ["SnapshotEntry", "decode_snapshot_table", "encode_snapshot_table",
           "snapshot_table_size", "snapshot_entry_size", "SNAPSHOT_ENTRY_HEADER_SIZE",
           "make_snapshot_entry", "unpack_entry_header"]

_ENTRY_HEADER = struct.Struct(">QIHHIIQII")
SNAPSHOT_ENTRY_HEADER_SIZE = _ENTRY_HEADER.size   # 40
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_EXTRA_VM_STATE = 8     # extra_data_size needed for vm_state_size_large
_EXTRA_DISK_SIZE = 16   # ... for disk_size
_EXTRA_ICOUNT = 24      # ... for icount

_FIELDS = ("l1_table_offset", "l1_size", "id_str_size", "name_size", "date_sec", "date_nsec",
           "vm_clock_nsec", "vm_state_size", "extra_data_size")


@dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot table entry.

    ``vm_state_size`` is the effective VM state size (the 64-bit extra field when the
    extra data has it, else the 32-bit field). ``disk_size`` and ``icount`` come from the
    extra data (None when it is too short to hold them; ``icount`` is stored as an
    unsigned 64-bit value, QEMU writes all ones for "not recorded"). ``extra`` is the
    raw extra data. ``vm_state_size32`` is the 32-bit on-disk field when it differs from
    what the encoder would derive (``vm_state_size`` if it fits in 32 bits, else 0);
    None otherwise.
    """

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra: bytes
    vm_state_size32: int | None = None

    def replace(self, **changes) -> "SnapshotEntry":
        return dataclasses.replace(self, **changes)

    @property
    def id(self) -> str:
        """The id as QEMU uses it: the stored bytes up to the first NUL (C string)."""
        return self.id_str.split("\0", 1)[0]

    @property
    def display_name(self) -> str:
        """The name as QEMU uses it: the stored bytes up to the first NUL (C string)."""
        return self.name.split("\0", 1)[0]

    @property
    def encoded_size(self) -> int:
        """Bytes this entry takes in the table, padding to the next entry excluded."""
        return snapshot_entry_size(self)

    def _check(self) -> None:
        again = decode_snapshot_table(encode_snapshot_table([self]), 1)
        assert again == (self,), (again, self)


def _derived_u32(vm_state_size: int) -> int:
    return vm_state_size if vm_state_size <= _U32 else 0


def _extra_bytes(e: SnapshotEntry) -> bytes:
    """The extra data to write for ``e``: its raw bytes with the known fields set."""
    extra = bytearray(e.extra)
    need = 0
    if e.vm_state_size > _U32:
        need = _EXTRA_VM_STATE
    if e.disk_size is not None:
        need = _EXTRA_DISK_SIZE
    if e.icount is not None:
        need = _EXTRA_ICOUNT
    if len(extra) < need:
        extra += bytes(need - len(extra))
    if e.disk_size is None and len(extra) >= _EXTRA_DISK_SIZE:
        raise RequestError(f"Snapshot {e.id_str!r}: disk_size is None but the extra data "
                           f"({len(extra)} bytes) holds one")
    if e.icount is None and len(extra) >= _EXTRA_ICOUNT:
        raise RequestError(f"Snapshot {e.id_str!r}: icount is None but the extra data "
                           f"({len(extra)} bytes) holds one")
    try:
        if len(extra) >= _EXTRA_VM_STATE:
            struct.pack_into(">Q", extra, 0, e.vm_state_size)
        if e.disk_size is not None:
            struct.pack_into(">Q", extra, 8, e.disk_size)
        if e.icount is not None:
            struct.pack_into(">Q", extra, 16, e.icount)
    except struct.error as exc:
        raise RequestError(f"Snapshot {e.id_str!r}: extra field out of range: {exc}") from None
    if len(extra) > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
        raise RequestError(f"Snapshot {e.id_str!r}: {len(extra)} bytes of extra data, more than "
                           f"{C.QCOW_MAX_SNAPSHOT_EXTRA_DATA}")
    return bytes(extra)


def snapshot_entry_size(entry: SnapshotEntry) -> int:
    """Bytes one entry takes, without the padding that aligns the next entry to 8."""
    return (SNAPSHOT_ENTRY_HEADER_SIZE + len(_extra_bytes(entry))
            + len(entry.id_str.encode("utf-8", "surrogateescape"))
            + len(entry.name.encode("utf-8", "surrogateescape")))


def snapshot_table_size(entries: Iterable[SnapshotEntry]) -> int:
    """Bytes the encoded table takes: entries aligned to 8, the last one unpadded
    (as QEMU writes it). O(n)."""
    size = 0
    for e in entries:
        size = ((size + 7) & ~7) + snapshot_entry_size(e)
    return size


def encode_snapshot_table(entries: Iterable[SnapshotEntry]) -> bytes:
    """Serialise a snapshot table: each entry starts 8-aligned (zero padding between
    entries), the last one is not padded, as QEMU writes it. O(total size).

    Raises :class:`RequestError` when a field does not fit its on-disk width.
    """
    out = bytearray()
    for e in entries:
        out += bytes(-len(out) % 8)
        extra = _extra_bytes(e)
        id_raw = e.id_str.encode("utf-8", "surrogateescape")
        name_raw = e.name.encode("utf-8", "surrogateescape")
        u32 = e.vm_state_size32 if e.vm_state_size32 is not None else _derived_u32(e.vm_state_size)
        if len(extra) < _EXTRA_VM_STATE and u32 != e.vm_state_size:
            raise RequestError(f"Snapshot {e.id_str!r}: vm_state_size {e.vm_state_size} needs the "
                               "64-bit extra field (or vm_state_size32 must equal it)")
        try:
            out += _ENTRY_HEADER.pack(e.l1_table_offset, e.l1_size, len(id_raw), len(name_raw),
                                      e.date_sec, e.date_nsec, e.vm_clock_nsec, u32, len(extra))
        except struct.error as exc:
            raise RequestError(f"Snapshot {e.id_str!r}: field out of range: {exc}") from None
        out += extra + id_raw + name_raw
    return bytes(out)


def decode_snapshot_table(buf: bytes, nb_snapshots: int) -> tuple[SnapshotEntry, ...]:
    """Parse ``nb_snapshots`` entries from the start of ``buf``.

    Enforces QEMU 7.2's limits: at most 65536 snapshots, at most 1024 bytes of extra
    data per entry ("Too much extra metadata in snapshot table entry N"), the table at
    most 64 MiB ("Snapshot table is too big"). A buffer too short raises
    :class:`FormatError` naming the entry index and the field. O(table size).
    """
    try:
        return _decode(memoryview(bytes(buf)), nb_snapshots)
    except Qcow2Error:
        raise
    except Exception as exc:  # defensive: never let hostile input escape as another type
        raise FormatError(f"Invalid snapshot table: {type(exc).__name__}: {exc}") from exc


def _decode(buf: memoryview, nb_snapshots: int) -> tuple[SnapshotEntry, ...]:
    if nb_snapshots < 0 or nb_snapshots > C.QCOW_MAX_SNAPSHOTS:
        raise FormatError(f"Too many snapshots ({nb_snapshots} > {C.QCOW_MAX_SNAPSHOTS})")
    out = []
    offset = 0
    end = len(buf)

    def need(i: int, what: str, length: int) -> None:
        if offset + length > end:
            raise FormatError(f"Snapshot table entry {i} truncated: {what} at table offset "
                              f"0x{offset:x} needs {length} bytes, table has 0x{end:x}")

    for i in range(nb_snapshots):
        offset = (offset + 7) & ~7
        need(i, "header", SNAPSHOT_ENTRY_HEADER_SIZE)
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock,
         vm_state32, extra_len) = _ENTRY_HEADER.unpack_from(buf, offset)
        offset += SNAPSHOT_ENTRY_HEADER_SIZE
        if extra_len > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(f"Too much extra metadata in snapshot table entry {i}")
        need(i, "extra data", extra_len)
        extra = bytes(buf[offset:offset + extra_len])
        offset += extra_len
        need(i, "id", id_len)
        id_str = bytes(buf[offset:offset + id_len]).decode("utf-8", "surrogateescape")
        offset += id_len
        need(i, "name", name_len)
        name = bytes(buf[offset:offset + name_len]).decode("utf-8", "surrogateescape")
        offset += name_len
        if offset > C.QCOW_MAX_SNAPSHOTS_SIZE:
            raise FormatError("Snapshot table is too big")
        out.append(make_snapshot_entry((l1_off, l1_size, id_len, name_len, date_sec, date_nsec,
                                        vm_clock, vm_state32, extra_len), extra, id_str, name))
    return tuple(out)


def make_snapshot_entry(fixed: tuple, extra: bytes, id_str: str, name: str) -> SnapshotEntry:
    """An entry from its unpacked fixed part (the nine fields of ``_FIELDS``), its extra data
    (as kept: at most what the entry declares) and its decoded id and name.  The extra data
    decides which of ``vm_state_size``/``disk_size``/``icount`` it holds.  O(1)."""
    l1_off, l1_size, _, _, date_sec, date_nsec, vm_clock, vm_state32, _ = fixed
    vm_state_size = vm_state32
    disk_size = icount = None
    if len(extra) >= _EXTRA_VM_STATE:
        vm_state_size = int.from_bytes(extra[0:8], "big")
    if len(extra) >= _EXTRA_DISK_SIZE:
        disk_size = int.from_bytes(extra[8:16], "big")
    if len(extra) >= _EXTRA_ICOUNT:
        icount = int.from_bytes(extra[16:24], "big")
    u32 = None if vm_state32 == _derived_u32(vm_state_size) else vm_state32
    return SnapshotEntry(l1_off, l1_size, id_str, name, date_sec, date_nsec, vm_clock,
                         vm_state_size, disk_size, icount, bytes(extra), u32)


def unpack_entry_header(raw: bytes) -> tuple:
    """The nine fixed fields of an entry from its first 40 bytes (``_FIELDS`` order)."""
    return _ENTRY_HEADER.unpack_from(raw, 0)
