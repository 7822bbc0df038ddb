"""The split stage: train / val / test / test_ood by near-duplicate group, so nothing leaks.

**A group's split is a function of the corpus groups alone.** The *corpus rows* are the
rows that came from the corpus (everything but `kind == "synthesized"`): real images,
tampered images of forensic datasets and `pairs` edits. Their near-duplicate groups and
domains decide every group's split, so adding forgeries or changing the generator mix never
moves a real image, and the synthesize stage can ask, before forging, which split a source
is in (`plan_groups`) and draw each splice or face-swap donor from that split. A forgery
goes where its source's group is; a `pairs` edit goes where its original's group is.

**Ratios, stratified by domain.** Each group weighs its corpus rows (near-duplicate copies
marked `duplicate` do not count). Inside each domain, groups are laid out in the order of a
stable hash of (seed, group) and cut where the cumulative weight crosses the cumulative
ratios (a group goes to the split its weight's midpoint falls in), so each domain, and so
the whole, honours the ratios as closely as group sizes allow. A domain with at least as
many groups as splits of non-zero ratio gets a group in every such split; domains too small
for that are pooled and cut together, so with at least as many groups as splits no split is
empty. The same manifest and seed always give the same split.

**Streaming.** The cut is computed in bounded memory: a histogram of the group hashes per
domain (2^16 bins) finds, for each ratio boundary, the few bins between the boundary in hash
space and the boundary in cumulative weight; only groups in those bins (and the groups of
domains small enough to hold whole) are read into memory and cut exactly. Every other group
is on the same side of every boundary in both orders, so its split is `choose(hash)`.

Rows whose generator or operation is listed in `ood_generators` / `ood_operations` go to
`test_ood` only. Rows in the group of a `blocklist` item (public benchmark test sets, say),
or whose splice / face-swap donor is, are never shipped: `status=blocklisted`, with the item
named in `error`. A forgery whose donor's group is in another split than its own (manifests
made before donors were drawn per split) is never shipped either: `status=donor_leak`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.executor import Executor
from pipeline.params import Params
from pipeline.records import FIELDS, SCHEMA, ManifestWriter, Record
from pipeline.stage import Stage

log = logging.getLogger(__name__)

RATIO_SPLITS = ("train", "val", "test")
SYNTHESIZED = "synthesized"  # `kind` of the rows the synthesize stage makes
_BINS = 1 << 16  # histogram bins of the 64-bit group hash, per domain
_BIN_SHIFT = 64 - 16
_SMALL_BINS = 4096  # a domain occupying fewer bins is small: all its groups are held and cut
_BATCH = 8192  # rows per record batch read from a manifest
_COUNTED = ("status", "domain", "operation", "generator", "label", "split")  # records.counts
_COLUMNS = ("key", "group_id", "source_id", "parent_key", "kind", "status", "domain", "label",
            "donor_key")


@dataclass(frozen=True)
class SplitParams:
    # a distribution: a file's `ratios` replaces the default whole (splits it omits get 0)
    ratios: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        metadata={"merge": False},
    )
    ood_generators: tuple[str, ...] = ()  # these generators' samples go only to test_ood
    ood_operations: tuple[str, ...] = ()  # and these operations'

    def __post_init__(self) -> None:
        for name, v in self.ratios.items():
            if name not in RATIO_SPLITS:
                raise ValueError(
                    f"split.ratios: unknown split {name!r}; allowed: {', '.join(RATIO_SPLITS)}"
                )
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"split.ratios.{name}: {v!r}; allowed: 0.0 to 1.0")
        total = sum(self.ratios.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.ratios must sum to 1; they sum to {total:g}")


# ----------------------------------------------------------------------------- hashing


def group_hash(seed: int, group: str) -> int:
    """A stable 64-bit number for (seed, group): the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big")


def unit_hash(seed: int, unit: str) -> float:
    """`group_hash` as a uniform number in [0, 1)."""
    return group_hash(seed, unit) / 2.0**64


