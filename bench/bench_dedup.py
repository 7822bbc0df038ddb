"""Benchmark: the near-duplicate index (`pipeline.hamming.HammingIndex`) and what dedup groups.

1. Random 64-bit hashes with planted near-duplicates (a fraction of rows are copies of other
   rows with 0..threshold bits flipped). For each size, in its own subprocess so that memory
   peaks do not mix: index build, self-join (`pairs`, what the dedup stage runs) and a batch
   query of planted and random hashes; time, tracemalloc peak and max RSS; recall of the
   planted pairs. Twice: tables planned for the real number of hashes (the default) and for
   a fixed capacity of 10^7 (the old default). Brute force runs at the small sizes in the
   same run, and the index must find exactly the pairs brute force finds there. faiss's
   exact `IndexBinaryMultiHash` runs beside it when faiss is installed. Target: time(10x
   hashes) <= 15x time with the fixed plan, recall 1.0.
2. The README's catches/misses table: package photos at full size and at 256 px, each with
   transformed copies; a copy is caught when `dedup.plan` puts it in its original's group
   (canonical pHash, 256-bit check, windows, other turns), with the plain pHash distance for
   comparison; distinct photos and look-alike documents must stay apart.

    python bench/bench_dedup.py [--sizes 100000 1000000] [--brute 10000 100000]
                                [--out metrics/bench_dedup.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.hamming import (  # numpy only: the faiss child
    HammingIndex,
    brute_force_pairs,
    plan_tables,
)

MAX_RATIO = 15.0


def flip_bits(hashes: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each hash with `dist[i]` distinct random bits flipped."""
    rank = rng.random((len(hashes), 64)).argsort(axis=1).argsort(axis=1)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    masks = np.bitwise_or.reduce(np.where(rank < dist[:, None], weights, np.uint64(0)), axis=1)
    return hashes ^ masks


def make_hashes(n: int, threshold: int, planted: float, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, planted source rows, planted copy rows): the last `planted * n` rows are copies
    of earlier rows at distance 0..threshold."""
    rng = np.random.default_rng(seed)
    k = max(1, int(n * planted))
    base = rng.integers(0, 2**64, n - k, dtype=np.uint64, endpoint=False)
    src = rng.integers(0, n - k, k)
    copies = flip_bits(base[src], rng.integers(0, threshold + 1, k), rng)
    return np.concatenate([base, copies]), src, np.arange(n - k, n)


def make_queries(hashes: np.ndarray, q: int, threshold: int, seed: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(queries, source row of each planted query): half are near copies, half random."""
    rng = np.random.default_rng(seed)
    half = q // 2
    src = rng.integers(0, len(hashes), half)
    near = flip_bits(hashes[src], rng.integers(0, threshold + 1, half), rng)
    rand = rng.integers(0, 2**64, q - half, dtype=np.uint64, endpoint=False)
    return np.concatenate([near, rand]), src


