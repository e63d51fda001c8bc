"""Pool invariants: disjoint labelled / unlabelled sets covering the pool, no double labelling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradnorm_al import Pool, PoolError
from gradnorm_al.pool import initial_count


def _check_invariants(pool: Pool) -> None:
    lab, unl = pool.labeled(), pool.unlabeled()
    assert np.intersect1d(lab, unl).size == 0
    assert np.array_equal(np.union1d(lab, unl), np.arange(pool.size))
    assert len(lab) == pool.num_labeled


def test_initial_pool_size_and_seed():
    a = Pool.initial(1000, 0.1, np.random.default_rng(3))
    b = Pool.initial(1000, 0.1, np.random.default_rng(3))
    c = Pool.initial(1000, 0.1, np.random.default_rng(4))
    assert a.num_labeled == 100
    assert np.array_equal(a.labeled(), b.labeled())
    assert not np.array_equal(a.labeled(), c.labeled())
    assert (a.labeled_at[a.labeled()] == 0).all()
    _check_invariants(a)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_initial_fraction_out_of_range(fraction):
    with pytest.raises(PoolError, match=r"\(0, 1\]"):
        initial_count(100, fraction)


def test_label_rejects_misuse():
    pool = Pool(10)
    pool.label([1, 2], cycle=0)
    with pytest.raises(PoolError, match="already labelled"):
        pool.label([2, 3], cycle=1)
    with pytest.raises(PoolError, match="duplicate"):
        pool.label([4, 4], cycle=1)
    with pytest.raises(PoolError, match="out of range"):
        pool.label([10], cycle=1)
    with pytest.raises(PoolError, match="out of range"):
        pool.label([-1], cycle=1)
    assert pool.num_labeled == 2  # failed requests change nothing
    _check_invariants(pool)


def test_save_load_roundtrip_is_atomic(tmp_path):
    pool = Pool.initial(50, 0.2, np.random.default_rng(0))
    pool.label(pool.unlabeled()[:5], cycle=1)
    path = tmp_path / "pool.json"
    pool.save(path)
    loaded = Pool.load(path)
    assert np.array_equal(loaded.labeled_at, pool.labeled_at)
    assert [p.name for p in tmp_path.iterdir()] == ["pool.json"]  # no temp file left behind
    state = json.loads(path.read_text())
    state["size"] = 49
    path.write_text(json.dumps(state))
    with pytest.raises(PoolError, match="inconsistent"):
        Pool.load(path)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 200),
    fraction=st.floats(0.01, 1.0),
    steps=st.lists(st.integers(1, 30), max_size=8),
    seed=st.integers(0, 2**16),
)
def test_invariants_hold_under_any_labelling_sequence(size, fraction, steps, seed):
    rng = np.random.default_rng(seed)
    pool = Pool.initial(size, fraction, rng)
    _check_invariants(pool)
    for cycle, k in enumerate(steps, start=1):
        unl = pool.unlabeled()
        if k > len(unl):
            break
        before = pool.num_labeled
        pool.label(rng.choice(unl, k, replace=False), cycle)
        assert pool.num_labeled == before + k
        _check_invariants(pool)
