"""`forensic`: existing tampering datasets with masks.

Two layouts:
- an IMDL-BenCo JSON file: `[[image, mask or "Negative"], ...]`, paths absolute or relative
  to the JSON's folder;
- a folder with `Tp/` (tampered images), `Gt/` (their masks, matched by name with an
  optional `_gt`, `_mask`, `-gt` or `-mask` suffix) and/or `Au/` (authentic images).

Tampered rows get `operation` from the source (`unknown` by default: the dataset does not
say how each image was made), never `none`. A given mask marks as tampered every pixel
whose value (largest colour channel, 0-255) is above `mask_threshold` (0: any nonzero
pixel, so red, 0/1 and grey masks all count); a dataset with noisy JPEG masks declares a
higher threshold. A tampered image whose mask is empty is an `empty_mask` row, never
shipped. Masks are kept in the image's stored-pixel orientation: a mask whose size only
matches the image after its EXIF orientation is applied (drawn on the displayed image) is
turned back. Every bad entry, missing mask or unexpected layout is a row with its reason.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.executor import chunked
from pipeline.records import Record
from pipeline.sources.base import Context, Failure, Reader, nonempty
from pipeline.sources.files import FileEntry, relative_uri, root_problem, walk

_MASK_SUFFIXES = ("_gt", "_mask", "-gt", "-mask")
# PIL transpose that undoes `ImageOps.exif_transpose` for each EXIF orientation
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class ForensicOptions:
    path: str
    format: Literal["auto", "imdl_json", "tp_gt"] = "auto"
    operation: str = "unknown"  # what the dataset says its tampered images are, if one thing
    mask_threshold: int = 0  # a mask pixel above this value is tampered
    follow_external_links: bool = False

    def __post_init__(self) -> None:
        nonempty("path", self.path)
        nonempty("operation", self.operation)
        if self.operation == "none":
            raise ValueError("operation 'none' is for real images; tampered images need an "
                             "operation such as unknown, splice or copy_move")
        if not 0 <= self.mask_threshold <= 254:
            raise ValueError(f"mask_threshold {self.mask_threshold}; allowed: 0 to 254")


@dataclass(frozen=True)
class ForensicEntry:
    uri: str
    path: str
    label: str  # real | tampered
    mask: str | None = None  # full path of the given mask
    item_id: str | None = None


class MaskSizeError(ValueError):
    """A given mask whose size fits neither the image nor its EXIF-rotated view."""


def decode_given_mask(data: bytes, threshold: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Bool H x W: True where the largest colour channel is above `threshold` (transparent
    pixels are outside). `size` (w, h), when given, is checked before the pixels are
    decoded."""
    with Image.open(io.BytesIO(data)) as img:
        if size is not None and img.size not in (size, size[::-1]):
            raise MaskSizeError(f"mask is {img.size[0]}x{img.size[1]}")
        img.load()
        if img.mode == "1":
            return np.asarray(img, dtype=bool)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.nan_to_num(np.asarray(img, dtype=np.float64))
            scale = 257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
            return a > threshold * scale
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA"))
            return (rgba[..., :3].max(axis=2) > threshold) & (rgba[..., 3] > 0)
        if img.mode == "L":
            return np.asarray(img) > threshold
        return np.asarray(img.convert("RGB")).max(axis=2) > threshold


def _layout_failure(root: Path) -> Failure:
    try:
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))[:10]
    except OSError:
        found = []
    return Failure(
        ".", "bad_layout",
        f"{root.name}: expected Tp/ (tampered images) with Gt/ (their masks), and/or Au/ "
        f"(authentic images), or an IMDL-BenCo JSON file; found "
        + (", ".join(found) if found else "an empty folder"),
        local_path=str(root),
    )


