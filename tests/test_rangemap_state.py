"""Hypothesis state machine: each RangeMap implementation against a naive model.

The model is the *ideal* content, a dict cluster -> mask with every add/remove applied as if
memory were unlimited, plus the set of clusters some refused operation touched. After every
step, for the real map:

- ``_check()`` passes and ``memory_used <= budget`` (or <= the usage at the moment the budget
  was lowered below it: lowering drops nothing by itself);
- on every cluster outside ``unprotected()`` its mask equals the ideal mask;
- on every cluster its mask is a subset of the ideal mask (a refusal may forget metadata, never
  invent it, so no stale entry can block a legitimate write);
- every refused operation's cluster range is inside ``unprotected()``;
- ``on_limit`` reports are exactly the newly unprotected parts: disjoint from what was already
  unprotected, and old set | reports == new set; a successful operation reports nothing.

The cluster space is small in one machine (collisions, merges, splits) and huge in the other
(offsets up to 2^56 bytes: wide deltas inside blocks).
"""

from __future__ import annotations

import bisect
import importlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule, run_state_machine_as_test)

MASKS = st.one_of(st.sampled_from([1 << 2, 1 << 4, 1 << 1, (1 << 2) | (1 << 4), 1 << 15]),
                  st.integers(1, 0xFFFF))


def merge(intervals):
    out: list[list[int]] = []
    for s, ln in sorted(intervals):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], s + ln - out[-1][0])
        else:
            out.append([s, ln])
    return [tuple(x) for x in out]


def overlaps(intervals, start, length) -> bool:
    return any(s < start + length and start < s + ln for s, ln in intervals)


