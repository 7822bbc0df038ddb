"""Benchmark: does Ray speed the stages up on this machine, against the in-process backend in
the same run?

- ingest of 160 images on Ray with 2 CPUs vs 1 CPU (goal >= 1.7x on an idle machine; the
  load average is printed);
- masks on 480 forgeries: Ray vs local at the same CPUs (goal: within 1.2x of local);
- synthesize 40 sources (the default generator mix, 80 forgeries): Ray vs local at the same
  CPUs (goal within 1.2x), and the worker processes each stage started (should equal the
  pool size).

Ray is started once per configuration, before the timed stage (as `python -m pipeline run`
starts it once per run); stage times exclude `ray.init`.

    python bench/bench_ray.py [--out metrics/bench_ray.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photos(folder: Path, n: int, side: int = 1024) -> None:
    """n distinct ~1 MP PNG crops of package photos."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    bases = [skdata.rocket(), skdata.coffee(), skdata.chelsea(), skdata.astronaut(),
             skdata.hubble_deep_field(), skdata.immunohistochemistry()]
    rng = np.random.default_rng(0)
    for i in range(n):
        b = bases[i % len(bases)]
        h, w = b.shape[:2]
        scale = side / min(h, w) * rng.uniform(1.05, 1.6)
        img = Image.fromarray(b).resize((int(w * scale), int(h * scale)))
        x = int(rng.integers(0, img.width - side + 1))
        y = int(rng.integers(0, img.height - side + 1))
        img.crop((x, y, x + side, y + side)).save(folder / f"img_{i:05d}.png")


def params_for(work: Path, corpus_dir: Path, backend: str, cpus: int, **sections):
    import yaml

    from pipeline import params as params_mod

    work.mkdir(parents=True, exist_ok=True)
    man = work / "corpus.yaml"
    man.write_text(yaml.safe_dump({"sources": [{
        "name": "bench", "kind": "image_folder", "domain": "natural", "label": "real",
        "license": "bench", "path": str(corpus_dir)}]}))
    return params_mod.from_dict({
        "data_dir": str(work / "data"), "metrics_dir": str(work / "metrics"),
        "corpus": [str(man)],
        "executor": {"backend": backend, "progress": False, "num_cpus": cpus},
        **sections,
    })


def timed_stage(stage: str, params, executor) -> tuple[float, dict]:
    from pipeline.cli import run_stage

    t0 = time.perf_counter()
    m = run_stage(stage, params, executor)
    return time.perf_counter() - t0, m


def one_config(work: Path, corpus: Path, backend: str, cpus: int, stages: list[str],
               prepare: list[str], **sections) -> dict[str, float]:
    """Runs `prepare` stages (untimed) then times `stages`, with one executor throughout."""
    from pipeline.executor import Executor

    params = params_for(work, corpus, backend, cpus, **sections)
    ex = Executor(params.executor)
    out: dict[str, float] = {}
    try:
        if backend == "ray":
            ex.start()
        for s in prepare:
            timed_stage(s, params, ex)
        for s in stages:
            secs, m = timed_stage(s, params, ex)
            out[s] = round(secs, 3)
            out[f"{s}_workers_started"] = m.get("executor", {}).get("workers_started")
    finally:
        ex.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_ray.json"))
    ap.add_argument("--quick", action="store_true", help="smaller corpus (for a smoke run)")
    args = ap.parse_args()
    n_ingest, n_masks_src, n_synth = (40, 40, 10) if args.quick else (160, 160, 40)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    load = os.getloadavg()
    results: dict[str, object] = {"load_average_at_start": [round(x, 2) for x in load],
                                  "cpu_count": os.cpu_count()}
    try:
        corpus = tmp / "photos"
        make_photos(corpus, n_ingest)
        # ingest: ray 2 CPUs vs ray 1 CPU
        ing = {}
        for cpus in (1, 2):
            w = tmp / f"ingest{cpus}"
            ing[cpus] = one_config(w, corpus, "ray", cpus, ["ingest"], [])
        results["ingest_ray_1cpu_s"] = ing[1]["ingest"]
        results["ingest_ray_2cpu_s"] = ing[2]["ingest"]
        results["ingest_speedup_2_vs_1"] = round(ing[1]["ingest"] / ing[2]["ingest"], 3)
        results["ingest_workers_started"] = {c: ing[c]["ingest_workers_started"] for c in ing}

        # masks on ~3 forgeries per source (classical generators): ray vs local, same CPUs
        msrc = tmp / "msrc"
        make_photos(msrc, n_masks_src, side=640)
        classical = {name: None for name in _registry()}
        classical.update(copy_move={}, removal={}, splice={})
        synth = {"generators": classical, "per_source": 3}
        mk = {}
        for backend in ("local", "ray"):
            w = tmp / f"masks_{backend}"
            mk[backend] = one_config(w, msrc, backend, 2, ["masks"],
                                     ["ingest", "dedup", "synthesize"], synthesize=synth)
        results["masks_local_s"] = mk["local"]["masks"]
        results["masks_ray_s"] = mk["ray"]["masks"]
        results["masks_ray_over_local"] = round(mk["ray"]["masks"] / mk["local"]["masks"], 3)
        results["masks_workers_started"] = mk["ray"]["masks_workers_started"]

        # synthesize: the default generator mix on n_synth sources, ray vs local
        ssrc = tmp / "ssrc"
        make_photos(ssrc, n_synth, side=512)
        sy = {}
        for backend in ("local", "ray"):
            w = tmp / f"synth_{backend}"
            sy[backend] = one_config(w, ssrc, backend, 2, ["synthesize"], ["ingest", "dedup"],
                                     synthesize={"per_source": 2})
        results["synthesize_local_s"] = sy["local"]["synthesize"]
        results["synthesize_ray_s"] = sy["ray"]["synthesize"]
        results["synthesize_ray_over_local"] = round(
            sy["ray"]["synthesize"] / sy["local"]["synthesize"], 3)
        results["synthesize_workers_started"] = sy["ray"]["synthesize_workers_started"]
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True, check=False)
    print(json.dumps(results, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


def _registry():
    from generators.registry import REGISTRY

    return REGISTRY


if __name__ == "__main__":
    sys.exit(main())
