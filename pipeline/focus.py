"""The focus stage: where the model fails, plan more of exactly that.

Reads the current model's evaluation (`data/evaluate/predictions.parquet`, one row per image,
and `data/evaluate/worst.parquet`) on the set `focus.set` (default `val`: the set that
steers must not be the set that reports, which is `test`) and writes the next round's
synthesis plan, `data/focus/plan.json`, which `synthesize.plan_from` reads (the data loop,
`python -m pipeline loop`, runs the rounds).

**Cells** are the generators of `synthesize.generators` with a weight above 0 (a generator
has one operation and forges one domain, so a cell is a (domain, operation, generator) of
the evaluation). For each cell c, over the forged images of the set it made:

- `miss` = share of its images scored below `evaluate.threshold` (image-level misses);
- `pixel_error` = 1 - mean pixel F1 over its tampered images with a mask (absent for full
  syntheses); `error` = the mean of the two (or `miss` alone);
- shrunk toward 0.5 by `prior` pseudo-images: `e = (n * error + prior * 0.5) / (n + prior)`;
- exploration: `u = explore * sqrt(ln(1 + N) / (1 + n))` (N = forged images of all cells),
  so a cell with few evaluated images (a starved one) scores high until it has been seen;
- share: `floor + (1 - K * floor) * (e + u) / sum(e + u)` over the K cells, so no cell
  starves (uniform when `K * floor >= 1`).

The round's `budget` new forgeries go one per cell first (when the budget allows), the rest
by share (largest remainders). **Sources**: only `train` sources are forged (val and test
stay fixed across rounds); each cell's sources are the train sources it can forge, nearest
first by pHash Hamming distance to the real parents of the cell's worst samples in
`worst.parquet` (ties, and cells without failures, in a seeded random order).

The plan also states the same allocation as `synthesize` weights (`generators`: share
within its domain; `domain_weights`: the domain's total share), for reading; `synthesize`
forges the listed `jobs`. The `uniform` rule (the loop's `--compare uniform` baseline) gives
every cell the same share and takes sources in a seeded random order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.executor import Executor
from pipeline.params import Params
from pipeline.records import Record, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

RULES = ("focus", "uniform")


@dataclass(frozen=True)
class FocusParams:
    set: str = "val"  # evaluation set whose cells steer the next round (in evaluate.splits)
    budget: int = 24  # new forgeries per round
    explore: float = 0.5  # weight of the exploration term
    floor: float = 0.05  # minimum share of the budget per cell
    prior: float = 1.0  # pseudo-images pulling a cell's error toward 0.5
    rule: str = "focus"  # focus | uniform (the baseline: equal shares, random sources)

    def __post_init__(self) -> None:
        from pipeline.records import SPLITS

        if self.set not in SPLITS:
            raise ValueError(f"focus.set: {self.set!r}; allowed: {', '.join(SPLITS)}")
        if self.budget < 1:
            raise ValueError(f"focus.budget: {self.budget!r}; allowed: >= 1")
        for name in ("explore", "prior"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"focus.{name}: {v!r}; allowed: a finite number >= 0")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"focus.floor: {self.floor!r}; allowed: 0 to <1")
        if self.rule not in RULES:
            raise ValueError(f"focus.rule: {self.rule!r}; allowed: {', '.join(RULES)}")


def _read(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if Path(path).exists() else []


def train_sources(manifest: Path) -> list[Record]:
    """The real images of `train` a round may forge."""
    from pipeline.synthesize import is_source

    return [r for r in iter_records(manifest) if r.split == "train" and is_source(r)]


def cell_stats(preds: list[dict[str, Any]], names: list[str], set_: str, threshold: float
               ) -> dict[str, dict[str, Any]]:
    """n, miss rate and pixel F1 of each generator's forged images in the set."""
    out = {}
    for g in names:
        rows = [r for r in preds if r["set"] == set_ and r["generator"] == g
                and r["label"] != "real"]
        f1 = [r["pixel_f1"] for r in rows if r.get("pixel_f1") is not None]
        out[g] = {
            "n": len(rows),
            "miss_rate": (sum(r["score"] < threshold for r in rows) / len(rows)) if rows else None,
            "pixel_f1": sum(f1) / len(f1) if f1 else None,
            "pixel_n": len(f1),
        }
    return out


def shares(stats: dict[str, dict[str, Any]], p: FocusParams, rule: str) -> dict[str, dict]:
    """Each cell's error, exploration term, score and share of the budget (see the module)."""
    k = len(stats)
    total = sum(s["n"] for s in stats.values())
    out = {}
    for g, s in stats.items():
        parts = [v for v in (s["miss_rate"],
                             None if s["pixel_f1"] is None else 1.0 - s["pixel_f1"])
                 if v is not None]
        error = sum(parts) / len(parts) if parts else None
        e = ((s["n"] * (error or 0.0) + p.prior * 0.5) / (s["n"] + p.prior)
             if (s["n"] + p.prior) > 0 else 0.5)
        u = p.explore * math.sqrt(math.log(1 + total) / (1 + s["n"]))
        out[g] = {"error": error, "shrunk_error": round(e, 6), "explore": round(u, 6),
                  "score": round(e + u, 6)}
    norm = sum(c["score"] for c in out.values())
    for c in out.values():
        if rule == "uniform" or k * p.floor >= 1 or norm <= 0:
            c["share"] = 1.0 / k
        else:
            c["share"] = p.floor + (1 - k * p.floor) * c["score"] / norm
    return out


