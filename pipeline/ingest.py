"""Ingest: every source kind of docs/INTERFACE.md into one manifest, original bytes kept as-is.

The kinds live in `pipeline/sources/` (one reader class per kind); this module lists their
work units, runs them on the executor and gives readers a `Context` that turns bytes into
records. Each item's bytes are stored unchanged in a content-addressed blob store
(`ingest/blobs/<sha[:2]>/<sha256>.<ext>`) and described by a record: sha256, format, width,
height, EXIF orientation, JPEG quality estimate, perceptual hash, license, domain. Files are
read only if they are regular files of at most `ingest.max_bytes`. A file that cannot be
used (zero bytes, truncated, not an image, a decompression bomb, a dangling link, a FIFO or
device, an unreadable path, a mask of the wrong size) becomes a row with a status and a
readable error; the run goes on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import imageio
from pipeline.corpus import load_corpus
from pipeline.dedup import image_hashes
from pipeline.domains import guess_domain
from pipeline.evaluate import benchmark_manifests, benchmark_sources, mark_benchmark
from pipeline.executor import Executor, Resources
from pipeline.params import Params
from pipeline.records import ManifestWriter, Record, content_key, counts, iter_records
from pipeline.sources import Reader, Source, reader_for
from pipeline.stage import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestParams:
    max_pixels: int = 100_000_000  # larger declared canvases are refused (decompression bombs)
    max_bytes: int = 1 << 30  # larger files (and tar members) are rows `too_large`, never read
    hf_rows_per_task: int = 256
    face_min_frac: float = 0.02  # `auto` domain: a face box covering this much of the image

    def __post_init__(self) -> None:
        for key in ("max_pixels", "max_bytes", "hf_rows_per_task"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} {getattr(self, key)}; allowed: an integer >= 1")
        if not 0 < self.face_min_frac < 1:
            raise ValueError(f"face_min_frac {self.face_min_frac}; allowed: 0 < face_min_frac < 1")


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
        rgb = np.asarray(img) if img.mode == "RGB" else imageio.to_rgb(img)
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


# --- safe reading ----------------------------------------------------------------------------

_FILE_TYPES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """An open file descriptor of a regular file, with its stat. Opened non-blocking, so a
    FIFO never hangs; anything that is not a regular file raises IngestError."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if p.is_symlink():
            raise IngestError("dangling_link", f"{p.name}: link to a missing file") from None
        raise IngestError("missing_file", f"{p.name}: no such file") from None
    except OSError as e:
        raise IngestError("unreadable", f"{p.name}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = next((w for test, w in _FILE_TYPES if test(st.st_mode)), "not a regular file")
        raise IngestError("not_a_file", f"{p.name}: {what}; only regular files are read")
    return fd, st


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, else IngestError with a reason."""
    fd, st = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise IngestError("too_large", f"{Path(path).name}: {st.st_size} bytes > ingest.max_bytes={max_bytes}")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise IngestError("unreadable", f"{Path(path).name}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise IngestError("too_large", f"{Path(path).name}: more than ingest.max_bytes={max_bytes} bytes")
    return data


# --- the readers' context -------------------------------------------------------------------


class Context:
    """What readers use to turn items into records (see `pipeline.sources.base.Context`)."""

    def __init__(self, data_dir: str | os.PathLike, params: IngestParams):
        self.data_dir = Path(data_dir)
        self.params = params
        self.max_bytes = params.max_bytes

    def _base(self, source: Source, uri: str, item_id: str | None, local_path: str | None) -> Record:
        return Record(
            key=content_key(source.name, item_id or uri),
            source=source.name,
            kind=source.kind,
            label=source.label,
            domain=None if source.domain == "auto" else source.domain,
            license=source.license,
            uri=uri,
            local_path=local_path,
            generator=source.get("generator"),
            stage="ingest",
        )

    def error(self, source: Source, uri: str, reason: str, message: str, *,
              item_id: str | None = None, local_path: str | None = None) -> Record:
        return self._base(source, uri, item_id, local_path).replace(status=reason, error=message)

    def read_file(self, path: str | os.PathLike) -> bytes:
        return read_regular(path, self.max_bytes)

    def open_stream(self, path: str | os.PathLike):
        """A binary file object of a regular file (for streaming tars), else IngestError."""
        fd, _ = open_regular(path)
        return os.fdopen(fd, "rb")

    def file(self, source: Source, uri: str, path: str | os.PathLike, *, item_id: str | None = None,
             label: str | None = None) -> Record:
        """One file's record, or its error row."""
        try:
            data = self.read_file(path)
        except IngestError as e:
            rec = self.error(source, uri, e.reason, str(e), item_id=item_id, local_path=str(path))
            return rec.replace(label=label) if label else rec
        return self.item(source, uri, data, item_id=item_id, label=label, local_path=str(path))

    def item(self, source: Source, uri: str, data: bytes, *, item_id: str | None = None,
             label: str | None = None, caption: str | None = None,
             local_path: str | None = None) -> Record:
        """Probes `data`, stores it unchanged by content hash, and describes it."""
        rec = self._base(source, uri, item_id, local_path)
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
        return rec.replace(
            sha256=sha,
            source_id=sha if rec.label == "real" else None,
            **image_hashes(rgb),  # phash and the variants dedup searches with
            blob=blob,
            nbytes=len(data),
            domain=domain,
            caption=caption,
            **info,
        )

    def attach_mask(self, rec: Record, mask: np.ndarray) -> Record:
        """A given mask (bool, the image's stored size) stored as a 0/255 PNG."""
        blob = f"ingest/masks/{rec.key}.png"
        imageio.write_bytes(self.data_dir / blob, imageio.encode_mask(mask))
        return rec.replace(mask_blob=blob, mask_source="given", mask_area=float(np.mean(mask)))


# --- the stage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One work unit of one source: what the executor ships to a worker."""

    source: Source
    unit: list[Any]


class _Worker:
    """Reads tasks into record dicts, keeping one reader per source (readers may cache, e.g.
    an opened dataset). Picklable."""

    def __init__(self, data_dir: str, params: IngestParams):
        self.ctx = Context(data_dir, params)
        self.params = params
        self._readers: dict[str, Reader] = {}

    def __call__(self, task: Task) -> list[dict[str, Any]]:
        reader = self._readers.get(task.source.name)
        if reader is None:
            reader = self._readers[task.source.name] = reader_for(task.source, self.params)
        return [r.to_dict() for r in reader.read_unit(task.unit, self.ctx)]


class _Factory:
    def __init__(self, data_dir: str, params: IngestParams):
        self.data_dir, self.params = data_dir, params

    def __call__(self) -> _Worker:
        return _Worker(self.data_dir, self.params)


def list_tasks(sources: list[Source], batch: int, params: IngestParams) -> list[Task]:
    """Every source's work units, listed in the driver (names only, no image read)."""
    tasks = []
    for s in sources:
        reader = reader_for(s, params)
        tasks.extend(Task(s, unit) for unit in reader.units(batch))
    return tasks


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    p: IngestParams = params.ingest
    # outside benchmarks (evaluate.benchmarks): read too, marked status=benchmark, never shipped
    bench = benchmark_sources(params)
    sources = load_corpus([Path(c) for c in inputs["corpus"]] + list(benchmark_manifests(params).values()))
    tasks = list_tasks(sources, params.executor.batch_size, p)
    manifest = Path(out) / "manifest.parquet"
    seen: dict[str, int] = {}
    with ManifestWriter(manifest) as w:
        for rows in executor.map(_Factory(str(params.data), p), tasks, Resources(cpus=1), desc="ingest"):
            for row in rows:
                rec = Record(**row)
                if rec.key in seen:  # the same item listed twice: a row, never a silent drop
                    seen[rec.key] += 1
                    rec = rec.replace(key=content_key(rec.key, seen[rec.key]), status="duplicate_entry",
                                      error=f"the same item as {rec.key} (listed again)",
                                      blob=None, mask_blob=None)
                else:
                    seen[rec.key] = 1
                w.write(mark_benchmark(rec, bench))
    metrics = counts(iter_records(manifest))
    metrics["sources"] = len(sources)
    metrics["errors_by_reason"] = {k: v for k, v in metrics["by_status"].items() if k not in ("ok", "blocklist", "benchmark")}
    metrics["by_source"] = dict(sorted(Counter(r.source for r in iter_records(manifest)).items()))
    for reason, n in metrics["errors_by_reason"].items():
        log.warning("ingest: %d rows %s", n, reason)
    return metrics


STAGE = Stage(
    name="ingest",
    help="read every corpus source into data/ingest (original bytes, records, errors)",
    params=IngestParams,
    run=run,
    reads=("corpus",),
    writes={"ingest": "ingest"},
    uses=("corpus", "evaluate.benchmarks"),
    code=("pipeline/sources", "pipeline/corpus.py", "pipeline/hf.py", "pipeline/domains.py",
          "pipeline/imageio.py", "pipeline/records.py"),
)
