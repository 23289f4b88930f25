"""Reading reference counts (the write side joins with the writer).

The refcount table is read once, at first use, and only the part of it inside the file (a damaged
header may claim a table past the end; entries there count as zero).  Refcount blocks are decoded in
bulk (:func:`qcow2.tables.decode_refblock`) and kept in a small LRU cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from . import constants as C
from .header import Header
from .storage import Storage
from .tables import decode_refblock, decode_u64_table, refblock_entries

_CACHED_BLOCKS = 64


class RefcountReader:
    """Refcount of any host cluster of one image.  Thread-safe."""

    def __init__(self, file: Storage, header: Header):
        self._file = file
        self._cluster_size = header.cluster_size
        self._order = header.refcount_order
        self._entries = refblock_entries(header.cluster_size, header.refcount_order)
        self._reftable_offset = header.refcount_table_offset
        self._reftable_size = header.refcount_table_clusters * header.cluster_size
        self._reftable = None
        self._blocks: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def reftable(self):
        """The refcount table as an ``array('Q')`` of raw entries (read on first use)."""
        if self._reftable is None:
            self._reftable = decode_u64_table(
                self._file.pread_in_file(self._reftable_size, self._reftable_offset, 8))
        return self._reftable

    def _block(self, reftable_index: int):
        """Decoded refcount block for one reftable entry, or None when unallocated."""
        table = self.reftable
        if reftable_index >= len(table):
            return None
        offset = table[reftable_index] & C.REFT_OFFSET_MASK
        if not offset or offset & (self._cluster_size - 1):
            return None
        with self._lock:
            block = self._blocks.get(offset)
            if block is not None:
                self._blocks.move_to_end(offset)
                return block
        block = decode_refblock(self._file.pread(self._cluster_size, offset), self._order)
        with self._lock:
            self._blocks[offset] = block
            if len(self._blocks) > _CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        return block

    def refcount(self, cluster_index: int) -> int:
        """Refcount of host cluster ``cluster_index`` (0 where no refcount block covers it)."""
        block = self._block(cluster_index // self._entries)
        return 0 if block is None else block[cluster_index % self._entries]

    def count_referenced(self, nb_clusters: int, limit: int) -> int:
        """Number of clusters in ``[0, nb_clusters)`` with a non-zero refcount, counted a block at
        a time and stopping once ``limit`` is reached.  O(clusters counted / entries per block)
        block reads."""
        count = 0
        for index in range(-(-nb_clusters // self._entries)):
            if count >= limit:
                break
            block = self._block(index)
            if block is None:
                continue
            n = min(self._entries, nb_clusters - index * self._entries)
            part = block[:n]
            count += n - part.count(0)
        return count