def key_hash(key: str) -> int:
    """A 64-bit id of a row key, for compact lookups of donors and originals."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def choose(u: float, ratios: Mapping[str, float]) -> str:
    acc = 0.0
    for name in RATIO_SPLITS:
        acc += ratios.get(name, 0.0)
        if u < acc:
            return name
    return next(n for n in reversed(RATIO_SPLITS) if ratios.get(n, 0.0) > 0)


def group_key(row: Any) -> str:
    """The group a row belongs to: its near-duplicate group (a forgery carries its source's),
    else the original item's hash, else its parent, else itself."""
    if isinstance(row, dict):
        return row["group_id"] or row["source_id"] or row["parent_key"] or row["key"]
    return row.group_id or row.source_id or row.parent_key or row.key


def is_corpus(kind: str | None) -> bool:
    return kind != SYNTHESIZED


BENCHMARK = "benchmark"  # ingest's status for rows of outside benchmarks (evaluate.benchmarks)


def _weighs(kind: str | None, status: str | None, parent_key: str | None,
            group_id: str | None) -> bool:
    """Does a row count in its group's weight? Corpus rows that dedup placed in a group and
    kept (a `pairs` edit follows its original instead). Nothing a later stage changes."""
    return (kind != SYNTHESIZED and kind != "blocklist" and group_id is not None
            and status not in ("duplicate", BENCHMARK) and parent_key is None)


# ----------------------------------------------------------------------------- reading


class _Columns:
    """Re-iterable record batches of some manifest columns, as {column: list}: from a
    parquet path, a pyarrow Table, or (materialised once) an iterable of Records / dicts."""

    def __init__(self, rows: Any, columns: Iterable[str] = _COLUMNS):
        self.columns = tuple(columns)
        if isinstance(rows, (str, Path)):
            self.path: Path | None = Path(rows)
            self.table: pa.Table | None = None
        elif isinstance(rows, pa.Table):
            self.path, self.table = None, rows
        else:
            self.path = None
            dicts = [r.to_dict() if isinstance(r, Record) else dict(r) for r in rows]
            self.table = pa.Table.from_pylist(
                [{c: d.get(c) for c in self.columns} for d in dicts],
                schema=pa.schema([pa.field(c, pa.string()) for c in self.columns]),
            )

    def __iter__(self) -> Iterator[dict[str, list]]:
        if self.path is not None:
            names = pq.ParquetFile(self.path).schema_arrow.names
            have = [c for c in self.columns if c in names]
            batches: Iterable[pa.RecordBatch] = read_batches(self.path, have, _BATCH)
        else:
            have = [c for c in self.columns if c in self.table.column_names]
            batches = self.table.select(have).to_batches(max_chunksize=_BATCH)
        for b in batches:
            n = b.num_rows
            out = {c: b.column(c).to_pylist() for c in have}
            for c in self.columns:
                out.setdefault(c, [None] * n)
            yield out


def read_batches(path: str | Path, columns: list[str] | None = None,
                 batch_size: int = _BATCH) -> Iterator[pa.RecordBatch]:
    """A parquet file's record batches, one row group at a time. (`ParquetFile.iter_batches`
    holds on to memory in proportion to the rows read, about 27 bytes a row in pyarrow 26.)"""
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, columns=columns, use_threads=False)
        yield from table.to_batches(max_chunksize=batch_size)


def conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A manifest batch in the record schema's column order and types."""
    if batch.schema.equals(SCHEMA, check_metadata=True):
        return batch
    cols = []
    for f in SCHEMA:
        if f.name in batch.schema.names:
            cols.append(batch.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(cols, schema=SCHEMA)


def records_of(batch: pa.RecordBatch) -> list[Record]:
    """The records of a batch in the record schema (see `conform`)."""
    cols = batch.to_pydict()
    return [Record(*values) for values in zip(*(cols[f] for f in FIELDS))]


def _group_hashes(groups: list[str], seed: int) -> np.ndarray:
    cache: dict[str, int] = {}
    out = np.empty(len(groups), np.uint64)
    for i, g in enumerate(groups):
        h = cache.get(g)
        if h is None:
            h = cache[g] = group_hash(seed, g)
        out[i] = h
    return out


# ----------------------------------------------------------------------------- planning


def _cuts(weights: list[int], cum: list[float], positive: list[bool], force: bool) -> list[int]:
    """Cut points of groups laid out in order: group i goes to split k when its weight's
    midpoint falls in [cum[k-1], cum[k]) of the total. With `force` (and enough groups), the
    cuts move just enough that every split of non-zero ratio gets a group."""
    total = float(sum(weights)) or 1.0
    mids, acc = [], 0.0
    for w in weights:
        mids.append((acc + w / 2.0) / total)
        acc += w
    n = len(weights)
    cuts = [0] + [int(np.searchsorted(mids, c, side="left")) for c in cum[:-1]] + [n]
    if force and n >= sum(positive):
        for k in range(1, len(cuts) - 1):
            cuts[k] = max(cuts[k], cuts[k - 1] + positive[k - 1])
        for k in range(len(cuts) - 2, 0, -1):
            cuts[k] = min(cuts[k], cuts[k + 1] - positive[k])
    return cuts


def _split_of_cut(cuts: list[int], i: int) -> int:
    return int(sum(1 for c in cuts[1:-1] if c <= i))


class GroupSplits:
    """The split of every corpus group, in memory that does not grow with the corpus.

    `of_group(group_id)` (or `of_hash(group_hash(seed, group_id))`) gives `train`, `val` or
    `test`, or None for a group that a blocklist item is in (never shipped).
    """

    def __init__(self, p: SplitParams, seed: int, assigned: dict[int, str],
                 blocked: dict[int, str], figures: dict[str, Any]):
        self.ratios = dict(p.ratios)
        self.seed = seed
        self._assigned = assigned  # group hash -> split where it differs from choose(hash)
        self.blocked = blocked  # group hash -> the blocklist item's key
        self.figures = figures

    def of_hash(self, h: int) -> str | None:
        if h in self.blocked:
            return None
        s = self._assigned.get(h)
        return s if s is not None else choose(h / 2.0**64, self.ratios)

    def of_group(self, group: str) -> str | None:
        return self.of_hash(group_hash(self.seed, group))

    def of_record(self, row: Any) -> str | None:
        """The split of a real row's group, or a forgery's source's group."""
        return self.of_group(group_key(row))


def plan_groups(rows: Any, p: SplitParams, seed: int) -> GroupSplits:
    """Decides the split of every corpus group of a manifest (a parquet path, a pyarrow
    Table, or an iterable of Records / dicts); forgeries in it are ignored. A pure function
    of the corpus rows: the dedup manifest (before synthesis) and the masks manifest (after)
    give the same answer."""
    cols = rows if isinstance(rows, _Columns) else _Columns(rows)
    order = list(RATIO_SPLITS)
    cum = list(np.cumsum([p.ratios.get(s, 0.0) for s in order]))
    cum[-1] = 1.0
    positive = [p.ratios.get(s, 0.0) > 0 for s in order]

    # pass 0: groups of blocklist items and of outside benchmarks' images (few)
    blocked: dict[int, str] = {}
    for b in cols:
        for key, gid, sid, kind, st in zip(b["key"], b["group_id"], b["source_id"], b["kind"],
                                           b["status"]):
            if kind == "blocklist" or st == BENCHMARK:
                h = group_hash(seed, gid or sid or key)
                blocked[h] = min(blocked.get(h, key), key)

    # pass 1: weight histogram of group hashes, per domain
    hist: dict[str, np.ndarray] = {}
    for b in cols:
        idx = [i for i, (k, s, pk, g) in enumerate(zip(b["kind"], b["status"], b["parent_key"],
                                                       b["group_id"])) if _weighs(k, s, pk, g)]
        if not idx:
            continue
        hs = _group_hashes([b["group_id"][i] for i in idx], seed)
        keep = np.array([int(h) not in blocked for h in hs], bool) if blocked else None
        doms = np.array([str(b["domain"][i]) for i in idx])
        bins = (hs >> np.uint64(_BIN_SHIFT)).astype(np.int64)
        for d in np.unique(doms):
            sel = doms == d if keep is None else (doms == d) & keep
            h = hist.setdefault(str(d), np.zeros(_BINS, np.int64))
            h += np.bincount(bins[sel], minlength=_BINS)

    small = {d for d, h in hist.items() if int(np.count_nonzero(h)) < _SMALL_BINS}
    # band bins of each large domain: between each boundary in hash space and in weight
    intervals: dict[str, list[tuple[int, int]]] = {}
    band = np.zeros(_BINS, bool)
    for d, h in hist.items():
        if d in small:
            continue
        prefix = np.concatenate([[0], np.cumsum(h)])
        total = prefix[-1]
        spans = []
        for c in cum[:-1]:
            hb = min(int(c * _BINS), _BINS - 1)
            wb = int(np.searchsorted(prefix, c * total, side="right")) - 1  # crossing bin
            wb = min(max(wb, 0), _BINS - 1)
            spans.append((min(hb, wb), max(hb, wb)))
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        intervals[d] = merged
        for lo, hi in merged:
            band[lo : hi + 1] = True

    # pass 2: hold the groups of small domains and of band bins
    held: dict[int, list] = {}  # group hash -> [weight, Counter(domain)]
    for b in cols:
        idx = [i for i, (k, s, pk, g) in enumerate(zip(b["kind"], b["status"], b["parent_key"],
                                                       b["group_id"])) if _weighs(k, s, pk, g)]
        if not idx:
            continue
        hs = _group_hashes([b["group_id"][i] for i in idx], seed)
        bins = (hs >> np.uint64(_BIN_SHIFT)).astype(np.int64)
        inband = band[bins]
        for j, i in enumerate(idx):
            d = str(b["domain"][i])
            if not (inband[j] or d in small):
                continue
            h = int(hs[j])
            if h in blocked:
                continue
            e = held.get(h)
            if e is None:
                e = held[h] = [0, Counter()]
            e[0] += 1
            e[1][d] += 1

    def stratum(e: list) -> str:
        c: Counter = e[1]
        top = max(c.values())
        return min(d for d, v in c.items() if v == top)

    by_stratum: dict[str, list[int]] = defaultdict(list)
    for h, e in held.items():
        by_stratum[stratum(e)].append(h)
    assigned: dict[int, str] = {}

    def assign(hs: list[int], cuts: list[int]) -> None:
        for i, h in enumerate(hs):
            s = order[_split_of_cut(cuts, i)]
            if s != choose(h / 2.0**64, p.ratios):
                assigned[h] = s

    n_pos = sum(positive)
    covered = bool(set(hist) - small)  # a large domain fills every split
    pool: list[int] = []
    for d in sorted(small):
        hs = sorted(by_stratum.get(d, []))
        if len(hs) >= n_pos:
            covered = True
            assign(hs, _cuts([held[h][0] for h in hs], cum, positive, force=True))
        else:
            pool.extend(hs)
    pool.sort()
    if pool:
        assign(pool, _cuts([held[h][0] for h in pool], cum, positive, force=not covered))
    for d, spans in intervals.items():
        h_d = hist[d]
        prefix = np.concatenate([[0], np.cumsum(h_d)])
        total = float(prefix[-1]) or 1.0
        mine = sorted(by_stratum.get(d, []))
        bins = {h: h >> _BIN_SHIFT for h in mine}
        for lo, hi in spans:
            acc = float(prefix[lo])
            for h in mine:
                if lo <= bins[h] <= hi:
                    w = held[h][0]
                    s = choose((acc + w / 2.0) / total, p.ratios)
                    acc += w
                    if s != choose(h / 2.0**64, p.ratios):
                        assigned[h] = s
    figures = {
        "domains": {d: {"rows": int(h.sum()), "mode": "small" if d in small else "banded"}
                    for d, h in sorted(hist.items())},
        "held_groups": len(held),
        "pooled_groups": len(pool),
        "moved_from_hash": len(assigned),
        "blocked_groups": len(blocked),
    }
    return GroupSplits(p, seed, assigned, blocked, figures)


def group_splits(rows: Any, p: SplitParams, seed: int) -> dict[str, str | None]:
    """{group id: split} for every corpus group of `rows` (see `plan_groups`); None for a
    group a blocklist item is in. Materialises one entry per group: for tests and small
    runs; at scale, use `plan_groups(...).of_group`."""
    cols = _Columns(rows)
    gs = plan_groups(cols, p, seed)
    out: dict[str, str | None] = {}
    for b in cols:
        for key, gid, sid, kind, pk, st in zip(b["key"], b["group_id"], b["source_id"],
                                              b["kind"], b["parent_key"], b["status"]):
            if is_corpus(kind) and kind != "blocklist" and st != BENCHMARK and pk is None:
                g = gid or sid or key
                if g not in out:
                    out[g] = gs.of_group(g)
    return out


class _Refs:
    """Group hashes of the rows that other rows point at (splice / face-swap donors, the
    originals of `pairs` edits): 16 bytes per distinct referenced key, in sorted arrays."""

    def __init__(self, cols: _Columns, seed: int):
        wanted: list[np.ndarray] = []
        for b in cols:
            ks = [k for k in b["donor_key"] if k]
            ks += [pk for pk, kind in zip(b["parent_key"], b["kind"]) if pk and is_corpus(kind)]
            if ks:
                wanted.append(np.array([key_hash(k) for k in ks], np.uint64))
        self.keys = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, np.uint64)
        self.groups = np.zeros(len(self.keys), np.uint64)
        self.found = np.zeros(len(self.keys), bool)
        if not len(self.keys):
            return
        for b in cols:
            idx = [i for i, kind in enumerate(b["kind"]) if is_corpus(kind)]
            if not idx:
                continue
            kh = np.array([key_hash(b["key"][i]) for i in idx], np.uint64)
            pos = np.searchsorted(self.keys, kh)
            pos[pos >= len(self.keys)] = 0
            hit = self.keys[pos] == kh
            for j in np.flatnonzero(hit):
                i = idx[j]
                g = b["group_id"][i] or b["source_id"][i] or b["key"][i]
                self.groups[pos[j]] = group_hash(seed, g)
                self.found[pos[j]] = True

    def group_of(self, key: str) -> int | None:
        return self.groups_of([key])[0]

    def groups_of(self, keys: list[str | None]) -> list[int | None]:
        """The group hash of each referenced key (None: not a corpus row of the manifest)."""
        out: list[int | None] = [None] * len(keys)
        idx = [i for i, k in enumerate(keys) if k]
        if not idx or not len(self.keys):
            return out
        kh = np.array([key_hash(keys[i]) for i in idx], np.uint64)
        pos = np.searchsorted(self.keys, kh)
        pos[pos >= len(self.keys)] = 0
        hit = (self.keys[pos] == kh) & self.found[pos]
        groups = self.groups[pos]
        for j in np.flatnonzero(hit):
            out[idx[j]] = int(groups[j])
        return out


