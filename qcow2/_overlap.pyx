# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython range map: host clusters -> 16-bit metadata type masks, with a memory budget.

Theory of operation
===================

Content.  Per host cluster, a 16-bit mask of metadata types (bit n = QEMU's ``QCOW2_OL_*`` bit
n).  Canonically: sorted *maximal runs* ``(start_cluster, nb_clusters, mask)``, ``mask != 0``, no
two touching runs with equal masks.  Cluster numbers are ``byte_offset >> cluster_bits``; byte
ranges are widened to whole clusters; offsets are below 2**63 so all cluster arithmetic is done
in unsigned 64-bit integers without overflow (cluster numbers < 2**55).

Structure.  Runs live in *blocks* of at most B = 128 runs (the leaf level of a B+tree).  A top
array of block base clusters (``uint64_t *bases``) and a parallel array of block pointers is
binary searched.  Every block except the last holds at least MIN_FILL = 64 runs; blocks are
disjoint and ordered; a block spans first-run start .. last-run end.

Block encoding: one PyMem allocation of exactly ``block_bytes`` bytes.  16-byte header

    u64 base | u16 summary (OR of masks) | u8 n | u8 kind (0 RUNS, 1 DENSE) | u8 ws | u8 wl
    | u8 wc | u8 P

then the ``wc``-byte common field, ``P`` u16 palette masks (ascending), then

* RUNS:  (n-1) start deltas from base for runs 1..n-1 (``ws`` bytes LE each), n fields
  ``nb_clusters-1`` (``wl`` bytes each; ``wl == 0`` when all lengths are equal and the common
  ``nb_clusters-1`` is the common field), n palette indices bit-packed, ``bits(P)`` bits each.
  Fixed widths: binary search inside a block without decoding.
* DENSE: the common field is ``span-1``; one index per cluster of the span, ``bits(P+1)`` bits
  each (0 = none, i = palette[i-1]); direct indexing.

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

from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from libc.string cimport memset, memmove, memcpy, memcmp
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
cimport cython

import operator as _operator
import sys as _sys

if _sys.byteorder != "little":  # rd() loads fields as little-endian u64; use the twin there
    raise ImportError("qcow2._overlap supports little-endian hosts only")

from .errors import RequestError

__all__ = ["RangeMap", "FIXED_OVERHEAD", "B", "MIN_FILL"]

cdef enum:
    C_B = 128
    C_MIN_FILL = 64
    C_HEADER = 16
    C_TOP_ENTRY = 16
    C_OBJECT = 64
    C_UMAX = 16
    C_PAD = 8
    KIND_RUNS = 0
    KIND_DENSE = 1

B = C_B
MIN_FILL = C_MIN_FILL
HEADER_SIZE = C_HEADER
TOP_ENTRY_SIZE = C_TOP_ENTRY
OBJECT_SIZE = C_OBJECT
UNPROTECTED_MAX = C_UMAX
BLOCK_PAD = C_PAD
UNPROTECTED_SIZE = (C_UMAX + 1) * 16
FIXED_OVERHEAD = C_OBJECT + (C_UMAX + 1) * 16
cdef Py_ssize_t C_FIXED = C_OBJECT + (C_UMAX + 1) * 16
cdef long long INT64_MAX_C = 0x7FFFFFFFFFFFFFFF

ctypedef uint64_t u64


# ---------------------------------------------------------------------------------------------
# little helpers

cdef inline int width_of(u64 x) noexcept nogil:
    cdef int w = 0
    while x:
        w += 1
        x >>= 8
    return w

cdef inline int bits_of(u64 p) noexcept nogil:
    if p <= 1:
        return 0
    return 64 - __builtin_clzll(p - 1)

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil

cdef inline u64 rd(const uint8_t *p, int w) noexcept nogil:
    # one unaligned 8-byte little-endian load; every block is allocated with BLOCK_PAD spare
    # bytes so that this never reads outside the allocation
    cdef u64 v
    memcpy(&v, p, 8)
    if w >= 8:
        return v
    return v & ((1ULL << (8 * w)) - 1)

cdef inline void wr(uint8_t *p, u64 v, int w) noexcept nogil:
    cdef int k
    for k in range(w):
        p[k] = <uint8_t>(v & 0xFF)
        v >>= 8

cdef inline unsigned int getbits(const uint8_t *p, u64 i, int b) noexcept nogil:
    cdef u64 pos = i * <u64>b
    cdef u64 byte = pos >> 3
    cdef int sh = <int>(pos & 7)
    cdef unsigned int v = p[byte] >> sh
    if sh + b > 8:
        v |= (<unsigned int>p[byte + 1]) << (8 - sh)
    return v & ((1u << b) - 1)

cdef inline void setbits(uint8_t *p, u64 i, int b, unsigned int v) noexcept nogil:
    cdef u64 pos = i * <u64>b
    cdef u64 byte = pos >> 3
    cdef int sh = <int>(pos & 7)
    p[byte] |= <uint8_t>((v << sh) & 0xFF)
    if sh + b > 8:
        p[byte + 1] |= <uint8_t>(v >> (8 - sh))

