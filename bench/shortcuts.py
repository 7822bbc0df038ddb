"""Shortcut check: can simple file features tell a forgery from a real image?

A detector learns whatever separates real from fake. If forgeries were written in another
container, mode, JPEG table, chroma subsampling or without the source's metadata, a
classifier that never looks at a pixel would find them. This script builds a mixed corpus
(the embedded package images of `manifests/default.yaml` plus built variants: JPEG 4:2:0
progressive with EXIF and ICC, JPEG 4:4:4 with optimised Huffman tables, grey and CMYK
JPEG, grey, RGBA and palette PNG, BMP, GIF, lossy and lossless WebP), runs
ingest -> synthesize -> masks on it (local backend, every generator with its offline
defaults), and fits a depth-2 decision tree (scikit-learn) on file features only:

    format, mode, width, height, pixels, JPEG quality, chroma subsampling, quantisation
    table mean and hash, EXIF present, ICC present, progressive

Its accuracy (on the rows it was fitted to: how separable they are) is compared with what
the source mix explains: the same tree fitted after giving every forgery its source's file
features. Forgeries that are encoded exactly like their sources score the same; any excess
is a shortcut. Three row sets:

- `local`: real images and local edits (tampered, same size as their source): the check;
- `all_no_size`: real images and every forgery, size features left out: the encoding check
  for full syntheses too;
- `all`: every row and every feature. Full syntheses ship at the size their generator made
  them (64 px for the GAN and the random-weight stand-ins), so size separates them from the
  real images here, on purpose: resampling them to their source's size would add
  interpolation traces instead. Reported, not a target.

Also reported: the same with bytes per pixel added (compression settings Pillow cannot
reproduce exactly, such as a PNG encoder's filters, move file sizes).

    python bench/shortcuts.py [--out metrics/bench_shortcuts.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageCms, JpegImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import masks, synthesize  # noqa: E402
from pipeline import params as params_mod  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.executor import Executor  # noqa: E402
from pipeline.params import ExecutorParams  # noqa: E402
from pipeline.records import Record, read_records  # noqa: E402

FEATURES = (
    "format", "mode", "width", "height", "pixels", "jpeg_quality", "subsampling",
    "qtable_mean", "qtable_hash", "exif", "icc", "progressive",
)  # fmt: skip
SIZE_FEATURES = ("width", "height", "pixels")
MARGIN = 0.02  # the tree may beat the source-mix baseline by this much (one row in 50)


def _fit(a: np.ndarray, side: int) -> Image.Image:
    img = Image.fromarray(a)
    s = side / max(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)


def build_corpus(root: Path) -> Path:
    """The embedded corpus plus variants in many containers; returns a corpus manifest."""
    from skimage import data

    folder = root / "variants"
    folder.mkdir(parents=True, exist_ok=True)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "TestCam", "Model 1"  # Make, Model

    def put(name: str, img: Image.Image, fmt: str, **kw: Any) -> None:
        img.save(folder / name, fmt, **kw)

    put(
        "retina.jpg",
        _fit(data.retina(), 320),
        "JPEG",
        quality=80,
        subsampling=2,
        progressive=True,
        exif=exif.tobytes(),
        icc_profile=icc,
    )
    put(
        "ihc.jpg",
        _fit(data.immunohistochemistry(), 256),
        "JPEG",
        quality=92,
        subsampling=0,
        optimize=True,
    )
    put("moon.jpg", _fit(data.moon(), 256), "JPEG", quality=85)
    put("cat_cmyk.jpg", _fit(data.cat(), 240).convert("CMYK"), "JPEG", quality=90)
    put("camera.png", _fit(data.camera(), 256), "PNG")
    put("logo.png", _fit(data.logo(), 256), "PNG")  # RGBA with transparency
    put("grass.png", _fit(data.grass(), 200).convert("RGB").convert("P"), "PNG")
    put("colorwheel.bmp", _fit(data.colorwheel(), 224), "BMP")
    put("gravel.gif", _fit(data.gravel(), 200).convert("P"), "GIF")
    put("cell.webp", _fit(data.cell(), 256).convert("RGB"), "WEBP", quality=70)
    put("clock.webp", _fit(data.clock(), 256).convert("RGB"), "WEBP", lossless=True)
    default = yaml.safe_load((ROOT / "manifests" / "default.yaml").read_text())
    sources = default["sources"] + [
        {
            "name": "variants",
            "kind": "image_folder",
            "domain": "natural",
            "label": "real",
            "license": "scikit-image sample data",
            "path": str(folder),
        }
    ]
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False))
    return path


def run_pipeline(root: Path, corpus: Path, seed: int = 0) -> tuple[Path, list[Record], dict]:
    """ingest -> synthesize -> masks with every generator; returns (data dir, rows, metrics)."""
    data = root / "data"
    p = params_mod.from_dict({
        "data_dir": str(data), "metrics_dir": str(root / "metrics"),
        "plots_dir": str(root / "plots"), "corpus": [str(corpus)], "seed": seed,
        "executor": {"backend": "local", "progress": False},
    })  # fmt: skip
    ex = Executor(ExecutorParams(backend="local", progress=False))
    run_stage("ingest", p, ex)
    metrics = synthesize.run(
        p, {"manifest": data / "ingest" / "manifest.parquet"}, data / "synthesize", ex
    )
    masks.run(p, {"manifest": data / "synthesize" / "manifest.parquet"}, data / "masks", ex)
    return data, read_records(data / "masks" / "manifest.parquet"), metrics


def file_features(blob: bytes) -> dict[str, Any]:
    """What a file says about itself, before any pixel is looked at."""
    with Image.open(io.BytesIO(blob)) as im:
        q = getattr(im, "quantization", None) or {}
        tables = [v for k in sorted(q) for v in q[k]]
        jpeg = im.format in ("JPEG", "MPO")
        return {
            "format": im.format,
            "mode": im.mode,
            "width": im.width,
            "height": im.height,
            "pixels": im.width * im.height,
            "jpeg_quality": _quality(im) if jpeg else -1,
            "subsampling": JpegImagePlugin.get_sampling(im) if jpeg else -2,
            "qtable_mean": float(np.mean(tables)) if tables else -1.0,
            "qtable_hash": hashlib.sha1(str(tables).encode()).hexdigest()[:8] if tables else "",
            "exif": int(bool(im.info.get("exif"))),
            "icc": int(bool(im.info.get("icc_profile"))),
            "progressive": int(bool(im.info.get("progressive") or im.info.get("progression"))),
            "bytes_per_pixel": len(blob) / (im.width * im.height),
        }


def _quality(im: Image.Image) -> int:
    from pipeline.ingest import jpeg_quality

    return jpeg_quality(im) or -1


def table(data: Path, rows: list[Record]) -> list[dict[str, Any]]:
    """One feature row per shipped real image and per surviving forgery."""
    ok = [r for r in rows if r.status == "ok" and r.blob]
    real = {r.key: r for r in ok if r.label == "real"}
    out = []
    for r in ok:
        if r.label != "real" and r.parent_key not in real:
            continue
        f = file_features((data / r.blob).read_bytes())
        parent = (
            f if r.label == "real" else file_features((data / real[r.parent_key].blob).read_bytes())
        )
        out.append({"key": r.key, "label": r.label, "generator": r.generator,
                    "features": f, "source_features": parent})  # fmt: skip
    return out


def tree_accuracy(rows: list[dict[str, Any]], names: tuple[str, ...], use_source: bool) -> float:
    """Accuracy of a depth-2 tree fitted to tell real (0) from forged (1) by `names`;
    `use_source` gives each forgery its source's features (the source-mix baseline)."""
    from sklearn.tree import DecisionTreeClassifier

    feats = [r["source_features" if use_source else "features"] for r in rows]
    codes: dict[str, dict[Any, int]] = {}
    x = np.array([[_code(codes, n, f[n]) for n in names] for f in feats], dtype=np.float64)
    y = np.array([r["label"] != "real" for r in rows], dtype=int)
    tree = DecisionTreeClassifier(max_depth=2, random_state=0).fit(x, y)
    return float(tree.score(x, y))


