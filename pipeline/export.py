"""The export stage: named, balanced shard sets and nested data fractions for training code.

Each export in params becomes `data/exports/<name>/` with, per split, WebDataset shards in
the same layout as `data/shards/`, a `manifest.parquet` of what it holds, a dataset card
(`README.md`) and, optionally, an IMDL-BenCo tree (`imdl/<split>.json` listing
`[image, mask or "Negative"]` pairs, with the files beside it).

Balance. Within a split, samples fall in cells (domain, operation), real samples being
operation `none`. A cell's target share is its domain's weight times, inside the domain,
`real_fraction` for real samples and the rest shared by the operations' weights (equal when
none are given; cells absent from the corpus are dropped and the others renormalised).
The *short-cell rule* decides the size:

- `shrink`: exact proportions; the scarcest cell relative to its share sets the size.
- `fill` (default): with lambda the median over cells of available / share, a cell takes
  min(available, lambda x share). The better-stocked half is exactly in proportion, a short
  cell gives all it has, and no cell ever exceeds its share.

Fractions. Inside a cell, samples are ranked by a stable hash of (seed, key); a fraction f
takes the first round(f x n) of them, so the 10% export is inside the 25% one, and so on.
Only the splits in `fraction_splits` (train by default) are cut, so every fraction is tested
on the same data. `export.fraction` scales every export: it is the knob for
`dvc exp run -S export.fraction=...` sweeps.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline import imageio
from pipeline.executor import Executor
from pipeline.params import Params
from pipeline.records import SPLITS, ManifestWriter, Record, iter_records
from pipeline.shard import sample_members, shippable, write_shard_set
from pipeline.split import unit_hash
from pipeline.stage import Stage

log = logging.getLogger(__name__)

CARD = "README.md"


@dataclass(frozen=True)
class ExportSpec:
    splits: tuple[str, ...] = SPLITS
    balance: bool = True
    domains: dict[str, float] = field(default_factory=dict)  # weights; empty: equal
    operations: dict[str, float] = field(default_factory=dict)  # weights of forgery ops
    real_fraction: float = 0.5  # share of real samples inside each domain
    short_cell: Literal["fill", "shrink"] = "fill"
    fractions: tuple[float, ...] = (1.0,)  # nested: one export folder per fraction
    fraction_splits: tuple[str, ...] = ("train",)  # splits the fractions cut
    imdl: bool = True  # also write an IMDL-BenCo JSON tree
    max_count: int = 1000
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for s in (*self.splits, *self.fraction_splits):
            if s not in SPLITS:
                raise ValueError(f"unknown split {s!r}; allowed: {', '.join(SPLITS)}")
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fractions: {f!r}; allowed: 0 < f <= 1")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ValueError(f"real_fraction: {self.real_fraction!r}; allowed: 0.0 to 1.0")
        for name, w in {**self.domains, **self.operations}.items():
            if w < 0:
                raise ValueError(f"weight of {name!r}: {w!r}; allowed: >= 0")


@dataclass(frozen=True)
class ExportParams:
    fraction: float = 1.0  # scales every export's fractions: the sweep knob
    exports: dict[str, ExportSpec] = field(
        default_factory=lambda: {"balanced": ExportSpec(fractions=(0.1, 0.25, 0.5, 1.0))}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"export.fraction: {self.fraction!r}; allowed: 0 < fraction <= 1")
        for name in self.exports:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"export name {name!r}: must be a plain folder name")


def cell(r: Record) -> tuple[str, str]:
    return (str(r.domain), "none" if r.label == "real" else r.operation)


def shares(cells: list[tuple[str, str]], spec: ExportSpec) -> dict[tuple[str, str], float]:
    """Target share of every present cell; they sum to one."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for d, op in cells:
        by_domain[d].append(op)
    dw = {d: (spec.domains.get(d, 0.0) if spec.domains else 1.0) for d in by_domain}
    total = sum(dw.values())
    out: dict[tuple[str, str], float] = {}
    if total <= 0:
        return out
    for d, ops in by_domain.items():
        fakes = [op for op in ops if op != "none"]
        ow = {op: (spec.operations.get(op, 0.0) if spec.operations else 1.0) for op in fakes}
        fake_total = sum(ow.values())
        real_share = spec.real_fraction if "none" in ops and fake_total > 0 else (1.0 if "none" in ops else 0.0)
        if "none" in ops:
            out[(d, "none")] = dw[d] / total * real_share
        for op in fakes:
            if fake_total > 0:
                out[(d, op)] = dw[d] / total * (1.0 - real_share) * ow[op] / fake_total
    return {c: s for c, s in out.items() if s > 0}