class Forensic(Reader):
    kind = "forensic"
    Options = ForensicOptions

    def units(self, batch: int) -> Iterator[list[Any]]:
        root = self.source.path()
        fmt = self.options.format
        if not root.exists():
            entries = [root_problem(root)]
        elif fmt == "imdl_json" or (fmt == "auto" and not root.is_dir()):
            entries = self._imdl(root)
        elif not root.is_dir():
            entries = [Failure(".", "not_a_directory", f"format tp_gt needs a folder, got {root}",
                               local_path=str(root))]
        else:
            entries = self._tp_gt(root)
        yield from chunked(entries, batch)

    def _imdl(self, path: Path) -> list[ForensicEntry | Failure]:
        if path.is_dir():
            return [Failure(".", "not_a_file", f"format imdl_json needs a JSON file, got folder {path}",
                            local_path=str(path))]
        name = path.name
        try:
            from pipeline.ingest import read_regular

            entries = json.loads(read_regular(path, 1 << 30))
        except Exception as e:  # noqa: BLE001 - not JSON, unreadable, not a file: one row
            reason = getattr(e, "reason", "bad_listing")
            return [Failure(name, reason, f"{name}: cannot read an IMDL-BenCo JSON list: {e}",
                            local_path=str(path))]
        if not isinstance(entries, list):
            return [Failure(name, "bad_listing",
                            f"{name}: an IMDL-BenCo JSON is a list of [image, mask or \"Negative\"], "
                            f"got {type(entries).__name__}", local_path=str(path))]
        out: list[ForensicEntry | Failure] = []
        folder = path.parent
        for i, e in enumerate(entries):
            where = f"{name}[{i}]"
            if (not isinstance(e, list) or len(e) != 2
                    or not all(isinstance(v, str) and v for v in e)):
                out.append(Failure(where, "bad_entry",
                                   f"{where}: expected [image path, mask path or \"Negative\"], "
                                   f"got {json.dumps(e)[:200]}", item_id=where))
                continue
            img, mask = e
            ip = Path(img) if Path(img).is_absolute() else folder / img
            uri = relative_uri(ip, folder)
            item_id = None if uri == img else img  # a path outside the folder keys by what it says
            if mask == "Negative":
                out.append(ForensicEntry(uri, str(ip), "real", item_id=item_id))
            else:
                mp = Path(mask) if Path(mask).is_absolute() else folder / mask
                out.append(ForensicEntry(uri, str(ip), "tampered", str(mp), item_id=item_id))
        return out

    def _tp_gt(self, root: Path) -> list[ForensicEntry | Failure]:
        tp, gt, au = root / "Tp", root / "Gt", root / "Au"
        if not tp.is_dir() and not au.is_dir():
            return [_layout_failure(root)]
        follow = self.options.follow_external_links
        out: list[ForensicEntry | Failure] = []

        def listed(folder: Path) -> Iterator[FileEntry]:
            for e in walk(folder, follow_external_links=follow):
                if isinstance(e, Failure):
                    out.append(Failure(f"{folder.name}/{e.uri}", e.reason, f"{folder.name}/{e.message}",
                                       local_path=e.local_path))
                else:
                    yield e

        masks: dict[str, FileEntry] = {}
        if gt.is_dir():
            for m in listed(gt):
                stem, _ = os.path.splitext(m.uri)
                for suffix in _MASK_SUFFIXES:
                    if stem.lower().endswith(suffix):
                        stem = stem[: -len(suffix)]
                        break
                masks.setdefault(stem, m)
        used = set()
        if tp.is_dir():
            for p in listed(tp):
                stem = os.path.splitext(p.uri)[0]
                m = masks.get(stem)
                if m is not None:
                    used.add(m.uri)
                out.append(ForensicEntry(f"Tp/{p.uri}", p.path, "tampered", m.path if m else None))
        for m in masks.values():
            if m.uri not in used:
                out.append(Failure(f"Gt/{m.uri}", "orphan_mask",
                                   f"Gt/{m.uri}: mask without a tampered image of that name in Tp/",
                                   local_path=m.path))
        if au.is_dir():
            for p in listed(au):
                out.append(ForensicEntry(f"Au/{p.uri}", p.path, "real"))
        return sorted(out, key=lambda e: e.uri.encode("utf-8", "surrogateescape"))

    def read_unit(self, unit: list[Any], ctx: Context) -> Iterator[Record]:
        for rec in super().read_unit(unit, ctx):
            if rec.label == "tampered" and rec.operation == "none":  # listing rows too
                rec = rec.replace(operation=self.options.operation)
            yield rec

    def read(self, entry: ForensicEntry, ctx: Context) -> Iterator[Record]:
        rec = ctx.file(self.source, entry.uri, entry.path, item_id=entry.item_id, label=entry.label)
        if entry.label == "real":
            yield rec.replace(operation="none", mask_source="none",
                              mask_area=0.0 if rec.status == "ok" else None)
            return
        rec = rec.replace(operation=self.options.operation)
        if rec.status != "ok":
            yield rec
            return
        yield self._with_mask(rec, entry, ctx)

    def _with_mask(self, rec: Record, entry: ForensicEntry, ctx: Context) -> Record:
        from pipeline.ingest import IngestError

        if not entry.mask:
            return rec.replace(status="missing_mask", error="tampered image without a mask file")
        try:
            data = ctx.read_file(entry.mask)
        except IngestError as e:
            return rec.replace(status="missing_mask", error=f"mask {Path(entry.mask).name}: {e}")
        w, h = rec.width, rec.height
        try:
            mask = decode_given_mask(data, self.options.mask_threshold, (w, h))
        except MaskSizeError as e:
            return rec.replace(status="mask_size_mismatch", error=f"{e}, image is {w}x{h}")
        except Exception as e:  # noqa: BLE001 - any decoder failure is this row's reason
            return rec.replace(status="bad_mask", error=f"mask {Path(entry.mask).name}: cannot decode: {e}")
        if mask.shape != (h, w):
            undo = _UNDO_ORIENTATION.get(rec.exif_orientation or 1)
            if undo is None or mask.shape != (w, h):
                return rec.replace(
                    status="mask_size_mismatch",
                    error=f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {w}x{h}")
            # drawn on the displayed (EXIF-rotated) image: back to stored pixels
            mask = np.asarray(Image.fromarray(mask).transpose(undo), dtype=bool)
        if not mask.any():
            t = self.options.mask_threshold
            return rec.replace(status="empty_mask",
                               error=f"given mask has no pixel above {t} (mask_threshold); a "
                                     "tampered image needs a nonzero mask")
        return ctx.attach_mask(rec, mask)