def _codes(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """One int64 per unordered pair."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    return lo * np.int64(n) + hi


def _edges(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Sorted distinct codes of the pairs between different nodes."""
    keep = np.asarray(a) != np.asarray(b)
    return np.unique(_codes(np.asarray(a)[keep], np.asarray(b)[keep], n))


def child_index(n: int, threshold: int, planted: float, queries: int, capacity: int
                ) -> dict[str, Any]:
    hashes, src, dst = make_hashes(n, threshold, planted)
    qs, qsrc = make_queries(hashes, queries, threshold)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    index = HammingIndex(hashes, threshold, capacity)
    t1 = time.perf_counter()
    a, b = index.pairs()
    t2 = time.perf_counter()
    qi, ui, _ = index.query(qs)
    t3 = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    nu = len(index)
    found = _edges(a, b, nu)
    inv = index.inverse
    want_a, want_b = inv[src], inv[dst]
    same = want_a == want_b  # identical copies share one stored hash
    hit = same | np.isin(_codes(want_a, want_b, nu), found)
    recall = hit.mean()
    q_found = np.isin(np.arange(len(qsrc)) * np.int64(nu) + inv[qsrc], qi * np.int64(nu) + ui)
    return {
        "n": n, "unique": nu, "tables": len(index.tables), "capacity": capacity,
        "build_s": t1 - t0, "pairs_s": t2 - t1, "query_s": t3 - t2, "total_s": t3 - t0,
        "pairs": len(found), "planted": len(src), "recall": float(recall),
        "queries": len(qs), "query_recall": float(q_found.mean()),
        "tracemalloc_peak_mib": peak / 2**20,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "above_baseline_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
    }


def child_brute(n: int, threshold: int, planted: float) -> dict[str, Any]:
    hashes, src, dst = make_hashes(n, threshold, planted)
    tracemalloc.start()
    t0 = time.perf_counter()
    a, b = brute_force_pairs(hashes, threshold)
    t1 = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    found = _edges(a, b, n)
    recall = np.isin(_codes(src, dst, n), found).mean()
    # the index must find exactly these pairs (mapped onto its distinct hashes)
    index = HammingIndex(hashes, threshold)
    ia, ib = index.pairs()
    inv = index.inverse
    same_pairs = np.array_equal(_edges(inv[a], inv[b], len(index)), _edges(ia, ib, len(index)))
    return {
        "n": n, "total_s": t1 - t0, "pairs": len(found), "planted": len(src),
        "recall": float(recall), "index_equals_brute_force": bool(same_pairs),
        "tracemalloc_peak_mib": peak / 2**20,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_faiss(n: int, threshold: int, planted: float) -> dict[str, Any]:
    """faiss's exact multi-index hashing: 3 tables of 21 bits, `nflip` flips each (a pair
    within the threshold agrees on some table up to nflip bits: pigeonhole, as ours)."""
    import faiss

    hashes, src, dst = make_hashes(n, threshold, planted)
    codes = np.ascontiguousarray(hashes).view(np.uint8).reshape(n, 8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(64, 3, 21)
    index.nflip = -(-(threshold + 1) // 3) - 1
    index.add(codes)
    t1 = time.perf_counter()
    lims, _, found_i = index.range_search(codes, threshold + 1)  # distance < radius
    t2 = time.perf_counter()
    q = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    found = _edges(q, found_i.astype(np.int64), n)
    recall = np.isin(_codes(src, dst, n), found).mean()
    return {
        "n": n, "build_s": t1 - t0, "pairs_s": t2 - t1, "total_s": t2 - t0,
        "pairs": len(found), "planted": len(src), "recall": float(recall),
        "tracemalloc_peak_mib": 0.0,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "above_baseline_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
    }


def _photos(side: int | None) -> dict[str, Any]:
    """Distinct package photos as RGB PIL images (thumbnailed to `side` px when given)."""
    from PIL import Image
    from skimage import data as sk
    from sklearn.datasets import load_sample_image

    def rgb(a: np.ndarray) -> Image.Image:
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        im = Image.fromarray(a[..., :3].astype(np.uint8))
        if side:
            im.thumbnail((side, side), Image.LANCZOS)
        return im

    return {
        "chelsea": rgb(sk.chelsea()), "coffee": rgb(sk.coffee()), "astronaut": rgb(sk.astronaut()),
        "rocket": rgb(sk.rocket()), "camera": rgb(sk.camera()), "page": rgb(sk.page()),
        "text": rgb(sk.text()), "motorcycle": rgb(sk.stereo_motorcycle()[0]),
        "ihc": rgb(sk.immunohistochemistry()), "hubble": rgb(sk.hubble_deep_field()),
        "retina": rgb(sk.retina()), "coins": rgb(sk.coins()), "moon": rgb(sk.moon()),
        "brick": rgb(sk.brick()), "grass": rgb(sk.grass()), "gravel": rgb(sk.gravel()),
        "china": rgb(load_sample_image("china.jpg")),
        "flower": rgb(load_sample_image("flower.jpg")),
    }


def _transforms() -> dict[str, Any]:
    import io

    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

    T = Image.Transpose

    def jpeg(im: Image.Image, q: int) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def crop(im: Image.Image, frac: float) -> Image.Image:  # frac of each side in all
        dx, dy = round(im.width * frac / 2), round(im.height * frac / 2)
        return im.crop((dx, dy, im.width - dx, im.height - dy))

    def one_side(im: Image.Image) -> Image.Image:  # 10% off the right
        return im.crop((0, 0, round(im.width * 0.9), im.height))

    def corner(im: Image.Image) -> Image.Image:  # 90% of each side, top-left corner kept
        return im.crop((0, 0, round(im.width * 0.9), round(im.height * 0.9)))

    def banner(im: Image.Image) -> Image.Image:
        im = im.copy()
        d = ImageDraw.Draw(im)
        d.rectangle((0, int(im.height * 0.8), im.width, im.height), fill=(0, 0, 0))
        d.text((8, int(im.height * 0.85)), "BREAKING NEWS sample caption", fill=(255, 255, 255))
        return im

    def watermark(im: Image.Image) -> Image.Image:
        im = im.copy()
        d = ImageDraw.Draw(im)
        for y in range(0, im.height, max(1, im.height // 6)):
            d.text((4, y), "(c) stock photo " * 4, fill=(255, 255, 255))
        return im

    half = lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR)
    return {
        "resize 0.5x": half,
        "JPEG q70": lambda im: jpeg(im, 70),
        "JPEG q30": lambda im: jpeg(im, 30),
        "brightness +20%": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
        "brightness -20%": lambda im: ImageEnhance.Brightness(im).enhance(0.8),
        "contrast +30%": lambda im: ImageEnhance.Contrast(im).enhance(1.3),
        "grayscale": lambda im: im.convert("L").convert("RGB"),
        "blur sigma 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
        "blur sigma 8 (heavy)": lambda im: im.filter(ImageFilter.GaussianBlur(8)),
        "crop 2%": lambda im: crop(im, 0.02),
        "crop 5%": lambda im: crop(im, 0.05),
        "crop 10%": lambda im: crop(im, 0.10),
        "crop 20% (10% a side)": lambda im: crop(im, 0.20),
        "resize+JPEG+bright+crop 2%": lambda im: jpeg(
            ImageEnhance.Brightness(crop(half(im), 0.02)).enhance(1.2), 70),
        "horizontal flip": lambda im: im.transpose(T.FLIP_LEFT_RIGHT),
        "vertical flip": lambda im: im.transpose(T.FLIP_TOP_BOTTOM),
        "rotate 90 deg": lambda im: im.rotate(90, expand=True),
        "rotate 180 deg": lambda im: im.rotate(180),
        "rotate 270 deg": lambda im: im.rotate(270, expand=True),
        "rotate 90 + JPEG q70 + half": lambda im: jpeg(half(im).rotate(90, expand=True), 70),
        "flip + crop 10%": lambda im: crop(im, 0.10).transpose(T.FLIP_LEFT_RIGHT),
        "crop 10% off one side": one_side,
        "crop to a 90% corner": corner,
        "rotate 5 deg": lambda im: im.rotate(5),
        "text banner (20% of height)": banner,
        "text watermark (thin)": watermark,
    }


def _plan_groups(images: dict[str, Any], hashes: dict[str, dict[str, str]], p: Any
                 ) -> dict[str, int]:
    """Group of each image when `dedup.plan` runs on a manifest of just these images."""
    import hashlib
    import tempfile

    from pipeline.dedup import plan
    from pipeline.records import Record, write_manifest

    recs = [Record(key=f"r{i:06d}", source="bench", label="real", kind="image_folder",
                   sha256=hashlib.sha256(name.encode()).hexdigest(), width=im.width,
                   height=im.height, nbytes=im.width * im.height, **hashes[name])
            for i, (name, im) in enumerate(images.items())]
    with tempfile.TemporaryDirectory() as d:
        write_manifest(Path(d) / "m.parquet", recs)
        pl = plan(Path(d) / "m.parquet", p)
    return dict(zip(images, pl.group.tolist()))


def transform_table(p: Any) -> dict[str, Any]:
    """Per transformation: plain pHash distance photo -> copy, and whether dedup groups them."""
    import imagehash

    from pipeline.dedup import image_hashes

    sys.path.insert(0, str(ROOT / "tests"))
    from test_dedup import _lookalike_documents  # the receipts and page halves of the tests

    out: dict[str, Any] = {"threshold": p.threshold, "transforms": {}}
    distinct: dict[str, Any] = {}
    for side in (None, 256):
        ims = _photos(side)
        scale = "full" if side is None else f"{side}px"
        h = {k: image_hashes(np.asarray(im)) for k, im in ims.items()}
        ph = {k: imagehash.hex_to_hash(v["phash"]) for k, v in h.items()}
        names = list(h)
        out[f"distinct_min_phash_{scale}"] = int(min(
            ph[a] - ph[b] for i, a in enumerate(names) for b in names[i + 1 :]))
        distinct.update({f"{k}@{scale}": (im, h[k]) for k, im in ims.items()})
        for t, f in _transforms().items():
            copies = {f"{k}|copy": f(im) for k, im in ims.items()}
            hc = {k: image_hashes(np.asarray(im)) for k, im in copies.items()}
            d = [int(imagehash.hex_to_hash(hc[f"{k}|copy"]["phash"]) - ph[k]) for k in ims]
            group = _plan_groups({**ims, **copies}, {**h, **hc}, p)
            caught = sum(group[k] == group[f"{k}|copy"] for k in ims)
            row = out["transforms"].setdefault(t, {"distances": [], "photos": 0, "caught": 0})
            row["distances"] += d
            row["photos"] += len(d)
            row["caught"] += int(caught)
    for row in out["transforms"].values():
        d = row.pop("distances")
        row.update(median=float(np.median(d)), max=int(max(d)), min=int(min(d)),
                   phash_caught=int(sum(x <= p.threshold for x in d)))
    # distinct images: every photo at both sizes, the scans and look-alike documents
    docs = _lookalike_documents()
    distinct.update({k: (im, image_hashes(np.asarray(im))) for k, im in docs.items()})
    group = _plan_groups({k: v[0] for k, v in distinct.items()},
                         {k: v[1] for k, v in distinct.items()}, p)
    by: dict[int, set[str]] = {}
    for k, g in group.items():
        by.setdefault(g, set()).add(k.split("@")[0])
    out["distinct_images"] = len({k.split("@")[0] for k in group})
    out["false_merges"] = sorted(sorted(v) for v in by.values() if len(v) > 1)
    return out


def spawn(args: list[str], python: str | None = None) -> dict[str, Any]:
    out = subprocess.run([python or sys.executable, __file__, *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--brute", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--threshold", type=int, default=8, help="dedup.threshold (default 8)")
    ap.add_argument("--planted", type=float, default=0.01)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--fixed-capacity", type=int, default=10_000_000,
                    help="the fixed plan timed beside the plan for each size")
    ap.add_argument("--faiss-python", default=sys.executable,
                    help="an interpreter with faiss installed (skipped when it has none)")
    ap.add_argument("--faiss-max", type=int, default=1_000_000,
                    help="largest size faiss runs at (it is much slower)")
    ap.add_argument("--skip-transforms", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_dedup.json")
    ap.add_argument("--child", choices=["index", "brute", "faiss"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--capacity", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child == "index":
        print(json.dumps(child_index(a.n, a.threshold, a.planted, a.queries, a.capacity)))
        return 0
    if a.child == "brute":
        print(json.dumps(child_brute(a.n, a.threshold, a.planted)))
        return 0
    if a.child == "faiss":
        print(json.dumps(child_faiss(a.n, a.threshold, a.planted)))
        return 0

    common = ["--threshold", str(a.threshold), "--planted", str(a.planted)]
    has_faiss = subprocess.run([a.faiss_python, "-c", "import faiss"], capture_output=True,
                               cwd=ROOT, check=False).returncode == 0
    rows: list[dict[str, Any]] = []
    for n in a.sizes:  # interleaved, so load on the machine hits every method alike
        for name, cap in (("plan_n", 0), ("plan_fixed", a.fixed_capacity)):
            if name == "plan_fixed" and plan_tables(
                    a.threshold, max(rows[-1]["unique"], a.fixed_capacity)) == plan_tables(
                    a.threshold, rows[-1]["unique"]):  # rows[-1]: plan_n at this size
                rows.append({**rows[-1], "method": name})  # the same tables: not timed twice
                continue
            r = spawn(["--child", "index", "--n", str(n), "--queries", str(a.queries),
                       "--capacity", str(cap), *common])
            rows.append({"method": name, **r})
            print(f"  {name} n={n}: {r['total_s']:.2f} s", file=sys.stderr, flush=True)
        if has_faiss and n <= a.faiss_max:
            r = spawn(["--child", "faiss", "--n", str(n), *common], a.faiss_python)
            rows.append({"method": "faiss", **r})
            print(f"  faiss n={n}: {r['total_s']:.2f} s", file=sys.stderr, flush=True)
    for n in a.brute:
        r = spawn(["--child", "brute", "--n", str(n), *common])
        rows.append({"method": "brute_force", **r})
        print(f"  brute_force n={n}: {r['total_s']:.2f} s", file=sys.stderr, flush=True)

    def at(method: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["method"] == method and r["n"] == n), None)

    def ratio(method: str, key: str) -> float | None:
        sizes = a.brute if method == "brute_force" else a.sizes
        small, big = min(sizes), max(sizes)
        lo, hi = at(method, small), at(method, big)
        if small == big or lo is None or hi is None:
            return None
        return round(hi[key] / lo[key] / (big / small) * 10, 2)  # per 10x more hashes

    big = max(a.sizes)
    self_join = {m: at(m, big)["build_s"] + at(m, big)["pairs_s"]
                 for m in ("plan_n", "plan_fixed") if at(m, big)}
    faiss_n = max([r["n"] for r in rows if r["method"] == "faiss"], default=None)
    if faiss_n:  # compared where both ran
        self_join["faiss"] = at("faiss", faiss_n)["build_s"] + at("faiss", faiss_n)["pairs_s"]
        self_join["ours_at_faiss_n"] = (at("plan_n", faiss_n)["build_s"]
                                        + at("plan_n", faiss_n)["pairs_s"])
    summary = {
        "threshold": a.threshold, "planted_fraction": a.planted,
        "fixed_capacity": a.fixed_capacity,
        "ratio_total_per_10x_fixed_plan": ratio("plan_fixed", "total_s"),
        "ratio_total_per_10x_plan_per_size": ratio("plan_n", "total_s"),
        "ratio_brute_force_per_10x": ratio("brute_force", "total_s"),
        "plan_n_speedup_at_largest": round(self_join["plan_fixed"] / self_join["plan_n"], 2),
        "faiss_n": faiss_n,
        "faiss_time_over_plan_n": (round(self_join["faiss"] / self_join["ours_at_faiss_n"], 2)
                                   if faiss_n else None),
        "faiss_memory_over_plan_n": (
            round(at("faiss", faiss_n)["above_baseline_mib"]
                  / max(at("plan_n", faiss_n)["above_baseline_mib"], 1e-3), 2)
            if faiss_n else None),
        "min_recall": min(min(r["recall"], r.get("query_recall", 1.0)) for r in rows),
        "index_equals_brute_force": all(r["index_equals_brute_force"]
                                        for r in rows if r["method"] == "brute_force"),
    }
    fixed = summary["ratio_total_per_10x_fixed_plan"]
    ok = (fixed is None or fixed <= MAX_RATIO)
    ok = ok and summary["min_recall"] == 1.0 and summary["index_equals_brute_force"]
    summary["pass"] = bool(ok)

    head = (f"{'method':<12}{'n':>10}{'tables':>8}{'build s':>9}{'pairs s':>9}{'query s':>9}"
            f"{'total s':>9}{'pairs':>8}{'recall':>8}{'q recall':>9}{'peak MiB':>10}"
            f"{'rss MiB':>9}{'+rss MiB':>9}")
    print(head)
    print("-" * len(head))

    def f(r: dict[str, Any], k: str, fmt: str = ".2f") -> str:
        return format(r[k], fmt) if k in r else "-"

    for r in rows:
        print(f"{r['method']:<12}{r['n']:>10}{r.get('tables', '-'):>8}{f(r, 'build_s'):>9}"
              f"{f(r, 'pairs_s'):>9}{f(r, 'query_s'):>9}{f(r, 'total_s'):>9}{r['pairs']:>8}"
              f"{r['recall']:>8.3f}{f(r, 'query_recall', '.3f'):>9}"
              f"{r['tracemalloc_peak_mib']:>10.1f}{r['maxrss_mib']:>9.1f}"
              f"{f(r, 'above_baseline_mib', '.1f'):>9}")
    print("pairs: the index counts pairs of distinct hashes, brute force pairs of rows "
          "(identical copies included); recall: planted pairs found (self-join), q recall: "
          "planted queries that found their source; +rss: peak RSS above the child's RSS "
          "before the work (faiss allocates outside tracemalloc)")
    print(f"time per 10x more hashes: tables planned for {a.fixed_capacity} "
          f"{summary['ratio_total_per_10x_fixed_plan']}x (target <= {MAX_RATIO:g}x), planned "
          f"per size {summary['ratio_total_per_10x_plan_per_size']}x, brute force "
          f"{summary['ratio_brute_force_per_10x']}x; at n={big} the plan for n is "
          f"{summary['plan_n_speedup_at_largest']}x faster than the fixed plan (self-join); "
          f"faiss IndexBinaryMultiHash / ours (plan for n) at n={faiss_n}: self-join time "
          f"{summary['faiss_time_over_plan_n']}x, memory above baseline "
          f"{summary['faiss_memory_over_plan_n']}x"
          f"{'' if has_faiss else ' (faiss not installed: --faiss-python)'}; "
          f"recall {summary['min_recall']}; index == brute force: "
          f"{summary['index_equals_brute_force']}; {'PASS' if summary['pass'] else 'FAIL'}")
    result: dict[str, Any] = {"summary": summary, "rows": rows}
    if not a.skip_transforms:
        from pipeline.dedup import DedupParams

        p = DedupParams(threshold=a.threshold)
        tr = transform_table(p)
        result["transforms"] = tr
        print(f"\nCopies grouped with their original by dedup ({len(_photos(None))} photos at full "
              f"size and 256 px; pHash threshold {p.threshold}, probes {p.probe_threshold}, "
              f"256-bit check {p.verify_bits}); plain pHash distance for comparison; distinct "
              f"photos min pHash distance {tr['distinct_min_phash_full']} / "
              f"{tr['distinct_min_phash_256px']}; false merges among {tr['distinct_images']} "
              f"distinct images (photos, scans, look-alike receipts, page halves): "
              f"{tr['false_merges'] or 'none'}")
        print(f"{'transformation':<30}{'grouped':>9}{'pHash median':>14}{'max':>5}"
              f"{'pHash alone':>13}")
        for t, r in tr["transforms"].items():
            print(f"{t:<30}{r['caught']:>5}/{r['photos']:<3}{r['median']:>14.0f}{r['max']:>5}"
                  f"{r['phash_caught']:>9}/{r['photos']}")
        summary["pass"] = summary["pass"] and not tr["false_merges"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
