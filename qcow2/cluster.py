"""Guest-to-host cluster mapping (the read side of cluster management).

Theory of operation
-------------------
A guest offset splits into an L1 index, an L2 index and an offset inside the cluster.  The L1 table
is held in memory as an ``array('Q')``; L2 tables are fetched through a
:class:`~qcow2.cache.TableCache`, which decodes each table in one bulk call.  :meth:`Mapping.segments` walks a guest range and returns
*segments*: maximal pieces of one kind whose host bytes are contiguous, so that a reader issues one
``preadv`` per contiguous host run, whatever the cluster size.

Kinds of segment (``Segment.kind``):

``UNALLOCATED``  nothing here: read from the backing file, or zeros.  ``host`` is the host offset when
                 the cluster is allocated but this subcluster is not (extended L2), else -1.
``ZERO``         reads as zeros (zero flag, or extended-L2 zero bits).  ``host`` as above.
``DATA``         plain data at ``host`` (in the external data file when there is one).
``COMPRESSED``   one whole compressed cluster; ``host`` is the raw L2 descriptor.

With extended L2 entries a cluster is 32 subclusters, each of which is one of the first three kinds;
a compressed cluster has no subclusters.  Every host offset and descriptor read from the image is
validated before use: an unaligned L2 table or data cluster, a reserved/illegal bitmap, or a
compressed cluster in an image with an external data file raises ``CorruptImageError`` naming it.
"""

from __future__ import annotations

from array import array
from typing import Iterator, NamedTuple

from .units import c_hex
from .constants import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                        QCOW_OFLAG_ZERO, SUBCLUSTERS_PER_CLUSTER)
from .cache import TableCache
from .errors import CorruptImageError

UNALLOCATED, ZERO, DATA, COMPRESSED = range(4)


class Segment(NamedTuple):
    """A guest range of one kind; ``host`` as described in the module docstring."""

    kind: int
    guest_offset: int
    length: int
    host: int


