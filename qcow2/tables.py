"""Codecs for qcow2 tables: L1/L2 tables, the refcount table, refcount blocks,
compressed cluster descriptors and extended L2 subcluster bitmaps.

Theory of operation
-------------------
Every table in a qcow2 file is an array of big-endian integers. Tables are converted
in bulk: ``array.array`` over the buffer, then one ``byteswap()`` on little-endian
hosts; no Python loop runs per entry. Refcount blocks of 1, 2 or 4 bits per entry are
packed least significant bits first; they are split with one ``bytes.translate`` per
position inside a byte and interleaved with extended-slice assignment (and joined back
with big-integer shifts, which never carry across bytes since each part is narrower
than the gap it is shifted into).

Reserved bits, per entry type (masks in :mod:`qcow2.constants`):

* L1 entry: bits 0-8 and 56-62 (``L1E_RESERVED_MASK``); bits 9-55 are the L2 table
  offset, bit 63 is ``QCOW_OFLAG_COPIED``.
* Standard L2 entry: bits 1-8 and 56-61 (``L2E_STD_RESERVED_MASK``); bit 0 is
  ``QCOW_OFLAG_ZERO`` (version 3; with extended L2 bit 0 is reserved too, the zero
  state lives in the bitmap), bit 62 ``QCOW_OFLAG_COMPRESSED``, bit 63 ``COPIED``.
* Compressed L2 entry: no reserved bits inside the descriptor (bits 0-61); bit 63
  (``COPIED``) must be clear. With extended L2 its bitmap word must be zero.
* Extended L2 bitmap word: none; bits 0-31 allocated, 32-63 reads-as-zero, but a
  subcluster with both bits set is a corruption, and so is an allocated subcluster in
  a cluster that has no host offset.
* Refcount table entry: bits 0-8 (``REFT_RESERVED_MASK``).
* Refcount block entries and bitmap-table entries: see their functions.
"""

from __future__ import annotations

import array
import enum
import sys
from typing import Iterable, Sequence

from . import constants as C
from .errors import FormatError, RequestError

__all__ = [
    "decode_u64_table", "encode_u64_table", "ClusterType", "SubclusterType", "l2_cluster_type",
    "l2_subcluster_type", "compressed_params", "decode_compressed", "encode_compressed",
    "decode_refblock", "encode_refblock", "refblock_entries", "subcluster_bitmap",
    "validate_subcluster_bitmap", "l1_reserved_bits", "l2_reserved_bits", "reftable_reserved_bits",
]

_LITTLE = sys.byteorder == "little"
_U64 = (1 << 64) - 1


def decode_u64_table(buf: bytes) -> array.array:
    """Big-endian u64 words -> ``array('Q')`` of native ints. O(n), bulk.

    Used for L1 tables, L2 tables (extended ones as flat word pairs), the refcount
    table and bitmap tables. ``len(buf)`` must be a multiple of 8.
    """
    if len(buf) % 8:
        raise FormatError(f"Table size {len(buf)} is not a multiple of 8 bytes")
    table = array.array("Q")
    table.frombytes(buf)
    if _LITTLE:
        table.byteswap()
    return table


def encode_u64_table(entries: Iterable[int]) -> bytes:
    """Native ints -> big-endian u64 words. O(n), bulk."""
    try:
        table = entries if isinstance(entries, array.array) and entries.typecode == "Q" \
            else array.array("Q", entries)
    except (OverflowError, TypeError) as exc:
        raise RequestError(f"Table entry does not fit in 64 bits: {exc}") from None
    if _LITTLE:
        table = array.array("Q", table)
        table.byteswap()
    return table.tobytes()


# -- L1 / L2 entries --------------------------------------------------------------------------

def l1_reserved_bits(entry: int) -> int:
    """Reserved bits set in an L1 entry (0 when valid)."""
    return entry & C.L1E_RESERVED_MASK


def l2_reserved_bits(entry: int, extended_l2: bool = False) -> int:
    """Reserved bits set in a (first word of an) L2 entry; 0 when valid.

    Compressed entries have none but ``COPIED``; with extended L2, bit 0 is reserved.
    """
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return entry & C.QCOW_OFLAG_COPIED
    mask = C.L2E_STD_RESERVED_MASK | (C.QCOW_OFLAG_ZERO if extended_l2 else 0)
    return entry & mask


def reftable_reserved_bits(entry: int) -> int:
    """Reserved bits set in a refcount table entry (0 when valid)."""
    return entry & C.REFT_RESERVED_MASK


class ClusterType(enum.IntEnum):
    """What a (standard) L2 entry says about its guest cluster."""

    UNALLOCATED = 0   # offset 0: read from the backing file, or zeros
    ZERO_PLAIN = 1    # zero flag, no host cluster
    ZERO_ALLOC = 2    # zero flag, host cluster kept allocated
    NORMAL = 3        # data at a host cluster
    COMPRESSED = 4    # compressed descriptor


