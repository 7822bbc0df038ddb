"""The export stage: named, balanced shard sets and nested data fractions for training code.

Each export in params becomes `data/exports/<name>/` (or one folder per fraction,
`<name>-10pct`, ...) with, per split, WebDataset shards in the same layout as
`data/shards/` (`<split>/<split>-NNNNNN.tar`), a `manifest.parquet` of what it holds, a
dataset card (`README.md`) and, optionally, an IMDL-BenCo tree (`imdl/<split>.json` listing
`[image, mask or "Negative"]` pairs).

Balance. Within a split, samples fall in cells (domain, operation), real samples being
operation `none`. A cell's target share is its domain's weight times, inside the domain,
`real_fraction` for real samples and the rest shared by the operations' weights (equal when
none are given; cells absent from the corpus are dropped and the others renormalised).
Two rules decide the sizes where the data is short:

- `short_domain` (domains): `shrink` (default) meets the domain shares exactly, the
  scarcest domain (relative to its weight) setting the size; `fill` sets the size by the
  median domain, a short domain giving all it has and no domain exceeding its share.
- `short_cell` (cells inside a domain): `fill` (default) lets the other cells of the domain
  take a short cell's place in proportion to their shares, so the domain keeps its share;
  `shrink` keeps exact proportions inside the domain, its scarcest cell setting its size.

The card shows target and achieved shares per domain and per cell and names the short
cells.

Fractions and disk. Inside a cell, samples are ranked by a stable hash of (seed, key); a
fraction f takes the first round(f x n) of them, so the 10% export is inside the 25% one.
Only the splits in `fraction_splits` (train by default) are cut, so every fraction is tested
on the same data. The largest fraction's folder holds the shards, its samples written in
order of the smallest fraction that holds them (shards closed at each step), so every
smaller fraction is a prefix of the same shard sequence: its folder holds hard links to
those shards (same names, same bytes, no copy). IMDL-BenCo trees are hard links to the
stored images and masks. `export.fraction` scales every export: it is the knob for
`dvc exp run -S export.fraction=...` sweeps.

Stand-ins. Samples of random-weight diffusers stand-ins (`model_id` `tiny-random:...`,
`mid-random:...`; see `generators/diffusion.py`) are noise and are left out unless
`export.allow_stand_ins: true`; the card lists every model id with its count.

Streaming. The plan is made in two passes over the manifest's columns (counts and rank
histograms per cell, then the samples in the bins where a cut falls), and the shards are
written in one more pass per fraction: memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.executor import Executor
from pipeline.imageio import write_bytes
from pipeline.params import Params
from pipeline.records import SPLITS, ManifestWriter, Record
from pipeline.shard import ShardCutter, ShardJobs, full_mask, iter_batches, remove_stale
from pipeline.split import group_hash, read_batches, records_of
from pipeline.stage import Stage

log = logging.getLogger(__name__)

CARD = "README.md"
STAND_IN = re.compile(r"^[A-Za-z0-9_.]+-random:")  # generators/diffusion.py: <preset>-random:<hash>
_RANK_BITS = 12  # rank histogram: 4096 bins per (split, cell)
_RANK_SHIFT = 64 - _RANK_BITS
_ALL = (1 << 64, "")  # a threshold above every rank
_BATCH = 8192
_SCAN_COLUMNS = ["key", "status", "split", "blob", "domain", "label", "operation", "model_id"]

Cell = tuple[str, str]


@dataclass(frozen=True)
class ExportSpec:
    splits: tuple[str, ...] = SPLITS
    balance: bool = True
    domains: dict[str, float] = field(default_factory=dict)  # weights; empty: equal
    operations: dict[str, float] = field(default_factory=dict)  # weights of forgery ops
    real_fraction: float = 0.5  # share of real samples inside each domain
    short_domain: Literal["shrink", "fill"] = "shrink"
    short_cell: Literal["fill", "shrink"] = "fill"
    fractions: tuple[float, ...] = (1.0,)  # nested: one export folder per fraction
    fraction_splits: tuple[str, ...] = ("train",)  # splits the fractions cut
    imdl: bool = True  # also write an IMDL-BenCo JSON tree (hard links, no copies)
    max_count: int = 1000
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for s in (*self.splits, *self.fraction_splits):
            if s not in SPLITS:
                raise ValueError(f"unknown split {s!r}; allowed: {', '.join(SPLITS)}")
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fractions: {f!r}; allowed: 0 < f <= 1")
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions: {list(self.fractions)} repeats a value")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ValueError(f"real_fraction: {self.real_fraction!r}; allowed: 0.0 to 1.0")
        for name, w in {**self.domains, **self.operations}.items():
            if w < 0:
                raise ValueError(f"weight of {name!r}: {w!r}; allowed: >= 0")
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError("max_count and max_bytes must be >= 1")


@dataclass(frozen=True)
class ExportParams:
    fraction: float = 1.0  # scales every export's fractions: the sweep knob
    # samples of random-weight diffusers stand-ins (model_id `tiny-random:...`) are noise:
    # left out unless this is true
    allow_stand_ins: bool = False
    exports: dict[str, ExportSpec] = field(
        default_factory=lambda: {"balanced": ExportSpec(fractions=(0.1, 0.25, 0.5, 1.0))}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"export.fraction: {self.fraction!r}; allowed: 0 < fraction <= 1")
        for name in self.exports:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"export name {name!r}: must be a plain folder name")


def is_stand_in(model_id: str | None) -> bool:
    return bool(model_id) and STAND_IN.match(model_id) is not None


def cell(r: Record) -> Cell:
    return (str(r.domain), "none" if r.label == "real" else r.operation)


# ----------------------------------------------------------------------------- balance


def shares(cells: list[Cell], spec: ExportSpec) -> dict[Cell, float]:
    """Target share of every present cell; they sum to one."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for d, op in cells:
        by_domain[d].append(op)
    dw = {d: (spec.domains.get(d, 0.0) if spec.domains else 1.0) for d in by_domain}
    total = sum(dw.values())
    out: dict[Cell, float] = {}
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


