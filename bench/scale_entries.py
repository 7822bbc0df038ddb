"""Planning-only simulations of the split and export stages at 10^6 and 10^7 records.

Entries for `bench/bench_scale.py` (and this file run alone):

- `write_split_input(path, n)` / `write_export_input(path, n)`: a synthetic manifest of `n`
  records (parquet in `pipeline.records.SCHEMA`, no images): real rows in near-duplicate
  groups over three domains (some copies marked `duplicate`), forensic tampered rows, a few
  blocklist items, forgeries of the real rows (a third `aigc`, 8% splices with a donor of
  another group, some rejected); the export input has splits, blobs (paths only) and 10%
  random-weight stand-ins.
- `split_planning(path)`: what the split stage decides, without writing: the group plan
  (`split.plan_groups`), the donor / original lookups, then every row's decision, streamed.
- `export_planning(path)`: the export plan (`export.scan` + `export.plan`) of the default
  balanced export with fractions 10/25/50/100%.

Each returns a small dict of figures. Run alone, this file builds both sizes, runs each
entry in a fresh subprocess (so peak RSS is the entry's own) and prints time and peak RSS
with the ratios 10^7 / 10^6 (goals: time <= 12x, peak memory <= 1.3x; the time ratio is
of CPU seconds, the wall-clock ratio is printed beside it):

    python bench/scale_entries.py [--sizes 1000000 10000000] [--keep DIR]
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_CHUNK = 500_000  # rows built at a time
_ROW_GROUP = 65536  # rows per row group


def _manifest(path: Path, n: int, export_input: bool, seed: int = 0) -> int:
    """Writes n synthetic records; returns n."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.records import SCHEMA

    rng = np.random.default_rng(seed)
    n_real = int(n * 0.30)
    path.parent.mkdir(parents=True, exist_ok=True)

    def strs(prefix: str, ids) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pa.array(ids, pa.int64()).cast(pa.string()), "")

    domains = np.array(["natural", "face", "document"])
    ops = np.array(["copy_move", "removal", "inpaint", "splice", "face_swap", "text_replace",
                    "full_synthesis", "regeneration"])
    with pq.ParquetWriter(path, SCHEMA) as w:
        for start in range(0, n, _CHUNK):
            idx = np.arange(start, min(n, start + _CHUNK))
            m = len(idx)
            real = idx < n_real
            # the real row a forgery is made from; real rows in groups of about 1.2 rows
            src = np.where(real, idx, rng.integers(0, max(n_real, 1), m))
            group = (src / 1.2).astype(np.int64)
            dom = domains[group % 3]
            forensic = ~real & (idx % 50 == 0)
            blocklist = ~real & ~forensic & (idx % 9973 == 0)
            forged = ~real & ~forensic & ~blocklist
            op = ops[idx % len(ops)]
            is_aigc = forged & np.isin(op, ["full_synthesis", "regeneration"])
            splice = forged & (op == "splice")
            donor = (src + 1 + rng.integers(0, 1000, m)) % max(n_real, 1)
            dup = real & (idx % 6 == 5)
            rejected = forged & (idx % 23 == 0)
            status = np.where(blocklist, "blocklist",
                              np.where(dup, "duplicate",
                                       np.where(rejected, "no_visible_change", "ok")))
            kind = np.where(real, "image_folder",
                            np.where(forensic, "forensic",
                                     np.where(blocklist, "blocklist", "synthesized")))
            label = np.where(real, "real", np.where(is_aigc, "synthetic", "tampered"))
            operation = np.where(real, "none", np.where(forensic, "unknown", op))
            domain = np.where(is_aigc, "aigc", dom)
            group_ids = np.where(forensic, idx + 10**12, group)
            def only(mask, values: pa.Array) -> pa.Array:
                return pc.if_else(pa.array(mask), values, pa.scalar(None, values.type))

            cols = {
                "key": strs("k", idx),
                "source": pa.array(np.where(forged, "synthesize", "corpus")),
                "source_id": strs("s", src),
                "group_id": strs("g", group_ids),
                "label": pa.array(label),
                "domain": pa.array(domain),
                "operation": pa.array(operation),
                "generator": only(forged, pa.array(op)),
                "status": pa.array(status),
                "kind": pa.array(kind),
                "parent_key": only(forged, strs("k", src)),
                "donor_key": only(splice, strs("k", donor)),
            }
            if export_input:
                from pipeline.split import RATIO_SPLITS

                cut = np.searchsorted([0.8, 0.9], (group % 1000) / 1000, side="right")
                shipped = (status == "ok") & (kind != "blocklist")
                cols["split"] = only(shipped, pa.array(np.array(RATIO_SPLITS)[cut]))
                cols["blob"] = strs("b/", idx)
                cols["model_id"] = only(forged & (idx % 10 == 3),
                                        pa.array(np.full(m, "tiny-random:abc")))
                cols["format"] = pa.array(np.where(idx % 3 == 0, "png", "jpg"))
            arrays = [cols[f.name] if f.name in cols else pa.nulls(m, f.type) for f in SCHEMA]
            table = pa.Table.from_arrays(arrays, schema=SCHEMA)
            w.write_table(table, row_group_size=_ROW_GROUP)
    return n


