"""The Hamming index (`pipeline.hamming`) against brute force, and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import local_executor
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import hamming
from pipeline.hamming import (
    HammingIndex,
    _Permutation,
    brute_force_pairs,
    brute_force_query,
    plan_tables,
    union_find,
)


def flip(hashes: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each hash with `dist[i]` distinct random bits flipped."""
    rank = rng.random((len(hashes), 64)).argsort(axis=1).argsort(axis=1)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    return hashes ^ np.bitwise_or.reduce(np.where(rank < dist[:, None], weights, np.uint64(0)),
                                         axis=1)


def planted(n: int, threshold: int, seed: int) -> np.ndarray:
    """Random hashes plus copies at every distance 0..threshold+4 (the last ones just miss)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    dist = np.repeat(np.arange(threshold + 5), 12)
    src = rng.integers(0, n, len(dist))
    # chains: copies of copies, so components are larger than pairs
    chain = flip(base[src[:20]], np.full(20, max(threshold, 1)), rng)
    return np.concatenate([base, flip(base[src], dist, rng), chain, flip(chain, dist[:20], rng)])


def pair_set(a: np.ndarray, b: np.ndarray) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for x, y in zip(np.minimum(a, b), np.maximum(a, b))}


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)),
                                directed=False)[1]


def same_partition(x: np.ndarray, y: np.ndarray) -> bool:
    pairs = set(zip(x.tolist(), y.tolist()))
    return len(pairs) == len(set(x.tolist())) == len(set(y.tolist()))


@pytest.mark.parametrize(("threshold", "capacity"), [
    (0, 10), (1, 10), (3, 2000), (5, 10), (8, 0), (8, 2000), (8, 10_000_000),
    (10, 2000), (13, 10), (32, 0),
])
def test_index_pairs_equal_brute_force(threshold, capacity):
    hashes = planted(1500 if threshold < 32 else 400, threshold, seed=threshold)
    index = HammingIndex(hashes, threshold, capacity)
    assert index.planned == max(len(index), capacity)
    a, b = index.pairs()
    ba, bb = brute_force_pairs(index.unique, threshold)
    want = pair_set(ba, bb)
    if threshold:
        assert len(want) >= 12 * threshold  # the planted pairs are there to be found
    assert pair_set(a, b) == want
    assert len(a) == len(want)  # no pair twice
    # every distance reported is really within the threshold, none beyond is reported
    assert (np.bitwise_count(index.unique[a] ^ index.unique[b]) <= threshold).all()
    # the spanning forest keeps the components
    fa, fb = index.pairs(spanning=True)
    root = union_find(len(index), fa, fb)
    assert same_partition(root, components(len(index), ba, bb))
    g = index.groups()
    assert len(g) == len(hashes) and (g == root[index.inverse]).all()


def test_pairs_on_the_executor_equal_pairs_in_process():
    hashes = planted(1000, 8, seed=1)
    index = HammingIndex(hashes, 8)
    here = pair_set(*index.pairs())
    assert pair_set(*index.pairs(local_executor(), tables_per_task=7)) == here


def test_dense_clusters_keep_components_with_a_spanning_forest():
    """Clusters where every hash is near every other: far more pairs than hashes."""
    rng = np.random.default_rng(5)
    centres = rng.integers(0, 2**64, 6, dtype=np.uint64)
    members = np.concatenate([flip(np.full(150, c), rng.integers(0, 4, 150), rng)
                              for c in centres])
    index = HammingIndex(members, 8, 10**6)
    a, b = index.pairs()
    assert len(a) > 10 * len(index)  # dense: the forest path is taken
    assert pair_set(a, b) == pair_set(*brute_force_pairs(index.unique, 8))
    fa, _ = index.pairs(spanning=True)
    assert len(fa) < 2 * len(index)  # at most a forest per task, not every pair
    g = index.groups()
    assert len(np.unique(g)) == 6
    for k in range(6):  # one label per cluster
        assert len(np.unique(g[k * 150 : (k + 1) * 150])) == 1


def test_pairs_inside_a_component_so_far_are_not_verified_again():
    """Near copies are found by table after table: once a task's forest holds a pair's
    component, the pair is dropped before `verify`; components stay those of the accepted
    pairs (here: refused pairs split a cluster that brute force would join)."""
    rng = np.random.default_rng(11)
    centres = rng.integers(0, 2**64, 8, dtype=np.uint64)
    members = np.concatenate([flip(np.full(120, c), rng.integers(0, 3, 120), rng)
                              for c in centres])
    index = HammingIndex(members, 8, 10**5)
    u = index.unique
    asked = []

    class OddBitsApart:  # refuses pairs whose lowest bits differ: a second opinion
        def __call__(self, a, b):
            asked.append(len(a))
            return ((u[a] ^ u[b]) & np.uint64(1)) == 0

    g = index.groups(verify=OddBitsApart())
    ba, bb = brute_force_pairs(u, 8)
    keep = OddBitsApart()(ba, bb)
    assert (~keep).any() and keep.any()
    assert same_partition(g, components(len(u), ba[keep], bb[keep])[index.inverse])
    # every table finds most pairs of a cluster; without the filter each would be asked
    found = sum(len(hamming.table_pairs(u, t, 8)[0]) for t in index.tables)
    assert found > 5 * len(ba)
    assert sum(asked[:-1]) < found / 3


def test_verify_refuses_pairs_before_the_forest_is_taken():
    """A chain a-b-c where b-c is refused: components are those of the accepted pairs only."""
    rng = np.random.default_rng(9)
    base = rng.integers(0, 2**64, 300, dtype=np.uint64)
    b1 = flip(base[:50], np.full(50, 3), rng)
    b2 = flip(b1, np.full(50, 3), rng)
    hashes = np.concatenate([base, b1, b2])
    index = HammingIndex(hashes, 4)
    u = index.unique
    refused = set(b2.tolist())  # refuse every pair that touches a second-step copy

    class NoSecondStep:
        def __call__(self, a, b):
            return ~(np.isin(u[a], b2) | np.isin(u[b], b2))

    a, b = index.pairs(verify=NoSecondStep())
    assert a.size and not any(int(u[x]) in refused or int(u[y]) in refused for x, y in zip(a, b))
    ba, bb = brute_force_pairs(u, 4)
    keep = NoSecondStep()(ba, bb)
    assert pair_set(a, b) == pair_set(ba[keep], bb[keep])
    g = index.groups(verify=NoSecondStep())
    assert same_partition(g, components(len(u), ba[keep], bb[keep])[index.inverse])


@pytest.mark.parametrize("threshold", [0, 4, 8, 12])
def test_query_equals_brute_force(threshold):
    rng = np.random.default_rng(100 + threshold)
    hashes = planted(2000, threshold, seed=threshold)
    index = HammingIndex(hashes, threshold, 5000)
    near = flip(hashes[rng.integers(0, len(hashes), 300)],
                rng.integers(0, threshold + 5, 300), rng)
    # repeated queries come back once per query row
    queries = np.concatenate([near, near[:20], rng.integers(0, 2**64, 100, dtype=np.uint64)])
    qi, ui, dist = index.query(queries)
    d = np.bitwise_count(queries[:, None] ^ index.unique[None, :])
    want = set(zip(*(x.tolist() for x in np.nonzero(d <= threshold))))
    assert len(want) >= 40  # planted copies within reach (1 in 5 at threshold 0)
    assert set(zip(qi.tolist(), ui.tolist())) == want
    assert len(qi) == len(want)
    assert (dist == d[qi, ui]).all()
    bq, bu = brute_force_query(queries, index.unique, threshold)
    assert set(zip(bq.tolist(), bu.tolist())) == want
    assert set(zip(*(x.tolist() for x in index.query(queries, local_executor(), 5)[:2]))) == want
    # answered 37 queries at a time (repeats split across chunks): the same rows, same order
    for got, full in zip(index.query(queries, chunk=37), (qi, ui, dist)):
        assert np.array_equal(got, full)
    e = index.query(np.empty(0, np.uint64))
    assert all(len(x) == 0 for x in e)


def test_permutation_puts_table_bits_on_top_and_inverts():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2**64, 4000, dtype=np.uint64)
    y = x.copy()
    y[::2] ^= np.uint64(1) << rng.integers(0, 64, 2000).astype(np.uint64)  # one bit off
    for table in plan_tables(8, 10**7)[::37] + plan_tables(3, 100):
        perm = _Permutation.of(table)
        px, py = perm.forward(x), perm.forward(y)
        assert (perm.inverse(px) == x).all()
        assert (np.bitwise_count(px ^ py) == np.bitwise_count(x ^ y)).all()
        mask = np.uint64(sum(((1 << w) - 1) << s for s, w in table.runs))
        same_key = (x & mask) == (y & mask)
        assert ((px ^ py) <= perm.low).tolist() == same_key.tolist()
        assert perm.bits == table.bits


def test_plan_covers_every_error_pattern_of_weight_threshold():
    """Pigeonhole check: any `threshold` flipped bits leave some table's bits untouched."""
    rng = np.random.default_rng(3)
    for threshold in (2, 5, 8, 11, 32):
        tables = plan_tables(threshold, 10**6)
        masks = np.array([sum(((1 << w) - 1) << s for s, w in t.runs) for t in tables], np.uint64)
        errs = flip(np.zeros(3000, np.uint64), np.full(3000, threshold), rng)
        untouched = ((errs[:, None] & masks[None, :]) == 0).any(axis=1)
        assert untouched.all(), threshold