def _integerize(target: dict[Cell, float], cap: dict[Cell, int], total: int) -> dict[Cell, int]:
    """Whole numbers near `target`, each at most `cap`, summing to `total` where the caps
    allow: floors, then the largest remainders (ties by cell) get one more."""
    n = {c: min(cap[c], int(np.floor(t + 1e-9))) for c, t in target.items()}
    left = total - sum(n.values())
    order = sorted(target, key=lambda c: (-(target[c] - np.floor(target[c] + 1e-9)), c))
    while left > 0:
        moved = False
        for c in order:
            if left and n[c] < cap[c]:
                n[c] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return n


def _waterfill(avail: dict[Cell, int], rel: dict[Cell, float], budget: int) -> dict[Cell, int]:
    """Cells get min(available, lambda x share) with lambda such that they sum to `budget`:
    a short cell gives all it has and the others share its place in proportion."""
    cells = sorted(rel, key=lambda c: (avail[c] / rel[c], c))
    remaining, weight = float(budget), sum(rel.values())
    target: dict[Cell, float] = {}
    for i, c in enumerate(cells):
        lam = remaining / weight if weight > 0 else 0.0
        if avail[c] <= lam * rel[c]:
            target[c] = float(avail[c])
            remaining -= avail[c]
            weight -= rel[c]
        else:
            for c2 in cells[i:]:
                target[c2] = lam * rel[c2]
            break
    return _integerize(target, avail, min(budget, sum(avail.values())))


