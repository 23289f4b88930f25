"""Engine-level checks of the range map (engine helper): both implementations against a naive
per-cluster dict model, identical memory_used after every step, and the block encodings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2._overlap_py as P

from conftest import rangemap_module

CS = 512


def _c():
    return rangemap_module("c-extension")


def _model_apply(model, c0, c1, t, is_add):
    for c in range(c0, c1):
        v = model.get(c, 0)
        v = v | t if is_add else v & ~t
        if v:
            model[c] = v
        else:
            model.pop(c, None)


OPS = st.lists(st.tuples(st.booleans(), st.integers(0, 3000), st.integers(1, 300),
                         st.sampled_from([1, 2, 4, 16, 6, 0x8000, 0xFFFF])), max_size=80)


@settings(max_examples=60)
@given(ops=OPS, seed=st.integers(0, 10))
def test_naive_model_and_identical_accounting(ops, seed):
    """Unlimited budget: both maps equal the per-cluster model on check() of random ranges and
    charge identical bytes after every step."""
    cm, pm = _c().RangeMap(CS), P.RangeMap(CS)
    model: dict[int, int] = {}
    rnd = random.Random(seed)
    for is_add, c, n, t in ops:
        for m in (cm, pm):
            assert (m.add if is_add else m.remove)(c * CS, n * CS, t) is True
        _model_apply(model, c, c + n, t, is_add)
        assert cm.memory_used == pm.memory_used
        assert len(cm) == len(pm)
        for _ in range(5):
            a = rnd.randrange(3400)
            b = a + rnd.randrange(1, 200)
            want = 0
            for k in range(a, b):
                want |= model.get(k, 0)
            assert cm.check(a * CS, (b - a) * CS) == want == pm.check(a * CS, (b - a) * CS)
    cm._check()
    pm._check()
    assert list(cm.runs()) == list(pm.runs())


@pytest.mark.parametrize("budget_extra", [0, 500, 3000, 20000])
def test_identical_refusals_random_sequence(budget_extra):
    cm = _c().RangeMap(CS, budget=P.FIXED_OVERHEAD + budget_extra)
    pm = P.RangeMap(CS, budget=P.FIXED_OVERHEAD + budget_extra)
    rnd = random.Random(budget_extra)
    for step in range(4000):
        is_add = rnd.random() < 0.75
        c = rnd.randrange(60000)
        n = rnd.choice([1, 1, 2, 5, 40, 700])
        t = rnd.choice([4, 16, 2, 20, 0x8000])
        rc = (cm.add if is_add else cm.remove)(c * CS, n * CS, t)
        rp = (pm.add if is_add else pm.remove)(c * CS, n * CS, t)
        assert (rc, cm.memory_used, len(cm), cm.unprotected()) == \
            (rp, pm.memory_used, len(pm), pm.unprotected()), step
        assert cm.memory_used <= cm.budget
        if step % 500 == 0:
            cm._check()
            pm._check()
    assert list(cm.runs()) == list(pm.runs())


def test_dense_and_runs_encodings_both_used():
    """A dense alternating region picks DENSE blocks, sparse runs pick RUNS (via the formula)."""
    dense = P._block_size(list(range(128)), [1] * 128, [4 if i % 2 else 16 for i in range(128)])
    sparse = P._block_size([i * 100 for i in range(128)], [1] * 128, [4] * 128)
    assert dense[1] == P.KIND_DENSE and sparse[1] == P.KIND_RUNS
    # 128 clusters, 2-bit indices: 16 header + 1 common + 4 palette + 32 bits + 8 pad
    assert dense[0] == 16 + 1 + 4 + 32 + 8
    # 127 two-byte deltas, lengths shared (width 0), one mask (0-bit indices)
    assert sparse[0] == 16 + 0 + 2 + 127 * 2 + 8


@pytest.mark.parametrize("impl", ["c-extension", "pure-python"])
def test_blocks_respect_fill_bounds(impl):
    m = rangemap_module(impl).RangeMap(CS)
    rnd = random.Random(5)
    cs = rnd.sample(range(10**6), 20000)
    for c in cs:
        m.add(2 * c * CS, CS, 4)
    m._check()          # asserts n <= B and n >= MIN_FILL except the last block
    for c in cs[:15000]:
        m.remove(2 * c * CS, CS, 4)
    m._check()
    assert len(m) == 5000
