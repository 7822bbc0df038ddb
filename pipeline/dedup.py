"""The dedup stage: exact (sha256) and near-duplicate (64-bit pHash) groups.

Near-duplicates across train and test inflate every metric, so every row with a perceptual
hash gets a `group_id` (a content id shared by its exact and near copies) that the split
stage assigns as one unit. Within a group one real row is kept as the representative; the
other real copies get `status="duplicate"` with `error` naming the representative.

The near-duplicate search (`HammingIndex`) is exact radius search in Hamming space by
multi-index hashing: the 64 bits are cut into chunks with a radius each such that two hashes
within `threshold` bits agree within radius on at least one chunk (pigeonhole), and each
chunk is cut into blocks such that a chunk within radius `r` agrees exactly on at least
`blocks - r` of them. Every choice of exact blocks is one *table*: sort by those bits, pair
the rows that share them, verify the full distance with a popcount. Each table costs one
sort of N keys, independent tables can run on different workers, and the number of tables is
planned for `capacity` hashes so that the candidate pairs per table stay about linear in N up
to that size; no all-pairs comparison happens anywhere.
"""

from __future__ import annotations

import json
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

log = logging.getLogger(__name__)

HASH_BITS = 64
_U64 = np.uint64


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


def _chunk_tables(offset: int, length: int, radius: int, n: float) -> tuple[float, list[Table]]:
    """Cheapest block count for one chunk: (estimated cost per hash, tables)."""
    best: tuple[float, int] | None = None
    for nblocks in range(radius + 1, length + 1):
        ntables = comb(nblocks, radius)
        if ntables > 20_000:
            break
        sizes = sorted(w for _, w in _split_bits(offset, length, nblocks))
        kmin = sum(sizes[: nblocks - radius])
        # one sort per table plus the candidate pairs it makes (about n / 2^bits per hash)
        cost = ntables * (1.0 + 0.3 * n / 2.0 / 2.0**kmin)
        if best is None or cost < best[0]:
            best = (cost, nblocks)
    if best is None:
        raise ValueError(f"no table plan for a {length}-bit chunk at radius {radius}")
    blocks = _split_bits(offset, length, best[1])
    tables = [
        Table(_merge_runs([blocks[i] for i in exact]))
        for exact in combinations(range(best[1]), best[1] - radius)
    ]
    return best[0], tables