def allocate(available: dict[Cell, int], share: dict[Cell, float], spec: ExportSpec) -> dict[Cell, int]:
    """How many samples each cell gives (see the module doc)."""
    cells = [c for c in share if available.get(c, 0) > 0]
    if not cells:
        return {}
    by_domain: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_domain[c[0]].append(c)
    dshare = {d: sum(share[c] for c in cs) for d, cs in by_domain.items()}
    rel = {c: share[c] / dshare[c[0]] for c in cells}
    if spec.short_cell == "shrink":
        cap = {d: min(available[c] / rel[c] for c in cs) for d, cs in by_domain.items()}
    else:
        cap = {d: float(sum(available[c] for c in cs)) for d, cs in by_domain.items()}
    ratio = {d: cap[d] / dshare[d] for d in by_domain}
    if spec.short_domain == "shrink":
        size = min(ratio.values())
        budget = {d: min(cap[d], dshare[d] * size) for d in by_domain}
    else:
        mu = float(np.median(list(ratio.values())))
        budget = {d: min(cap[d], dshare[d] * mu) for d in by_domain}
    out: dict[Cell, int] = {}
    for d, cs in by_domain.items():
        b = int(np.floor(budget[d] + 1e-9))
        if spec.short_cell == "shrink":
            out.update({c: min(available[c], int(np.floor(rel[c] * b + 1e-9))) for c in cs})
        else:
            out.update(_waterfill({c: available[c] for c in cs}, {c: rel[c] for c in cs}, b))
    return {c: n for c, n in out.items() if n > 0}


def fraction_count(n: int, f: float) -> int:
    return int(np.floor(n * f + 0.5))


# ----------------------------------------------------------------------------- planning


def folder_names(name: str, spec: ExportSpec) -> list[tuple[str, float]]:
    if len(spec.fractions) == 1:
        return [(name, spec.fractions[0])]
    return [(f"{name}-{f * 100:g}pct", f) for f in spec.fractions]


@dataclass
class SplitPlan:
    """One split of one export: what is available, what is taken at each fraction level,
    and the rank thresholds that take exactly that."""

    available: dict[Cell, int]
    share: dict[Cell, float]  # target shares (balanced exports)
    counts: dict[Cell, int]  # taken at fraction 1
    levels: list[float]  # effective fractions, ascending ([1.0] for splits not cut)
    level_counts: dict[Cell, list[int]] = field(default_factory=dict)
    thresholds: dict[Cell, list[tuple[int, str] | None]] = field(default_factory=dict)

    def level_of(self, c: Cell, rank: int, key: str) -> int | None:
        """The smallest fraction level that holds this sample, or None."""
        ths = self.thresholds.get(c)
        if not ths:
            return None
        found = None
        for i in range(len(ths) - 1, -1, -1):
            t = ths[i]
            if t is None or (rank, key) > t:
                break
            found = i
        return found


@dataclass
class ExportPlan:
    name: str
    spec: ExportSpec
    folders: list[tuple[str, float, int]]  # (folder, effective fraction, level index)
    levels: list[float]  # levels of the fraction splits
    splits: dict[str, SplitPlan]

    @property
    def store(self) -> str:
        """The folder that holds the shards: the largest fraction's."""
        return max(self.folders, key=lambda f: f[1])[0]

    def folder_level(self, folder: str) -> int:
        return next(i for f, _, i in self.folders if f == folder)

    def in_folder(self, split: str, level: int, folder: str) -> bool:
        if split not in self.spec.fraction_splits:
            return True
        return level <= self.folder_level(folder)


@dataclass
class Scan:
    """What the planning passes found: counts and rank histograms per (split, cell)."""

    counts: Counter = field(default_factory=Counter)
    hist: dict[tuple[str, Cell], np.ndarray] = field(default_factory=dict)
    stand_ins: Counter = field(default_factory=Counter)  # left out, by model id
    rows: int = 0


def _ranks(keys: list[str], seed: int) -> list[int]:
    return [group_hash(seed, k) for k in keys]


