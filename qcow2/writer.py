"""The write path: allocation, copy-on-write, zeroing, discard, compressed clusters, resize.

Theory of operation
-------------------
A :class:`Writer` belongs to an :class:`~qcow2.image.Image` opened ``"r+"`` and is always called
under the image's lock.  It changes three kinds of state: guest data (written to the host at once),
L2 entries (changed in the L2 cache, written back later) and refcounts (changed in the refcount
cache, written back before any L2 table; decrements queued until after the L2 and L1 tables).
The L1 table is kept in memory; changed entries are written after the L2 tables.  So the on-disk
order of a flush is: refcount blocks (increments) -> L2 tables -> L1 entries -> refcount blocks
(decrements).  Data always reaches the disk before the L2 entry that maps it, because data is written
during the request and L2 tables only at a flush.  Each step is separated from the next by an fsync
(:meth:`Writer._barrier`), since between two fsyncs the OS and the disk may reorder writes.  A crash
(or power loss) can leak clusters, never corrupt.

Writing a cluster in place needs an L2 entry with ``QCOW_OFLAG_COPIED`` (refcount exactly one).
Anything else (unallocated, zero, compressed, shared with a snapshot) gets a new cluster: the parts
of it the request does not cover are filled from the cluster's current guest content (backing file,
zeros, the old cluster) - copy-on-write - and the old cluster's reference is released.  With
extended L2 entries only the subclusters a request touches are allocated, and copy-on-write fills
only the partly written ones at the edges.  A shared L2 table (an L1 entry without COPIED) is
copied before its first change.

Copy-on-write that would write zeros into clusters past the end of the host file is skipped: they
read as zeros already.  Every host write goes through :class:`~qcow2.storage.Storage` and so through
the overlap guard.
"""

from __future__ import annotations

import array
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .units import c_hex
from . import constants as C
from .compress import compress_cluster
from .errors import RequestError, UnsupportedError
from .overlap_types import OL_ACTIVE_L1, OL_ACTIVE_L2
from .refcount import Refcounts
from .tables import decode_compressed, decode_u64_table, encode_compressed, encode_u64_table

if TYPE_CHECKING:  # pragma: no cover
    from .image import Image

_COPIED = C.QCOW_OFLAG_COPIED
_COMPRESSED = C.QCOW_OFLAG_COMPRESSED
_ZERO = C.QCOW_OFLAG_ZERO
_MASK = C.L2E_OFFSET_MASK
_ALL_SUBCLUSTERS = 0xFFFFFFFF
_MAX_PENDING_DECREFS = 4096
_ZERO_CHUNK = bytes(1 << 20)


def _is_zero(buf) -> bool:
    """Every byte of ``buf`` is zero (a memcmp per MiB: ``bytes.startswith`` takes any buffer,
    where comparing memoryviews goes byte by byte)."""
    view = memoryview(buf).cast("B")
    return all(_ZERO_CHUNK.startswith(view[pos:pos + len(_ZERO_CHUNK)])
               for pos in range(0, len(view), len(_ZERO_CHUNK)))


def _mask(first: int, last: int) -> int:
    """Bits ``first..last`` (inclusive) set."""
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


