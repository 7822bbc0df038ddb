"""The dedup stage: exact (sha256) and near-duplicate groups, flips, rotations and crops included.

Near-duplicates across train and test inflate every metric, so every row with a perceptual
hash gets a `group_id` (a content id shared by its exact and near copies) that the split
stage assigns as one unit. Within a group one real row is kept as the representative; the
other real copies get `status="duplicate"` with `error` naming the representative.

What an image is matched by (`image_hashes`, computed at ingest into `phash_variants`, or
here from the stored bytes when a manifest lacks them):

- a *canonical* 64-bit pHash: the pHash of the image turned (by one of the 8 flips and
  90-degree rotations) so that its energy sits above the DCT diagonal and its first
  horizontal and vertical AC coefficients are positive. A flipped or rotated copy has the
  same canonical turn, so it is found like any near copy (`threshold`). Where a statistic is
  too close to zero to be sure, the hashes of the other turns it could take are kept too;
- a 256-bit hash of the same turn (the 16x16 lowest DCT coefficients against their median)
  that must also be close (`verify_bits`): two receipts typeset from one template are 6
  bits apart in pHash but 76+ here, while copies stay under 64;
- the canonical hashes of four centred windows (95%, 90%, 85%, 80% of each side): a copy
  cropped by up to 10% a side is the whole of one of them.

The windows and the other turns are *probes*, asked against the whole images' canonical
hashes at `probe_threshold` (and checked by their own 256-bit hashes). The searches are
exact radius searches in Hamming space (`pipeline.hamming`): a self-join of the canonical
hashes and one batch query of the probes, sub-quadratic, on the executor. Forensic datasets that ship originals (CASIA's `Au/`) get one more step:
each tampered image is linked to the real images it was made from, by a looser hash match
or by matching keypoints of its tampered and untampered parts (a splice finds its host and
its donor), and shares their group (`forensic_threshold`, `forensic_regions`). Such links
join groups; they never make a real image a duplicate of another.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.fftpack
from PIL import Image

from pipeline import imageio
from pipeline.executor import Executor, Resources, chunked
from pipeline.hamming import (
    HammingIndex,
    brute_force_query,
    union_find,
    unique_edges,
)
from pipeline.records import SCHEMA, counts, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

_U64 = np.uint64


@dataclass(frozen=True)
class DedupParams:
    # two canonical 64-bit pHashes at most this many bits apart are near-duplicates; 8 groups
    # resized, recompressed, blurred, +-20% brightened and ~2% cropped copies and keeps
    # distinct photos apart (they are 20+ bits apart); see README "Deduplication"
    threshold: int = 8
    near: bool = True  # false: exact (sha256 / identical pHash) duplicates only
    keep_duplicates: bool = False  # true: duplicates stay `ok` (still one group_id)
    # probes against whole images, at most this many bits apart: centre windows (copies
    # cropped by up to 10% a side) and the other turns of images whose orientation is
    # ambiguous (flipped / rotated copies of them); -1: no probes
    probe_threshold: int = 6
    # a pHash match is refused when the 256-bit hashes differ in more bits (look-alike
    # documents of one template); 256: no check
    verify_bits: int = 64
    # forensic sources: a tampered image this close to a real image is linked to it
    forensic_threshold: int = 16
    # and a keypoint match of its tampered / untampered parts against the originals the
    # forensic sources ship links it to a splice's donor and host
    forensic_regions: bool = True
    # the index is planned for max(number of hashes, capacity); 0: the number of hashes,
    # the fastest plan for this run
    capacity: int = 0
    tables_per_task: int = 64  # index tables per executor task
    # probes (windows, turns) asked at a time: the query's working arrays hold about 60 bytes
    # per probe of a chunk, and each further chunk sorts the stored hashes once more per table
    probe_chunk: int = 1 << 23

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 32:
            raise ValueError(f"dedup.threshold: {self.threshold}; allowed: 0..32 bits")
        if not -1 <= self.probe_threshold <= 32:
            raise ValueError(f"dedup.probe_threshold: {self.probe_threshold}; allowed: -1..32 bits")
        if not 0 <= self.verify_bits <= 256:
            raise ValueError(f"dedup.verify_bits: {self.verify_bits}; allowed: 0..256 bits")
        if not 0 <= self.forensic_threshold <= 32:
            raise ValueError(
                f"dedup.forensic_threshold: {self.forensic_threshold}; allowed: 0..32 bits")
        if self.capacity < 0:
            raise ValueError(f"dedup.capacity: {self.capacity}; allowed: >= 0")
        if self.tables_per_task < 1:
            raise ValueError(f"dedup.tables_per_task: {self.tables_per_task}; allowed: >= 1")
        if self.probe_chunk < 1:
            raise ValueError(f"dedup.probe_chunk: {self.probe_chunk}; allowed: >= 1")


# --------------------------------------------------------------------------- image hashes

WINDOWS = (0.95, 0.9, 0.85, 0.8)  # centred windows: side of the window / side of the image
FINE = 16  # the verification hash: signs of the 16 x 16 lowest DCT coefficients vs median
# orientation statistics closer to 0 than this (relative) are ambiguous: the other turn is
# kept too. Wide for whole images (an overlay such as a watermark moves the statistics of
# a low-contrast photo), narrow for the windows (crops that are also turned)
_MARGIN_WHOLE, _MARGIN_WINDOW = 0.2, 0.05
# a turn is (transpose, flip rows, flip columns): the 8 flips and 90-degree rotations


_HASH_SIDE = 256  # shorter side the variants are computed at (at least)


def _dct(gray: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The 32 x 32 DCT of the 32 x 32 grey thumbnail (of `box`), as imagehash's pHash has it."""
    small = gray.resize((32, 32), Image.Resampling.LANCZOS, box=box)
    px = np.asarray(small, dtype=np.float64)
    return scipy.fftpack.dct(scipy.fftpack.dct(px, axis=0), axis=1)


def _turn(c: np.ndarray, turn: tuple[int, int, int]) -> np.ndarray:
    """DCT coefficients of the turned image: a flip negates the odd frequencies of its axis
    (DCT-II of x[N-1-n] is (-1)^k X[k]), a transpose swaps the axes."""
    t, a, b = turn
    c = c.T if t else c
    k = np.arange(c.shape[0])
    sign = np.where((a * k[:, None] + b * k[None, :]) % 2 == 1, -1.0, 1.0)
    return c * sign


