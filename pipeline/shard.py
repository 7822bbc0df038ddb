"""Resolution-preserving WebDataset shards, byte-identical for the same inputs, resumable.

Per split: `<split>-NNNNNN.tar` holding `<key>.<ext>` (a real image's original bytes),
`<key>.mask.png` (0/255, exactly H x W) and `<key>.json` (the record), plus a parquet index
per tar and `<split>-NNNNNN_stats.json`, written last: a shard with its stats file is
complete. Samples are ordered by (member layout, key) and cut into shards by count, bytes
and layout (one image format per tar, so `datasets` can read it), so the plan is
a pure function of the manifest; a rerun skips complete shards whose key list matches and
rewrites the rest under temporary names, so a killed run loses and duplicates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from pipeline import imageio
from pipeline.executor import Executor, Resources
from pipeline.params import ExecutorParams, Params
from pipeline.records import (
    SPLITS,
    ManifestWriter,
    Record,
    counts,
    dumps_json,
    iter_records,
    to_table,
)
from pipeline.stage import Stage

log = logging.getLogger(__name__)

TAR_MTIME = 0  # fixed member mtime: byte-identical tars
_COPY_BUFFER = 1 << 20



@dataclass(frozen=True)
class ShardParams:
    max_count: int = 1000  # samples per tar
    max_bytes: int = 1 << 30  # bytes of image data per tar (a sample is never split)

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError("shard.max_count and shard.max_bytes must be >= 1")


def full_mask(record: Record, value: int) -> bytes:
    return _constant_mask(record.height, record.width, value)


@lru_cache(maxsize=256)
def _constant_mask(height: int, width: int, value: int) -> bytes:
    """All-0 (real) and all-255 (synthetic) masks repeat across a corpus: encode each size once."""
    return imageio.encode_mask(np.full((height, width), value, np.uint8))


def sample_members(record: Record, data_dir: Path, record_json: bytes | None = None) -> dict[str, bytes]:
    """The tar members of one sample: image bytes as stored, mask, record JSON (+ diff map)."""
    image = (data_dir / record.blob).read_bytes()
    if record.mask_blob:
        mask = (data_dir / record.mask_blob).read_bytes()
    elif record.label == "synthetic":
        mask = full_mask(record, 255)
    elif record.label == "real":
        mask = full_mask(record, 0)
    else:
        raise ValueError(f"{record.key}: tampered sample without a mask")
    mask = imageio.tag_orientation(mask, record.exif_orientation)  # rotates with its image
    members = {
        "__key__": record.key,
        record.format: image,
        "mask.png": mask,
        "json": record_json if record_json is not None else _record_json(record),
    }
    if record.diff_blob:
        members["diff.png"] = imageio.tag_orientation((data_dir / record.diff_blob).read_bytes(),
                                                      record.exif_orientation)
    return members


def _record_json(record: Record) -> bytes:
    return dumps_json(record.public()).encode("utf-8")


def member_layout(r: Record) -> tuple[str, bool]:
    """What members a sample has: its image extension, and whether a diff map ships."""
    return (r.format or "", r.diff_blob is not None)


def sample_keys(r: Record) -> list[str]:
    return [r.format, "mask.png", "json"] + (["diff.png"] if r.diff_blob else [])


def plan_shards(records: list[Record], max_count: int, max_bytes: int) -> list[list[Record]]:
    """Cuts records into shards by count and by image bytes, ordered by (layout, key).

    A shard never mixes member layouts (a `jpg` sample and a `png` one), because readers
    such as `datasets.load_dataset("webdataset")` require every sample of a tar to have the
    same members.
    """
    shards: list[list[Record]] = []
    cur: list[Record] = []
    size = 0
    for r in sorted(records, key=lambda r: (member_layout(r), r.key)):
        n = r.nbytes or 0
        if cur and (len(cur) >= max_count or size + n > max_bytes or member_layout(cur[0]) != member_layout(r)):
            shards.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    if cur:
        shards.append(cur)
    return shards


def _digest(records_json: list[bytes]) -> str:
    h = hashlib.sha256()
    for j in records_json:
        h.update(j)
        h.update(b"\n")
    return h.hexdigest()


class _ShardWriter:
    """Writes one shard; picklable so the executor can run it on any worker."""

    def __init__(self, data_dir: str):
        self.data_dir = Path(data_dir)

    def __call__(self, job: tuple[str, str, list[Record]]) -> dict[str, Any]:
        out_dir, name, records = job
        return write_shard(records, self.data_dir, Path(out_dir), name)


def write_shard(records: list[Record], data_dir: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Writes `name.tar`, `name.parquet`, then `name_stats.json`; skips a complete match."""
    tar, index, stats_path = out_dir / f"{name}.tar", out_dir / f"{name}.parquet", out_dir / f"{name}_stats.json"
    records_json = [_record_json(r) for r in records]
    digest = _digest(records_json)
    if stats_path.exists():
        try:
            old = json.loads(stats_path.read_text())
            if old.get("digest") == digest and tar.exists() and index.exists():
                return {**old, "skipped": True}
        except (OSError, ValueError):
            pass
        stats_path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.tar.{os.getpid()}.tmp"
    nbytes = 0
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user="", group="") as w:
        # webdataset opens the tar in stream mode ("w|"), whose Python layer re-buffers every
        # write; a regular file needs none of that. The same writer over a plain-mode
        # TarFile writes the same bytes (tested), members copied in one piece each.
        w.tarstream.fileobj.close()  # the unused stream layer: nothing buffered, nothing written
        w.tarstream = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT,
                                   copybufsize=_COPY_BUFFER)
        for r, j in zip(records, records_json):
            nbytes += w.write(sample_members(r, data_dir, j))
    os.replace(tmp, tar)
    tmp_index = out_dir / f".{name}.parquet.{os.getpid()}.tmp"
    pq.write_table(to_table(records, shipped=True), tmp_index)
    os.replace(tmp_index, index)
    stats = {
        "shard": tar.name,
        "count": len(records),
        "bytes": nbytes,
        "tar_bytes": tar.stat().st_size,
        "digest": digest,
        "format": records[0].format if records else None,
        "members": sorted(k for k in sample_keys(records[0])) if records else [],
        "by_label": dict(sorted(Counter(r.label for r in records).items())),
        "by_domain": dict(sorted(Counter(str(r.domain) for r in records).items())),
        "by_operation": dict(sorted(Counter(r.operation for r in records).items())),
    }
    imageio.write_bytes(stats_path, json.dumps(stats, indent=1, sort_keys=True).encode())
    return {**stats, "skipped": False}