@dataclass
class Decision:
    split: str | None = None
    status: str = "ok"
    error: str | None = None


class Planner:
    """Everything the split stage decides, computed in streaming passes over a manifest."""

    def __init__(self, rows: Any, p: SplitParams, seed: int):
        cols = _Columns(rows)
        self.p, self.seed = p, seed
        self.groups = plan_groups(cols, p, seed)
        self.refs = _Refs(cols, seed)
        self.ood_gen, self.ood_op = set(p.ood_generators), set(p.ood_operations)

    def decide(self, r: Any) -> Decision:
        """The split of one ok row, or why it is not shipped."""
        return self.decide_many([r])[0]

    def decide_many(self, rows: list[Any]) -> list[Decision]:
        """`decide` for a batch of ok rows (records, or anything with their attributes);
        the donor and original lookups run vectorised."""
        parents = self.refs.groups_of([r.parent_key if r.parent_key and is_corpus(r.kind)
                                       else None for r in rows])
        donors = self.refs.groups_of([r.donor_key for r in rows])
        return [self._decide(r, ph, dh) for r, ph, dh in zip(rows, parents, donors)]

    def _decide(self, r: Any, parent_h: int | None, donor_h: int | None) -> Decision:
        # a pairs edit follows its original; everything else its own group
        h = parent_h if parent_h is not None else group_hash(self.seed, group_key(r))
        blocked = self.groups.blocked
        if h in blocked:
            return Decision(status="blocklisted", error=(
                f"near-duplicate of blocklist item {blocked[h]}; never shipped"))
        if donor_h is not None and donor_h in blocked:
            return Decision(status="blocklisted", error=(
                f"its donor {r.donor_key} is a near-duplicate of blocklist item "
                f"{blocked[donor_h]}; never shipped"))
        if r.generator in self.ood_gen or (r.operation in self.ood_op and r.operation != "none"):
            return Decision(split="test_ood")
        split = self.groups.of_hash(h)
        if r.donor_key:
            if donor_h is None:
                return Decision(status="donor_leak", error=(
                    f"donor {r.donor_key} is not in the manifest: its split cannot be checked"))
            donor_split = self.groups.of_hash(donor_h)
            if donor_split != split:
                return Decision(status="donor_leak", error=(
                    f"donor {r.donor_key} is in {donor_split}, this forgery's group in {split}: "
                    "its pixels would leak across splits"))
        return Decision(split=split)


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Sets `split` on every shippable row; writes `out/manifest.parquet` with every row."""
    p: SplitParams = params.split
    src = Path(inputs["manifest"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    planner = Planner(src, p, params.seed)
    by_split: Counter = Counter()
    by_domain_split: Counter = Counter()
    real_rows: Counter = Counter()
    rejected: Counter = Counter()
    by: dict[str, Counter] = {k: Counter() for k in _COUNTED}
    total = 0
    with ManifestWriter(out / "manifest.parquet") as w:
        for batch in read_batches(src):
            recs = records_of(conform(batch))
            ok = [r for r in recs if r.status == "ok"]
            decided = dict(zip((r.key for r in ok), planner.decide_many(ok)))
            for r in recs:
                d = decided.get(r.key) if r.status == "ok" else None
                if d is not None and d.status != "ok":
                    r = r.replace(status=d.status, error=d.error, stage="split")
                    rejected[d.status] += 1
                elif d is not None:
                    r = r.replace(split=d.split)
                    by_split[r.split] += 1
                    by_domain_split[f"{r.domain}/{r.split}"] += 1
                    if r.label == "real":
                        real_rows[r.split] += 1
                w.write(r)
                total += 1
                for k, c in by.items():
                    c[str(getattr(r, k))] += 1
    metrics: dict[str, Any] = {"total": total}
    metrics.update({f"by_{k}": dict(sorted(c.items())) for k, c in by.items()})
    n_real = sum(real_rows.values()) or 1
    metrics["split"] = {
        "by_split": dict(sorted(by_split.items())),
        "by_domain_split": dict(sorted(by_domain_split.items())),
        "real_share": {s: round(real_rows[s] / n_real, 4) for s in RATIO_SPLITS},
        "blocklisted": rejected["blocklisted"],
        "donor_leak": rejected["donor_leak"],
        "ratios": p.ratios,
        "ood_generators": list(p.ood_generators),
        "ood_operations": list(p.ood_operations),
        "plan": planner.groups.figures,
    }
    log.info("split: %s, %s", dict(by_split), dict(rejected))
    return metrics


STAGE = Stage(
    name="split",
    help="assign train/val/test/test_ood by duplicate group",
    params=SplitParams,
    run=run,
    reads=("masks",),
    writes={"split": "split"},
    uses=("seed",),
)
