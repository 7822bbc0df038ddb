"""Resolution-preserving WebDataset shards, byte-identical for the same inputs, resumable.

Per split: `<split>-NNNNNN.tar` holding `<key>.<ext>` (a real image's original bytes),
`<key>.mask.png` (0/255, exactly H x W) and `<key>.json` (the record), plus a parquet index
per tar and `<split>-NNNNNN_stats.json`, written last: a shard with its stats file is
complete.

The stage streams: it reads the split manifest once, in record batches, writes
`data_dir/manifest.parquet` from the same batches, and cuts the shippable samples into
shards as they arrive, in manifest order: one open shard per member layout (one image
format per tar, so `datasets` can read it), closed by count and by bytes. The plan is a
pure function of the manifest; a rerun skips complete shards whose records match and
rewrites the rest under temporary names, so a killed run loses and duplicates nothing.

Tars are written here, member by member, with the bytes `webdataset.TarWriter(encoder=False,
mtime=0, user="", group="")` writes (the header block comes from Python's `tarfile` once and
only the name, size and checksum change per member), so importing this module does not
import webdataset (and torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import imageio
from pipeline.executor import Executor, Resources
from pipeline.params import ExecutorParams, Params
from pipeline.records import _PUBLIC as PUBLIC
from pipeline.records import FIELDS, SCHEMA, SPLITS, Record
from pipeline.split import conform, read_batches, records_of
from pipeline.stage import Stage

log = logging.getLogger(__name__)

TAR_MTIME = 0  # fixed member mtime: byte-identical tars
TAR_MODE = 0o444  # webdataset's TarWriter default
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_BATCH = 4096  # manifest rows per record batch
_WINDOW = 16  # shard jobs handed to the executor at a time


@dataclass(frozen=True)
class ShardParams:
    max_count: int = 1000  # samples per tar
    max_bytes: int = 1 << 30  # bytes of image data per tar (a sample is never split)

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError("shard.max_count and shard.max_bytes must be >= 1")


# ----------------------------------------------------------------------------- members


def full_mask(record: Record, value: int) -> bytes:
    return _constant_mask(record.height, record.width, value)


@lru_cache(maxsize=256)
def _constant_mask(height: int, width: int, value: int) -> bytes:
    """All-0 (real) and all-255 (synthetic) masks repeat across a corpus: encode each size once."""
    return imageio.encode_mask(np.full((height, width), value, np.uint8))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mask_bytes(record: Record, data_dir: Path | str) -> bytes:
    """The sample's mask PNG, tagged with its image's EXIF orientation so that readers which
    apply EXIF rotate mask and image together (see `imageio.tag_orientation`)."""
    if record.mask_blob:
        mask = _read(os.path.join(data_dir, record.mask_blob))
    elif record.label == "synthetic":
        mask = full_mask(record, 255)
    elif record.label == "real":
        mask = full_mask(record, 0)
    else:
        raise ValueError(f"{record.key}: tampered sample without a mask")
    return imageio.tag_orientation(mask, record.exif_orientation)


def diff_member(record: Record, data_dir: Path | str) -> bytes | FileMember:
    """The difference map, tagged like the mask; copied from its file when no tag is needed."""
    path = os.path.join(data_dir, record.diff_blob)
    if record.exif_orientation and record.exif_orientation != 1:
        return imageio.tag_orientation(_read(path), record.exif_orientation)
    return FileMember(path)


def sample_members(record: Record, data_dir: Path, record_json: bytes | None = None) -> dict[str, bytes]:
    """The tar members of one sample: image bytes as stored, mask, record JSON (+ diff map)."""
    members = {
        "__key__": record.key,
        record.format: _read(os.path.join(data_dir, record.blob)),
        "mask.png": mask_bytes(record, data_dir),
        "json": record_json if record_json is not None else _record_json(record),
    }
    if record.diff_blob:
        d = diff_member(record, data_dir)
        members["diff.png"] = d if isinstance(d, bytes) else _read(d.path)
    return members


_PUBLIC_SORTED = tuple(sorted(Record.__dataclass_fields__.keys() & set(PUBLIC)))
# `records.dumps_json` (sorted keys, no spaces) for a flat dict whose keys come sorted
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _record_json(record: Record) -> bytes:
    """The record as shipped in `<key>.json`: `dumps_json(record.public())`, faster."""
    return _JSON.encode({k: getattr(record, k) for k in _PUBLIC_SORTED}).encode("utf-8")


def member_layout(r: Record) -> tuple[str, bool]:
    """What members a sample has: its image extension, and whether a diff map ships."""
    return (r.format or "", r.diff_blob is not None)


def sample_keys(r: Record) -> list[str]:
    return [r.format, "mask.png", "json"] + (["diff.png"] if r.diff_blob else [])


def shippable(r: Record) -> bool:
    return r.status == "ok" and r.split in SPLITS and r.blob is not None


# ----------------------------------------------------------------------------- tar writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, TAR_MTIME, TAR_MODE, "", ""
    return ti


_TEMPLATE = _tarinfo("x", 0).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
_HEAD = _TEMPLATE[100:124]  # mode, uid, gid
_MIDDLE = _TEMPLATE[136:148]  # mtime
_TAIL = _TEMPLATE[156:]  # type, link name, magic, user, group, devices, prefix
_FIXED_SUM = sum(_HEAD) + sum(_MIDDLE) + sum(b"        ") + sum(_TAIL)


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) `tarfile` (PAX format, as webdataset uses) writes for one member.

    Names of at most 100 ASCII characters and sizes under 8 GiB need no PAX extension: the
    header is the cached template with name, size and checksum filled in. Anything else goes
    through `tarfile` itself.
    """
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    raw = name.encode("ascii")
    size_field = b"%011o\0" % size
    chksum = _FIXED_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, b"\0" * (100 - len(raw)), _HEAD, size_field, _MIDDLE,
                     b"%06o\0 " % chksum, _TAIL))