def _turns(c: np.ndarray, margin: float) -> tuple[tuple[int, int, int],
                                                 list[tuple[int, int, int]]]:
    """(canonical turn, every turn that could be canonical for a slightly different copy).

    Canonical: the transpose that puts more energy above the diagonal than below, then the
    flips that make the first horizontal and vertical AC coefficients positive. The 8 turns
    give the 8 sign patterns of those three statistics, so the canonical turn of a turned
    copy is the same image orientation.
    """
    low = c[:8, :8].copy()
    low[0, 0] = 0.0
    energy = float((low**2).sum()) or 1.0
    iu = np.triu_indices(8, 1)
    above = float(((low[iu] ** 2) - (low.T[iu] ** 2)).sum()) / energy
    scale = np.sqrt(energy)
    ts = [0] if above > margin else [1] if above < -margin else [0, 1]
    turns: list[tuple[int, int, int]] = []
    for t in ts:
        lt = low.T if t else low
        h, v = lt[0, 1] / scale, lt[1, 0] / scale
        bs = [0] if h > margin else [1] if h < -margin else [0, 1]
        as_ = [0] if v > margin else [1] if v < -margin else [0, 1]
        turns += [(t, a, b) for a in as_ for b in bs]
    t0 = 0 if above >= 0 else 1
    lt = low.T if t0 else low
    canonical = (t0, 0 if lt[1, 0] >= 0 else 1, 0 if lt[0, 1] >= 0 else 1)
    return canonical, turns


def _hex_bits(c: np.ndarray) -> str:
    """imagehash's layout: coefficient > median, row-major, most significant bit first."""
    return np.packbits((c > np.median(c)).ravel()).tobytes().hex()


def image_hashes(rgb: np.ndarray) -> dict[str, str]:
    """`phash` and `phash_variants` of an RGB image, for its record (ingest calls this).

    `phash`: imagehash's pHash (16 hex digits), as before. `phash_variants`: tokens
    separated by spaces, each a role letter and hex digits:
    `k<16><64>` the canonical pHash and its 256-bit hash (always first, once);
    `a<16><64>` the same for every other turn that could be canonical (0 to 7 of them);
    `w<16><64>` the same for the centred windows (canonical turn and ambiguous ones).
    About 7 tokens, 570 characters.
    """
    full = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).convert("L")
    # the variants come from a copy of at most ~4x the 32 px thumbnail's side per window
    # (an integer box reduction, as the thumbnail's own filter would average those pixels):
    # five Lanczos passes over a full-size page cost 4x the whole hash otherwise
    factor = max(1, min(full.size) // _HASH_SIDE)
    gray = full.reduce(factor) if factor > 1 else full
    c = _dct(gray)
    canonical, turns = _turns(c, _MARGIN_WHOLE)
    tokens = []
    seen: set[str] = set()
    for turn in [canonical] + [t for t in turns if t != canonical]:
        ct = _turn(c[:FINE, :FINE], turn)
        coarse = _hex_bits(ct[:8, :8])
        if coarse in seen and turn != canonical:
            continue
        seen.add(coarse)
        tokens.append(("k" if turn == canonical else "a") + coarse + _hex_bits(ct))
    w, h = gray.size
    windows: list[str] = []
    for s in WINDOWS:
        dx, dy = w * (1 - s) / 2, h * (1 - s) / 2
        cw = _dct(gray, (dx, dy, w - dx, h - dy))
        cano, alts = _turns(cw, _MARGIN_WINDOW)
        for turn in [cano] + [t for t in alts if t != cano]:
            ct = _turn(cw[:FINE, :FINE], turn)
            coarse = _hex_bits(ct[:8, :8])
            if coarse not in seen:
                seen.add(coarse)
                windows.append("w" + coarse + _hex_bits(ct))
    tokens += windows
    return {"phash": str(imagehash.phash(full)), "phash_variants": " ".join(tokens)}


# --------------------------------------------------------------------------- parsing

_TOKEN = 1 + 16 + 64  # role letter, 64-bit pHash, 256-bit hash (hex)
_HEX = np.full(256, 255, np.uint8)
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
for _i, _ch in enumerate(b"ABCDEF"):
    _HEX[_ch] = 10 + _i


def _buffers(strings: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 offsets [n + 1], uint8 data, valid [n]) of a string column, zero-copy."""
    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    if arr.type == pa.string():
        arr = arr.cast(pa.large_string())  # int64 offsets
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], np.int64)[arr.offset : arr.offset + n + 1] if n else \
        np.zeros(1, np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(n, bool)
    return offsets, data, valid


def _hex_at(data: np.ndarray, starts: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 [m, words], valid [m]): 16 * words hex digits read at each start in data."""
    width = 16 * words
    if not len(starts):
        return np.zeros((0, words), _U64), np.zeros(0, bool)
    chars = np.lib.stride_tricks.sliding_window_view(data, width)[starts]  # [m, width] bytes
    nib = _HEX[chars]
    ok = (nib != 255).all(axis=1)
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]  # bytes, most significant first
    vals = np.ascontiguousarray(raw).view(">u8").astype(_U64)
    return vals.reshape(len(starts), words), ok


def _hex_words(strings: pa.Array | pa.ChunkedArray, words: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 [n, words], valid) from strings of exactly 16 * words hex digits; vectorised."""
    offsets, data, valid = _buffers(strings)
    n = len(offsets) - 1
    out = np.zeros((n, words), _U64)
    valid &= np.diff(offsets) == 16 * words
    rows = np.flatnonzero(valid)
    if rows.size:
        vals, ok = _hex_at(data, offsets[rows], words)
        out[rows[ok]] = vals[ok]
        valid[rows[~ok]] = False
    return out, valid


def parse_phash(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hashes, valid mask) from 16-hex-digit strings; anything else is invalid."""
    h, ok = _hex_words(values, 1)
    return h[:, 0], ok


