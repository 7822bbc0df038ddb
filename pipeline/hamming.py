"""Exact radius search over 64-bit hashes in Hamming space: self-join, batch query, components.

Multi-index hashing: the 64 bits are cut into chunks with a radius each such that two hashes
within `threshold` bits agree within radius on at least one chunk (pigeonhole), and each
chunk is cut into blocks such that a chunk within radius `r` agrees exactly on at least
`blocks - r` of them. Every choice of exact blocks is one *table*: permute the bits so the
table's bits are on top (Hamming distance does not change), sort, and compare neighbours
inside each run of equal top bits with XOR + popcount. Each table costs one sort of N
uint64 and sequential passes, independent tables can run on different workers, and the
number of tables is planned for the number of hashes (or a larger `capacity`) by a cost
model that trades tables against the candidate pairs each one makes. No all-pairs comparison happens anywhere;
`brute_force_pairs` / `brute_force_query` are the quadratic references the tests and
benchmarks compare against.

Numpy only: no pyarrow, no image code. The dedup stage (`pipeline/dedup.py`) builds on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from math import comb
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HASH_BITS = 64
_U64 = np.uint64
_BLOCK = 1 << 15  # elements per cache-sized block of elementwise passes

# verify(a, b) -> bool mask: a second opinion on candidate pairs (index arrays into the
# stored hashes, or query / stored indices for `query`); must be picklable for the executor
Verify = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Table:
    """One exact-match table: the hash bits in `runs` (shift, width) must be equal."""

    runs: tuple[tuple[int, int], ...]

    @property
    def bits(self) -> int:
        return sum(w for _, w in self.runs)


def _split_bits(offset: int, length: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (shift, width) ranges covering bits offset..offset+length."""
    out, pos = [], offset
    for i in range(parts):
        w = length // parts + (1 if i < length % parts else 0)
        out.append((pos, w))
        pos += w
    return out


def _merge_runs(blocks: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for s, w in sorted(blocks):
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1][1] += w
        else:
            runs.append([s, w])
    return tuple((s, w) for s, w in runs)


def _chunk_plan(offset: int, length: int, radius: int, n: float) -> tuple[float, int]:
    """Cheapest block count for one chunk: (estimated cost per hash, number of blocks)."""
    best: tuple[float, int] | None = None
    for nblocks in range(radius + 1, length + 1):
        ntables = comb(nblocks, radius)
        if ntables > 20_000:
            break
        sizes = sorted(w for _, w in _split_bits(offset, length, nblocks))
        kmin = sum(sizes[: nblocks - radius])
        # one sort per table plus the candidate pairs it makes (about n / 2^bits per hash);
        # measured: a candidate costs about a third of a hash's share of the sort
        cost = ntables * (1.0 + 0.3 * n / 2.0 / 2.0**kmin)
        if best is None or cost < best[0]:
            best = (cost, nblocks)
    if best is None:
        raise ValueError(f"no table plan for a {length}-bit chunk at radius {radius}")
    return best


def _chunk_tables(offset: int, length: int, radius: int, nblocks: int) -> list[Table]:
    """One table per choice of `nblocks - radius` blocks that must match exactly."""
    blocks = _split_bits(offset, length, nblocks)
    return [Table(_merge_runs([blocks[i] for i in exact]))
            for exact in combinations(range(nblocks), nblocks - radius)]