def write_shard_set(
    records: Iterable[Record],
    data_dir: Path,
    out_dir: Path,
    prefix: str,
    max_count: int,
    max_bytes: int,
    executor: Executor | None = None,
) -> list[Path]:
    """Writes `<out_dir>/<prefix>-NNNNNN.{tar,parquet,_stats.json}`; returns the tar paths.

    Files of this prefix that are not in the plan (left by an earlier, larger run) go.
    """
    out_dir = Path(out_dir)
    plan = plan_shards(list(records), max_count, max_bytes)
    names = [f"{prefix}-{i:06d}" for i in range(len(plan))]
    jobs = [(str(out_dir), n, shard) for n, shard in zip(names, plan)]
    executor = executor or Executor(ExecutorParams(backend="local", progress=False))
    list(executor.map(partial(_ShardWriter, str(data_dir)), jobs, Resources(cpus=1), desc=f"shards {prefix}"))
    keep = {f"{n}{suffix}" for n in names for suffix in (".tar", ".parquet", "_stats.json")}
    if out_dir.exists():
        for p in out_dir.iterdir():
            if p.name.startswith(f"{prefix}-") and p.name not in keep or p.name.startswith(f".{prefix}-") and p.name.endswith(".tmp"):
                p.unlink()
    return [out_dir / f"{n}.tar" for n in names]


def shippable(r: Record) -> bool:
    return r.status == "ok" and r.split in SPLITS and r.blob is not None


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Ships every ok record with a split; writes `data_dir/manifest.parquet` with all records."""
    p: ShardParams = params.shard
    data_dir = params.data
    by_split: dict[str, list[Record]] = defaultdict(list)
    final = data_dir / "manifest.parquet"
    with ManifestWriter(final) as manifest:
        for r in iter_records(inputs["manifest"]):
            if r.status == "ok" and r.split is None:
                r = r.replace(status="no_split", error="no split assigned", stage="shard")
            if shippable(r):
                by_split[r.split].append(r)
            manifest.write(r)
    metrics: dict[str, Any] = {"splits": {}}
    for split in SPLITS:
        tars = write_shard_set(
            by_split.get(split, []), data_dir, Path(out) / split, split, p.max_count, p.max_bytes, executor
        )
        metrics["splits"][split] = {
            "samples": len(by_split.get(split, [])),
            "shards": len(tars),
            "bytes": sum(t.stat().st_size for t in tars),
        }
    metrics.update(counts(iter_records(final)))
    metrics["shipped"] = sum(len(v) for v in by_split.values())
    return metrics


STAGE = Stage(
    name="shard",
    help="write WebDataset shards per split and data/manifest.parquet",
    params=ShardParams,
    run=run,
    reads=("split", "ingest", "synthesize", "masks"),  # the blobs the shards copy
    writes={"shards": "shards", "manifest": "manifest.parquet"},
)
