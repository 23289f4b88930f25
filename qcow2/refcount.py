"""Reference counts: reading them, and (for a writable image) allocating and freeing clusters.

Theory of operation
-------------------
The refcount table is read once (only the part inside the file: a damaged header may claim a table
past the end; entries there count as zero).  Refcount blocks are decoded in bulk
(:func:`qcow2.tables.decode_refblock`) into a :class:`~qcow2.cache.TableCache`.

:class:`Refcounts` adds the write side.  *Allocation* (:meth:`Refcounts.alloc`) is first fit from a
hint, over whole clusters; a cluster whose refcount block does not exist yet counts as free.  When
the run found touches ranges without a refcount block, the run is lengthened by one cluster per
missing block and the new blocks are placed at its end, so that every new block lies in free space
and is described by a block that exists or is being created in the same step (blocks may describe
themselves).  When a block's index lies past the end of the refcount table, the table *grows*: the
new table and the blocks describing it are placed in a fresh area past every cluster in use, the
blocks and the table are written, and only then does one header write switch to the new table; the
old table is freed afterwards.  This also works from a completely full table (QEMU iotest 044) and
never places a structure on another (iotest 121).

*Crash order* (DESIGN.md rule 5): increments are made in the cache and written before any table that
points to the new cluster (the image's L2 cache flushes this cache first).  Decrements are *queued*
(:meth:`Refcounts.decref`) and applied by :meth:`Refcounts.apply_decrefs` only after the tables that
dropped the reference were written, so a crash can leak a cluster but never free a referenced one.
A freed cluster cannot be reused before its decrement is applied, because until then its refcount
is not zero.
"""

from __future__ import annotations

import array
from typing import TYPE_CHECKING, Callable

from .units import c_hex
from . import constants as C
from .cache import TableCache
from .errors import Qcow2Error
from .header import Header
from .overlap_types import OL_REFCOUNT_BLOCK, OL_REFCOUNT_TABLE
from .storage import Storage
from .tables import decode_refblock, decode_u64_table, encode_refblock, encode_u64_table

if TYPE_CHECKING:  # pragma: no cover
    from .guard import OverlapGuard

_CACHED_BLOCKS = 64
_REFTABLE_ENTRY = 8


class RefcountReader:
    """Refcount of any host cluster of one image.  Thread-safe for readers."""

    def __init__(self, file: Storage, header: Header, cached_blocks: int = _CACHED_BLOCKS):
        self._file = file
        self._cluster_size = header.cluster_size
        self._cluster_bits = header.cluster_bits
        self._order = header.refcount_order
        self._entries = header.refcount_block_entries
        self._reftable_offset = header.refcount_table_offset
        self._reftable_size = header.refcount_table_clusters * header.cluster_size
        self._reftable: array.array | None = None
        self._blocks = TableCache(self._read_block, cached_blocks)

    def _read_block(self, host_offset: int):
        return decode_refblock(self._file.pread(self._cluster_size, host_offset), self._order)

    @property
    def reftable(self) -> array.array:
        """The refcount table as an ``array('Q')`` of raw entries (read on first use)."""
        if self._reftable is None:
            # an entry cut by the end of the file reads zero-padded, as QEMU reads it (found by
            # fuzzing: qemu-img saw a refcount block "outside image" in such an entry, we none)
            raw = self._file.pread_in_file(self._reftable_size, self._reftable_offset)
            self._reftable = decode_u64_table(raw + bytes(-len(raw) % 8))
        return self._reftable

    def _block_offset(self, reftable_index: int) -> int:
        """Host offset of the refcount block for ``reftable_index`` (0 when there is none)."""
        table = self.reftable
        if reftable_index >= len(table):
            return 0
        offset = table[reftable_index] & C.REFT_OFFSET_MASK
        if offset & (self._cluster_size - 1):
            return 0
        return offset

    def _block(self, reftable_index: int):
        """Decoded refcount block for one reftable entry, or None when unallocated."""
        offset = self._block_offset(reftable_index)
        return self._blocks.load(offset) if offset else None

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

    def last_used(self, nb_clusters: int) -> int:
        """The highest cluster index below ``nb_clusters`` with a non-zero refcount (-1: none).
        Reads the refcount blocks backwards, one C-level strip each: O(trailing free clusters /
        entries per block) block reads."""
        k = nb_clusters - 1
        while k >= 0:
            index, i = divmod(k, self._entries)
            block = self._block(index)
            if block is not None:
                used = block[:i + 1].tobytes().rstrip(b"\0")
                if used:
                    return index * self._entries + (len(used) - 1) // block.itemsize
            k = index * self._entries - 1
        return -1


