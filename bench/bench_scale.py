"""Benchmark: stage planning on synthetic manifests of 10^6 and 10^7 records (no images).

Builds manifests with the record schema (`pipeline.records.SCHEMA`), written to parquet in
chunks, with a realistic group structure: most real images alone, a quarter of them with 1
to 4 copies (byte-identical, near, flipped/rotated, cropped: hashes as `image_hashes` would
give them), tampered and synthetic rows near their source, blocklist rows, broken rows
without hashes. Then runs each stage's planning on it in a fresh subprocess per (stage,
size) and prints time and peak memory, and the ratios largest / smallest size.

Goals (issue 16): time ratio 10^7 / 10^6 <= 12x, peak memory ratio <= 1.3x.

A stage is one entry of `STAGES`: a name and a function (manifest path, scratch folder) ->
figures dict, run inside the child process; add split and export planning the same way.

    python bench/bench_scale.py [--sizes 1000000 10000000] [--stages dedup]
                                [--workdir /tmp/bench_scale] [--out metrics/bench_scale.json]

`BENCH_DEDUP_CAPACITY=10000000` plans dedup's index for 10^7 hashes at every size (the
fixed plan whose cost per hash does not depend on the size) instead of the real size.

Uniform random 64-bit hashes are the easy case for the index (real pHashes are biased and
correlated, so their buckets are fuller); the figures are for this synthetic model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_RATIO_GOAL = 12.0
MEMORY_RATIO_GOAL = 1.3
CHUNK = 500_000  # rows generated at a time
ROW_GROUP = 1 << 16  # rows per parquet row group (the stages write 2048 to 65536)

# --------------------------------------------------------------------------- the manifests

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
# the 256-bit hash of window j of an image: its whole image's, xor a constant (synthetic)
_WINDOW_FINE = np.array([0x5555555555555555 * (j + 1) % 2**64 for j in range(4)], np.uint64)


def _hex(words: np.ndarray) -> np.ndarray:
    """uint64 [n, k] -> ASCII hex [n, 16 k] (big-endian, as the stages write hashes)."""
    w = np.ascontiguousarray(np.atleast_2d(words.T).T, dtype=">u8")
    b = w.view(np.uint8).reshape(len(w), -1)
    out = np.empty((len(w), 2 * b.shape[1]), np.uint8)
    out[:, 0::2] = _HEX[b >> 4]
    out[:, 1::2] = _HEX[b & 15]
    return out


def _strings(chars: np.ndarray):
    """ASCII [n, w] -> a pyarrow string array of n strings of width w."""
    import pyarrow as pa

    n, w = chars.shape
    offsets = (np.arange(n + 1, dtype=np.int64) * w)
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets),
                                           pa.py_buffer(np.ascontiguousarray(chars).tobytes()))
    return arr.cast(pa.string())


def _flip(x: np.ndarray, dist: np.ndarray, rng: np.random.Generator, bits: int = 64) -> np.ndarray:
    """Each uint64 (or [n, bits/64] words) with dist[i] random bits flipped (with repeats:
    at most dist[i])."""
    x = x.copy()
    words = bits // 64
    flat = x.reshape(len(x), words)
    for k in range(int(dist.max()) if len(dist) else 0):
        live = np.flatnonzero(dist > k)
        pos = rng.integers(0, bits, len(live))
        flat[live, pos // 64] ^= np.uint64(1) << (pos % 64).astype(np.uint64)
    return x


def _chunk(n: int, rng: np.random.Generator, start: int) -> Any:
    """One chunk of `n` rows as a pyarrow table with the record schema."""
    import pyarrow as pa

    from pipeline.records import SCHEMA

    t = 8  # DedupParams().threshold
    # row roles: 2% broken, 1% blocklist, 12% tampered/synthetic, 85% real images of which
    # a quarter have 1 to 4 copies
    n_broken, n_block, n_fake = int(n * 0.02), int(n * 0.01), int(n * 0.12)
    n_real = n - n_broken - n_block - n_fake
    n_orig = max(1, round(n_real / 1.625))
    sizes = np.where(rng.random(n_orig) < 0.25, rng.integers(1, 5, n_orig), 0)
    n_copy = n_real - n_orig
    key = rng.integers(0, 2**64, n_orig, dtype=np.uint64)
    fine = rng.integers(0, 2**64, (n_orig, 4), dtype=np.uint64)
    win = rng.integers(0, 2**64, (n_orig, 4), dtype=np.uint64)
    sha = rng.integers(0, 2**64, (n_orig, 4), dtype=np.uint64)
    src = np.resize(np.repeat(np.arange(n_orig), sizes), n_copy) if sizes.sum() else \
        rng.integers(0, n_orig, n_copy)
    how = rng.choice(4, len(src), p=[0.15, 0.45, 0.2, 0.2])  # exact, near, turned, cropped
    c_key, c_fine, c_win, c_sha = key[src].copy(), fine[src].copy(), win[src].copy(), sha[src].copy()
    near = how >= 1
    c_sha[near] = rng.integers(0, 2**64, (int(near.sum()), 4), dtype=np.uint64)
    nd = np.flatnonzero(near & (how <= 2))
    c_key[nd] = _flip(c_key[nd], rng.integers(0, t + 1, len(nd)), rng)
    c_fine[nd] = _flip(c_fine[nd], rng.integers(0, 40, len(nd)), rng, 256)
    c_win[nd] = _flip(c_win[nd], rng.integers(0, 4, len(nd)), rng, 256)
    cr = np.flatnonzero(how == 3)  # the copy is one window of its source
    j = rng.integers(0, 4, len(cr))
    c_key[cr] = _flip(win[src[cr], j], rng.integers(0, 4, len(cr)), rng)
    c_fine[cr] = _flip(fine[src[cr]] ^ _WINDOW_FINE[j][:, None], rng.integers(0, 30, len(cr)),
                       rng, 256)
    c_win[cr] = rng.integers(0, 2**64, (len(cr), 4), dtype=np.uint64)
    # forgeries and blocklist items near a real image; broken rows have no hashes
    f_src = rng.integers(0, n_orig, n_fake + n_block)
    f_key = _flip(key[f_src], rng.integers(2, 13, len(f_src)), rng)
    f_fine = _flip(fine[f_src], rng.integers(20, 90, len(f_src)), rng, 256)
    f_win = _flip(win[f_src], rng.integers(0, 8, len(f_src)), rng, 256)
    f_sha = rng.integers(0, 2**64, (len(f_src), 4), dtype=np.uint64)
    keys = np.concatenate([key, c_key, f_key, np.zeros(n_broken, np.uint64)])
    fines = np.concatenate([fine, c_fine, f_fine, np.zeros((n_broken, 4), np.uint64)])
    wins = np.concatenate([win, c_win, f_win, np.zeros((n_broken, 4), np.uint64)])
    shas = np.concatenate([sha, c_sha, f_sha, np.zeros((n_broken, 4), np.uint64)])
    role = np.concatenate([np.zeros(n_orig + n_copy, np.int8), np.full(n_fake, 1, np.int8),
                           np.full(n_block, 2, np.int8), np.full(n_broken, 3, np.int8)])
    # 40% of the images have one alternative turn (an ambiguous orientation)
    alt = rng.random(n) < 0.4
    alt_key = rng.integers(0, 2**64, n, dtype=np.uint64)
    alt_fine = rng.integers(0, 2**64, (n, 4), dtype=np.uint64)

    order = rng.permutation(n)  # families are not adjacent in a manifest
    keys, fines, wins, shas, role = keys[order], fines[order], wins[order], shas[order], role[order]
    space = np.full((n, 1), ord(" "), np.uint8)

    def letter(c: str) -> np.ndarray:
        return np.full((n, 1), ord(c), np.uint8)

    base = [letter("k"), _hex(keys), _hex(fines)]
    for j in range(4):  # window hashes, each with a 256-bit hash (of their own)
        base += [space, letter("w"), _hex(wins[:, j]), _hex(fines ^ _WINDOW_FINE[j])]
    with_alt = base[:3] + [space, letter("a"), _hex(alt_key), _hex(alt_fine)] + base[3:]
    import pyarrow.compute as pc

    variants = pc.if_else(pa.array(alt), _strings(np.concatenate(with_alt, axis=1)),
                          _strings(np.concatenate(base, axis=1)))
    broken = role == 3
    has = ~broken
    ids = np.arange(start, start + n, dtype=np.uint64)
    rowkey = _strings(_hex(ids * np.uint64(0x9E3779B97F4A7C15))[:, 4:])  # 12 bytes, like keys
    label = np.where(role == 1, np.where(rng.random(n) < 0.5, "tampered", "synthetic"), "real")
    kind = np.where(role == 2, "blocklist", "image_folder")
    status = np.where(broken, "truncated", np.where(role == 2, "blocklist", "ok"))
    w = rng.integers(200, 4000, n)
    h = rng.integers(200, 4000, n)
    cols = {
        "key": rowkey,
        "source": pa.array(np.where(role == 2, "benchmark", "photos").astype(object), pa.string()),
        "label": pa.array(label.astype(object), pa.string()),
        "kind": pa.array(kind.astype(object), pa.string()),
        "status": pa.array(status.astype(object), pa.string()),
        "sha256": pc.if_else(pa.array(has), _strings(_hex(shas)), pa.nulls(n, pa.string())),
        "phash": pc.if_else(pa.array(has), _strings(_hex(keys)), pa.nulls(n, pa.string())),
        "phash_variants": pc.if_else(pa.array(has), variants, pa.nulls(n, pa.string())),
        "width": pa.array(np.where(has, w, 0)),
        "height": pa.array(np.where(has, h, 0)),
        "nbytes": pa.array(np.where(has, w * h // 4, 0)),
        "domain": pa.array(["natural"] * n, pa.string()),
    }
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA},
                    schema=SCHEMA)


def build_manifest(n: int, path: Path, seed: int = 0) -> Path:
    """Writes an n-row synthetic manifest (once; reused when present with the same size)."""
    import pyarrow.parquet as pq

    from pipeline.records import SCHEMA

    if path.exists() and pq.ParquetFile(path).metadata.num_rows == n:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(tmp, SCHEMA) as w:
        for start in range(0, n, CHUNK):
            w.write_table(_chunk(min(CHUNK, n - start), rng, start), row_group_size=ROW_GROUP)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the stages


def plan_dedup(manifest: Path, scratch: Path) -> dict[str, Any]:
    import os

    from pipeline.dedup import DedupParams, plan

    # BENCH_DEDUP_CAPACITY: plan the index for a fixed size instead of the real one
    pl = plan(manifest, DedupParams(capacity=int(os.environ.get("BENCH_DEDUP_CAPACITY", "0"))))
    f = pl.figures
    return {k: f[k] for k in ("groups", "exact_duplicates", "near_duplicates", "index_tables",
                              "probe_tables", "planned_for", "pairs", "probe_matches",
                              "hash_seconds", "index_seconds", "plan_seconds") if k in f}


# (name, planning function run in the child): one entry per stage
STAGES: list[tuple[str, Callable[[Path, Path], dict[str, Any]]]] = [
    ("dedup", plan_dedup),
]


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM: ru_maxrss would carry the parent's peak
    over fork + exec on Linux (the parent built the manifest)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(stage: str, manifest: Path, scratch: Path) -> dict[str, Any]:
    fn = dict(STAGES)[stage]
    # imports (pyarrow through the pipeline, as `python -m pipeline` loads it: the pipeline
    # picks Arrow's allocator first) are the baseline, not the stage
    import pipeline.dedup  # noqa: F401

    base = _peak_rss_mib()
    t0 = time.perf_counter()
    figures = fn(manifest, scratch)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    return {"seconds": seconds, "peak_rss_mib": peak, "baseline_rss_mib": base,
            "figures": figures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--stages", nargs="+", default=[s for s, _ in STAGES])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_scale.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.manifest, a.workdir)))
        return 0

    rows = []
    for n in a.sizes:
        t0 = time.perf_counter()
        manifest = build_manifest(n, a.workdir / f"manifest_{n}.parquet")
        print(f"  manifest n={n}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for stage in a.stages:
            out = subprocess.run([sys.executable, __file__, "--child", stage, "--manifest",
                                  str(manifest), "--workdir", str(a.workdir)],
                                 check=True, capture_output=True, text=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"stage": stage, "n": n, **r})
            print(f"  {stage} n={n}: {r['seconds']:.1f} s, peak {r['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)

    small, big = min(a.sizes), max(a.sizes)
    summary: dict[str, Any] = {}
    print(f"{'stage':<10}{'n':>12}{'seconds':>10}{'peak MiB':>10}{'base MiB':>10}")
    for r in rows:
        print(f"{r['stage']:<10}{r['n']:>12}{r['seconds']:>10.1f}{r['peak_rss_mib']:>10.0f}"
              f"{r['baseline_rss_mib']:>10.0f}   {json.dumps(r['figures'])}")
    ok = True
    for stage in a.stages:
        by = {r["n"]: r for r in rows if r["stage"] == stage}
        if small == big:
            continue
        tr = by[big]["seconds"] / by[small]["seconds"]
        mr = by[big]["peak_rss_mib"] / by[small]["peak_rss_mib"]
        above = ((by[big]["peak_rss_mib"] - by[big]["baseline_rss_mib"])
                 / max(1e-9, by[small]["peak_rss_mib"] - by[small]["baseline_rss_mib"]))
        summary[stage] = {"time_ratio": round(tr, 2), "peak_memory_ratio": round(mr, 2),
                          "memory_above_baseline_ratio": round(above, 2),
                          "bytes_per_row_at_largest": round(
                              (by[big]["peak_rss_mib"] - by[big]["baseline_rss_mib"]) * 2**20 / big)}
        stage_ok = tr <= TIME_RATIO_GOAL * big / small / 10 and mr <= MEMORY_RATIO_GOAL
        ok = ok and stage_ok
        print(f"{stage}: time {big}/{small} = {tr:.2f}x (goal <= {TIME_RATIO_GOAL:g}x per 10x), "
              f"peak memory {mr:.2f}x (goal <= {MEMORY_RATIO_GOAL:g}x; above the "
              f"{by[big]['baseline_rss_mib']:.0f} MiB baseline: {above:.2f}x, "
              f"{summary[stage]['bytes_per_row_at_largest']} bytes/row); "
              f"{'PASS' if stage_ok else 'FAIL'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
