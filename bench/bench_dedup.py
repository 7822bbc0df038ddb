"""Benchmark: the near-duplicate index (`pipeline.dedup.HammingIndex`) against brute force.

Random 64-bit hashes with planted near-duplicates (a fraction of rows are copies of other
rows with 0..threshold bits flipped). For each size, in its own subprocess so that memory
peaks do not mix: index build, self-join (`pairs`, what the dedup stage runs) and a batch
query of planted and random hashes; time, tracemalloc peak and max RSS; recall of the
planted pairs. Brute force runs at the small sizes in the same run, and the index must find
exactly the pairs brute force finds there. Target: time(10x hashes) <= 15x time, recall 1.0.

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

from pipeline.dedup import DedupParams, HammingIndex, brute_force_pairs

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

    def jpeg(im: Image.Image, q: int) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def crop(im: Image.Image, frac: float) -> Image.Image:
        dx, dy = round(im.width * frac / 2), round(im.height * frac / 2)
        return im.crop((dx, dy, im.width - dx, im.height - dy))

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
        "resize+JPEG+bright+crop 2%": lambda im: jpeg(
            ImageEnhance.Brightness(crop(half(im), 0.02)).enhance(1.2), 70),
        "rotate 5 deg": lambda im: im.rotate(5),
        "rotate 90 deg": lambda im: im.rotate(90, expand=True),
        "horizontal flip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
        "text banner (20% of height)": banner,
        "text watermark (thin)": watermark,
    }


def transform_distances(threshold: int) -> dict[str, Any]:
    """pHash distance (as ingest computes it) between each photo and its transformed copy."""
    import imagehash

    out: dict[str, Any] = {"threshold": threshold, "transforms": {}}
    for side in (None, 256):
        ims = _photos(side)
        h = {k: imagehash.phash(im) for k, im in ims.items()}
        names = list(h)
        distinct = [h[a] - h[b] for i, a in enumerate(names) for b in names[i + 1 :]]
        scale = "full size" if side is None else f"{side} px"
        out[f"distinct_min_{scale}"] = int(min(distinct))
        for t, f in _transforms().items():
            d = [int(imagehash.phash(f(im)) - h[k]) for k, im in ims.items()]
            row = out["transforms"].setdefault(t, {"distances": [], "photos": 0, "caught": 0})
            row["distances"] += d
            row["photos"] += len(d)
            row["caught"] += sum(x <= threshold for x in d)
    for row in out["transforms"].values():
        d = row.pop("distances")
        row.update(median=float(np.median(d)), max=int(max(d)), min=int(min(d)))
    return out


def spawn(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--brute", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--threshold", type=int, default=DedupParams().threshold)
    ap.add_argument("--planted", type=float, default=0.01)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--capacity", type=int, default=DedupParams().capacity)
    ap.add_argument("--per-size-plan", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the index planned for each size (capacity = n)")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_dedup.json")
    ap.add_argument("--child", choices=["index", "brute"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child == "index":
        print(json.dumps(child_index(a.n, a.threshold, a.planted, a.queries, a.capacity)))
        return 0
    if a.child == "brute":
        print(json.dumps(child_brute(a.n, a.threshold, a.planted)))
        return 0

    common = ["--threshold", str(a.threshold), "--planted", str(a.planted)]
    rows: list[dict[str, Any]] = []
    plans = [("index", a.capacity)]
    if a.per_size_plan:
        plans.append(("index_plan_n", 0))
    for name, cap in plans:
        for n in a.sizes:
            r = spawn(["--child", "index", "--n", str(n), "--queries", str(a.queries),
                       "--capacity", str(cap or n), *common])
            rows.append({"method": name, **r})
            print(f"  {name} n={n}: {r['total_s']:.2f} s", file=sys.stderr, flush=True)
    for n in a.brute:
        r = spawn(["--child", "brute", "--n", str(n), *common])
        rows.append({"method": "brute_force", **r})
        print(f"  brute_force n={n}: {r['total_s']:.2f} s", file=sys.stderr, flush=True)

    def ratio(method: str, key: str) -> float | None:
        t = {r["n"]: r[key] for r in rows if r["method"] == method}
        small, big = min(a.sizes), max(a.sizes)
        if method == "brute_force":
            small, big = min(a.brute), max(a.brute)
        if small == big or small not in t or big not in t:
            return None
        return round(t[big] / t[small] / (big / small) * 10, 2)  # per 10x more hashes

    index_rows = [r for r in rows if r["method"] == "index"]
    summary = {
        "threshold": a.threshold, "planted_fraction": a.planted, "capacity": a.capacity,
        "ratio_total_per_10x": ratio("index", "total_s"),
        "ratio_pairs_per_10x": ratio("index", "pairs_s"),
        "ratio_brute_force_per_10x": ratio("brute_force", "total_s"),
        # informational: a plan per size keeps small runs cheap, so it scales worse
        "ratio_total_per_10x_plan_per_size": ratio("index_plan_n", "total_s"),
        "min_recall": min(min(r["recall"], r.get("query_recall", 1.0)) for r in rows),
        "index_equals_brute_force": all(r["index_equals_brute_force"]
                                        for r in rows if r["method"] == "brute_force"),
    }
    ok = (summary["ratio_total_per_10x"] is None or summary["ratio_total_per_10x"] <= MAX_RATIO)
    ok = ok and summary["min_recall"] == 1.0 and summary["index_equals_brute_force"]
    summary["pass"] = bool(ok and index_rows)

    head = (f"{'method':<14}{'n':>10}{'tables':>8}{'build s':>9}{'pairs s':>9}{'query s':>9}"
            f"{'total s':>9}{'pairs':>8}{'recall':>8}{'q recall':>9}{'peak MiB':>10}{'rss MiB':>9}")
    print(head)
    print("-" * len(head))
    def f(r: dict[str, Any], k: str, fmt: str = ".2f") -> str:
        return format(r[k], fmt) if k in r else "-"

    for r in rows:
        print(f"{r['method']:<14}{r['n']:>10}{r.get('tables', '-'):>8}{f(r, 'build_s'):>9}"
              f"{f(r, 'pairs_s'):>9}{f(r, 'query_s'):>9}{f(r, 'total_s'):>9}{r['pairs']:>8}"
              f"{r['recall']:>8.3f}{f(r, 'query_recall', '.3f'):>9}"
              f"{r['tracemalloc_peak_mib']:>10.1f}{r['maxrss_mib']:>9.1f}")
    print("pairs: the index counts pairs of distinct hashes, brute force pairs of rows "
          "(identical copies included); recall: planted pairs found (self-join), q recall: "
          "planted queries that found their source")
    print(f"time per 10x more hashes: index total {summary['ratio_total_per_10x']}x "
          f"(self-join {summary['ratio_pairs_per_10x']}x; target <= {MAX_RATIO:g}x), "
          f"brute force {summary['ratio_brute_force_per_10x']}x, index planned per size "
          f"{summary['ratio_total_per_10x_plan_per_size']}x; "
          f"recall {summary['min_recall']}; index == brute force: "
          f"{summary['index_equals_brute_force']}; {'PASS' if summary['pass'] else 'FAIL'}")
    tr = transform_distances(a.threshold)
    print(f"\npHash distance photo -> copy ({len(_photos(None))} photos, full size and 256 px; "
          f"threshold {a.threshold}; distinct photos: min {tr['distinct_min_full size']} / "
          f"{tr['distinct_min_256 px']})")
    print(f"{'transformation':<30}{'median':>8}{'max':>6}{'caught':>10}")
    for t, r in tr["transforms"].items():
        print(f"{t:<30}{r['median']:>8.0f}{r['max']:>6}{r['caught']:>6}/{r['photos']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "rows": rows, "transforms": tr},
                                indent=1) + "\n")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