def _shippable_rows(b: dict[str, list], allow_stand_ins: bool, stand_ins: Counter | None = None):
    """(index, split, cell) of the shippable rows of a column batch."""
    for i, (st, sp, blob) in enumerate(zip(b["status"], b["split"], b["blob"])):
        if st != "ok" or sp not in SPLITS or blob is None:
            continue
        mid = b["model_id"][i]
        if not allow_stand_ins and is_stand_in(mid):
            if stand_ins is not None:
                stand_ins[mid] += 1
            continue
        yield i, sp, (str(b["domain"][i]), "none" if b["label"][i] == "real" else b["operation"][i])


def _column_batches(manifest: Path):
    for batch in read_batches(manifest, _SCAN_COLUMNS, _BATCH):
        yield {c: batch.column(c).to_pylist() for c in _SCAN_COLUMNS}


def scan(manifest: Path, p: ExportParams, seed: int) -> Scan:
    """Pass 1: counts and rank histograms of the shippable samples per (split, cell)."""
    s = Scan()
    for b in _column_batches(manifest):
        s.rows += len(b["key"])
        rows = list(_shippable_rows(b, p.allow_stand_ins, s.stand_ins))
        if not rows:
            continue
        ranks = _ranks([b["key"][i] for i, _, _ in rows], seed)
        groups: dict[tuple[str, Cell], list[int]] = defaultdict(list)
        for (_, sp, c), r in zip(rows, ranks):
            groups[(sp, c)].append(r >> _RANK_SHIFT)
        for sc, bins in groups.items():
            s.counts[sc] += len(bins)
            h = s.hist.setdefault(sc, np.zeros(1 << _RANK_BITS, np.int64))
            h += np.bincount(np.asarray(bins, np.int64), minlength=1 << _RANK_BITS)
    return s


def plan(manifest: Path, p: ExportParams, seed: int, sc: Scan | None = None) -> dict[str, ExportPlan]:
    """The plan of every export: a pure function of the manifest, the params and the seed."""
    sc = sc or scan(manifest, p, seed)
    plans: dict[str, ExportPlan] = {}
    for name, spec in p.exports.items():
        folders = folder_names(name, spec)
        effs = sorted({f * p.fraction for _, f in folders})
        splits: dict[str, SplitPlan] = {}
        for split in spec.splits:
            avail = {c: n for (s, c), n in sc.counts.items() if s == split and n > 0}
            share = shares(sorted(avail), spec) if spec.balance else {}
            counts = allocate(avail, share, spec) if spec.balance else dict(avail)
            levels = effs if split in spec.fraction_splits else [1.0]
            sp = SplitPlan(avail, share, counts, levels)
            for c, n in sorted(counts.items()):
                sp.level_counts[c] = [fraction_count(n, f) for f in levels]
            splits[split] = sp
        plans[name] = ExportPlan(name, spec,
                                 [(folder, f * p.fraction, effs.index(f * p.fraction))
                                  for folder, f in folders], effs, splits)
    _thresholds(manifest, p, seed, sc, plans)
    return plans


def _thresholds(manifest: Path, p: ExportParams, seed: int, sc: Scan,
                plans: dict[str, ExportPlan]) -> None:
    """Pass 2: the rank of the n-th sample of each cut, from the samples of the one bin of
    the histogram where each cut falls."""
    wanted: dict[tuple[str, Cell, int], list[tuple[int, str]]] = {}
    cuts: list[tuple[SplitPlan, Cell, int, str, int, int]] = []
    for ep in plans.values():
        for split, sp in ep.splits.items():
            for c, ns in sp.level_counts.items():
                h = sc.hist[(split, c)]
                cum = np.concatenate([[0], np.cumsum(h)])
                total = int(cum[-1])
                sp.thresholds[c] = [None] * len(ns)
                for i, n in enumerate(ns):
                    if n <= 0:
                        continue
                    if n >= total:
                        sp.thresholds[c][i] = _ALL
                        continue
                    b = int(np.searchsorted(cum, n, side="left")) - 1  # cum[b] < n <= cum[b+1]
                    wanted[(split, c, b)] = []
                    cuts.append((sp, c, i, split, b, n - int(cum[b])))
    if not wanted:
        return
    for b in _column_batches(manifest):
        rows = list(_shippable_rows(b, p.allow_stand_ins))
        if not rows:
            continue
        for (i, sp, c), r in zip(rows, _ranks([b["key"][i] for i, _, _ in rows], seed)):
            got = wanted.get((sp, c, r >> _RANK_SHIFT))
            if got is not None:
                got.append((r, b["key"][i]))
    for got in wanted.values():
        got.sort()
    for sp, c, i, split, b, k in cuts:
        sp.thresholds[c][i] = wanted[(split, c, b)][k - 1]


