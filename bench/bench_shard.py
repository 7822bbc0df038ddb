"""Benchmark: the shard stage against two baselines measured in the same run.

1. In process: the shard stage (`run_stage("shard")`, local executor) against GNU `tar cf`
   of the same image files, on 200 web-size JPEGs (640 px, about 75 kB). Target >= 0.8x
   (the stage writes three members per sample, a parquet index per tar and the final
   manifest; tar writes one member per file).
2. As processes: `python -m pipeline shard --params ...` against a 20-line script that
   writes the same samples (image, all-0 mask, record JSON) with `webdataset.ShardWriter`.
   Target: at most 1.5x the script's wall time.
3. Disk: the default export (balanced, nested fractions 10/25/50/100%, IMDL tree) of those
   shards, in bytes on disk (each file once) against the 100% export alone. Target <= 1.2x.

Timings interleave the contenders and take the best of `--repeats` (this machine is shared
and noisy); the in-process timing runs in a fresh interpreter. `--large` adds the same comparison on camera-size JPEGs (3000 px) and
`--memory` the peak memory of ingest + shard at 1x and 4x the corpus (target <= 1.2x).

    python bench/bench_shard.py [--n 200] [--repeats 15] [--large] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WDS_SCRIPT = '''\
import io, json, sys
import numpy as np, pyarrow.parquet as pq, webdataset as wds
from PIL import Image

data_dir, out = sys.argv[1], sys.argv[2]
masks = {}
def zero_mask(h, w):
    if (h, w) not in masks:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, "PNG")
        masks[h, w] = buf.getvalue()
    return masks[h, w]
rows = pq.read_table(f"{data_dir}/split/manifest.parquet").to_pylist()
with wds.ShardWriter(f"{out}/train-%06d.tar", maxcount=100, verbose=0) as sink:
    for r in rows:
        with open(f"{data_dir}/{r['blob']}", "rb") as f:
            image = f.read()
        sink.write({"__key__": r["key"], r["format"]: image,
                    "mask.png": zero_mask(r["height"], r["width"]),
                    "json": json.dumps(r, default=str).encode()})
'''


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


def params_dict(work: Path, corpus_dir: Path) -> dict:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    man = work / "corpus.yaml"
    man.write_text(yaml.safe_dump({"sources": [{
        "name": "bench", "kind": "image_folder", "domain": "natural", "label": "real",
        "license": "bench", "path": str(corpus_dir)}]}))
    return {
        "data_dir": str(work / "data"), "metrics_dir": str(work / "metrics"), "corpus": [str(man)],
        "executor": {"backend": "local", "progress": False},
        "shard": {"max_count": 100},
    }


def params_for(work: Path, corpus_dir: Path):
    from pipeline import params as params_mod

    return params_mod.from_dict(params_dict(work, corpus_dir))


def split_all_train(params) -> None:
    from pipeline.records import iter_records, write_manifest

    recs = (r.replace(split="train") for r in iter_records(params.data / "ingest" / "manifest.parquet"))
    write_manifest(params.data / "split" / "manifest.parquet", recs)


def prepare(tmp: Path, n: int, side: int):
    """Ingests n JPEGs and writes a split manifest with all of them in train."""
    from pipeline.cli import run_stage
    from pipeline.executor import Executor

    corpus = tmp / "jpegs"
    nbytes = make_jpegs(corpus, n, side)
    params = params_for(tmp / "run", corpus)
    run_stage("ingest", params, Executor(params.executor))
    split_all_train(params)
    return params, nbytes


def _best(times: list[float]) -> float:
    return min(times)


def in_process(params, nbytes: int, repeats: int) -> dict:
    """Shard stage vs plain `tar` over the same ingested blobs, interleaved, best of repeats."""
    import contextlib
    import io

    from pipeline.cli import run_stage
    from pipeline.executor import Executor
    from pipeline.records import read_records

    ex = Executor(params.executor)
    blobs = [params.data / r.blob for r in read_records(params.data / "split" / "manifest.parquet")]
    tmp = params.data.parent
    list_file = tmp / "files.txt"
    list_file.write_text("\n".join(str(b) for b in blobs))
    shard_times, tar_times = [], []
    for _ in range(repeats):
        shutil.rmtree(params.data / "shards", ignore_errors=True)
        (tmp / "plain.tar").unlink(missing_ok=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            run_stage("shard", params, ex)
        shard_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["tar", "cf", str(tmp / "plain.tar"), "-T", str(list_file)], check=True,
                       stderr=subprocess.DEVNULL)
        tar_times.append(time.perf_counter() - t0)
    shard_s, tar_s = _best(shard_times), _best(tar_times)
    mb = nbytes / 1e6
    return {
        "files": len(blobs),
        "corpus_mb": round(mb, 1),
        "shard_seconds": round(shard_s, 4),
        "tar_seconds": round(tar_s, 4),
        "shard_mb_per_s": round(mb / shard_s, 1),
        "tar_mb_per_s": round(mb / tar_s, 1),
        "ratio_vs_tar": round(tar_s / shard_s, 3),
    }


def in_process_fresh(work: Path, nbytes: int, repeats: int) -> dict:
    """`in_process` in a fresh interpreter: the stage's own work, not the state this process
    was left in by ingest (its objects make every garbage collection longer)."""
    out = subprocess.run([sys.executable, __file__, "--time-shard", str(work), str(nbytes),
                          str(repeats)], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def as_processes(params, repeats: int) -> dict:
    """`python -m pipeline shard` vs a webdataset.ShardWriter script, wall time and peak RSS."""
    import yaml

    tmp = params.data.parent
    pfile = tmp / "params.yaml"
    pfile.write_text(yaml.safe_dump(params_dict(tmp, tmp / "jpegs"), sort_keys=False))
    script = tmp / "wds_script.py"
    script.write_text(WDS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wds_out = tmp / "wds_out"

    def timed(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{cmd} failed: {proc.stderr.decode()[-2000:]}")
        return wall

    ours, theirs = [], []
    for _ in range(repeats):
        shutil.rmtree(params.data / "shards", ignore_errors=True)
        ours.append(timed([sys.executable, "-m", "pipeline", "shard", "--params", str(pfile)]))
        shutil.rmtree(wds_out, ignore_errors=True)
        wds_out.mkdir()
        theirs.append(timed([sys.executable, str(script), str(params.data), str(wds_out)]))

    # peak RSS of each kind of process, each measured in a fresh parent
    def peak(cmd: list[str]) -> float:
        out = subprocess.run([sys.executable, "-c", (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"), *cmd],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1]) / 1024

    shutil.rmtree(params.data / "shards", ignore_errors=True)
    rss_ours = peak([sys.executable, "-m", "pipeline", "shard", "--params", str(pfile)])
    shutil.rmtree(wds_out, ignore_errors=True)
    wds_out.mkdir()
    rss_theirs = peak([sys.executable, str(script), str(params.data), str(wds_out)])
    ours_s, theirs_s = _best(ours), _best(theirs)
    return {
        "process_shard_seconds": round(ours_s, 3),
        "process_wds_script_seconds": round(theirs_s, 3),
        "process_ratio_vs_wds_script": round(ours_s / theirs_s, 3),
        "process_shard_peak_rss_mb": round(rss_ours, 1),
        "process_wds_script_peak_rss_mb": round(rss_theirs, 1),
    }


def export_disk(params) -> dict:
    """The default export (balanced, fractions 10/25/50/100%, IMDL tree) of the same shards:
    bytes on disk against the 100% export alone and against the shards it draws from."""
    import contextlib
    import io

    from pipeline.cli import run_stage
    from pipeline.executor import Executor
    from pipeline.export import disk_usage

    ex = Executor(params.executor)
    with contextlib.redirect_stdout(io.StringIO()):
        if not (params.data / "manifest.parquet").exists():
            run_stage("shard", params, ex)
        run_stage("export", params, ex)
    exports = params.data / "exports"
    full = exports / "balanced-100pct"
    alone = sum(p.stat().st_size for p in full.rglob("*")
                if p.is_file() and "imdl" not in p.relative_to(full).parts)
    shards = sum(p.stat().st_size for p in (params.data / "shards").rglob("*") if p.is_file())
    usage = disk_usage(exports)
    return {
        "export_folders": sorted(p.name for p in exports.iterdir()),
        "export_bytes_on_disk": usage["new"],
        "export_bytes_listed": usage["listed"],  # what copies would take
        "export_100pct_alone_bytes": alone,
        "shards_bytes": shards,
        "export_disk_ratio_vs_100pct": round(usage["new"] / alone, 3),
        "export_disk_ratio_vs_shards": round(usage["new"] / shards, 3),
        "export_disk_target": 1.2,
    }


def child(work: Path, corpus_dir: Path) -> None:
    """ingest + shard in this process; prints peak RSS (KiB) as JSON."""
    import pipeline.ingest
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


def memory(tmp: Path, corpus: Path) -> dict:
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
    return {
        "peak_rss_mb_1x": round(peaks["1x"], 1),
        "peak_rss_mb_4x": round(peaks["4x"], 1),
        "memory_growth_4x": round(peaks["4x"] / peaks["1x"], 3),
        "memory_growth_target": 1.2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="web-size JPEG files")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--large", action="store_true", help="also camera-size JPEGs (3000 px)")
    ap.add_argument("--memory", action="store_true", help="also peak memory at 1x and 4x")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_shard.json"))
    ap.add_argument("--child", nargs=2, metavar=("WORK", "CORPUS"), help=argparse.SUPPRESS)
    ap.add_argument("--time-shard", nargs=3, metavar=("WORK", "BYTES", "REPEATS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_shard:
        work = Path(args.time_shard[0])
        params = params_for(work / "run", work / "jpegs")
        print(json.dumps(in_process(params, int(args.time_shard[1]), int(args.time_shard[2]))))
        return
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_shard_"))
    try:
        params, nbytes = prepare(tmp / "small", args.n, 640)
        small = in_process_fresh(tmp / "small", nbytes, args.repeats)
        procs = as_processes(params, max(3, args.repeats // 3))
        result = {
            **{f"small_{k}": v for k, v in small.items()},
            "ratio_vs_tar": small["ratio_vs_tar"],
            "ratio_vs_tar_target": 0.8,
            **procs,
            "process_ratio_target": 1.5,
            **export_disk(params),
            "load_average_1min": round(load, 2),
        }
        if args.large:
            _, lb = prepare(tmp / "large", max(args.n // 2, 10), 3000)
            result.update({f"large_{k}": v for k, v in
                           in_process_fresh(tmp / "large", lb, args.repeats).items()})
        if args.memory:
            result.update(memory(tmp, tmp / "small" / "jpegs"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:34s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