def _code(codes: dict[str, dict[Any, int]], name: str, value: Any) -> float:
    if isinstance(value, str):  # categories: a stable code per value, in order of appearance
        return float(codes.setdefault(name, {}).setdefault(value, len(codes.get(name, {}))))
    return float(value)


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    local = [r for r in rows if r["label"] in ("real", "tampered")]
    no_size = tuple(n for n in FEATURES if n not in SIZE_FEATURES)
    sets = {
        "local": (local, FEATURES),
        "all_no_size": (rows, no_size),
        "all": (rows, FEATURES),
        "local_with_bytes_per_pixel": (local, FEATURES + ("bytes_per_pixel",)),
    }
    out: dict[str, Any] = {}
    for name, (subset, names) in sets.items():
        y = [r["label"] != "real" for r in subset]
        out[name] = {
            "rows": len(subset),
            "forged": int(sum(y)),
            "tree_accuracy": round(tree_accuracy(subset, names, False), 4),
            "source_mix_accuracy": round(tree_accuracy(subset, names, True), 4),
            "majority_accuracy": round(max(np.mean(y), 1 - np.mean(y)), 4),
        }
    forged = [r for r in local if r["label"] != "real"]
    out["local_edits_with_other_file_features"] = sum(
        any(r["features"][k] != r["source_features"][k] for k in FEATURES) for r in forged
    )
    ratios = [
        r["features"]["bytes_per_pixel"] / r["source_features"]["bytes_per_pixel"] for r in forged
    ]
    out["local_edit_bytes_per_pixel_ratio_median"] = (
        round(float(np.median(ratios)), 4) if ratios else None
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="metrics/bench_shortcuts.json", help="JSON output path")
    ap.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        data, rows, _ = run_pipeline(root, build_corpus(root))
        feats = table(data, rows)
    res = figures(feats)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"{'rows':24s} {'n':>4s} {'forged':>6s} {'tree':>6s} {'source mix':>10s} {'majority':>8s}"
    )
    for name in ("local", "all_no_size", "all", "local_with_bytes_per_pixel"):
        r = res[name]
        print(
            f"{name:24s} {r['rows']:4d} {r['forged']:6d} {r['tree_accuracy']:6.3f} "
            f"{r['source_mix_accuracy']:10.3f} {r['majority_accuracy']:8.3f}"
        )
    print(
        f"local edits whose file features differ from their source's: "
        f"{res['local_edits_with_other_file_features']}; bytes per pixel, forgery / source "
        f"(median): {res['local_edit_bytes_per_pixel_ratio_median']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
