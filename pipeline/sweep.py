"""`python -m pipeline sweep`: one model per point, trained and evaluated by the same stages
as the main run, each in its own folder (the main model is never touched).

- `--by fraction` (data scaling): one point per nested fraction of an export (the folders
  `<name>-<pct>pct` that `export.exports.<name>.fractions` writes). Every point is tested on
  the same images (fractions only cut `train`; the largest fraction's test split is used for
  all). Writes `metrics/scaling.json`: the points (fraction, training samples, image AUC
  and pixel F1 with their intervals) and, per metric, the power law
  `err(N) = a * N^-b + c` (err = 1 - metric, N = training samples) fitted with
  `scipy.optimize.curve_fit` within bounds (a >= 0, 0 <= b <= 3, 0 <= c <= 1), with its
  standard errors and whether it is identifiable (more points than its 3 parameters and a
  finite covariance); and `plots/scaling.png`.
- `--by domain` (transfer): one model per domain of the export's train split, trained on
  that domain alone (an export of it, written in the point's folder), and one on all
  domains; each evaluated on every domain of the same test split. Writes
  `metrics/transfer.json` ({metric: {trained on: {evaluated on: value}}}) and
  `plots/transfer.png` (heat maps).
- `--dvc`: the fraction sweep as DVC experiments instead: queues
  `dvc exp run --queue -S export.fraction=F` per fraction, runs `dvc queue start`, waits, and
  collects the experiments' metrics (`dvc.api.exp_show`) into the same `scaling.json`;
  `--collect` only collects experiments that already ran.

Each point runs `python -m pipeline run --from train --to evaluate` (and `export` first for a
domain) as a child process, fresh for every point (memory is returned; training's loader
processes are never forked from a process that already ran OpenCV's thread pool), on a params
file of its own (`<out>/<point>/params.yaml`: the run's params with the point's data_dir,
metrics_dir and plots_dir, export and step count), in a data_dir that links to the run's
shared artifacts (exports, manifest, blobs). The executor settings are the run's: with
`executor.address` each point trains on the Ray cluster. A point whose params and export
are unchanged since it last finished is not run again (`--force` reruns it). `--jobs N`
runs N points at once (on a cluster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline import params as params_mod
from pipeline.params import Params, ParamsError

log = logging.getLogger(__name__)

PCT = re.compile(r"^(?P<base>.+)-(?P<pct>[0-9]+(?:\.[0-9]+)?)pct$")
METRICS = ("image_auc", "pixel_f1")  # the scaling metrics: (block group, key)
_WHERE = {"image_auc": ("image", "auc"), "pixel_f1": ("pixel", "f1"),
          "image_accuracy": ("image", "accuracy")}


@dataclass
class Point:
    name: str  # folder under the sweep's output
    export: str  # export the point trains on
    fraction: float | None = None
    domain: str | None = None
    links: dict[str, Path] = field(default_factory=dict)  # data_dir entries linked to the run's
    base: str | None = None  # the run's export it is cut from (None: it is the run's export)


# ---------------------------------------------------------------------------------------
# points


def fraction_exports(exports: Path, base: str) -> list[tuple[str, float]]:
    """The nested fraction folders `<base>-<pct>pct` under `exports`, smallest first."""
    found = []
    if exports.is_dir():
        for d in exports.iterdir():
            m = PCT.match(d.name)
            if m and m.group("base") == base and (d / "train").is_dir():
                found.append((d.name, float(m.group("pct")) / 100))
    return sorted(found, key=lambda t: t[1])


def base_export(name: str) -> str:
    m = PCT.match(name)
    return m.group("base") if m else name


def train_domains(export: Path) -> list[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(export / "manifest.parquet", columns=["split", "domain"]).to_pylist()
    return sorted({str(r["domain"]) for r in t if r["split"] == "train" and r["domain"]})


def domain_export(base: Path, domain: str, data_dir: Path, target: Path) -> int:
    """`target/{train,val}`: the samples of one domain of the export `base`, exactly (the
    shard writer of the shard stage, same records, same bytes); returns the train count."""
    from pipeline.records import ManifestWriter, iter_records
    from pipeline.shard import write_shard_set

    rows = [r for r in iter_records(base / "manifest.parquet")
            if r.split in ("train", "val") and str(r.domain) == domain]
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        recs = sorted((r for r in rows if r.split == split), key=lambda r: r.key)
        if recs or (target / split).exists():
            write_shard_set(recs, data_dir, target / split, split, 1000, 1 << 30)
    with ManifestWriter(target / "manifest.parquet") as w:
        for r in sorted(rows, key=lambda r: (r.split, r.key)):
            w.write(r)
    return sum(r.split == "train" for r in rows)


# ---------------------------------------------------------------------------------------
# running one point


def _abs(params: Params, value: str) -> str:
    return str(params.resolve(value).resolve())


def point_params(params: Params, point: Point, root: Path, steps: int | None,
                 evaluate_export: str, robustness: bool) -> dict[str, Any]:
    """The run's params for one point: its own folders, export and steps; paths absolute so
    the file works from the point's folder."""
    d = params.to_dict()
    d["data_dir"] = str(root / "data")
    d["metrics_dir"] = str(root / "metrics")
    d["plots_dir"] = str(root / "plots")
    d["corpus"] = [_abs(params, c) for c in params.corpus]
    d["evaluate"]["benchmarks"] = [_abs(params, b) for b in params.evaluate.benchmarks]
    d["evaluate"]["export"] = evaluate_export
    if not robustness:
        d["evaluate"]["robustness_max_images"] = 0
    d["train"]["export"] = point.export
    if steps is not None:
        d["train"]["steps"] = steps
    return d


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            return
        if dst.is_symlink():
            dst.unlink()
        else:
            raise FileExistsError(f"{dst} exists and is not a link to {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())


def _fingerprint(d: dict[str, Any], exports: list[Path]) -> str:
    from pipeline.train import sha256_file

    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    for e in exports:
        m = e / "manifest.parquet"
        h.update((sha256_file(m) if m.exists() else str(e)).encode())
    return h.hexdigest()[:16]


def _stage(stage: str, params_file: Path, logf) -> None:
    """`python -m pipeline STAGE` in a child process (`train+evaluate`: both, in one)."""
    first, _, last = stage.partition("+")
    cmd = [sys.executable, "-m", "pipeline", *(["run", "--from", first, "--to", last]
                                               if last else [stage]), "--params", str(params_file)]
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    res = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{stage} failed ({res.returncode}) for {params_file}; see "
                           f"{Path(logf.name)}")


