"""The dedup stage: exact (sha256) and near-duplicate (64-bit pHash) groups.

Near-duplicates across train and test inflate every metric, so every row with a perceptual
hash gets a `group_id` (a content id shared by its exact and near copies) that the split
stage assigns as one unit. Within a group one real row is kept as the representative; the
other real copies get `status="duplicate"` with `error` naming the representative.

The near-duplicate search (`HammingIndex`) is exact radius search in Hamming space by
multi-index hashing: the 64 bits are cut into chunks with a radius each such that two hashes
within `threshold` bits agree within radius on at least one chunk (pigeonhole), and each
chunk is cut into blocks such that a chunk within radius `r` agrees exactly on at least
`blocks - r` of them. Every choice of exact blocks is one *table*: permute the bits so the
table's bits are on top (Hamming distance does not change), sort, and compare neighbours
inside each run of equal top bits with XOR + popcount. Each table costs one sort of N
uint64 and sequential passes, independent tables can run on different workers, and the
number of tables is planned for `capacity` hashes so that the candidate pairs per table stay
about linear in N up to that size: 10x more hashes cost about 10-12x the time (see
`bench/bench_dedup.py`); no all-pairs comparison happens anywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.executor import Executor, Resources
from pipeline.records import ManifestWriter, counts, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

HASH_BITS = 64
_U64 = np.uint64
_BLOCK = 1 << 15  # elements per cache-sized block of elementwise passes


@dataclass(frozen=True)
class DedupParams:
    # two 64-bit pHashes at most this many bits apart are near-duplicates; 8 groups resized,
    # recompressed, blurred, +-20% brightened and ~2% cropped copies and keeps distinct
    # photos apart (they are 20+ bits apart); see README "What dedup catches"
    threshold: int = 8
    near: bool = True  # false: exact (sha256 / identical pHash) duplicates only
    keep_duplicates: bool = False  # true: duplicates stay `ok` (still one group_id)
    # the index is planned for at least this many hashes, so its cost stays linear up to it
    capacity: int = 10_000_000
    tables_per_task: int = 64  # index tables per executor task

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 32:
            raise ValueError(f"dedup.threshold: {self.threshold}; allowed: 0..32 bits")
        if self.capacity < 1:
            raise ValueError(f"dedup.capacity: {self.capacity}; allowed: >= 1")
        if self.tables_per_task < 1:
            raise ValueError(f"dedup.tables_per_task: {self.tables_per_task}; allowed: >= 1")


# --------------------------------------------------------------------------- the index


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


def table_pairs(unique: np.ndarray, table: Table, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of sorted distinct `unique` that share `table`'s key within `threshold`.

    Sort the permuted hashes, then compare neighbours at offset d = 1, 2, ... inside each
    bucket until no bucket is longer than d: all reads are sequential. Matches are mapped
    back to indices by inverting the permutation and a binary search in `unique`.
    """
    empty = np.empty(0, np.int64), np.empty(0, np.int64)
    n = len(unique)
    if n < 2:
        return empty
    if unique.dtype != _U64 or not (unique[1:] > unique[:-1]).all():
        raise ValueError("table_pairs: hashes must be sorted, distinct uint64 (HammingIndex.unique)")
    return _table_pairs(unique, table, threshold)


def _table_pairs(unique: np.ndarray, table: Table, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    empty = np.empty(0, np.int64), np.empty(0, np.int64)
    n = len(unique)
    perm = _Permutation.of(table)
    v = perm.forward(unique)
    v.sort()
    same = (v[1:] ^ v[:-1]) <= perm.low  # row i and i + 1 share the key
    cur = np.flatnonzero(same)
    hits_a, hits_b = [], []
    d = 1
    while cur.size:
        ok = np.bitwise_count(v[cur] ^ v[cur + d]) <= threshold
        if ok.any():
            hits_a.append(v[cur[ok]])
            hits_b.append(v[cur[ok] + d])
        # rows i and i + d + 1 share the key iff same[i .. i + d] all hold
        cur = cur[cur + d < n - 1]
        cur = cur[same[cur + d]]
        d += 1
    if not hits_a:
        return empty
    a = np.searchsorted(unique, perm.inverse(np.concatenate(hits_a)))
    b = np.searchsorted(unique, perm.inverse(np.concatenate(hits_b)))
    return np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)


