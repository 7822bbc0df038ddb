"""Shared fixtures: tiny corpora built from package sample images, awkward and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from pipeline import params as params_mod
from pipeline.executor import Executor
from pipeline.params import ExecutorParams

ROOT = Path(__file__).resolve().parents[1]


def local_executor() -> Executor:
    return Executor(ExecutorParams(backend="local", progress=False))


def png_bomb_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring a huge canvas, with a tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def save(img: Image.Image, path: Path, fmt: str, **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def awkward_corpus(root: Path) -> dict[str, str]:
    """Valid but awkward images; returns {relative path: what it is}."""
    coffee = Image.fromarray(skdata.coffee()).resize((120, 80))
    made: dict[str, str] = {}

    def put(rel: str, img: Image.Image, fmt: str, what: str, **kw) -> None:
        save(img, root / rel, fmt, **kw)
        made[rel] = what

    put("cmyk.jpg", coffee.convert("CMYK"), "JPEG", "CMYK JPEG", quality=90)
    put("gray16.png", Image.fromarray(np.asarray(coffee.convert("L"), np.uint16) * 257), "PNG", "16-bit")
    put("palette.png", coffee.convert("P"), "PNG", "palette")
    put("alpha.png", coffee.convert("RGBA"), "PNG", "alpha")
    put("gray.png", coffee.convert("L"), "PNG", "grayscale")
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", coffee, "JPEG", "EXIF-rotated", exif=exif.tobytes(), quality=85)
    put("photo.webp", coffee, "WEBP", "WebP", quality=80)
    put("scan.tif", coffee, "TIFF", "TIFF")
    put("one.png", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG", "1x1")
    put("UPPER.JPG", coffee.rotate(90, expand=True), "JPEG", "upper-case extension", quality=92)
    put("dossier é/photo ü 1.png", coffee.transpose(Image.FLIP_LEFT_RIGHT), "PNG", "non-ASCII, spaces")
    put("a/same.png", coffee.crop((0, 0, 60, 60)), "PNG", "same name, folder a")
    put("b/same.png", coffee.crop((60, 20, 120, 80)), "PNG", "same name, folder b")
    return made


def broken_corpus(root: Path) -> dict[str, str]:
    """Bad inputs; returns {relative path: expected status}."""
    root.mkdir(parents=True, exist_ok=True)
    good = save(Image.fromarray(skdata.astronaut()), root / "tmp_full.jpg", "JPEG", quality=90)
    (root / "tmp_full.jpg").unlink()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_bytes(b"this is not an image at all\n" * 10)
    (root / "bomb.png").write_bytes(png_bomb_header(60000, 60000))
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    (root / "loop.png").symlink_to(root / "loop.png")
    return {
        "truncated.jpg": "truncated",
        "empty.png": "zero_bytes",
        "notes.jpg": "not_an_image",
        "bomb.png": "too_many_pixels",
        "dangling.jpg": "dangling_link",
        "loop.png": "unreadable",
    }


def only_generators(**specs: dict) -> dict:
    """`synthesize.generators` with just these: params mappings merge with the defaults, and
    `null` removes a default entry."""
    from generators.registry import REGISTRY

    return {name: specs.get(name) for name in REGISTRY} | specs


def only_exports(**specs: dict) -> dict:
    """`export.exports` with just these (the default `balanced` removed)."""
    return {"balanced": None, **specs}


def write_manifest(path: Path, sources: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False, allow_unicode=True))
    return path


def make_params(tmp_path: Path, corpus: list[Path], **sections) -> params_mod.Params:
    data = {
        "data_dir": str(tmp_path / "data"),
        "metrics_dir": str(tmp_path / "metrics"),
        "corpus": [str(c) for c in corpus],
        "executor": {"backend": "local", "progress": False},
        **sections,
    }
    return params_mod.from_dict(data)


def write_params(tmp_path: Path, corpus: list[Path], **sections) -> Path:
    data = {
        "data_dir": str(tmp_path / "data"),
        "metrics_dir": str(tmp_path / "metrics"),
        "corpus": [str(c) for c in corpus],
        "executor": {"backend": "local", "progress": False},
        **sections,
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A few package images in a folder, as an image_folder manifest."""
    folder = tmp_path / "photos"
    save(Image.fromarray(skdata.coffee()).resize((160, 107)), folder / "coffee.png", "PNG")
    save(Image.fromarray(skdata.chelsea()).resize((150, 100)), folder / "chelsea.jpg", "JPEG", quality=90)
    save(Image.fromarray(skdata.astronaut()).resize((128, 128)), folder / "faces" / "astronaut.png", "PNG")
    return write_manifest(tmp_path / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "test", "path": str(folder)},
    ])


def run_ingest(tmp_path: Path, sources: list[dict], **sections):
    """Ingest `sources` (manifest entries) into tmp_path/data; returns (params, metrics, records)."""
    from pipeline.cli import run_stage
    from pipeline.records import read_records

    manifest = write_manifest(tmp_path / "corpus.yaml", sources)
    params = make_params(tmp_path, [manifest], **sections)
    metrics = run_stage("ingest", params, local_executor())
    return params, metrics, read_records(params.data / "ingest" / "manifest.parquet")


def ship(params: params_mod.Params, split: str = "train") -> list[dict]:
    """Every ok ingest record to `split`, through the shard stage; returns the shipped
    samples as read back by webdataset (raw bytes)."""
    import webdataset as wds

    from pipeline.cli import run_stage
    from pipeline.records import read_records
    from pipeline.records import write_manifest as write_records

    recs = read_records(params.data / "ingest" / "manifest.parquet")
    write_records(params.data / "split" / "manifest.parquet",
                  [r.replace(split=split if r.status == "ok" else None, group_id=r.sha256) for r in recs])
    run_stage("shard", params, local_executor())
    tars = sorted(str(p) for p in (params.data / "shards").rglob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def source(name: str, kind: str, path, **kw) -> dict:
    """A manifest entry with the common keys filled in."""
    d = {"name": name, "kind": kind, "domain": kw.pop("domain", "natural"),
         "label": kw.pop("label", "real"), "license": "test"}
    if path is not None:
        d["path"] = str(path)
    d.update(kw)
    return d