class FileMember:
    """A tar member whose bytes are a file's: copied by the kernel (`copy_file_range`),
    never read into Python."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path


class TarOut:
    """Writes WebDataset samples to a file descriptor, as webdataset's TarWriter would: each
    sample's members in sorted name order; bytes members gathered into one `writev`."""

    def __init__(self, fd: int):
        self.fd = fd
        self.offset = 0
        self._copy = hasattr(os, "copy_file_range")

    def write(self, sample: dict[str, Any]) -> int:
        """Returns the bytes of member data."""
        key = sample["__key__"]
        total = 0
        parts: list[bytes] = []
        for ext in sorted(sample):
            if ext == "__key__":
                continue
            data = sample[ext]
            if isinstance(data, FileMember):
                self._writev(parts)
                parts = []
                n = self._file(f"{key}.{ext}", data.path)
            else:
                if isinstance(data, str):
                    data = data.encode("utf-8")
                n = len(data)
                parts.append(tar_header(f"{key}.{ext}", n))
                parts.append(data)
            pad = -n % _BLOCK
            if pad:
                parts.append(_ZEROS[:pad])
            total += n
        self._writev(parts)
        return total

    def _file(self, name: str, path: str) -> int:
        src = os.open(path, os.O_RDONLY)
        try:
            n = os.fstat(src).st_size
            self._writev([tar_header(name, n)])
            left = n
            while left and self._copy:
                try:
                    got = os.copy_file_range(src, self.fd, left)
                except OSError:  # another file system, or none: copy through memory
                    self._copy = False
                    break
                if not got:
                    break
                left -= got
            if left:
                os.lseek(src, n - left, os.SEEK_SET)
                while left:
                    chunk = os.read(src, min(left, 1 << 22))
                    if not chunk:
                        raise OSError(f"{path}: shorter than its size")
                    self._writev([chunk])
                    left -= len(chunk)
            else:
                self.offset += n
            return n
        finally:
            os.close(src)

    def _writev(self, parts: list[bytes]) -> None:
        if not parts:
            return
        want = sum(len(p) for p in parts)
        done = os.writev(self.fd, parts)
        if done < want:  # a short write: finish it piece by piece
            rest = b"".join(parts)[done:]
            while rest:
                rest = rest[os.write(self.fd, rest):]
        self.offset += want

    def close(self) -> None:
        end = 2 * _BLOCK
        rest = (self.offset + end) % _RECORD
        self._writev([b"\0" * (end + (_RECORD - rest if rest else 0))])