def union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (the smallest member index) of each of `n` nodes joined by edges a-b.

    Vectorised hook-and-compress union-find: every root hooks under the smallest root it
    touches, then paths are halved until every node points at its root.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi
        if not live.any():
            break
        a, b, lo, hi = a[live], b[live], lo[live], hi[live]
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _unique_edges(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    n64 = np.int64(max(n, 1))
    edge = np.unique(a.astype(np.int64) * n64 + b)
    return edge // n64, edge % n64


def _forest(n: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A spanning forest (member -> smallest index of its component) of the edges a-b."""
    root = union_find(n, a, b)
    a = np.flatnonzero(root != np.arange(n))
    return a, root[a]


def _pairs_worker(hashes: np.ndarray, threshold: int, spanning: bool):
    def run(tables: list[Table]) -> tuple[np.ndarray, np.ndarray]:
        n = len(hashes)
        aa, bb, count, bound = [np.empty(0, np.int64)], [np.empty(0, np.int64)], 0, n
        for t in tables:
            a, b = _table_pairs(hashes, t, threshold)
            aa.append(a)
            bb.append(b)
            count += a.size
            if count > bound:  # one pair is found by many tables: drop the repeats
                a, b = np.concatenate(aa), np.concatenate(bb)
                # dense data: keep a spanning forest (same components) instead of every
                # pair, so memory stays linear in the number of hashes
                a, b = _forest(n, a, b) if spanning else _unique_edges(a, b, n)
                aa, bb, count = [a], [b], a.size
                bound = max(n, 2 * count)
        return _unique_edges(np.concatenate(aa), np.concatenate(bb), n)

    return run


class HammingIndex:
    """Exact radius search over 64-bit hashes (uint64), built for one threshold.

    `pairs()` is the self-join (every pair of distinct stored hashes within the threshold);
    `query(q)` finds stored hashes within the threshold of new ones; `groups()` labels
    connected components. Identical hashes are stored once (`inverse` maps input rows to them).
    """

    def __init__(self, hashes: np.ndarray, threshold: int, capacity: int = 10_000_000):
        hashes = np.asarray(hashes)
        if hashes.dtype != _U64:
            raise ValueError(f"hashes must be uint64, got {hashes.dtype}")
        self.threshold = int(threshold)
        self.unique, self.inverse = np.unique(hashes, return_inverse=True)
        planned = max(len(self.unique), capacity)
        self.tables = plan_tables(self.threshold, planned)
        kmin = min(t.bits for t in self.tables)
        if planned / 2.0**kmin > 64:
            log.warning("threshold %d: tables keep only %d bits, so about %.0f candidate pairs "
                        "per hash and table at %d hashes; the search gets close to quadratic",
                        self.threshold, kmin, planned / 2.0**kmin, planned)

    def __len__(self) -> int:
        return len(self.unique)

    def pairs(self, executor: Executor | None = None, tables_per_task: int = 64,
              spanning: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Edges (a < b) between indices into `unique` within the threshold.

        `spanning=False`: every such pair. `spanning=True`: a task whose pairs outnumber its
        hashes returns a spanning forest of them instead (same components, linear memory).
        """
        batches = [self.tables[i : i + tables_per_task]
                   for i in range(0, len(self.tables), tables_per_task)]
        factory = partial(_pairs_worker, self.unique, self.threshold, spanning)
        if executor is None:
            results: Iterator = map(factory(), batches)
        else:
            results = executor.map(factory, batches, Resources(cpus=1.0), desc="dedup index")
        aa, bb = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for a, b in results:
            aa.append(a)
            bb.append(b)
        a, b = np.concatenate(aa), np.concatenate(bb)
        if spanning and a.size:
            a, b = np.minimum(a, b), np.maximum(a, b)
        return _unique_edges(a, b, len(self.unique))

    def groups(self, executor: Executor | None = None) -> np.ndarray:
        """Component label of each *input* row (smallest unique-hash index in the component)."""
        a, b = self.pairs(executor, spanning=True)
        return union_find(len(self.unique), a, b)[self.inverse]

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, index into `unique`, distance) for every stored hash within range.

        A batch join: one sort of the stored hashes per table, so ask with many queries at
        once rather than one at a time.
        """
        q = np.asarray(queries)
        if q.dtype != _U64:
            raise ValueError(f"queries must be uint64, got {q.dtype}")
        e = np.empty(0, np.int64)
        if not len(q) or not len(self.unique):
            return e, e, e
        nu = np.int64(len(self.unique))
        found: list[np.ndarray] = []
        count, bound = 0, len(q)
        for t in self.tables:
            perm = _Permutation.of(t)
            vs = perm.forward(self.unique)
            vs.sort()
            vq = perm.forward(q)
            oq = np.argsort(vq)  # sorted needles make the binary search cache-friendly
            vq = vq[oq]
            low = perm.low
            # walk each query's bucket from its first stored row on
            cand = np.arange(len(vq))
            pos = np.searchsorted(vs, vq & ~low)
            while cand.size:
                inside = pos < len(vs)
                cand, pos = cand[inside], pos[inside]
                z = vs[pos] ^ vq[cand]
                same = z <= low
                cand, pos, z = cand[same], pos[same], z[same]
                ok = np.bitwise_count(z) <= self.threshold
                if ok.any():
                    ui = np.searchsorted(self.unique, perm.inverse(vs[pos[ok]]))
                    found.append(oq[cand[ok]].astype(np.int64) * nu + ui)
                    count += ui.size
                pos = pos + 1
            if count > bound:  # one match is found by many tables: drop the repeats
                found = [np.unique(np.concatenate(found))]
                count = found[0].size
                bound = max(len(q), 2 * count)
        if not found:
            return e, e, e
        edge = np.unique(np.concatenate(found))
        qi, ui = edge // nu, edge % nu
        dist = np.bitwise_count(q[qi] ^ self.unique[ui]).astype(np.int64)
        return qi, ui, dist


def brute_force_pairs(hashes: np.ndarray, threshold: int, rows: int = 128, cols: int = 4096
                      ) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a < b) within `threshold` by comparing everything: the reference (O(N^2)).

    Tiles of `rows` x `cols` over the upper triangle, written into reused buffers that fit
    in cache; only tiles with a hit are searched for its position.
    """
    h = np.asarray(hashes)
    if h.dtype != _U64:
        raise ValueError(f"hashes must be uint64, got {h.dtype}")
    n = len(h)
    xor = np.empty((rows, cols), _U64)
    cnt = np.empty((rows, cols), np.uint8)
    hit = np.empty((rows, cols), bool)
    aa, bb = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for r in range(0, n, rows):
        hr = h[r : r + rows, None]
        nr = len(hr)
        for c in range(r, n, cols):
            hc = h[None, c : c + cols]
            nc = hc.shape[1]
            x, k, m = xor[:nr, :nc], cnt[:nr, :nc], hit[:nr, :nc]
            np.bitwise_xor(hr, hc, out=x)
            np.bitwise_count(x, out=k)
            np.less_equal(k, threshold, out=m)
            if not m.any():
                continue
            i, j = np.nonzero(m)
            i, j = i + r, j + c
            keep = i < j
            aa.append(i[keep].astype(np.int64))
            bb.append(j[keep].astype(np.int64))
    return np.concatenate(aa), np.concatenate(bb)


def parse_phash(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hashes, valid mask) from 16-hex-digit strings; anything else is invalid."""
    arr = pa.chunked_array([values]) if isinstance(values, pa.Array) else values
    valid = pc.fill_null(pc.match_substring_regex(arr, r"^[0-9a-fA-F]{16}$"), False)
    valid_np = valid.to_numpy(zero_copy_only=False).astype(bool)
    hashes = np.zeros(len(arr), _U64)
    if valid_np.any():
        good = pc.filter(arr, valid).to_pylist()
        hashes[valid_np] = np.frombuffer(bytes.fromhex("".join(good)), dtype=">u8")
    return hashes, valid_np


# --------------------------------------------------------------------------- the stage

_COLUMNS = ("key", "sha256", "phash", "status", "label", "kind", "width", "height", "nbytes")


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist()


def _plan_groups(table: pa.Table, p: DedupParams, executor: Executor | None
                 ) -> tuple[list[str | None], dict[int, tuple[int, str]], dict[str, Any]]:
    """Per-row group ids, {row: (representative row, kind of copy)} for duplicates, figures."""
    n = table.num_rows
    keys = _column(table, "key")
    sha = _column(table, "sha256")
    status = _column(table, "status")
    label = _column(table, "label")
    kind = _column(table, "kind")
    hashes, has_phash = parse_phash(table.column("phash"))
    # rows of outside benchmarks (status `benchmark`) are indexed like blocklist rows
    indexed = has_phash & np.array([s in ("ok", "blocklist", "benchmark") for s in status], bool)
    idx_rows = np.flatnonzero(indexed)

    t0 = time.perf_counter()
    # graph nodes: rows [0, n), then one node per distinct pHash, then one per distinct sha256
    a_parts, b_parts = [], []
    nu = 0
    index = None
    if idx_rows.size:
        index = HammingIndex(hashes[idx_rows], p.threshold if p.near else 0, p.capacity)
        nu = len(index)
        a_parts.append(idx_rows)
        b_parts.append(n + index.inverse.astype(np.int64))
        if p.near and p.threshold > 0:
            ea, eb = index.pairs(executor, p.tables_per_task, spanning=True)
            a_parts.append(n + ea)
            b_parts.append(n + eb)
    sha_rows = [i for i in range(n) if sha[i] and (indexed[i] or status[i] == "ok")]
    if sha_rows:
        _, sha_inv = np.unique(np.array([sha[i] for i in sha_rows], dtype=object),
                               return_inverse=True)
        a_parts.append(np.array(sha_rows, np.int64))
        b_parts.append(n + nu + sha_inv.astype(np.int64))
    a = np.concatenate(a_parts) if a_parts else np.empty(0, np.int64)
    b = np.concatenate(b_parts) if b_parts else np.empty(0, np.int64)
    root = union_find(n + nu + len(sha_rows), a, b)[:n]
    index_s = time.perf_counter() - t0

    member = indexed | np.array([bool(sha[i]) and status[i] == "ok" for i in range(n)], bool)
    # group id: the smallest sha256 (else key) in the component, so it is a content id
    content = [(sha[i] or keys[i]) if member[i] else None for i in range(n)]
    gid_of_root: dict[int, str] = {}
    for i in np.flatnonzero(member):
        r = int(root[i])
        c = content[i]
        if r not in gid_of_root or c < gid_of_root[r]:
            gid_of_root[r] = c
    group_ids = [gid_of_root[int(root[i])] if member[i] else None for i in range(n)]

    # representatives: real rows keep one per group; tampered/synthetic rows keep one per
    # sha256 (two forgeries of one photo are near-duplicates by design, not copies)
    width = np.nan_to_num(np.array(_column(table, "width"), dtype=float))
    height = np.nan_to_num(np.array(_column(table, "height"), dtype=float))
    nbytes = np.nan_to_num(np.array(_column(table, "nbytes"), dtype=float))
    units: dict[tuple, list[int]] = {}
    for i in np.flatnonzero(member):
        if status[i] != "ok" or kind[i] == "blocklist":
            continue
        unit = ("real", int(root[i])) if label[i] == "real" else ("copy", sha[i] or keys[i])
        units.setdefault(unit, []).append(int(i))
    dups: dict[int, tuple[int, str]] = {}
    for rows in units.values():
        if len(rows) < 2:
            continue
        # largest image, then most bytes, then the smallest key: deterministic
        rep = min(rows, key=lambda i: (-width[i] * height[i], -nbytes[i], keys[i]))
        for i in rows:
            if i != rep:
                exact = bool(sha[i]) and sha[i] == sha[rep]
                dups[i] = (rep, "exact" if exact else "near")

    group_size: dict[str, int] = {}
    for g in group_ids:
        if g is not None:
            group_size[g] = group_size.get(g, 0) + 1
    block_groups = {group_ids[i] for i in range(n) if kind[i] == "blocklist" and group_ids[i]}
    figures = {
        "indexed": int(indexed.sum()),
        "unique_phash": int(nu),
        "index_tables": len(index.tables) if index is not None else 0,
        "index_seconds": round(index_s, 3),
        "groups": len(group_size),
        "groups_with_copies": sum(1 for v in group_size.values() if v > 1),
        "exact_duplicates": sum(1 for _, k in dups.values() if k == "exact"),
        "near_duplicates": sum(1 for _, k in dups.values() if k == "near"),
        "blocklist_groups": len(block_groups),
        "blocklist_near_rows": sum(1 for i in range(n) if group_ids[i] in block_groups
                                   and kind[i] != "blocklist"),
        "no_phash_ok_rows": int(sum(1 for i in range(n) if status[i] == "ok" and not has_phash[i])),
        "threshold": p.threshold,
    }
    return group_ids, dups, figures


def run(params: Any, inputs: dict[str, Path], out: Path, executor: Executor) -> dict:
    """Groups exact and near copies, marks all but one real copy per group as duplicates."""
    p: DedupParams = params.dedup
    src = Path(inputs["manifest"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(src, columns=list(_COLUMNS))
    group_ids, dups, figures = _plan_groups(table, p, executor)
    keys = _column(table, "key")
    hashes, _ = parse_phash(table.column("phash"))
    del table

    rep_rows = []
    with ManifestWriter(out / "manifest.parquet") as w:
        for i, r in enumerate(iter_records(src)):
            if r.key != keys[i]:
                raise RuntimeError(f"{src}: row {i} changed while reading ({r.key} != {keys[i]})")
            r.group_id = group_ids[i] if group_ids[i] is not None else r.group_id
            if i in dups:
                rep, how = dups[i]
                dist = int(np.bitwise_count(hashes[i] ^ hashes[rep]))
                note = (f"exact duplicate of {keys[rep]}" if how == "exact"
                        else f"near duplicate of {keys[rep]} (phash distance {dist})")
                if p.keep_duplicates:
                    r.duplicate_of, r.duplicate_kind = keys[rep], how
                else:
                    r.status, r.error, r.stage = "duplicate", note, "dedup"
                rep_rows.append(rep)
            w.write(r)
    reps = {keys[i] for i in rep_rows}
    groups = pa.table({
        "key": keys,
        "group_id": group_ids,
        "representative": [k in reps for k in keys],
        "duplicate_of": [keys[dups[i][0]] if i in dups else None for i in range(len(keys))],
    })
    pq.write_table(groups, out / "groups.parquet")
    metrics: dict[str, Any] = counts(iter_records(out / "manifest.parquet"))
    metrics["dedup"] = figures
    log.info("dedup: %d rows, %d groups, %d exact + %d near duplicates", len(keys),
             figures["groups"], figures["exact_duplicates"], figures["near_duplicates"])
    return metrics


STAGE = Stage(
    name="dedup",
    help="exact and near-duplicate groups over real sources",
    params=DedupParams,
    run=run,
    reads=("ingest",),
    writes={"dedup": "dedup"},
)
