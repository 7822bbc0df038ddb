"""Ingest throughput at 1 MP, in images per second per core: `domain: auto` against a fixed
domain, measured in the same run.

Builds a folder of the embedded corpus's photos and pages (faces, documents, natural photos,
the mix of `manifests/default.yaml`) scaled to about 1 MP and saved in their own formats
(JPEG or PNG), then runs the ingest stage on it (local executor, OpenCV held to one thread,
so the stage uses one core) with the source's domain fixed (`natural`) and with
`domain: auto`; the modes alternate, each `--repeat` times into a fresh data folder.

Per core: images divided by the process's CPU seconds (one thread, so CPU seconds are core
seconds), from the best run of each mode. Wall-clock images/s are printed too; on a shared
machine they mostly measure the other processes (the 1-minute load average is recorded).
`--old-detector` adds the domain guess as it was before (the face generators' detector at
640 px, two Haar cascades) as a third mode. Prints a table and writes
`metrics/bench_ingest.json`.

    python bench/bench_ingest.py [--repeat N] [--copies K] [--old-detector]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import domains, imageio, ingest
from pipeline.corpus import load_manifest
from pipeline.executor import Executor
from pipeline.params import ExecutorParams, from_dict
from pipeline.sources.package_samples import package_sample_path

ROOT = Path(__file__).resolve().parents[1]


def build_folder(folder: Path, copies: int) -> tuple[int, dict[str, str]]:
    """The default corpus's images at about 1 MP; returns (count, {file: declared domain})."""
    rng = np.random.default_rng(0)
    declared = {}
    n = 0
    for s in load_manifest(ROOT / "manifests" / "default.yaml"):
        for item in s.options.items:
            path = package_sample_path(item)
            rgb = imageio.read_rgb(path)
            h, w = rgb.shape[:2]
            f = (1e6 / (h * w)) ** 0.5
            big = cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
            fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
            for c in range(copies):
                # a little noise per copy: distinct files, no cache effects
                img = np.clip(big.astype(np.int16) + rng.integers(-2, 3, big.shape), 0, 255).astype(np.uint8)
                name = f"{path.stem}_{c}.{'jpg' if fmt == 'JPEG' else 'png'}"
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                (folder / name).write_bytes(buf.getvalue())
                declared[name] = s.domain
                n += 1
    return n, declared


def _old_guess(rgb: np.ndarray, face_min_frac: float = 0.01) -> str:
    """The domain guess before this bench's change: document heuristic, then the face
    generators' detector at 640 px with 1.1 window steps."""
    from generators.face.detect import detect_faces

    if domains.looks_like_document(rgb):
        return "document"
    h, w = rgb.shape[:2]
    faces = detect_faces(rgb)
    if faces and max(fw * fh for _, _, fw, fh in faces) >= face_min_frac * h * w:
        return "face"
    return "natural"


def run_once(tmp: Path, folder: Path, domain: str) -> tuple[float, float, list]:
    manifest = tmp / f"corpus-{domain}.yaml"
    manifest.write_text(yaml.safe_dump({"sources": [
        {"name": "bench", "kind": "image_folder", "domain": domain, "label": "real",
         "license": "bench", "path": str(folder)}]}))
    data = tmp / f"data-{domain}"
    shutil.rmtree(data, ignore_errors=True)
    params = from_dict({"data_dir": str(data), "corpus": [str(manifest)],
                        "executor": {"backend": "local", "progress": False}})
    out = data / "ingest"
    out.mkdir(parents=True)
    ex = Executor(ExecutorParams(backend="local", progress=False))
    t0, c0 = time.perf_counter(), time.process_time()
    ingest.run(params, {"corpus": [manifest]}, out, ex)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    from pipeline.records import read_records

    recs = read_records(out / "manifest.parquet")
    return wall, cpu, recs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--copies", type=int, default=2, help="noisy copies of each corpus image")
    ap.add_argument("--old-detector", action="store_true", help="also time the previous domain guess")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_ingest.json"))
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        folder = tmp / "images"
        folder.mkdir()
        n, declared = build_folder(folder, args.copies)
        modes = ["natural", "auto"] + (["auto_old"] if args.old_detector else [])
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        wrong: dict[str, list[str]] = {}
        run_once(tmp, folder, "natural")  # warm up: imports, cascades
        new_guess = ingest.guess_domain
        for _ in range(args.repeat):
            for m in modes:
                ingest.guess_domain = _old_guess if m == "auto_old" else new_guess
                wall, cpu, recs = run_once(tmp, folder, "auto" if m.startswith("auto") else m)
                runs[m].append((wall, cpu))
                if m.startswith("auto"):
                    wrong[m] = sorted(Path(r.uri).name for r in recs
                                      if r.domain != declared[Path(r.uri).name] and declared[Path(r.uri).name] != "auto")
        ingest.guess_domain = new_guess
    res: dict = {"images": n, "megapixels_each": 1.0, "load_1min": round(os.getloadavg()[0], 2),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores", "modes": {}}
    for m, rs in runs.items():
        res["modes"][m] = {
            "images_per_s_per_core": round(n / min(c for _, c in rs), 1),  # CPU time, one thread
            "images_per_s_wall": round(n / min(w for w, _ in rs), 1),
            "seconds_median": round(float(np.median([w for w, _ in rs])), 3),
        }
        if m in wrong:
            res["modes"][m]["wrong_domain"] = wrong[m]
    core = {m: r["images_per_s_per_core"] for m, r in res["modes"].items()}
    res["auto_vs_fixed"] = round(core["auto"] / core["natural"], 2)
    print(f"ingest of {n} images at 1 MP, one thread (load {res['load_1min']} on {os.cpu_count()} cores):")
    print(f"{'mode':10s} {'img/s/core':>11s} {'img/s wall':>11s} {'median s':>9s}  wrong domain")
    for m, r in res["modes"].items():
        print(f"{m:10s} {r['images_per_s_per_core']:11.1f} {r['images_per_s_wall']:11.1f} "
              f"{r['seconds_median']:9.2f}  {', '.join(r.get('wrong_domain', [])) or '-'}")
    print(f"auto / fixed: {res['auto_vs_fixed']:.2f}x; auto: {core['auto']:.1f} images/s/core "
          "(target: >= 20)")
    if "auto_old" in core:
        res["auto_vs_old"] = round(core["auto"] / core["auto_old"], 2)
        print(f"auto / previous auto: {res['auto_vs_old']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