def run_point(params: Params, point: Point, root: Path, steps: int | None,
              evaluate_export: str, robustness: bool, force: bool) -> dict[str, Any]:
    """Trains and evaluates one point in `root`; returns its train and evaluate metrics."""
    data = params.data.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name, src in point.links.items():
        _link(src, root / "data" / name)
    d = point_params(params, point, root, steps, evaluate_export, robustness)
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(d, sort_keys=False))
    exports = [data / "exports" / evaluate_export, data / "exports" / (point.base or point.export)]
    fp = _fingerprint(d, exports)
    done = root / "done.json"
    mdir = root / "metrics"
    if not force and done.exists() and json.loads(done.read_text()).get("fingerprint") == fp \
            and (mdir / "evaluate.json").exists() and (mdir / "train.json").exists():
        log.info("sweep %s: up to date", point.name)
    else:
        done.unlink(missing_ok=True)
        t0 = time.perf_counter()
        with open(root / "log.txt", "a") as logf:
            if point.base is not None:
                domain_export(data / "exports" / point.base, point.domain, data,
                              root / "data" / "exports" / point.export)
                # the test split the point is evaluated on: the run's export
                _link(data / "exports" / evaluate_export,
                      root / "data" / "exports" / evaluate_export)
            _stage("train+evaluate", pfile, logf)
        done.write_text(json.dumps({"fingerprint": fp, "seconds": round(
            time.perf_counter() - t0, 1)}) + "\n")
    return {"train": json.loads((mdir / "train.json").read_text()),
            "evaluate": json.loads((mdir / "evaluate.json").read_text())}


def run_points(params: Params, points: list[Point], out: Path, steps: int | None,
               evaluate_export: str, robustness: bool, force: bool, jobs: int
               ) -> dict[str, dict[str, Any]]:
    def one(pt: Point) -> tuple[str, dict[str, Any]]:
        print(f"[sweep] {pt.name}: train on {pt.export}, evaluate on {evaluate_export}",
              flush=True)
        res = run_point(params, pt, out / pt.name, steps, evaluate_export, robustness, force)
        t = res["train"]
        print(f"[sweep] {pt.name}: {t.get('train_samples')} training samples, "
              f"{t.get('steps')} steps", flush=True)
        return pt.name, res

    if jobs <= 1:
        return dict(one(pt) for pt in points)
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, points))


