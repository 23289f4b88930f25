"""Pure-Python twin of :mod:`qcow2._overlap` (the Cython range map).

Theory of operation (identical in both files; the Cython module is the reference encoder)
=========================================================================================

Content.  The map stores, per host cluster, a 16-bit mask of metadata types (bit n = QEMU's
``QCOW2_OL_*`` bit n).  Canonically it is a sorted sequence of *maximal runs*
``(start_cluster, nb_clusters, mask)`` with ``mask != 0`` and no two adjacent runs (touching)
with equal masks.  Cluster numbers are ``byte_offset >> cluster_bits``; every byte range is
widened to whole clusters.  Offsets are below 2**63, so cluster numbers fit in 55 bits.

Structure.  Runs are kept in *blocks* of at most ``B`` (=128) runs each, the leaf level of a
B+tree: a top-level sorted array of block base clusters (u64) with a parallel array of block
pointers, binary searched.  Every block except the last holds at least ``MIN_FILL`` (=64) runs.
Blocks are disjoint; a block spans ``[base, end)`` = first run start .. last run end.

Block encoding (Cython: one PyMem allocation of exactly ``block_bytes`` bytes; the twin keeps the
runs decoded in lists and charges the same size).  A 16-byte header

    u64 base | u16 summary (OR of all masks) | u8 n (runs) | u8 kind (0 RUNS, 1 DENSE)
    | u8 ws | u8 wl | u8 wc | u8 P (palette size)

then ``wc`` bytes of a common field, ``P`` u16 palette masks (sorted ascending), then

* RUNS:  ``(n-1)`` start deltas from ``base`` (runs 1..n-1, ``ws`` bytes LE each, ``ws`` = bytes
  needed for the largest delta), ``n`` fields ``nb_clusters-1`` (``wl`` bytes each; if all runs
  have the same length ``wl = 0`` and the common ``nb_clusters-1`` is the ``wc``-byte common
  field), then ``n`` palette indices bit-packed with ``bits(P)`` bits each (0 bits if P == 1).
  Fixed widths: binary search inside the block without decoding.
* DENSE: the common field is ``span-1`` (``wc`` bytes); then one index per cluster of the span,
  bit-packed with ``bits(P+1)`` bits (0 = no metadata, i = palette[i-1]).  Direct indexing.

Cost formula (bytes; identical in qcow2/_overlap.pyx and qcow2/_overlap_py.py)::

    width(x) = bytes needed for x (0 for 0)        bits(p) = 0 if p <= 1 else ceil(log2 p)
    RUNS  = 16 + wc + 2P + (n-1)*ws + n*wl + ceil(n*bits(P)/8)
            ws = width(last_start - base); all lengths equal: wl = 0, wc = width(len-1);
            else wl = width(max(len)-1), wc = 0
    DENSE = 16 + width(span-1) + 2P + ceil(span*bits(P+1)/8)
    block_bytes = min(RUNS, DENSE) + BLOCK_PAD (8: lets every field be read with one 8-byte
                  load)                          (DENSE only when strictly smaller)
    top_cap(nb) = 0 if nb == 0 else nb rounded up to a multiple of max(4, 2**floor(log2 nb)/8)
    memory_used = FIXED_OVERHEAD + 16*top_cap(nb_blocks) + sum(block_bytes)
    FIXED_OVERHEAD = 64 (object, nominal) + (UNPROTECTED_MAX+1)*16 (unprotected set) = 336

Updates.  ``add``/``remove`` are cut into *pieces*, each touching (intersecting or adjacent to)
at most 3 blocks (cut at the end of the 2nd touching block).  A piece streams the runs of its
region (the touching blocks; for an add into a gap the left neighbour, else the right one)
through the edit, merging equal neighbours; an unchanged piece is a no-op.  If the result has
fewer than MIN_FILL runs and the region does not include the last block, the right neighbour
joins (once).  The N output runs are cut into ceil(N/B) blocks: greedily (B, ..., rest) when the
region includes the last block (ascending entry leaves full blocks), otherwise as evenly as
possible.  The edit is streamed three times — count, gather per-block statistics (palette,
widths: the sizes), encode straight into the new blocks — so no run buffer exists at all; the
new blocks are built while the old ones still exist and that peak is what is charged:

    a piece is refused iff  budget is set and
        memory_used + new_block_bytes + max(0, top growth) [+ kept bytes, below] > budget

so the real allocation never exceeds the budget, not even transiently.  Consequence: with the
budget at or below memory_used, every operation that changes something is refused (a no-op add
of already-present bits is not).

Refusal.  A refused add marks the whole cluster-widened add range unprotected and stores nothing:
an add spanning several pieces ("wide add") keeps the original blocks it replaces allocated (and
charged, "kept bytes") until it commits, and on refusal frees its new blocks and puts the
originals back.  A refused remove piece drops every block of its region (frees memory, leaves no
stale entry that could block a legitimate write) and the remove goes on with the next piece;
then the hull of the remove range and the dropped blocks' spans is marked unprotected.
Lowering the budget below memory_used drops nothing by itself; it only refuses growth.
``check``/``first_overlap`` never allocate map memory (``check`` allocates nothing at all).

Unprotected set: at most UNPROTECTED_MAX (16) merged byte intervals in a fixed array; marking
reports the newly covered parts; beyond the limit the two neighbours with the smallest gap
(leftmost on ties) are coalesced and the gap is reported.  ``on_limit(start, length)`` runs once
per new part, ascending (a coalesced gap last), after the map is consistent; an exception from it
propagates to the caller of add/remove (the remaining reports of that operation are skipped).

Complexity (n runs, B = 128): check O(log n) for a range within one block, O(log n + k) for k
runs or blocks (blocks fully inside the range use their summary); add/remove O(log n + B) per
piece plus an O(n/B) top-array move when blocks split or merge.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from typing import Callable, Iterator, List, Optional, Tuple

from .errors import RequestError

__all__ = ["RangeMap", "FIXED_OVERHEAD", "B", "MIN_FILL"]

INT64_MAX = (1 << 63) - 1
B = 128
MIN_FILL = B // 2
HEADER_SIZE = 16
TOP_ENTRY_SIZE = 16
OBJECT_SIZE = 64
UNPROTECTED_MAX = 16
BLOCK_PAD = 8
UNPROTECTED_SIZE = (UNPROTECTED_MAX + 1) * 16
FIXED_OVERHEAD = OBJECT_SIZE + UNPROTECTED_SIZE
KIND_RUNS = 0
KIND_DENSE = 1


def _width(x: int) -> int:
    return (x.bit_length() + 7) >> 3


def _bits(p: int) -> int:
    return 0 if p <= 1 else (p - 1).bit_length()


def _top_cap(nb: int) -> int:
    if nb == 0:
        return 0
    g = max(4, (1 << (nb.bit_length() - 1)) >> 3)
    return -(-nb // g) * g


def _block_size(starts: List[int], lens: List[int], masks: List[int]) -> Tuple[int, int]:
    """(size in bytes, kind) of the encoding of these runs (the cost formula)."""
    n = len(starts)
    base = starts[0]
    p = len(set(masks))
    ws = _width(starts[-1] - base)
    l0 = lens[0]
    if all(x == l0 for x in lens):
        wl, wc = 0, _width(l0 - 1)
    else:
        wl, wc = _width(max(lens) - 1), 0
    runs = HEADER_SIZE + wc + 2 * p + (n - 1) * ws + n * wl + ((n * _bits(p) + 7) >> 3)
    span = starts[-1] + lens[-1] - base
    dense = HEADER_SIZE + _width(span - 1) + 2 * p + ((span * _bits(p + 1) + 7) >> 3)
    if dense < runs:
        return dense + BLOCK_PAD, KIND_DENSE
    return runs + BLOCK_PAD, KIND_RUNS


class _Undo:
    """Original blocks replaced so far by a wide add (restored if a later piece is refused)."""
    __slots__ = ("first", "n_cur", "kept", "kept_bytes", "new_ids")

    def __init__(self, first: int):
        self.first = first          # first index of the affected range of the top array
        self.n_cur = 0              # its current length (new blocks and untouched originals)
        self.kept: List["_Block"] = []   # originals taken out, in order
        self.kept_bytes = 0
        self.new_ids: set = set()   # blocks created by this add


class _Block:
    __slots__ = ("starts", "lens", "masks", "size", "kind", "summary", "end")

    def __init__(self, starts: List[int], lens: List[int], masks: List[int]):
        self.starts = starts
        self.lens = lens
        self.masks = masks
        self.size, self.kind = _block_size(starts, lens, masks)
        s = 0
        for m in masks:
            s |= m
        self.summary = s
        self.end = starts[-1] + lens[-1]


def _index(x: object, what: str) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}") from None


def _validate_range(offset: object, length: object) -> Tuple[int, int]:
    off = _index(offset, "offset")
    ln = _index(length, "length")
    if off < 0 or ln < 0 or off + ln > INT64_MAX:
        raise RequestError(f"invalid range offset={off:#x} length={ln:#x}: needs offset >= 0, "
                           f"length >= 0 and offset+length <= {INT64_MAX:#x}")
    return off, ln


def _validate_mask(types: object, what: str) -> int:
    t = _index(types, what)
    if t < 0 or t > 0xFFFF:
        raise RequestError(f"{what} mask {t:#x} outside 0..0xffff")
    return t


def _validate_budget(budget: object) -> Optional[int]:
    if budget is None:
        return None
    b = _index(budget, "budget")
    if b < FIXED_OVERHEAD:
        raise RequestError(f"budget {b} is below the range map's fixed overhead "
                           f"FIXED_OVERHEAD={FIXED_OVERHEAD} bytes")
    return b


class RangeMap:
    """Map from host clusters to a 16-bit mask of metadata types, with a memory budget.

    See the module docstring for the structure, the cost formula and the refusal semantics.
    ``cluster_size`` must be a power of two in 512..2 MiB; ``budget`` (bytes, ``None`` =
    unlimited) must be at least ``FIXED_OVERHEAD``; ``on_limit(start, length)`` is called once
    per newly unprotected byte range.
    """

    def __init__(self, cluster_size: int, budget: Optional[int] = None,
                 on_limit: Optional[Callable[[int, int], None]] = None):
        cs = _index(cluster_size, "cluster_size")
        if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
            raise RequestError(f"cluster_size {cs} is not a power of two in 512..2097152")
        self._cluster_size = cs
        self._bits = cs.bit_length() - 1
        self._budget = _validate_budget(budget)
        self._on_limit = on_limit
        self._bases: List[int] = []
        self._blocks: List[_Block] = []
        self._nruns = 0
        self._blocks_bytes = 0
        self._unprot: List[List[int]] = []  # [start_byte, end_byte), merged, ascending

    # -- properties ----------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        """The cluster size in bytes."""
        return self._cluster_size

    @property
    def memory_used(self) -> int:
        """Bytes charged by the cost formula (FIXED_OVERHEAD included). O(1)."""
        return (FIXED_OVERHEAD + TOP_ENTRY_SIZE * _top_cap(len(self._blocks))
                + self._blocks_bytes)

    @property
    def budget(self) -> Optional[int]:
        """Memory cap in bytes or None.  Lowering it below ``memory_used`` drops nothing by
        itself; it only refuses future growth.  Raises RequestError below FIXED_OVERHEAD."""
        return self._budget

    @budget.setter
    def budget(self, value: Optional[int]) -> None:
        self._budget = _validate_budget(value)

    def __len__(self) -> int:
        """Number of maximal runs stored. O(1)."""
        return self._nruns

    # -- queries -------------------------------------------------------------------------
    def check(self, offset: int, length: int, ignore: int = 0) -> int:
        """OR of the masks of the clusters overlapped by ``[offset, offset+length)``, minus
        ``ignore``; 0 = free.  Never allocates map memory.  O(log n + k)."""
        off, ln = _validate_range(offset, length)
        ign = _validate_mask(ignore, "ignore")
        if ln == 0:
            return 0
        c0 = off >> self._bits
        c1 = (off + ln - 1) >> self._bits  # inclusive
        bases = self._bases
        j = bisect_right(bases, c1) - 1
        acc = 0
        blocks = self._blocks
        while j >= 0:
            blk = blocks[j]
            if blk.end <= c0:
                break
            if bases[j] >= c0 and blk.end - 1 <= c1:
                acc |= blk.summary
            else:
                starts = blk.starts
                i = bisect_right(starts, c1) - 1
                lens = blk.lens
                masks = blk.masks
                while i >= 0 and starts[i] + lens[i] > c0:
                    acc |= masks[i]
                    i -= 1
            j -= 1
        return acc & ~ign

    def first_overlap(self, offset: int, length: int,
                      ignore: int = 0) -> Optional[Tuple[int, int]]:
        """(host_offset of the first overlapped cluster whose mask is not all ignored, that mask
        & ~ignore), or None.  For error messages.  O(log n + k)."""
        off, ln = _validate_range(offset, length)
        ign = _validate_mask(ignore, "ignore")
        if ln == 0:
            return None
        c0 = off >> self._bits
        c1 = (off + ln - 1) >> self._bits
        bases = self._bases
        j = bisect_right(bases, c0) - 1
        if j < 0:
            j = 0
        blocks = self._blocks
        while j < len(blocks) and bases[j] <= c1:
            blk = blocks[j]
            if blk.end > c0 and blk.summary & ~ign:
                starts = blk.starts
                i = max(0, bisect_right(starts, c0) - 1)
                while i < len(starts) and starts[i] <= c1:
                    if starts[i] + blk.lens[i] > c0:
                        m = blk.masks[i] & ~ign
                        if m:
                            return (max(starts[i], c0) << self._bits, m)
                    i += 1
            j += 1
        return None

    def runs(self) -> Iterator[Tuple[int, int, int]]:
        """Iterator over maximal runs ``(start_byte, length_bytes, mask)``, ascending."""
        b = self._bits
        out = []
        for blk in self._blocks:
            for s, ln, m in zip(blk.starts, blk.lens, blk.masks):
                out.append((s << b, ln << b, m))
        return iter(out)

    def unprotected(self) -> List[Tuple[int, int]]:
        """Merged ascending ``(start, length)`` byte ranges no longer guaranteed."""
        return [(a, b - a) for a, b in self._unprot]

    # -- mutations -----------------------------------------------------------------------
    def add(self, offset: int, length: int, types: int) -> bool:
        """OR ``types`` into every cluster of the (widened) range.  Returns False if refused
        (the range is then unprotected).  O(log n + B) per touched block."""
        off, ln = _validate_range(offset, length)
        t = _validate_mask(types, "types")
        if ln == 0 or t == 0:
            return True
        return self._apply(off, ln, t, True)

    def remove(self, offset: int, length: int, types: int) -> bool:
        """Clear ``types`` in every cluster of the (widened) range.  Returns False if refused
        (the affected blocks were dropped and are unprotected)."""
        off, ln = _validate_range(offset, length)
        t = _validate_mask(types, "types")
        if ln == 0 or t == 0:
            return True
        return self._apply(off, ln, t, False)

    def clear(self) -> None:
        """Forget every run and the unprotected set. O(n)."""
        self._bases = []
        self._blocks = []
        self._nruns = 0
        self._blocks_bytes = 0
        self._unprot = []

    # -- internals -----------------------------------------------------------------------
    def _first_touching(self, s: int) -> int:
        j = bisect_right(self._bases, s) - 1
        if j >= 0 and self._blocks[j].end >= s:
            return j
        return j + 1

    def _next_piece(self, s: int, c1: int) -> Tuple[int, int, int]:
        """(i0, i1, e): the piece [s, e) and the blocks i0..i1 it touches (at most 3)."""
        nb = len(self._blocks)
        bases = self._bases
        i0 = self._first_touching(s)
        i = i0
        while i < nb and bases[i] <= c1 and i - i0 < 4:
            i += 1
        e = self._blocks[i0 + 1].end if i - i0 >= 4 else c1
        i1 = i0 - 1
        while i1 + 1 < nb and bases[i1 + 1] <= e:
            i1 += 1
        return i0, i1, e

    def _apply(self, off: int, ln: int, t: int, is_add: bool) -> bool:
        bits = self._bits
        c0 = off >> bits
        c1 = (off + ln + self._cluster_size - 1) >> bits
        s = c0
        refused = False
        lo, hi = c0, c1
        keep = None
        while s < c1:
            i0, i1, e = self._next_piece(s, c1)
            if keep is None and is_add and e < c1:
                # a wide add: keep the original blocks until it commits, so that a refusal
                # can restore them (nothing of a refused add is stored)
                keep = _Undo(i0 - 1 if (i0 > i1 and i0 > 0) else i0)
            r = self._piece(s, e, t, is_add, i0, i1, keep)
            if r is not None:
                refused = True
                if is_add:
                    break
                lo, hi = min(lo, r[0]), max(hi, r[1])
            s = e
        if keep is not None and refused:
            # abort: drop the new blocks, put the originals back (merged by base)
            rng = self._blocks[keep.first:keep.first + keep.n_cur]
            orig = [b for b in rng if id(b) not in keep.new_ids] + keep.kept
            orig.sort(key=lambda b: b.starts[0])
            self._replace(keep.first, keep.first + keep.n_cur - 1, orig)
        if refused:
            self._mark(lo << bits, hi << bits)
            return False
        return True

    def _piece(self, s: int, e: int, t: int, is_add: bool, i0: int, i1: int,
               keep: Optional["_Undo"] = None):
        """Apply the edit to [s, e) over blocks i0..i1; None if done, else the dropped hull."""
        nb = len(self._blocks)
        if i0 > i1:
            if not is_add:
                return None
            if nb == 0:
                pass
            elif i0 > 0:
                i0 = i1 = i0 - 1
            else:
                i0 = i1 = 0
        extended = False
        while True:
            out_s: List[int] = []
            out_l: List[int] = []
            out_m: List[int] = []
            changed = self._edit(i0, i1, s, e, t, is_add, out_s, out_l, out_m)
            if not changed:
                return None
            n = len(out_s)
            if 0 < n < MIN_FILL and i1 < nb - 1 and not extended:
                i1 += 1
                extended = True
                continue
            break
        final = i1 >= nb - 1
        k = -(-n // B)
        if k == 0:
            sizes = []
        elif final:
            sizes = [B] * (k - 1) + [n - (k - 1) * B]
        else:
            q, r = divmod(n, k)
            sizes = [q + 1] * r + [q] * (k - r)
        new_blocks = []
        pos = 0
        for sz in sizes:
            new_blocks.append(_Block(out_s[pos:pos + sz], out_l[pos:pos + sz],
                                     out_m[pos:pos + sz]))
            pos += sz
        old_blocks = self._blocks[i0:i1 + 1]
        new_bytes = sum(b.size for b in new_blocks)
        nb_new = nb - len(old_blocks) + len(new_blocks)
        used = self.memory_used
        top_delta = TOP_ENTRY_SIZE * (_top_cap(nb_new) - _top_cap(nb))
        # the new blocks are built while the old ones still exist: charge that peak
        need = used + new_bytes + max(0, top_delta)
        if keep is not None:
            need += keep.kept_bytes
        refuse = need > (self._budget or 0)
        if self._budget is not None and refuse:
            if is_add:
                return (s, e)
            # drop the whole region
            lo = min(s, self._bases[i0])
            hi = max(e, old_blocks[-1].end)
            self._replace(i0, i1, [])
            return (lo, hi)
        if keep is not None:
            assert i0 >= keep.first
            for j in range(i0, i1 + 1):
                blk = self._blocks[j]
                if id(blk) in keep.new_ids:
                    keep.new_ids.discard(id(blk))
                else:
                    keep.kept.append(blk)
                    keep.kept_bytes += blk.size
            keep.new_ids.update(id(b) for b in new_blocks)
            old_end = keep.first + keep.n_cur
            if old_end > i1 + 1:
                new_end = old_end + len(new_blocks) - (i1 - i0 + 1)
            else:
                new_end = i0 + len(new_blocks)
            keep.n_cur = new_end - keep.first
        self._replace(i0, i1, new_blocks)
        return None

    def _replace(self, i0: int, i1: int, new_blocks: List[_Block]) -> None:
        old = self._blocks[i0:i1 + 1]
        self._blocks_bytes -= sum(b.size for b in old)
        self._nruns -= sum(len(b.starts) for b in old)
        self._blocks[i0:i1 + 1] = new_blocks
        self._bases[i0:i1 + 1] = [b.starts[0] for b in new_blocks]
        self._blocks_bytes += sum(b.size for b in new_blocks)
        self._nruns += sum(len(b.starts) for b in new_blocks)

    def _edit(self, i0, i1, s, e, t, is_add, out_s, out_l, out_m) -> bool:
        """Stream runs of blocks i0..i1 through the edit of [s, e) into out_*; True if changed."""
        changed = False
        pos = s

        def emit(a: int, n: int, m: int) -> None:
            if not m:
                return
            if out_s and out_m[-1] == m and out_s[-1] + out_l[-1] == a:
                out_l[-1] += n
            else:
                out_s.append(a)
                out_l.append(n)
                out_m.append(m)

        for j in range(i0, i1 + 1):
            blk = self._blocks[j]
            for rs, rl, rm in zip(blk.starts, blk.lens, blk.masks):
                re = rs + rl
                if rs < s:
                    emit(rs, min(re, s) - rs, rm)
                if is_add:
                    g = min(max(rs, s), e)
                    if pos < g:
                        emit(pos, g - pos, t)
                        changed = True
                        pos = g
                a = max(rs, s)
                b = min(re, e)
                if a < b:
                    nm = (rm | t) if is_add else (rm & ~t)
                    if nm != rm:
                        changed = True
                    emit(a, b - a, nm)
                    pos = b
                a = max(rs, e)
                if a < re:
                    emit(a, re - a, rm)
        if is_add and pos < e:
            emit(pos, e - pos, t)
            changed = True
        return changed

    def _mark(self, lo: int, hi: int) -> None:
        """Add [lo, hi) (bytes) to the unprotected set; report the newly covered parts."""
        un = self._unprot
        new_parts = []
        cur = lo
        keep_left = []
        keep_right = []
        nlo, nhi = lo, hi
        for a, b in un:
            if b < lo:
                keep_left.append([a, b])
            elif a > hi:
                keep_right.append([a, b])
            else:
                if a > cur:
                    new_parts.append((cur, min(a, hi)))
                cur = max(cur, b)
                nlo, nhi = min(nlo, a), max(nhi, b)
        if cur < hi:
            new_parts.append((cur, hi))
        un = keep_left + [[nlo, nhi]] + keep_right
        if len(un) > UNPROTECTED_MAX:
            best = 0
            gap = None
            for i in range(len(un) - 1):
                g = un[i + 1][0] - un[i][1]
                if gap is None or g < gap:
                    gap, best = g, i
            new_parts.append((un[best][1], un[best + 1][0]))
            un[best:best + 2] = [[un[best][0], un[best + 1][1]]]
        self._unprot = un
        cb = self._on_limit
        if cb is not None:
            for a, b in new_parts:
                cb(a, b - a)

    def _check(self) -> None:
        """Verify every invariant; raises AssertionError. O(n)."""
        blocks = self._blocks
        assert len(self._bases) == len(blocks)
        nruns = 0
        total = 0
        prev_end = None
        prev_mask = None
        for j, blk in enumerate(blocks):
            n = len(blk.starts)
            assert n == len(blk.lens) == len(blk.masks)
            assert 1 <= n <= B, n
            if j < len(blocks) - 1:
                assert n >= MIN_FILL, (j, n)
            assert self._bases[j] == blk.starts[0]
            summary = 0
            for s, ln, m in zip(blk.starts, blk.lens, blk.masks):
                assert ln >= 1 and 0 < m <= 0xFFFF
                assert s >= 0 and (s + ln) << self._bits <= 1 << 63
                if prev_end is not None:
                    assert s >= prev_end
                    assert not (s == prev_end and m == prev_mask), "unmerged runs"
                prev_end, prev_mask = s + ln, m
                summary |= m
            assert blk.summary == summary
            assert blk.end == blk.starts[-1] + blk.lens[-1]
            assert (blk.size, blk.kind) == _block_size(blk.starts, blk.lens, blk.masks)
            nruns += n
            total += blk.size
        assert nruns == self._nruns
        assert total == self._blocks_bytes
        un = self._unprot
        assert len(un) <= UNPROTECTED_MAX
        for i, (a, b) in enumerate(un):
            assert 0 <= a < b <= 1 << 63
            if i:
                assert un[i - 1][1] < a
        if self._budget is not None:
            assert self._budget >= FIXED_OVERHEAD