def make_machine(cls, space: str):
    fixed = importlib.import_module(cls.__module__).FIXED_OVERHEAD

    class RangeMapMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.m = None

        @initialize(budget=st.one_of(st.none(), st.integers(0, 600), st.integers(0, 6000)),
                    cs=st.sampled_from([512, 4096, 65536, 2 << 20]))
        def init(self, budget, cs):
            self.cs = cs
            self.calls: list[tuple[int, int]] = []
            self.m = cls(cs, budget=None if budget is None else fixed + budget,
                         on_limit=lambda s, ln: self.calls.append((s, ln)))
            self.ideal: dict[int, int] = {}
            self.required: list[tuple[int, int]] = []  # byte ranges of refused operations
            self.cap = 0
            if space == "small":
                self.regions = [0]
            else:
                top = (1 << 56) // cs
                self.regions = [0, (1 << 30) // cs * 7, top // 3, top - 300]

        # -- drawing ranges ---------------------------------------------------------------
        def _range(self, data, max_clusters):
            """A byte range whose widened cluster range is [c, c + n)."""
            cs = self.cs
            region = data.draw(st.sampled_from(self.regions))
            c = region + data.draw(st.integers(0, 160))
            n = data.draw(st.integers(1, max_clusters))
            head = data.draw(st.integers(0, cs - 1))
            if n == 1:
                length = data.draw(st.integers(1, cs - head))
            else:
                length = (n - 1) * cs - head + data.draw(st.integers(1, cs))
            return c * cs + head, length, c, n

        # -- mutations --------------------------------------------------------------------
        def _mutate(self, fn, offset, length, c, n, types, is_add):
            before = self.m.unprotected()
            ncalls = len(self.calls)
            ok = fn(offset, length, types)
            assert ok is True or ok is False
            new_calls = self.calls[ncalls:]
            after = self.m.unprotected()
            for k in range(c, c + n):
                old = self.ideal.get(k, 0)
                val = old | types if is_add else old & ~types
                if val:
                    self.ideal[k] = val
                else:
                    self.ideal.pop(k, None)
            if ok:
                assert not new_calls, f"successful operation reported {new_calls}"
                assert after == before
            else:
                self.required.append((c * self.cs, n * self.cs))
            for s, ln in new_calls:
                assert ln > 0 and not overlaps(before, s, ln), (s, ln, before)
            assert sum(ln for _s, ln in new_calls) == sum(ln for _s, ln in merge(new_calls)), \
                f"overlapping reports {new_calls}"
            assert merge(before + new_calls) == after, (before, new_calls, after)

        @rule(data=st.data(), types=MASKS)
        def add(self, data, types):
            off, ln, c, n = self._range(data, 8)
            self._mutate(self.m.add, off, ln, c, n, types, True)

        @rule(data=st.data(), types=MASKS)
        def remove(self, data, types):
            off, ln, c, n = self._range(data, 40)
            self._mutate(self.m.remove, off, ln, c, n, types, False)

        @rule(data=st.data(), types=MASKS)
        def add_no_widening(self, data, types):
            region = data.draw(st.sampled_from(self.regions))
            c = region + data.draw(st.integers(0, 160))
            n = data.draw(st.integers(1, 3))
            self._mutate(self.m.add, c * self.cs, n * self.cs, c, n, types, True)

        @rule(amount=st.integers(1, 3000))
        def raise_budget(self, amount):
            if self.m.budget is not None:
                self.m.budget = self.m.budget + amount

        @rule(amount=st.integers(0, 3000))
        def lower_budget(self, amount):
            """Lowering below memory_used drops nothing; it only refuses growth from now on."""
            used = self.m.memory_used
            runs = list(self.m.runs())
            self.m.budget = max(fixed, used - amount)
            if self.m.budget < used:
                self.cap = max(self.cap, used)
            assert self.m.memory_used == used and list(self.m.runs()) == runs

        @rule()
        def unlimit(self):
            self.m.budget = None

        @rule()
        def clear(self):
            ncalls = len(self.calls)
            self.m.clear()
            assert len(self.calls) == ncalls
            assert self.m.unprotected() == [] and len(self.m) == 0
            self.ideal.clear()
            self.required.clear()
            self.calls.clear()

        # -- queries ----------------------------------------------------------------------
        @rule(data=st.data(), ignore=st.one_of(st.just(0), MASKS))
        def check(self, data, ignore):
            off, ln, c, n = self._range(data, 200)
            got = self.m.check(off, ln, ignore)
            first = self.m.first_overlap(off, ln, ignore)
            un = self.m.unprotected()
            cs = self.cs
            ideal_or = protected_or = 0
            ideal_first = None
            for k in sorted(k for k in self.ideal if c <= k < c + n):
                v = self.ideal[k] & ~ignore
                ideal_or |= v
                if not overlaps(un, k * cs, cs):
                    protected_or |= v
                if v and ideal_first is None:
                    ideal_first = (k * cs, v)
            assert got & ~ideal_or == 0, "check() reports metadata the model never had"
            assert protected_or & ~got == 0, "check() misses protected metadata"
            if not overlaps(un, c * cs, n * cs):
                assert got == ideal_or
                assert first == ideal_first
            assert (first is None) == (got == 0)
            if first is not None:
                assert first[1] and first[1] & ~got == 0 and first[0] % cs == 0
                assert c * cs <= first[0] < (c + n) * cs

        # -- invariants -------------------------------------------------------------------
        @invariant()
        def consistent(self):
            if self.m is None:
                return
            m, cs = self.m, self.cs
            m._check()
            if m.budget is not None:
                assert m.memory_used <= max(m.budget, self.cap), (m.memory_used, m.budget)
            un = m.unprotected()
            starts = [s for s, _ln in un]
            for (s0, l0), (s1, _l1) in zip(un, un[1:]):
                assert s0 + l0 < s1, f"unprotected() not merged: {un}"
            assert merge(self.calls) == un, "on_limit reports != unprotected()"

            def is_unprotected(k):
                i = bisect.bisect_right(starts, k * cs) - 1
                return i >= 0 and un[i][0] + un[i][1] > k * cs

            for s, ln in self.required:
                i = bisect.bisect_right(starts, s) - 1
                assert i >= 0 and un[i][0] + un[i][1] >= s + ln, \
                    f"refused range {s:#x}+{ln:#x} not in unprotected() {un}"
            real: dict[int, int] = {}
            nruns = 0
            prev = None
            for start, length, mask in m.runs():
                nruns += 1
                assert start % cs == 0 and length % cs == 0 and length > 0
                assert 0 < mask <= 0xFFFF
                if prev is not None:
                    assert start >= prev[0] and not (start == prev[0] and mask == prev[1])
                prev = (start + length, mask)
                assert length // cs <= 10**4, "run larger than anything the model could make"
                for k in range(start // cs, (start + length) // cs):
                    real[k] = mask
            assert nruns == len(m)
            for k in set(real) | set(self.ideal):
                r, want = real.get(k, 0), self.ideal.get(k, 0)
                assert r & ~want == 0, f"cluster {k:#x}: stale bits {r:#x} (model {want:#x})"
                if not is_unprotected(k):
                    assert r == want, f"cluster {k:#x}: {r:#x} != model {want:#x}"
                assert m.check(k * cs, cs) == r

    RangeMapMachine.__name__ = f"RangeMapMachine_{space}"
    return RangeMapMachine


@pytest.mark.parametrize("space", ["small", "huge"])
def test_rangemap_state_machine(rangemap_cls, space):
    run_state_machine_as_test(make_machine(rangemap_cls, space),
                              settings=settings(stateful_step_count=50))