cdef inline Py_ssize_t top_cap(Py_ssize_t nb) noexcept nogil:
    if nb == 0:
        return 0
    cdef Py_ssize_t p = 1
    while p * 2 <= nb:
        p *= 2
    cdef Py_ssize_t g = p >> 3
    if g < 4:
        g = 4
    return ((nb + g - 1) // g) * g


# ---------------------------------------------------------------------------------------------
# block layout accessors

cdef inline u64 b_base(const uint8_t *p) noexcept nogil:
    return rd(p, 8)

cdef inline unsigned int b_summary(const uint8_t *p) noexcept nogil:
    return p[8] | (<unsigned int>p[9] << 8)

cdef inline int b_n(const uint8_t *p) noexcept nogil:
    return p[10]

cdef inline u64 b_common(const uint8_t *p) noexcept nogil:
    return rd(p + 16, p[14])

cdef inline const uint8_t *b_pal(const uint8_t *p) noexcept nogil:
    return p + 16 + p[14]

cdef inline unsigned int pal_get(const uint8_t *pal, unsigned int i) noexcept nogil:
    return pal[2 * i] | (<unsigned int>pal[2 * i + 1] << 8)

cdef inline const uint8_t *b_deltas(const uint8_t *p) noexcept nogil:
    return p + 16 + p[14] + 2 * <int>p[15]

cdef inline const uint8_t *b_lens(const uint8_t *p) noexcept nogil:
    return b_deltas(p) + (<int>p[10] - 1) * <int>p[12]

cdef inline const uint8_t *b_idx(const uint8_t *p) noexcept nogil:
    if p[11] == KIND_DENSE:
        return p + 16 + p[14] + 2 * <int>p[15]
    return b_lens(p) + <int>p[10] * <int>p[13]

cdef inline u64 r_start(const uint8_t *p, int i) noexcept nogil:
    if i == 0:
        return b_base(p)
    return b_base(p) + rd(b_deltas(p) + (i - 1) * <int>p[12], p[12])

cdef inline u64 r_len(const uint8_t *p, int i) noexcept nogil:
    if p[13] == 0:
        return b_common(p) + 1
    return rd(b_lens(p) + i * <int>p[13], p[13]) + 1

cdef inline unsigned int r_mask(const uint8_t *p, int i) noexcept nogil:
    cdef int bi = bits_of(p[15])
    if bi == 0:
        return pal_get(b_pal(p), 0)
    return pal_get(b_pal(p), getbits(b_idx(p), i, bi))

cdef inline u64 b_end(const uint8_t *p) noexcept nogil:
    if p[11] == KIND_DENSE:
        return b_base(p) + b_common(p) + 1
    cdef int n = p[10]
    return r_start(p, n - 1) + r_len(p, n - 1)

cdef inline Py_ssize_t b_size(const uint8_t *p) noexcept nogil:
    """Bytes allocated (and charged) for the block: its encoding + BLOCK_PAD."""
    cdef Py_ssize_t n = p[10]
    cdef Py_ssize_t P = p[15]
    if p[11] == KIND_DENSE:
        return (C_PAD + 16 + p[14] + 2 * P
                + <Py_ssize_t>(((b_common(p) + 1) * <u64>bits_of(P + 1) + 7) >> 3))
    return C_PAD + 16 + p[14] + 2 * P + (n - 1) * p[12] + n * p[13] + ((n * bits_of(P) + 7) >> 3)


# Sequential run iterator over one block (RUNS: by index; DENSE: by cluster scan).
cdef struct RunIter:
    const uint8_t *p
    int kind
    int i          # RUNS: next run index
    u64 pos        # DENSE: next cluster offset from base
    u64 span
    int bd
    const uint8_t *idx
    const uint8_t *pal

cdef inline void it_init(RunIter *it, const uint8_t *p) noexcept nogil:
    it.p = p
    it.kind = p[11]
    it.i = 0
    it.pos = 0
    if it.kind == KIND_DENSE:
        it.span = b_common(p) + 1
        it.bd = bits_of(<u64>p[15] + 1)
        it.idx = b_idx(p)
        it.pal = b_pal(p)

cdef inline bint it_next(RunIter *it, u64 *s, u64 *l, unsigned int *m) noexcept nogil:
    cdef unsigned int v, w
    cdef u64 a
    if it.kind == KIND_RUNS:
        if it.i >= b_n(it.p):
            return False
        s[0] = r_start(it.p, it.i)
        l[0] = r_len(it.p, it.i)
        m[0] = r_mask(it.p, it.i)
        it.i += 1
        return True
    while it.pos < it.span:
        v = getbits(it.idx, it.pos, it.bd)
        if v != 0:
            break
        it.pos += 1
    if it.pos >= it.span:
        return False
    a = it.pos
    it.pos += 1
    while it.pos < it.span:
        w = getbits(it.idx, it.pos, it.bd)
        if w != v:
            break
        it.pos += 1
    s[0] = b_base(it.p) + a
    l[0] = it.pos - a
    m[0] = pal_get(it.pal, v - 1)
    return True


# ---------------------------------------------------------------------------------------------
# encoding.  A Chunk gathers the statistics of the runs of one future block as they stream by
# (palette, widths, span); finish_info() turns them into the block's EncInfo (the cost formula),
# enc_header()/enc_run() then write the block run by run — no run buffer is ever needed.

cdef struct EncInfo:
    Py_ssize_t size
    int kind
    int ws
    int wl
    int wc
    int bi
    u64 common

cdef struct Chunk:
    u64 base
    u64 last_start
    u64 last_end
    u64 l0
    u64 maxl
    bint same
    unsigned int summary
    int n
    int P
    uint16_t pal[C_B]
    EncInfo e
    uint8_t *blk

cdef inline void chunk_init(Chunk *c) noexcept nogil:
    c.n = 0
    c.P = 0
    c.same = True
    c.summary = 0
    c.maxl = 0
    c.blk = NULL

cdef inline int pal_index(const uint16_t *pal, int P, uint16_t x) noexcept nogil:
    cdef int lo = 0, hi = P, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if pal[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo

cdef inline void chunk_add(Chunk *c, u64 s, u64 l, unsigned int m) noexcept nogil:
    cdef int lo
    if c.n == 0:
        c.base = s
        c.l0 = l
    if l != c.l0:
        c.same = False
    if l > c.maxl:
        c.maxl = l
    c.summary |= m
    c.last_start = s
    c.last_end = s + l
    lo = pal_index(c.pal, c.P, <uint16_t>m)
    if not (lo < c.P and c.pal[lo] == m):
        memmove(c.pal + lo + 1, c.pal + lo, (c.P - lo) * sizeof(uint16_t))
        c.pal[lo] = <uint16_t>m
        c.P += 1
    c.n += 1

cdef void finish_info(Chunk *c) noexcept nogil:
    cdef EncInfo *e = &c.e
    cdef int n = c.n, P = c.P, ws, wl, wc
    cdef u64 span = c.last_end - c.base
    ws = width_of(c.last_start - c.base)
    if c.same:
        wl = 0
        wc = width_of(c.l0 - 1)
    else:
        wl = width_of(c.maxl - 1)
        wc = 0
    cdef Py_ssize_t runs = 16 + wc + 2 * P + (n - 1) * ws + n * wl + ((n * bits_of(P) + 7) >> 3)
    cdef u64 dense = (16 + <u64>width_of(span - 1) + 2 * <u64>P
                      + ((span * <u64>bits_of(P + 1) + 7) >> 3))
    if dense < <u64>runs:
        e.size = <Py_ssize_t>dense + C_PAD
        e.kind = KIND_DENSE
        e.ws = 0
        e.wl = 0
        e.wc = width_of(span - 1)
        e.common = span - 1
        e.bi = bits_of(P + 1)
    else:
        e.size = runs + C_PAD
        e.kind = KIND_RUNS
        e.ws = ws
        e.wl = wl
        e.wc = wc
        e.common = c.l0 - 1 if c.same else 0
        e.bi = bits_of(P)

cdef void enc_header(uint8_t *p, const Chunk *c) noexcept nogil:
    cdef const EncInfo *e = &c.e
    cdef int i
    cdef uint8_t *q
    memset(p, 0, e.size)
    wr(p, c.base, 8)
    p[8] = c.summary & 0xFF
    p[9] = (c.summary >> 8) & 0xFF
    p[10] = c.n
    p[11] = e.kind
    p[12] = e.ws
    p[13] = e.wl
    p[14] = e.wc
    p[15] = c.P
    wr(p + 16, e.common, e.wc)
    q = p + 16 + e.wc
    for i in range(c.P):
        q[2 * i] = c.pal[i] & 0xFF
        q[2 * i + 1] = c.pal[i] >> 8

cdef inline void enc_run(uint8_t *p, const Chunk *c, int i, u64 s, u64 l,
                         unsigned int m) noexcept nogil:
    cdef const EncInfo *e = &c.e
    cdef uint8_t *q = p + 16 + e.wc + 2 * c.P
    cdef unsigned int v = pal_index(c.pal, c.P, <uint16_t>m)
    cdef u64 k, off
    if e.kind == KIND_RUNS:
        if i > 0:
            wr(q + (i - 1) * e.ws, s - c.base, e.ws)
        q += (c.n - 1) * e.ws
        if e.wl:
            wr(q + i * e.wl, l - 1, e.wl)
        q += c.n * e.wl
        if e.bi:
            setbits(q, i, e.bi, v)
    else:
        off = s - c.base
        for k in range(l):
            setbits(q, off + k, e.bi, v + 1)


# ---------------------------------------------------------------------------------------------
# the edit stream: a sink receives the edited runs, merges equal neighbours and hands complete
# runs to its mode: count them, gather chunk statistics, or encode them into the new blocks.

cdef enum:
    SINK_COUNT = 0
    SINK_INFO = 1
    SINK_ENCODE = 2
    MAX_CHUNKS = 16

cdef struct Sink:
    int mode
    bint has
    u64 ps
    u64 pl
    unsigned int pm
    Py_ssize_t count          # runs delivered
    int fill                  # runs delivered into the current chunk
    int chunk                 # current chunk index
    int nchunks
    int sizes[MAX_CHUNKS]
    Chunk ch[MAX_CHUNKS]

cdef inline void sink_deliver(Sink *k, u64 s, u64 l, unsigned int m) noexcept nogil:
    cdef Chunk *c
    if k.mode != SINK_COUNT:
        c = &k.ch[k.chunk]
        if k.mode == SINK_INFO:
            chunk_add(c, s, l, m)
        else:
            if k.fill == 0:
                enc_header(c.blk, c)
            enc_run(c.blk, c, k.fill, s, l, m)
        k.fill += 1
        if k.fill == k.sizes[k.chunk]:
            if k.mode == SINK_INFO:
                finish_info(c)
            k.chunk += 1
            k.fill = 0
    k.count += 1

cdef inline void sink_emit(Sink *k, u64 s, u64 l, unsigned int m) noexcept nogil:
    if m == 0 or l == 0:
        return
    if k.has and k.pm == m and k.ps + k.pl == s:
        k.pl += l
        return
    if k.has:
        sink_deliver(k, k.ps, k.pl, k.pm)
    k.has = True
    k.ps = s
    k.pl = l
    k.pm = m

cdef inline void sink_finish(Sink *k) noexcept nogil:
    if k.has:
        sink_deliver(k, k.ps, k.pl, k.pm)
        k.has = False

cdef inline void sink_start(Sink *k, int mode) noexcept nogil:
    k.mode = mode
    k.has = False
    k.count = 0
    k.fill = 0
    k.chunk = 0


cdef inline u64 umin(u64 a, u64 b) noexcept nogil:
    return a if a < b else b

cdef inline u64 umax(u64 a, u64 b) noexcept nogil:
    return a if a > b else b


cdef bint run_edit(uint8_t **blocks, Py_ssize_t i0, Py_ssize_t i1, u64 s, u64 e, unsigned int t,
                   bint is_add, Sink *k) noexcept nogil:
    """Stream the runs of blocks i0..i1 through the edit of [s, e) into k; True if changed."""
    cdef bint changed = False
    cdef u64 pos = s, rs, rl, re, a, b, g
    cdef unsigned int rm, nm
    cdef RunIter it
    cdef Py_ssize_t j
    for j in range(i0, i1 + 1):
        it_init(&it, blocks[j])
        while it_next(&it, &rs, &rl, &rm):
            re = rs + rl
            if rs < s:
                sink_emit(k, rs, umin(re, s) - rs, rm)
            if is_add:
                g = umin(umax(rs, s), e)
                if pos < g:
                    sink_emit(k, pos, g - pos, t)
                    changed = True
                    pos = g
            a = umax(rs, s)
            b = umin(re, e)
            if a < b:
                if is_add:
                    nm = rm | t
                else:
                    nm = rm & ~t
                if nm != rm:
                    changed = True
                sink_emit(k, a, b - a, nm)
                pos = b
            a = umax(rs, e)
            if a < re:
                sink_emit(k, a, re - a, rm)
    if is_add and pos < e:
        sink_emit(k, pos, e - pos, t)
        changed = True
    sink_finish(k)
    return changed


cdef unsigned int block_or(const uint8_t *p, u64 base, u64 c0, u64 c1) noexcept nogil:
    """OR of the masks of the block's runs overlapping clusters c0..c1 (base <= c1)."""
    cdef unsigned int acc = 0, summ, i, bd
    cdef int n, ws, lo, hi, mid, wl, bi
    cdef u64 end, k, kend, rel = c1 - base, rs, common
    cdef const uint8_t *dl
    cdef const uint8_t *lp
    cdef const uint8_t *idx
    cdef const uint8_t *pal
    if p[11] == KIND_DENSE:
        end = b_common(p)          # span - 1
        k = c0 - base if c0 > base else 0
        kend = rel if rel < end else end
        if k > kend:
            return 0
        summ = b_summary(p)
        bd = bits_of(<u64>p[15] + 1)
        idx = b_idx(p)
        pal = b_pal(p)
        while k <= kend:
            i = getbits(idx, k, bd)
            if i:
                acc |= pal_get(pal, i - 1)
                if acc == summ:
                    break
            k += 1
        return acc
    n = p[10]
    ws = p[12]
    wl = p[13]
    dl = p + 16 + p[14] + 2 * <int>p[15]
    lp = dl + (n - 1) * ws
    pal = b_pal(p)
    bi = bits_of(p[15])
    idx = lp + n * wl
    common = b_common(p)
    # last run lo with start <= c1: deltas of runs 1..n-1 are ascending
    lo = 0
    hi = n - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if rd(dl + (mid - 1) * ws, ws) <= rel:
            lo = mid
        else:
            hi = mid - 1
    while lo >= 0:
        rs = base + (rd(dl + (lo - 1) * ws, ws) if lo > 0 else 0)
        if rs + (rd(lp + lo * wl, wl) if wl else common) + 1 <= c0:
            break
        acc |= pal_get(pal, getbits(idx, lo, bi) if bi else 0)
        if rs <= c0:
            break
        lo -= 1
    return acc


cdef struct Undo:
    Py_ssize_t first          # first index of the affected range of the top array
    Py_ssize_t n_cur          # its current length (new blocks and untouched originals)
    uint8_t **kept            # originals taken out, in order (PyMem, transient)
    Py_ssize_t nkept
    Py_ssize_t capkept
    Py_ssize_t kept_bytes
    uint8_t **newp            # blocks created by this add, ascending (PyMem, transient)
    Py_ssize_t nnew
    Py_ssize_t capnew


cdef Py_ssize_t newp_find(const Undo *u, const uint8_t *p) noexcept nogil:
    """Index of p in u.newp (sorted by base), or -1."""
    cdef Py_ssize_t lo = 0, hi = u.nnew, mid
    cdef u64 b = b_base(p)
    while lo < hi:
        mid = (lo + hi) >> 1
        if b_base(u.newp[mid]) < b:
            lo = mid + 1
        else:
            hi = mid
    if lo < u.nnew and u.newp[lo] == p:
        return lo
    return -1


cdef int ptr_push(uint8_t ***arr, Py_ssize_t *n, Py_ssize_t *cap, uint8_t *p) except -1:
    cdef uint8_t **na
    if n[0] == cap[0]:
        na = <uint8_t **>PyMem_Realloc(arr[0], (cap[0] * 2 + 8) * sizeof(uint8_t *))
        if na == NULL:
            raise MemoryError()
        arr[0] = na
        cap[0] = cap[0] * 2 + 8
    arr[0][n[0]] = p
    n[0] += 1
    return 0


cdef object _index(object x, str what):
    try:
        return _operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}") from None


cdef inline int to_ll(object o, long long *out, str what) except -1:
    cdef int overflow = 0
    cdef long long v
    if not PyLong_CheckExact(o):
        o = _index(o, what)
    v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow:
        raise RequestError(f"{what} {o:#x} outside the valid range 0..{INT64_MAX_C:#x}")
    out[0] = v
    return 0


cdef inline int get_range(object offset, object length, u64 *off, u64 *ln) except -1:
    cdef long long o, l
    to_ll(offset, &o, "offset")
    to_ll(length, &l, "length")
    if o < 0 or l < 0 or l > INT64_MAX_C - o:
        raise RequestError(f"invalid range offset={o:#x} length={l:#x}: needs offset >= 0, "
                           f"length >= 0 and offset+length <= {INT64_MAX_C:#x}")
    off[0] = <u64>o
    ln[0] = <u64>l
    return 0


cdef inline int get_mask(object x, str what) except -1:
    cdef long long v
    cdef int overflow = 0
    if not PyLong_CheckExact(x):
        x = _index(x, what)
    v = PyLong_AsLongLongAndOverflow(x, &overflow)
    if overflow or v < 0 or v > 0xFFFF:
        raise RequestError(f"{what} mask {x:#x} outside 0..0xffff")
    if v < 0 or v > 0xFFFF:
        raise RequestError(f"{what} mask {v:#x} outside 0..0xffff")
    return <int>v


cdef object validate_budget(object budget):
    if budget is None:
        return None
    b = _index(budget, "budget")
    if b < C_FIXED:
        raise RequestError(f"budget {b} is below the range map's fixed overhead "
                           f"FIXED_OVERHEAD={C_FIXED} bytes")
    return b


@cython.final
cdef class RangeMap:
    """Map from host clusters to a 16-bit mask of metadata types, with a memory budget.

    See the module docstring for the structure, the cost formula and the refusal semantics.
    ``cluster_size`` must be a power of two in 512..2 MiB; ``budget`` (bytes, ``None`` =
    unlimited) must be at least ``FIXED_OVERHEAD``; ``on_limit(start, length)`` is called once
    per newly unprotected byte range.
    """

    cdef int cbits
    cdef u64 csize
    cdef object _budget
    cdef bint has_budget
    cdef Py_ssize_t budget_c
    cdef object _on_limit
    cdef u64 *bases
    cdef uint8_t **blocks
    cdef Py_ssize_t nb
    cdef Py_ssize_t cap
    cdef Py_ssize_t nruns
    cdef Py_ssize_t blocks_bytes
    cdef u64 *un
    cdef Py_ssize_t nun

    def __cinit__(self):
        self.bases = NULL
        self.blocks = NULL
        self.un = NULL
        self.nb = 0
        self.cap = 0

    def __init__(self, cluster_size, budget=None, on_limit=None):
        cs = _index(cluster_size, "cluster_size")
        if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
            raise RequestError(f"cluster_size {cs} is not a power of two in 512..2097152")
        self.csize = cs
        self.cbits = cs.bit_length() - 1
        self.budget = budget
        self._on_limit = on_limit
        if self.un == NULL:
            self.un = <u64 *>PyMem_Malloc((C_UMAX + 1) * 16)
            if self.un == NULL:
                raise MemoryError()
        self._free_blocks()
        self.nun = 0

    def __dealloc__(self):
        self._free_blocks()
        PyMem_Free(self.un)

    cdef void _free_blocks(self) noexcept:
        cdef Py_ssize_t j
        for j in range(self.nb):
            PyMem_Free(self.blocks[j])
        PyMem_Free(self.bases)
        PyMem_Free(self.blocks)
        self.bases = NULL
        self.blocks = NULL
        self.nb = 0
        self.cap = 0
        self.nruns = 0
        self.blocks_bytes = 0

    # -- properties ------------------------------------------------------------------------
    @property
    def cluster_size(self):
        """The cluster size in bytes."""
        return self.csize

    @property
    def memory_used(self):
        """Bytes charged by the cost formula (FIXED_OVERHEAD included). O(1)."""
        return C_FIXED + C_TOP_ENTRY * self.cap + self.blocks_bytes

    @property
    def budget(self):
        """Memory cap in bytes or None.  Lowering it below ``memory_used`` drops nothing by
        itself; it only refuses future growth.  Raises RequestError below FIXED_OVERHEAD."""
        return self._budget

    @budget.setter
    def budget(self, value):
        b = validate_budget(value)
        self._budget = b
        self.has_budget = b is not None
        if b is not None:
            self.budget_c = b if b < (1 << 62) else (1 << 62)

    def __len__(self):
        """Number of maximal runs stored. O(1)."""
        return self.nruns

    cdef inline Py_ssize_t _used(self) noexcept:
        return C_FIXED + C_TOP_ENTRY * self.cap + self.blocks_bytes

    # -- queries ---------------------------------------------------------------------------
    cdef inline Py_ssize_t _upper(self, u64 c) noexcept nogil:
        """Number of blocks with base <= c."""
        cdef Py_ssize_t lo = 0, hi = self.nb, mid
        cdef const u64 *bs = self.bases
        while lo < hi:
            mid = (lo + hi) >> 1
            if bs[mid] <= c:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef unsigned int _check_c(self, u64 c0, u64 c1) noexcept nogil:
        """OR of the masks of clusters c0..c1 (inclusive)."""
        cdef Py_ssize_t j = self._upper(c1) - 1
        cdef unsigned int acc = 0
        cdef const uint8_t *p
        cdef u64 base
        cdef bint first = True
        while j >= 0:
            p = self.blocks[j]
            base = self.bases[j]
            if not first and base >= c0:
                # blocks before the last one end at or before the next base <= c1: inside
                acc |= b_summary(p)
            else:
                acc |= block_or(p, base, c0, c1)
            if base <= c0:
                break
            first = False
            j -= 1
        return acc

    def check(self, offset, length, ignore=0):
        """OR of the masks of the clusters overlapped by ``[offset, offset+length)``, minus
        ``ignore``; 0 = free.  Never allocates.  O(log n) within one block, O(log n + k)."""
        cdef u64 off, ln
        cdef unsigned int ign
        if PyLong_CheckExact(ignore) and ignore == 0:
            ign = 0
        else:
            ign = get_mask(ignore, "ignore")
        get_range(offset, length, &off, &ln)
        if ln == 0 or self.nb == 0:
            return 0
        return self._check_c(off >> self.cbits, (off + ln - 1) >> self.cbits) & ~ign

    def first_overlap(self, offset, length, ignore=0):
        """(host_offset of the first overlapped cluster whose mask is not all ignored, that
        mask & ~ignore), or None.  For error messages.  O(log n + k)."""
        cdef u64 off, ln, c0, c1, rs, rl
        cdef unsigned int ign = get_mask(ignore, "ignore"), rm
        get_range(offset, length, &off, &ln)
        if ln == 0:
            return None
        c0 = off >> self.cbits
        c1 = (off + ln - 1) >> self.cbits
        cdef Py_ssize_t j = self._upper(c0) - 1
        cdef RunIter it
        cdef const uint8_t *p
        if j < 0:
            j = 0
        while j < self.nb and self.bases[j] <= c1:
            p = self.blocks[j]
            if b_end(p) > c0 and (b_summary(p) & ~ign):
                it_init(&it, p)
                while it_next(&it, &rs, &rl, &rm):
                    if rs > c1:
                        break
                    if rs + rl > c0 and (rm & ~ign):
                        return (umax(rs, c0) << self.cbits, rm & ~ign)
            j += 1
        return None

    def runs(self):
        """Iterator over maximal runs ``(start_byte, length_bytes, mask)``, ascending."""
        out = []
        cdef RunIter it
        cdef u64 s, l
        cdef unsigned int m
        cdef Py_ssize_t j
        for j in range(self.nb):
            it_init(&it, self.blocks[j])
            while it_next(&it, &s, &l, &m):
                out.append((s << self.cbits, l << self.cbits, m))
        return iter(out)

    def unprotected(self):
        """Merged ascending ``(start, length)`` byte ranges no longer guaranteed."""
        return [(self.un[2 * i], self.un[2 * i + 1] - self.un[2 * i]) for i in range(self.nun)]

    # -- mutations -------------------------------------------------------------------------
    def add(self, offset, length, types):
        """OR ``types`` into every cluster of the (widened) range.  Returns False if refused
        (the range is then unprotected).  O(log n + B) per touched block."""
        cdef u64 off, ln
        get_range(offset, length, &off, &ln)
        cdef unsigned int t = get_mask(types, "types")
        if ln == 0 or t == 0:
            return True
        return self._apply(off, ln, t, True)

    def remove(self, offset, length, types):
        """Clear ``types`` in every cluster of the (widened) range.  Returns False if refused
        (the affected blocks were dropped and are unprotected)."""
        cdef u64 off, ln
        get_range(offset, length, &off, &ln)
        cdef unsigned int t = get_mask(types, "types")
        if ln == 0 or t == 0:
            return True
        return self._apply(off, ln, t, False)

    def clear(self):
        """Forget every run and the unprotected set. O(n)."""
        self._free_blocks()
        self.nun = 0

    # -- internals -------------------------------------------------------------------------
    cdef Py_ssize_t _first_touching(self, u64 s) noexcept:
        cdef Py_ssize_t j = self._upper(s) - 1
        if j >= 0 and b_end(self.blocks[j]) >= s:
            return j
        return j + 1

    cdef Py_ssize_t _next_piece(self, u64 s, u64 c1, Py_ssize_t *pi1, u64 *pe) noexcept:
        """i0 (and i1, e): the piece [s, e) and the blocks i0..i1 it touches (at most 3)."""
        cdef Py_ssize_t i0 = self._first_touching(s), i = i0, i1
        cdef u64 e
        while i < self.nb and self.bases[i] <= c1 and i - i0 < 4:
            i += 1
        if i - i0 >= 4:
            e = b_end(self.blocks[i0 + 1])
        else:
            e = c1
        i1 = i0 - 1
        while i1 + 1 < self.nb and self.bases[i1 + 1] <= e:
            i1 += 1
        pi1[0] = i1
        pe[0] = e
        return i0

    cdef object _apply(self, u64 off, u64 ln, unsigned int t, bint is_add):
        cdef u64 c0 = off >> self.cbits
        cdef u64 c1 = (off + ln + self.csize - 1) >> self.cbits
        cdef u64 s = c0, e, lo = c0, hi = c1
        cdef u64 dlo, dhi
        cdef Py_ssize_t i0, i1, j
        cdef bint refused = False
        cdef int r
        cdef Undo undo
        cdef Undo *keep = NULL
        cdef uint8_t **orig = NULL
        cdef Py_ssize_t norig = 0, caporig = 0, a, b2
        cdef uint8_t **merged
        undo.kept = NULL
        undo.newp = NULL
        try:
            while s < c1:
                i0 = self._next_piece(s, c1, &i1, &e)
                if keep == NULL and is_add and e < c1:
                    # a wide add: keep the original blocks until it commits, so that a refusal
                    # can restore them (nothing of a refused add is stored)
                    keep = &undo
                    keep.first = i0 - 1 if (i0 > i1 and i0 > 0) else i0
                    keep.n_cur = 0
                    keep.nkept = 0
                    keep.capkept = 0
                    keep.kept_bytes = 0
                    keep.nnew = 0
                    keep.capnew = 0
                r = self._piece(s, e, t, is_add, i0, i1, &dlo, &dhi, keep)
                if r:
                    refused = True
                    if is_add:
                        break
                    lo = umin(lo, dlo)
                    hi = umax(hi, dhi)
                s = e
            if keep != NULL:
                if refused:
                    # abort: put the originals back (merged by base), free the new blocks
                    for j in range(keep.first, keep.first + keep.n_cur):
                        if newp_find(keep, self.blocks[j]) < 0:
                            ptr_push(&orig, &norig, &caporig, self.blocks[j])
                    merged = <uint8_t **>PyMem_Malloc((norig + keep.nkept + 1) * sizeof(uint8_t *))
                    if merged == NULL:
                        raise MemoryError()
                    a = 0
                    b2 = 0
                    for j in range(norig + keep.nkept):
                        if b2 >= keep.nkept or (a < norig and b_base(orig[a]) < b_base(keep.kept[b2])):
                            merged[j] = orig[a]
                            a += 1
                        else:
                            merged[j] = keep.kept[b2]
                            b2 += 1
                    try:
                        self._splice(keep.first, keep.first + keep.n_cur - 1, merged,
                                     norig + keep.nkept, False)
                    finally:
                        PyMem_Free(merged)
                    for j in range(keep.nnew):
                        PyMem_Free(keep.newp[j])
                    keep.nnew = 0
                else:
                    for j in range(keep.nkept):
                        PyMem_Free(keep.kept[j])
                keep.nkept = 0
        finally:
            if keep != NULL:
                for j in range(keep.nkept):   # only on an exception: do not leak
                    PyMem_Free(keep.kept[j])
                PyMem_Free(keep.kept)
                PyMem_Free(keep.newp)
            PyMem_Free(orig)
        if refused:
            self._mark(lo << self.cbits, hi << self.cbits)
            return False
        return True

    cdef int _resize_top(self, Py_ssize_t nb_new) except -1:
        cdef Py_ssize_t ncap = top_cap(nb_new)
        cdef u64 *nbases
        cdef uint8_t **nblocks
        if ncap == self.cap:
            return 0
        if ncap == 0:
            PyMem_Free(self.bases)
            PyMem_Free(self.blocks)
            self.bases = NULL
            self.blocks = NULL
            self.cap = 0
            return 0
        nbases = <u64 *>PyMem_Realloc(self.bases, ncap * sizeof(u64))
        if nbases == NULL:
            raise MemoryError()
        self.bases = nbases
        nblocks = <uint8_t **>PyMem_Realloc(self.blocks, ncap * sizeof(uint8_t *))
        if nblocks == NULL:
            raise MemoryError()
        self.blocks = nblocks
        self.cap = ncap
        return 0

    cdef int _splice(self, Py_ssize_t i0, Py_ssize_t i1, uint8_t **made, Py_ssize_t k,
                     bint free_old) except -1:
        """Take blocks i0..i1 out (freeing them if free_old) and put the k new blocks there."""
        cdef Py_ssize_t j, nold = i1 - i0 + 1, nb_new = self.nb - nold + k
        cdef Py_ssize_t tail = self.nb - (i1 + 1)
        for j in range(i0, i1 + 1):
            self.blocks_bytes -= b_size(self.blocks[j])
            self.nruns -= b_n(self.blocks[j])
            if free_old:
                PyMem_Free(self.blocks[j])
        if k < nold:
            memmove(self.bases + i0 + k, self.bases + i1 + 1, tail * sizeof(u64))
            memmove(self.blocks + i0 + k, self.blocks + i1 + 1, tail * sizeof(uint8_t *))
            self.nb = nb_new
            self._resize_top(nb_new)
        elif k > nold:
            self._resize_top(nb_new)
            memmove(self.bases + i0 + k, self.bases + i1 + 1, tail * sizeof(u64))
            memmove(self.blocks + i0 + k, self.blocks + i1 + 1, tail * sizeof(uint8_t *))
            self.nb = nb_new
        for j in range(k):
            self.blocks[i0 + j] = made[j]
            self.bases[i0 + j] = b_base(made[j])
            self.blocks_bytes += b_size(made[j])
            self.nruns += b_n(made[j])
        return 0

    cdef int _piece(self, u64 s, u64 e, unsigned int t, bint is_add, Py_ssize_t i0,
                    Py_ssize_t i1, u64 *dlo, u64 *dhi, Undo *keep) except -1:
        """Apply the edit of [s, e) to blocks i0..i1.  0 = done; 1 = refused (for a remove the
        region was dropped and [dlo, dhi) is its hull)."""
        cdef Py_ssize_t nb = self.nb, n, j, new_bytes, nb_new, used, top_delta, old_end, pos
        cdef Py_ssize_t need
        cdef Sink k
        cdef bint changed, extended = False, final
        cdef int nchunks, c, q, rr
        cdef uint8_t *made[MAX_CHUNKS]
        cdef uint8_t *dead[8]
        cdef int ndead = 0
        if i0 > i1:
            if not is_add:
                return 0
            if nb == 0:
                pass
            elif i0 > 0:
                i0 = i0 - 1
                i1 = i0
            else:
                i0 = 0
                i1 = 0
        while True:
            sink_start(&k, SINK_COUNT)
            changed = run_edit(self.blocks, i0, i1, s, e, t, is_add, &k)
            if not changed:
                return 0
            n = k.count
            if 0 < n < C_MIN_FILL and i1 < nb - 1 and not extended:
                i1 += 1
                extended = True
                continue
            break
        final = i1 >= nb - 1
        nchunks = <int>((n + C_B - 1) // C_B)
        if nchunks > MAX_CHUNKS:
            raise AssertionError("piece produced too many blocks")
        if nchunks:
            if final:
                for c in range(nchunks - 1):
                    k.sizes[c] = C_B
                k.sizes[nchunks - 1] = <int>(n - (nchunks - 1) * C_B)
            else:
                q = <int>(n // nchunks)
                rr = <int>(n % nchunks)
                for c in range(nchunks):
                    k.sizes[c] = q + 1 if c < rr else q
        k.nchunks = nchunks
        for c in range(nchunks):
            chunk_init(&k.ch[c])
        sink_start(&k, SINK_INFO)
        run_edit(self.blocks, i0, i1, s, e, t, is_add, &k)
        new_bytes = 0
        for c in range(nchunks):
            new_bytes += k.ch[c].e.size
        nb_new = nb - (i1 - i0 + 1) + nchunks
        used = self._used()
        top_delta = C_TOP_ENTRY * (top_cap(nb_new) - top_cap(nb))
        # the new blocks are built while the old ones still exist: charge that peak
        need = used + new_bytes + (top_delta if top_delta > 0 else 0)
        if keep != NULL:
            need += keep.kept_bytes
        if self.has_budget and need > self.budget_c:
            if is_add:
                return 1
            dlo[0] = umin(s, self.bases[i0])
            dhi[0] = umax(e, b_end(self.blocks[i1]))
            self._splice(i0, i1, made, 0, True)
            return 1
        for c in range(nchunks):
            k.ch[c].blk = <uint8_t *>PyMem_Malloc(k.ch[c].e.size)
            if k.ch[c].blk == NULL:
                for j in range(c):
                    PyMem_Free(k.ch[j].blk)
                raise MemoryError()
        sink_start(&k, SINK_ENCODE)
        run_edit(self.blocks, i0, i1, s, e, t, is_add, &k)
        for c in range(nchunks):
            made[c] = k.ch[c].blk
        if keep != NULL:
            if i0 < keep.first:
                raise AssertionError("wide add piece before the affected range")
            for j in range(i0, i1 + 1):
                pos = newp_find(keep, self.blocks[j])
                if pos >= 0:
                    memmove(keep.newp + pos, keep.newp + pos + 1,
                            (keep.nnew - pos - 1) * sizeof(uint8_t *))
                    keep.nnew -= 1
                    dead[ndead] = self.blocks[j]
                    ndead += 1
                else:
                    ptr_push(&keep.kept, &keep.nkept, &keep.capkept, self.blocks[j])
                    keep.kept_bytes += b_size(self.blocks[j])
            old_end = keep.first + keep.n_cur
            if old_end > i1 + 1:
                keep.n_cur = old_end + nchunks - (i1 - i0 + 1) - keep.first
            else:
                keep.n_cur = i0 + nchunks - keep.first
            # insert the new blocks into newp (sorted by base)
            for c in range(nchunks):
                ptr_push(&keep.newp, &keep.nnew, &keep.capnew, made[c])
                pos = keep.nnew - 1
                while pos > 0 and b_base(keep.newp[pos - 1]) > b_base(made[c]):
                    keep.newp[pos] = keep.newp[pos - 1]
                    pos -= 1
                keep.newp[pos] = made[c]
            self._splice(i0, i1, made, nchunks, False)
            for j in range(ndead):
                PyMem_Free(dead[j])
        else:
            self._splice(i0, i1, made, nchunks, True)
        return 0

    cdef _mark(self, u64 lo, u64 hi):
        """Add [lo, hi) (bytes) to the unprotected set; report the newly covered parts.
        Works in the fixed arrays: no allocation unless on_limit is set."""
        cdef u64 parts[2 * (C_UMAX + 4)]
        cdef int np = 0
        cdef Py_ssize_t i = 0, j, nun = self.nun, best
        cdef u64 *un = self.un
        cdef u64 cur = lo, nlo = lo, nhi = hi, a, b, gap, g
        while i < nun and un[2 * i + 1] < lo:
            i += 1
        j = i
        while j < nun and un[2 * j] <= hi:
            a = un[2 * j]
            b = un[2 * j + 1]
            if a > cur:
                parts[2 * np] = cur
                parts[2 * np + 1] = umin(a, hi)
                np += 1
            cur = umax(cur, b)
            nlo = umin(nlo, a)
            nhi = umax(nhi, b)
            j += 1
        if cur < hi:
            parts[2 * np] = cur
            parts[2 * np + 1] = hi
            np += 1
        memmove(un + 2 * (i + 1), un + 2 * j, (nun - j) * 2 * sizeof(u64))
        un[2 * i] = nlo
        un[2 * i + 1] = nhi
        nun = nun - (j - i) + 1
        if nun > C_UMAX:
            best = 0
            gap = un[2] - un[1]
            for i in range(1, nun - 1):
                g = un[2 * i + 2] - un[2 * i + 1]
                if g < gap:
                    gap = g
                    best = i
            parts[2 * np] = un[2 * best + 1]
            parts[2 * np + 1] = un[2 * best + 2]
            np += 1
            un[2 * best + 1] = un[2 * best + 3]
            memmove(un + 2 * (best + 1), un + 2 * (best + 2), (nun - best - 2) * 2 * sizeof(u64))
            nun -= 1
        self.nun = nun
        cb = self._on_limit
        if cb is not None:
            for i in range(np):
                cb(parts[2 * i], parts[2 * i + 1] - parts[2 * i])

    def _check(self):
        """Verify every internal invariant (re-encodes every block and compares the bytes);
        raises AssertionError. O(n)."""
        cdef Py_ssize_t j, total = 0, nruns = 0, cnt
        cdef RunIter it
        cdef u64 s, l, prev_end = 0
        cdef unsigned int m, prev_mask = 0, summ
        cdef bint have_prev = False
        cdef Chunk ch
        cdef uint8_t *tmp
        cdef int ii
        cdef u64 *ts
        cdef u64 *tl
        cdef uint16_t *tm
        cdef const uint8_t *p
        assert 0 <= self.nb <= self.cap, (self.nb, self.cap)
        assert self.cap == top_cap(self.nb), (self.cap, self.nb)
        ts = <u64 *>PyMem_Malloc(C_B * 18)
        if ts == NULL:
            raise MemoryError()
        tl = ts + C_B
        tm = <uint16_t *>(tl + C_B)
        try:
            for j in range(self.nb):
                p = self.blocks[j]
                assert p != NULL
                assert p[11] in (KIND_RUNS, KIND_DENSE), p[11]
                assert 1 <= b_n(p) <= C_B, b_n(p)
                if j < self.nb - 1:
                    assert b_n(p) >= C_MIN_FILL, (j, b_n(p))
                assert self.bases[j] == b_base(p)
                it_init(&it, p)
                cnt = 0
                summ = 0
                while it_next(&it, &s, &l, &m):
                    assert cnt < C_B, "block decodes to too many runs"
                    assert l >= 1 and 0 < m <= 0xFFFF
                    assert ((s + l) << self.cbits) <= (1ULL << 63) and (s + l) >> 55 == 0
                    if have_prev:
                        assert s >= prev_end, "runs overlap or are not ascending"
                        assert not (s == prev_end and m == prev_mask), "unmerged runs"
                    have_prev = True
                    prev_end = s + l
                    prev_mask = m
                    ts[cnt] = s
                    tl[cnt] = l
                    tm[cnt] = m
                    summ |= m
                    cnt += 1
                assert cnt == b_n(p), (cnt, b_n(p))
                assert summ == b_summary(p)
                assert b_end(p) == ts[cnt - 1] + tl[cnt - 1]
                chunk_init(&ch)
                for ii in range(cnt):
                    chunk_add(&ch, ts[ii], tl[ii], tm[ii])
                finish_info(&ch)
                assert ch.e.size == b_size(p), (ch.e.size, b_size(p))
                assert ch.e.kind == p[11]
                tmp = <uint8_t *>PyMem_Malloc(ch.e.size)
                if tmp == NULL:
                    raise MemoryError()
                enc_header(tmp, &ch)
                for ii in range(cnt):
                    enc_run(tmp, &ch, ii, ts[ii], tl[ii], tm[ii])
                same = memcmp(tmp, p, ch.e.size) == 0
                PyMem_Free(tmp)
                assert same, f"block {j} is not the canonical encoding of its runs"
                total += ch.e.size
                nruns += cnt
        finally:
            PyMem_Free(ts)
        assert nruns == self.nruns, (nruns, self.nruns)
        assert total == self.blocks_bytes, (total, self.blocks_bytes)
        assert 0 <= self.nun <= C_UMAX
        for j in range(self.nun):
            assert self.un[2 * j] < self.un[2 * j + 1] <= (1ULL << 63)
            if j:
                assert self.un[2 * j - 1] < self.un[2 * j]
        if self._budget is not None:
            assert self._budget >= C_FIXED
