"""The one record schema: a dataclass and the matching pyarrow schema.

Every stage reads the previous stage's manifest (a parquet file of these records) and writes
a new one; it never edits an upstream file. A failure is a row with a `status` and an
`error`, never a missing row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LABELS = ("real", "tampered", "synthetic")
DOMAINS = ("document", "natural", "face", "aigc")
MASK_SOURCES = ("given", "derived", "full", "none")
SPLITS = ("train", "val", "test", "test_ood")


@dataclass(slots=True)
class Record:
    """One sample. The fields before `uri` are the public surface (docs/INTERFACE.md)."""

    key: str
    source: str
    source_id: str | None = None  # sha256 of the original real item's bytes
    group_id: str | None = None  # near-duplicate group of the source
    label: str = "real"
    domain: str | None = None
    operation: str = "none"
    generator: str | None = None
    generator_version: str | None = None
    model_id: str | None = None
    params: str | None = None  # JSON text
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None  # file extension of the shipped bytes: jpg, png, webp, tif, ...
    sha256: str | None = None
    phash: str | None = None  # 64-bit perceptual hash, 16 hex digits
    mask_area: float | None = None
    mask_source: str = "none"
    mask_iou_requested: float | None = None
    split: str | None = None
    status: str = "ok"
    error: str | None = None
    license: str | None = None
    # --- internal fields (additions are allowed by the interface) ---
    uri: str | None = None  # where the item came from, relative to its source's root: path, tar#member, split#index
    kind: str | None = None  # source kind of the manifest entry
    blob: str | None = None  # image bytes, relative to data_dir
    mask_blob: str | None = None  # final 0/255 PNG mask, relative to data_dir
    requested_mask_blob: str | None = None  # region a generator was asked to change
    precodec_blob: str | None = None  # lossy forgery: pixels before encoding, where changed
    diff_blob: str | None = None  # soft difference map (PNG), when kept
    parent_key: str | None = None  # the real sample a forgery or edited pair came from
    parent_blob: str | None = None  # that sample's bytes, for differencing
    nbytes: int | None = None
    mode: str | None = None  # PIL mode of the stored image
    exif_orientation: int | None = None
    jpeg_quality: int | None = None
    mask_quality: float | None = None
    stage: str | None = None  # stage that last set `status`
    local_path: str | None = None  # full local path of the item (file, tar#member, dataset#index); never shipped
    # --- what stages pass to each other, declared (no free-form JSON) ---
    caption: str | None = None  # text that came with a real image (hf/webdataset sources)
    donor_key: str | None = None  # splice / face swap: the real sample whose pixels were pasted
    duplicate_of: str | None = None  # dedup.keep_duplicates: the group's representative
    duplicate_kind: str | None = None  # exact | near, with duplicate_of
    mask_noise: float | None = None  # masks: noise floor of the difference (levels)
    mask_threshold: float | None = None  # masks: change threshold used (levels)
    mask_changed: float | None = None  # masks: fraction of pixels above the threshold
    mask_leak: float | None = None  # masks: share of the mask outside the requested region
    colour_shift: float | None = None  # masks: global colour shift removed before differencing
    # dedup: canonical, turned and window hashes (`pipeline.dedup.image_hashes`); not shipped
    phash_variants: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def public(self) -> dict[str, Any]:
        """The record as shipped in `<key>.json`."""
        return {name: getattr(self, name) for name in _PUBLIC}

    def replace(self, **changes: Any) -> Record:
        return dataclasses.replace(self, **changes)


_ARROW_TYPES = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
}


def _arrow_type(annotation: str) -> pa.DataType:
    base = annotation.replace(" | None", "").strip()
    return _ARROW_TYPES[base]


SCHEMA = pa.schema(
    [pa.field(f.name, _arrow_type(f.type)) for f in dataclasses.fields(Record)]
)
FIELDS = tuple(f.name for f in dataclasses.fields(Record))
_PRIVATE = ("blob", "mask_blob", "requested_mask_blob", "precodec_blob", "diff_blob",
            "parent_blob", "local_path", "phash_variants")
_PUBLIC = tuple(name for name in FIELDS if name not in _PRIVATE)


def content_key(*parts: object, length: int = 24) -> str:
    """A deterministic key from content: hex, so `[A-Za-z0-9_-]` and no dots."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()[:length]


def to_table(records: Iterable[Record], shipped: bool = False) -> pa.Table:
    """Records as an arrow table; `shipped=True` blanks `local_path` (tables that leave the
    machine with the shards must not carry the local file system layout)."""
    rows = [r.to_dict() for r in records]
    if shipped:
        for row in rows:
            row["local_path"] = None
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class ManifestWriter:
    """Streams records to a parquet file; the file appears under its name only on close."""

    # rows per parquet row group: the footer grows with the number of groups (about 4 kB
    # each), so small groups make a 10^8-row manifest's footer hundreds of MB
    ROW_GROUP = 16384

    def __init__(self, path: str | os.PathLike, batch_size: int = ROW_GROUP,
                 partial: str | os.PathLike | None = None):
        """`partial`: where the rows written so far go when the writer is left by an
        exception (else they are dropped with the temp file)."""
        self.path = Path(path)
        self.partial = Path(partial) if partial is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unique per writer: two processes never share a temp file
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{id(self):x}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, SCHEMA)
        self._buf: list[Record] = []
        self._batch_size = batch_size
        self.count = 0

    def write(self, record: Record) -> None:
        self._buf.append(record)
        self.count += 1
        if len(self._buf) >= self._batch_size:
            self._flush()

    def write_all(self, records: Iterable[Record]) -> None:
        for r in records:
            self.write(r)

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_table(to_table(self._buf))
            self._buf = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                if self.partial is not None:
                    self._flush()
            finally:
                self._writer.close()
            if self.partial is not None:
                os.replace(self._tmp, self.partial)
            self._tmp.unlink(missing_ok=True)


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> int:
    with ManifestWriter(path) as w:
        w.write_all(records)
    return w.count


def iter_records(path: str | os.PathLike, batch_size: int = 2048) -> Iterator[Record]:
    """Streams records from a manifest without loading it whole: one row group at a time
    (`ParquetFile.iter_batches` keeps memory in proportion to the rows read, about 27 bytes
    a row in pyarrow 26, so it does not stream at 10^8 rows)."""
    pf = pq.ParquetFile(path)
    names = set(FIELDS)
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, use_threads=False)
        for batch in table.to_batches(max_chunksize=batch_size):
            for row in batch.to_pylist():
                yield Record(**{k: v for k, v in row.items() if k in names})
        del table


def read_records(path: str | os.PathLike) -> list[Record]:
    return list(iter_records(path))


def counts(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    """Counts by status, domain, operation and generator, as every stage's metrics carry."""
    by: dict[str, Counter] = {k: Counter() for k in ("status", "domain", "operation", "generator", "label", "split")}
    total = 0
    for r in records:
        total += 1
        for k, c in by.items():
            c[str(getattr(r, k))] += 1
    out: dict[str, Any] = {"total": total}
    out.update({f"by_{k}": dict(sorted(c.items())) for k, c in by.items()})
    return out


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, so equal inputs give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)