def allocate(available: dict[tuple[str, str], int], share: dict[tuple[str, str], float],
             rule: str) -> dict[tuple[str, str], int]:
    """How many samples each cell gives under the short-cell rule (see the module doc)."""
    cells = [c for c in share if available.get(c, 0) > 0]
    if not cells:
        return {}
    ratio = np.array([available[c] / share[c] for c in cells])
    lam = float(ratio.min() if rule == "shrink" else np.median(ratio))
    return {c: int(min(available[c], np.floor(lam * share[c] + 1e-9))) for c in cells}


def select(records: list[Record], spec: ExportSpec, seed: int, fraction: float,
           balance_fraction: float = 1.0) -> list[Record]:
    """The records of one split in one export; `fraction` is applied per cell by hash rank."""
    by_cell: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        by_cell[cell(r)].append(r)
    for rows in by_cell.values():
        rows.sort(key=lambda r: (unit_hash(seed, r.key), r.key))
    if spec.balance:
        counts = allocate({c: len(v) for c, v in by_cell.items()}, shares(list(by_cell), spec),
                          spec.short_cell)
    else:
        counts = {c: len(v) for c, v in by_cell.items()}
    out: list[Record] = []
    for c, n in counts.items():
        out.extend(by_cell[c][: int(np.floor(n * fraction + 0.5))])
    return out


def folder_names(name: str, spec: ExportSpec) -> list[tuple[str, float]]:
    if len(spec.fractions) == 1:
        return [(name, spec.fractions[0])]
    return [(f"{name}-{f * 100:g}pct", f) for f in spec.fractions]


