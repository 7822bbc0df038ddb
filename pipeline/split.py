"""The split stage: train / val / test / test_ood by near-duplicate group, so nothing leaks.

A row's *unit* is the near-duplicate group of the real image it comes from: its own
`group_id` for a real row, its parent's (recursively) for a forgery or an edited pair, and
the group of a splice or face-swap donor too, which joins the two groups into one unit. A
unit goes to one split, chosen by a stable hash of (seed, unit) against the cumulative
ratios, so the same manifest and seed always give the same split and adding images never
moves the ones already placed.

Rows whose generator or operation is listed in `ood_generators` / `ood_operations` go to
`test_ood` only. `blocklist` sources (public benchmark test sets, say) are never shipped;
any row in their unit that would land in train or val is marked `blocklisted` with the
blocklist item named in `error`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.executor import Executor
from pipeline.params import Params
from pipeline.records import ManifestWriter, counts, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

RATIO_SPLITS = ("train", "val", "test")
_COLUMNS = ("key", "group_id", "source_id", "parent_key", "status", "kind", "generator",
            "operation", "donor_key")


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


def unit_hash(seed: int, unit: str) -> float:
    """A stable uniform number in [0, 1) for a unit: the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose(u: float, ratios: dict[str, float]) -> str:
    acc = 0.0
    for name in RATIO_SPLITS:
        acc += ratios.get(name, 0.0)
        if u < acc:
            return name
    return next(n for n in reversed(RATIO_SPLITS) if ratios.get(n, 0.0) > 0)


class _Units:
    """Union-find over group ids: a forgery with a donor joins its parent's and donor's units."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller id names the unit: deterministic


def plan(table: Any, p: SplitParams, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Returns ({key: split} for shippable rows, {key: blocklist item} for blocklisted rows)."""
    rows = table.to_pylist()
    by_key = {r["key"]: r for r in rows}

    def own_group(r: dict[str, Any]) -> str:
        return r["group_id"] or r["source_id"] or r["key"]

    def root_group(key: str) -> str:
        seen = set()
        r = by_key[key]
        while r["parent_key"] and r["parent_key"] in by_key and r["key"] not in seen:
            seen.add(r["key"])
            r = by_key[r["parent_key"]]
        return own_group(r)

    units = _Units()
    for r in rows:
        g = root_group(r["key"])
        units.find(g)
        donor = r["donor_key"]
        if donor and donor in by_key:
            units.union(g, root_group(donor))

    blocked: dict[str, str] = {}  # unit -> the blocklist item's key
    for r in rows:
        if r["kind"] == "blocklist" or r["status"] == "benchmark":  # outside benchmarks too
            u = units.find(root_group(r["key"]))
            blocked[u] = min(blocked.get(u, r["key"]), r["key"])

    ood_gen, ood_op = set(p.ood_generators), set(p.ood_operations)
    splits: dict[str, str] = {}
    blocklisted: dict[str, str] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        u = units.find(root_group(r["key"]))
        if r["generator"] in ood_gen or (r["operation"] in ood_op and r["operation"] != "none"):
            split = "test_ood"
        else:
            split = choose(unit_hash(seed, u), p.ratios)
        if split in ("train", "val") and u in blocked:
            blocklisted[r["key"]] = blocked[u]
            continue
        splits[r["key"]] = split
    return splits, blocklisted


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Sets `split` on every shippable row; writes `out/manifest.parquet` with every row."""
    p: SplitParams = params.split
    src = Path(inputs["manifest"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(src, columns=list(_COLUMNS))
    splits, blocklisted = plan(table, p, params.seed)
    del table
    unit_splits: dict[str, set[str]] = defaultdict(set)
    by_split: Counter = Counter()
    by_domain_split: Counter = Counter()
    with ManifestWriter(out / "manifest.parquet") as w:
        for r in iter_records(src):
            if r.key in blocklisted:
                r = r.replace(
                    status="blocklisted", stage="split",
                    error=f"near-duplicate of blocklist item {blocklisted[r.key]}; "
                          "removed from train and val",
                )
            elif r.key in splits:
                r = r.replace(split=splits[r.key])
                by_split[r.split] += 1
                by_domain_split[f"{r.domain}/{r.split}"] += 1
                if r.group_id:
                    unit_splits[r.group_id].add(r.split)
            w.write(r)
    metrics: dict[str, Any] = counts(iter_records(out / "manifest.parquet"))
    metrics["split"] = {
        "by_split": dict(sorted(by_split.items())),
        "by_domain_split": dict(sorted(by_domain_split.items())),
        "blocklisted": len(blocklisted),
        "ratios": p.ratios,
        "ood_generators": list(p.ood_generators),
        "ood_operations": list(p.ood_operations),
        # groups in more than one of train/val/test: 0 by construction
        "groups_in_several_splits": sum(1 for s in unit_splits.values() if len(s - {"test_ood"}) > 1),
        # groups with a held-out generator's sample in test_ood and their real source in
        # train or val: the generator is unseen, the photo is not
        "ood_groups_also_in_train_val": sum(
            1 for s in unit_splits.values() if "test_ood" in s and s & {"train", "val"}
        ),
    }
    log.info("split: %s, %d blocklisted", dict(by_split), len(blocklisted))
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