def test_plan_for_the_real_size_is_cheaper_than_for_a_larger_capacity():
    small, large = plan_tables(8, 10**6), plan_tables(8, 10**7)
    assert len(small) < len(large)
    assert min(t.bits for t in small) < min(t.bits for t in large)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="uint64"):
        HammingIndex(np.arange(5), 4)
    with pytest.raises(ValueError, match="uint64"):
        HammingIndex(np.arange(5, dtype=np.uint64), 4).query(np.arange(3))
    with pytest.raises(ValueError, match="threshold"):
        plan_tables(64, 10)
    with pytest.raises(ValueError, match="sorted"):
        hamming.table_pairs(np.array([5, 3], np.uint64), plan_tables(2, 10)[0], 2)


@pytest.mark.parametrize("threshold", [0, 8, 32])
def test_zero_one_and_equal_hashes(threshold):
    for hashes in (np.empty(0, np.uint64), np.array([7], np.uint64),
                   np.full(50, 2**63 + 5, np.uint64)):
        index = HammingIndex(hashes, threshold)
        a, _ = index.pairs()
        assert a.size == 0  # equal hashes are stored once: no pair among them
        g = index.groups()
        assert len(g) == len(hashes) and len(set(g.tolist())) <= 1
        qi, ui, dist = index.query(np.array([7, 2**63 + 5], np.uint64))
        want = [(q, 0) for q, v in enumerate([7, 2**63 + 5]) if len(hashes)
                and int(np.bitwise_count(np.uint64(v) ^ index.unique[0])) <= threshold]
        assert list(zip(qi.tolist(), ui.tolist())) == want
        assert (dist <= threshold).all()


def test_threshold_32_finds_pairs_half_the_bits_apart():
    rng = np.random.default_rng(11)
    base = rng.integers(0, 2**64, 200, dtype=np.uint64)
    far = flip(base, np.full(200, 32), rng)
    farther = flip(base, np.full(200, 33), rng)
    index = HammingIndex(np.concatenate([base, far, farther]), 32)
    found = pair_set(*index.pairs())
    ba, bb = brute_force_pairs(index.unique, 32)
    assert found == pair_set(ba, bb)
    pos = {int(h): i for i, h in enumerate(index.unique)}
    for x, y in zip(base.tolist(), far.tolist()):  # exactly 32 apart: found
        assert tuple(sorted((pos[x], pos[y]))) in found
    for x, y in zip(base.tolist(), farther.tolist()):  # 33 apart: not
        assert tuple(sorted((pos[x], pos[y]))) not in found


def test_union_find_labels_components_by_smallest_member():
    a, b = np.array([5, 1, 7, 3]), np.array([1, 6, 8, 2])
    root = union_find(10, a, b)
    assert root.tolist() == [0, 1, 2, 2, 4, 1, 1, 7, 7, 9]
    assert same_partition(root, components(10, a, b))