def _table(counter: Counter, title: str) -> list[str]:
    lines = [f"| {title} | samples |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counter.items())]
    return lines + [""]


def card(name: str, spec: ExportSpec, fraction: float, rows: list[Record]) -> str:
    """The dataset card: what is in the export, how it was chosen, under which licenses."""
    splits = Counter(r.split for r in rows)
    lines = [
        f"# Export `{name}`",
        "",
        f"{len(rows)} samples written by the export stage of the dataset pipeline. Each split "
        "is a set of WebDataset tars (`<split>/<split>-NNNNNN.tar`: `<key>.<ext>` image in its "
        "own format, `<key>.mask.png` 0/255 mask, `<key>.json` record) with a parquet index per "
        "tar; `manifest.parquet` lists every sample.",
        "",
        f"- balanced: {spec.balance} (short-cell rule `{spec.short_cell}`, real share per domain "
        f"{spec.real_fraction}, domain weights {spec.domains or 'equal'}, operation weights "
        f"{spec.operations or 'equal'})",
        f"- data fraction: {fraction:g} of the balanced set, applied to "
        f"{', '.join(spec.fraction_splits)}; nested by a stable hash rank of the key",
        "",
        "## Counts",
        "",
        *_table(splits, "split"),
        *_table(Counter(r.domain for r in rows), "domain"),
        *_table(Counter(r.operation for r in rows), "operation"),
        *_table(Counter(r.generator or "real" for r in rows), "generator"),
        *_table(Counter(f"{r.split} / {r.domain} / {r.label}" for r in rows), "split / domain / label"),
        "## Licenses",
        "",
        "Forgeries inherit the license of the real image they were made from.",
        "",
        *_table(Counter(r.license or "unknown" for r in rows), "license"),
    ]
    if spec.imdl:
        lines += ["## IMDL-BenCo", "",
                  "`imdl/<split>.json` lists `[image, mask or \"Negative\"]` with paths relative "
                  "to the `imdl/` folder; run IMDL-BenCo from there or prefix the paths.", ""]
    return "\n".join(lines)


def write_imdl(rows: list[Record], data_dir: Path, out: Path) -> dict[str, int]:
    """`imdl/<split>.json` plus image and mask files, as IMDL-BenCo's JSON datasets expect."""
    by_split: dict[str, list[Record]] = defaultdict(list)
    for r in rows:
        by_split[r.split].append(r)
    written = {}
    for split, recs in sorted(by_split.items()):
        pairs = []
        for r in sorted(recs, key=lambda r: r.key):
            m = sample_members(r, data_dir)
            image = f"{split}/images/{r.key}.{r.format}"
            imageio.write_bytes(out / image, m[r.format])
            if r.label == "real":
                pairs.append([image, "Negative"])
            else:
                mask = f"{split}/masks/{r.key}.png"
                imageio.write_bytes(out / mask, m["mask.png"])
                pairs.append([image, mask])
        text = "[\n" + ",\n".join(json.dumps(pair) for pair in pairs) + "\n]\n"
        imageio.write_bytes(out / f"{split}.json", text.encode())
        written[split] = len(pairs)
    return written


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Writes every export named in params under `out/<name>/`; removes stale ones."""
    p: ExportParams = params.export
    data_dir = params.data
    out = Path(out)
    by_split: dict[str, list[Record]] = defaultdict(list)
    for r in iter_records(inputs["manifest"]):
        if shippable(r):
            by_split[r.split].append(r)
    metrics: dict[str, Any] = {"fraction": p.fraction, "exports": {}}
    planned = set()
    for name, spec in p.exports.items():
        for folder, f in folder_names(name, spec):
            planned.add(folder)
            rows: list[Record] = []
            for split in spec.splits:
                frac = f * p.fraction if split in spec.fraction_splits else 1.0
                rows.extend(select(by_split.get(split, []), spec, params.seed, frac))
            target = out / folder
            target.mkdir(parents=True, exist_ok=True)
            shards = {}
            for split in SPLITS:
                recs = [r for r in rows if r.split == split]
                split_dir = target / split
                if not recs and not split_dir.exists():
                    continue
                tars = write_shard_set(recs, data_dir, split_dir, split, spec.max_count,
                                       spec.max_bytes, executor)
                shards[split] = len(tars)
            with ManifestWriter(target / "manifest.parquet") as w:
                for r in sorted(rows, key=lambda r: (r.split, r.key)):
                    w.write(r.replace(local_path=None))  # exports are published: no local paths
            effective = f * p.fraction
            (target / CARD).write_text(card(folder, spec, effective, rows))
            if (target / "imdl").exists():
                shutil.rmtree(target / "imdl")
            imdl = write_imdl(rows, data_dir, target / "imdl") if spec.imdl else {}
            metrics["exports"][folder] = {
                "samples": len(rows),
                "fraction": effective,
                "by_split": dict(sorted(Counter(r.split for r in rows).items())),
                "by_domain": dict(sorted(Counter(str(r.domain) for r in rows).items())),
                "by_operation": dict(sorted(Counter(r.operation for r in rows).items())),
                "shards": shards,
                "imdl": imdl,
            }
            log.info("export %s: %d samples (fraction %g)", folder, len(rows), effective)
    if out.exists():
        for stale in out.iterdir():
            if stale.is_dir() and stale.name not in planned:
                shutil.rmtree(stale)
    metrics["total"] = sum(e["samples"] for e in metrics["exports"].values())
    return metrics


STAGE = Stage(
    name="export",
    help="balanced exports, data fractions, dataset cards, IMDL-BenCo JSON",
    params=ExportParams,
    run=run,
    reads=("manifest", "ingest", "synthesize", "masks"),
    writes={"exports": "exports"},
    uses=("seed",),
)