def l2_cluster_type(entry: int, has_data_file: bool = False, *, extended_l2: bool = False) -> ClusterType:
    """Classify an L2 entry (its first word with extended L2). O(1).

    The zero flag (bit 0, version 3) is honoured only for standard L2 entries. With an
    external data file, offset 0 with ``COPIED`` set is a real cluster at host offset 0.
    """
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    offset = entry & C.L2E_OFFSET_MASK
    if entry & C.QCOW_OFLAG_ZERO and not extended_l2:
        return ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
    if not offset:
        if has_data_file and entry & C.QCOW_OFLAG_COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


class SubclusterType(enum.IntEnum):
    """What an extended L2 entry says about one subcluster."""

    NORMAL = 0
    COMPRESSED = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    UNALLOCATED_PLAIN = 4
    UNALLOCATED_ALLOC = 5
    INVALID = 6


def subcluster_bitmap(word: int) -> tuple[int, int]:
    """Split an extended L2 bitmap word into ``(alloc_mask, zero_mask)`` (32 bits each)."""
    return word & C.SUBCLUSTER_ALLOC_MASK, (word >> C.SUBCLUSTER_ZERO_SHIFT) & C.SUBCLUSTER_ALLOC_MASK


def _bitmap_problem(entry: int, bitmap: int, has_data_file: bool) -> str | None:
    alloc, zero = subcluster_bitmap(bitmap)
    if entry & C.QCOW_OFLAG_COMPRESSED:
        if bitmap:
            return f"compressed cluster with non-zero subcluster bitmap 0x{bitmap:016x}"
        return None
    if alloc & zero:
        return (f"subclusters allocated and reading as zero at once "
                f"(mask 0x{alloc & zero:08x}, bitmap 0x{bitmap:016x})")
    if alloc and l2_cluster_type(entry, has_data_file, extended_l2=True) == ClusterType.UNALLOCATED:
        return f"allocated subclusters (mask 0x{alloc:08x}) in a cluster with no host offset"
    return None


def validate_subcluster_bitmap(entry: int, bitmap: int, has_data_file: bool = False) -> None:
    """Raise :class:`FormatError` if an extended L2 entry (``entry``, ``bitmap``) is corrupt.

    Corrupt: a subcluster both allocated and zero; a compressed cluster with a non-zero
    bitmap; allocated subclusters in a cluster without a host offset.
    """
    problem = _bitmap_problem(entry, bitmap, has_data_file)
    if problem:
        raise FormatError(f"Invalid extended L2 entry 0x{entry:016x}: {problem}")


def l2_subcluster_type(entry: int, bitmap: int, index: int, has_data_file: bool = False) -> SubclusterType:
    """Type of subcluster ``index`` (0..31) of an extended L2 entry. O(1)."""
    if not 0 <= index < C.SUBCLUSTERS_PER_CLUSTER:
        raise RequestError(f"Subcluster index {index} out of range")
    if _bitmap_problem(entry, bitmap, has_data_file):
        return SubclusterType.INVALID
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return SubclusterType.COMPRESSED
    alloc, zero = subcluster_bitmap(bitmap)
    bit = 1 << index
    allocated = l2_cluster_type(entry, has_data_file, extended_l2=True) == ClusterType.NORMAL
    if alloc & bit:
        return SubclusterType.NORMAL
    if zero & bit:
        return SubclusterType.ZERO_ALLOC if allocated else SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_ALLOC if allocated else SubclusterType.UNALLOCATED_PLAIN


# -- compressed descriptors -------------------------------------------------------------------

def compressed_params(cluster_bits: int) -> tuple[int, int, int]:
    """``(offset_mask, csize_shift, csize_mask)`` of compressed descriptors for a cluster size.

    With ``x = 62 - (cluster_bits - 8)``: bits 0..x-1 hold the host byte offset, bits
    x..61 the number of additional 512-byte sectors.
    """
    if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        raise RequestError(f"cluster_bits {cluster_bits} out of range")
    csize_shift = 62 - (cluster_bits - 8)
    return (1 << csize_shift) - 1, csize_shift, (1 << (cluster_bits - 8)) - 1


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """``(host_offset, compressed_size)`` of a compressed L2 entry.

    ``compressed_size`` counts the bytes from ``host_offset`` to the end of the last
    sector the descriptor covers: ``(nb_sectors + 1) * 512 - (host_offset & 511)``.
    It is an upper bound on the compressed stream, which may be shorter.
    """
    offset_mask, csize_shift, csize_mask = compressed_params(cluster_bits)
    host_offset = entry & offset_mask
    nb_sectors = ((entry >> csize_shift) & csize_mask) + 1
    return host_offset, nb_sectors * C.SECTOR_SIZE - (host_offset & (C.SECTOR_SIZE - 1))