def plan_tables(threshold: int, n: int) -> list[Table]:
    """Tables such that every pair within `threshold` bits shares a key in at least one.

    Chunks j with radii r_j and sum(r_j + 1) >= threshold + 1: a pair within `threshold`
    differs in at most r_j bits on some chunk j. Tries 1..threshold+1 chunks and keeps the plan
    with the lowest estimated cost for `n` hashes.
    """
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"threshold {threshold}; allowed: 0..{HASH_BITS - 1}")
    n = max(2, int(n))
    best: tuple[float, list[tuple[int, int, int, int]]] | None = None
    for m in range(1, min(threshold + 1, 16) + 1):
        chunks = _split_bits(0, HASH_BITS, m)
        spare = threshold + 1 - m  # sum of radii
        radii = [spare // m + (1 if i < spare % m else 0) for i in range(m)]
        cost, plan = 0.0, []
        try:
            for (off, length), r in zip(chunks, radii):
                c, nblocks = _chunk_plan(off, length, r, n)
                cost += c
                plan.append((off, length, r, nblocks))
        except ValueError:
            continue
        if best is None or cost < best[0]:
            best = (cost, plan)
    if best is None:  # unreachable: threshold + 1 chunks at radius 0 always plan
        raise RuntimeError(f"no table plan for threshold {threshold}")
    return [t for chunk in best[1] for t in _chunk_tables(*chunk)]


@dataclass(frozen=True)
class _Permutation:
    """A bit permutation that moves one table's key bits to the top of the word.

    Hamming distance is invariant under it, so after one sort of the permuted hashes the
    rows that share a key are adjacent, and XOR of two neighbours gives both "same key"
    (the top `bits` bits are zero) and their distance (the popcount): no row index, no
    random gather. Delta swaps close the gaps between the key's runs, then a rotation lifts
    the merged run to the top; both are cheap in-place passes and exactly invertible.
    """

    ops: tuple[tuple[str, int, int], ...]  # ("swap", mask, shift) | ("rot", left, 0)
    bits: int

    @classmethod
    def of(cls, table: Table) -> _Permutation:
        runs = sorted(table.runs)
        start, width = runs[0]
        ops: list[tuple[str, int, int]] = []
        for s, w in runs[1:]:
            gap, end = s - (start + width), start + width
            if gap:  # swap the gap's first bits with the run (or the run's top with the gap)
                ops.append(("swap", ((1 << min(gap, w)) - 1) << end, max(gap, w)))
            width += w
        left = (HASH_BITS - (start + width)) % HASH_BITS
        if left:
            ops.append(("rot", left, 0))
        return cls(tuple(ops), width)

    @staticmethod
    def _apply(x: np.ndarray, ops: list[tuple[str, int, int]], invert: bool) -> np.ndarray:
        x = np.array(x, _U64, copy=True)
        tmp = np.empty(min(len(x), _BLOCK), _U64)
        for s in range(0, len(x), _BLOCK):  # blocks that stay in cache across the passes
            xb = x[s : s + _BLOCK]
            t = tmp[: len(xb)]
            for op, a, d in ops:
                if op == "swap":  # t = ((x >> d) ^ x) & m; x ^= t ^ (t << d)
                    np.right_shift(xb, _U64(d), out=t)
                    t ^= xb
                    t &= _U64(a)
                    xb ^= t
                    t <<= _U64(d)
                    xb ^= t
                else:
                    left = HASH_BITS - a if invert else a
                    np.right_shift(xb, _U64(HASH_BITS - left), out=t)
                    xb <<= _U64(left)
                    xb |= t
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, list(self.ops), invert=False)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, list(reversed(self.ops)), invert=True)

    @property
    def low(self) -> np.uint64:
        """Mask of the non-key bits: two permuted hashes share the key iff XOR <= low."""
        return _U64((1 << (HASH_BITS - self.bits)) - 1)


def _check_sorted_unique(x: np.ndarray, what: str) -> None:
    if x.dtype != _U64 or not (x[1:] > x[:-1]).all():
        raise ValueError(f"{what}: hashes must be sorted, distinct uint64 (HammingIndex.unique)")


