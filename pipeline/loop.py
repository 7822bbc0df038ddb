"""`python -m pipeline loop --rounds N --params FILE [--compare uniform]`: the data loop.

Round 0 is the pipeline as configured, ingest to evaluate. Each round r >= 1 then:
1. `focus` plans the round's `focus.budget` new forgeries from the previous round's
   evaluation on `focus.set` (val) (`pipeline.focus`: the rule);
2. synthesize forges them (`synthesize.plan_from`: the plans of rounds 1..r; `reuse`: the
   forgeries of earlier rounds are kept, not forged again) with keys of their round, from
   train sources only;
3. masks, split, shard, export rebuild the corpus (a forgery goes where its source's group
   is, and a group's split depends on the corpus rows alone, so val and test keep exactly
   their samples; the loop checks it every round);
4. train continues from the previous round's model (`train.init_from`), or starts from
   scratch with `--from-scratch`; evaluate scores it on val, test and test_ood.

`--compare uniform` runs a second arm from the same round 0 (a copy of data_dir under
`data_dir/loop/uniform/`): the same number of new samples per round, spread evenly over the
cells with sources in a random order (`focus.rule: uniform`), trained the same way. Test
images are the same in both arms, so each cell's difference (focus minus uniform) in
detection rate and pixel F1 is paired by image, with percentile bootstrap intervals.

Writes, under data_dir/loop/: `rounds/<arm>-NN/` (the round's `params.yaml`, which
reproduces it with `python -m pipeline run --from synthesize --to evaluate --params ...`,
its `plan.json`, `new_keys.json` (the forgeries it added), `evaluate.json`, `train.json`,
`predictions.parquet` and `model/`);
`metrics/loop.json` (per round and cell: test figures, new samples planned and made,
budget spent; the comparison); `plots/loop.csv` and `plots/loop.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import params as params_mod
from pipeline.params import Params, ParamsError

log = logging.getLogger("pipeline.loop")

ROUND_STAGES = ("synthesize", "masks", "split", "shard", "export", "train", "evaluate")
FIXED_SETS = ("val", "test", "test_ood")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline loop",
        description="Rounds of focus -> synthesize -> masks -> split -> shard -> export -> "
        "train -> evaluate, where the model's failures on val decide the next round's "
        "forgeries. Writes data_dir/loop/, metrics/loop.json, plots/loop.png.")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--rounds", type=int, default=2, help="rounds after round 0 (default 2)")
    p.add_argument("--compare", choices=("uniform",),
                   help="also run the uniform baseline arm and report the difference per cell")
    p.add_argument("--budget", type=int, help="new forgeries per round (default focus.budget)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train each round from scratch instead of from the previous model")
    p.add_argument("--backend", choices=("ray", "local"), help="override executor.backend")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    return params_mod.from_dict(params_mod._merge(params.to_dict(), overrides),
                                base_dir=params.base_dir)


def _link_tree(src: Path, dst: Path, ignore=None) -> None:
    """A copy whose files are hard links where the file system allows (stages replace files
    by renaming, never write into them, so both trees stay independent)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=link, ignore=ignore, symlinks=True)


