"""Ingest: every source kind of INTERFACE.md into one manifest, original bytes kept as-is.

Each item's bytes are stored unchanged in a content-addressed blob store
(`ingest/blobs/<sha[:2]>/<sha256>.<ext>`) and described by a record: sha256, format, width,
height, EXIF orientation, JPEG quality estimate, perceptual hash, license, domain. A file
that cannot be used (zero bytes, truncated, not an image, a decompression bomb, a dangling
link, an unreadable path, a mask of the wrong size) becomes a row with a status and a
readable error; the run goes on.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import imageio
from pipeline.corpus import Source, load_corpus
from pipeline.domains import guess_domain
from pipeline.executor import Executor, Resources, chunked
from pipeline.params import Params
from pipeline.records import ManifestWriter, Record, content_key, counts, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestParams:
    max_pixels: int = 100_000_000  # larger declared canvases are refused (decompression bombs)
    hf_rows_per_task: int = 256
    face_min_frac: float = 0.01  # `auto` domain: a face box covering this much of the image


class IngestError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --- probing -------------------------------------------------------------------------------

_STD_LUMA_Q = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64)  # fmt: skip


def jpeg_quality(img: Image.Image) -> int | None:
    """IJG quality that best explains the luminance quantization table (None if not JPEG)."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    q = np.asarray(tables[0], dtype=np.float64)
    if q.size != 64:
        return None
    # quality -> table is monotone; pick the quality whose scaled table is closest
    best, best_err = None, np.inf
    for quality in range(1, 101):
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        t = np.clip(np.floor((_STD_LUMA_Q * scale + 50) / 100), 1, 255)
        err = float(np.abs(np.sort(t) - np.sort(q)).sum())
        if err < best_err:
            best, best_err = quality, err
    return best