def table_pairs(unique: np.ndarray, table: Table, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of sorted distinct `unique` that share `table`'s key within `threshold`.

    Sort the permuted hashes, then compare neighbours at offset d = 1, 2, ... inside each
    bucket until no bucket is longer than d: while most rows still have a neighbour d places
    on in their bucket, as whole-array passes (XOR, popcount, compare: no gather, 2-3x
    faster than indexing), then only at the rows whose bucket is that long. Matches are mapped
    back to indices by inverting the permutation and a binary search in `unique` (a sort
    of the values and a search of the matches is cheaper than an argsort of all, at 10^7
    hashes 1.9 s against 2.9 s per table).
    """
    if len(unique) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _check_sorted_unique(unique, "table_pairs")
    return _table_pairs(unique, table, threshold)


def _positions(sorted_unique: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in `sorted_unique`: a binary search with sorted needles (each
    search starts where the last ended, so it stays in cache)."""
    order = np.argsort(values)
    out = np.empty(len(values), np.int64)
    out[order] = np.searchsorted(sorted_unique, values[order])
    return out


def _table_pairs(unique: np.ndarray, table: Table, threshold: int,
                 sparse: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
    n = len(unique)
    perm = _Permutation.of(table)
    v = perm.forward(unique)
    v.sort()
    same = (v[1:] ^ v[:-1]) <= perm.low  # row i and i + 1 share the key
    alive = same.copy()  # row i and i + d share the key
    hits_a, hits_b = [], []
    t = np.uint8(threshold)
    xor, bits, ok = np.empty(n, _U64), np.empty(n, np.uint8), np.empty(n, bool)
    d = 1
    while d < n:
        m = n - d
        live = np.count_nonzero(alive)
        if not live:
            break
        if live < sparse * m:
            break
        # dense: whole-array passes over the sorted values (no gather), while most rows
        # still have a partner d places on in their bucket
        np.bitwise_xor(v[d:], v[:-d], out=xor[:m])
        np.bitwise_count(xor[:m], out=bits[:m])
        np.less_equal(bits[:m], t, out=ok[:m])
        ok[:m] &= alive
        idx = np.flatnonzero(ok[:m])
        if idx.size:
            hits_a.append(v[idx])
            hits_b.append(v[idx + d])
        # rows i and i + d + 1 share the key iff i and i + d do and i + d and i + d + 1 do
        np.logical_and(alive[:-1], same[d:], out=alive[:-1])
        alive = alive[:-1]
        d += 1
    del xor, bits, ok
    cur = np.flatnonzero(alive) if d < n else np.empty(0, np.int64)
    while cur.size:  # sparse: only the rows whose bucket is still longer than d
        hit = np.bitwise_count(v[cur] ^ v[cur + d]) <= threshold
        if hit.any():
            hits_a.append(v[cur[hit]])
            hits_b.append(v[cur[hit] + d])
        cur = cur[cur + d < n - 1]
        cur = cur[same[cur + d]]
        d += 1
    if not hits_a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    a = _positions(unique, perm.inverse(np.concatenate(hits_a)))
    b = _positions(unique, perm.inverse(np.concatenate(hits_b)))
    return np.minimum(a, b), np.maximum(a, b)


def _table_query(stored: np.ndarray, queries: np.ndarray, table: Table, threshold: int,
                 block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(query index, stored index) of sorted distinct `queries` x `stored` sharing the key.

    Both sides are permuted and sorted (values only, no argsort). The stored side gets a
    direct-address table of bucket starts over the top (up to 22) key bits, so each query
    finds its bucket with one lookup, then walks it (all queries of a block at once),
    checking candidates with XOR + popcount. Matches (few) are mapped back to indices by
    inverting the permutation and a binary search.
    """
    perm = _Permutation.of(table)
    vs = perm.forward(stored)
    vs.sort()
    vq = perm.forward(queries)
    vq.sort()
    low = perm.low
    kb = min(perm.bits, 22)
    shift = _U64(HASH_BITS - kb)
    starts = np.zeros((1 << kb) + 1, np.int64)
    np.cumsum(np.bincount((vs >> shift).astype(np.intp), minlength=1 << kb), out=starts[1:])
    hits_q, hits_s = [], []
    for s in range(0, len(vq), block):
        q = vq[s : s + block]
        bq = (q >> shift).astype(np.intp)
        lo = starts[bq]
        c = starts[bq + 1] - lo
        live = np.flatnonzero(c)
        d = 0
        while live.size:  # the d-th stored hash of each bucket still that long
            spos = lo[live] + d
            z = vs[spos] ^ q[live]
            ok = np.bitwise_count(z) <= threshold
            ok &= z <= low  # the bucket may hold fewer bits than the key
            if ok.any():
                hits_q.append(q[live[ok]])
                hits_s.append(vs[spos[ok]])
            d += 1
            live = live[c[live] > d]
    if not hits_q:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    qi = _positions(queries, perm.inverse(np.concatenate(hits_q)))
    si = _positions(stored, perm.inverse(np.concatenate(hits_s)))
    return qi, si


def union_find(n: int, a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray],
               chunk: int = 1 << 20) -> np.ndarray:
    """Component label (the smallest member index) of each of `n` nodes joined by edges a-b.

    Vectorised hook-and-compress union-find: every root hooks under the smallest root it
    touches, then paths are halved until every node points at its root; repeated while an
    edge joins two roots. Edges may come as lists of arrays (parts) and are read in chunks,
    with one byte per edge to remember the ones already inside a component, so memory stays
    that of `parent` plus one chunk. Labels are int32 below 2^31 nodes (half the memory).
    """
    parent = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    parts_a = a if isinstance(a, list) else [a]
    parts_b = b if isinstance(b, list) else [b]
    chunks = [(pa_, pb_, s) for pa_, pb_ in zip(parts_a, parts_b)
              for s in range(0, len(pa_), chunk)]
    live = [np.ones(min(chunk, len(pa_) - s), bool) for pa_, _, s in chunks]
    while True:
        hooked = False
        for (pa_, pb_, s), lv in zip(chunks, live):
            idx = np.flatnonzero(lv)
            if not idx.size:
                continue
            ra = parent[np.asarray(pa_[s + idx], np.int64)]
            rb = parent[np.asarray(pb_[s + idx], np.int64)]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            join = lo != hi
            lv[idx[~join]] = False  # same tree already: never again
            if join.any():
                np.minimum.at(parent, hi[join], lo[join])
                hooked = True
        if not hooked:
            return parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def unique_edges(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (a, b) pairs over nodes 0..n-1, sorted."""
    n64 = np.int64(max(n, 1))
    edge = np.unique(np.asarray(a, np.int64) * n64 + np.asarray(b, np.int64))
    return edge // n64, edge % n64


def spanning_forest(n: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (member, smallest index of its component) with the same components as a-b."""
    root = union_find(n, a, b)
    a = np.flatnonzero(root != np.arange(n))
    return a, root[a]


def _pairs_worker(hashes: np.ndarray, threshold: int, spanning: bool, verify: Verify | None):
    def run(tables: list[Table]) -> tuple[np.ndarray, np.ndarray]:
        n = len(hashes)
        aa, bb, count, bound = [np.empty(0, np.int64)], [np.empty(0, np.int64)], 0, n // 4
        root = None  # spanning: component of each hash as of the last forest
        for t in tables:
            a, b = _table_pairs(hashes, t, threshold)
            if root is not None and a.size:
                # most pairs come back from table after table: those inside a component
                # of the forest so far join nothing, so they are neither verified nor kept
                new = root[a] != root[b]
                a, b = a[new], b[new]
            if verify is not None and a.size:
                ok = verify(a, b)
                a, b = a[ok], b[ok]
            aa.append(a)
            bb.append(b)
            count += a.size
            if count > bound:  # one pair is found by many tables: drop the repeats
                a, b = np.concatenate(aa), np.concatenate(bb)
                aa = bb = []
                if spanning:
                    # dense data: keep a spanning forest (same components) instead of every
                    # pair, so memory stays linear in the number of hashes
                    root = union_find(n, a, b)
                    a = np.flatnonzero(root != np.arange(n))
                    b = root[a]
                else:
                    a, b = unique_edges(a, b, n)
                aa, bb, count = [a], [b], a.size
                bound = max(n, 2 * count)
        return unique_edges(np.concatenate(aa), np.concatenate(bb), n)

    return run


def _query_worker(stored: np.ndarray, queries: np.ndarray, threshold: int,
                  verify: Verify | None):
    def run(tables: list[Table]) -> tuple[np.ndarray, np.ndarray]:
        nq, ns = np.int64(len(queries)), np.int64(len(stored))
        found: list[np.ndarray] = [np.empty(0, np.int64)]
        count, bound = 0, len(queries)
        for t in tables:
            qi, si = _table_query(stored, queries, t, threshold)
            if verify is not None and qi.size:
                ok = verify(qi, si)
                qi, si = qi[ok], si[ok]
            found.append(qi * ns + si)
            count += qi.size
            if count > bound:  # one match is found by many tables: drop the repeats
                found = [np.unique(np.concatenate(found))]
                count = found[0].size
                bound = max(int(nq), 2 * count)
        edge = np.unique(np.concatenate(found))
        return edge // ns, edge % ns

    return run


def _run_batches(factory: Callable[[], Callable], tables: list[Table], per_task: int,
                 executor: Any, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    batches = [tables[i : i + per_task] for i in range(0, len(tables), per_task)]
    if executor is None:
        return map(factory(), batches)
    from pipeline.executor import Resources

    return executor.map(factory, batches, Resources(cpus=1.0), desc=desc)


class HammingIndex:
    """Exact radius search over 64-bit hashes (uint64), built for one threshold.

    `pairs()` is the self-join (every pair of distinct stored hashes within the threshold);
    `query(q)` finds stored hashes within the threshold of other ones; `groups()` labels
    connected components. Identical hashes are stored once (`inverse` maps input rows to
    them). The tables are planned for max(number of distinct hashes, `capacity`): the plan
    for the real size is the one the cost model finds cheapest for it; a larger `capacity`
    fixes the tables for corpora up to that size. Measured (bench/bench_dedup.py, random
    hashes, threshold 8, one core): self-join 5.0 s at 10^6, 233 s at 10^7: exact search at radius 8
    costs more per hash as the corpus grows (more tables, fuller buckets, arrays past the
    caches), so it is sub-quadratic, not linear; tables spread over executor tasks.
    """

    def __init__(self, hashes: np.ndarray, threshold: int, capacity: int = 0):
        hashes = np.asarray(hashes)
        if hashes.dtype != _U64:
            raise ValueError(f"hashes must be uint64, got {hashes.dtype}")
        self.threshold = int(threshold)
        if len(hashes) < 2 or bool((hashes[1:] > hashes[:-1]).all()):
            # already sorted and distinct (another index's `unique`): kept, not copied
            self.unique, self._inverse = hashes, None
        else:
            self.unique, inverse = np.unique(hashes, return_inverse=True)
            self._inverse = inverse.reshape(-1)
        self.planned = max(len(self.unique), int(capacity))
        self.tables = plan_tables(self.threshold, self.planned)
        kmin = min(t.bits for t in self.tables)
        if self.planned / 2.0**kmin > 64:
            log.warning("threshold %d: tables keep only %d bits, so about %.0f candidate pairs "
                        "per hash and table at %d hashes; the search gets close to quadratic",
                        self.threshold, kmin, self.planned / 2.0**kmin, self.planned)

    def __len__(self) -> int:
        return len(self.unique)

    @property
    def inverse(self) -> np.ndarray:
        """Index into `unique` of each input hash."""
        if self._inverse is None:
            self._inverse = np.arange(len(self.unique))
        return self._inverse

    def pairs(self, executor: Any = None, tables_per_task: int = 64, spanning: bool = False,
              verify: Verify | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Edges (a < b) between indices into `unique` within the threshold.

        `spanning=False`: every such pair. `spanning=True`: a task whose pairs outnumber its
        hashes returns a spanning forest of them instead (same components, linear memory):
        edges from each member to its component's smallest index, which may be farther
        apart than the threshold (dedup's `pairs` figure counts these edges).
        `verify(a, b)` (picklable) refuses candidate pairs before they count; it runs in the
        workers, before any forest is taken, so components are those of the verified pairs.
        """
        factory = partial(_pairs_worker, self.unique, self.threshold, spanning, verify)
        aa, bb = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for a, b in _run_batches(factory, self.tables, tables_per_task, executor, "dedup index"):
            aa.append(a)
            bb.append(b)
        a, b = np.concatenate(aa), np.concatenate(bb)
        if spanning and a.size:
            a, b = np.minimum(a, b), np.maximum(a, b)
        return unique_edges(a, b, len(self.unique))

    def groups(self, executor: Any = None, verify: Verify | None = None) -> np.ndarray:
        """Component label of each *input* row (smallest unique-hash index in the component)."""
        a, b = self.pairs(executor, spanning=True, verify=verify)
        return union_find(len(self.unique), a, b)[self.inverse]

    def query(self, queries: np.ndarray, executor: Any = None, tables_per_task: int = 64,
              verify: Verify | None = None, chunk: int = 1 << 23
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, index into `unique`, distance) for every stored hash within range.

        A batch join: per table one sort of the stored and one of the distinct queries, so
        ask with many queries at once rather than one at a time. Queries are answered
        `chunk` at a time (the stored side is sorted again for each), so the working arrays
        stay those of one chunk however many queries come. `verify(q, u)` gets indices into
        the distinct queries (`np.unique(queries)`) and into `unique`; with it, all queries
        are answered in one pass.
        """
        q = np.asarray(queries)
        if q.dtype != _U64:
            raise ValueError(f"queries must be uint64, got {q.dtype}")
        e = np.empty(0, np.int64)
        if not len(q) or not len(self.unique):
            return e, e, e
        step = len(q) if verify is not None else max(1, int(chunk))
        parts = [self._query_chunk(q[lo : lo + step], lo, executor, tables_per_task, verify)
                 for lo in range(0, len(q), step)]
        qi = np.concatenate([a for a, _ in parts])
        ui = np.concatenate([b for _, b in parts])
        del parts
        keep = np.lexsort((ui, qi))
        qi, ui = qi[keep], ui[keep]
        dist = np.bitwise_count(q[qi] ^ self.unique[ui]).astype(np.int64)
        return qi, ui, dist

    def _query_chunk(self, q: np.ndarray, offset: int, executor: Any, tables_per_task: int,
                     verify: Verify | None) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(q, kind="stable")  # equal queries in runs, no inverse array
        sq = q[order]
        small = np.int32 if len(q) < 2**31 else np.int64  # held through every table
        order = order.astype(small)
        head = np.ones(len(sq), bool)
        head[1:] = sq[1:] != sq[:-1]
        start = np.append(np.flatnonzero(head), len(sq)).astype(small)
        uq = sq[head]
        del sq, head
        factory = partial(_query_worker, self.unique, uq, self.threshold, verify)
        found = [np.empty(0, np.int64)]
        ns = np.int64(len(self.unique))
        for a, b in _run_batches(factory, self.tables, tables_per_task, executor, "dedup query"):
            found.append(a * ns + b)
        del uq, factory
        edge = np.unique(np.concatenate(found))
        del found
        uqi, ui = edge // ns, edge % ns
        # back to query rows: every query row holding a matched distinct value
        counts = start[uqi + 1] - start[uqi]
        rep = np.repeat(np.arange(len(uqi)), counts)
        at = np.arange(len(rep)) - np.repeat(np.cumsum(counts) - counts, counts)
        qi = order[start[uqi][rep] + at].astype(np.int64) + offset
        return qi, ui[rep]


def brute_force_pairs(hashes: np.ndarray, threshold: int, rows: int = 128, cols: int = 4096
                      ) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a < b) within `threshold` by comparing everything: the reference (O(N^2)).

    Tiles of `rows` x `cols` over the upper triangle, written into reused buffers that fit
    in cache; only tiles with a hit are searched for its position.
    """
    h = np.asarray(hashes)
    if h.dtype != _U64:
        raise ValueError(f"hashes must be uint64, got {h.dtype}")
    aa, bb = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for i, j in _tiles(h, h, threshold, rows, cols, upper=True):
        keep = i < j
        aa.append(i[keep])
        bb.append(j[keep])
    return np.concatenate(aa), np.concatenate(bb)


def brute_force_query(queries: np.ndarray, hashes: np.ndarray, threshold: int,
                      rows: int = 128, cols: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """All (query index, hash index) within `threshold` by comparing everything (O(Q N))."""
    q, h = np.asarray(queries), np.asarray(hashes)
    if q.dtype != _U64 or h.dtype != _U64:
        raise ValueError(f"hashes must be uint64, got {q.dtype} and {h.dtype}")
    found = list(_tiles(q, h, threshold, rows, cols, upper=False))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _tiles(left: np.ndarray, right: np.ndarray, threshold: int, rows: int, cols: int,
           upper: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    xor = np.empty((rows, cols), _U64)
    cnt = np.empty((rows, cols), np.uint8)
    hit = np.empty((rows, cols), bool)
    for r in range(0, len(left), rows):
        hr = left[r : r + rows, None]
        nr = len(hr)
        for c in range(r if upper else 0, len(right), cols):
            hc = right[None, c : c + cols]
            nc = hc.shape[1]
            x, k, m = xor[:nr, :nc], cnt[:nr, :nc], hit[:nr, :nc]
            np.bitwise_xor(hr, hc, out=x)
            np.bitwise_count(x, out=k)
            np.less_equal(k, threshold, out=m)
            if m.any():
                i, j = np.nonzero(m)
                yield (i + r).astype(np.int64), (j + c).astype(np.int64)
