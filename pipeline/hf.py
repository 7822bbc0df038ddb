"""Reading Hugging Face `datasets` from local disk without decoding the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.corpus import Source


def open_dataset(source: Source):
    """`save_to_disk` folders, parquet files (a file, a folder or a glob) and imagefolder
    trees, with the image column cast to undecoded bytes so nothing is re-encoded."""
    import datasets

    path = source.path()
    fmt = source.get("format")
    if fmt == "auto":
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
            path / "state.json"
        ).exists():
            fmt = "save_to_disk"
        elif str(path).endswith(".parquet") or any(path.glob("**/*.parquet")) if path.is_dir() else str(path).endswith(".parquet"):
            fmt = "parquet"
        else:
            fmt = "imagefolder"
    if fmt == "save_to_disk":
        ds = datasets.load_from_disk(str(path))
    elif fmt == "parquet":
        files = [str(p) for p in sorted(path.glob("**/*.parquet"))] if path.is_dir() else str(path)
        ds = datasets.load_dataset("parquet", data_files=files)
    else:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = source.get("split") or ("train" if "train" in ds else sorted(ds)[0])
        if split not in ds:
            raise ValueError(f"split {split!r} not in dataset; available: {', '.join(sorted(ds))}")
        ds = ds[split]
    col = source.get("image_column")
    if col not in ds.column_names:
        raise ValueError(f"image_column {col!r} not in dataset; columns: {', '.join(ds.column_names)}")
    if isinstance(ds.features[col], datasets.Image):
        ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def image_bytes(value: Any, source: Source) -> bytes | None:
    """The original encoded bytes of one image cell: {'bytes', 'path'}, raw bytes, or a path."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            p = Path(value["path"])
            return (p if p.is_absolute() else source.path() / p).read_bytes()
        return None
    if isinstance(value, str):
        p = Path(value)
        return (p if p.is_absolute() else source.path() / p).read_bytes()
    return None