def probe(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Decodes and checks one image; raises IngestError with a reason for a bad one."""
    if not data:
        raise IngestError("zero_bytes", "file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise IngestError("not_an_image", "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise IngestError("too_many_pixels", f"{e} (ingest.max_pixels={max_pixels})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad item, not a crash
        raise IngestError("corrupt", f"cannot open image: {e}") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise IngestError(
                "too_many_pixels",
                f"declared canvas {w}x{h} = {w * h} pixels exceeds ingest.max_pixels={max_pixels}",
            )
        if w < 1 or h < 1:
            raise IngestError("corrupt", f"invalid size {w}x{h}")
        fmt = img.format or "UNKNOWN"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
        except OSError as e:
            reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
            raise IngestError(reason, f"cannot decode: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise IngestError("corrupt", f"cannot decode: {e}") from None
        rgb = imageio.to_rgb(img)
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a broken EXIF block does not spoil the pixels
            orientation = None
        return {
            "width": w,
            "height": h,
            "format": imageio.FORMAT_EXT.get(fmt, fmt.lower()),
            "mode": img.mode,
            "exif_orientation": int(orientation) if orientation else None,
            "jpeg_quality": jpeg_quality(img) if fmt in ("JPEG", "MPO") else None,
            "rgb": rgb,
        }


# --- one item -> records --------------------------------------------------------------------


class _Worker:
    """Turns one task (a list of items of one source) into record dicts. Picklable."""

    def __init__(self, data_dir: str, params: IngestParams):
        self.data_dir = Path(data_dir)
        self.params = params
        self._hf_cache: dict[str, Any] = {}

    def __call__(self, task: tuple[str, Source, Any]) -> list[dict[str, Any]]:
        what, source, payload = task
        out: list[Record] = []
        if what == "files":
            for item in payload:
                out.extend(self._file_item(source, item))
        elif what == "hf":
            out.extend(self._hf_rows(source, *payload))
        elif what == "wds":
            out.extend(self._wds_tar(source, payload))
        elif what == "error":
            out.append(self._error(source, payload["uri"], payload["reason"], payload["error"]))
        return [r.to_dict() for r in out]

    # records
    def _base(self, source: Source, uri: str, item_id: str | None = None) -> Record:
        return Record(
            key=content_key(source.name, item_id or uri),
            source=source.name,
            kind=source.kind,
            label=source.label,
            domain=None if source.domain == "auto" else source.domain,
            license=source.license,
            uri=uri,
            generator=source.get("generator"),
            stage="ingest",
        )

    def _error(self, source: Source, uri: str, reason: str, error: str, item_id: str | None = None) -> Record:
        return self._base(source, uri, item_id).replace(status=reason, error=error)

    def _from_bytes(self, source: Source, uri: str, data: bytes, item_id: str | None = None,
                    label: str | None = None, caption: str | None = None) -> Record:
        rec = self._base(source, uri, item_id)
        if label:
            rec.label = label
        try:
            info = probe(data, self.params.max_pixels)
        except IngestError as e:
            return rec.replace(status=e.reason, error=str(e), nbytes=len(data))
        sha = hashlib.sha256(data).hexdigest()
        rgb = info.pop("rgb")
        blob = f"ingest/blobs/{sha[:2]}/{sha}.{info['format']}"
        path = self.data_dir / blob
        if not path.exists():
            imageio.write_bytes(path, data)
        domain = rec.domain
        if domain is None:
            domain = "aigc" if rec.label == "synthetic" else guess_domain(rgb, self.params.face_min_frac)
        rec = rec.replace(
            sha256=sha,
            source_id=sha if rec.label == "real" else None,
            phash=str(imagehash.phash(Image.fromarray(rgb))),
            blob=blob,
            nbytes=len(data),
            domain=domain,
            caption=caption,
            **info,
        )
        if source.kind == "blocklist":
            rec = rec.replace(status="blocklist", error="blocklisted source: never shipped")
        return rec

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            reason = "dangling_link" if path.is_symlink() else "missing_file"
            raise IngestError(reason, f"{path}: no such file" + (" (dangling link)" if path.is_symlink() else "")) from None
        except IsADirectoryError:
            raise IngestError("unreadable", f"{path}: is a directory") from None
        except OSError as e:
            raise IngestError("unreadable", f"{path}: {e.strerror or e}") from None

    def _file_item(self, source: Source, item: dict[str, Any]) -> list[Record]:
        uri = item["uri"]
        if source.kind == "pairs":
            return self._pair(source, item)
        try:
            data = self._read(Path(item["path"]))
        except IngestError as e:
            return [self._error(source, uri, e.reason, str(e))]
        rec = self._from_bytes(source, uri, data, label=item.get("label"))
        if source.kind == "forensic" and rec.status == "ok":
            rec = self._attach_mask(rec, item)
        return [rec]

    def _attach_mask(self, rec: Record, item: dict[str, Any]) -> Record:
        if rec.label == "real":
            return rec.replace(mask_source="none", mask_area=0.0)
        mpath = item.get("mask")
        if not mpath:
            return rec.replace(status="missing_mask", error="tampered image without a mask file")
        try:
            mask = imageio.decode_mask(self._read(Path(mpath)))
        except IngestError as e:
            return rec.replace(status="missing_mask", error=str(e))
        except Exception as e:  # noqa: BLE001
            return rec.replace(status="bad_mask", error=f"{mpath}: cannot decode mask: {e}")
        if mask.shape != (rec.height, rec.width):
            return rec.replace(
                status="mask_size_mismatch",
                error=f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {rec.width}x{rec.height}",
            )
        blob = f"ingest/masks/{rec.key}.png"
        imageio.write_bytes(self.data_dir / blob, imageio.encode_mask(mask))
        return rec.replace(mask_blob=blob, mask_source="given", mask_area=float(mask.mean()))

    def _pair(self, source: Source, item: dict[str, Any]) -> list[Record]:
        uri = item["uri"]
        recs = []
        for side in ("original", "edited"):
            side_uri = f"{uri}#{side}"
            try:
                data = self._read(Path(item[side]))
                rec = self._from_bytes(source, item[f"{side}_uri"], data, item_id=side_uri,
                                       label="real" if side == "original" else "tampered")
            except IngestError as e:
                rec = self._error(source, item[f"{side}_uri"], e.reason, str(e), item_id=side_uri)
            recs.append(rec)
        orig, edited = recs
        edited = edited.replace(parent_key=orig.key, parent_blob=orig.blob, source_id=orig.sha256,
                                operation="edit", mask_source="derived")
        if edited.status == "ok" and orig.status != "ok":
            edited = edited.replace(status="missing_original", error=f"original unusable: {orig.error}")
        return [orig, edited]

    def _hf_rows(self, source: Source, start: int, stop: int) -> list[Record]:
        from pipeline import hf

        ds = self._hf_cache.get(source.name)
        if ds is None:
            ds = self._hf_cache[source.name] = hf.open_dataset(source)
        out = []
        for i, row in enumerate(ds.select(range(start, stop)), start):
            uri = f"{source.options['path']}#{i}"
            image = row.get(source.get("image_column"))
            data = hf.image_bytes(image, source)
            if data is None:
                out.append(self._error(source, uri, "not_an_image", f"row {i}: no image in column {source.get('image_column')!r}"))
                continue
            caption = row.get(source.get("caption_column")) if source.get("caption_column") else None
            out.append(self._from_bytes(source, uri, data, caption=caption))
        return out

    def _wds_tar(self, source: Source, tar: str) -> list[Record]:
        import webdataset as wds

        out = []
        keys = [k.lower() for k in source.get("image_keys")]
        try:
            for sample in wds.WebDataset(tar, shardshuffle=False, empty_check=False):
                uri = f"{tar}#{sample['__key__']}"
                ext = next((k for k in keys if k in sample), None)
                if ext is None:
                    out.append(self._error(source, uri, "not_an_image", f"sample has none of {keys}"))
                    continue
                caption = None
                ck = source.get("caption_key")
                if ck and ck in sample:
                    caption = sample[ck].decode("utf-8", "replace") if isinstance(sample[ck], bytes) else str(sample[ck])
                out.append(self._from_bytes(source, uri, sample[ext], caption=caption))
        except Exception as e:  # noqa: BLE001 - a broken tar is a recorded error, the rest goes on
            out.append(self._error(source, tar, "bad_tar", f"cannot read tar: {e}", item_id=f"{tar}#error"))
        return out


# --- listing sources -> tasks ------------------------------------------------------------------


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return str(path)


def package_sample_path(item: str) -> Path:
    """`skimage:page.png`, `matplotlib:grace_hopper.jpg`, `sklearn:china.jpg` -> a file."""
    pkg, name = item.split(":", 1)
    if pkg == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data" / name
    if pkg == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name
    if pkg == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / name
    raise ValueError(f"package_samples: unknown package {pkg!r}; allowed: skimage, matplotlib, sklearn")


def _walk(root: Path, recursive: bool, extensions: list[str] | None) -> list[Path]:
    exts = {e.lower().lstrip(".") for e in extensions} if extensions else None
    files = []
    it = root.rglob("*") if recursive else root.glob("*")
    for p in it:
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.is_dir():
            continue
        if exts and p.suffix.lower().lstrip(".") not in exts:
            continue
        files.append(p)
    return sorted(files, key=lambda p: str(p).encode("utf-8", "surrogateescape"))


def _missing(source: Source, path: Path) -> list[tuple[str, Source, Any]]:
    return [("error", source, {"uri": str(path), "reason": "missing_path", "error": f"{path}: does not exist"})]


def list_tasks(source: Source, batch: int, hf_rows: int) -> list[tuple[str, Source, Any]]:
    kind = source.kind
    base = Path(source.base_dir)
    if kind == "package_samples":
        items = []
        for it in source.get("items"):
            try:
                items.append({"uri": it, "path": str(package_sample_path(it))})
            except ValueError as e:
                return [("error", source, {"uri": it, "reason": "missing_path", "error": str(e)})]
        return [("files", source, c) for c in chunked(items, batch)]
    if kind in ("image_folder", "blocklist"):
        root = source.path()
        if not root.is_dir():
            return _missing(source, root)
        files = _walk(root, source.get("recursive"), source.get("extensions"))
        items = [{"uri": _rel(p, base), "path": str(p)} for p in files]
        return [("files", source, c) for c in chunked(items, batch)]
    if kind == "forensic":
        root = source.path()
        if not root.exists():
            return _missing(source, root)
        items = _forensic_items(source, root, base)
        return [("files", source, c) for c in chunked(items, batch)]
    if kind == "pairs":
        path = source.path()
        if not path.is_file():
            return _missing(source, path)
        items = _pair_items(source, path, base)
        return [("files", source, c) for c in chunked(items, batch)]
    if kind == "webdataset":
        pattern = str(source.path())
        tars = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else _brace(pattern)
        if not tars:
            return _missing(source, Path(pattern))
        return [("wds", source, t) for t in tars]
    if kind == "hf_dataset":
        from pipeline import hf

        try:
            n = len(hf.open_dataset(source))
        except Exception as e:  # noqa: BLE001
            return [("error", source, {"uri": str(source.path()), "reason": "bad_dataset", "error": f"cannot open dataset: {e}"})]
        return [("hf", source, (i, min(i + hf_rows, n))) for i in range(0, n, hf_rows)]
    raise ValueError(f"unknown source kind {kind!r}")


def _brace(pattern: str) -> list[str]:
    import braceexpand

    return [p for p in braceexpand.braceexpand(pattern) if Path(p).exists()] or []


def _forensic_items(source: Source, root: Path, base: Path) -> list[dict[str, Any]]:
    fmt = source.get("format")
    if fmt == "imdl_json" or (fmt == "auto" and root.is_file()):
        entries = json.loads(root.read_text())
        if not isinstance(entries, list):
            raise ValueError(f"{root}: an IMDL-BenCo JSON is a list of [image, mask or 'Negative']")
        items = []
        for e in entries:
            img, mask = e[0], e[1] if len(e) > 1 else "Negative"
            ip = Path(img) if Path(img).is_absolute() else root.parent / img
            item = {"uri": _rel(ip, base), "path": str(ip)}
            if mask == "Negative":
                item["label"] = "real"
            else:
                item["label"] = "tampered"
                item["mask"] = str(Path(mask) if Path(mask).is_absolute() else root.parent / mask)
            items.append(item)
        return items
    tp, gt = root / "Tp", root / "Gt"
    au = root / "Au"
    items = []
    masks = {}
    if gt.is_dir():
        for m in _walk(gt, True, None):
            stem = m.stem
            for suffix in ("_gt", "_mask", "-gt", "-mask"):
                if stem.lower().endswith(suffix):
                    stem = stem[: -len(suffix)]
                    break
            masks.setdefault(str(m.relative_to(gt).parent / stem), m)
    if tp.is_dir():
        for p in _walk(tp, True, None):
            m = masks.get(str(p.relative_to(tp).parent / p.stem))
            items.append({"uri": _rel(p, base), "path": str(p), "label": "tampered", "mask": str(m) if m else None})
    if au.is_dir():
        for p in _walk(au, True, None):
            items.append({"uri": _rel(p, base), "path": str(p), "label": "real"})
    return items


def _pair_items(source: Source, path: Path, base: Path) -> list[dict[str, Any]]:
    oc, ec = source.get("original_column"), source.get("edited_column")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    items = []
    for i, row in enumerate(rows):
        if oc not in row or ec not in row:
            raise ValueError(f"{path}: row {i} lacks column {oc!r} or {ec!r}")
        o, e = (Path(row[c]) if Path(row[c]).is_absolute() else path.parent / row[c] for c in (oc, ec))
        items.append({
            "uri": f"{_rel(path, base)}:{i}",
            "original": str(o), "edited": str(e),
            "original_uri": _rel(o, base), "edited_uri": _rel(e, base),
        })
    return items


# --- the stage ---------------------------------------------------------------------------------


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    p: IngestParams = params.ingest
    sources = load_corpus([Path(c) for c in inputs["corpus"]])
    tasks = []
    for s in sources:
        tasks.extend(list_tasks(s, params.executor.batch_size, p.hf_rows_per_task))
    worker = _Factory(str(params.data), p)
    manifest = Path(out) / "manifest.parquet"
    seen: set[str] = set()
    with ManifestWriter(manifest) as w:
        for rows in executor.map(worker, tasks, Resources(cpus=1), desc="ingest"):
            for row in rows:
                rec = Record(**row)
                if rec.key in seen:  # the same item listed twice (e.g. two tasks): keep one
                    continue
                seen.add(rec.key)
                w.write(rec)
    metrics = counts(iter_records(manifest))
    metrics["sources"] = len(sources)
    metrics["errors_by_reason"] = {k: v for k, v in metrics["by_status"].items() if k not in ("ok", "blocklist")}
    metrics["by_source"] = dict(sorted(Counter(r.source for r in iter_records(manifest)).items()))
    return metrics


class _Factory:
    def __init__(self, data_dir: str, params: IngestParams):
        self.data_dir, self.params = data_dir, params

    def __call__(self) -> _Worker:
        return _Worker(self.data_dir, self.params)


STAGE = Stage(
    name="ingest",
    help="read every corpus source into data/ingest (original bytes, records, errors)",
    params=IngestParams,
    run=run,
    reads=("corpus",),
    writes={"ingest": "ingest"},
    uses=("corpus",),
    code=("pipeline/corpus.py", "pipeline/hf.py", "pipeline/domains.py", "pipeline/imageio.py",
          "pipeline/records.py"),
)
