"""Behaviour of the overlap RangeMap (both implementations), against /tmp/brief/rangemap.md.

Every test runs on the Cython map and on its pure-Python twin through the ``rangemap_cls``
fixture (tests/conftest.py). Mutations are followed by ``_check()`` and ``memory_used <= budget``
through :func:`ck`. Nothing here measures time.

Conventions: masks are plain ints (bit n = QEMU's QCOW2_OL_* bit n); ``cs`` is the cluster size.
"""

from __future__ import annotations

import gc
import importlib
import os
import random
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcow2.errors import Qcow2Error, RequestError

from conftest import rangemap_module

A, B, C, D = 1 << 2, 1 << 4, 1 << 1, 1 << 7  # active-l2, refcount-block, active-l1, inactive-l2
INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# helpers


def fixed_overhead(cls) -> int:
    return importlib.import_module(cls.__module__).FIXED_OVERHEAD


class Limits:
    """on_limit recorder."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start, length):
        assert isinstance(start, int) and isinstance(length, int)
        self.calls.append((start, length))


def ck(m, *, cap: int | None = None):
    """Invariants after a mutation: _check(), memory_used <= budget (or <= cap after a budget
    was lowered below usage), runs() well formed and consistent with len(), unprotected() merged."""
    m._check()
    if m.budget is not None:
        assert m.memory_used <= max(m.budget, cap or 0), (m.memory_used, m.budget, cap)
    runs = list(m.runs())
    assert len(m) == len(runs)
    prev_end = None
    prev_mask = None
    for start, length, mask in runs:
        assert length > 0 and 0 < mask <= 0xFFFF
        if prev_end is not None:
            assert start >= prev_end, "runs not ascending / overlapping"
            assert not (start == prev_end and mask == prev_mask), "adjacent equal runs not merged"
        prev_end, prev_mask = start + length, mask
    un = m.unprotected()
    for (s0, l0), (s1, _l1) in zip(un, un[1:]):
        assert s0 + l0 < s1, f"unprotected() not merged/sorted: {un}"
    for s, ln in un:
        assert s >= 0 and ln > 0
    return runs


def cruns(m, cs):
    """runs() as (start_cluster, nb_clusters, mask), checking cluster alignment."""
    out = []
    for start, length, mask in m.runs():
        assert start % cs == 0 and length % cs == 0, (start, length, cs)
        out.append((start // cs, length // cs, mask))
    return out


def covered(intervals, start, length) -> bool:
    """Is [start, start+length) inside the union of the (merged) intervals?"""
    for s, ln in intervals:
        if s <= start and start + length <= s + ln:
            return True
    return False


def union_size(intervals) -> int:
    return sum(ln for _s, ln in merge(intervals))


def merge(intervals):
    out: list[list[int]] = []
    for s, ln in sorted(intervals):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], s + ln - out[-1][0])
        else:
            out.append([s, ln])
    return [tuple(x) for x in out]


def lowered(cls, cs=512, *, n=8, stride=64):
    """A map with a few runs whose budget was then lowered to FIXED_OVERHEAD: every growth is
    refused from now on (lowering never drops anything by itself)."""
    lim = Limits()
    m = cls(cs, on_limit=lim)
    for i in range(n):
        assert m.add(i * stride * cs, 2 * cs, A)
    before = list(m.runs())
    used = m.memory_used
    m.budget = fixed_overhead(cls)
    assert list(m.runs()) == before, "lowering the budget dropped runs"
    assert m.memory_used == used
    return m, lim, used


# ---------------------------------------------------------------------------------------------
# construction, constants


def test_fixed_overhead_identical_in_both_implementations():
    c = rangemap_module("c-extension")
    p = rangemap_module("pure-python")
    assert isinstance(p.FIXED_OVERHEAD, int) and p.FIXED_OVERHEAD > 0
    assert c.FIXED_OVERHEAD == p.FIXED_OVERHEAD


def test_empty_map(rangemap_cls):
    m = rangemap_cls(512)
    assert len(m) == 0
    assert list(m.runs()) == []
    assert m.check(0, 1 << 40) == 0
    assert m.first_overlap(0, 1 << 40) is None
    assert m.unprotected() == []
    assert m.budget is None
    assert m.memory_used == fixed_overhead(rangemap_cls)
    m._check()


@pytest.mark.parametrize("cs", [512, 1024, 4096, 65536, 1 << 20, 2 << 20])
def test_valid_cluster_sizes(rangemap_cls, cs):
    m = rangemap_cls(cs)
    assert m.add(3 * cs + 1, 1, A)
    assert cruns(m, cs) == [(3, 1, A)]
    assert m.check(3 * cs, 1) == A and m.check(4 * cs, cs) == 0


@pytest.mark.parametrize("cs", [0, -512, 1, 256, 511, 513, 768, 3 * 512, 4 << 20, 1 << 30, 1 << 64])
def test_bad_cluster_size(rangemap_cls, cs):
    with pytest.raises(RequestError):
        rangemap_cls(cs)


@pytest.mark.parametrize("cs", [512.0, "512", None])
def test_cluster_size_wrong_python_type(rangemap_cls, cs):
    with pytest.raises((TypeError, RequestError)):
        rangemap_cls(cs)


def test_budget_below_fixed_overhead_names_both_numbers(rangemap_cls):
    fo = fixed_overhead(rangemap_cls)
    for bad in (fo - 1, 0, -1):
        with pytest.raises(RequestError) as ei:
            rangemap_cls(512, budget=bad)
        msg = str(ei.value)
        assert str(bad) in msg or hex(bad) in msg, msg
        assert str(fo) in msg or hex(fo) in msg, msg
    m = rangemap_cls(512, budget=fo)  # exactly the overhead is accepted
    assert m.budget == fo and m.memory_used == fo
    ck(m)


def test_budget_setter_validates(rangemap_cls):
    fo = fixed_overhead(rangemap_cls)
    m = rangemap_cls(512, budget=fo + 1000)
    with pytest.raises(RequestError):
        m.budget = fo - 1
    assert m.budget == fo + 1000
    m.budget = None
    assert m.budget is None
    m.budget = fo
    assert m.budget == fo


def test_errors_are_valueerrors():
    assert issubclass(RequestError, ValueError) and issubclass(RequestError, Qcow2Error)


# ---------------------------------------------------------------------------------------------
# input validation on add/remove/check/first_overlap

BAD_RANGES = [
    (-1, 512), (0, -1), (-(1 << 64), 512), (512, -(1 << 64)),
    (INT64_MAX, 1), (1, INT64_MAX), (1 << 62, 1 << 62), (1 << 63, 0), (1 << 64, 512),
    (0, 1 << 64), (INT64_MAX - 511, 513),
]


def _call(m, op, offset, length):
    if op == "add":
        return m.add(offset, length, A)
    if op == "remove":
        return m.remove(offset, length, A)
    if op == "check":
        return m.check(offset, length)
    return m.first_overlap(offset, length)


@pytest.mark.parametrize("op", ["add", "remove", "check", "first_overlap"])
@pytest.mark.parametrize("offset,length", BAD_RANGES)
def test_bad_ranges_raise_requesterror(rangemap_cls, op, offset, length):
    m = rangemap_cls(512)
    m.add(0, 4096, B)
    before = list(m.runs())
    with pytest.raises(RequestError):
        _call(m, op, offset, length)
    assert list(m.runs()) == before
    ck(m)


@pytest.mark.parametrize("op", ["add", "remove", "check", "first_overlap"])
@pytest.mark.parametrize("offset,length",
                         [(1.0, 512), (0, 512.0), ("0", 512), (None, 512), (0, None)])
def test_wrong_python_types_raise(rangemap_cls, op, offset, length):
    m = rangemap_cls(512)
    with pytest.raises((TypeError, RequestError)):
        _call(m, op, offset, length)
    ck(m)


@pytest.mark.parametrize("op", ["add", "remove"])
@pytest.mark.parametrize("types", [-1, 0x10000, 1 << 16 | 1, 1 << 63, 1 << 64, -(1 << 64)])
def test_bad_type_masks(rangemap_cls, op, types):
    m = rangemap_cls(512)
    with pytest.raises(RequestError):
        getattr(m, op)(0, 512, types)
    assert len(m) == 0
    ck(m)


@pytest.mark.parametrize("op", ["add", "remove"])
@pytest.mark.parametrize("types", [1.0, "1", None])
def test_type_mask_wrong_python_type(rangemap_cls, op, types):
    m = rangemap_cls(512)
    with pytest.raises((TypeError, RequestError)):
        getattr(m, op)(0, 512, types)
    assert len(m) == 0


def test_valid_edge_values_do_not_raise(rangemap_cls):
    m = rangemap_cls(512)
    assert m.check(0, INT64_MAX) == 0
    assert m.check(INT64_MAX, 0) == 0
    assert m.check(INT64_MAX - 1, 1) == 0
    assert m.first_overlap(0, INT64_MAX) is None
    assert m.add(0, 512, 0xFFFF)
    assert m.check(0, INT64_MAX) == 0xFFFF
    assert m.check(0, 1, ignore=0xFFFF) == 0
    ck(m)


def test_zero_length_is_noop(rangemap_cls):
    m = rangemap_cls(512)
    assert m.add(4096, 0, A) is True
    assert len(m) == 0
    assert m.add(0, 8192, A)
    assert m.remove(4096, 0, A) is True
    assert m.check(4096, 0) == 0
    assert m.first_overlap(4096, 0) is None
    assert cruns(m, 512) == [(0, 16, A)]
    assert m.add(INT64_MAX, 0, A) is True  # offset at the limit, zero length: valid
    ck(m)


def test_types_zero_stores_nothing(rangemap_cls):
    m = rangemap_cls(512)
    assert m.add(0, 8192, 0) is True
    assert len(m) == 0 and m.check(0, 8192) == 0
    assert m.memory_used == fixed_overhead(rangemap_cls)
    assert m.add(0, 512, A) and m.remove(0, 512, 0) is True
    assert cruns(m, 512) == [(0, 1, A)]
    ck(m)


def test_last_cluster_below_int64_max(rangemap_cls):
    cs = 2 << 20
    m = rangemap_cls(cs)
    last = INT64_MAX // cs  # index of the cluster holding byte 2^63-1
    assert m.add(INT64_MAX - 1, 1, A)
    ck(m)
    assert m.check(last * cs, 1) == A
    assert m.check(INT64_MAX - 1, 1) == A
    assert m.check(last * cs - 1, 1) == 0
    assert m.first_overlap(0, INT64_MAX) == (last * cs, A)
    assert m.remove(last * cs, INT64_MAX - last * cs, A)
    assert len(m) == 0
    ck(m)


# ---------------------------------------------------------------------------------------------
# semantics


@pytest.mark.parametrize("cs", [512, 65536])
@pytest.mark.parametrize("offset,length,first,nb", [
    (0, 1, 0, 1), (1, 1, 0, 1), (-1, 1, 0, 1),  # -1: cs-1
    (0, "cs", 0, 1), (0, "cs+1", 0, 2), (-1, 2, 0, 2), (1, "2*cs", 0, 3),
    ("3*cs", "cs", 3, 1), ("3*cs+7", "5*cs-7", 3, 5), ("3*cs+7", "5*cs-6", 3, 6),
])
def test_add_widens_to_whole_clusters(rangemap_cls, cs, offset, length, first, nb):
    def ev(x):
        if isinstance(x, str):
            return eval(x, {"cs": cs})
        return cs - 1 if x == -1 else x
    m = rangemap_cls(cs)
    assert m.add(ev(offset), ev(length), A)
    ck(m)
    assert cruns(m, cs) == [(first, nb, A)]
    assert m.check(first * cs, 1) == A and m.check((first + nb) * cs - 1, 1) == A
    if first:
        assert m.check(first * cs - 1, 1) == 0
    assert m.check((first + nb) * cs, 1) == 0


@pytest.mark.parametrize("cs", [512, 4096])
def test_check_widens_to_whole_clusters(rangemap_cls, cs):
    m = rangemap_cls(cs)
    m.add(10 * cs, cs, A)
    assert m.check(10 * cs + cs - 1, 1) == A       # last byte of the cluster
    assert m.check(9 * cs + cs - 1, 2) == A        # straddles into it
    assert m.check(9 * cs, cs) == 0                # ends exactly at its start
    assert m.check(11 * cs, cs) == 0               # starts exactly at its end
    assert m.check(9 * cs + 1, cs) == A            # partial overlap of one byte
    assert m.check(0, 100 * cs) == A
    assert m.first_overlap(9 * cs + 1, cs) == (10 * cs, A)


def test_types_are_ored(rangemap_cls):
    m = rangemap_cls(512)
    assert m.add(0, 4 * 512, A)
    assert m.add(2 * 512, 4 * 512, B)
    assert m.add(3 * 512, 512, C | A)
    ck(m)
    assert cruns(m, 512) == [(0, 2, A), (2, 1, A | B), (3, 1, A | B | C), (4, 2, B)]
    assert m.check(0, 6 * 512) == A | B | C
    assert m.check(0, 512) == A
    assert m.add(0, 6 * 512, A)  # idempotent on already-set bits
    ck(m)
    assert cruns(m, 512) == [(0, 2, A), (2, 1, A | B), (3, 1, A | B | C), (4, 2, A | B)]
    assert m.check(5 * 512, 1) == A | B


def test_ignore_mask(rangemap_cls):
    m = rangemap_cls(512)
    m.add(0, 512, A | B)
    m.add(512, 512, C)
    assert m.check(0, 1024, ignore=A) == B | C
    assert m.check(0, 1024, ignore=A | B) == C
    assert m.check(0, 512, ignore=A | B) == 0
    assert m.check(0, 1024, ignore=0xFFFF) == 0
    assert m.check(0, 1024, ignore=D) == A | B | C
    # first_overlap skips clusters whose whole mask is ignored
    assert m.first_overlap(0, 1024, ignore=A | B) == (512, C)
    assert m.first_overlap(0, 1024, ignore=A) == (0, B)
    assert m.first_overlap(0, 1024, ignore=0xFFFF) is None


def test_remove_some_bits_keeps_others(rangemap_cls):
    m = rangemap_cls(512)
    m.add(0, 8 * 512, A | B | C)
    assert m.remove(0, 8 * 512, B)
    ck(m)
    assert cruns(m, 512) == [(0, 8, A | C)]
    assert m.remove(2 * 512, 512, A)
    ck(m)
    assert cruns(m, 512) == [(0, 2, A | C), (2, 1, C), (3, 5, A | C)]
    assert m.remove(0, 8 * 512, D)  # bits not present: no change
    assert cruns(m, 512) == [(0, 2, A | C), (2, 1, C), (3, 5, A | C)]
    assert m.remove(0, 8 * 512, C)
    ck(m)
    assert cruns(m, 512) == [(0, 2, A), (3, 5, A)]
    assert m.remove(0, 8 * 512, A)
    assert len(m) == 0 and m.check(0, 1 << 30) == 0
    ck(m)


def test_remove_widens_too(rangemap_cls):
    m = rangemap_cls(512)
    m.add(0, 10 * 512, A)
    assert m.remove(2 * 512 + 100, 1, A)   # whole cluster 2
    ck(m)
    assert cruns(m, 512) == [(0, 2, A), (3, 7, A)]


def test_merge_and_split_of_runs(rangemap_cls):
    m = rangemap_cls(512)
    m.add(0, 10 * 512, A)
    m.add(10 * 512, 10 * 512, A)        # touching, same mask: one run
    ck(m)
    assert len(m) == 1 and cruns(m, 512) == [(0, 20, A)]
    m.add(20 * 512, 512, B)             # touching, other mask: two runs
    assert len(m) == 2
    m.remove(5 * 512, 512, A)           # split
    ck(m)
    assert cruns(m, 512) == [(0, 5, A), (6, 14, A), (20, 1, B)]
    m.add(5 * 512, 512, B)              # fill the hole with another mask
    ck(m)
    assert cruns(m, 512) == [(0, 5, A), (5, 1, B), (6, 14, A), (20, 1, B)]
    m.remove(5 * 512, 512, B)
    m.add(5 * 512, 512, A)              # refill: merges back into one run
    ck(m)
    assert cruns(m, 512) == [(0, 20, A), (20, 1, B)]
    m.add(20 * 512, 512, A)             # B cluster becomes A|B: no merge
    assert cruns(m, 512) == [(0, 20, A), (20, 1, A | B)]
    m.remove(20 * 512, 512, B)          # becomes A: merges
    ck(m)
    assert cruns(m, 512) == [(0, 21, A)]


def test_many_runs_split_and_merge_blocks(rangemap_cls):
    """Enough runs to need several blocks; then merge them all away again."""
    m = rangemap_cls(512)
    n = 2000
    for i in range(n):
        assert m.add(2 * i * 512, 512, A if i % 3 else B)
    ck(m)
    assert len(m) == n
    for i in range(n - 1):          # fill the gaps with A: runs merge progressively
        m.add((2 * i + 1) * 512, 512, A)
        if i % 250 == 0:
            ck(m)
    ck(m)
    per = {}
    for i in range(n):
        per[2 * i] = A if i % 3 else B
        if i < n - 1:
            per[2 * i + 1] = A
    assert cruns(m, 512) == runs_of(per)
    for c in range(2 * n - 1):
        m.remove(c * 512, 512, A | B)
    ck(m)
    assert len(m) == 0
    assert m.memory_used == fixed_overhead(type(m))


def runs_of(per: dict[int, int]):
    out: list[list[int]] = []
    for c in sorted(per):
        mask = per[c]
        if not mask:
            continue
        if out and out[-1][0] + out[-1][1] == c and out[-1][2] == mask:
            out[-1][1] += 1
        else:
            out.append([c, 1, mask])
    return [tuple(x) for x in out]


def test_first_overlap(rangemap_cls):
    cs = 4096
    m = rangemap_cls(cs)
    m.add(5 * cs, 3 * cs, A)
    m.add(6 * cs, cs, B)
    m.add(20 * cs, cs, C)
    assert m.first_overlap(0, 5 * cs) is None
    assert m.first_overlap(0, 5 * cs + 1) == (5 * cs, A)
    assert m.first_overlap(6 * cs + 10, 100 * cs) == (6 * cs, A | B)
    assert m.first_overlap(6 * cs, 100 * cs, ignore=A) == (6 * cs, B)
    assert m.first_overlap(7 * cs, 100 * cs, ignore=A) == (20 * cs, C)
    assert m.first_overlap(8 * cs, 12 * cs) is None
    for off, ln in [(0, 30 * cs), (6 * cs, cs), (19 * cs, 3), (21 * cs, cs)]:
        fo = m.first_overlap(off, ln)
        assert (fo is None) == (m.check(off, ln) == 0)
        if fo is not None:
            assert fo[1] & ~m.check(off, ln) == 0 and fo[1] != 0


def test_len_counts_maximal_runs(rangemap_cls):
    m = rangemap_cls(512)
    assert len(m) == 0
    m.add(0, 512, A)
    m.add(512, 512, A)
    assert len(m) == 1
    m.add(1024, 512, B)
    m.add(4096, 512, A)
    assert len(m) == 3
    assert len(list(m.runs())) == 3


def test_runs_ascending_regardless_of_insert_order(rangemap_cls):
    rnd = random.Random(7)
    starts = rnd.sample(range(0, 10**6, 3), 3000)
    m = rangemap_cls(512)
    for s in starts:
        m.add(s * 512, 512, A)
    ck(m)
    assert [r[0] // 512 for r in m.runs()] == sorted(starts)


def test_clear(rangemap_cls):
    m = rangemap_cls(512)
    for i in range(500):
        m.add(i * 3 * 512, 512, A)
    m.clear()
    ck(m)
    assert len(m) == 0 and list(m.runs()) == [] and m.check(0, 1 << 40) == 0
    assert m.unprotected() == []
    assert m.add(0, 512, B)
    assert cruns(m, 512) == [(0, 1, B)]


def test_clear_returns_memory_to_construction_level(rangemap_cls):
    m = rangemap_cls(512)
    fresh = m.memory_used
    for i in range(5000):
        m.add(i * 3 * 512, 512, A)
    assert m.memory_used > fresh
    m.clear()
    assert m.memory_used == fresh


def test_memory_used_grows_and_shrinks_with_content(rangemap_cls):
    m = rangemap_cls(512)
    base = m.memory_used
    for i in range(3000):
        m.add(i * 7 * 512, 512, A)
    full = m.memory_used
    assert full > base
    for i in range(3000):
        m.remove(i * 7 * 512, 512, A)
    ck(m)
    assert m.memory_used == base


def test_check_does_not_change_memory(rangemap_cls):
    m = rangemap_cls(512, budget=fixed_overhead(rangemap_cls) + 100_000)
    for i in range(2000):
        m.add(i * 5 * 512, 512, A)
    used = m.memory_used
    m.budget = used  # full: a check that needed memory would now have nothing
    for i in range(0, 20000, 3):
        m.check(i * 512, 700)
        m.first_overlap(i * 512, 700)
    assert m.memory_used == used
    assert m.unprotected() == []
    ck(m)


# ---------------------------------------------------------------------------------------------
# budget, refusal, on_limit


def test_refused_add_marks_range_unprotected_once(rangemap_cls):
    cs = 512
    m, lim, used = lowered(rangemap_cls, cs)
    before = list(m.runs())
    far = 10**6 * cs
    assert m.add(far + 5, 3 * cs, B) is False          # widened: clusters far/cs .. +3
    ck(m, cap=used)
    assert lim.calls == [(far, 4 * cs)]
    assert m.unprotected() == [(far, 4 * cs)]
    assert list(m.runs()) == before, "a refused add stored something / dropped something"
    assert m.check(far, 4 * cs) == 0
    # re-adding into the unprotected range reports nothing (no flood)
    for _ in range(3):
        m.add(far + cs, cs, B)
        m.add(far, 4 * cs, C)
    assert lim.calls == [(far, 4 * cs)]
    assert m.unprotected() == [(far, 4 * cs)]
    assert m.memory_used == used
    ck(m, cap=used)


def test_refused_add_partially_new_reports_only_new_parts(rangemap_cls):
    cs = 512
    m, lim, used = lowered(rangemap_cls, cs)
    far = 10**6 * cs
    assert m.add(far, 4 * cs, B) is False
    assert m.add(far - 2 * cs, 8 * cs, C) is False
    ck(m, cap=used)
    assert sorted(lim.calls) == [(far - 2 * cs, 2 * cs), (far, 4 * cs), (far + 4 * cs, 2 * cs)]
    assert m.unprotected() == [(far - 2 * cs, 8 * cs)]
    # a second far region, then one add bridging both: only the gap is new
    assert m.add(far + 20 * cs, cs, B) is False
    assert lim.calls[-1] == (far + 20 * cs, cs)
    n = len(lim.calls)
    assert m.add(far, 21 * cs, C) is False
    assert lim.calls[n:] == [(far + 6 * cs, 14 * cs)]
    assert m.unprotected() == [(far - 2 * cs, 23 * cs)]
    ck(m, cap=used)


def test_on_limit_reports_are_disjoint_and_cover_unprotected(rangemap_cls):
    cs = 512
    m, lim, used = lowered(rangemap_cls, cs)
    rnd = random.Random(3)
    for _ in range(300):
        c = 10**6 + rnd.randrange(5000)
        m.add(c * cs, rnd.randrange(1, 6) * cs, B)
    ck(m, cap=used)
    assert union_size(lim.calls) == sum(ln for _s, ln in lim.calls), "overlapping reports"
    assert merge(lim.calls) == m.unprotected()


def test_unprotected_list_is_bounded_and_coalesces(rangemap_cls):
    """Thousands of disjoint refusals: the unprotected list has a fixed capacity (in the fixed
    overhead) so it coalesces neighbours, reporting the gaps it newly covers; memory never grows."""
    cs = 512
    m, lim, used = lowered(rangemap_cls, cs)
    n = 5000
    lengths = []
    for i in range(n):
        start = (10**6 + 10 * i) * cs
        assert m.add(start, cs, B) is False
        assert m.memory_used == used
        assert covered(m.unprotected(), start, cs)
        lengths.append(len(m.unprotected()))
    ck(m, cap=used)
    assert max(lengths) < n // 2, "unprotected() is not bounded"
    assert lengths[-1] == max(lengths[len(lengths) // 2:])  # reached its cap and stayed there
    assert union_size(lim.calls) == sum(ln for _s, ln in lim.calls), "a range was reported twice"
    assert merge(lim.calls) == m.unprotected()


def test_refused_remove_drops_the_affected_region(rangemap_cls):
    """Splitting runs needs memory: with a full budget some remove must be refused; afterwards
    check() is 0 in the removed range and in everything reported, and it is all unprotected."""
    cs = 512
    lim = Limits()
    m = rangemap_cls(cs, on_limit=lim)
    n = 400
    for i in range(n):
        assert m.add(i * 100 * cs, 50 * cs, A | B)
    m.budget = m.memory_used
    refused = None
    for i in range(n):
        start = (i * 100 + 25) * cs
        ok = m.remove(start, cs, A)
        ck(m)
        if not ok:
            refused = start
            break
        assert m.check(start, cs) == B and not lim.calls
    assert refused is not None, "no split was ever refused with a full budget"
    assert lim.calls, "refused remove did not call on_limit"
    assert covered(m.unprotected(), refused, cs)
    assert m.check(refused, cs) == 0, "stale entry left after a refused remove"
    for s, ln in lim.calls:
        assert m.check(s, ln) == 0, f"reported region {s:#x}+{ln:#x} still holds metadata"
    assert merge(lim.calls) == m.unprotected()
    # outside the unprotected region everything is still exact
    un = m.unprotected()
    for i in range(n):
        for c in (i * 100, i * 100 + 25, i * 100 + 49, i * 100 + 50):
            if covered(un, c * cs, cs) or any(s < (c + 1) * cs and c * cs < s + ln for s, ln in un):
                continue
            want = 0 if c % 100 >= 50 else (B if c * cs < refused and c % 100 == 25 else A | B)
            assert m.check(c * cs, cs) == want, c


def test_refused_wide_add_stores_nothing(rangemap_cls):
    """Spec: "A refused add: nothing of that add is stored" — also when the add spans many
    blocks and the budget runs out part-way through it."""
    cs = 512
    layout = [(i * 4 * cs, cs, A) for i in range(3000)]
    probe = rangemap_cls(cs)
    for r in layout:
        probe.add(*r)
    used = probe.memory_used
    probe.add(0, 3000 * 4 * cs, B)        # unlimited: the growth this add needs
    growth = probe.memory_used - used
    assert growth > 0
    lim = Limits()
    m = rangemap_cls(cs, on_limit=lim)
    for r in layout:
        m.add(*r)
    before = list(m.runs())
    m.budget = used + growth // 2         # enough for part of the add, not all of it
    assert m.add(0, 3000 * 4 * cs, B) is False
    ck(m)
    assert m.unprotected() == [(0, 3000 * 4 * cs)]
    assert lim.calls == [(0, 3000 * 4 * cs)]
    after = list(m.runs())
    assert after == before, (f"refused add stored part of itself: {len(after)} runs now, "
                             f"{len(before)} before")


def test_raise_budget_clear_readd_restores_protection(rangemap_cls):
    cs = 512
    fo = fixed_overhead(rangemap_cls)
    lim = Limits()
    m = rangemap_cls(cs, budget=fo + 2000, on_limit=lim)
    layout = [(i * 7 * cs, (1 + i % 3) * cs, A if i % 2 else B) for i in range(1000)]
    results = [m.add(*r) for r in layout]
    ck(m)
    assert not all(results) and lim.calls and m.unprotected()
    m.budget = None
    m.clear()
    assert m.unprotected() == []
    n = len(lim.calls)
    assert all(m.add(*r) for r in layout)
    ck(m)
    assert len(lim.calls) == n and m.unprotected() == []
    for off, ln, t in layout:
        assert m.check(off, ln) == t
    assert len(m) == 1000


def test_lowering_budget_drops_nothing_and_refuses_growth(rangemap_cls):
    m, lim, used = lowered(rangemap_cls)
    assert m.check(0, 2 * 512) == A
    assert m.add(0, 512, A) is True  # no growth needed: already there
    assert not lim.calls
    assert m.add(10**7 * 512, 512, D) is False
    assert m.memory_used <= used
    ck(m, cap=used)


def test_memory_never_exceeds_budget_during_growth(rangemap_cls):
    fo = fixed_overhead(rangemap_cls)
    rnd = random.Random(11)
    for extra in (0, 1, 17, 200, 1000, 5000):
        m = rangemap_cls(512, budget=fo + extra, on_limit=Limits())
        for _ in range(400):
            c = rnd.randrange(1 << 30)
            if rnd.random() < 0.8:
                m.add(c * 512, rnd.randrange(1, 4) * 512, 1 << rnd.randrange(16))
            else:
                m.remove(c * 512, rnd.randrange(1, 4) * 512, 1 << rnd.randrange(16))
            assert m.memory_used <= m.budget
        ck(m)


def test_on_limit_exception_propagates_after_map_is_consistent(rangemap_cls):
    class Boom(Exception):
        pass

    calls = []

    def on_limit(start, length):
        calls.append((start, length))
        raise Boom(start)

    m = rangemap_cls(512, on_limit=on_limit)
    m.add(0, 512, A)
    used = m.memory_used
    m.budget = fixed_overhead(rangemap_cls)
    with pytest.raises(Boom):
        m.add(10**6 * 512, 512, B)
    assert calls == [(10**6 * 512, 512)]
    ck(m, cap=used)
    assert m.unprotected() == [(10**6 * 512, 512)]
    assert m.check(0, 512) == A
    m.add(10**6 * 512, 512, B)  # already unprotected: no call, no exception
    assert len(calls) == 1


def test_no_on_limit_when_unlimited(rangemap_cls):
    lim = Limits()
    m = rangemap_cls(512, on_limit=lim)
    rnd = random.Random(5)
    for _ in range(3000):
        assert m.add(rnd.randrange(1 << 40) * 512, 512, 1 << rnd.randrange(16))
    assert not lim.calls and m.unprotected() == []


# ---------------------------------------------------------------------------------------------
# memory targets (structural: memory_used against the spec's bound, all overheads included)


def share(m, n) -> str:
    fo = fixed_overhead(type(m))
    return (f"memory_used={m.memory_used} of which FIXED_OVERHEAD={fo} "
            f"({fo / n:.3f}/unit) and structure {(m.memory_used - fo) / n:.3f}/unit over {n}")


def qemu512_layout(nb_clusters: int):
    """Clusters qemu-img-like metadata occupies with 512-byte clusters: header, refcount table
    and L1 at the start, an L2 table every 65 clusters, a refcount block every 256."""
    per: dict[int, int] = {0: 1 << 0, 1: 1 << 3, 2: 1 << 1}
    for c in range(3, nb_clusters, 65):
        per[c] = per.get(c, 0) | A
    for c in range(5, nb_clusters, 256):
        per[c] = per.get(c, 0) | B
    return per


@pytest.mark.parametrize("order", ["ascending", "random"])
def test_target1_qemu_512_layout_4_bytes_per_metadata_cluster(rangemap_cls, order):
    per = qemu512_layout(1_300_000)
    items = sorted(per.items())
    if order == "random":
        random.Random(1).shuffle(items)
    m = rangemap_cls(512)
    for c, mask in items:
        m.add(c * 512, 512, mask)
    ck(m)
    assert len(per) >= 10**4
    assert cruns(m, 512) == runs_of(per)
    per_cluster = m.memory_used / len(per)
    assert per_cluster <= 4.0, (f"{per_cluster:.2f} bytes per metadata cluster ({order}); "
                                f"{share(m, len(per))}")


def sparse_layout(rnd, n, space_clusters, max_len, masks):
    points = sorted(rnd.sample(range(space_clusters), n + 1))
    out = []
    for p, q in zip(points, points[1:]):
        gap = q - p
        if gap < 2:
            continue
        ln = rnd.randrange(1, min(max_len, gap - 1) + 1)
        out.append((p, ln, rnd.choice(masks)))
    return out


@pytest.mark.parametrize("layout", [
    "sparse-random-masks-asc", "sparse-random-masks-shuffled", "sparse-huge-lengths",
    "contiguous-distinct-masks", "single-clusters-wide-stride", "2M-clusters-sparse"])
def test_target2_16_bytes_per_run_any_layout(rangemap_cls, layout):
    rnd = random.Random(layout)
    n = 20000
    all_masks = list(range(1, 0x10000))
    cs = 512
    if layout.startswith("sparse-random"):
        runs = sparse_layout(rnd, n, 1 << 47, 1 << 20, all_masks)
    elif layout == "sparse-huge-lengths":
        runs = sparse_layout(rnd, n, 1 << 47, 1 << 47, all_masks)
    elif layout == "contiguous-distinct-masks":
        runs, c, prev = [], 1 << 40, 0
        for _ in range(n):
            mask = rnd.choice(all_masks)
            while mask == prev:
                mask = rnd.choice(all_masks)
            ln = rnd.randrange(1, 1 << 16)
            runs.append((c, ln, mask))
            c, prev = c + ln, mask
    elif layout == "single-clusters-wide-stride":
        stride = (1 << 47) // n
        runs = [(i * stride + rnd.randrange(stride - 1), 1, rnd.choice([A, B, C, D]))
                for i in range(n)]
    else:
        cs = 2 << 20
        runs = sparse_layout(rnd, n, 1 << (56 - 21), 1 << 12, all_masks)
    if layout.endswith("shuffled"):
        rnd.shuffle(runs)
    m = rangemap_cls(cs)
    for c, ln, mask in runs:
        assert m.add(c * cs, ln * cs, mask)
    ck(m)
    assert len(m) == len(runs) >= 10**4 * 0.9
    per_run = m.memory_used / len(m)
    assert per_run <= 16.0, f"{per_run:.2f} bytes per run ({layout}); {share(m, len(m))}"


@pytest.mark.parametrize("nb_runs", [500])
def test_target2_amortised_over_a_few_hundred_runs(rangemap_cls, nb_runs):
    """Target 2 holds "amortised over >= a few hundred runs", all overheads included."""
    rnd = random.Random(nb_runs)
    runs = sparse_layout(rnd, nb_runs, 1 << 47, 1 << 20, list(range(1, 0x10000)))
    m = rangemap_cls(512)
    for c, ln, mask in runs:
        assert m.add(c * 512, ln * 512, mask)
    ck(m)
    assert len(m) == len(runs) >= nb_runs * 0.9
    per_run = m.memory_used / len(m)
    assert per_run <= 16.0, f"{per_run:.2f} bytes per run; {share(m, len(m))}"


@pytest.mark.parametrize("layout", ["alternating-2-types", "alternating-2-types-shuffled",
                                    "alternating-2-types-high", "alternating-runs-1-3"])
def test_target3_1_byte_per_cluster_dense(rangemap_cls, layout):
    rnd = random.Random(layout)
    nb = 30000
    base = (1 << 45) if layout.endswith("high") else 0
    per = {}
    if layout == "alternating-runs-1-3":
        c, k = 0, 0
        while c < nb:
            ln = rnd.randrange(1, 4)
            for j in range(ln):
                per[base + c + j] = A if k % 2 else B
            c += ln
            k += 1
    else:
        per = {base + c: (A if c % 2 else B) for c in range(nb)}
    items = list(per.items())
    if "shuffled" in layout:
        rnd.shuffle(items)
    m = rangemap_cls(512)
    for c, mask in items:
        m.add(c * 512, 512, mask)
    ck(m)
    assert len(m) >= 10**4
    assert cruns(m, 512) == runs_of(per)
    per_cluster = m.memory_used / len(per)
    assert per_cluster <= 1.0, (f"{per_cluster:.3f} bytes per cluster ({layout}); "
                                f"{share(m, len(per))}")


# ---------------------------------------------------------------------------------------------
# tracemalloc: the Cython map's real allocations equal memory_used (within TRACE_SLACK)

#: The stated constant: |traced bytes - memory_used| <= TRACE_SLACK for the Cython map. It covers
#: the difference between the real RangeMap object and its nominal size in the formula (~240 B
#: measured) and one-off allocations on first use (~800 B); it does not grow with the number of
#: runs.
TRACE_SLACK = 2048
#: Peak real allocation may exceed the budget only by this much (object header difference plus
#: the Python temporaries of one call); transient buffers must be charged.
PEAK_SLACK = 1024


def _build(m, ops):
    for off, ln, t in ops:
        m.add(off, ln, t)


def _traced_here(snapshot) -> int:
    snap = snapshot.filter_traces([tracemalloc.Filter(True, __file__)])
    return sum(stat.size for stat in snap.statistics("filename"))


@pytest.mark.parametrize("nb_runs", [10**4, 3 * 10**4, 10**5])
@pytest.mark.parametrize("order", ["ascending", "random"])
def test_tracemalloc_matches_memory_used(nb_runs, order):
    mod = rangemap_module("c-extension")
    rnd = random.Random(nb_runs)
    starts = sorted(rnd.sample(range(1 << 34), nb_runs))
    ops = [(s * 512, 512 * rnd.randrange(1, 3), rnd.choice([A, B, C])) for s in starts]
    if order == "random":
        rnd.shuffle(ops)
    gc.collect()
    tracemalloc.start(1)
    try:
        before = _traced_here(tracemalloc.take_snapshot())
        m = mod.RangeMap(512)
        _build(m, ops)
        gc.collect()
        after = _traced_here(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    traced = after - before
    assert len(m) >= nb_runs * 0.5
    assert abs(traced - m.memory_used) <= TRACE_SLACK, (traced, m.memory_used)


def test_tracemalloc_sees_frees():
    """Removing everything gives the memory back (traced and charged alike)."""
    mod = rangemap_module("c-extension")
    ops = [(i * 3 * 512, 512, A) for i in range(20000)]
    m = mod.RangeMap(512)
    tracemalloc.start(1)
    try:
        base = _traced_here(tracemalloc.take_snapshot())
        base_used = m.memory_used
        _build(m, ops)
        mid = _traced_here(tracemalloc.take_snapshot()) - base
        used_full = m.memory_used
        for off, ln, t in ops:
            m.remove(off, ln, t)
        end = _traced_here(tracemalloc.take_snapshot()) - base
    finally:
        tracemalloc.stop()
    assert m.memory_used == base_used
    assert mid > 5000, "building 20000 runs allocated (almost) nothing traced"
    assert abs(mid - (used_full - base_used)) <= TRACE_SLACK, (mid, used_full - base_used)
    assert abs(end) <= TRACE_SLACK, end


def _workload(kind, rnd):
    ops = []
    if kind == "ascending":
        ops = [("add", i * 3 * 512, 512, A) for i in range(30000)]
    elif kind == "random-adds-removes":
        for _ in range(20000):
            c = rnd.randrange(1 << 20)
            ops.append(("add" if rnd.random() < 0.7 else "remove", c * 512,
                        rnd.randrange(1, 8) * 512, rnd.choice([A, B, C, A | B])))
    elif kind == "split-removes":
        ops = [("add", i * 100 * 512, 60 * 512, A | B) for i in range(2000)]
        ops += [("remove", (i * 100 + 30) * 512, 512, A) for i in range(2000)]
    elif kind == "wide-edits":
        ops = [("add", i * 4 * 512, 512, A) for i in range(8000)]
        for _ in range(40):
            c = rnd.randrange(8000 * 4)
            ops.append((rnd.choice(["add", "remove"]), c * 512, rnd.randrange(1000, 6000) * 512,
                        rnd.choice([B, C, A])))
    return ops


@pytest.mark.parametrize("kind", ["ascending", "random-adds-removes", "split-removes",
                                  "wide-edits"])
@pytest.mark.parametrize("extra", [2000, 20000, 60000])
def test_tracemalloc_peak_never_exceeds_budget(kind, extra):
    """Every byte is charged before it is allocated: the real peak stays within the budget
    (PEAK_SLACK aside), transient buffers of wide edits and refusals included."""
    mod = rangemap_module("c-extension")
    rnd = random.Random(kind)
    ops = _workload(kind, rnd)
    budget = mod.FIXED_OVERHEAD + extra
    gc.collect()
    tracemalloc.start(1)
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        m = mod.RangeMap(512, budget=budget, on_limit=None)
        _run_ops(m, ops)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    m._check()
    assert m.memory_used <= budget
    assert peak <= budget + PEAK_SLACK, (peak, budget)


def _run_ops(m, ops):
    for kind, off, ln, t in ops:
        if kind == "add":
            m.add(off, ln, t)
        else:
            m.remove(off, ln, t)


def test_check_allocates_nothing_persistent():
    mod = rangemap_module("c-extension")
    m = mod.RangeMap(512)
    for i in range(5000):
        m.add(i * 9 * 512, 512, A | B)
    queries = [(i * 512, 2048) for i in range(0, 50000, 7)]
    tracemalloc.start(1)
    try:
        before = tracemalloc.get_traced_memory()[0]
        for off, ln in queries:
            m.check(off, ln)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before <= 1024, after - before


# ---------------------------------------------------------------------------------------------
# the two implementations charge the same bytes and refuse at the same step

OPS = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 300), st.integers(1, 6), st.integers(1, 0xFFFF)),
    st.tuples(st.just("add"), st.integers(0, 300), st.integers(1, 6), st.sampled_from([A, B, C])),
    st.tuples(st.just("remove"), st.integers(0, 300), st.integers(1, 40), st.integers(1, 0xFFFF)),
    st.tuples(st.just("check"), st.integers(0, 300), st.integers(1, 40), st.integers(0, 0xFFFF)),
    st.tuples(st.just("budget"), st.integers(-300, 3000), st.just(0), st.just(0)),
    st.tuples(st.just("clear"), st.just(0), st.just(0), st.just(0)),
)


def _drive(cls, budget_extra, huge, ops):
    fo = fixed_overhead(cls)
    lim = Limits()
    m = cls(512, budget=None if budget_extra is None else fo + budget_extra, on_limit=lim)
    base = (1 << 47) - 400 if huge else 0
    trace = []
    for kind, c, n, t in ops:
        off, ln = (base + c) * 512, n * 512
        if kind == "add":
            r = m.add(off, ln, t)
        elif kind == "remove":
            r = m.remove(off, ln, t)
        elif kind == "check":
            r = (m.check(off, ln, t), m.first_overlap(off, ln, t))
        elif kind == "budget":
            r = m.budget = max(fo, m.memory_used + c) if c else None
        else:
            r = m.clear()
        trace.append((kind, r, m.memory_used, len(m), m.unprotected(), list(lim.calls)))
    m._check()
    return trace, list(m.runs())


@settings(max_examples=60)
@given(budget_extra=st.one_of(st.none(), st.integers(0, 3000)), huge=st.booleans(),
       ops=st.lists(OPS, max_size=120))
def test_both_implementations_account_identically(budget_extra, huge, ops):
    c = rangemap_module("c-extension").RangeMap
    p = rangemap_module("pure-python").RangeMap
    tc, rc = _drive(c, budget_extra, huge, ops)
    tp, rp = _drive(p, budget_extra, huge, ops)
    for i, (sc, sp) in enumerate(zip(tc, tp)):
        assert sc == sp, f"step {i} {ops[i]}: c-extension {sc} != pure-python {sp}"
    assert rc == rp


def test_both_implementations_account_identically_large():
    """A longer deterministic sequence with many blocks and a budget that runs out midway."""
    rnd = random.Random(99)
    ops = []
    for _ in range(6000):
        r = rnd.random()
        c = rnd.randrange(200000)
        if r < 0.7:
            ops.append(("add", c, rnd.randrange(1, 9), rnd.choice([A, B, C, D, A | B, 0x8001])))
        elif r < 0.95:
            ops.append(("remove", c, rnd.randrange(1, 50), rnd.choice([A, B, C, D, 0xFFFF])))
        else:
            ops.append(("check", c, rnd.randrange(1, 500), 0))
    c_cls = rangemap_module("c-extension").RangeMap
    p_cls = rangemap_module("pure-python").RangeMap
    tc, rc = _drive(c_cls, 6000, False, ops)
    tp, rp = _drive(p_cls, 6000, False, ops)
    assert any(s[1] is False for s in tc), "budget never ran out; test lost its point"
    for i, (sc, sp) in enumerate(zip(tc, tp)):
        assert sc[:4] == sp[:4], f"step {i} {ops[i]}: {sc[:4]} != {sp[:4]}"
        assert sc[4:] == sp[4:], f"step {i}: unprotected/on_limit differ"
    assert rc == rp


@pytest.mark.parametrize("seed", range(6))
def test_both_implementations_account_identically_wide_edits(seed):
    """Wide adds/removes (thousands of clusters, many blocks) with a budget: same return values,
    memory_used, runs and unprotected ranges step by step in both implementations."""
    rnd = random.Random(1000 + seed)
    ops = [("add", i * 3, 1, rnd.choice([A, B])) for i in range(3000)]
    for _ in range(30):
        ops.append((rnd.choice(["add", "add", "remove"]), rnd.randrange(9000),
                    rnd.randrange(1, 7000), rnd.choice([A, B, C, D, A | B])))
    c_cls = rangemap_module("c-extension").RangeMap
    p_cls = rangemap_module("pure-python").RangeMap
    for extra in (None, 9000):
        tc, rc = _drive(c_cls, extra, False, ops)
        tp, rp = _drive(p_cls, extra, False, ops)
        for i, (sc, sp) in enumerate(zip(tc, tp)):
            assert sc == sp, f"budget {extra} step {i} {ops[i]}: c {sc[:4]} != py {sp[:4]}"
        assert rc == rp


# ---------------------------------------------------------------------------------------------
# huge lengths against a step-function model (clusters up to 2^47 long)


class StepModel:
    """Ideal content as a step function over cluster numbers: {breakpoint: mask from there}."""

    def __init__(self):
        self.keys = [0]
        self.vals = [0]

    def _split(self, x):
        import bisect
        i = bisect.bisect_right(self.keys, x) - 1
        if self.keys[i] != x:
            self.keys.insert(i + 1, x)
            self.vals.insert(i + 1, self.vals[i])

    def apply(self, a, b, fn):
        import bisect
        self._split(a)
        self._split(b)
        i = bisect.bisect_left(self.keys, a)
        while i < len(self.keys) and self.keys[i] < b:
            self.vals[i] = fn(self.vals[i])
            i += 1

    def check(self, a, b):
        import bisect
        i = bisect.bisect_right(self.keys, a) - 1
        out = 0
        while i < len(self.keys) and self.keys[i] < b:
            out |= self.vals[i]
            i += 1
        return out

    def runs(self):
        out = []
        for i, (k, v) in enumerate(zip(self.keys, self.vals)):
            end = self.keys[i + 1] if i + 1 < len(self.keys) else None
            if not v:
                continue
            assert end is not None
            if out and out[-1][0] + out[-1][1] == k and out[-1][2] == v:
                out[-1][1] += end - k
            else:
                out.append([k, end - k, v])
        return [tuple(x) for x in out]


HUGE = 1 << 47


@settings(max_examples=80)
@given(data=st.data())
def test_huge_runs_against_step_model(rangemap_cls, data):
    cs = 512
    m = rangemap_cls(cs)
    model = StepModel()
    points = st.one_of(st.integers(0, HUGE), st.integers(HUGE - 64, HUGE),
                       st.integers(0, 64), st.sampled_from([1 << 20, 1 << 32, 1 << 40, 1 << 46]))
    for _ in range(data.draw(st.integers(1, 30))):
        a, b = sorted((data.draw(points), data.draw(points)))
        if a == b:
            b = a + 1
        t = data.draw(st.integers(1, 0xFFFF))
        if data.draw(st.booleans()):
            assert m.add(a * cs, (b - a) * cs, t)
            model.apply(a, b, lambda v: v | t)
        else:
            assert m.remove(a * cs, (b - a) * cs, t)
            model.apply(a, b, lambda v: v & ~t)
        ck(m)
        assert cruns(m, cs) == model.runs()
    for _ in range(20):
        a, b = sorted((data.draw(points), data.draw(points)))
        if a == b:
            b = a + 1
        ign = data.draw(st.sampled_from([0, 0, A, 0xFF00]))
        assert m.check(a * cs, (b - a) * cs, ign) == model.check(a, b) & ~ign
    for k in model.keys[1:]:
        assert m.check(k * cs, cs) == model.check(k, k + 1)
        assert m.check((k - 1) * cs, cs) == model.check(k - 1, k)


def test_wide_add_over_many_blocks_regression(rangemap_cls):
    """Found by the wide-edits workload: a second wide add overlapping a first one, over a map of
    thousands of single-cluster runs, raised AssertionError ("wide add pieces are not
    contiguous") from add() itself, with no budget at all."""
    m = rangemap_cls(512)
    for i in range(8000):
        m.add(i * 4 * 512, 512, A)
    assert m.add(24903 * 512, 2582 * 512, B)
    ck(m)
    assert m.add(25631 * 512, 5181 * 512, B)
    ck(m)
    model = StepModel()
    for i in range(8000):
        model.apply(i * 4, i * 4 + 1, lambda v: v | A)
    model.apply(24903, 24903 + 2582, lambda v: v | B)
    model.apply(25631, 25631 + 5181, lambda v: v | B)
    assert cruns(m, 512) == model.runs()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget_extra", [None, 40000])
def test_wide_edits_over_many_blocks_against_model(rangemap_cls, seed, budget_extra):
    """Adds/removes spanning many blocks (more runs than one scratch buffer) on a map of
    thousands of runs; with a budget, refusals are allowed but the model must hold outside
    unprotected() and the map must never hold bits the model lacks."""
    rnd = random.Random(seed)
    budget = None if budget_extra is None else fixed_overhead(rangemap_cls) + budget_extra
    lim = Limits()
    m = rangemap_cls(512, budget=budget, on_limit=lim)
    model = StepModel()
    n = rnd.choice([3000, 7000])
    stride = rnd.choice([2, 3, 4])
    masks = [A, B, C, D, A | B]
    for i in range(n):
        t = rnd.choice(masks[:2])
        if m.add(i * stride * 512, 512, t):
            pass
        model.apply(i * stride, i * stride + 1, lambda v, t=t: v | t)
    for _ in range(25):
        c = rnd.randrange(n * stride)
        ln = rnd.randrange(1, 7000)
        t = rnd.choice(masks)
        if rnd.random() < 0.6:
            m.add(c * 512, ln * 512, t)
            model.apply(c, c + ln, lambda v, t=t: v | t)
        else:
            m.remove(c * 512, ln * 512, t)
            model.apply(c, c + ln, lambda v, t=t: v & ~t)
        ck(m)
    un = [(s // 512, ln // 512) for s, ln in m.unprotected()]
    real = cruns(m, 512)
    if budget is None:
        assert real == model.runs()
        assert not lim.calls
        return
    # outside unprotected(): exact; everywhere: real subset of model
    compare_with_model(real, model, un)


def compare_with_model(real_runs, model, unprotected_clusters):
    """Walk the elementary segments of real runs, model breakpoints and unprotected intervals:
    real mask subset of model mask everywhere, equal outside the unprotected intervals."""
    import bisect
    points = set(model.keys)
    for start, nb, _m in real_runs:
        points.update((start, start + nb))
    for start, nb in unprotected_clusters:
        points.update((start, start + nb))
    points = sorted(points)
    rstarts = [r[0] for r in real_runs]
    ustarts = [u[0] for u in unprotected_clusters]
    for a, b in zip(points, points[1:]):
        i = bisect.bisect_right(rstarts, a) - 1
        real = real_runs[i][2] if i >= 0 and real_runs[i][0] + real_runs[i][1] > a else 0
        want = model.check(a, a + 1)
        assert real & ~want == 0, f"clusters {a:#x}..{b:#x}: stale bits {real:#x} (model {want:#x})"
        j = bisect.bisect_right(ustarts, a) - 1
        inside = j >= 0 and unprotected_clusters[j][0] + unprotected_clusters[j][1] > a
        if not inside:
            assert real == want, f"clusters {a:#x}..{b:#x}: {real:#x} != model {want:#x}"


# ---------------------------------------------------------------------------------------------
# overlap.py selection


def _impl_in_subprocess(env_extra):
    env = dict(os.environ)
    env.pop("QCOW2_NO_EXTENSIONS", None)
    env.pop("QCOW2_REQUIRE_EXTENSIONS", None)
    env.update(env_extra)
    code = ("import qcow2.overlap as o, qcow2._overlap_py as p; "
            "print(o.IMPLEMENTATION, o.RangeMap.__module__, o.RangeMap is p.RangeMap)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_overlap_selects_extension_by_default():
    rangemap_module("c-extension")  # skip/fail as the fixture does when it is not built
    r = _impl_in_subprocess({})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["c-extension", "qcow2._overlap", "False"]


def test_overlap_no_extensions_forces_twin():
    r = _impl_in_subprocess({"QCOW2_NO_EXTENSIONS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pure-python", "qcow2._overlap_py", "True"]


def test_overlap_reexports_type_constants():
    import qcow2.overlap as o
    assert o.OL_MAIN_HEADER == 1
    assert o.OL_ALL & 0x7FF == 0x7FF and o.OL_ALL <= 0xFFFF
