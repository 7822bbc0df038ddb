"""Benchmark: shard throughput for real-JPEG pass-through against plain `tar` of the same
files in the same run (target ratio >= 0.5), and peak memory of ingest+shard at 1x and 4x
corpus size (target growth <= 1.2x: the stages stream).

    python bench/bench_shard.py [--n 200] [--out metrics/bench_shard.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: Path, n: int, side: int = 640) -> int:
    """n distinct JPEG files cut from package photos (real camera JPEGs re-cut, then left as is)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    bases = [skdata.rocket(), skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.hubble_deep_field()]
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        b = bases[i % len(bases)]
        h, w = b.shape[:2]
        scale = side / min(h, w) * rng.uniform(1.0, 1.6)
        img = Image.fromarray(b).resize((int(w * scale), int(h * scale)))
        x = int(rng.integers(0, img.width - side + 1))
        y = int(rng.integers(0, img.height - side + 1))
        p = folder / f"img_{i:05d}.jpg"
        img.crop((x, y, x + side, y + side)).save(p, "JPEG", quality=int(rng.integers(80, 96)))
        total += p.stat().st_size
    return total


def params_for(work: Path, corpus_dir: Path):
    import yaml

    from pipeline import params as params_mod

    work.mkdir(parents=True, exist_ok=True)
    man = work / "corpus.yaml"
    man.write_text(yaml.safe_dump({"sources": [{
        "name": "bench", "kind": "image_folder", "domain": "natural", "label": "real",
        "license": "bench", "path": str(corpus_dir)}]}))
    return params_mod.from_dict({
        "data_dir": str(work / "data"), "metrics_dir": str(work / "metrics"), "corpus": [str(man)],
        "executor": {"backend": "local", "progress": False},
        "shard": {"max_count": 100},
    })


def split_all_train(params) -> None:
    from pipeline.records import iter_records, write_manifest

    recs = (r.replace(split="train") for r in iter_records(params.data / "ingest" / "manifest.parquet"))
    write_manifest(params.data / "split" / "manifest.parquet", recs)


def child(work: Path, corpus_dir: Path) -> None:
    """ingest + shard in this process; prints peak RSS (KiB) as JSON."""
    import pipeline.ingest  # noqa: F401  - imports counted in the baseline, not in the work
    import pipeline.shard  # noqa: F401
    from pipeline.cli import run_stage
    from pipeline.executor import Executor

    params = params_for(work, corpus_dir)
    ex = Executor(params.executor)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_stage("ingest", params, ex)
    split_all_train(params)
    run_stage("shard", params, ex)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_kib": peak, "base_rss_kib": base}))


def throughput(tmp: Path, n: int, side: int, repeats: int) -> dict:
    """Shard stage vs plain `tar` over the same ingested JPEG blobs, best of `repeats`."""
    from pipeline.cli import run_stage
    from pipeline.executor import Executor
    from pipeline.records import read_records

    corpus = tmp / "jpegs"
    nbytes = make_jpegs(corpus, n, side)
    params = params_for(tmp / "run", corpus)
    ex = Executor(params.executor)
    run_stage("ingest", params, ex)
    split_all_train(params)
    blobs = [params.data / r.blob for r in read_records(params.data / "split" / "manifest.parquet")]
    list_file = tmp / "files.txt"
    list_file.write_text("\n".join(str(b) for b in blobs))
    shard_times, tar_times = [], []
    for _ in range(repeats):
        shutil.rmtree(params.data / "shards", ignore_errors=True)
        t0 = time.perf_counter()
        run_stage("shard", params, ex)
        shard_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["tar", "cf", str(tmp / "plain.tar"), "-T", str(list_file)], check=True,
                       stderr=subprocess.DEVNULL)
        tar_times.append(time.perf_counter() - t0)
    shard_s, tar_s = min(shard_times), min(tar_times)
    mb = nbytes / 1e6
    return {
        "files": n,
        "side_px": side,
        "corpus_mb": round(mb, 1),
        "shard_seconds": round(shard_s, 3),
        "tar_seconds": round(tar_s, 3),
        "shard_mb_per_s": round(mb / shard_s, 1),
        "tar_mb_per_s": round(mb / tar_s, 1),
        "ratio_vs_tar": round(tar_s / shard_s, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="JPEG files in the 1x corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-side", type=int, default=3000, help="side of the camera-size JPEGs")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_shard.json"))
    ap.add_argument("--child", nargs=2, metavar=("WORK", "CORPUS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return


    tmp = Path(tempfile.mkdtemp(prefix="bench_shard_"))
    try:
        # two corpora: small web-size JPEGs (per-file overhead dominates) and camera-size ones
        small = throughput(tmp / "small", args.n, 640, args.repeats)
        large = throughput(tmp / "large", max(args.n // 2, 10), args.large_side, args.repeats)
        corpus = tmp / "small" / "jpegs"
        # memory: 1x and 4x corpus, each in a fresh process
        corpus4 = tmp / "jpegs4"
        corpus4.mkdir()
        for k in range(4):
            for p in corpus.iterdir():
                # distinct bytes per copy (a comment segment), so dedup-free and no shared blobs
                data = p.read_bytes()
                (corpus4 / f"c{k}_{p.name}").write_bytes(data[:2] + b"\xff\xfe\x00\x06c" + bytes([k]) + b"\x00\x00" + data[2:])
        peaks = {}
        for label, cdir in (("1x", corpus), ("4x", corpus4)):
            out = subprocess.run([sys.executable, __file__, "--child", str(tmp / f"mem_{label}"), str(cdir)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[label] = got["peak_rss_kib"] / 1024
            peaks[f"work_{label}"] = (got["peak_rss_kib"] - got["base_rss_kib"]) / 1024
        result = {
            **{f"small_{k}": v for k, v in small.items()},
            **{f"large_{k}": v for k, v in large.items()},
            "throughput_ratio_vs_tar": large["ratio_vs_tar"],
            "throughput_target": 0.5,
            "peak_rss_mb_1x": round(peaks["1x"], 1),
            "peak_rss_mb_4x": round(peaks["4x"], 1),
            "memory_growth_4x": round(peaks["4x"] / peaks["1x"], 3),
            # the same without the interpreter and imports: what the stages themselves hold
            "work_rss_mb_1x": round(peaks["work_1x"], 1),
            "work_rss_mb_4x": round(peaks["work_4x"], 1),
            "memory_growth_target": 1.2,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:28s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