def plan_tables(threshold: int, n: int) -> list[Table]:
    """Tables such that every pair within `threshold` bits shares a key in at least one.

    Chunks j with radii r_j and sum(r_j + 1) >= threshold + 1: a pair within `threshold`
    differs in at most r_j bits on some chunk j. Tries 1..threshold+1 chunks and keeps the plan
    with the lowest estimated cost for `n` hashes.
    """
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"threshold {threshold}; allowed: 0..{HASH_BITS - 1}")
    n = max(2, int(n))
    best: tuple[float, list[Table]] | None = None
    for m in range(1, min(threshold + 1, 16) + 1):
        chunks = _split_bits(0, HASH_BITS, m)
        spare = threshold + 1 - m  # sum of radii
        radii = [spare // m + (1 if i < spare % m else 0) for i in range(m)]
        cost, tables = 0.0, []
        try:
            for (off, length), r in zip(chunks, radii):
                c, t = _chunk_tables(off, length, r, n)
                cost += c
                tables += t
        except ValueError:
            continue
        if best is None or cost < best[0]:
            best = (cost, tables)
    if best is None:  # unreachable: threshold + 1 chunks at radius 0 always plan
        raise RuntimeError(f"no table plan for threshold {threshold}")
    return best[1]


def _table_key(hashes: np.ndarray, table: Table) -> np.ndarray:
    key = np.zeros(hashes.shape, _U64)
    pos = 0
    for shift, width in table.runs:
        part = (hashes >> _U64(shift)) & _U64((1 << width) - 1)
        key |= part << _U64(pos) if pos else part
        pos += width
    return key


def table_pairs(hashes: np.ndarray, table: Table, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of `hashes` that share `table`'s key and are within `threshold`."""
    n = len(hashes)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    idx_bits = max(1, (n - 1).bit_length())
    key = _table_key(hashes, table)
    spare = HASH_BITS - idx_bits
    if table.bits > spare:  # fewer key bits: more candidates, never fewer true pairs
        key >>= _U64(table.bits - spare)
    packed = (key << _U64(idx_bits)) | np.arange(n, dtype=_U64)
    packed.sort()
    keys = packed >> _U64(idx_bits)
    order = (packed & _U64((1 << idx_bits) - 1)).astype(np.int64)
    del packed, key
    cur = np.flatnonzero(keys[1:] == keys[:-1])
    out_a, out_b = [], []
    d = 1
    while cur.size:
        a, b = order[cur], order[cur + d]
        ok = np.bitwise_count(hashes[a] ^ hashes[b]) <= threshold
        if ok.any():
            a, b = a[ok], b[ok]
            out_a.append(np.minimum(a, b))
            out_b.append(np.maximum(a, b))
        d += 1
        cur = cur[cur + d < n]
        cur = cur[keys[cur + d] == keys[cur]]
    if not out_a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(out_a), np.concatenate(out_b)


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


def _pairs_worker(hashes: np.ndarray, threshold: int, spanning: bool):
    def run(tables: list[Table]) -> tuple[np.ndarray, np.ndarray]:
        aa, bb = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for t in tables:
            a, b = table_pairs(hashes, t, threshold)
            aa.append(a)
            bb.append(b)
        a, b = _unique_edges(np.concatenate(aa), np.concatenate(bb), len(hashes))
        if spanning and a.size > len(hashes):
            # a dense batch: a spanning forest (member -> root) keeps the components, not
            # every pair, so memory stays linear in the number of hashes
            root = union_find(len(hashes), a, b)
            a = np.flatnonzero(root != np.arange(len(hashes)))
            b = root[a]
        return a, b

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
        self.tables = plan_tables(self.threshold, max(len(self.unique), capacity))

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
        """(query index, index into `unique`, distance) for every stored hash within range."""
        q = np.asarray(queries, _U64)
        nu = len(self.unique)
        if not len(q) or not nu:
            e = np.empty(0, np.int64)
            return e, e, e
        out_q, out_u = [], []
        for t in self.tables:
            kb = _table_key(self.unique, t)
            order = np.argsort(kb, kind="stable")
            kb = kb[order]
            kq = _table_key(q, t)
            lo = np.searchsorted(kb, kq, "left")
            hi = np.searchsorted(kb, kq, "right")
            cnt = hi - lo
            if not cnt.any():
                continue
            qi = np.repeat(np.arange(len(q)), cnt)
            start = np.repeat(lo - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt)
            ui = order[start + np.arange(len(qi))]
            ok = np.bitwise_count(q[qi] ^ self.unique[ui]) <= self.threshold
            out_q.append(qi[ok])
            out_u.append(ui[ok])
        if not out_q:
            e = np.empty(0, np.int64)
            return e, e, e
        qi, ui = np.concatenate(out_q), np.concatenate(out_u)
        edge = np.unique(qi.astype(np.int64) * nu + ui)
        qi, ui = edge // nu, edge % nu
        dist = np.bitwise_count(q[qi] ^ self.unique[ui]).astype(np.int64)
        return qi, ui, dist


def brute_force_pairs(hashes: np.ndarray, threshold: int, block: int = 2048
                      ) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a < b) within `threshold` by comparing everything: the reference (O(N^2))."""
    h = np.asarray(hashes, _U64)
    aa, bb = [], []
    for s in range(0, len(h), block):
        d = np.bitwise_count(h[s : s + block, None] ^ h[None, :])
        i, j = np.nonzero(d <= threshold)
        i = i + s
        keep = i < j
        aa.append(i[keep])
        bb.append(j[keep])
    if not aa:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(aa).astype(np.int64), np.concatenate(bb).astype(np.int64)


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


def _merge_extra(extra: str | None, **items: Any) -> str:
    try:
        d = json.loads(extra) if extra else {}
    except json.JSONDecodeError:
        d = {"extra": extra}
    if not isinstance(d, dict):
        d = {"extra": d}
    d.update(items)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


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
    indexed = has_phash & np.array([s in ("ok", "blocklist") for s in status], bool)
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
                    r.extra = _merge_extra(r.extra, duplicate_of=keys[rep], duplicate=how)
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