# ----------------------------------------------------------------------------- writing


def link(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (a copy where the file system cannot link)."""
    if dst.exists():
        try:
            if os.path.samefile(src, dst):
                return
        except OSError:
            pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.lnk")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class _Imdl:
    """One folder's IMDL-BenCo tree: `<split>.json` and hard links to images and masks."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        if root.exists():
            shutil.rmtree(root)
        self.files: dict[str, Any] = {}
        self.counts: Counter = Counter()
        self.full: set[str] = set()

    def add(self, r: Record) -> None:
        split = r.split
        image = f"{split}/images/{r.key}.{r.format}"
        link(self.data_dir / r.blob, self.root / image)
        if r.label == "real":
            mask: str = "Negative"
        elif r.mask_blob:
            mask = f"{split}/masks/{r.key}.png"
            link(self.data_dir / r.mask_blob, self.root / mask)
        else:  # fully synthetic: one all-255 mask per size, shared
            mask = f"{split}/masks/full-{r.width}x{r.height}.png"
            if mask not in self.full:
                self.full.add(mask)
                tmp = self.root / f"{mask}.{os.getpid()}.tmp"
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(full_mask(r, 255))
                os.replace(tmp, self.root / mask)
        f = self.files.get(split)
        if f is None:
            self.root.mkdir(parents=True, exist_ok=True)
            # one file per split, open while the samples stream by; closed in close()
            f = self.files[split] = open(self._tmp(split), "w")  # noqa: SIM115
            f.write("[\n")
        else:
            f.write(",\n")
        f.write(json.dumps([image, mask]))
        self.counts[split] += 1

    def _tmp(self, split: str) -> Path:
        return self.root / f".{split}.json.{os.getpid()}.tmp"

    def close(self) -> dict[str, int]:
        for split, f in self.files.items():
            f.write("\n]\n")
            f.close()
            os.replace(self._tmp(split), self.root / f"{split}.json")
        return dict(sorted(self.counts.items()))


class _Folder:
    """What one export folder accumulates while the samples stream by."""

    def __init__(self, name: str, target: Path, eff: float, spec: ExportSpec, data_dir: Path):
        self.name, self.target, self.eff = name, target, eff
        target.mkdir(parents=True, exist_ok=True)
        self.manifest = ManifestWriter(target / "manifest.parquet")
        self.imdl = _Imdl(target / "imdl", data_dir) if spec.imdl else None
        if not spec.imdl and (target / "imdl").exists():
            shutil.rmtree(target / "imdl")
        self.cells: Counter = Counter()  # (split, cell)
        self.by: dict[str, Counter] = defaultdict(Counter)

    def add(self, r: Record, c: Cell) -> None:
        self.manifest.write(r.replace(local_path=None))  # published: no local paths
        if self.imdl is not None:
            self.imdl.add(r)
        self.cells[(r.split, c)] += 1
        for k, v in (("split", r.split), ("domain", str(r.domain)), ("operation", r.operation),
                     ("generator", _generator(r)), ("model_id", r.model_id or "none"),
                     ("license", r.license or "unknown"),
                     ("split / domain / label", f"{r.split} / {r.domain} / {r.label}")):
            self.by[k][v] += 1


def _generator(r: Record) -> str:
    """A row's generator for the card: "real" for real rows only; a tampered row that no
    generator of ours made (a `forensic` or `pairs` source's) is "unknown (<source>)"."""
    if r.generator:
        return r.generator
    return "real" if r.label == "real" else f"unknown ({r.source})"


def write_export(ep: ExportPlan, manifest: Path, data_dir: Path, out: Path, seed: int,
                 allow_stand_ins: bool, executor: Executor) -> dict[str, _Folder]:
    """Writes the store folder's shards in fraction-level order, the other folders' hard
    links, every folder's manifest, IMDL tree and counts."""
    store = ep.store
    folders = {f: _Folder(f, out / f, eff, ep.spec, data_dir) for f, eff, _ in ep.folders}
    cutters = {s: ShardCutter(s, ep.spec.max_count, ep.spec.max_bytes) for s in ep.splits}
    jobs = ShardJobs(data_dir, executor, desc=f"export {ep.name}")
    names: dict[str, list[str]] = {s: [] for s in ep.splits}
    ends: dict[str, list[int]] = {s: [] for s in ep.splits}  # shards through each level
    for level in range(len(ep.levels)):
        for batch in iter_batches(manifest, _BATCH):
            cols = {c: batch.column(c).to_pylist() for c in _SCAN_COLUMNS}
            picked: list[int] = []
            cells: list[Cell] = []
            rows = list(_shippable_rows(cols, allow_stand_ins))
            ranks = _ranks([cols["key"][i] for i, _, _ in rows], seed)
            for (i, sp, c), rank in zip(rows, ranks):
                plan_s = ep.splits.get(sp)
                if plan_s is None or (level and sp not in ep.spec.fraction_splits):
                    continue  # a split that fractions do not cut is written with level 0
                if plan_s.level_of(c, rank, cols["key"][i]) == (
                        level if sp in ep.spec.fraction_splits else 0):
                    picked.append(i)
                    cells.append(c)
            if not picked:
                continue
            mask = np.zeros(batch.num_rows, bool)
            mask[picked] = True
            chosen = batch.filter(mask)
            for i, (r, c) in enumerate(zip(records_of(chosen), cells)):
                done = cutters[r.split].add(r, (chosen, i))
                names[r.split] += [n for n, _, _ in done]
                jobs.add(out / store / r.split, done)
                lv_r = level if r.split in ep.spec.fraction_splits else 0
                for f in folders.values():
                    if ep.in_folder(r.split, lv_r, f.name):
                        f.add(r, c)
        for s in ep.splits:  # close the open shards: this level is a prefix
            if s in ep.spec.fraction_splits or level == 0:
                done = cutters[s].flush()
                names[s] += [n for n, _, _ in done]
                jobs.add(out / store / s, done)
            ends[s].append(len(names[s]))
    jobs.drain()
    for s in SPLITS:
        if names.get(s) or (out / store / s).exists():
            remove_stale(out / store / s, s, names.get(s, []))
    for fname, _, lvl in ep.folders:
        if fname == store:
            continue
        for s in SPLITS:
            keep = names.get(s, [])
            if s in ep.spec.fraction_splits and keep:
                keep = keep[: ends[s][lvl]]
            for n in keep:
                for suffix in (".tar", ".parquet", "_stats.json"):
                    link(out / store / s / f"{n}{suffix}", out / fname / s / f"{n}{suffix}")
            if keep or (out / fname / s).exists():
                remove_stale(out / fname / s, s, keep)
    return folders


# ----------------------------------------------------------------------------- the card


def _table(counter: Counter, title: str) -> list[str]:
    lines = [f"| {title} | samples |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counter.items())]
    return lines + [""]


def balance_report(ep: ExportPlan, folder: _Folder) -> dict[str, Any]:
    """Per split: target vs achieved share per domain and per cell; the short cells."""
    out: dict[str, Any] = {}
    for split, sp in ep.splits.items():
        got = {c: n for (s, c), n in folder.cells.items() if s == split}
        total = sum(got.values())
        if not ep.spec.balance or not total:
            continue
        cells = []
        for c in sorted(sp.share):
            target = sp.share[c] * total
            n = got.get(c, 0)
            cells.append({"cell": f"{c[0]}/{c[1]}", "target_share": round(sp.share[c], 4),
                          "achieved_share": round(n / total, 4), "target": round(target, 1),
                          "achieved": n, "available": sp.available.get(c, 0),
                          "short": n + 1 <= target})
        domains: dict[str, dict[str, float]] = {}
        for c, s in sp.share.items():
            d = domains.setdefault(c[0], {"target_share": 0.0, "achieved": 0})
            d["target_share"] += s
            d["achieved"] += got.get(c, 0)
        for d in domains.values():
            d["target_share"] = round(d["target_share"], 4)
            d["achieved_share"] = round(d["achieved"] / total, 4)
        out[split] = {"domains": dict(sorted(domains.items())), "cells": cells,
                      "short_cells": [x["cell"] for x in cells if x["short"]]}
    return out


def card(ep: ExportPlan, folder: _Folder, stand_ins: Counter, allow: bool,
         report: dict[str, Any]) -> str:
    """The dataset card: what is in the export, how it was chosen, under which licenses."""
    spec = ep.spec
    by = folder.by
    n = sum(by["split"].values())
    lines = [
        f"# Export `{folder.name}`",
        "",
        (f"{n} samples written by the export stage of the dataset pipeline. Each split "
         "is a set of WebDataset tars (`<split>/<split>-NNNNNN.tar`: `<key>.<ext>` image in its "
         "own format, `<key>.mask.png` 0/255 mask, `<key>.json` record) with a parquet index "
         "per tar; `manifest.parquet` lists every sample."),
        "",
        (f"- balanced: {spec.balance} (domain rule `{spec.short_domain}`, cell rule "
         f"`{spec.short_cell}`, real share per domain {spec.real_fraction}, domain weights "
         f"{spec.domains or 'equal'}, operation weights {spec.operations or 'equal'})"),
        (f"- data fraction: {folder.eff:g} of the balanced set, applied to "
         f"{', '.join(spec.fraction_splits)}; nested by a stable hash rank of the key. The "
         "tars of a smaller fraction are the first tars of a larger one (hard links: same "
         "names, same bytes)."),
    ]
    if allow:
        lines.append(f"- random-weight stand-in samples allowed: "
                     f"{sum(v for k, v in by['model_id'].items() if is_stand_in(k))} included "
                     "(noise, for testing the plumbing; not for training)")
    else:
        left = sum(stand_ins.values())
        lines.append(f"- random-weight stand-in samples left out: {left}"
                     + (f" ({', '.join(f'`{k}` {v}' for k, v in sorted(stand_ins.items()))})"
                        if left else "")
                     + "; `export.allow_stand_ins: true` keeps them")
    lines += ["", "## Balance: target and achieved", ""]
    if not spec.balance:
        lines += ["Not balanced: every shippable sample of the chosen splits.", ""]
    for split, rep in report.items():
        lines += [f"### {split}", "", "| domain | target share | achieved share | samples |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {d} | {v['target_share']:.3f} | {v['achieved_share']:.3f} | {v['achieved']} |"
                  for d, v in rep["domains"].items()]
        lines += ["", ("| cell (domain/operation) | target share | achieved share | target | "
                       "achieved | available | |"), "|---|---:|---:|---:|---:|---:|---|"]
        for x in rep["cells"]:
            flag = "short" if x["short"] else ""
            lines.append(f"| {x['cell']} | {x['target_share']:.3f} | {x['achieved_share']:.3f} | "
                         f"{x['target']:g} | {x['achieved']} | {x['available']} | {flag} |")
        short = rep["short_cells"]
        lines += ["", (f"Short cells (fewer samples than their target): "
                       f"{', '.join(short) if short else 'none'}."), ""]
    lines += [
        "## Counts",
        "",
        *_table(by["split"], "split"),
        *_table(by["domain"], "domain"),
        *_table(by["operation"], "operation"),
        *_table(by["generator"], "generator"),
        *_table(by["model_id"], "model_id"),
        *_table(by["split / domain / label"], "split / domain / label"),
        "## Licenses",
        "",
        "Forgeries inherit the license of the real image they were made from.",
        "",
        *_table(by["license"], "license"),
    ]
    if spec.imdl:
        lines += ["## IMDL-BenCo", "",
                  ("`imdl/<split>.json` lists `[image, mask or \"Negative\"]` with paths "
                   "relative to the `imdl/` folder (hard links to the stored files); run "
                   "IMDL-BenCo from there or prefix the paths."), ""]
    return "\n".join(lines)


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes under `root`: as listed (every link counted), and new (each inode once, none
    that is also linked from outside `root`, such as the blobs IMDL trees link to)."""
    seen: dict[int, list] = {}
    listed = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            listed += st.st_size
            e = seen.setdefault(st.st_ino, [st.st_size, st.st_nlink, 0])
            e[2] += 1
    new = sum(size for size, nlink, inside in seen.values() if inside >= nlink)
    return {"listed": listed, "new": new}


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Writes every export named in params under `out/<name>/`; removes stale ones."""
    p: ExportParams = params.export
    data_dir = params.data
    out = Path(out)
    manifest = Path(inputs["manifest"])
    sc = scan(manifest, p, params.seed)
    plans = plan(manifest, p, params.seed, sc)
    metrics: dict[str, Any] = {
        "fraction": p.fraction,
        "allow_stand_ins": p.allow_stand_ins,
        "stand_ins_left_out": dict(sorted(sc.stand_ins.items())),
        "exports": {},
    }
    planned = set()
    for ep in plans.values():
        folders = write_export(ep, manifest, data_dir, out, params.seed, p.allow_stand_ins,
                               executor)
        for f in folders.values():
            planned.add(f.name)
            f.manifest.close()
            imdl = f.imdl.close() if f.imdl is not None else {}
            report = balance_report(ep, f)
            # a new file (under DVC the old card may be a link to its cache)
            write_bytes(f.target / CARD,
                                card(ep, f, sc.stand_ins, p.allow_stand_ins, report).encode())
            shards = {s: len(list((f.target / s).glob("*.tar")))
                      for s in SPLITS if (f.target / s).exists()}
            metrics["exports"][f.name] = {
                "samples": sum(f.by["split"].values()),
                "fraction": f.eff,
                "by_split": dict(sorted(f.by["split"].items())),
                "by_domain": dict(sorted(f.by["domain"].items())),
                "by_operation": dict(sorted(f.by["operation"].items())),
                "by_model_id": dict(sorted(f.by["model_id"].items())),
                "shards": shards,
                "imdl": imdl,
                "short_cells": {s: r["short_cells"] for s, r in report.items()},
                "domain_share": {s: {d: v["achieved_share"] for d, v in r["domains"].items()}
                                 for s, r in report.items()},
            }
            log.info("export %s: %d samples (fraction %g)", f.name,
                     metrics["exports"][f.name]["samples"], f.eff)
    if out.exists():
        for stale in out.iterdir():
            if stale.is_dir() and stale.name not in planned:
                shutil.rmtree(stale)
    metrics["total"] = sum(e["samples"] for e in metrics["exports"].values())
    if out.exists():
        metrics["disk"] = disk_usage(out)
    if sc.stand_ins:
        log.warning("export: left out %d random-weight stand-in samples (%s); set "
                    "export.allow_stand_ins: true to keep them", sum(sc.stand_ins.values()),
                    ", ".join(sorted(sc.stand_ins)))
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