@dataclass
class Variants:
    """`phash_variants` of n rows, parsed: per row the canonical hash, per token the probes
    (window hashes and the other turns of an ambiguous orientation)."""

    key: np.ndarray  # uint64 [n] canonical pHash (0 where missing)
    fine: np.ndarray  # uint64 [n, 4] its 256-bit hash
    ok: np.ndarray  # bool [n] the row has a well-formed `k` token
    probe_row: np.ndarray  # int64 [m] row of each probe
    probe: np.ndarray  # uint64 [m]
    is_turn: np.ndarray  # bool [m] an other turn (`a`), else a window (`w`)
    probe_fine: np.ndarray | None = None  # uint64 [m, 4], when asked for

    @classmethod
    def empty(cls, n: int, fines: bool = False) -> Variants:
        e = np.empty(0, np.int64)
        return cls(np.zeros(n, _U64), np.zeros((n, 4), _U64), np.zeros(n, bool), e,
                   np.empty(0, _U64), np.empty(0, bool),
                   np.empty((0, 4), _U64) if fines else None)

    def put(self, rows: np.ndarray, sub: Variants) -> None:
        """Sets rows (sorted) from `sub`, parsed from those rows' strings in that order."""
        self.key[rows], self.fine[rows], self.ok[rows] = sub.key, sub.fine, sub.ok
        self.probe_row = np.concatenate([self.probe_row, rows[sub.probe_row]])
        self.probe = np.concatenate([self.probe, sub.probe])
        self.is_turn = np.concatenate([self.is_turn, sub.is_turn])
        if self.probe_fine is not None and sub.probe_fine is not None:
            self.probe_fine = np.concatenate([self.probe_fine, sub.probe_fine])


def parse_variants(values: pa.Array | pa.ChunkedArray, fines: bool = False) -> Variants:
    """Parses a `phash_variants` column (see `image_hashes`) straight from its bytes; the
    probes' 256-bit hashes only when `fines` (they are needed for the few probes that match).
    Malformed tokens are dropped; a row without a well-formed `k` token counts as missing."""
    offsets, data, valid = _buffers(values)
    n = len(offsets) - 1
    v = Variants.empty(n, fines)
    if n == 0 or not valid.any():
        return v
    lo, hi = int(offsets[0]), int(offsets[-1])
    # a token starts at each non-empty row's first byte and after each space
    starts = np.flatnonzero(data[lo:hi] == ord(" ")) + lo + 1
    row_start = offsets[:-1][valid & (np.diff(offsets) > 0)]
    starts = np.union1d(starts[starts < hi], row_start)
    rows = np.searchsorted(offsets, starts, side="right") - 1
    nxt, row_end = np.append(starts[1:], hi), offsets[rows + 1]
    ends = np.where(nxt >= row_end, row_end, nxt - 1)  # a token ends at a space or its row's end
    role = data[np.minimum(starts, max(hi - 1, 0))]
    good = (ends - starts) == _TOKEN
    k = np.flatnonzero(good & (role == ord("k")))
    words, ok = _hex_at(data, starts[k] + 1, 5)
    r = rows[k][ok]
    v.key[r], v.fine[r], v.ok[r] = words[ok, 0], words[ok, 1:], True
    sel = np.flatnonzero(good & ((role == ord("w")) | (role == ord("a"))))
    sel = sel[v.ok[rows[sel]]]  # probes only next to a canonical hash
    words, ok = _hex_at(data, starts[sel] + 1, 5 if fines else 1)
    sel = sel[ok]
    v.probe_row, v.probe = rows[sel].astype(np.int32), words[ok, 0].copy()  # rows of a batch
    v.is_turn = role[sel] == ord("a")
    if fines:
        v.probe_fine = words[ok, 1:].copy()
    return v


class _HashBlobs:
    """Worker: `image_hashes` of stored images, for rows whose manifest lacks them."""

    def __init__(self, data_dir: str):
        self.data = Path(data_dir)

    def __call__(self, items: list[tuple[int, str]]) -> list[tuple[int, str | None]]:
        out = []
        for row, blob in items:
            try:
                out.append((row, image_hashes(imageio.read_rgb(self.data / blob))["phash_variants"]))
            except Exception as e:  # noqa: BLE001 - an unreadable blob keeps its pHash only
                log.warning("dedup: cannot hash %s: %s", blob, e)
                out.append((row, None))
        return out


class _Factory:
    def __init__(self, cls: type, *args: Any):
        self.cls, self.args = cls, args

    def __call__(self) -> Any:
        return self.cls(*self.args)


# --------------------------------------------------------------------------- planning

class _FineCheck:
    """verify() for the index: 256-bit distance of candidate pairs within `bits` (picklable).

    A side without a 256-bit hash (a row that has only its pHash) is not checked."""

    def __init__(self, left: np.ndarray, left_ok: np.ndarray, right: np.ndarray,
                 right_ok: np.ndarray, bits: int):
        self.left, self.left_ok, self.right, self.right_ok = left, left_ok, right, right_ok
        self.bits = bits

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = np.bitwise_count(self.left[a] ^ self.right[b]).sum(axis=1)
        return (d <= self.bits) | ~self.left_ok[a] | ~self.right_ok[b]


def _first_of(inverse: np.ndarray, n: int) -> np.ndarray:
    """For each of `n` values, the first position in `inverse` that maps to it."""
    first = np.full(n, -1, np.int64)
    pos = np.arange(len(inverse), dtype=np.int64)
    first[inverse[::-1]] = pos[::-1]  # the last write wins: the first position
    return first


def _open(path: str | os.PathLike) -> pq.ParquetFile:
    """A manifest read as a stream: small buffered reads, no read-ahead of whole row groups
    (3x lower peak memory on long string columns)."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)


def _batches(path: str | os.PathLike, columns: list[str] | None, batch_size: int = 1 << 16
             ) -> Iterator[pa.RecordBatch]:
    pool = pa.default_memory_pool()
    for batch in _open(path).iter_batches(columns=columns, batch_size=batch_size,
                                          use_threads=False):
        yield batch
        del batch
        pool.release_unused()  # the allocator keeps freed batches otherwise: RSS climbs


def _is(col: pa.ChunkedArray, *values: str) -> np.ndarray:
    return pc.fill_null(pc.is_in(col, pa.array(values)), False).to_numpy(zero_copy_only=False)


def _num(col: pa.ChunkedArray) -> np.ndarray:
    return np.nan_to_num(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(float))


def _sha_ids(words: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id per row: equal iff equal sha256 (first 128 bits), -1 where none; rank of the sha
    string) from the parsed words."""
    n = len(ok)
    ids = np.full(n, -1, np.int64)
    rank = np.full(n, -1, np.int64)
    if ok.any():
        rows = np.flatnonzero(ok)
        # lowercase hex of equal length orders like the numbers it spells
        order = np.lexsort((words[rows, 1], words[rows, 0]))
        w = words[rows[order]]
        new = np.ones(len(order), bool)
        new[1:] = (w[1:] != w[:-1]).any(axis=1)
        ids[rows[order]] = np.cumsum(new) - 1
        rank[rows[order]] = np.arange(len(order))
    return ids, rank