def write_split_input(path: str | Path, n: int) -> int:
    return _manifest(Path(path), n, export_input=False)


def write_export_input(path: str | Path, n: int) -> int:
    return _manifest(Path(path), n, export_input=True)


class _Row:
    """The columns `split.Planner.decide` reads, as attributes."""

    __slots__ = (
        "donor_key",
        "generator",
        "group_id",
        "key",
        "kind",
        "operation",
        "parent_key",
        "source_id",
    )

    def __init__(self, values: tuple) -> None:
        for name, v in zip(self.__slots__, values):
            setattr(self, name, v)


def split_planning(path: str | Path, seed: int = 0) -> dict:
    """The split stage's decisions for every row of the manifest, streamed, nothing written."""
    from collections import Counter

    from pipeline.split import Planner, SplitParams, read_batches

    planner = Planner(Path(path), SplitParams(), seed)
    decided: Counter = Counter()
    cols = list(_Row.__slots__) + ["status"]
    for b in read_batches(path, cols):
        data = [b.column(c).to_pylist() for c in cols]
        rows = [_Row(values[:-1]) for values in zip(*data) if values[-1] == "ok"]
        for d in planner.decide_many(rows):
            decided[d.split or d.status] += 1
    return {"decided": dict(sorted(decided.items())), **planner.groups.figures}


def export_planning(path: str | Path, seed: int = 0) -> dict:
    """The default balanced export's plan (fractions 10/25/50/100%), nothing written."""
    from pipeline.export import ExportParams, plan, scan

    p = ExportParams()
    sc = scan(Path(path), p, seed)
    plans = plan(Path(path), p, seed, sc)
    train = plans["balanced"].splits["train"]
    return {
        "rows": sc.rows,
        "stand_ins_left_out": sum(sc.stand_ins.values()),
        "train_cells": len(train.counts),
        "train_taken": sum(train.counts.values()),
        "train_10pct": sum(v[0] for v in train.level_counts.values()),
    }


ENTRIES = {"split": (write_split_input, split_planning),
           "export": (write_export_input, export_planning)}


def _child(entry: str, path: str) -> None:
    import numpy  # noqa: F401  - imports belong to the baseline of both sizes
    import pyarrow.parquet  # noqa: F401

    import pipeline.export
    import pipeline.split  # noqa: F401

    t0, c0 = time.perf_counter(), time.process_time()
    figures = ENTRIES[entry][1](path)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(),
                      "figures": figures}))


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; `ru_maxrss` keeps the parent's peak at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000])
    ap.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    ap.add_argument("--keep", help="folder for the synthetic manifests (kept; reused if there)")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_scale_entries.json"))
    ap.add_argument("--child", nargs=2, metavar=("ENTRY", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=3, metavar=("ENTRY", "PATH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        ENTRIES[args.build[0]][0](args.build[1], int(args.build[2]))
        return
    if args.child:
        _child(*args.child)
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scale_entries_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"load_average_1min": round(os.getloadavg()[0], 2)}
    try:
        for entry in args.entries:
            got = {}
            for n in args.sizes:
                path = work / f"{entry}_{n}.parquet"
                if not path.exists():
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, __file__, "--build", entry, str(path), str(n)],
                                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                    print(f"built {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
                out = subprocess.run([sys.executable, __file__, "--child", entry, str(path)],
                                     capture_output=True, text=True, cwd=ROOT, check=False,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                if out.returncode:
                    raise RuntimeError(f"{entry} at {n}: {out.stderr[-3000:]}")
                got[n] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{entry:7s} n={n:>10,d}  {got[n]['seconds']:8.1f} s  "
                      f"cpu {got[n]['cpu_seconds']:8.1f} s  "
                      f"peak {got[n]['peak_rss_mb']:7.1f} MB  {got[n]['figures']}", flush=True)
            small, large = (got[n] for n in args.sizes)
            result[entry] = {
                **{f"seconds_{n}": round(got[n]["seconds"], 2) for n in args.sizes},
                **{f"cpu_seconds_{n}": round(got[n]["cpu_seconds"], 2) for n in args.sizes},
                **{f"peak_rss_mb_{n}": round(got[n]["peak_rss_mb"], 1) for n in args.sizes},
                # CPU time: on a shared machine wall time also counts the waits for a core
                "time_ratio": round(large["cpu_seconds"] / small["cpu_seconds"], 2),
                "wall_time_ratio": round(large["seconds"] / small["seconds"], 2),
                "memory_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "time_ratio_goal": 12.0,
                "memory_ratio_goal": 1.3,
            }
            print(f"{entry}: time ratio {result[entry]['time_ratio']}x CPU, "
                  f"{result[entry]['wall_time_ratio']}x wall (goal <= 12), peak "
                  f"memory ratio {result[entry]['memory_ratio']}x (goal <= 1.3)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