class Refcounts(RefcountReader):
    """Refcounts of a writable image: allocation, increments, queued decrements, table growth.

    Not thread-safe by itself: the image calls it under its lock.  ``write_header(**fields)``
    rewrites header fields in place; ``signal_corruption(msg)`` is the image's corruption handler
    (it marks the image corrupt and raises).
    """

    def __init__(self, file: Storage, header: Header, *, guard: "OverlapGuard | None",
                 write_header: Callable[..., None], signal_corruption: Callable[[str], None],
                 cached_blocks: int = _CACHED_BLOCKS):
        super().__init__(file, header, cached_blocks)
        self._guard = guard
        self._write_header = write_header
        self._signal_corruption = signal_corruption
        self._blocks = TableCache(self._read_block, cached_blocks, write=self._write_block)
        self._max_refcount = (1 << (1 << self._order)) - 1
        self.free_hint = 0                               # no free cluster below this index
        self._pending: list[tuple[int, int]] = []        # queued decrements (cluster_index, count)
        self._queued: dict[int, int] = {}                # cluster_index -> sum of its pending counts
        table = self.reftable
        missing = self._reftable_size // 8 - len(table)  # cut by the end of the file: zeros
        if missing > 0:
            table.extend(array.array("Q", bytes(8 * missing)))

    @property
    def cache(self) -> TableCache:
        """The refcount-block cache (the image makes its L2 cache depend on it)."""
        return self._blocks

    def flush(self) -> None:
        """Write every dirty refcount block (no fsync)."""
        self._blocks.flush()

    # -- block access ------------------------------------------------------------------------------
    def _write_block(self, host_offset: int, block) -> None:
        self._file.pwrite(encode_refblock(block, self._order), host_offset, ign=OL_REFCOUNT_BLOCK)

    def _block_offset(self, reftable_index: int) -> int:
        table = self.reftable
        if reftable_index >= len(table):
            return 0
        offset = table[reftable_index] & C.REFT_OFFSET_MASK
        if offset & (self._cluster_size - 1):
            self._signal_corruption(f"Refblock offset {c_hex(offset)} unaligned "
                                    f"(reftable index: {c_hex(reftable_index)})")
        return offset

    def _write_reftable_entry(self, reftable_index: int) -> None:
        entry = encode_u64_table(self.reftable[reftable_index:reftable_index + 1])
        self._file.pwrite(entry, self._reftable_offset + 8 * reftable_index, ign=OL_REFCOUNT_TABLE)

    # -- counting ------------------------------------------------------------------------------------
    def add(self, cluster_index: int, delta: int) -> int:
        """Add ``delta`` to a cluster's refcount now (its block must exist); returns the new value.

        A result outside the entry's range means the refcounts are wrong: corruption."""
        r, i = divmod(cluster_index, self._entries)
        offset = self._block_offset(r)
        if not offset:
            self._signal_corruption(f"No refcount block covers cluster {c_hex(cluster_index)} "
                                    f"(reftable index {c_hex(r)})")
        block = self._blocks.load(offset)
        value = block[i] + delta
        if value < 0 or value > self._max_refcount:
            self._signal_corruption(f"Refcount of cluster {c_hex(cluster_index)} would become "
                                    f"{value} (refcount_bits {1 << self._order})")
        block[i] = value
        self._blocks.mark_dirty(offset, block)
        if value == 0 and cluster_index < self.free_hint:
            self.free_hint = cluster_index
        return value

    def can_add(self, cluster_index: int) -> bool:
        """Whether one more reference fits in the cluster's refcount entry."""
        return self.refcount(cluster_index) < self._max_refcount

    def decref(self, cluster_index: int, count: int = 1) -> None:
        """Queue a decrement, applied by :meth:`apply_decrefs` once the reference is gone on disk.

        A decrement the cluster's refcount cannot take (with those already queued) is dropped:
        the refcounts are wrong (a damaged image); QEMU refuses such a free ("qcow2_free_clusters
        failed: Invalid argument") and goes on, leaking.  Queued, it would drop the refcount of
        whatever reuses the cluster meanwhile (found by fuzzing: an L1 table pointer aimed past
        the end of the file, whose clusters had no refcount, was moved by a resize; the cluster
        was handed out for data, then "freed" while mapped)."""
        queued = self._queued.get(cluster_index, 0)
        if self.refcount(cluster_index) < queued + count:
            return
        self._queued[cluster_index] = queued + count
        self._pending.append((cluster_index, count))

    def decref_range(self, host_offset: int, length: int) -> None:
        """Queue one decrement for every cluster the byte range touches."""
        first = host_offset >> self._cluster_bits
        last = (host_offset + length - 1) >> self._cluster_bits
        for index in range(first, last + 1):
            self.decref(index)

    @property
    def nb_pending(self) -> int:
        """Number of queued decrements."""
        return len(self._pending)

    def apply_decrefs(self) -> None:
        """Apply the queued decrements (the caller has written the tables that dropped them)."""
        pending, self._pending = self._pending, []
        self._queued.clear()
        for index, count in pending:
            self.add(index, -count)

    def unlink_idle_blocks(self, barrier: Callable[[], None]) -> None:
        """Unlink every refcount block that counts nothing but, maybe, itself (QEMU does so after
        a shrink, so that the file's tail can go): the reftable entries are zeroed on disk and
        made durable by ``barrier()`` before anything else changes, then the blocks are
        forgotten; a block that counted itself leaves its cluster covered by no block (free); one
        stored elsewhere gets its refcount decrement queued (applied with the next write-back, a
        crash before it only leaks).  The caller has flushed the caches.  O(refcount blocks)
        block reads."""
        entries, bits, cs = self._entries, self._cluster_bits, self._cluster_size
        unlinked = []
        for r, entry in enumerate(self.reftable):
            offset = entry & C.REFT_OFFSET_MASK
            if not offset or offset & (cs - 1):
                continue
            k = offset >> bits
            block = self._blocks.load(offset)
            own = block[k % entries] if k // entries == r else 0
            if own in (0, 1) and block.count(0) == entries - own:
                self.reftable[r] = 0
                self._write_reftable_entry(r)
                unlinked.append((offset, own))
        if not unlinked:
            return
        barrier()
        for offset, own in unlinked:
            self._blocks.forget(offset)
            if self._guard is not None:
                self._guard.leave(offset, cs, OL_REFCOUNT_BLOCK)
            if own:
                self.free_hint = min(self.free_hint, offset >> bits)
            else:
                self.decref(offset >> bits)

    # -- allocation ----------------------------------------------------------------------------------
    def _is_free(self, cluster_index: int) -> bool:
        block = self._block(cluster_index // self._entries)
        return block is None or block[cluster_index % self._entries] == 0

    def _find_free(self, nb_clusters: int) -> int:
        """First index of ``nb_clusters`` consecutive free clusters at or after the hint.
        A cluster without a refcount block is free.  Blocks are scanned with C-level slice
        operations: O(blocks touched) Python steps."""
        entries = self._entries
        start = self.free_hint
        while True:
            block = self._block(start // entries)
            if block is not None:
                try:
                    start += block.index(0, start % entries) - start % entries
                except ValueError:                       # the block is full: next one
                    start += entries - start % entries
                    continue
            run = self._free_run(start, nb_clusters)
            if run == nb_clusters:
                return start
            start += run + 1

    def _free_run(self, start: int, limit: int) -> int:
        """Number of consecutive free clusters from ``start`` (at most ``limit``)."""
        entries = self._entries
        run = 0
        while run < limit:
            index = start + run
            block = self._block(index // entries)
            i = index % entries
            n = min(limit - run, entries - i)
            if block is not None:
                part = block[i:i + n]
                if part.count(0) != n:
                    return run + next(k for k, v in enumerate(part) if v)
            run += n
        return run

    def _count_new(self, first: int, stop: int) -> None:
        """Give the free clusters ``[first, stop)`` refcount 1, a block slice at a time."""
        entries = self._entries
        pos = first
        while pos < stop:
            r, i = divmod(pos, entries)
            n = min(stop - pos, entries - i)
            offset = self._block_offset(r)
            block = self._blocks.load(offset)
            if block[i:i + n].count(0) != n:
                self._signal_corruption(f"Allocated cluster {c_hex(pos)}.. already has a refcount")
            block[i:i + n] = array.array(block.typecode, (1,)) * n
            self._blocks.mark_dirty(offset, block)
            pos += n

    def _missing_blocks(self, start: int, stop: int) -> list[int]:
        """Reftable indexes covering clusters ``[start, stop)`` that have no refcount block."""
        e = self._entries
        return [r for r in range(start // e, (stop - 1) // e + 1) if not self._block_offset(r)]

    def alloc(self, nb_clusters: int, what: str = "data cluster") -> int:
        """Allocate ``nb_clusters`` contiguous clusters with refcount 1; returns the host offset.

        The refcounts are set in the cache (written before any table pointing to the clusters).
        New refcount blocks, and a larger refcount table, are made as needed.  Amortised
        O(nb_clusters) plus the scan from the hint."""
        extra = 0
        while True:
            start = self._find_free(nb_clusters + extra)
            missing = self._missing_blocks(start, start + nb_clusters + extra)
            if len(missing) <= extra:
                break
            extra = len(missing)
        if start == 0 and what in ("L2 table", "compressed cluster"):
            # cluster 0 is the header: the refcount structures are broken (QEMU checks this for
            # these two; anything else placed there is refused by the overlap guard)
            self._signal_corruption(f"Preventing invalid allocation of {what} at offset 0")
        stop = start + nb_clusters + len(missing)
        if stop << self._cluster_bits > C.MAX_HOST_OFFSET:
            raise Qcow2Error(f"Cannot allocate {what}: host offset {c_hex(stop << self._cluster_bits)}"
                             " is past the 2^56 limit")
        first_block = start + nb_clusters
        blocks = {r: (first_block + i) << self._cluster_bits for i, r in enumerate(missing)}
        self._install(blocks, start, stop)
        self.free_hint = max(self.free_hint, stop)
        return start << self._cluster_bits

    def _new_blocks(self, blocks: dict[int, int]) -> None:
        """Create empty refcount blocks in the cache (dirty) and protect them."""
        cs = self._cluster_size
        for offset in blocks.values():
            if self._guard is not None:     # never onto other metadata
                self._guard.check_write(offset, cs, OL_REFCOUNT_BLOCK)
                self._guard.enter(offset, cs, OL_REFCOUNT_BLOCK)
            self._blocks.put(offset, decode_refblock(bytes(cs), self._order))

    def _install(self, blocks: dict[int, int], first: int, stop: int) -> None:
        """Create ``blocks`` (reftable index -> host offset), count clusters ``[first, stop)``, and
        link the blocks into the table only once they are on disk."""
        self._new_blocks(blocks)
        if blocks and max(blocks) >= len(self.reftable):
            self._grow_table(max(blocks) + 1, blocks, first, stop)
            return
        for r, offset in blocks.items():
            self.reftable[r] = offset
        self._count_new(first, stop)
        if blocks:
            self._blocks.flush()      # the blocks (and what describes them) before the links
            for level in self._link_levels(blocks):
                self._file.flush()    # fsync: the OS may reorder writes between two fsyncs
                for r in level:
                    self._write_reftable_entry(r)

    def _link_levels(self, blocks: dict[int, int]) -> list[list[int]]:
        """The new blocks' reftable indexes in the order their links may reach the disk.

        A new block may lie in the range of another new block (both made by one allocation):
        linked first, it would be a referenced cluster whose refcount is in no linked block, and
        a crash between the two links would leave a corruption (found by the crash-cut tests).
        So a block comes after the block holding its refcount: level 0 holds blocks counted by
        themselves or by an existing block, level n those counted by a block of level n-1."""
        bits, e = self._cluster_bits, self._entries
        depth: dict[int, int] = {}
        for r in sorted(blocks):
            chain = []
            x = r
            while x in blocks and x not in depth and x not in chain:
                chain.append(x)
                x = (blocks[x] >> bits) // e          # the block counting block x
            d = depth[x] + 1 if x in depth else 0     # else: existing block, or x counts itself
            for y in reversed(chain):
                depth[y] = d
                d += 1
        levels: list[list[int]] = [[] for _ in range(max(depth.values()) + 1)]
        for r in sorted(depth):
            levels[depth[r]].append(r)
        return levels

    def _grow_table(self, min_entries: int, blocks: dict[int, int], first: int, stop: int) -> None:
        """Move the refcount table to a larger one in a fresh area past every cluster in use.

        The area holds the new table followed by the blocks that describe the area itself.  Order:
        blocks, table, (fsync), one header write switching to the table; then the old table is
        queued for freeing.  The sizes are found by a fixed-point iteration (a few rounds)."""
        cs, bits, e = self._cluster_size, self._cluster_bits, self._entries
        old_entries = len(self.reftable)
        file_clusters = -(-self._file.size // cs)
        area = max(stop, file_clusters, old_entries * e)
        nb_table = nb_area_blocks = 0
        while True:
            end = area + nb_table + nb_area_blocks
            want = max(min_entries, (end - 1) // e + 1 if end > area else 0,
                       old_entries + old_entries // 2)
            table_clusters = -(-want * 8 // cs)
            new_end = area + table_clusters + nb_area_blocks
            area_ranges = [r for r in range(area // e, (new_end - 1) // e + 1) if r not in blocks]
            if table_clusters == nb_table and len(area_ranges) == nb_area_blocks:
                break
            nb_table, nb_area_blocks = table_clusters, len(area_ranges)
        table_offset = area << bits
        area_blocks = {r: (area + nb_table + i) << bits for i, r in enumerate(area_ranges)}
        self._new_blocks(area_blocks)
        new_table = array.array("Q", self.reftable)
        new_table.extend(array.array("Q", bytes(nb_table * cs - 8 * len(new_table))))
        for r, offset in {**blocks, **area_blocks}.items():
            new_table[r] = offset
        old_offset, old_size = self._reftable_offset, self._reftable_size
        self._reftable = new_table
        self._count_new(first, stop)
        self._count_new(area, area + nb_table + nb_area_blocks)
        self._blocks.flush()
        if self._guard is not None:
            self._guard.enter(table_offset, nb_table * cs, OL_REFCOUNT_TABLE)
        self._file.pwrite(encode_u64_table(new_table), table_offset, ign=OL_REFCOUNT_TABLE)
        self._file.flush()
        self._write_header(refcount_table_offset=table_offset, refcount_table_clusters=nb_table)
        self._reftable_offset, self._reftable_size = table_offset, nb_table * cs
        if self._guard is not None and old_size:
            self._guard.leave(old_offset, old_size, OL_REFCOUNT_TABLE)
        if old_size and old_offset:
            self.decref_range(old_offset, old_size)

    def _check(self) -> None:
        """Invariants: the table has whole clusters of entries; the cache is consistent."""
        assert len(self.reftable) * 8 == self._reftable_size, (len(self.reftable),
                                                               self._reftable_size)
        self._blocks._check()
