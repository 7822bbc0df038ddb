"""Reading Hugging Face `datasets` from local disk without decoding the images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.sources.base import Source


def open_dataset(source: Source) -> tuple[Any, str]:
    """(dataset, split name) of a `save_to_disk` folder, parquet files (a file, a folder or a
    glob) or an imagefolder tree, with the image column cast to undecoded bytes so nothing is
    re-encoded."""
    import datasets

    path = source.path()
    fmt = source.get("format")
    if fmt == "auto":
        if any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            fmt = "save_to_disk"
        elif str(path).endswith(".parquet") or (path.is_dir() and any(path.glob("**/*.parquet"))):
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
    split = ""
    if isinstance(ds, datasets.DatasetDict):
        split = source.get("split") or ("train" if "train" in ds else min(ds))
        if split not in ds:
            raise ValueError(f"split {split!r} not in dataset; available: {', '.join(sorted(ds))}")
        ds = ds[split]
    else:
        split = str(ds.split) if ds.split is not None else (source.get("split") or "")
    col = source.get("image_column")
    if col not in ds.column_names:
        raise ValueError(f"image_column {col!r} not in dataset; columns: {', '.join(ds.column_names)}")
    if isinstance(ds.features[col], datasets.Image):
        ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds, split


def image_bytes(value: Any, base: Path, read: Callable[[Path], bytes]) -> bytes | None:
    """The original encoded bytes of one image cell: {'bytes', 'path'}, raw bytes, or a path
    (relative paths resolve against the dataset folder). Files are read with `read`, which
    raises for a missing or unsafe file; None when the cell holds no image."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, str) and value:
        p = Path(value)
        return read(p if p.is_absolute() else base / p)
    return None
