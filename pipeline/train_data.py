"""Training samples streamed from an export's WebDataset tars, never unpacked to files.

Each data *slot* (one DataLoader worker of one training process: `rank * loader_workers +
worker`) reads its own part of the shards: whole shards when there are at least as many
shards as slots (webdataset's split-by-node / split-by-worker), otherwise every
`n_slots`-th sample of every shard, dropped before decoding. The stream is endless: epoch
after epoch, the shard order and a bounded shuffle buffer are reseeded from (seed, epoch),
and each sample's crop from (seed, epoch, key), so a run is reproducible and a resumed run
continues where each slot stopped (it skips the raw samples it had already produced, whole
epochs by arithmetic on the shard counts).

A train tar holding a record whose split is not `train` (or whose status is not `ok`) is a
corrupt export: the stream raises instead of training on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import imageio
from pipeline.views import chw, cut, random_window, resize, valid_mask


class LeakError(ValueError):
    """A sample from another split (or not shippable) inside the shards being read."""


@dataclass(frozen=True)
class Shard:
    url: str
    count: int


def list_shards(split_dir: Path) -> list[Shard]:
    """The complete tars of one split folder of an export, with their sample counts."""
    out = []
    for tar in sorted(Path(split_dir).glob("*.tar")):
        stats = tar.with_name(tar.stem + "_stats.json")
        if not stats.exists():
            raise FileNotFoundError(f"{tar}: no {stats.name}; the shard is incomplete, rerun export")
        out.append(Shard(str(tar), int(json.loads(stats.read_text())["count"])))
    return out


def raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Undecoded samples ({'__key__', 'json', 'mask.png', <ext>: bytes}) of the tars, in order."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": u} for u in urls])


def decode_sample(raw: dict[str, Any], split: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(record, RGB H x W x 3, bool mask H x W) of a raw sample; checks split and shape."""
    rec = json.loads(raw["json"])
    if rec.get("split") != split or rec.get("status", "ok") != "ok":
        raise LeakError(f"{raw.get('__url__')}: sample {raw['__key__']} has split "
                        f"{rec.get('split')!r} status {rec.get('status')!r}; only {split!r} "
                        "samples with status 'ok' may be read here")
    fmt = rec["format"]
    if fmt not in raw or "mask.png" not in raw:
        raise ValueError(f"{raw.get('__url__')}: sample {raw['__key__']} lacks .{fmt} or .mask.png")
    rgb = imageio.decode(raw[fmt])
    mask = imageio.decode_mask(raw["mask.png"])
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{raw['__key__']}: mask {mask.shape} and image {rgb.shape[:2]} differ")
    return rec, rgb, mask


def key_seed(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)


@dataclass(frozen=True)
class CropConfig:
    crop: int
    vlm_size: int
    global_view: bool = True
    focus_prob: float = 0.5  # share of tampered crops placed on the forged region
    fake_min_pixels: int = 16  # a crop is "fake" with at least this many forged pixels


def make_views(rgb: np.ndarray, tile: np.ndarray, cfg: CropConfig) -> np.ndarray:
    """The VLM's views of one crop or tile: [global, local] (or [local]), uint8 V x 3 x s x s."""
    local = chw(resize(tile, cfg.vlm_size))
    if not cfg.global_view:
        return local[None]
    return np.stack([chw(resize(rgb, cfg.vlm_size)), local])


def crop_sample(rec: dict[str, Any], rgb: np.ndarray, mask: np.ndarray, cfg: CropConfig,
                rng: np.random.Generator) -> dict[str, Any]:
    """One training example: a native-resolution crop, its mask, views and answer."""
    focus = rec["label"] == "tampered" and rng.random() < cfg.focus_prob
    win = random_window(mask, cfg.crop, rng, focus)
    tile = cut(rgb, win, cfg.crop)
    m = cut(mask, win, cfg.crop)
    fake = rec["label"] == "synthetic" or int(m.sum()) >= cfg.fake_min_pixels
    return {
        "sam": chw(tile),
        "views": make_views(rgb, tile, cfg),
        "mask": m.astype(np.uint8),
        "valid": valid_mask(win, cfg.crop),
        "fake": int(fake),
        "key": rec["key"],
    }


class CropStream(IterableDataset):
    """Endless stream of training crops for one training process (see the module doc)."""

    def __init__(self, shards: list[Shard], cfg: CropConfig, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle_buffer: int = 32, skip_batches: int = 0,
                 batch_size: int = 1, split: str = "train"):
        if not shards or sum(s.count for s in shards) == 0:
            raise ValueError("no training samples: the export's train split is empty")
        self.shards, self.cfg, self.rank, self.world = shards, cfg, rank, world
        self.seed, self.buffer, self.split = seed, max(1, shuffle_buffer), split
        self.skip_batches, self.batch_size = skip_batches, batch_size

    def check_slots(self, loader_workers: int) -> None:
        n = self.world * max(1, loader_workers)
        total = sum(s.count for s in self.shards)
        if total < n:
            raise ValueError(f"{total} training samples cannot feed {n} data slots "
                             "(workers x loader workers); lower train.loader_workers")

    def _assignment(self, epoch: int, slot: int, n_slots: int) -> tuple[list[Shard], bool]:
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= n_slots:
            return shards[slot::n_slots], False
        return shards, True  # too few shards: split by sample index instead

    def _epoch_len(self, epoch: int, slot: int, n_slots: int) -> int:
        shards, by_sample = self._assignment(epoch, slot, n_slots)
        total = sum(s.count for s in shards)
        return len(range(slot, total, n_slots)) if by_sample else total

    def _raw(self, epoch: int, slot: int, n_slots: int) -> Iterator[dict[str, Any]]:
        shards, by_sample = self._assignment(epoch, slot, n_slots)
        rng = np.random.default_rng([self.seed, epoch, slot])
        buf: list[dict[str, Any]] = []
        for i, raw in enumerate(raw_samples([s.url for s in shards])):
            if by_sample and i % n_slots != slot:
                continue
            if len(buf) < self.buffer:
                buf.append(raw)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], raw = raw, buf[j]
            yield raw
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, n_slots = self.rank * nw + wid, self.world * nw
        # batches go round-robin over loader workers: this worker made every nw-th one
        skip = len(range(wid, self.skip_batches, nw)) * self.batch_size
        epoch = 0
        while skip and skip >= self._epoch_len(epoch, slot, n_slots):
            skip -= self._epoch_len(epoch, slot, n_slots)
            epoch += 1
        while True:
            n = 0
            for raw in self._raw(epoch, slot, n_slots):
                n += 1
                if skip:
                    skip -= 1
                    continue
                rec, rgb, mask = decode_sample(raw, self.split)
                rng = np.random.default_rng([self.seed, epoch, key_seed(rec["key"])])
                sample = crop_sample(rec, rgb, mask, self.cfg, rng)
                sample["epoch"] = epoch
                yield sample
            if n == 0:
                raise RuntimeError(f"data slot {slot} of {n_slots} got no samples in epoch {epoch}")
            epoch += 1


def iter_split(shards: list[Shard], split: str, limit: int | None = None
               ) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """(record, RGB, mask) of every sample of a split, in shard order (validation)."""
    for i, raw in enumerate(raw_samples([s.url for s in shards])):
        if limit is not None and i >= limit:
            return
        yield decode_sample(raw, split)
