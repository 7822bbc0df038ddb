"""Reading the shards with Hugging Face `datasets`, whatever image formats they hold.

`datasets.load_dataset("webdataset", ...)` infers its columns from the first samples of the
first tar: on a corpus with several image formats the other formats' images silently become
None (each tar holds one format, named by the extension: `jpg`, `png`, ...), and a record
field that is null in the first samples and an integer later (`exif_orientation`,
`jpeg_quality`) fails with "Couldn't cast array of type int64 to null". Declared features fix
both:

    import datasets
    from pipeline.load import features
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               features=features())      # one column per image extension

or, with one `image` column whatever the extension:

    from pipeline.load import load_shards
    ds = load_shards("data/exports/balanced-100pct", split="train")
    ds[0]["image"], ds[0]["mask"], ds[0]["json"]["operation"]
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.imageio import EXT_FORMAT
from pipeline.records import Record

IMAGE_EXTENSIONS = tuple(EXT_FORMAT)  # what the pipeline ships as `<key>.<ext>`
_AUX = ("mask.png", "diff.png", "json")
_VALUE = {"int": "int64", "float": "float64", "str": "string"}


def record_features() -> dict[str, Any]:
    """The `json` member as a typed struct: every public record field with its type."""
    import datasets

    from pipeline.records import _PUBLIC

    return {f.name: datasets.Value(_VALUE[str(f.type).replace(" | None", "").strip()])
            for f in dataclasses.fields(Record) if f.name in _PUBLIC}


def features(image_extensions: Iterable[str] = IMAGE_EXTENSIONS, decode: bool = True) -> Any:
    """`datasets.Features` for the pipeline's shards: one Image column per extension (None
    where a sample has another format), `mask.png`, `diff.png` (None unless kept) and the
    record in `json`, typed.

    Note: `datasets` turns an image by its EXIF orientation when it decodes it, and its mask
    too (the mask PNG carries the image's orientation tag); `load_shards` decodes both as
    stored, as webdataset does and as the record's `width`/`height` say."""
    import datasets

    cols: dict[str, Any] = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
    for ext in image_extensions:
        cols[ext] = datasets.Image(decode=decode)
    cols["mask.png"] = datasets.Image(decode=decode)
    cols["diff.png"] = datasets.Image(decode=decode)
    cols["json"] = record_features()
    return datasets.Features(cols)


def _open(value: dict | None) -> Any:
    """An undecoded image cell as a PIL image, as stored (no EXIF orientation applied)."""
    from PIL import Image

    if value is None:
        return None
    if value.get("bytes") is not None:
        img = Image.open(io.BytesIO(value["bytes"]))
    else:
        img = Image.open(value["path"])
    img.load()
    return img


def _decode_example(ex: dict[str, Any]) -> dict[str, Any]:
    return {**ex, **{c: _open(ex[c]) for c in _IMAGE_COLUMNS}}


def _decode_batch(batch: dict[str, list]) -> dict[str, list]:
    return {**batch, **{c: [_open(v) for v in batch[c]] for c in _IMAGE_COLUMNS if c in batch}}


_IMAGE_COLUMNS = ("image", "mask", "diff")


def image_extension(tar: str | Path) -> str:
    """The image extension of a shard's samples (each tar holds one), from its first members."""
    with tarfile.open(tar) as tf:
        for member in tf:
            name = member.name.rsplit("/", 1)[-1]
            ext = name.split(".", 1)[1] if "." in name else ""
            if ext and ext not in _AUX:
                return ext
    raise ValueError(f"{tar}: no image member found")


def shard_paths(source: str | Path | Iterable[str | Path], split: str | None = None) -> list[str]:
    """Tar paths from a list of tars, one tar, or a folder (`<folder>/<split>/*.tar`)."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            base = p / split if split and (p / split).is_dir() else p
            tars = sorted(str(t) for t in base.glob("*.tar"))
            if not tars:
                raise FileNotFoundError(f"no .tar files under {base}")
            return tars
        return [str(p)]
    return [str(t) for t in source]


def load_shards(source: str | Path | Iterable[str | Path], split: str = "train",
                streaming: bool = False, cache_dir: str | None = None,
                decode: bool = True) -> Any:
    """The samples of some shards as one `datasets.Dataset` (or `IterableDataset` with
    `streaming`): columns `__key__`, `__url__`, `image` (whatever its format), `mask`,
    `diff` (None unless kept) and `json` (the record, typed). Images and masks are PIL images
    as stored (`decode=False`: `{"bytes", "path"}` cells). Tars are grouped by image format;
    the groups follow each other in the order of their first tar."""
    import datasets

    groups: dict[str, list[str]] = {}
    for tar in shard_paths(source, split):
        groups.setdefault(image_extension(tar), []).append(tar)
    parts = []
    for ext, tars in groups.items():
        ds = datasets.load_dataset("webdataset", data_files={split: tars}, split=split,
                                   features=features([ext], decode=False), streaming=streaming,
                                   cache_dir=cache_dir)
        parts.append(ds.rename_columns({ext: "image", "mask.png": "mask", "diff.png": "diff"}))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not decode:
        return ds
    return ds.map(_decode_example) if streaming else ds.with_transform(_decode_batch)