_ZEROS = b"\0" * _BLOCK


def _digest(records_json: list[bytes]) -> str:
    h = hashlib.sha256()
    for j in records_json:
        h.update(j)
        h.update(b"\n")
    return h.hexdigest()


def write_shard(records: list[Record], data_dir: Path, out_dir: Path, name: str,
                index_table: pa.Table | None = None) -> dict[str, Any]:
    """Writes `name.tar`, `name.parquet`, then `name_stats.json`; skips a complete match.
    `index_table`: the records as an Arrow table, when the caller has it."""
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
    data = str(data_dir)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = TarOut(fd)
        for r, j in zip(records, records_json):
            sample = {"__key__": r.key, r.format: FileMember(os.path.join(data, r.blob)),
                      "mask.png": mask_bytes(r, data), "json": j}
            if r.diff_blob:
                sample["diff.png"] = diff_member(r, data)
            nbytes += w.write(sample)
        w.close()
    finally:
        os.close(fd)
    os.replace(tmp, tar)
    tmp_index = out_dir / f".{name}.parquet.{os.getpid()}.tmp"
    table = index_table if index_table is not None else _index_table(records)
    # a few hundred rows beside a tar of hundreds of MB: plain pages write in half the time
    pq.write_table(_without_local_paths(table), tmp_index, compression="none",
                   use_dictionary=False, write_statistics=False)
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


def _without_local_paths(table: pa.Table) -> pa.Table:
    """Indexes travel with the shards: no local file system layout in them."""
    i = table.schema.get_field_index("local_path")
    if i < 0:
        return table
    return table.set_column(i, "local_path", pa.nulls(table.num_rows, pa.string()))


def _index_table(records: list[Record]) -> pa.Table:
    """`records.to_table`, column by column (faster)."""
    return pa.Table.from_pydict({f: [getattr(r, f) for r in records] for f in FIELDS},
                                schema=SCHEMA)


class _ShardWriter:
    """Writes one shard; picklable so the executor can run it on any worker."""

    def __init__(self, data_dir: str):
        self.data_dir = Path(data_dir)

    def __call__(self, job: tuple[str, str, list[Record], pa.Table | None]) -> dict[str, Any]:
        out_dir, name, records, index = job
        return write_shard(records, self.data_dir, Path(out_dir), name, index)


# ----------------------------------------------------------------------------- planning


class ShardCutter:
    """Cuts a stream of records into shards named `<prefix>-NNNNNN`, in arrival order: one
    open shard per member layout, closed when the next sample would pass `max_count` or
    `max_bytes` (a sample is never split). `flush()` closes the open ones (in layout order),
    so what was added before it is a prefix of the shard sequence."""

    def __init__(self, prefix: str, max_count: int, max_bytes: int, start: int = 0):
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.next = start
        self.samples = 0
        self._open: dict[tuple[str, bool], tuple[list[Record], list[Any], list[int]]] = {}

    def _close(self, layout: tuple[str, bool]) -> Cut:
        recs, rows, _ = self._open.pop(layout)
        name = f"{self.prefix}-{self.next:06d}"
        self.next += 1
        return name, recs, rows

    def add(self, r: Record, row: tuple[pa.RecordBatch, int] | None = None) -> list[Cut]:
        """Adds a record (and, optionally, where it is in an Arrow batch: the shard's parquet
        index is then taken from the batches); returns the shards this closed."""
        layout = member_layout(r)
        n = r.nbytes or 0
        done = []
        cur = self._open.get(layout)
        if cur is not None and (len(cur[0]) >= self.max_count or cur[2][0] + n > self.max_bytes):
            done.append(self._close(layout))
            cur = None
        if cur is None:
            cur = self._open[layout] = ([], [], [0])
        cur[0].append(r)
        cur[1].append(row)
        cur[2][0] += n
        self.samples += 1
        return done

    def flush(self) -> list[Cut]:
        return [self._close(layout) for layout in sorted(self._open)]