def _probe_fines(manifest: str | os.PathLike, computed: dict[int, str], rows: np.ndarray,
                 values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 256-bit hashes of the probes (row, 64-bit value), read back from the manifest
    (or from `computed`) for those rows only, a batch at a time: ([m, 4] uint64, found)."""
    m = len(rows)
    fine, found = np.zeros((m, 4), _U64), np.zeros(m, bool)
    if not m:
        return fine, found
    order = np.lexsort((values, rows))  # the requests by row
    srows = rows[order]

    def resolve(sel: np.ndarray, sub_rows: np.ndarray, strings: pa.Array) -> None:
        """Requests order[sel], whose rows are `sub_rows` (sorted, distinct), from those
        rows' `phash_variants` strings; a row's first probe of the value wins."""
        v = parse_variants(strings, fines=True)
        gr, gv, gf = sub_rows[v.probe_row], v.probe, v.probe_fine
        o = np.lexsort((gv, gr))
        gr, gv, gf = gr[o], gv[o], gf[o]
        req = order[sel]
        val = values[req]
        lo = np.searchsorted(gr, rows[req], side="left")
        hi = np.searchsorted(gr, rows[req], side="right")
        got = np.zeros(len(req), bool)
        for k in range(int((hi - lo).max())):  # a row holds a few probes
            pos = lo + k
            hit = (pos < hi) & ~got
            hit[hit] &= gv[pos[hit]] == val[hit]
            fine[req[hit]] = gf[pos[hit]]
            got |= hit
        found[req] = got

    mine = np.isin(srows, np.fromiter(computed, np.int64, len(computed)))
    if mine.any():
        sel = np.flatnonzero(mine)
        sub = np.unique(srows[sel])
        resolve(sel, sub, pa.array([computed[int(r)] for r in sub], pa.string()))
    rest = np.flatnonzero(~mine)
    rrows = srows[rest]  # ascending
    offset = 0
    if rest.size:
        for batch in _batches(manifest, ["phash_variants"]):
            lo, hi = np.searchsorted(rrows, [offset, offset + batch.num_rows])
            if hi > lo:
                sub = np.unique(rrows[lo:hi])
                resolve(rest[lo:hi], sub, batch.column(0).take(pa.array(sub - offset)))
            offset += batch.num_rows
            if hi == len(rrows):
                break
    pa.default_memory_pool().release_unused()
    return fine, found


@dataclass
class Plan:
    """What dedup decided, per row of the manifest (arrays of length n)."""

    group: np.ndarray  # int64 index into group_ids, -1: no group
    group_ids: pa.Array  # the content id (string) of each group
    rep: np.ndarray  # int64 row this row duplicates, -1: none
    exact: np.ndarray  # bool: rep has the same sha256
    distance: np.ndarray  # int64 canonical pHash distance to rep (-1: none)
    representative: np.ndarray  # bool: some row duplicates this one
    variants: dict[int, str]  # `phash_variants` computed here for rows that lacked them
    figures: dict[str, Any] = field(default_factory=dict)


class _ProbeSpill:
    """The probes (window and turn hashes), written to scratch files as the batches are
    parsed and read back a chunk at a time: the driver never holds them all (several per
    row: at 10^7 rows about 43 million, 0.6 GB)."""

    def __init__(self, folder: str | os.PathLike, rows: int):
        self.fields = (("row", np.int32 if rows < 2**31 else np.int64), ("probe", _U64),
                       ("is_turn", np.bool_))
        self.paths = {f: Path(folder) / f"probes.{f}" for f, _ in self.fields}
        self._files = {f: open(path, "wb") for f, path in self.paths.items()}
        self.n = 0

    def add(self, rows: np.ndarray, probe: np.ndarray, is_turn: np.ndarray) -> None:
        for (f, dt), arr in zip(self.fields, (rows, probe, is_turn)):
            self._files[f].write(np.ascontiguousarray(arr, dt).tobytes())
        self.n += len(rows)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, probes, is_turn) of `size` probes at a time, in the order they were added."""
        self.close()
        for lo in range(0, self.n, size):
            count = min(size, self.n - lo)
            yield tuple(np.fromfile(self.paths[f], dt, count=count,  # type: ignore[misc]
                                    offset=lo * np.dtype(dt).itemsize)
                        for f, dt in self.fields)


def plan(manifest: str | os.PathLike, p: DedupParams, executor: Executor | None = None,
         data_dir: str | os.PathLike | None = None,
         scratch: str | os.PathLike | None = None) -> Plan:
    """Groups and duplicates of every row of a manifest, with array operations only.

    Reads the columns it needs once (`phash_variants` in batches, parsed into integers);
    hashes the stored bytes (under `data_dir`) of rows that lack `phash_variants`. The
    probes go to a temporary folder under `scratch` (default: the system's) while the
    self-join runs, and come back a chunk at a time for the query.
    """
    with tempfile.TemporaryDirectory(prefix="dedup-", dir=scratch) as tmp:
        return _plan(manifest, p, executor, data_dir, Path(tmp))


def _plan(manifest: str | os.PathLike, p: DedupParams, executor: Executor | None,
          data_dir: str | os.PathLike | None, tmp: Path) -> Plan:
    t_start = time.perf_counter()
    pf = _open(manifest)
    names = set(pf.schema_arrow.names)
    n = pf.metadata.num_rows
    ok_row, indexable, real, blocklist, forensic, has_phash, has_sha = (
        np.zeros(n, bool) for _ in range(7))
    phash = np.zeros(n, _U64)
    sha = np.zeros((n, 2), _U64)  # the first 128 bits of the sha256
    var = Variants.empty(n)  # filled batch by batch; its probes go to the spill
    spill = _ProbeSpill(tmp, n)
    cols = ["sha256", "phash", "status", "label", "kind"]
    cols += ["phash_variants"] if "phash_variants" in names else []
    offset = 0
    for batch in _batches(manifest, cols):  # into numbers, batch by batch
        sl = slice(offset, offset + batch.num_rows)
        status, kind = batch.column("status"), batch.column("kind")
        # rows of outside benchmarks (status `benchmark`) are indexed and block their
        # groups like blocklist rows
        ok_row[sl] = _is(status, "ok")
        indexable[sl] = _is(status, "ok", "blocklist", "benchmark")
        real[sl] = _is(batch.column("label"), "real")
        blocklist[sl] = _is(kind, "blocklist") | _is(status, "benchmark")
        forensic[sl] = _is(kind, "forensic")
        phash[sl], has_phash[sl] = parse_phash(batch.column("phash"))
        sha[sl], has_sha[sl] = _hex_words(
            pc.utf8_slice_codeunits(batch.column("sha256"), 0, 32), 2)
        if "phash_variants" in names:
            v = parse_variants(batch.column("phash_variants"))
            spill.add(v.probe_row.astype(np.int64) + offset, v.probe, v.is_turn)
            var.key[sl], var.fine[sl], var.ok[sl] = v.key, v.fine, v.ok
        offset += batch.num_rows
    sha_id, sha_rank = _sha_ids(sha, has_sha)
    del sha
    key_rank = np.empty(n, np.int64)
    key_rank[pc.sort_indices(pf.read(columns=["key"]).column("key")).to_numpy()] = np.arange(n)

    # the hashes of every row: parsed, or computed from the stored image where missing
    pa.default_memory_pool().release_unused()  # the strings are numbers now
    computed: dict[int, str] = {}
    need = np.flatnonzero(~var.ok & indexable & has_phash) if p.near else np.empty(0, np.int64)
    if need.size and data_dir is not None and "blob" in names:
        blobs = pq.read_table(manifest, columns=["blob"]).column("blob").take(pa.array(need))
        items = [(int(r), b) for r, b in zip(need, blobs.to_pylist()) if b]
        worker = _Factory(_HashBlobs, str(data_dir))
        ex = executor
        results = (ex.map(worker, chunked(items, 16), Resources(cpus=1), desc="dedup hashes")
                   if ex is not None else map(worker(), chunked(items, 16)))
        for res in results:
            computed.update({r: s for r, s in res if s})
        if computed:
            rows = np.array(sorted(computed), np.int64)
            var.put(rows, parse_variants(pa.array([computed[int(r)] for r in rows])))
    spill.add(var.probe_row, var.probe, var.is_turn)  # those of the rows hashed here
    var.probe_row = var.probe = var.is_turn = None  # type: ignore[assignment]
    spill.close()
    hash_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    indexed = has_phash & indexable
    use_var = var.ok & p.near  # near=False: identical pHash (as stored) only
    key = np.where(use_var, var.key, phash)
    del phash
    var.key = None  # type: ignore[assignment]  # `key` from here on
    # the rows' 256-bit hashes outlive the index only for forensic links (tampered rows of a
    # forensic source): otherwise the index's copy per distinct hash is all that is read
    keep_fine = bool((forensic & ~real & indexed).any()) and p.near
    idx_rows = np.flatnonzero(indexed)
    # graph nodes: rows [0, n), one node per distinct indexed hash, one per distinct sha256
    a_parts: list[np.ndarray] = []
    b_parts: list[np.ndarray] = []
    nu, index, windex, verify = 0, None, None, None
    figures: dict[str, Any] = {}
    if idx_rows.size:
        index = HammingIndex(key[idx_rows], p.threshold if p.near else 0, p.capacity)
        nu = len(index)
        a_parts.append(idx_rows)
        b_parts.append(n + index.inverse.astype(np.int64))
        first = idx_rows[_first_of(index.inverse, nu)]
        node_fine, node_fine_ok = var.fine[first], use_var[first]
        if not keep_fine:
            var.fine = None  # type: ignore[assignment]
        check = p.verify_bits < 256
        if p.near and p.threshold > 0:
            verify = (_FineCheck(node_fine, node_fine_ok, node_fine, node_fine_ok, p.verify_bits)
                      if check else None)
            ea, eb = index.pairs(executor, p.tables_per_task, spanning=True, verify=verify)
            a_parts.append(n + ea)
            b_parts.append(n + eb)
            figures["pairs"] = int(ea.size)
        if p.near and p.probe_threshold >= 0:
            # windows (crops) and the other turns of ambiguous orientations, in one batch
            # query against the whole images; the probe's 256-bit hash must agree too,
            # checked for the few that match (their 256-bit hashes are read back then)
            owners, values, nodes = [], [], []
            probes = turns = 0
            for owner, probe, is_turn in spill.chunks(p.probe_chunk):
                keep = indexed[owner]
                owner, probe = owner[keep], probe[keep]
                probes += int(keep.sum())
                turns += int(is_turn[keep].sum())
                del keep, is_turn
                if not owner.size:
                    continue
                if windex is None:
                    windex = HammingIndex(index.unique, p.probe_threshold, p.capacity)
                qi, ui, _ = windex.query(probe, executor, p.tables_per_task,
                                        chunk=p.probe_chunk)
                keep = index.inverse[np.searchsorted(idx_rows, owner[qi])] != ui  # not itself
                qi, ui = qi[keep], ui[keep]
                owners.append(owner[qi])
                values.append(probe[qi])
                nodes.append(ui)
                del owner, probe, qi, ui, keep
            if windex is not None:
                owner, probe = np.concatenate(owners), np.concatenate(values)
                ui = np.concatenate(nodes)
                del owners, values, nodes
                if check and owner.size:
                    pf, found = _probe_fines(manifest, computed, owner, probe)
                    ok = np.bitwise_count(pf ^ node_fine[ui]).sum(axis=1) <= p.verify_bits
                    keep = ok | ~found | ~node_fine_ok[ui]
                    figures["probe_matches_refused"] = int((~keep).sum())
                    owner, ui = owner[keep], ui[keep]
                a_parts.append(owner)
                b_parts.append(n + ui)
                figures["probe_matches"] = int(owner.size)
                del owner, probe, ui
            figures["probes"] = probes
            figures["probe_turns"] = turns
        figures.update(index_tables=len(index.tables), planned_for=int(index.planned),
                       probe_tables=len(windex.tables) if windex is not None else 0)
        # what the grouping below does not read: freed before it allocates its own
        del node_fine, node_fine_ok, first, index, windex, verify
    pa.default_memory_pool().release_unused()
    sha_rows = np.flatnonzero(has_sha & (indexed | ok_row))
    nsha = int(sha_id.max()) + 1 if has_sha.any() else 0
    if sha_rows.size:
        a_parts.append(sha_rows)
        b_parts.append(n + nu + sha_id[sha_rows])
    root = union_find(n + nu + nsha, a_parts, b_parts)[:n].copy()  # the hash nodes go
    del a_parts, b_parts
    index_s = time.perf_counter() - t0

    member = indexed | (has_sha & ok_row)
    # forensic tampered images join the groups of the originals they were made from
    t1 = time.perf_counter()
    fa, fb, ffig = forensic_links(
        manifest, p, executor, data_dir, member=member, real=real & ok_row, forensic=forensic,
        tampered=~real & indexed, key=key, has_key=indexed, fine=var.fine, fine_ok=use_var)
    var.fine = None  # type: ignore[assignment]
    gid_root = root
    if fa.size:  # root[i] is a row (the smallest of its component): join rows only
        gid_root = union_find(n, np.concatenate([np.arange(n), fa]), np.concatenate([root, fb]))
    forensic_s = time.perf_counter() - t1

    # group id: the smallest sha256 (else key) in the component, so it is a content id
    t2 = time.perf_counter()
    group = np.full(n, -1, np.int64)
    group_rows = np.empty(0, np.int64)
    mem = np.flatnonzero(member)
    if mem.size:
        # order members by (component, no sha first = False, sha rank, key rank)
        content = np.where(has_sha[mem], sha_rank[mem], n + key_rank[mem])
        order = np.lexsort((content, gid_root[mem]))
        comp = gid_root[mem][order]
        head = np.ones(len(order), bool)
        head[1:] = comp[1:] != comp[:-1]
        group_rows = mem[order][head]  # the row naming each group
        gidx = np.cumsum(head) - 1
        group[mem[order]] = gidx
        del content, order, comp, head, gidx
    del mem, gid_root

    # representatives: real rows keep one per group of copies; tampered/synthetic rows keep
    # one per sha256 (two forgeries of one photo are near-duplicates by design, not copies)
    rep = np.full(n, -1, np.int64)
    cand = np.flatnonzero(member & ok_row & ~blocklist)
    if cand.size:
        # read only now: not held through the index
        sizes = _open(manifest).read(columns=["width", "height", "nbytes"])
        area = _num(sizes.column("width"))[cand] * _num(sizes.column("height"))[cand]
        nbytes = _num(sizes.column("nbytes"))[cand]
        del sizes
        unit_real = real[cand]
        unit = np.where(unit_real, root[cand], np.where(has_sha[cand], sha_id[cand], -1))
        # one unit namespace: real units by component, others by sha256 (else by row)
        kind_of = np.where(unit_real, 0, np.where(has_sha[cand], 1, 2))
        unit = np.where(kind_of == 2, cand, unit)
        # largest image, then most bytes, then the smallest key: deterministic
        order = np.lexsort((key_rank[cand], -nbytes, -area, unit, kind_of))
        u, k = unit[order], kind_of[order]
        head = np.ones(len(order), bool)
        head[1:] = (u[1:] != u[:-1]) | (k[1:] != k[:-1])
        first = np.flatnonzero(head)
        lead = cand[order][first[np.cumsum(head) - 1]]
        rows = cand[order]
        del order, u, k, head, first, unit, kind_of, unit_real, area, nbytes
        dup = rows != lead
        rep[rows[dup]] = lead[dup]
        del rows, lead, dup
    del cand, root, key_rank, sha_rank
    is_dup = rep >= 0
    exact = np.zeros(n, bool)
    distance = np.full(n, -1, np.int64)
    d_rows = np.flatnonzero(is_dup)
    exact[d_rows] = has_sha[d_rows] & (sha_id[d_rows] == sha_id[rep[d_rows]])
    distance[d_rows] = np.bitwise_count(key[d_rows] ^ key[rep[d_rows]])
    representative = np.zeros(n, bool)
    representative[rep[d_rows]] = True
    group_ids = _group_names(manifest, group_rows, has_sha)
    plan_s = time.perf_counter() - t2

    gsize = np.bincount(group[group >= 0], minlength=len(group_rows))
    block_groups = np.unique(group[blocklist & (group >= 0)])
    in_block = np.isin(group, block_groups) & (group >= 0)
    figures.update({
        "indexed": int(indexed.sum()),
        "unique_phash": int(nu),
        "index_tables": figures.get("index_tables", 0),
        "probe_tables": figures.get("probe_tables", 0),
        "planned_for": figures.get("planned_for", 0),
        "hashed_here": len(computed),
        "hash_seconds": round(hash_s, 3),
        "index_seconds": round(index_s, 3),
        "forensic_seconds": round(forensic_s, 3),
        "plan_seconds": round(plan_s, 3),
        "groups": len(group_rows),
        "groups_with_copies": int((gsize > 1).sum()),
        "exact_duplicates": int((is_dup & exact).sum()),
        "near_duplicates": int((is_dup & ~exact).sum()),
        "blocklist_groups": len(block_groups),
        "blocklist_near_rows": int((in_block & ~blocklist).sum()),
        "no_phash_ok_rows": int((ok_row & ~has_phash).sum()),
        "threshold": p.threshold,
        **ffig,
    })
    return Plan(group, group_ids, rep, exact, distance, representative, computed, figures)


def _group_names(manifest: str | os.PathLike, rows: np.ndarray, has_sha: np.ndarray) -> pa.Array:
    """sha256 (else key) of each group's naming row, read back in batches."""
    if not rows.size:
        return pa.array([], pa.string())
    order = np.argsort(rows)
    want = rows[order]
    parts, pos, offset = [], 0, 0
    for batch in _batches(manifest, ["key", "sha256"]):
        end = offset + batch.num_rows
        stop = int(np.searchsorted(want, end))
        if stop > pos:
            local = pa.array(want[pos:stop] - offset)
            sha = batch.column(1).take(local)
            use = pa.array(has_sha[want[pos:stop]])
            parts.append(pc.if_else(use, sha, batch.column(0).take(local)))
            pos = stop
        offset = end
    names = pa.concat_arrays([x.cast(pa.string()) for x in parts])
    back = np.empty(len(rows), np.int64)
    back[order] = np.arange(len(rows))
    return names.take(pa.array(back))


# --------------------------------------------------------------------------- forensic links

_ORB_SIDE = 1024  # keypoints are found on images scaled to at most this side
_ORB_FEATURES = 1000
_MIN_INLIERS = 12  # geometrically consistent keypoint matches that make a region match


def _small_gray(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    scale = min(1.0, _ORB_SIDE / max(gray.shape))
    if scale < 1.0:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return gray, scale


def _orb(gray: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(points [k, 2] float32, descriptors [k, 32] uint8) of ORB keypoints (inside `mask`)."""
    import cv2

    orb = cv2.ORB_create(nfeatures=_ORB_FEATURES)
    kp, des = orb.detectAndCompute(gray, mask)
    if des is None or not kp:
        return np.empty((0, 2), np.float32), np.empty((0, 32), np.uint8)
    return np.array([k.pt for k in kp], np.float32), des


class _Keypoints:
    """Worker: ORB keypoints of stored real images (the originals a forensic source ships)."""

    def __init__(self, data_dir: str):
        self.data = Path(data_dir)

    def __call__(self, items: list[tuple[int, str]]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        out = []
        for row, blob in items:
            try:
                gray, _ = _small_gray(imageio.read_rgb(self.data / blob))
            except Exception as e:  # noqa: BLE001 - an unreadable original is just not matched
                log.warning("dedup: cannot read %s: %s", blob, e)
                continue
            pts, des = _orb(gray)
            out.append((row, pts, des))
        return out


class _RegionMatch:
    """Worker: the originals whose keypoints match a tampered image's tampered region (its
    donor) or the rest of it (its host), checked by a RANSAC similarity transform."""

    def __init__(self, data_dir: str, rows: list[int], pts: list[np.ndarray],
                 des: list[np.ndarray]):
        self.data = Path(data_dir)
        self.rows, self.pts, self.des = rows, pts, des
        self._matcher = None

    def _match(self):
        import cv2

        if self._matcher is None:
            cv2.setRNGSeed(0)  # FLANN's LSH tables are random: the same tables every run
            m = cv2.FlannBasedMatcher(
                {"algorithm": 6, "table_number": 12, "key_size": 20, "multi_probe_level": 2},
                {"checks": 64})
            m.add([d if len(d) else np.zeros((1, 32), np.uint8) for d in self.des])
            m.train()
            self._matcher = m
        return self._matcher

    def __call__(self, items: list[tuple[int, str, str | None]]) -> list[tuple[int, int, str]]:
        import cv2

        out = []
        for row, blob, mask_blob in items:
            try:
                gray, _ = _small_gray(imageio.read_rgb(self.data / blob))
                mask = None
                if mask_blob:
                    m = imageio.decode_mask((self.data / mask_blob).read_bytes())
                    mask = cv2.resize(m.astype(np.uint8) * 255, gray.shape[::-1],
                                      interpolation=cv2.INTER_NEAREST) > 0
            except Exception as e:  # noqa: BLE001 - an unreadable image is just not matched
                log.warning("dedup: cannot read %s: %s", blob, e)
                continue
            parts: dict[str, np.ndarray | None] = {"host": None}
            if mask is not None and mask.any():
                r = max(1, round(0.02 * min(mask.shape)))
                kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
                grown = cv2.dilate(mask.astype(np.uint8), kernel)
                parts = {"donor": grown * 255,
                         "host": (cv2.dilate(grown, kernel) == 0).astype(np.uint8) * 255}
            for part, region in parts.items():
                for orig in self._candidates(gray, region):
                    out.append((row, orig, part))
        return out

    def _candidates(self, gray: np.ndarray, region: np.ndarray | None) -> list[int]:
        import cv2

        pts, des = _orb(gray, region)
        if len(des) < 2:
            return []
        by_image: dict[int, list[tuple[int, int]]] = {}
        for m in self._match().knnMatch(des, k=2):
            if not m:
                continue
            best = m[0]
            # a match is distinctive unless its runner-up, in the same image, is as close
            if len(m) > 1 and m[1].imgIdx == best.imgIdx and best.distance >= 0.8 * m[1].distance:
                continue
            by_image.setdefault(best.imgIdx, []).append((best.queryIdx, best.trainIdx))
        found = []
        for img, pairs in sorted(by_image.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:5]:
            if len(pairs) < _MIN_INLIERS:
                break
            q = pts[[i for i, _ in pairs]]
            t = self.pts[img][[j for _, j in pairs]]
            _, inliers = cv2.estimateAffinePartial2D(q, t, method=cv2.RANSAC,
                                                     ransacReprojThreshold=4.0, maxIters=2000,
                                                     confidence=0.999, refineIters=0)
            if inliers is not None and int(inliers.sum()) >= _MIN_INLIERS:
                found.append(self.rows[img])
        return found


def forensic_links(manifest: str | os.PathLike, p: DedupParams, executor: Executor | None,
                   data_dir: str | os.PathLike | None, *, member: np.ndarray, real: np.ndarray,
                   forensic: np.ndarray, tampered: np.ndarray, key: np.ndarray,
                   has_key: np.ndarray, fine: np.ndarray, fine_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Edges (tampered row, real row) from forensic tampered images to their originals.

    By hash: the canonical pHash within `forensic_threshold` of a real image's (any source),
    and the 256-bit hashes within `verify_bits` (a filled-in form is not linked to every
    other form of its template).
    By region (`forensic_regions`, needs the stored images): ORB keypoints of the tampered
    region and of the rest, matched (FLANN LSH, ratio test, RANSAC) against the originals of
    the forensic sources; a splice finds its donor and its host.
    """
    e = np.empty(0, np.int64)
    q_rows = np.flatnonzero(forensic & tampered & member)
    if not q_rows.size or not p.near:
        return e, e, {}
    r_rows = np.flatnonzero(real & has_key)
    a_parts, b_parts = [e], [e]
    by_hash = 0
    if r_rows.size:
        if len(q_rows) * len(r_rows) <= 2_000_000_000:
            qi, ri = brute_force_query(key[q_rows], key[r_rows], p.forensic_threshold)
            hit = r_rows[ri]
        else:
            index = HammingIndex(key[r_rows], p.forensic_threshold)
            qi, ui, _ = index.query(key[q_rows], executor, p.tables_per_task)
            hit = r_rows[_first_of(index.inverse, len(index))][ui]
        qrow = q_rows[qi]
        if p.verify_bits < 256:
            d = np.bitwise_count(fine[qrow] ^ fine[hit]).sum(axis=1)
            ok = (d <= p.verify_bits) | ~fine_ok[qrow] | ~fine_ok[hit]
            qrow, hit = qrow[ok], hit[ok]
        a_parts.append(qrow)
        b_parts.append(hit)
        by_hash = int(qrow.size)
    by_region = 0
    originals = np.flatnonzero(forensic & real)
    if p.forensic_regions and data_dir is not None and originals.size:
        cols = pq.read_table(manifest, columns=["blob", "mask_blob"])
        blob, mask_blob = cols.column("blob"), cols.column("mask_blob")
        o_blobs = blob.take(pa.array(originals)).to_pylist()
        items = [(int(r), b) for r, b in zip(originals, o_blobs) if b]
        kp_factory = _Factory(_Keypoints, str(data_dir))
        feats = []
        for res in (executor.map(kp_factory, chunked(items, 16), Resources(cpus=1),
                                 desc="dedup keypoints")
                    if executor is not None else map(kp_factory(), chunked(items, 16))):
            feats.extend(res)
        feats = [f for f in feats if len(f[2])]
        if feats:
            t_items = [(int(r), b, m) for r, b, m in zip(
                q_rows, blob.take(pa.array(q_rows)).to_pylist(),
                mask_blob.take(pa.array(q_rows)).to_pylist()) if b]
            factory = _Factory(_RegionMatch, str(data_dir), [f[0] for f in feats],
                               [f[1] for f in feats], [f[2] for f in feats])
            links = []
            for res in (executor.map(factory, chunked(t_items, 16), Resources(cpus=1),
                                     desc="dedup regions")
                        if executor is not None else map(factory(), chunked(t_items, 16))):
                links.extend(res)
            if links:
                a_parts.append(np.array([t for t, _, _ in links], np.int64))
                b_parts.append(np.array([o for _, o, _ in links], np.int64))
                by_region = len(links)
    a, b = unique_edges(np.concatenate(a_parts), np.concatenate(b_parts), len(member))
    linked = np.unique(a)
    per = Counter(a.tolist())
    return a, b, {
        "forensic_tampered": int(q_rows.size),
        "forensic_linked": int(linked.size),
        "forensic_links_by_hash": by_hash,
        "forensic_links_by_region": by_region,
        "forensic_several_originals": sum(1 for v in per.values() if v > 1),
    }


# --------------------------------------------------------------------------- the stage


def _conform(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    """The batch's columns under SCHEMA (a column the input lacks is all null)."""
    out = {}
    for f in SCHEMA:
        i = batch.schema.get_field_index(f.name)
        out[f.name] = (batch.column(i).cast(f.type) if i >= 0
                       else pa.nulls(batch.num_rows, f.type))
    return out


def write_plan(src: str | os.PathLike, out: Path, pl: Plan, keep_duplicates: bool) -> None:
    """Streams the manifest with the plan applied into out/manifest.parquet and
    out/groups.parquet, batch by batch, column operations only."""
    for stale in [*out.glob(".manifest.parquet.*.tmp"), *out.glob(".groups.parquet.*.tmp")]:
        stale.unlink(missing_ok=True)  # a killed run's (the data_dir lock keeps runs apart)
    tmp = out / f".manifest.parquet.{os.getpid()}.tmp"  # unique: two writers never share one
    gtmp = out / f".groups.parquet.{os.getpid()}.tmp"
    gschema = pa.schema([("key", pa.string()), ("group_id", pa.string()),
                         ("representative", pa.bool_()), ("duplicate_of", pa.string())])
    keys_of_rep: dict[int, str] = {}
    reps = np.unique(pl.rep[pl.rep >= 0])
    # the keys of representatives, read once (they may sit in any batch)
    if reps.size:
        offset = 0
        for batch in _batches(src, ["key"]):
            lo, hi = np.searchsorted(reps, [offset, offset + batch.num_rows])
            if hi > lo:
                local = reps[lo:hi] - offset
                keys_of_rep.update(zip(reps[lo:hi].tolist(),
                                       batch.column(0).take(pa.array(local)).to_pylist()))
            offset += batch.num_rows
    with pq.ParquetWriter(tmp, SCHEMA) as w, pq.ParquetWriter(gtmp, gschema) as gw:
        offset = 0
        for batch in _batches(src, None):
            n = batch.num_rows
            sl = slice(offset, offset + n)
            cols = _conform(batch)
            group = pl.group[sl]
            gid = pl.group_ids.take(pa.array(np.where(group >= 0, group, 0),
                                             mask=group < 0)) if len(pl.group_ids) else \
                pa.nulls(n, pa.string())
            cols["group_id"] = pc.if_else(pa.array(group >= 0), gid, cols["group_id"])
            rep = pl.rep[sl]
            dup = rep >= 0
            rep_key = np.full(n, None, dtype=object)
            rep_key[dup] = [keys_of_rep[int(r)] for r in rep[dup]]
            rep_key = pa.array(rep_key, pa.string())
            if dup.any():
                note = np.array([None] * n, dtype=object)
                ex, dist = pl.exact[sl], pl.distance[sl]
                for i in np.flatnonzero(dup):
                    note[i] = (f"exact duplicate of {keys_of_rep[int(rep[i])]}" if ex[i] else
                               f"near duplicate of {keys_of_rep[int(rep[i])]} "
                               f"(hash distance {int(dist[i])})")
                dmask = pa.array(dup)
                if keep_duplicates:
                    cols["duplicate_of"] = pc.if_else(dmask, rep_key, cols["duplicate_of"])
                    kind = pa.array(np.where(ex, "exact", "near").astype(object), pa.string())
                    cols["duplicate_kind"] = pc.if_else(dmask, kind, cols["duplicate_kind"])
                else:
                    cols["status"] = pc.if_else(dmask, pa.scalar("duplicate"), cols["status"])
                    cols["error"] = pc.if_else(dmask, pa.array(note, pa.string()), cols["error"])
                    cols["stage"] = pc.if_else(dmask, pa.scalar("dedup"), cols["stage"])
            if pl.variants:
                fill = [pl.variants.get(i) for i in range(offset, offset + n)]
                cols["phash_variants"] = pc.coalesce(cols["phash_variants"],
                                                     pa.array(fill, pa.string()))
            w.write_table(pa.Table.from_pydict(cols, schema=SCHEMA))
            gw.write_table(pa.table({
                "key": cols["key"], "group_id": cols["group_id"],
                "representative": pa.array(pl.representative[sl]),
                "duplicate_of": rep_key}, schema=gschema))
            offset += n
    os.replace(tmp, out / "manifest.parquet")
    os.replace(gtmp, out / "groups.parquet")


def run(params: Any, inputs: dict[str, Path], out: Path, executor: Executor) -> dict:
    """Groups exact and near copies, marks all but one real copy per group as duplicates."""
    p: DedupParams = params.dedup
    src = Path(inputs["manifest"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pl = plan(src, p, executor, data_dir=params.data, scratch=out)  # the probes' files
    write_plan(src, out, pl, p.keep_duplicates)
    metrics: dict[str, Any] = counts(iter_records(out / "manifest.parquet"))
    metrics["dedup"] = pl.figures
    f = pl.figures
    log.info("dedup: %d rows, %d groups, %d exact + %d near duplicates", len(pl.group),
             f["groups"], f["exact_duplicates"], f["near_duplicates"])
    return metrics


STAGE = Stage(
    name="dedup",
    help="exact and near-duplicate groups over real sources",
    params=DedupParams,
    run=run,
    reads=("ingest",),
    writes={"dedup": "dedup"},
    code=("pipeline/hamming.py",),
)
