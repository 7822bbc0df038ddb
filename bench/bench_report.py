"""Benchmark: the report stage on synthetic manifests of 10^5 and 10^6 rows (issue 13: "on a
corpus of 10^6 samples the page still opens fast").

The manifests are the report test's (`tests/test_report.py: synthetic_manifest`: every
status, five generators, four domains, no images: each sampled panel says its image is
missing). Each size runs `report.run` in a fresh interpreter (the test's child script) and
prints its time, peak memory, the page's size and how many samples it picked; then the
ratios largest / smallest size. Goals: the page and the picks do not grow with the corpus;
peak memory does not grow with it (streamed record batches).

    python bench/bench_report.py [--sizes 100000 1000000] [--workdir /tmp/bench_report]
                                 [--out metrics/bench_report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def one(n: int, root: Path) -> dict:
    from test_report import _CHILD, synthetic_manifest

    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    t0 = time.perf_counter()
    synthetic_manifest(root / "data" / "manifest.parquet", n)
    built = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True,
                         text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows, batches, picks, html_bytes, seconds, rss_kib = out.stdout.split()
    return {"rows": int(rows), "batches": int(batches), "picks": int(picks),
            "html_bytes": int(html_bytes), "seconds": round(float(seconds), 2),
            "peak_rss_mib": round(int(rss_kib) / 1024, 1),
            "manifest_mb": round((root / "data" / "manifest.parquet").stat().st_size / 1e6, 1),
            "manifest_build_seconds": round(built, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_report"))
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_report.json")
    a = ap.parse_args()
    res: dict = {"load_average_1m": round(os.getloadavg()[0], 2), "sizes": {}}
    for n in a.sizes:
        r = res["sizes"][str(n)] = one(n, a.workdir / str(n))
        print(f"{n:>9} rows: {r['seconds']:7.1f} s, peak {r['peak_rss_mib']:6.0f} MiB, page "
              f"{r['html_bytes'] / 1e3:6.0f} kB, {r['picks']} samples picked, "
              f"{r['batches']} record batches", flush=True)
    small, big = (res["sizes"][str(n)] for n in (min(a.sizes), max(a.sizes)))
    res["time_ratio"] = round(big["seconds"] / small["seconds"], 2)
    res["peak_memory_ratio"] = round(big["peak_rss_mib"] / small["peak_rss_mib"], 2)
    res["page_bytes_ratio"] = round(big["html_bytes"] / small["html_bytes"], 2)
    print(f"{max(a.sizes)} / {min(a.sizes)} rows: time {res['time_ratio']}x, peak memory "
          f"{res['peak_memory_ratio']}x, page {res['page_bytes_ratio']}x "
          f"(picks {small['picks']} and {big['picks']})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