def encode_compressed(host_offset: int, compressed_size: int, cluster_bits: int) -> int:
    """A compressed L2 entry (``QCOW_OFLAG_COMPRESSED`` set, ``COPIED`` clear).

    The size is rounded up to the end of its last sector, so
    ``decode_compressed(encode_compressed(o, n, b), b) == (o, n)`` exactly when
    ``(o + n) % 512 == 0``. Raises :class:`RequestError` when the offset or the size do
    not fit in the descriptor.
    """
    offset_mask, csize_shift, csize_mask = compressed_params(cluster_bits)
    if host_offset < 0 or host_offset > offset_mask:
        raise RequestError(f"Compressed cluster host offset 0x{host_offset:x} does not fit "
                           f"in {csize_shift} bits")
    if compressed_size <= 0:
        raise RequestError(f"Compressed size {compressed_size} must be positive")
    end = (host_offset & (C.SECTOR_SIZE - 1)) + compressed_size
    nb_extra = (end + C.SECTOR_SIZE - 1) // C.SECTOR_SIZE - 1
    if nb_extra > csize_mask:
        raise RequestError(f"Compressed size {compressed_size} at 0x{host_offset:x} needs "
                           f"{nb_extra + 1} sectors, more than {csize_mask + 1}")
    return C.QCOW_OFLAG_COMPRESSED | (nb_extra << csize_shift) | host_offset


# -- refcount blocks --------------------------------------------------------------------------

def _typecode(itemsize: int) -> str:
    for code in "BHILQ":
        if array.array(code).itemsize == itemsize:
            return code
    raise AssertionError(f"no array typecode of {itemsize} bytes")  # pragma: no cover


_WIDE_CODES = {3: "B", 4: "H", 5: _typecode(4), 6: "Q"}

# _SPLIT[order][k]: translate table picking the k-th field (LSB first) of each byte.
_SPLIT = {
    order: [bytes(((b >> (k << order)) & ((1 << (1 << order)) - 1)) for b in range(256))
            for k in range(8 >> order)]
    for order in (0, 1, 2)
}


def refblock_entries(cluster_size: int, refcount_order: int) -> int:
    """Entries in one refcount block."""
    return (cluster_size * 8) >> refcount_order


def decode_refblock(buf: bytes, refcount_order: int) -> array.array:
    """Refcount block bytes -> array of refcounts (``len(buf) * 8 >> order`` entries).

    Orders 3..6 (8..64 bits): big-endian integers, one array + byteswap. Orders 0..2
    (1, 2, 4 bits): packed LSB first within each byte, split with ``bytes.translate``.
    O(n), no per-entry Python loop.
    """
    if not 0 <= refcount_order <= C.MAX_REFCOUNT_ORDER:
        raise FormatError(f"Invalid refcount_order {refcount_order}")
    buf = bytes(buf)
    if refcount_order >= 3:
        code = _WIDE_CODES[refcount_order]
        width = 1 << (refcount_order - 3)
        if len(buf) % width:
            raise FormatError(f"Refcount block size {len(buf)} is not a multiple of {width} bytes")
        out = array.array(code)
        out.frombytes(buf)
        if _LITTLE and width > 1:
            out.byteswap()
        return out
    per_byte = 8 >> refcount_order
    flat = bytearray(len(buf) * per_byte)
    for k, table in enumerate(_SPLIT[refcount_order]):
        flat[k::per_byte] = buf.translate(table)
    return array.array("B", flat)


def encode_refblock(values: Sequence[int], refcount_order: int) -> bytes:
    """Refcounts -> refcount block bytes (inverse of :func:`decode_refblock`).

    Sub-byte widths are padded with zero entries to a whole byte. Raises
    :class:`RequestError` for a value that does not fit in the entry width. O(n), bulk.
    """
    if not 0 <= refcount_order <= C.MAX_REFCOUNT_ORDER:
        raise RequestError(f"Invalid refcount_order {refcount_order}")
    bits = 1 << refcount_order
    if refcount_order >= 3:
        code = _WIDE_CODES[refcount_order]
        try:
            out = array.array(code, values)
        except (OverflowError, TypeError) as exc:
            raise RequestError(f"Refcount does not fit in {bits} bits: {exc}") from None
        if _LITTLE and bits > 8:
            out.byteswap()
        return out.tobytes()
    try:
        flat = bytes(values)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"Refcount does not fit in {bits} bits: {exc}") from None
    if flat and max(flat) >> bits:
        raise RequestError(f"Refcount {max(flat)} does not fit in {bits} bits")
    per_byte = 8 >> refcount_order
    flat += bytes(-len(flat) % per_byte)
    n = len(flat) // per_byte
    acc = 0
    for k in range(per_byte):
        acc |= int.from_bytes(flat[k::per_byte], "little") << (k * bits)
    return acc.to_bytes(n, "little")

