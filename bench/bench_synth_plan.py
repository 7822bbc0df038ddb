"""Benchmark: what synthesize holds per source while it plans (issue 16).

Writes a manifest of N real sources whose rows look like ingest's (64-hex `source_id`,
`group_id` and `sha256`, a blob path, a local path, `phash_variants` of about 570
characters), then plans the default generator mix on it (`per_source` 2, the split plan of
the groups for donors) in a fresh process per (way, N), and prints the peak RSS above the
process's baseline after imports, per source, and the time:

- `rows`: what the stage does: `synthesize.load_sources` (the `SourceRow` columns only,
  batch by batch, held as Arrow columns: `SourceTable`) and `synthesize.plan` (jobs held as
  indices, made into dicts a window at a time when they are sent to the executor);
- `records`: the same plan over full Records read with `iter_records` (what the stage held
  before: every source as a full Record).

    python bench/bench_synth_plan.py [--sizes 100000 400000] [--out metrics/bench_synth_plan.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = ("rows", "records")


def build(path: Path, n: int) -> None:
    from pipeline.records import ManifestWriter, Record

    def h(i: int, salt: str) -> str:
        return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()

    domains = ("natural", "natural", "natural", "face", "document")
    with ManifestWriter(path) as w:
        for i in range(n):
            sha = h(i, "s")
            w.write(Record(
                key=h(i, "k")[:24], source="photos", source_id=sha, group_id=h(i // 2, "g"),
                label="real", domain=domains[i % len(domains)], width=640, height=480,
                format="jpg", sha256=sha, phash=h(i, "p")[:16], status="ok", license="cc-by",
                uri=f"img/{i:08d}.jpg", kind="image_folder", blob=f"ingest/blobs/{sha}.jpg",
                nbytes=75_000, mode="RGB", jpeg_quality=90, stage="ingest",
                local_path=f"/data/photos/img/{i:08d}.jpg",
                phash_variants=" ".join("k" + h(i, f"v{j}") + h(i, f"w{j}")[:16] for j in range(7))))


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MB."""
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


def child(way: str, path: Path, warm: Path) -> dict:
    from generators import registry
    from pipeline import synthesize
    from pipeline.params import from_dict
    from pipeline.records import iter_records
    from pipeline.split import plan_groups

    params = from_dict({})
    for name in params.synthesize.generators:  # generator modules import torch: baseline
        registry.generator_class(name)

    def run(manifest: Path):
        if way == "rows":
            sources = synthesize.load_sources(manifest)
        else:
            sources = sorted((r for r in iter_records(manifest) if synthesize.is_source(r)),
                             key=lambda r: r.key)
        t = time.perf_counter()
        groups = plan_groups(manifest, params.split, params.seed)
        return sources, synthesize.plan(sources, params.synthesize, params.seed,
                                        groups.of_record), t

    run(warm)  # lazy imports and first-use allocations belong to the baseline
    base, _ = _rss_mb()
    t0 = time.perf_counter()
    sources, jobs, t1 = run(path)
    t2 = time.perf_counter()
    _, peak = _rss_mb()
    return {"sources": len(sources), "jobs": sum(len(v) for v in jobs.values()),
            "load_seconds": round(t1 - t0, 2), "plan_seconds": round(t2 - t1, 2),
            "peak_above_baseline_mb": round(peak - base, 1),
            "bytes_per_source": round((peak - base) * 2**20 / max(1, len(sources)))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_synth_plan.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return 0
    result: dict = {"load_average_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.parquet"
        build(warm, 500)
        for n in a.sizes:
            path = Path(tmp) / f"sources_{n}.parquet"
            build(path, n)
            for way in WAYS:
                out = subprocess.run([sys.executable, __file__, "--child", way, str(path),
                                      str(warm)],
                                     capture_output=True, text=True, cwd=ROOT, check=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                r = json.loads(out.stdout.strip().splitlines()[-1])
                result[f"{way}_{n}"] = r
                print(f"{way:8s} n={n:>9,d}  {r['bytes_per_source']:>6} bytes/source  "
                      f"peak +{r['peak_above_baseline_mb']:.0f} MB  load {r['load_seconds']} s  "
                      f"plan {r['plan_seconds']} s", flush=True)
            ratio = (result[f"records_{n}"]["peak_above_baseline_mb"]
                     / max(1e-9, result[f"rows_{n}"]["peak_above_baseline_mb"]))
            result[f"records_over_rows_{n}"] = round(ratio, 2)
            print(f"n={n:,d}: full Records take {ratio:.2f}x the memory of the stage's rows")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