# ---------------------------------------------------------------------------------------
# figures


def metric_value(ev: dict[str, Any], set_name: str, metric: str, domain: str | None = None
                 ) -> tuple[float | None, list[float] | None]:
    """(value, ci) of a metric in evaluate.json (of a domain of the set, if given)."""
    block = None
    for group in ("splits", "benchmarks", "sets"):
        if set_name in (ev.get(group) or {}):
            block = ev[group][set_name]
            break
    if block is not None and domain is not None:
        block = (block.get("by_domain") or {}).get(domain)
    if not isinstance(block, dict):
        return None, None
    g, k = _WHERE[metric]
    v = (block.get(g) or {}).get(k)
    if isinstance(v, dict):
        return v.get("value"), v.get("ci")
    return v, None


def fit_power_law(n: list[float], metric: list[float]) -> dict[str, Any]:
    """err(N) = a * N^-b + c, err = 1 - metric, fitted by bounded least squares."""
    from scipy.optimize import curve_fit

    pts = [(float(x), 1.0 - float(y)) for x, y in zip(n, metric)
           if x and y is not None and math.isfinite(y)]
    out: dict[str, Any] = {"form": "err(N) = a * N^-b + c, err = 1 - metric", "points": len(pts)}
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return {**out, "a": None, "b": None, "c": None, "identifiable": False,
                "note": f"{len(pts)} point(s) with distinct N: no fit"}
    x = np.array([p[0] for p in pts])
    e = np.array([p[1] for p in pts])

    def f(N, a, b, c):
        return a * np.power(N, -b) + c

    c0 = max(0.0, float(e.min()) * 0.5)
    p0 = [max(float(e.max()) - c0, 1e-3) * float(x.min()) ** 0.5, 0.5, c0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an undetermined covariance is reported below
            popt, pcov = curve_fit(f, x, e, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, 3.0, 1.0]),
                                   maxfev=20000)
    except (RuntimeError, ValueError) as err:
        return {**out, "a": None, "b": None, "c": None, "identifiable": False,
                "note": f"fit failed: {err}"}
    se = np.sqrt(np.diag(pcov)) if np.all(np.isfinite(pcov)) else np.full(3, np.inf)
    resid = e - f(x, *popt)
    a, b, c = (float(v) for v in popt)
    why = []
    if len(pts) <= 3:
        why.append(f"{len(pts)} points for 3 parameters (the curve can pass through them with "
                   "nothing left to check it)")
    if a < 1e-6 or b < 1e-4 or b > 3 - 1e-4:
        why.append("the best fit sits on a bound (no decrease with N: a and c trade off)")
    if not np.all(np.isfinite(se)) or se[0] > a or se[1] > b:
        why.append("standard errors of a or b larger than the estimates")
    return {**out, "a": a, "b": b, "c": c,
            "se": {k: (float(v) if math.isfinite(v) else None) for k, v in zip("abc", se)},
            "rmse": float(np.sqrt(np.mean(resid ** 2))), "identifiable": not why,
            "note": ("not identifiable: " + "; ".join(why)) if why else ""}


def scaling_figures(results: dict[str, dict[str, Any]], points: list[Point], set_name: str
                    ) -> dict[str, Any]:
    rows = []
    for pt in points:
        res = results[pt.name]
        row: dict[str, Any] = {"name": pt.name, "export": pt.export, "fraction": pt.fraction,
                               "train_samples": res["train"].get("train_samples"),
                               "steps": res["train"].get("steps")}
        for m in METRICS:
            v, ci = metric_value(res["evaluate"], set_name, m)
            row[m], row[f"{m}_ci"] = v, ci
        rows.append(row)
    fit = {m: fit_power_law([r["train_samples"] for r in rows], [r[m] for r in rows])
           for m in METRICS}
    return {"by": "fraction", "set": set_name, "points": rows, "fit": fit}