Cut = tuple[str, list[Record], list[Any]]  # shard name, its records, where they are in batches


def _take(rows: list[Any]) -> pa.Table | None:
    """The rows of Arrow batches named by (batch, index) pairs, as one table."""
    if not rows or any(x is None for x in rows):
        return None
    parts, cur, idx = [], None, []
    for batch, i in rows:
        if batch is not cur:
            if idx:
                parts.append(cur.take(pa.array(idx, pa.int64())))
            cur, idx = batch, []
        idx.append(i)
    parts.append(cur.take(pa.array(idx, pa.int64())))
    return pa.Table.from_batches(parts, schema=SCHEMA)


class ShardJobs:
    """Feeds shard jobs to the executor a window at a time (memory stays flat)."""

    def __init__(self, data_dir: Path, executor: Executor | None, desc: str = "shards"):
        self.factory = partial(_ShardWriter, str(data_dir))
        self.executor = executor or Executor(ExecutorParams(backend="local", progress=False))
        self.desc = desc
        self.pending: list[tuple[str, str, list[Record], pa.Table | None]] = []
        self.stats: list[dict[str, Any]] = []

    def add(self, out_dir: Path, shards: Iterable[Cut]) -> None:
        for name, recs, rows in shards:
            self.pending.append((str(out_dir), name, recs, _take(rows)))
        if len(self.pending) >= _WINDOW:
            self.drain()

    def drain(self) -> None:
        if self.pending:
            jobs, self.pending = self.pending, []
            self.stats.extend(self.executor.map(self.factory, jobs, Resources(cpus=1),
                                                desc=self.desc))


def remove_stale(out_dir: Path, prefix: str, names: Iterable[str]) -> None:
    """Files of this prefix that are not in the plan (an earlier, larger run's), and temp files."""
    keep = {f"{n}{suffix}" for n in names for suffix in (".tar", ".parquet", "_stats.json")}
    if out_dir.exists():
        for p in out_dir.iterdir():
            if (p.name.startswith(f"{prefix}-") and p.name not in keep
                    or p.name.startswith(f".{prefix}-") and p.name.endswith(".tmp")):
                p.unlink()


def write_shard_set(
    records: Iterable[Record],
    data_dir: Path,
    out_dir: Path,
    prefix: str,
    max_count: int,
    max_bytes: int,
    executor: Executor | None = None,
) -> list[Path]:
    """Writes `<out_dir>/<prefix>-NNNNNN.{tar,parquet,_stats.json}` from a stream of records;
    returns the tar paths. Files of this prefix that are not in the plan go."""
    out_dir = Path(out_dir)
    cutter = ShardCutter(prefix, max_count, max_bytes)
    jobs = ShardJobs(data_dir, executor, desc=f"shards {prefix}")
    names: list[str] = []
    for r in records:
        done = cutter.add(r)
        names += [n for n, _, _ in done]
        jobs.add(out_dir, done)
    done = cutter.flush()
    names += [n for n, _, _ in done]
    jobs.add(out_dir, done)
    jobs.drain()
    remove_stale(out_dir, prefix, names)
    return [out_dir / f"{n}.tar" for n in names]


# ----------------------------------------------------------------------------- stage


def iter_batches(path: Path | str, batch_size: int = _BATCH) -> Iterator[pa.RecordBatch]:
    """A manifest's record batches in the record schema, one row group in memory at a time."""
    for b in read_batches(path, None, batch_size):
        yield conform(b)


_COUNTED = ("status", "domain", "operation", "generator", "label", "split")


def count_batch(batch: pa.RecordBatch, into: dict[str, Counter]) -> None:
    """`records.counts` for a record batch, without building records."""
    for c in _COUNTED:
        for v in pc.value_counts(batch.column(c)).to_pylist():
            into[c][str(v["values"])] += v["counts"]