def _read_table(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.exists() else []


def fixed_sets(manifest: Path) -> dict[str, list[str]]:
    """The keys of the shipped val / test / test_ood rows: what every round must keep."""
    import pyarrow.parquet as pq

    t = pq.read_table(manifest, columns=["key", "split", "status"]).to_pylist()
    return {s: sorted(r["key"] for r in t if r["split"] == s and r["status"] == "ok")
            for s in FIXED_SETS}


def synthesized(manifest: Path) -> dict[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    cols = ["key", "kind", "status", "generator", "domain", "operation", "split"]
    return {r["key"]: r for r in pq.read_table(manifest, columns=cols).to_pylist()
            if r["kind"] == "synthesized"}


def cell_figures(preds: list[dict[str, Any]], set_: str, threshold: float
                 ) -> dict[str, dict[str, Any]]:
    """Per generator on one set: n, detection rate, mean pixel F1, AUC against the set's
    real images; and `real`: the false-positive rate on real images."""
    from sklearn.metrics import roc_auc_score

    rows = [r for r in preds if r["set"] == set_]
    reals = [r for r in rows if r["label"] == "real"]
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({r["generator"] for r in rows if r["label"] != "real"}):
        fake = [r for r in rows if r["generator"] == g and r["label"] != "real"]
        f1 = [r["pixel_f1"] for r in fake if r.get("pixel_f1") is not None]
        auc = None
        if reals and fake:
            y = [0] * len(reals) + [1] * len(fake)
            auc = float(roc_auc_score(y, [r["score"] for r in reals + fake]))
        out[g] = {"domain": fake[0]["domain"], "operation": fake[0]["operation"],
                  "n": len(fake),
                  "detect_rate": float(np.mean([r["score"] >= threshold for r in fake])),
                  "pixel_f1": float(np.mean(f1)) if f1 else None,
                  "auc_vs_real": auc}
    if reals:
        out["real"] = {"domain": "-", "operation": "-", "n": len(reals),
                       "false_positive_rate": float(np.mean([r["score"] >= threshold
                                                             for r in reals]))}
    return out


def paired_difference(a: dict[str, float], b: dict[str, float], p: Params, what: str
                      ) -> dict[str, Any]:
    """Mean of a - b over the keys both have, with a paired percentile bootstrap interval."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"n": 0, "value": None, "ci": None}
    x = np.array([a[k] for k in keys], float)
    y = np.array([b[k] for k in keys], float)
    out: dict[str, Any] = {"n": len(keys), "value": round(float(np.mean(x - y)), 6), "ci": None}
    ev = p.evaluate
    if len(keys) >= 2 and ev.bootstrap and np.ptp(x - y) > 0:
        from scipy.stats import bootstrap

        res = bootstrap((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True,
                        vectorized=True, n_resamples=ev.bootstrap,
                        confidence_level=ev.confidence, method="percentile",
                        random_state=np.random.default_rng(p.seed))
        out["ci"] = [round(float(res.confidence_interval.low), 6),
                     round(float(res.confidence_interval.high), 6)]
    elif len(keys) >= 2:
        out["ci"] = [out["value"], out["value"]]  # every pair differs by the same amount
    else:
        out["note"] = f"one paired image: no interval for {what}"
    return out


def compare_arms(focus: list[dict[str, Any]], uniform: list[dict[str, Any]], p: Params,
                 set_: str = "test") -> dict[str, Any]:
    """Per cell, focus minus uniform on the same test images: detection (1 if a forgery
    scores >= threshold; for real images 1 if it scores below) and pixel F1."""
    thr = p.evaluate.threshold

    def per_image(preds):
        cells: dict[str, dict[str, dict[str, float]]] = {}
        for r in preds:
            if r["set"] != set_:
                continue
            cell = "real" if r["label"] == "real" else r["generator"]
            c = cells.setdefault(cell, {"correct": {}, "pixel_f1": {}})
            ok = r["score"] < thr if r["label"] == "real" else r["score"] >= thr
            c["correct"][r["key"]] = float(ok)
            if r.get("pixel_f1") is not None:
                c["pixel_f1"][r["key"]] = float(r["pixel_f1"])
        return cells

    a, b = per_image(focus), per_image(uniform)
    out = {}
    for cell in sorted(set(a) | set(b)):
        ca, cb = a.get(cell, {}), b.get(cell, {})
        out[cell] = {m: paired_difference(ca.get(m, {}), cb.get(m, {}), p, m)
                     for m in ("correct", "pixel_f1")}
    return out


class Arm:
    """One arm of the loop: a rule, a params object (its own data_dir), its rounds."""

    def __init__(self, name: str, params: Params, root: Path):
        self.name, self.params, self.root = name, params, root
        self.plans: list[str] = []
        self.rounds: list[dict[str, Any]] = []
        self.model: Path | None = None
        self.spent: Counter = Counter()
        self.fixed: dict[str, list[str]] | None = None
        self.known: set[str] = set()

    def record_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"{self.name}-{r:02d}"


def run_stages(names, params: Params, executor) -> dict[str, dict[str, Any]]:
    from pipeline.cli import run_stage

    return {n: run_stage(n, params, executor) for n in names}


def finish_round(arm: Arm, r: int, params: Params, plan: dict[str, Any] | None,
                 seconds: float) -> dict[str, Any]:
    """Copies what the round made into its record and computes its row of loop.json."""
    d = arm.record_dir(r)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    data = params.data
    (d / "params.yaml").write_text(params_mod.dump(params))
    if plan is not None:
        (d / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    for name in ("evaluate.json", "train.json", "synthesize.json"):
        src = params.metrics / name
        if src.exists():
            shutil.copy2(src, d / name)
    shutil.copy2(data / "evaluate" / "predictions.parquet", d / "predictions.parquet")
    _link_tree(data / "train" / "model", d / "model")
    arm.model = d / "model"
    rows = synthesized(data / "split" / "manifest.parquet")
    new = [k for k in rows if k not in arm.known]
    made = Counter(rows[k]["generator"] for k in new if rows[k]["status"] == "ok")
    (d / "new_keys.json").write_text(json.dumps(sorted(new)) + "\n")
    if r > 0:
        arm.spent.update(made)
    arm.known |= set(rows)
    fixed = fixed_sets(data / "split" / "manifest.parquet")
    if arm.fixed is None:
        arm.fixed = fixed
    unchanged = fixed == arm.fixed
    if not unchanged:
        moved = {s: len(set(fixed[s]) ^ set(arm.fixed[s])) for s in FIXED_SETS}
        log.error("loop %s round %d: val/test changed (%s keys differ per set)", arm.name, r,
                  moved)
    preds = _read_table(d / "predictions.parquet")
    ev = json.loads((d / "evaluate.json").read_text()) if (d / "evaluate.json").exists() else {}
    test = ev.get("splits", {}).get("test", {})
    planned = Counter(j["generator"] for j in (plan or {}).get("jobs", []))
    row = {
        "arm": arm.name, "round": r, "seconds": round(seconds, 1),
        "new_keys": len(new), "new_ok": sum(made.values()),
        "planned": dict(sorted(planned.items())), "made": dict(sorted(made.items())),
        "spent": dict(sorted(arm.spent.items())),
        "fixed_sets_unchanged": unchanged,
        "fixed_sets": {s: len(v) for s, v in fixed.items()},
        "test": {"n": test.get("n"), "image_auc": (test.get("image") or {}).get("auc"),
                 "pixel_f1": (test.get("pixel") or {}).get("f1")},
        "cells": cell_figures(preds, "test", params.evaluate.threshold),
        "val_cells": (plan or {}).get("cells"),
    }
    arm.rounds.append(row)
    return row


def run_loop(params: Params, rounds: int, compare: str | None, from_scratch: bool,
             executor) -> dict[str, Any]:
    from pipeline import stages as stages_mod
    from pipeline.focus import make_plan

    root = params.data / "loop"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    splits = tuple(params.evaluate.splits)
    if params.focus.set not in splits:  # focus reads it
        splits = (params.focus.set, *splits)
    base = with_overrides(params, {"synthesize": {"reuse": True},
                                   "evaluate": {"splits": list(splits)},
                                   "focus": {"rule": "focus"}})
    t0 = time.perf_counter()
    names = stages_mod.names()
    run_stages(names[: names.index("evaluate") + 1], base, executor)
    focus = Arm("focus", base, root)
    finish_round(focus, 0, base, None, time.perf_counter() - t0)
    arms = [focus]
    if compare == "uniform":
        udata = root / "uniform" / "data"
        _link_tree(params.data, udata,
                   ignore=lambda d, names: {"loop", ".lock"} & set(names)
                   if Path(d) == params.data else set())
        uparams = with_overrides(base, {
            "data_dir": str(udata), "metrics_dir": str(root / "uniform" / "metrics"),
            "plots_dir": str(root / "uniform" / "plots"), "focus": {"rule": "uniform"}})
        uniform = Arm("uniform", uparams, root)
        uniform.rounds = [dict(focus.rounds[0], arm="uniform")]
        uniform.model, uniform.known = focus.model, set(focus.known)
        uniform.fixed = focus.fixed
        arms.append(uniform)
    for r in range(1, rounds + 1):
        for arm in arms:
            t1 = time.perf_counter()
            prev = arm.params
            plan = make_plan(prev, prev.data / "evaluate" / "predictions.parquet",
                             prev.data / "evaluate" / "worst.parquet",
                             prev.data / "split" / "manifest.parquet", r, rule=arm.name)
            arm.record_dir(r).mkdir(parents=True, exist_ok=True)
            path = root / "plans" / f"{arm.name}-{r:02d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(plan, indent=1) + "\n")
            arm.plans.append(str(path.resolve()))
            over: dict[str, Any] = {"synthesize": {"plan_from": list(arm.plans)}}
            if not from_scratch:
                over["train"] = {"init_from": str(arm.model.resolve())}
            arm.params = with_overrides(arm.params, over)
            print(f"[loop] {arm.name} round {r}: {len(plan['jobs'])} new forgeries planned "
                  + ", ".join(f"{g} {c['quota']}" for g, c in plan["cells"].items()), flush=True)
            run_stages(ROUND_STAGES, arm.params, executor)
            row = finish_round(arm, r, arm.params, plan, time.perf_counter() - t1)
            t = row["test"]
            print(f"[loop] {arm.name} round {r}: {row['new_ok']} new samples; test AUC "
                  f"{_fmt(t['image_auc'])} pixel F1 {_fmt(t['pixel_f1'])}; val/test "
                  f"{'unchanged' if row['fixed_sets_unchanged'] else 'CHANGED'}", flush=True)
    result: dict[str, Any] = {
        "rounds": rounds, "budget": params.focus.budget, "set": params.focus.set,
        "report_set": "test", "init": "scratch" if from_scratch else "previous round's model",
        "rule": {"explore": params.focus.explore, "floor": params.focus.floor,
                 "prior": params.focus.prior},
        "arms": {a.name: a.rounds for a in arms},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if len(arms) == 2:
        result["compare"] = {
            str(r): compare_arms(_read_table(focus.record_dir(r) / "predictions.parquet"),
                                 _read_table(arms[1].record_dir(r) / "predictions.parquet"),
                                 params)
            for r in range(1, rounds + 1)}
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("value")
    return "n/a" if v is None else f"{v:.3f}"


def write_outputs(result: dict[str, Any], params: Params) -> tuple[Path, Path]:
    from pipeline.focus import write_json

    write_json(params.metrics / "loop.json", result)
    rows = []
    for arm, rounds in result["arms"].items():
        for rd in rounds:
            for cell, c in rd["cells"].items():
                rows.append((arm, rd["round"], cell, c.get("domain"), c.get("n"),
                             c.get("detect_rate", c.get("false_positive_rate")),
                             c.get("pixel_f1"), c.get("auc_vs_real"),
                             rd["planned"].get(cell, 0), rd["made"].get(cell, 0),
                             rd["spent"].get(cell, 0)))
    csv_path = params.plots / "loop.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    import csv

    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("arm", "round", "cell", "domain", "test_n", "detect_rate", "pixel_f1",
                    "auc_vs_real", "planned", "made", "spent"))
        w.writerows(rows)
    return csv_path, plot(result, params.plots / "loop.png")


def plot(result: dict[str, Any], out: Path) -> Path:
    """Per cell against rounds: test detection rate and pixel F1 (focus solid, uniform
    dashed); and the new samples each cell got over all rounds, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    cells = sorted({c for rounds in arms.values() for rd in rounds for c in rd["cells"]
                    if c != "real"} | {c for rounds in arms.values() for rd in rounds
                                       for c in rd["spent"]})
    cmap = plt.cm.tab10 if len(cells) <= 10 else plt.cm.tab20
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(cells)}
    styles = {"focus": "-", "uniform": "--"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    panels = ((axes[0], "detect_rate", "test: forgeries detected (score >= threshold)"),
              (axes[1], "pixel_f1", "test: pixel F1 (tampered images)"))
    for ax, metric, title in panels:
        drawn = 0
        for arm, rounds in arms.items():
            for c in cells:
                pts = [(rd["round"], rd["cells"][c][metric]) for rd in rounds
                       if rd["cells"].get(c, {}).get(metric) is not None]
                if pts:
                    drawn += 1
                    ax.plot(*zip(*pts), styles.get(arm, ":"), marker="o", ms=4,
                            color=colors[c], label=c if arm == "focus" else None)
        if not drawn:
            ax.text(0.5, 0.5, "no test images with this figure", ha="center",
                    transform=ax.transAxes, color="grey")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(range(result["rounds"] + 1))
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[2]
    width = 0.8 / max(1, len(arms))
    for i, (arm, rounds) in enumerate(arms.items()):
        spent = rounds[-1]["spent"] if rounds else {}
        ys = [spent.get(c, 0) for c in cells]
        ax.barh([j + i * width for j in range(len(cells))], ys, height=width,
                color=[colors[c] for c in cells], hatch=None if arm == "focus" else "//",
                edgecolor="black", linewidth=0.5, label=arm)
    ax.set_yticks([j + width * (len(arms) - 1) / 2 for j in range(len(cells))], cells)
    ax.invert_yaxis()
    ax.set_xlabel(f"new samples over rounds 1-{result['rounds']}")
    ax.set_title("budget spent per cell (hatched: uniform)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        axes[1].legend(handles, labels, fontsize=8, loc="lower right", title="cell")
    arms_txt = "solid: focus" + ("; dashed: uniform baseline" if "uniform" in arms else "")
    fig.suptitle(f"data loop: {result['rounds']} round(s) of {result['budget']} new forgeries "
                 f"({arms_txt}); steered by {result['set']}, reported on test", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import DataDirBusy, DataDirLock, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        overrides: dict[str, Any] = {}
        if args.backend:
            overrides["executor"] = {"backend": args.backend}
        if args.budget is not None:
            overrides["focus"] = {"budget": args.budget}
        params = params_mod.load(args.params, overrides or None)
        from pipeline.corpus import load_corpus

        load_corpus(params.corpus_paths())
        from pipeline.executor import Executor

        with DataDirLock(params.data):
            executor = Executor(params.executor)
            try:
                result = run_loop(params, args.rounds, args.compare, args.from_scratch,
                                  executor)
            finally:
                executor.shutdown()
        csv_path, png = write_outputs(result, params)
    except (ParamsError, FileNotFoundError, DataDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for r, cells in result.get("compare", {}).items():
        parts = []
        for cell, m in cells.items():
            v = m["correct"]
            if v["value"] is not None:
                ci = v["ci"]
                parts.append(f"{cell} {v['value']:+.2f}"
                             + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""))
        print(f"[loop] round {r}, focus - uniform, test detection per cell: "
              + ("; ".join(parts) or "no paired images"))
    print(f"[loop] {result['rounds']} rounds in {result['seconds']:.0f}s -> "
          f"{params.metrics / 'loop.json'}, {csv_path}, {png}")
    return 0 if all(rd["fixed_sets_unchanged"] for a in result["arms"].values() for rd in a) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
