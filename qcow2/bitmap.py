"""Persistent dirty bitmap codecs: the bitmap directory and bitmap tables. No I/O.

The bitmap directory (located by the bitmaps header extension) is a run of entries,
each 8-byte aligned: a 24-byte fixed part, ``extra_data_size`` bytes of extra data, the
name, zero padding. A bitmap table is a plain u64 table (see :func:`decode_bitmap_table`).

:func:`decode_bitmap_directory` applies QEMU 7.2's checks with its messages ("Broken
bitmap directory", "Bitmap extra data is not supported", "Bitmap 'x' doesn't satisfy
the constraints", ...); the per-entry constraints that depend on the image (cluster
alignment, table size against the virtual size) run when ``cluster_size`` and
``image_size`` are given.
"""

from __future__ import annotations

import array
import dataclasses
import struct
from dataclasses import dataclass
from typing import Iterable

from . import constants as C
from .errors import FormatError, Qcow2Error, RequestError
from .tables import decode_u64_table

__all__ = ["BitmapDirectoryEntry", "decode_bitmap_directory", "encode_bitmap_directory",
           "decode_bitmap_table", "bitmap_directory_size", "BME_FLAG_IN_USE", "BME_FLAG_AUTO",
           "BME_TABLE_ENTRY_OFFSET_MASK", "BME_TABLE_ENTRY_FLAG_ALL_ONES",
           "BME_TABLE_ENTRY_RESERVED_MASK", "BT_DIRTY_TRACKING_BITMAP"]

_DIR_ENTRY = struct.Struct(">QIIBBHI")
BITMAP_DIR_ENTRY_HEADER_SIZE = _DIR_ENTRY.size   # 24

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFF & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)
BT_DIRTY_TRACKING_BITMAP = 1
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
#: Bitmap table entry: bits 9-55 data cluster offset, bit 0 "all ones" when the offset
#: is 0 (else all zeros); bits 1-8 and 56-63 reserved.
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE


@dataclass(frozen=True)
class BitmapDirectoryEntry:
    """One bitmap directory entry."""

    bitmap_table_offset: int
    bitmap_table_size: int      # entries (u64) in the bitmap table
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BME_FLAG_AUTO)

    @property
    def granularity(self) -> int:
        """Bytes of guest data per bitmap bit."""
        return 1 << self.granularity_bits

    @property
    def encoded_size(self) -> int:
        size = BITMAP_DIR_ENTRY_HEADER_SIZE + len(self.extra) + len(_name_bytes(self.name))
        return (size + 7) & ~7

    def replace(self, **changes) -> "BitmapDirectoryEntry":
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        again = decode_bitmap_directory(encode_bitmap_directory([self]), 1)
        assert again == (self,), (again, self)


def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def bitmap_directory_size(entries: Iterable[BitmapDirectoryEntry]) -> int:
    """Bytes of the encoded directory."""
    return sum(e.encoded_size for e in entries)


def encode_bitmap_directory(entries: Iterable[BitmapDirectoryEntry]) -> bytes:
    """Serialise directory entries (each padded to 8). O(total size)."""
    out = bytearray()
    for e in entries:
        name = _name_bytes(e.name)
        try:
            out += _DIR_ENTRY.pack(e.bitmap_table_offset, e.bitmap_table_size, e.flags, e.type,
                                   e.granularity_bits, len(name), len(e.extra))
        except struct.error as exc:
            raise RequestError(f"Bitmap {e.name!r}: field out of range: {exc}") from None
        out += e.extra + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def _entry_problem(e: BitmapDirectoryEntry, cluster_size: int, image_size: int | None) -> bool:
    if (e.bitmap_table_size == 0 or e.bitmap_table_offset == 0
            or e.bitmap_table_offset % cluster_size
            or e.bitmap_table_size > BME_MAX_TABLE_SIZE
            or not BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= BME_MAX_GRANULARITY_BITS
            or e.flags & BME_RESERVED_FLAGS
            or len(_name_bytes(e.name)) > BME_MAX_NAME_SIZE
            or e.type != BT_DIRTY_TRACKING_BITMAP):
        return True
    phys_size = e.bitmap_table_size * cluster_size
    if phys_size > BME_MAX_PHYS_SIZE:
        return True
    if image_size is not None and not e.in_use and \
            image_size > (phys_size * 8) << e.granularity_bits:
        return True
    return False


def decode_bitmap_directory(buf: bytes, nb_bitmaps: int, *, cluster_size: int | None = None,
                            image_size: int | None = None) -> tuple[BitmapDirectoryEntry, ...]:
    """Parse the bitmap directory ``buf`` (exactly ``bitmap_directory_size`` bytes).

    The directory must hold exactly ``nb_bitmaps`` entries and end exactly at the end of
    ``buf``. With ``cluster_size`` (and ``image_size``, the virtual size) each entry is
    also checked against QEMU's constraints, as QEMU does when it loads bitmaps (which
    includes refusing extra data); without it, the codec is structural only and keeps
    extra data verbatim. Raises :class:`FormatError` with QEMU 7.2's
    message. O(size).
    """
    try:
        return _decode_dir(bytes(buf), nb_bitmaps, cluster_size, image_size)
    except Qcow2Error:
        raise
    except Exception as exc:  # defensive
        raise FormatError(f"Invalid bitmap directory: {type(exc).__name__}: {exc}") from exc


def _decode_dir(buf: bytes, nb_bitmaps: int, cluster_size: int | None,
                image_size: int | None) -> tuple[BitmapDirectoryEntry, ...]:
    if len(buf) == 0:
        if nb_bitmaps == 0:
            return ()
        raise FormatError("Requested bitmap directory size is zero")
    if len(buf) > C.QCOW_MAX_BITMAP_DIRECTORY_SIZE:
        raise FormatError("Requested bitmap directory size is too big")
    out = []
    offset = 0
    end = len(buf)
    while offset < end:
        if offset + BITMAP_DIR_ENTRY_HEADER_SIZE > end:
            raise FormatError("Broken bitmap directory")
        if len(out) + 1 > nb_bitmaps:
            raise FormatError("More bitmaps found than specified in header extension")
        (table_offset, table_size, flags, btype, gran_bits, name_len,
         extra_len) = _DIR_ENTRY.unpack_from(buf, offset)
        size = (BITMAP_DIR_ENTRY_HEADER_SIZE + extra_len + name_len + 7) & ~7
        if offset + size > end:
            raise FormatError("Broken bitmap directory")
        start = offset + BITMAP_DIR_ENTRY_HEADER_SIZE
        extra = buf[start:start + extra_len]
        raw_name = buf[start + extra_len:start + extra_len + name_len]
        name = raw_name.decode("utf-8", "surrogateescape")
        if cluster_size is not None and extra_len != 0:
            raise FormatError("Bitmap extra data is not supported")
        entry = BitmapDirectoryEntry(table_offset, table_size, flags, btype, gran_bits, name, extra)
        if cluster_size is not None and _entry_problem(entry, cluster_size, image_size):
            raise FormatError(f"Bitmap '{raw_name.decode('utf-8', 'replace')}' doesn't satisfy "
                              "the constraints")
        out.append(entry)
        offset += size
    if len(out) != nb_bitmaps:
        raise FormatError("Less bitmaps found than specified in header extension")
    return tuple(out)


def decode_bitmap_table(buf: bytes) -> array.array:
    """A bitmap table -> ``array('Q')``: bits 9-55 data cluster offset, bit 0 all ones."""
    return decode_u64_table(buf)