class Writer:
    """Write operations of one writable image (see the module docstring)."""

    def __init__(self, image: "Image"):
        self.img = image
        h = image.header
        self.file = image._file
        self.data = image._data
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.extended = h.extended_l2
        self.l2_entries = h.l2_entries
        self.subcluster_bits = h.cluster_bits - 5 if self.extended else h.cluster_bits
        self.has_data_file = h.has_data_file
        missing = min(h.l1_size, h.nb_l1_entries_needed) - len(image.l1_table)
        if missing > 0:
            # The read path holds only the L1 entries inside the file; a writer indexes every
            # entry the virtual size needs, and QEMU reads the entries past the end of the file
            # as zeros (found by fuzzing: a file cut inside its L1 table made writes fail with
            # IndexError).  Not up to a hostile l1_size (4M entries of zeros walked in Python by
            # the guard, also found by fuzzing).  Extended in place: the mapping shares it.
            image.l1_table.extend(array.array("Q", bytes(8 * missing)))
        self.refcounts = Refcounts(image._file, h, guard=image._guard,
                                   write_header=image._update_header,
                                   signal_corruption=image._fail_corrupt)
        self.l2_cache = image._l2_cache
        self.l2_cache.set_writeback(self.write_l2, self._before_l2_writeback)
        self.l1_dirty: set[int] = set()
        self._l2_checked: set[int] = set()   # L2 tables known not to lie on other metadata
        self._compressed_next = 0   # where the next compressed cluster may go (0: a new cluster)

    # -- flushing -------------------------------------------------------------------------------
    def write_l2(self, host_offset: int, table) -> None:
        """Write one L2 table back (the L2 cache's writer)."""
        self.file.pwrite(encode_u64_table(table), host_offset, ign=OL_ACTIVE_L2)

    def _barrier(self) -> None:
        """fsync: everything written so far reaches the disk before anything written later.

        Between two fsyncs the OS and the disk may reorder writes (a power loss keeps any subset
        of them), so program order alone does not give the crash order of DESIGN.md rule 5: each
        of its steps is separated from the next by a barrier, as QEMU separates its caches with
        flushes.  (Found by the power-loss cuts of tests/test_crash_safety.py.)"""
        if self.data is not self.file:
            self.data.flush()
        self.file.flush()

    def _before_l2_writeback(self) -> None:
        """The L2 cache's dependency: the refcount increments of the clusters an L2 table may now
        point to, and the guest data it maps (copy-on-write included), are durable first."""
        self.refcounts.flush()
        self._barrier()

    def flush_metadata(self) -> None:
        """Refcount increments and data, L2 tables, L1 entries, then queued decrements: the crash
        order, each step made durable before the next is written."""
        self.refcounts.flush()
        self.l2_cache.flush()            # after its dependency, _before_l2_writeback
        if self.l1_dirty:
            self._barrier()              # the L2 tables before the L1 entries pointing to them
            self._write_l1_entries()
        if self.refcounts.nb_pending:
            self._barrier()              # the references dropped on disk before refcounts drop
            self.refcounts.apply_decrefs()
            self._compressed_next = 0    # its cluster may have been freed
            self.refcounts.flush()

    def _write_l1_entries(self) -> None:
        if not self.l1_dirty:
            return
        l1 = self.img.l1_table
        offset = self.img.header.l1_table_offset
        indexes = sorted(self.l1_dirty)
        start = prev = indexes[0]
        for index in indexes[1:] + [None]:
            if index is not None and index == prev + 1:
                prev = index
                continue
            self.file.pwrite(encode_u64_table(l1[start:prev + 1]), offset + 8 * start,
                             ign=OL_ACTIVE_L1)
            if index is not None:
                start = prev = index
        self.l1_dirty.clear()

    def _maybe_flush(self) -> None:
        if self.refcounts.nb_pending > _MAX_PENDING_DECREFS:
            self.flush_metadata()

    # -- tables --------------------------------------------------------------------------------------
    def _l2_for_write(self, l1_index: int) -> tuple[int, array.array]:
        """The L2 table for ``l1_index``, made writable: allocated when missing, copied when
        shared (no COPIED flag in the L1 entry)."""
        img = self.img
        entry = img.l1_table[l1_index]
        l2_offset = entry & C.L1E_OFFSET_MASK
        cs = self.cluster_size
        if l2_offset & (cs - 1):
            self.img._fail_corrupt(f"L2 table offset {c_hex(l2_offset)} unaligned "
                                   f"(L1 index: {c_hex(l1_index)})")
        if l2_offset and entry & _COPIED:
            if l2_offset not in self._l2_checked:    # an L2 table lying on other metadata
                guard = img._guard
                if guard is not None:
                    guard.check_write(l2_offset, cs, OL_ACTIVE_L2)   # signals and raises
                self._l2_checked.add(l2_offset)
            return l2_offset, self.l2_cache.load(l2_offset)
        new_offset = self.refcounts.alloc(1, "L2 table")
        if l2_offset:
            table = array.array("Q", self.l2_cache.load(l2_offset))
            self.refcounts.decref(l2_offset >> self.cluster_bits)
            if img._guard is not None:
                img._guard.leave(l2_offset, cs, OL_ACTIVE_L2)
        else:
            table = decode_u64_table(bytes(cs))
        if img._guard is not None:      # the new table must not land on other metadata
            img._guard.check_write(new_offset, cs, OL_ACTIVE_L2)
            img._guard.enter(new_offset, cs, OL_ACTIVE_L2)
        self.l2_cache.put(new_offset, table)
        img.l1_table[l1_index] = new_offset | _COPIED
        self.l1_dirty.add(l1_index)
        return new_offset, table

    def _release(self, entry: int) -> None:
        """Queue the release of the host cluster(s) an old L2 entry referenced."""
        if entry & _COMPRESSED:
            host, size = decode_compressed(entry, self.cluster_bits)
            self.refcounts.decref_range(host, size)
        elif not self.has_data_file:
            host = entry & _MASK
            if host:
                self.refcounts.decref(host >> self.cluster_bits)

    def _in_place(self, entry: int, cluster_index: int) -> bool:
        """A standard entry whose cluster can be overwritten where it is."""
        if entry & (_COMPRESSED | _ZERO) or not entry & _COPIED:
            return False
        host = entry & _MASK
        if host & (self.cluster_size - 1):
            self.img._fail_corrupt(f"Data cluster offset {c_hex(host)} unaligned (guest offset: "
                                   f"{c_hex(cluster_index << self.cluster_bits)})")
        return bool(host) or self.has_data_file

    def _new_host(self, cluster_index: int, nb_clusters: int) -> int:
        """Host offset for ``nb_clusters`` new data clusters from guest cluster
        ``cluster_index`` (identity in an external data file)."""
        if self.has_data_file:
            return cluster_index << self.cluster_bits
        return self.refcounts.alloc(nb_clusters, "data cluster")

    # -- guest content for copy-on-write ------------------------------------------------------
    def _current(self, guest_offset: int, length: int) -> bytearray:
        """The guest bytes now at ``[guest_offset, +length)``; zeros past the virtual size."""
        buf = bytearray(length)
        n = max(0, min(length, self.img.size - guest_offset))
        if n:
            self.img.readinto(memoryview(buf)[:n], guest_offset)
        return buf

    def _backing_covers(self, guest_offset: int) -> bool:
        below = self.img.backing
        return below is not None and guest_offset < below.size

    # -- pwrite ------------------------------------------------------------------------------------
    def pwrite(self, view: memoryview, guest_offset: int) -> None:
        """Write ``view`` at ``guest_offset`` (the caller checked the range)."""
        end = guest_offset + len(view)
        pos = guest_offset
        span = self.l2_entries << self.cluster_bits
        while pos < end:
            l1_index = pos // span
            chunk_end = min(end, (l1_index + 1) * span)
            l2_offset, table = self._l2_for_write(l1_index)
            part = view[pos - guest_offset:chunk_end - guest_offset]
            if self.extended:
                self._write_extended(l2_offset, table, part, pos)
            else:
                self._write_standard(l2_offset, table, part, pos)
            pos = chunk_end
        self._maybe_flush()

    def _write_standard(self, l2_offset: int, table, view: memoryview, guest_offset: int) -> None:
        bits, e = self.cluster_bits, self.l2_entries
        end = guest_offset + len(view)
        first, last = guest_offset >> bits, (end - 1) >> bits
        ci = first
        while ci <= last:
            entry = table[ci % e]
            stop = ci + 1
            if self._in_place(entry, ci):
                host = entry & _MASK
                while stop <= last and self._in_place(table[stop % e], stop) and \
                        table[stop % e] & _MASK == host + ((stop - ci) << bits):
                    stop += 1
                start_g = max(guest_offset, ci << bits)
                stop_g = min(end, stop << bits)
                self.data.pwrite(view[start_g - guest_offset:stop_g - guest_offset],
                                 host + start_g - (ci << bits))
            else:
                while stop <= last and not self._in_place(table[stop % e], stop):
                    stop += 1
                self._allocating_write(l2_offset, table, ci, stop, view, guest_offset)
            ci = stop

    def _allocating_write(self, l2_offset: int, table, first: int, stop: int,
                          view: memoryview, guest_offset: int) -> None:
        """New clusters for guest clusters ``[first, stop)``; copy-on-write at the two edges."""
        bits, e = self.cluster_bits, self.l2_entries
        end = guest_offset + len(view)
        g0, g1 = first << bits, stop << bits
        w0, w1 = max(guest_offset, g0), min(end, g1)
        old = [table[ci % e] for ci in range(first, stop)]
        host = self._new_host(first, stop - first)
        fresh = host >= self.data.size and not self.has_data_file
        head = self._cow(g0, w0 - g0, old[0], fresh)
        tail = self._cow(w1, g1 - w1, old[-1], fresh)
        if fresh and (head is None and w0 > g0 or tail is None and g1 > w1):
            self.data.allocate(host, g1 - g0)     # zeros without writing them, as QEMU does
        data = view[w0 - guest_offset:w1 - guest_offset]
        if head is None and tail is None:
            self.data.pwrite(data, host + (w0 - g0))
        else:
            pieces = [head or b"", data, tail or b""]
            start = host if head is not None else host + (w0 - g0)
            self.data.pwrite(b"".join(pieces), start)
        for k, ci in enumerate(range(first, stop)):
            table[ci % e] = (host + (k << bits)) | _COPIED
            self._release(old[k])
        self.l2_cache.mark_dirty(l2_offset, table)

    def _cow(self, guest_offset: int, length: int, old_entry: int, fresh: bool):
        """Copy-on-write bytes for a cluster edge, or None when nothing needs writing (empty, or
        zeros over fresh host space)."""
        if length <= 0:
            return None
        zero_flag = old_entry & _ZERO and not old_entry & _COMPRESSED
        if zero_flag or (old_entry == 0 and not self._backing_covers(guest_offset)):
            return None if fresh else bytes(length)      # reads as zeros now
        buf = self._current(guest_offset, length)
        if fresh and _is_zero(buf):
            return None
        return buf

    def _write_extended(self, l2_offset: int, table, view: memoryview, guest_offset: int) -> None:
        """Extended L2: per cluster, allocate and copy at subcluster granularity."""
        bits, sbits, e = self.cluster_bits, self.subcluster_bits, self.l2_entries
        cs = self.cluster_size
        end = guest_offset + len(view)
        for ci in range(guest_offset >> bits, ((end - 1) >> bits) + 1):
            idx = 2 * (ci % e)
            entry, bitmap = table[idx], table[idx + 1]
            g0 = ci << bits
            w0, w1 = max(guest_offset, g0), min(end, g0 + cs)
            sc_first, sc_last = (w0 - g0) >> sbits, (w1 - 1 - g0) >> sbits
            covered = _mask(sc_first, sc_last)
            alloc, zero = bitmap & _ALL_SUBCLUSTERS, bitmap >> 32
            compressed = bool(entry & _COMPRESSED)
            host = entry & _MASK
            allocated = not compressed and (bool(host) or (self.has_data_file and entry & _COPIED))
            if alloc & zero or (alloc and not allocated and not compressed):
                self.img._fail_corrupt(f"Invalid subcluster bitmap {c_hex(bitmap)} "
                                       f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(ci % e)})")
            in_place = allocated and entry & _COPIED
            if in_place:
                target = host
                copy = 0
            else:
                target = self._new_host(ci, 1)
                copy = (_ALL_SUBCLUSTERS if compressed else alloc) & ~covered
            # the partly written subclusters at both edges keep their other bytes
            a0 = g0 + (sc_first << sbits)
            a1 = g0 + ((sc_last + 1) << sbits)
            keep_head = not (in_place and alloc >> sc_first & 1)
            keep_tail = not (in_place and alloc >> sc_last & 1)
            head = self._current(a0, w0 - a0) if keep_head and w0 > a0 else b""
            tail = self._current(w1, a1 - w1) if keep_tail and a1 > w1 else b""
            data = view[w0 - guest_offset:w1 - guest_offset]
            if head or tail:
                self.data.pwrite(b"".join((head, data, tail)), target + (a0 - g0 if head
                                                                         else w0 - g0))
            else:
                self.data.pwrite(data, target + (w0 - g0))
            sc = 0
            while copy >> sc:                 # whole subclusters copied from the old cluster
                if not copy >> sc & 1:
                    sc += 1
                    continue
                run = sc
                while copy >> (run + 1) & 1:
                    run += 1
                c0 = g0 + (sc << sbits)
                self.data.pwrite(self._current(c0, (run + 1 - sc) << sbits), target + (c0 - g0))
                sc = run + 1
            new_alloc = alloc | covered | copy
            new_zero = zero & ~new_alloc
            table[idx] = target | _COPIED
            table[idx + 1] = new_alloc | (new_zero << 32)
            if not in_place:
                self._release(entry)
            self.l2_cache.mark_dirty(l2_offset, table)

    # -- zeroes and discard ---------------------------------------------------------------------
    def _units(self, offset: int, length: int, unit: int, round_out_end: bool):
        """Split a range into (head partial, [a, b) whole units, tail partial)."""
        end = offset + length
        a = -(-offset // unit) * unit
        b = end // unit * unit
        if round_out_end and end == self.img.size:
            b = -(-end // unit) * unit
        if a >= b:
            return [(offset, length)], (0, 0)
        partial = []
        if offset < a:
            partial.append((offset, a - offset))
        if b < end:
            partial.append((b, end - b))
        return partial, (a, b)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool,
                     no_fallback: bool = False) -> None:
        """Zero the range: zero flags (v3) or deallocation (v2 where nothing shows through) for
        whole clusters or subclusters, written zeros for partial ones.  With ``no_fallback``
        nothing is written as data: a partial unit whose other bytes read as zeros is zeroed
        whole (as QEMU widens such a request), anything else raises ``UnsupportedError`` before
        a change is made."""
        if no_fallback:
            offset, length = self._widen_without_fallback(offset, length)
        elif self.img.header.data_file_raw:
            self._write_zero_bytes(offset, length)
            return
        unit = 1 << self.subcluster_bits
        partial, (a, b) = self._units(offset, length, unit, True)
        for p_off, p_len in partial:
            if not _is_zero(self._current(p_off, p_len)):
                self._write_zero_bytes(p_off, p_len)
        if a < b:
            self._zero_whole(a, min(b, -(-self.img.size // unit) * unit), may_unmap)
        self._maybe_flush()

    def _widen_without_fallback(self, offset: int, length: int) -> tuple[int, int]:
        """The range widened to whole units for ``write_zeroes(no_fallback=True)``, or
        ``UnsupportedError`` when zeroing it would need data writes."""
        img = self.img
        unit = 1 << self.subcluster_bits
        disk_end = -(-img.size // unit) * unit
        start = offset // unit * unit
        stop = min(disk_end, -(-(offset + length) // unit) * unit)
        refuse = img.header.data_file_raw or not (
            _is_zero(self._current(start, offset - start))
            and _is_zero(self._current(offset + length, stop - offset - length)))
        if img.header.version < 3:      # no zero flag: only deallocation, if nothing is below
            refuse = refuse or self._backing_covers(start)
        if refuse:
            raise UnsupportedError(f"Zeroing 0x{length:x} bytes at 0x{offset:x} without "
                                   "writing data is not possible here")
        return start, min(stop, img.size) - start

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        for pos in range(offset, offset + length, len(_ZERO_CHUNK)):
            n = min(len(_ZERO_CHUNK), offset + length - pos)
            self.pwrite(memoryview(_ZERO_CHUNK)[:n], pos)

    def _zero_whole(self, a: int, b: int, may_unmap: bool) -> None:
        bits, e = self.cluster_bits, self.l2_entries
        v3 = self.img.header.version >= 3
        span = e << bits
        pos = a
        while pos < b:
            l1_index = pos // span
            chunk_end = min(b, (l1_index + 1) * span)
            if not v3:
                self._zero_v2(pos, chunk_end)
                pos = chunk_end
                continue
            l2_offset, table = self._l2_for_write(l1_index)
            if self.extended:
                self._zero_extended(l2_offset, table, pos, chunk_end, may_unmap)
            else:
                for ci in range(pos >> bits, ((chunk_end - 1) >> bits) + 1):
                    old = table[ci % e]
                    keep = not may_unmap and self._in_place(old, ci)
                    table[ci % e] = (old & _MASK) | _COPIED | _ZERO if keep else _ZERO
                    if not keep:
                        self._release(old)
                self.l2_cache.mark_dirty(l2_offset, table)
            pos = chunk_end

    def _zero_v2(self, a: int, b: int) -> None:
        """Version 2 has no zero flag: deallocate where no backing file shows through, else
        write zeros."""
        bits, e = self.cluster_bits, self.l2_entries
        for ci in range(a >> bits, ((b - 1) >> bits) + 1):
            g0 = ci << bits
            if self._backing_covers(g0):
                self._write_zero_bytes(g0, min(self.cluster_size, self.img.size - g0))
                continue
            if not self.img.l1_table[ci // e] & C.L1E_OFFSET_MASK:
                continue                 # nothing allocated: reads as zeros already
            l2_offset, table = self._l2_for_write(ci // e)
            old = table[ci % e]
            if old:
                table[ci % e] = 0
                self._release(old)
                self.l2_cache.mark_dirty(l2_offset, table)

    def _zero_extended(self, l2_offset: int, table, a: int, b: int, may_unmap: bool) -> None:
        bits, sbits, e = self.cluster_bits, self.subcluster_bits, self.l2_entries
        for ci in range(a >> bits, ((b - 1) >> bits) + 1):
            idx = 2 * (ci % e)
            g0 = ci << bits
            first = (max(a, g0) - g0) >> sbits
            last = ((min(b, g0 + self.cluster_size) - 1 - g0) >> sbits)
            covered = _mask(first, last)
            entry, bitmap = table[idx], table[idx + 1]
            if entry & _COMPRESSED:
                if covered != _ALL_SUBCLUSTERS:     # part of a compressed cluster: rewrite it
                    self._write_zero_bytes(g0 + (first << sbits), (last + 1 - first) << sbits)
                    entry, bitmap = table[idx], table[idx + 1]
                else:
                    table[idx], table[idx + 1] = 0, _ALL_SUBCLUSTERS << 32
                    self._release(entry)
                    continue
            alloc = (bitmap & _ALL_SUBCLUSTERS) & ~covered
            zero = (bitmap >> 32) | covered
            if not alloc and may_unmap and entry & _MASK and entry & _COPIED:
                self._release(entry)
                entry = 0
            table[idx], table[idx + 1] = entry, alloc | (zero << 32)
        self.l2_cache.mark_dirty(l2_offset, table)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (partial ones at the edges are left alone).  Afterwards they read
        as zeros.  Version 2 has no zero flag: with a backing file, whose data would show
        through, the request is ignored (discard is only a hint; QEMU 7.2 ignores it too)."""
        if self.img.header.data_file_raw:
            # the raw data file must read as the guest disk: zero it, but only the whole clusters
            # a discard drops - the partial edges keep their data, as in QEMU 7.2
            _, (a, b) = self._units(offset, length, self.cluster_size, True)
            if a < b:
                self.write_zeroes(a, min(b, self.img.size) - a, False)
            return
        if self.img.header.version < 3 and self.img.backing is not None:
            return
        bits, e = self.cluster_bits, self.l2_entries
        _, (a, b) = self._units(offset, length, self.cluster_size, True)
        v3 = self.img.header.version >= 3
        backing = self.img.backing is not None
        span = e << bits
        pos = a
        while pos < b:
            l1_index = pos // span
            chunk_end = min(b, (l1_index + 1) * span)
            entry = self.img.l1_table[l1_index] if l1_index < len(self.img.l1_table) else 0
            if not entry & C.L1E_OFFSET_MASK and not (backing and v3):
                pos = chunk_end          # nothing allocated, nothing to hide
                continue
            l2_offset, table = self._l2_for_write(l1_index)
            for ci in range(pos >> bits, ((chunk_end - 1) >> bits) + 1):
                idx = (2 if self.extended else 1) * (ci % e)
                old = table[idx]
                allocated = old & (_MASK | _COMPRESSED) or (self.has_data_file and old & _COPIED)
                if self.extended:
                    hide = backing or allocated
                    table[idx], table[idx + 1] = 0, (_ALL_SUBCLUSTERS << 32 if hide else 0)
                else:
                    hide = v3 and (backing or allocated)
                    table[idx] = _ZERO if hide else 0
                if allocated:
                    self._release(old)
            self.l2_cache.mark_dirty(l2_offset, table)
            pos = chunk_end
        self._maybe_flush()

    # -- compressed clusters ----------------------------------------------------------------------
    def write_compressed(self, view: memoryview, guest_offset: int, workers: int = 4) -> None:
        """Compress and write whole clusters (the last may end at the image end).  Compression
        runs in threads (zlib and zstd release the GIL); a cluster that does not shrink is
        written uncompressed.  (The image refuses them with an external data file.)"""
        cs = self.cluster_size
        clusters = []
        for pos in range(0, len(view), cs):
            piece = bytes(view[pos:pos + cs])
            clusters.append(piece.ljust(cs, b"\0"))
        ctype = self.img.header.compression_type
        if len(clusters) > 1 and workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                packed = list(pool.map(lambda c: compress_cluster(c, ctype), clusters))
        else:
            packed = [compress_cluster(c, ctype) for c in clusters]
        for k, (raw, comp) in enumerate(zip(clusters, packed)):
            g = guest_offset + k * cs
            if len(comp) >= cs:             # no gain: stored as is (QEMU's rule too)
                n = min(cs, self.img.size - g)
                self.pwrite(memoryview(raw)[:n], g)
            else:
                self._store_compressed(g, comp)
        self._maybe_flush()

    def _store_compressed(self, guest_offset: int, comp: bytes) -> None:
        cs, bits, e = self.cluster_size, self.cluster_bits, self.l2_entries
        host = self._compressed_next
        if host and host & (cs - 1) and self.refcounts.can_add(host >> bits):
            if (host & (cs - 1)) + len(comp) <= cs:
                self.refcounts.add(host >> bits, 1)   # one more compressed cluster shares it
            else:
                fresh = self.refcounts.alloc(1, "compressed cluster")
                if fresh == (host | (cs - 1)) + 1:    # contiguous: straddle the two, as QEMU
                    self.refcounts.add(host >> bits, 1)
                else:
                    host = fresh
        else:
            host = self.refcounts.alloc(1, "compressed cluster")
        self._compressed_next = host + len(comp)
        self.file.pwrite(comp, host)
        self.img._last_compressed = None    # a reused host offset gives an old descriptor back
        l2_offset, table = self._l2_for_write(guest_offset // (e << bits))
        ci = guest_offset >> bits
        idx = (2 if self.extended else 1) * (ci % e)
        old = table[idx]
        table[idx] = encode_compressed(host, len(comp), bits)
        if self.extended:
            table[idx + 1] = 0
        if old & (_MASK | _COMPRESSED):
            self._release(old)
        self.l2_cache.mark_dirty(l2_offset, table)

    def forget_compressed_tail(self) -> None:
        """Stop packing into the last compressed cluster (its refcount may drop to zero)."""
        self._compressed_next = 0

    # -- resize --------------------------------------------------------------------------------
    def resize(self, new_size: int, shrink: bool, hide_backing: bool = True,
               preallocation: str = "off") -> None:
        """Grow (L1 table grown and moved if needed) or shrink (clusters past the end freed).
        Grown space reads as zeros, also where a backing file could show through, unless
        ``hide_backing`` is False (a new image).  ``preallocation`` (``metadata``, ``falloc``,
        ``full``) maps the clusters wholly in the grown space, as :meth:`preallocate` does; with a
        raw data file ``off`` means ``metadata`` (the data file stays mapped 1:1, as QEMU keeps
        it, at create and at every growth)."""
        img = self.img
        if img.header.data_file_raw and preallocation == "off":
            preallocation = "metadata"
        old_size = img.size
        bits, e = self.cluster_bits, self.l2_entries
        span = e << bits
        need_l1 = -(-new_size // span)
        if new_size < old_size:
            if not shrink:
                raise RequestError("Use the --shrink option to perform a shrink operation.")
            # the size first: once clusters past the new end are dropped, a crash must not
            # leave the old size showing the backing file (or zeros) where data was
            img._update_header(size=new_size)
            img._set_size(new_size)
            self._barrier()
            self._shrink(new_size, old_size, need_l1)      # a crash after this only leaks
            if self.has_data_file:
                self.data.truncate(new_size)       # as QEMU: the data file ends with the disk
            return
        if need_l1 > len(img.l1_table):
            self._grow_l1(need_l1)
        # the new area must read as zeros before the header says it exists (a crash in between
        # must not show old bytes): the old last cluster may hold bytes past the old end, and a
        # backing file must not show through (QEMU zeroes it too)
        img._set_size(new_size)
        try:
            zero_end = min(new_size, -(-old_size // self.cluster_size) * self.cluster_size)
            if img.backing is not None and hide_backing:
                zero_end = max(zero_end, min(new_size, img.backing.size))
            if old_size < zero_end:
                self.write_zeroes(old_size, zero_end - old_size, False)
            if preallocation != "off" and new_size > old_size:
                self.preallocate(preallocation, -(-old_size // self.cluster_size))
            if self.has_data_file and preallocation == "off":
                self.data.truncate(new_size)       # as QEMU: the data file ends with the disk
            self.flush_metadata()
            self._barrier()
            img._update_header(size=new_size)
        except BaseException:
            img._set_size(old_size)
            raise

    def _shrink(self, new_size: int, old_size: int, need_l1: int) -> None:
        img = self.img
        cs, bits = self.cluster_size, self.cluster_bits
        first_free = -(-new_size // cs) << bits
        if first_free < old_size:
            end = -(-old_size // cs) * cs
            self._drop(first_free, end)
        for l1_index in range(need_l1, len(img.l1_table)):
            entry = img.l1_table[l1_index]
            l2_offset = entry & C.L1E_OFFSET_MASK
            if l2_offset:
                img.l1_table[l1_index] = 0
                self.l1_dirty.add(l1_index)
                self.l2_cache.forget(l2_offset)
                if img._guard is not None:
                    img._guard.leave(l2_offset, cs, OL_ACTIVE_L2)
                self.refcounts.decref(l2_offset >> bits)
        self.flush_metadata()
        self.refcounts.unlink_idle_blocks(self._barrier)
        self.flush_metadata()                # the decrements of blocks stored elsewhere
        self._cut_tail()

    def _cut_tail(self) -> None:
        """Truncate the file after its last cluster in use, as QEMU does after a shrink; not when
        the guard knows metadata past that point (the refcounts would be wrong there, and a
        truncation is a write over it)."""
        cs, size = self.cluster_size, self.file.size
        end = (self.refcounts.last_used(-(-size // cs)) + 1) * cs
        guard = self.img._guard
        if end < size and (guard is None or not guard.overlaps(end, size - end)):
            self._barrier()                  # what unlinked the tail is durable before it goes
            self.file.truncate(end)

    def _drop(self, a: int, b: int) -> None:
        """Unmap whole clusters ``[a, b)`` entirely (shrink: nothing may remain)."""
        bits, e = self.cluster_bits, self.l2_entries
        span = e << bits
        pos = a
        while pos < b:
            l1_index = pos // span
            chunk_end = min(b, (l1_index + 1) * span)
            if self.img.l1_table[l1_index] & C.L1E_OFFSET_MASK:
                l2_offset, table = self._l2_for_write(l1_index)
                width = 2 if self.extended else 1
                for ci in range(pos >> bits, ((chunk_end - 1) >> bits) + 1):
                    idx = width * (ci % e)
                    old = table[idx]
                    table[idx] = 0
                    if self.extended:
                        table[idx + 1] = 0
                    if old & (_MASK | _COMPRESSED) or (self.has_data_file and old & _COPIED):
                        self._release(old)
                self.l2_cache.mark_dirty(l2_offset, table)
            pos = chunk_end

    def _grow_l1(self, need: int) -> None:
        """Move the L1 table to a larger one: written in full, then one header write."""
        img = self.img
        cs = self.cluster_size
        new_entries = max(need, len(img.l1_table) * 3 // 2)
        if new_entries * 8 > C.QCOW_MAX_L1_SIZE:
            new_entries = need
        if need * 8 > C.QCOW_MAX_L1_SIZE:   # QEMU's EFBIG, in its words
            raise RequestError("Failed to grow the L1 table: File too large")
        self.flush_metadata()
        nb_clusters = -(-new_entries * 8 // cs)
        new_offset = self.refcounts.alloc(nb_clusters, "L1 table")
        self.refcounts.flush()
        table = array.array("Q", img.l1_table)
        table.extend(array.array("Q", bytes(8 * (new_entries - len(table)))))
        guard = img._guard
        if guard is not None:
            guard.enter(new_offset, new_entries * 8, OL_ACTIVE_L1)
        self.file.pwrite(encode_u64_table(table), new_offset, ign=OL_ACTIVE_L1)
        self.file.flush()
        old_offset, old_entries = img.header.l1_table_offset, img.header.l1_size
        img._update_header(l1_size=new_entries, l1_table_offset=new_offset)
        if guard is not None and old_entries:
            guard.leave(old_offset, old_entries * 8, OL_ACTIVE_L1)
        if old_entries:
            self.refcounts.decref_range(old_offset, old_entries * 8)
        img._set_l1(table)
        self.l1_dirty.clear()


    # -- preallocation ---------------------------------------------------------------------------
    def preallocate(self, mode: str, first_cluster: int) -> None:
        """Map every guest cluster from ``first_cluster`` to the end (``metadata``), and reserve
        (``falloc``) or zero-fill (``full``) its host space; one L2 table at a time, entries set
        by slice assignment (what they mapped before is released).  Data clusters in an external
        data file map to the same offset there."""
        img = self.img
        e, cs = self.l2_entries, self.cluster_size
        nb_clusters = -(-img.size // cs)
        width = 2 if self.extended else 1
        for l1_index in range(first_cluster // e, -(-nb_clusters // e)):
            first = max(first_cluster, l1_index * e)
            n = min(nb_clusters, (l1_index + 1) * e) - first
            l2_offset, table = self._l2_for_write(l1_index)
            slots = slice(width * (first % e), width * (first % e + n), width)
            old = table[slots]
            host = self._new_host(first, n)
            table[slots] = array.array("Q", range(host | _COPIED, (host | _COPIED) + n * cs, cs))
            for entry in old:
                if entry & (_MASK | _COMPRESSED):
                    self._release(entry)
            self.l2_cache.mark_dirty(l2_offset, table)
            end = host + n * cs                  # whole clusters, in a data file too (QEMU's)
            if mode == "metadata" and end > self.data.size:
                self.data.truncate(end)          # the clusters exist in the file (as holes)
            elif mode == "falloc":
                self.data.allocate(host, end - host)
            elif mode == "full":
                for pos in range(host, end, len(_ZERO_CHUNK)):
                    self.data.pwrite(memoryview(_ZERO_CHUNK)[:min(len(_ZERO_CHUNK), end - pos)],
                                     pos)
            if self.l2_cache.nb_dirty > 64:
                self.flush_metadata()
        self.flush_metadata()
