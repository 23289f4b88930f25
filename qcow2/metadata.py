"""Where an image's metadata lives.

:func:`iter_metadata` lists every metadata structure of an open image as ``(host_offset, length,
type)`` triples, ``type`` being one of the overlap map's type bits.  The overlap guard enters them
into its range map at open (and on ``rebuild``); the checker uses the same list.  Only the types asked
for are read: the active L1 table is already in memory, the refcount table and the bitmap directory
are read once each, and snapshot L1 tables are read (once each) only when inactive L2 tables are
wanted.  Offsets at or beyond 2^56 (impossible in a valid image) are not listed: nothing can be
written there.  Contiguous structures of one type are coalesced into one triple.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from . import constants as C
from .overlap_types import (OL_ACTIVE_L1, OL_ACTIVE_L2, OL_BITMAP_DIRECTORY, OL_BITMAP_TABLE,
                            OL_FDE_HEADER, OL_INACTIVE_L1, OL_INACTIVE_L2, OL_MAIN_HEADER,
                            OL_REFCOUNT_BLOCK, OL_REFCOUNT_TABLE, OL_SNAPSHOT_TABLE)
from .snapshot import snapshot_table_size
from .tables import decode_u64_table

if TYPE_CHECKING:  # pragma: no cover
    from .image import Image

Triple = tuple[int, int, int]


def _tables(offsets: Iterable[int], mask: int, size: int, type_bit: int) -> Iterator[Triple]:
    """One triple per non-zero table pointer (masked), adjacent ascending ones coalesced."""
    start = end = -1
    for entry in offsets:
        offset = entry & mask
        if not offset or offset >= C.MAX_HOST_OFFSET:
            continue
        if offset == end:
            end += size
            continue
        if end > start >= 0:
            yield (start, end - start, type_bit)
        start, end = offset, offset + size
    if end > start >= 0:
        yield (start, end - start, type_bit)


def _region(offset: int, length: int, type_bit: int) -> Iterator[Triple]:
    if length > 0 and 0 <= offset < C.MAX_HOST_OFFSET:
        yield (offset, min(length, C.MAX_HOST_OFFSET - offset), type_bit)


def iter_metadata(image: "Image", types: int) -> Iterator[Triple]:
    """Yield ``(host_offset, length, type)`` for each metadata structure whose type is in ``types``.

    Cost: O(L1 entries + refcount table entries + snapshots) plus, for inactive L2 tables, one read
    of each snapshot's L1 table.
    """
    h = image.header
    cs = h.cluster_size
    read = image._file.pread
    if types & OL_MAIN_HEADER:
        yield (0, cs, OL_MAIN_HEADER)
    if types & OL_ACTIVE_L1:
        yield from _region(h.l1_table_offset, h.l1_size * 8, OL_ACTIVE_L1)
    if types & OL_ACTIVE_L2:
        yield from _tables(image.l1_table, C.L1E_OFFSET_MASK, cs, OL_ACTIVE_L2)
    if types & OL_REFCOUNT_TABLE:
        yield from _region(h.refcount_table_offset, h.refcount_table_clusters * cs,
                           OL_REFCOUNT_TABLE)
    if types & OL_REFCOUNT_BLOCK and h.refcount_table_clusters:
        reftable = decode_u64_table(read(h.refcount_table_clusters * cs, h.refcount_table_offset))
        yield from _tables(reftable, C.REFT_OFFSET_MASK, cs, OL_REFCOUNT_BLOCK)
    if types & OL_SNAPSHOT_TABLE and image.snapshots:
        size = getattr(image, "snapshots_size", None)   # as read (QEMU's count), else as encoded
        yield from _region(h.snapshots_offset,
                           size if size is not None else snapshot_table_size(image.snapshots),
                           OL_SNAPSHOT_TABLE)
    for snap in image.snapshots:
        if types & OL_INACTIVE_L1:
            yield from _region(snap.l1_table_offset, snap.l1_size * 8, OL_INACTIVE_L1)
        if types & OL_INACTIVE_L2 and snap.l1_size:
            # only the entries inside the file: a hostile l1_size must not size the read
            l1 = decode_u64_table(image._file.pread_in_file(
                min(snap.l1_size, C.QCOW_MAX_L1_SIZE // 8) * 8, snap.l1_table_offset, 8))
            yield from _tables(l1, C.L1E_OFFSET_MASK, cs, OL_INACTIVE_L2)
    bitmaps = h.bitmaps
    if types & (OL_BITMAP_DIRECTORY | OL_BITMAP_TABLE) and bitmaps is not None \
            and bitmaps.nb_bitmaps:
        size = min(bitmaps.bitmap_directory_size, C.QCOW_MAX_BITMAP_DIRECTORY_SIZE)
        if types & OL_BITMAP_DIRECTORY:
            yield from _region(bitmaps.bitmap_directory_offset, size, OL_BITMAP_DIRECTORY)
        if types & OL_BITMAP_TABLE:
            for entry in image.bitmap_directory():
                yield from _region(entry.bitmap_table_offset, entry.bitmap_table_size * 8,
                                   OL_BITMAP_TABLE)
    crypto = h.crypto_header
    if types & OL_FDE_HEADER and crypto is not None:
        yield from _region(crypto.offset, crypto.length, OL_FDE_HEADER)