def plot_scaling(sc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, m, label in zip(axes, METRICS, ("image AUC", "pixel F1 @0.5")):
        pts = [r for r in sc["points"] if r.get(m) is not None and r.get("train_samples")]
        if pts:
            x = np.array([r["train_samples"] for r in pts], float)
            y = np.array([r[m] for r in pts], float)
            lo = np.array([(r[f"{m}_ci"] or [r[m]] * 2)[0] for r in pts], float)
            hi = np.array([(r[f"{m}_ci"] or [r[m]] * 2)[1] for r in pts], float)
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", color="#1d4ed8", capsize=3,
                        label="runs (95% interval)")
            f = sc["fit"][m]
            if f.get("a") is not None:
                xs = np.geomspace(x.min() / 1.5, x.max() * 3, 100)
                tag = "" if f["identifiable"] else " (not identifiable)"
                ax.plot(xs, 1 - (f["a"] * xs ** -f["b"] + f["c"]), "--", color="#dc2626",
                        label=f"1 - ({f['a']:.3g} N^-{f['b']:.2f} + {f['c']:.3f}){tag}")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.legend(fontsize=7, frameon=False, loc="upper left")
        else:
            ax.text(0.5, 0.5, f"no {label} (undefined on every point)", ha="center",
                    transform=ax.transAxes, color="#888", fontsize=8)
        ax.set_xlabel("training samples N (log)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label} on {sc['set']}", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TRANSFER_METRICS = ("image_auc", "image_accuracy", "pixel_f1")


def transfer_figures(results: dict[str, dict[str, Any]], points: list[Point], set_name: str,
                     domains: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """({metric: {trained on: {evaluated on: value}}}, the details: intervals, samples)."""
    mats: dict[str, Any] = {m: {} for m in TRANSFER_METRICS}
    ci: dict[str, Any] = {m: {} for m in TRANSFER_METRICS}
    for pt in points:
        ev = results[pt.name]["evaluate"]
        for m in TRANSFER_METRICS:
            mats[m][pt.domain], ci[m][pt.domain] = {}, {}
            for d in domains:
                mats[m][pt.domain][d], ci[m][pt.domain][d] = metric_value(ev, set_name, m, d)
    details = {
        "by": "domain", "set": set_name, "rows": "trained on", "columns": "evaluated on",
        "ci": ci, "train_samples": {pt.domain: results[pt.name]["train"].get("train_samples")
                                    for pt in points},
        "note": "null: undefined (AUC needs real and forged images of that domain in the set; "
                "pixel F1 needs tampered images)"}
    return mats, details


def plot_transfer(tr: dict[str, Any], path: Path, samples: dict[str, Any] | None = None
                  ) -> Path:
    """Heat maps, one per metric: rows trained on, columns evaluated on (n/a: undefined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [(m, tr[m]) for m in TRANSFER_METRICS if tr.get(m)]
    rows = list(next(iter(mats))[1]) if mats else []
    cols = sorted({c for _, mat in mats for r in mat.values() for c in r})
    fig, axes = plt.subplots(1, max(1, len(mats)), figsize=(1.8 + 3.4 * max(1, len(mats)),
                                                            1.2 + 0.45 * max(1, len(rows))),
                             squeeze=False)
    for ax, (m, mat) in zip(axes[0], mats):
        grid = np.array([[np.nan if mat[r].get(c) is None else mat[r][c] for c in cols]
                         for r in rows], float)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=30, fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r} (N={samples[r]})" if samples and r in samples
                                         else r for r in rows], fontsize=8)
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = grid[i, j]
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=7, color="#888" if np.isnan(v) else ("k" if v > 0.6 else "w"))
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("trained on")
        ax.set_title(m.replace("_", " "), fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# the sweeps


def sweep_fractions(params: Params, args: argparse.Namespace) -> dict[str, Any]:
    data = params.data.resolve()
    base = args.export or base_export(params.train.export)
    found = fraction_exports(data / "exports", base)
    if len(found) < 2:
        raise ParamsError(
            f"sweep: export {base!r} has {len(found)} fraction folder(s) under "
            f"{data / 'exports'} ({base}-<pct>pct); set export.exports.{base}.fractions to "
            "several, e.g. [0.1, 0.25, 0.5, 1.0], and run the export stage")
    if args.fractions:
        want = {round(f, 6) for f in args.fractions}
        found = [(n, f) for n, f in found if round(f, 6) in want]
    evaluate_export = found[-1][0]  # the largest: every fraction has its test split
    points = [Point(name=n, export=n, fraction=f, links={
        "exports": data / "exports", "manifest.parquet": data / "manifest.parquet",
        "ingest": data / "ingest"}) for n, f in found]
    out = Path(args.out) if args.out else data / "sweeps" / "fraction"
    results = run_points(params, points, out, args.steps, evaluate_export, args.robustness,
                         args.force, args.jobs)
    sc = scaling_figures(results, points, args.set)
    sc.update(export=base, evaluated_on=evaluate_export, folder=str(out))
    return sc


def sweep_domains(params: Params, args: argparse.Namespace
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    data = params.data.resolve()
    name = args.export or params.train.export
    export = data / "exports" / name
    if not (export / "train").is_dir():
        raise ParamsError(f"sweep: no export {name!r} under {data / 'exports'}; run the export "
                          "stage first")
    domains = train_domains(export)
    if not domains:
        raise ParamsError(f"sweep: export {name!r} has no training samples")
    shared = {"manifest.parquet": data / "manifest.parquet", "ingest": data / "ingest"}
    points = [Point(name=f"only-{d}", export=f"{name}-only-{d}", domain=d, base=name,
                    links=dict(shared)) for d in domains]
    points.append(Point(name="all", export=name, domain="all",
                        links={**shared, "exports": data / "exports"}))
    out = Path(args.out) if args.out else data / "sweeps" / "domain"
    results = run_points(params, points, out, args.steps, name, args.robustness, args.force,
                         args.jobs)
    evaluated = sorted({d for pt in points for d in (
        results[pt.name]["evaluate"].get("splits", {}).get(args.set, {}).get("by_domain") or {})})
    tr, details = transfer_figures(results, points, args.set, evaluated or domains)
    details.update(export=name, folder=str(out))
    _write_json(out / "transfer_details.json", details)
    return tr, details


# ---------------------------------------------------------------------------------------
# the DVC way


def dvc_queue(fractions: list[float], jobs: int, timeout: float) -> None:
    """Queues one experiment per fraction and runs the queue to the end."""
    for f in fractions:
        name = f"frac{f * 100:g}".replace(".", "_")
        subprocess.run(["dvc", "exp", "run", "--queue", "-S", f"export.fraction={f}", "-n", name],
                       check=True)
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True,
                                check=True).stdout
        if "Queued" not in status and "Running" not in status:
            if "Failed" in status:
                raise RuntimeError(f"a queued experiment failed:\n{status}\n(dvc queue logs NAME)")
            return
        time.sleep(5)
    raise TimeoutError(f"dvc queue still running after {timeout:.0f}s")


def _col(row: dict[str, Any], name: str) -> Any:
    """A flattened exp_show column by name, with or without its `file:` prefix."""
    if name in row:
        return row[name]
    for k, v in row.items():
        if k.endswith(":" + name):
            return v
    return None


def dvc_points(rows: list[dict[str, Any]], set_name: str,
               read: Callable[[str, str], dict[str, Any] | None], metrics_dir: str = "metrics"
               ) -> list[dict[str, Any]]:
    """Scaling points of DVC experiments: `rows` from `dvc.api.exp_show()` give each
    experiment's `export.fraction` and revision, `read(rev, path)` its metrics files (exp_show
    leaves out lists, so the intervals come from the files). One point per fraction; named
    experiments first."""
    out: dict[float, dict[str, Any]] = {}
    rows = sorted(rows, key=lambda r: r.get("Experiment") is None)
    for r in rows:
        f, rev = _col(r, "export.fraction"), r.get("rev")
        if f is None or not rev or float(f) in out:
            continue
        ev = read(rev, f"{metrics_dir}/evaluate.json")
        tr = read(rev, f"{metrics_dir}/train.json")
        if not ev or not tr:
            continue
        pt: dict[str, Any] = {"name": r.get("Experiment") or rev, "rev": rev,
                              "fraction": float(f), "train_samples": tr.get("train_samples"),
                              "steps": tr.get("steps")}
        for m in METRICS:
            pt[m], pt[f"{m}_ci"] = metric_value(ev, set_name, m)
        out[float(f)] = pt
    return [out[f] for f in sorted(out)]


def _read_at(rev: str, path: str) -> dict[str, Any] | None:
    """A JSON file of the workspace or of a git revision (DVC experiments are commits)."""
    try:
        if rev == "workspace":
            return json.loads(Path(path).read_text())
        text = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True).stdout
        return json.loads(text)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None


def collect_dvc(set_name: str, metrics_dir: str) -> dict[str, Any]:
    import dvc.api

    points = dvc_points(dvc.api.exp_show(), set_name, _read_at, metrics_dir)
    fit = {m: fit_power_law([p["train_samples"] for p in points], [p[m] for p in points])
           for m in METRICS}
    return {"by": "fraction", "set": set_name, "source": "dvc experiments", "points": points,
            "fit": fit}


# ---------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline sweep",
        description="Train and evaluate one model per point, each in its own folder: "
        "a data-fraction sweep (scaling law: metrics/scaling.json, plots/scaling.png) or a "
        "per-domain sweep (transfer matrix: metrics/transfer.json, plots/transfer.png).")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--by", choices=("fraction", "domain"), default="fraction",
                    help="fraction: one model per nested export fraction; domain: one model "
                    "per training domain and one on all (default: fraction)")
    ap.add_argument("--export", help="export to sweep: for fractions the base name "
                    "(<name>-<pct>pct folders), for domains the folder (default: from "
                    "train.export)")
    ap.add_argument("--fractions", type=float, nargs="+",
                    help="only these fractions (default: every fraction folder)")
    ap.add_argument("--steps", type=int, help="training steps per point (default: train.steps)")
    ap.add_argument("--set", default="test", help="split the figures are read from "
                    "(default: test)")
    ap.add_argument("--out", help="points' folder (default: DATA_DIR/sweeps/<by>)")
    ap.add_argument("--jobs", type=int, default=1, help="points run at once (default: 1)")
    ap.add_argument("--robustness", action="store_true",
                    help="also run the robustness perturbations at every point")
    ap.add_argument("--force", action="store_true", help="rerun points that are up to date")
    ap.add_argument("--backend", choices=("ray", "local"), help="override executor.backend")
    ap.add_argument("--dvc", action="store_true", help="run the fraction sweep as DVC "
                    "experiments (dvc exp run --queue -S export.fraction=F; dvc queue start) "
                    "from the repository root, then collect them")
    ap.add_argument("--collect", action="store_true", help="with --dvc: only collect the "
                    "experiments that already ran")
    ap.add_argument("--timeout", type=float, default=24 * 3600,
                    help="with --dvc: seconds to wait for the queue (default: a day)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.steps is not None and args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        overrides = {"executor": {"backend": args.backend}} if args.backend else None
        params = params_mod.load(args.params, overrides)
        if args.dvc:
            if args.by != "fraction":
                raise ParamsError("--dvc runs fraction sweeps (export.fraction) only")
            if not args.collect:
                fractions = args.fractions or [0.1, 0.25, 0.5, 1.0]
                dvc_queue(fractions, args.jobs, args.timeout)
            sc = collect_dvc(args.set, params.metrics_dir.rstrip("/"))
            _write_json(params.metrics / "scaling.json", sc)
            png = plot_scaling(sc, params.plots / "scaling.png")
            print(f"[sweep] {len(sc['points'])} experiments -> {params.metrics / 'scaling.json'}, "
                  f"{png}")
            return 0
        if args.by == "fraction":
            sc = sweep_fractions(params, args)
            _write_json(params.metrics / "scaling.json", sc)
            png = plot_scaling(sc, params.plots / "scaling.png")
            for m in METRICS:
                f = sc["fit"][m]
                print(f"[sweep] {m}: " + (f"err(N) = {f['a']:.4g} N^-{f['b']:.3f} + {f['c']:.4f}"
                                          if f.get("a") is not None else "no fit")
                      + ("" if f.get("identifiable") else f" ({f.get('note')})"))
            print(f"[sweep] -> {params.metrics / 'scaling.json'}, {png}")
        else:
            tr, details = sweep_domains(params, args)
            _write_json(params.metrics / "transfer.json", tr)
            png = plot_transfer(tr, params.plots / "transfer.png", details["train_samples"])
            print(f"[sweep] transfer matrix -> {params.metrics / 'transfer.json'}, {png}")
    except (ParamsError, OSError, RuntimeError, TimeoutError,
            subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