def quotas(share: dict[str, float], budget: int) -> dict[str, int]:
    """One per cell first (when the budget allows), the rest by share, largest remainders."""
    names = sorted(share)
    base = 1 if budget >= len(names) else 0
    q = {g: base for g in names}
    rest = budget - base * len(names)
    exact = {g: rest * share[g] for g in names}
    for g in names:
        q[g] += int(exact[g])
    left = budget - sum(q.values())
    for g in sorted(names, key=lambda g: (-(exact[g] - int(exact[g])), g))[:left]:
        q[g] += 1
    return q


def _hamming(a: str | None, b: str | None) -> int:
    if not a or not b:
        return 1 << 20
    return (int(a, 16) ^ int(b, 16)).bit_count()


def make_plan(params: Params, predictions: Path, worst: Path, manifest: Path, round_: int,
              rule: str | None = None) -> dict[str, Any]:
    """The plan of round `round_` from the evaluation files and the split manifest."""
    from pipeline.synthesize import _gen_info, _weights, derive_seed

    p: FocusParams = params.focus
    rule = rule or p.rule
    sp = params.synthesize
    infos = {g: _gen_info(g) for g in sp.generators}
    sources = train_sources(manifest)
    fits = {g: sorted((s for s in sources if infos[g].domain in (s.domain, "aigc")),
                      key=lambda s: s.key)
            for g in _weights(sp, infos)}
    names = [g for g in fits if fits[g]]
    unfit = sorted(set(fits) - set(names))
    if not names:
        why = ("no generator with weight > 0 has a train source it can forge (train sources: "
               f"{len(sources)}; generators: {', '.join(fits) or 'none'})")
        log.warning("focus: an empty plan: %s", why)
        return {"round": round_, "rule": rule, "set": p.set, "budget": p.budget,
                "seed": params.seed, "empty": why, "cells": {}, "no_train_source": unfit,
                "generators": {}, "domain_weights": {}, "jobs": []}
    preds = _read(predictions)
    if not any(r["set"] == p.set for r in preds):
        log.warning("focus: no evaluated images of set %r in %s: every cell scores alike "
                    "(add %r to evaluate.splits)", p.set, predictions, p.set)
    stats = cell_stats(preds, names, p.set, params.evaluate.threshold)
    scored = shares(stats, p, rule)
    q = quotas({g: c["share"] for g, c in scored.items()}, p.budget)
    # failures: the worst samples of each cell in the set, and their real parents' pHash
    worst_rows = [w for w in _read(worst) if w["set"] == p.set]
    parents: dict[str, str | None] = {}
    phash: dict[str, str | None] = {}
    want = {w["key"] for w in worst_rows}
    for r in iter_records(manifest):
        if r.key in want:
            parents[r.key] = r.parent_key
        phash[r.key] = r.phash
    failures: dict[str, list[str]] = defaultdict(list)
    for w in worst_rows:
        if w["generator"] in q and w["key"] not in failures[w["generator"]]:
            failures[w["generator"]].append(w["key"])
    jobs, cells = [], {}
    for g in names:
        fail_hashes = [phash.get(parents.get(k) or "") for k in failures.get(g, [])]
        fail_hashes = [h for h in fail_hashes if h]

        def rank(s: Record, g=g, fail_hashes=fail_hashes) -> tuple[int, int]:
            near = min((_hamming(s.phash, h) for h in fail_hashes), default=0)
            return (near if rule == "focus" else 0, derive_seed(params.seed, "focus", round_,
                                                                 rule, g, s.key))

        ranked = sorted(fits[g], key=rank)
        for i in range(q[g]):
            jobs.append({"generator": g, "source": ranked[i % len(ranked)].key})
        cells[g] = {"domain": infos[g].domain, "operation": registry_operation(g),
                    **stats[g], **scored[g], "quota": q[g],
                    "failures": failures.get(g, []) if rule == "focus" else [],
                    "sources": len(ranked)}
    by_domain: dict[str, float] = defaultdict(float)
    for g in names:
        by_domain[infos[g].domain] += cells[g]["share"]
    return {
        "round": round_, "rule": rule, "set": p.set, "budget": p.budget, "seed": params.seed,
        "threshold": params.evaluate.threshold,
        "params": {"explore": p.explore, "floor": p.floor, "prior": p.prior},
        "cells": cells,
        "no_train_source": unfit,
        "generators": {g: round(cells[g]["share"] / by_domain[infos[g].domain], 6)
                       for g in names},
        "domain_weights": {d: round(v, 6) for d, v in sorted(by_domain.items())},
        "jobs": jobs,
    }


def registry_operation(name: str) -> str:
    from generators import registry

    return registry.generator_class(name).operation


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    ev = Path(inputs["evaluate"])
    if not (ev / "predictions.parquet").exists():
        raise FileNotFoundError(f"focus: no {ev / 'predictions.parquet'}; run evaluate first")
    round_ = 1 + len(params.synthesize.plan_from)
    plan = make_plan(params, ev / "predictions.parquet", ev / "worst.parquet",
                     Path(inputs["manifest"]), round_)
    write_json(Path(out) / "plan.json", plan)
    return {k: v for k, v in plan.items() if k != "jobs"} | {"total": len(plan["jobs"])}


STAGE = Stage(
    name="focus",
    help="plan the next round's forgeries from the model's failures: data/focus/plan.json "
         "(read by synthesize.plan_from; `python -m pipeline loop` runs rounds)",
    params=FocusParams,
    run=run,
    reads=("split", "evaluate"),
    writes={"focus": "focus"},
    uses=("seed", "synthesize", "evaluate.threshold"),
    code=("pipeline/synthesize.py",),
)