def counts_dict(by: dict[str, Counter], total: int) -> dict[str, Any]:
    out: dict[str, Any] = {"total": total}
    out.update({f"by_{k}": dict(sorted(c.items())) for k, c in by.items()})
    return out


def _mark_no_split(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`status=no_split` on ok rows without a split."""
    miss = pc.and_(pc.equal(batch.column("status"), "ok"), pc.is_null(batch.column("split")))
    if not pc.any(miss).as_py():
        return batch
    cols = {n: batch.column(n) for n in batch.schema.names}
    cols["status"] = pc.if_else(miss, pa.scalar("no_split"), cols["status"])
    cols["error"] = pc.if_else(miss, pa.scalar("no split assigned"), cols["error"])
    cols["stage"] = pc.if_else(miss, pa.scalar("shard"), cols["stage"])
    return pa.RecordBatch.from_arrays([cols[f.name] for f in SCHEMA], schema=SCHEMA)


def _shippable_mask(batch: pa.RecordBatch) -> pa.Array:
    return pc.and_(
        pc.and_(pc.equal(batch.column("status"), "ok"),
                pc.is_in(batch.column("split"), value_set=pa.array(SPLITS))),
        pc.is_valid(batch.column("blob")),
    )


def _ships_as_is(path: Path | str) -> bool:
    """Whether the input manifest is already the one this stage writes: the record schema
    (metadata included) and no ok row without a split. Reads two columns."""
    pf = pq.ParquetFile(path)
    if not pf.schema_arrow.equals(SCHEMA, check_metadata=True):
        return False
    t = pf.read(columns=["status", "split"])
    return not pc.any(pc.and_(pc.equal(t.column("status"), "ok"),
                              pc.is_null(t.column("split")))).as_py()


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Ships every ok record with a split; writes `data_dir/manifest.parquet` with all records
    (a copy of the input when no row changes: ok rows without a split become `no_split`)."""
    p: ShardParams = params.shard
    data_dir = params.data
    out = Path(out)
    final = data_dir / "manifest.parquet"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    cutters = {s: ShardCutter(s, p.max_count, p.max_bytes) for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    dirs = {s: out / s for s in SPLITS}
    jobs = ShardJobs(data_dir, executor)
    by: dict[str, Counter] = {c: Counter() for c in _COUNTED}
    total = 0
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            if _ships_as_is(inputs["manifest"]):
                shutil.copyfile(inputs["manifest"], tmp)  # the kernel copies it
                writer = None
            else:
                writer = stack.enter_context(pq.ParquetWriter(tmp, SCHEMA))
            for batch in iter_batches(inputs["manifest"]):
                if writer is not None:
                    batch = _mark_no_split(batch)
                    writer.write_batch(batch)
                total += batch.num_rows
                count_batch(batch, by)
                ship = batch.filter(_shippable_mask(batch))
                for i, r in enumerate(records_of(ship)):
                    done = cutters[r.split].add(r, (ship, i))
                    if done:
                        names[r.split] += [n for n, _, _ in done]
                        jobs.add(dirs[r.split], done)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    for s in SPLITS:
        done = cutters[s].flush()
        names[s] += [n for n, _, _ in done]
        jobs.add(dirs[s], done)
    jobs.drain()
    tar_bytes: Counter = Counter()
    for st in jobs.stats:
        tar_bytes[st["shard"].rsplit("-", 1)[0]] += st["tar_bytes"]
    metrics: dict[str, Any] = {"splits": {}}
    for s in SPLITS:
        remove_stale(out / s, s, names[s])
        metrics["splits"][s] = {
            "samples": cutters[s].samples,
            "shards": len(names[s]),
            "bytes": tar_bytes[s],
        }
    metrics.update(counts_dict(by, total))
    metrics["shipped"] = sum(c.samples for c in cutters.values())
    return metrics


STAGE = Stage(
    name="shard",
    help="write WebDataset shards per split and data/manifest.parquet",
    params=ShardParams,
    run=run,
    reads=("split", "ingest", "synthesize", "masks"),  # the blobs the shards copy
    writes={"shards": "shards", "manifest": "manifest.parquet"},
)