class Mapping:
    """Maps guest ranges of one L1 table (the active one or a snapshot's) to segments."""

    def __init__(self, *, l1, cluster_bits: int, extended_l2: bool,
                 has_data_file: bool, l2_cache: TableCache, zero_flag: bool = True):
        self.l1 = l1
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.extended_l2 = extended_l2
        self.has_data_file = has_data_file
        self.l2_cache = l2_cache
        self.zero_flag = zero_flag  # version 3: bit 0 of an L2 entry means "reads as zeros"
        entry_size = 16 if extended_l2 else 8
        self.l2_entries = self.cluster_size // entry_size
        self.subcluster_bits = cluster_bits - 5 if extended_l2 else cluster_bits

    # -- lookups ---------------------------------------------------------------------------------
    def l2_table_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for ``l1_index`` (0 if unallocated), validated."""
        if l1_index >= len(self.l1):
            return 0
        l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(l1_index)})")
        return l2_offset

    def segments(self, guest_offset: int, length: int) -> list[Segment]:
        """Split ``[guest_offset, guest_offset+length)`` into merged segments (a list).

        Costs O(clusters in the range) Python steps plus one L2 cache lookup per L2 table touched.
        The caller has checked the range against the virtual size.
        """
        return list(self.iter_segments(guest_offset, length))

    def iter_segments(self, guest_offset: int, length: int) -> Iterator[Segment]:
        """:meth:`segments` as a generator: memory bounded by one L2 table's segments, whatever
        the size of the range."""
        out: list[Segment] = []
        end = guest_offset + length
        cluster_bits = self.cluster_bits
        cluster_size = self.cluster_size
        l2_entries = self.l2_entries
        pos = guest_offset
        while pos < end:
            cluster_index = pos >> cluster_bits
            l1_index, l2_index = divmod(cluster_index, l2_entries)
            l2_offset = self.l2_table_offset(l1_index)
            table_end = min(end, ((l1_index + 1) * l2_entries) << cluster_bits)
            if len(out) > 1:  # all but the last are final: the next may merge into the last
                yield from out[:-1]
                del out[:-1]
            if l1_index >= len(self.l1):     # a snapshot's disk may be larger than its L1 table
                _append(out, UNALLOCATED, pos, end - pos, -1)
                break
            if not l2_offset:
                _append(out, UNALLOCATED, pos, table_end - pos, -1)
                pos = table_end
                continue
            table = self.l2_cache.load(l2_offset)
            while pos < table_end:
                in_cluster = pos & (cluster_size - 1)
                if self.extended_l2:
                    n = min(table_end - pos, cluster_size - in_cluster)
                    self._extended(out, table, l2_offset, l2_index, pos, in_cluster, n)
                    run = 1
                else:
                    entry = table[l2_index]
                    nb_clusters = ((table_end - 1) >> cluster_bits) - (pos >> cluster_bits) + 1
                    run = self._run_length(table, l2_index, nb_clusters, entry)
                    n = min(table_end - pos, (run << cluster_bits) - in_cluster)
                    # the run's entries continue the first one, so validating it validates all
                    self._standard(out, entry, l2_offset, l2_index, pos, in_cluster, n)
                pos += n
                l2_index += run
        yield from out

    def _run_length(self, table, l2_index: int, nb_entries: int, entry: int) -> int:
        """How many standard L2 entries from ``l2_index`` (at most ``nb_entries``) continue
        ``entry``: the same flags and, for entries with a host cluster, consecutive host clusters
        (equal entries otherwise).  Such a run maps to one segment.  Compressed entries are runs of
        one.  Galloping search over C-level array slice comparisons: O(log run) Python steps and
        O(run) C work, instead of one Python step per cluster.
        """
        if nb_entries == 1 or entry & QCOW_OFLAG_COMPRESSED:
            return 1
        host = entry & L2E_OFFSET_MASK
        if host or (self.has_data_file and entry & QCOW_OFLAG_COPIED
                    and not entry & QCOW_OFLAG_ZERO):    # as in _standard: zero flag first
            step = self.cluster_size
            # never let the progression carry out of the offset field into the flag bits
            nb_entries = min(nb_entries, ((L2E_OFFSET_MASK + 0x200) - host) >> self.cluster_bits)
        else:
            step = 0
        if nb_entries <= 1 or table[l2_index + 1] != entry + step:
            return 1
        known = 2  # entries [l2_index, l2_index + known) are known to continue the run
        while known < nb_entries:
            probe = min(nb_entries, known * 4)
            if step:
                expect = array("Q", range(entry, entry + probe * step, step))
            else:
                expect = array("Q", (entry,)) * probe
            if table[l2_index:l2_index + probe] == expect:
                known = probe
                continue
            # the run ends in [known, probe): bisect
            while probe - known > 1:
                mid = (known + probe) // 2
                if table[l2_index:l2_index + mid] == expect[:mid]:
                    known = mid
                else:
                    probe = mid
            return known
        return nb_entries

    def _entry_host(self, entry: int, bitmap: int, l2_offset: int, l2_index: int) -> int | None:
        """Validate an L2 entry.  None for a compressed cluster; else its host offset, or -1 when
        the cluster is not allocated."""
        if entry & QCOW_OFLAG_COMPRESSED:
            if bitmap or self.has_data_file:
                raise CorruptImageError(
                    f"Invalid compressed cluster entry {c_hex(entry)} (L2 offset: {c_hex(l2_offset)}, "
                    f"L2 index: {c_hex(l2_index)}, bitmap: {c_hex(bitmap)}, external data file: "
                    f"{'yes' if self.has_data_file else 'no'})")
            return None
        host = entry & L2E_OFFSET_MASK
        if host & (self.cluster_size - 1):
            raise CorruptImageError(
                f"Cluster allocation offset {c_hex(host)} unaligned "
                f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})")
        if host or (self.has_data_file and entry & QCOW_OFLAG_COPIED):
            return host
        return -1

    def _standard(self, out, entry, l2_offset, l2_index, pos, in_cluster, n):
        host = self._entry_host(entry, 0, l2_offset, l2_index)
        if host is None:
            out.append(Segment(COMPRESSED, pos, n, entry))
        elif entry & QCOW_OFLAG_ZERO:
            if not self.zero_flag:
                raise CorruptImageError(
                    f"Zero cluster entry found in pre-v3 image (L2 offset: {c_hex(l2_offset)}, "
                    f"L2 index: {c_hex(l2_index)})")
            # QEMU tests the zero flag first: a zero entry has a host cluster only when its
            # offset field is set (offset 0 with COPIED is no data file cluster here)
            host = entry & L2E_OFFSET_MASK
            _append(out, ZERO, pos, n, host + in_cluster if host else -1)
        elif host >= 0:
            _append(out, DATA, pos, n, host + in_cluster)
        else:
            _append(out, UNALLOCATED, pos, n, -1)

    def _extended(self, out, table, l2_offset, l2_index, pos, in_cluster, n):
        entry = table[2 * l2_index]
        bitmap = table[2 * l2_index + 1]
        host = self._entry_host(entry, bitmap, l2_offset, l2_index)
        if host is None:
            out.append(Segment(COMPRESSED, pos, n, entry))
            return
        alloc_mask = bitmap & 0xFFFFFFFF
        zero_mask = bitmap >> 32
        if alloc_mask & zero_mask:
            raise CorruptImageError(
                f"Invalid subcluster bitmap {c_hex(bitmap)} (L2 offset: {c_hex(l2_offset)}, "
                f"L2 index: {c_hex(l2_index)}): subclusters both allocated and zero")
        allocated = host >= 0
        if not allocated and alloc_mask:
            raise CorruptImageError(
                f"Invalid subcluster bitmap {c_hex(bitmap)} for an unallocated cluster "
                f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})")
        sc_bits = self.subcluster_bits
        off = in_cluster
        stop = in_cluster + n
        base = pos - in_cluster
        while off < stop:
            sc = off >> sc_bits
            bit = 1 << sc
            # extend over following subclusters of the same kind
            if alloc_mask & bit:
                kind, same = DATA, alloc_mask
            elif zero_mask & bit:
                kind, same = ZERO, zero_mask
            else:
                kind, same = UNALLOCATED, ~(alloc_mask | zero_mask)
            last = sc
            while last + 1 < SUBCLUSTERS_PER_CLUSTER and same & (1 << (last + 1)):
                last += 1
            piece_end = min(stop, (last + 1) << sc_bits)
            _append(out, kind, base + off, piece_end - off, host + off if allocated else -1)
            off = piece_end


def _append(out: list[Segment], kind: int, guest_offset: int, length: int, host: int) -> None:
    """Append a segment, merging it into the previous one when kinds and host runs continue."""
    if out:
        last = out[-1]
        if (last.kind == kind and last.kind != COMPRESSED
                and last.guest_offset + last.length == guest_offset
                and (host == last.host + last.length if last.host >= 0 else host < 0)):
            out[-1] = Segment(kind, last.guest_offset, last.length + length, last.host)
            return
    out.append(Segment(kind, guest_offset, length, host))
