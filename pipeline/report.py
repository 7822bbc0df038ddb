"""The report stage: one static HTML page to judge the corpus and the model by eye.

`data_dir/report/index.html`, with small JPEG thumbnails in `thumbs/` and matplotlib charts
in `fig/` beside it: no server, no network, no script; it opens from disk in any browser.

Sections (each has an `id`, linked from the top of the page):

- `counts`: rows by domain, operation, generator, split and status (bar charts and tables),
  domain x operation of the shipped rows, label x split, and each stage's metrics;
- `generators`: per generator a few shipped samples, source | forgery | mask overlay |
  difference map, with key, model id, mask area and quality; random-weight stand-in models
  (`model_id` `tiny-random:` / `mid-random:`) are labelled as such;
- `rejected`: per reason (`status`), a few rows with the same panels and the recorded error;
- `duplicates`: a few near-duplicate groups with their members and the one that was shipped;
- `distributions`: image sizes, mask areas, mask quality, JPEG quality (real vs forged);
- `exports`: per export and fraction, cells (domain, operation) and counts against the
  target balance, and the dataset cards;
- `model`: training, evaluation, worst samples, robustness, scaling and transfer, each shown
  when its file exists and otherwise named in one line (files and keys: see below);
- `sampling`: how the page was made.

Scale. The manifest is streamed in record batches (pyarrow), at most twice. The first pass
counts everything exactly (counts, histograms) and keeps, per cell (generator, reason,
group), the k rows with the smallest `unit_hash(seed, key)`: a bottom-k sample, uniform in
its cell, independent of the row order, the same for the same inputs. The second pass
fetches only what the picks refer to (group members, parent images, the evaluation's worst
keys). Memory is bounded by the batch size and the number of picks, never by the corpus.

Model files, all optional and read defensively (a missing or unexpected key shows "n/a"):

- `metrics/train.json`: `preset`, `steps`, `samples`, `epochs`, `train_samples`,
  `loss_first`, `loss`, `loss_txt`, `loss_seg`, `samples_per_s`, `wall_s`, `params_total`,
  `params_trainable`, `val_pixel_f1`, `val_image_accuracy`;
  `plots/train.csv` (`step` and `loss*` columns, any `val_*` columns) and
  `plots/train_val.csv` (`step` and `val_*` columns); `data/train/model/` (listed).
- `metrics/evaluate.json`: `sets` (or `splits` and `benchmarks`): name -> BLOCK, where
  BLOCK = {`n`, `image`: {`auc`, `ap`, `accuracy`, `balanced_accuracy`},
  `pixel`: {`f1`, `iou`, `f1_best`}, `baselines`: {name: BLOCK},
  `by_domain` / `by_operation` / `by_generator` / `by_source`: {value: BLOCK}}; a value is a
  number or {`value`, `ci`: [lo, hi]} (flat `image_auc`, `image_auc_ci` are read too);
  `robustness`: {set: {perturbation: BLOCK of deltas}} (or {perturbation: BLOCK});
  `plots/evaluate_roc_<set>.csv` (`fpr`, `tpr`) and `plots/evaluate_pr_<set>.csv`
  (`recall`, `precision`), or one file per kind with a `set` column.
- `data/evaluate/worst.parquet`: `key`, `domain`, `operation`, `generator`, `pixel_f1`,
  `score`, `label`, `pred_mask` (path: absolute, under data_dir, or under data/evaluate),
  optionally `by`, `set`, `blob`, `mask_blob` (else looked up by key in the manifest).
- `metrics/scaling.json`: `points`: [{`fraction`, `train_samples`, `image_auc`, `pixel_f1`}],
  `fit`: {metric: {`a`, `b`, `c`}} for err(N) = a * N^-b + c with err = 1 - metric.
- `metrics/transfer.json` (or `transfer` inside scaling.json or evaluate.json):
  {metric: {train domain: {eval domain: value}}}.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.executor import Executor
from pipeline.imageio import write_bytes
from pipeline.params import Params
from pipeline.records import FIELDS
from pipeline.split import unit_hash
from pipeline.stage import Stage

log = logging.getLogger(__name__)

STAND_IN_PREFIXES = ("tiny-random:", "mid-random:")
COUNT_DIMS = ("domain", "operation", "generator", "split", "status")
_CUBE = (
    "label",
    "domain",
    "operation",
    "generator",
    "model_id",
    "split",
    "status",
    "stage",
    "format",
)
AREA_BINS = np.geomspace(1e-5, 1.0, 51)  # mask areas span orders of magnitude
QUALITY_BINS = np.linspace(0.0, 1.0, 51)
JPEG_BINS = np.arange(0.5, 101.5, 1.0)
SIZE_BINS = np.arange(4.0, 14.51, 0.25)  # log2 of pixels: 16 px to 23 k px
SECTIONS = (
    "counts",
    "generators",
    "rejected",
    "duplicates",
    "distributions",
    "exports",
    "model",
    "sampling",
)


@dataclass(frozen=True)
class ReportParams:
    samples_per_generator: int = 4  # shipped forgeries shown per generator
    max_generators: int = 40  # generators shown (most rows first); the rest are named
    samples_per_reason: int = 3  # rejected rows shown per reason
    duplicate_groups: int = 4  # near-duplicate groups shown
    members_per_group: int = 6  # members shown per group (the shipped one always)
    worst_cells: int = 12  # evaluation cells (domain, operation, generator) shown
    worst_per_cell: int = 2  # worst samples shown per cell
    thumb_px: int = 160  # longest side of a thumbnail
    batch_rows: int = 65536  # manifest rows per record batch

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"report.{f.name}: {v!r}; allowed: an integer >= 0")
        if self.thumb_px < 32:
            raise ValueError(f"report.thumb_px: {self.thumb_px!r}; allowed: >= 32")
        if self.batch_rows < 1:
            raise ValueError(f"report.batch_rows: {self.batch_rows!r}; allowed: >= 1")


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Writes `out/index.html`, `out/thumbs/`, `out/fig/` from the run's files."""
    p: ReportParams = params.report
    out = Path(out)
    for sub in ("thumbs", "fig"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (out / sub).mkdir(parents=True)
    scan = Scan(p, params.seed)
    scan.first_pass(inputs["manifest"])
    model = ModelFiles.read(params)
    scan.second_pass(inputs["manifest"], extra_keys=model.worst_keys(p))
    page = Page(params, out)
    body = [
        counts_section(scan, params, page),
        generators_section(scan, page),
        rejected_section(scan, page),
        duplicates_section(scan, page),
        distributions_section(scan, page),
        exports_section(scan, params, inputs.get("exports"), page),
        model_section(model, scan, params, page),
        sampling_section(scan, p, inputs["manifest"]),
    ]
    text = page.document(scan, body)
    # a new file, never written into: under DVC the old page may be a link to its cache
    write_bytes(out / "index.html", text.encode("utf-8"))
    files = sorted(f for f in out.rglob("*") if f.is_file())
    log.info(
        "report: %d rows, %d thumbnails, %d charts -> %s",
        scan.rows,
        page.thumbs.count,
        page.figures,
        out / "index.html",
    )
    return {
        "total": scan.rows,
        "rows": scan.rows,
        "batches": scan.batches,
        "sampled": {
            "generators": {g: len(v) for g, v in sorted(scan.gallery.best.items())},
            "rejected": {s: len(v) for s, v in sorted(scan.rejected.best.items())},
            "duplicate_groups": len(scan.dup_groups),
        },
        "thumbnails": page.thumbs.count,
        "figures": page.figures,
        "model_sections": model.present(),
        "html_bytes": len(text.encode()),
        "total_bytes": sum(f.stat().st_size for f in files),
    }


# --------------------------------------------------------------------------- streaming


class BottomK:
    """Per category, the k rows with the smallest rank seen so far (ties broken by key)."""

    def __init__(self, k: int):
        self.k = k
        self.best: dict[str, list[tuple[float, str, dict[str, Any]]]] = {}
        self.seen: Counter = Counter()

    def offer(self, table: pa.Table, cats: np.ndarray, ranks: np.ndarray, mask: np.ndarray) -> None:
        idx = np.flatnonzero(mask)
        if not idx.size:
            return
        labels = cats[idx]
        for c in sorted(set(labels.tolist())):
            ii = idx[labels == c]
            self.seen[c] += int(ii.size)
            if self.k == 0:
                continue
            if ii.size > self.k:
                ii = ii[np.argpartition(ranks[ii], self.k - 1)[: self.k]]
            cur = self.best.setdefault(c, [])
            if len(cur) >= self.k:
                ii = ii[ranks[ii] < cur[-1][0]]
            if not ii.size:
                continue
            rows = table.take(pa.array(ii)).to_pylist()
            cur.extend((float(ranks[i]), r["key"], r) for i, r in zip(ii, rows, strict=True))
            cur.sort(key=lambda t: (t[0], t[1]))
            del cur[self.k :]

    def rows(self, c: str) -> list[dict[str, Any]]:
        return [r for _, _, r in self.best.get(c, [])]


def _strs(col: pa.ChunkedArray) -> np.ndarray:
    """A string column as an object array of str, nulls as ''."""
    return np.asarray(
        pc.fill_null(col.cast(pa.string()), "").to_numpy(zero_copy_only=False), dtype=object
    )


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)


class Scan:
    """What the page needs from the manifest, gathered in one streaming pass (plus a second
    one for what the picks refer to)."""

    def __init__(self, p: ReportParams, seed: int):
        self.p = p
        self.seed = seed
        self.rows = 0
        self.batches = 0
        self.cube: Counter = Counter()  # (label, domain, ..., format) -> rows
        self.hist: dict[str, np.ndarray] = {
            "area_ok": np.zeros(len(AREA_BINS) - 1),
            "area_rejected": np.zeros(len(AREA_BINS) - 1),
            "quality_ok": np.zeros(len(QUALITY_BINS) - 1),
            "quality_rejected": np.zeros(len(QUALITY_BINS) - 1),
            "jpeg_real": np.zeros(len(JPEG_BINS) - 1),
            "jpeg_forged": np.zeros(len(JPEG_BINS) - 1),
            "side_real": np.zeros(len(SIZE_BINS) - 1),
            "side_forged": np.zeros(len(SIZE_BINS) - 1),
            "size2d": np.zeros((len(SIZE_BINS) - 1, len(SIZE_BINS) - 1)),
        }
        self.gallery = BottomK(p.samples_per_generator)
        self.rejected = BottomK(p.samples_per_reason)
        self.dup_rows = 0
        self.dup_groups: dict[str, float] = {}  # group_id -> rank, the k smallest
        self.members: dict[str, list[dict[str, Any]]] = {}
        self.group_sizes: Counter = Counter()  # (group, "real"|"forged") -> rows
        self.by_key: dict[str, dict[str, Any]] = {}

    # ---- pass 1
    def first_pass(self, manifest: Path) -> None:
        pf = pq.ParquetFile(manifest)
        names = [n for n in pf.schema_arrow.names if n in FIELDS]
        for batch in pf.iter_batches(batch_size=self.p.batch_rows, columns=names):
            self.batches += 1
            self._batch(pa.Table.from_batches([batch]))

    def _col(self, t: pa.Table, name: str) -> pa.ChunkedArray:
        if name in t.column_names:
            return t[name]
        return pa.chunked_array([pa.nulls(t.num_rows, pa.string())])

    def _batch(self, t: pa.Table) -> None:
        n = t.num_rows
        self.rows += n
        cube = pa.table({c: self._col(t, c).cast(pa.string()) for c in _CUBE})
        for row in cube.group_by(list(_CUBE)).aggregate([([], "count_all")]).to_pylist():
            self.cube[tuple(row[c] for c in _CUBE)] += row["count_all"]
        label, status = _strs(self._col(t, "label")), _strs(self._col(t, "status"))
        ok = status == "ok"
        real = label == "real"
        tampered = label == "tampered"
        area = _floats(self._col(t, "mask_area"))
        has = ~np.isnan(area) & tampered
        area = np.clip(area, AREA_BINS[0], AREA_BINS[-1])  # an empty mask counts in the first bin
        self._h("area_ok", area[has & ok], AREA_BINS)
        self._h("area_rejected", area[has & ~ok], AREA_BINS)
        quality = _floats(self._col(t, "mask_quality"))
        has = ~np.isnan(quality)
        self._h("quality_ok", quality[has & ok], QUALITY_BINS)
        self._h("quality_rejected", quality[has & ~ok], QUALITY_BINS)
        jq = _floats(self._col(t, "jpeg_quality"))
        jpg = (_strs(self._col(t, "format")) == "jpg") & ~np.isnan(jq)
        self._h("jpeg_real", jq[jpg & real], JPEG_BINS)
        self._h("jpeg_forged", jq[jpg & ~real], JPEG_BINS)
        w, h = _floats(self._col(t, "width")), _floats(self._col(t, "height"))
        sized = (w > 0) & (h > 0)
        lw, lh = np.log2(np.where(sized, w, 1.0)), np.log2(np.where(sized, h, 1.0))
        clip = (SIZE_BINS[0], SIZE_BINS[-1] - 1e-9)
        side = np.clip(np.maximum(lw, lh), *clip)
        self._h("side_real", side[sized & real], SIZE_BINS)
        self._h("side_forged", side[sized & ~real], SIZE_BINS)
        h2, _, _ = np.histogram2d(
            np.clip(lw[sized], *clip), np.clip(lh[sized], *clip), bins=[SIZE_BINS, SIZE_BINS]
        )
        self.hist["size2d"] += h2
        # samples: bottom-k by a stable hash of (seed, key)
        keys = _strs(self._col(t, "key"))
        generator = _strs(self._col(t, "generator"))
        gallery = ok & ~real
        rejected = ~ok & (status != "duplicate")
        want = gallery | rejected
        ranks = np.full(n, np.inf)
        ranks[want] = [unit_hash(self.seed, k) for k in keys[want]]
        self.gallery.offer(t, np.where(generator == "", "(none)", generator), ranks, gallery)
        self.rejected.offer(t, status, ranks, rejected)
        group = _strs(self._col(t, "group_id"))
        dup = ((status == "duplicate") | (_strs(self._col(t, "duplicate_of")) != "")) & (
            group != ""
        )
        self.dup_rows += int(dup.sum())
        if dup.any() and self.p.duplicate_groups:
            for g in set(group[dup].tolist()):
                self.dup_groups.setdefault(g, unit_hash(self.seed, f"group:{g}"))
            keep = sorted(self.dup_groups.items(), key=lambda kv: (kv[1], kv[0]))
            self.dup_groups = dict(keep[: self.p.duplicate_groups])

    def _h(self, name: str, values: np.ndarray, bins: np.ndarray) -> None:
        if values.size:
            self.hist[name] += np.histogram(values, bins=bins)[0]

    # ---- pass 2
    def picks(self) -> Iterator[dict[str, Any]]:
        for bk in (self.gallery, self.rejected):
            for rows in bk.best.values():
                for _, _, r in rows:
                    yield r

    def second_pass(self, manifest: Path, extra_keys: Iterable[str] = ()) -> None:
        """Members of the picked duplicate groups, and rows named by key (parents of picks
        without a parent blob, the evaluation's worst samples)."""
        keys = {
            r["parent_key"]
            for r in self.picks()
            if r.get("parent_key") and not r.get("parent_blob")
        }
        keys |= set(extra_keys)
        groups = set(self.dup_groups)
        if not keys and not groups:
            return
        pf = pq.ParquetFile(manifest)
        names = [n for n in pf.schema_arrow.names if n in FIELDS]
        key_set, group_set = (
            pa.array(sorted(keys), pa.string()),
            pa.array(sorted(groups), pa.string()),
        )
        for batch in pf.iter_batches(batch_size=self.p.batch_rows, columns=names):
            t = pa.Table.from_batches([batch])
            hit = pc.or_kleene(
                pc.is_in(t["key"], value_set=key_set), pc.is_in(t["group_id"], value_set=group_set)
            )
            hit = pc.fill_null(hit, False)
            if not pc.any(hit).as_py():
                continue
            for r in t.filter(hit).to_pylist():
                if r["key"] in keys:
                    self.by_key[r["key"]] = r
                g = r.get("group_id")
                if g in groups:
                    kind = "real" if r.get("label") == "real" else "forged"
                    self.group_sizes[(g, kind)] += 1
                    if kind == "real":
                        self._member(g, r)

    def _member(self, g: str, r: dict[str, Any]) -> None:
        cur = self.members.setdefault(g, [])
        r["_rank"] = unit_hash(self.seed, r["key"])
        cur.append(r)
        # the shipped one first, then by rank; keep a bounded list
        cur.sort(key=lambda m: (not _shipped(m), m["_rank"], m["key"]))
        del cur[max(1, self.p.members_per_group) :]

    # ---- marginals of the cube
    def count(self, dims: tuple[str, ...], where: dict[str, Any] | None = None) -> Counter:
        idx = [_CUBE.index(d) for d in dims]
        out: Counter = Counter()
        for key, n in self.cube.items():
            if where and any(key[_CUBE.index(k)] != v for k, v in where.items()):
                continue
            out[tuple(key[i] for i in idx)] += n
        return out

    def by(self, dim: str) -> list[tuple[str, int, int]]:
        """(value, rows, ok rows) for one dimension, most rows first."""
        total, ok = Counter(), Counter()
        i, s = _CUBE.index(dim), _CUBE.index("status")
        for key, n in self.cube.items():
            total[key[i]] += n
            if key[s] == "ok":
                ok[key[i]] += n
        return sorted(((v, total[v], ok[v]) for v in total), key=lambda t: (-t[1], str(t[0])))


def _shipped(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and r.get("split") is not None


def stand_in(model_id: str | None) -> bool:
    return bool(model_id) and str(model_id).startswith(STAND_IN_PREFIXES)


# --------------------------------------------------------------------------- pictures


@dataclass
class Pic:
    src: str  # relative to index.html
    width: int
    height: int


class Thumbs:
    """Small JPEGs of images, mask overlays and difference maps, one file per panel."""

    def __init__(self, data: Path, out: Path, px: int, masks_params: Any):
        self.data = data
        self.out = out
        self.px = px
        self.masks_params = masks_params
        self.cache: dict[str, Pic] = {}
        self.count = 0

    def _path(self, rel: str | None) -> Path | None:
        if not rel:
            return None
        p = Path(rel)
        return p if p.is_absolute() else self.data / p

    def load(self, rel: str | None) -> tuple[np.ndarray | None, str]:
        from pipeline.imageio import decode

        path = self._path(rel)
        if path is None:
            return None, "no file"
        try:
            return decode(path.read_bytes()), ""
        except Exception as e:  # noqa: BLE001 - a broken file is exactly what one looks at
            return None, f"{type(e).__name__}: {e}"

    def load_gray(self, rel: str | None) -> np.ndarray | None:
        path = self._path(rel)
        if path is None:
            return None
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"))
        except Exception as e:  # noqa: BLE001
            log.warning("report: %s unreadable: %s", rel, e)
            return None

    def scale(self, shape: tuple[int, ...]) -> tuple[float, tuple[int, int]]:
        h, w = shape[:2]
        s = min(self.px / max(h, w), 2.0)
        return s, (max(1, round(w * s)), max(1, round(h * s)))

    def fit(self, a: np.ndarray, pool: bool = False) -> np.ndarray:
        """Resized into the thumbnail box; `pool`: thin bright details survive the shrink."""
        s, size = self.scale(a.shape)
        if s < 1 and pool:
            k = math.ceil(1 / s)
            a = cv2.dilate(a, np.ones((k, k), np.uint8))
        return cv2.resize(a, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST)

    def fit_mask(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A boolean mask at the thumbnail size of an image of `shape`: any covered pixel counts."""
        if m.shape != tuple(shape[:2]):
            m = (
                cv2.resize(
                    m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST
                )
                > 0
            )
        return self.fit(m.astype(np.uint8) * 255, pool=True) > 0

    def save(self, name: str, rgb: np.ndarray) -> Pic:
        if name in self.cache:
            return self.cache[name]
        rel = f"thumbs/{name}.jpg"
        im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
        im.convert("RGB").save(self.out / rel, "JPEG", quality=85, optimize=True)
        self.count += 1
        pic = Pic(rel, im.width, im.height)
        self.cache[name] = pic
        return pic

    # ---- panels
    def image(self, key: str, rel: str | None, tag: str = "img") -> Pic | str:
        name = f"{key}-{tag}"
        if name in self.cache:
            return self.cache[name]
        a, why = self.load(rel)
        if a is None:
            return f"no image: {why}"
        return self.save(name, self.fit(a))

    def overlay(
        self,
        key: str,
        image: np.ndarray,
        mask: np.ndarray | None,
        requested: np.ndarray | None = None,
        tag: str = "overlay",
    ) -> Pic:
        from pipeline.inspect import overlay

        small = self.fit(image)
        if mask is not None and mask.all():  # the whole image: a red frame keeps it visible
            small = cv2.rectangle(
                np.ascontiguousarray(small),
                (0, 0),
                (small.shape[1] - 1, small.shape[0] - 1),
                (255, 0, 0),
                4,
            )
        elif mask is not None:
            small = overlay(small, self.fit_mask(mask, image.shape))
        if requested is not None:
            req = self.fit_mask(requested, image.shape).astype(np.uint8)
            contours, _ = cv2.findContours(req, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            small = np.ascontiguousarray(small)
            cv2.drawContours(small, contours, -1, (0, 230, 255), 1)
        return self.save(f"{key}-{tag}", small)

    def heat(self, key: str, diff: np.ndarray, tag: str = "diff") -> Pic:
        small = self.fit(diff, pool=True)
        return self.save(f"{key}-{tag}", cv2.applyColorMap(small, cv2.COLORMAP_INFERNO)[..., ::-1])

    def mask_of(self, r: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray | None:
        from pipeline.imageio import decode_mask

        if r.get("mask_source") == "full":
            return np.ones(shape[:2], bool)
        path = self._path(r.get("mask_blob"))
        if path is None:
            return None
        try:
            return decode_mask(path.read_bytes())
        except Exception as e:  # noqa: BLE001
            log.warning("report: mask %s unreadable: %s", path, e)
            return None

    def sample(self, r: dict[str, Any], parent_blob: str | None) -> list[tuple[str, Pic | str]]:
        """source | forgery | mask overlay | difference map for one record."""
        from pipeline.imageio import decode_mask
        from pipeline.masks import derive_mask

        key = r["key"]
        if r.get("label") == "real":  # nothing was changed: the image is all there is
            return [
                (
                    "image",
                    self.image(key, r.get("blob")) if r.get("blob") else "no image: none stored",
                )
            ]
        forged, why = self.load(r.get("blob")) if r.get("blob") else (None, "none written")
        original, owhy = self.load(parent_blob) if parent_blob else (None, "")
        # a fully generated image only borrows its source's size and format
        template = r.get("label") == "synthetic" and r.get("operation") == "full_synthesis"
        src_cap = "size/format template" if template else "source"
        if original is not None:
            source: Pic | str = self.save(f"{key}-src", self.fit(original))
        elif parent_blob:
            source = f"source unreadable: {owhy}"
        elif r.get("label") == "real":
            source = "real image (no source)"
        else:
            source = "no source image" + (
                " (generated from text or noise)" if r.get("label") == "synthetic" else ""
            )
        if forged is None:
            return [
                (src_cap, source),
                ("image", f"no image: {why}"),
                ("mask overlay", "-"),
                ("difference", "-"),
            ]
        image = self.save(f"{key}-img", self.fit(forged))
        mask = self.mask_of(r, forged.shape)
        requested = None
        if r.get("requested_mask_blob"):
            path = self._path(r["requested_mask_blob"])
            try:
                requested = decode_mask(path.read_bytes()) if path else None
            except Exception:  # noqa: BLE001
                requested = None
        if mask is None and requested is None:
            over: Pic | str = "no mask" if r.get("label") != "real" else "real: empty mask"
        else:
            over = self.overlay(key, forged, mask, requested)
        diff = self.load_gray(r.get("diff_blob"))
        note = "no source to difference against"
        if template:
            note = "fully generated: nothing to difference against"
        elif diff is None and original is not None:
            if original.shape == forged.shape:
                try:
                    diff = derive_mask(original, forged, self.masks_params).soft()
                except Exception as e:  # noqa: BLE001
                    note = f"differencing failed: {type(e).__name__}: {e}"
            else:
                note = (
                    f"source {original.shape[1]}x{original.shape[0]} and image "
                    f"{forged.shape[1]}x{forged.shape[0]} differ in size"
                )
        heat: Pic | str = self.heat(key, diff) if diff is not None else note
        over_cap = "mask: whole image" if r.get("mask_source") == "full" else "mask overlay"
        return [(src_cap, source), ("image", image), (over_cap, over), ("difference", heat)]


# --------------------------------------------------------------------------- charts


class Charts:
    """matplotlib PNGs in `fig/`; Figure objects only (no pyplot state)."""

    def __init__(self, out: Path):
        self.out = out
        self.count = 0

    def new(self, w: float, h: float, cols: int = 1):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
        axes = fig.subplots(1, cols) if cols > 1 else fig.subplots()
        return fig, axes

    def save(self, fig, name: str) -> Pic:
        rel = f"fig/{name}.png"
        fig.savefig(self.out / rel, dpi=100, metadata={"Software": None})
        self.count += 1
        w, h = (round(v * 100) for v in fig.get_size_inches())
        return Pic(rel, w, h)


OK_COLOR, BAD_COLOR, REAL_COLOR, FAKE_COLOR = "#3b82f6", "#f97316", "#16a34a", "#dc2626"


def bars_chart(charts: Charts, name: str, title: str, rows: list[tuple[str, int, int]]) -> Pic:
    """Horizontal bars per value: ok rows and the rest stacked."""
    rows = rows[:30]
    fig, ax = charts.new(2.9, 0.55 + 0.2 * max(len(rows), 2))
    labels = [_shorten(v, 18) for v, _, _ in rows][::-1]
    ok = np.array([o for _, _, o in rows][::-1])
    rest = np.array([t - o for _, t, o in rows][::-1])
    y = np.arange(len(rows))
    ax.barh(y, ok, color=OK_COLOR, label="status ok")
    ax.barh(y, rest, left=ok, color=BAD_COLOR, label="other status")
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.tick_params(axis="x", labelsize=7.5)
    ax.set_title(title, fontsize=9, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return charts.save(fig, name)


def _shorten(v: Any, n: int) -> str:
    s = _label(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def _label(v: Any) -> str:
    return "(none)" if v is None or v == "" else str(v)


# --------------------------------------------------------------------------- HTML


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table; anything missing or not a number is n/a."""
    if v is None or isinstance(v, bool):
        return "n/a" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"
    return esc(v)


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """Cells are pre-escaped HTML strings, or numbers (right-aligned)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="n">{fmt(c)}</td>')
            else:
                cells.append(f"<td>{c}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(body)
        + "</tbody></table>"
    )


def img(pic: Pic | str, alt: str, cls: str = "") -> str:
    if isinstance(pic, str):
        return f'<div class="missing {cls}">{esc(pic)}</div>'
    return (
        f'<img class="{cls}" src="{esc(pic.src)}" width="{pic.width}" height="{pic.height}" '
        f'alt="{esc(alt)}">'
    )


def section(sid: str, title: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{lead_html}{body}</section>'


def note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def code(v: Any) -> str:
    return f"<code>{esc(v)}</code>"


CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg2:#f6f8fa;--ok:#3b82f6;--bad:#f97316}
*{box-sizing:border-box}
body{font:13px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--fg);margin:0}
header{background:#24292f;color:#fff;padding:10px 20px;position:sticky;top:0;z-index:2}
header h1{font-size:17px;margin:0 8px 0 0;display:inline}
header .meta{color:#c9d1d9}
header nav{margin-top:4px}
header nav a{color:#9ecbff;margin-right:14px;text-decoration:none}
header code{background:#3a424c;color:#fff}
p.absent{margin:3px 0;color:var(--muted)}
p.absent b{color:var(--fg)}
main{padding:4px 20px 40px}
section{border-bottom:1px solid var(--line);padding:6px 0 14px}
h2{font-size:16px;margin:14px 0 6px}
h3{font-size:14px;margin:14px 0 4px}
p.lead{color:var(--muted);margin:2px 0 8px;max-width:1100px}
p.note{color:var(--muted);font-style:italic;margin:4px 0}
table{border-collapse:collapse;margin:4px 0 8px;font-size:12px}
th,td{border:1px solid var(--line);padding:2px 7px;vertical-align:top;text-align:left}
th{background:var(--bg2);font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fbfcfd}
code{font:11px/1.3 ui-monospace,SFMono-Regular,Menlo,monospace;background:var(--bg2);padding:0 3px;border-radius:3px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.card{border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:120px}
.card b{display:block;font-size:20px}
.card span{color:var(--muted)}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.block{border:1px solid var(--line);border-radius:6px;padding:6px 10px;margin:6px 0}
.block > h3{margin-top:2px}
.samples{display:flex;flex-wrap:wrap;gap:10px}
.sample{border:1px solid var(--line);border-radius:4px;padding:4px;background:#fff}
.panels{display:flex;gap:4px}
.panel{width:var(--t);text-align:center}
.panel .cap{font-size:10px;color:var(--muted)}
.panel img,.panel .missing{display:block;margin:0 auto;max-width:var(--t);max-height:var(--t);background:#eee}
.thumbbox{height:var(--t);display:flex;align-items:center;justify-content:center;background:#f0f0f0}
.missing{width:var(--t);height:var(--t);display:flex;align-items:center;justify-content:center;font-size:10px;color:var(--muted);padding:6px;overflow:hidden}
.meta-lines{font-size:11px;margin-top:3px;max-width:calc(4 * var(--t) + 12px)}
.meta-lines div{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.meta-lines.wrap div{white-space:normal;overflow-wrap:anywhere}
.meta-lines .badge{margin-left:0}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:11px;font-weight:600;margin-left:6px;vertical-align:1px}
.badge.standin{background:#fde68a;color:#7c2d12}
.badge.shipped{background:#bbf7d0;color:#14532d}
.badge.dropped{background:#fed7aa;color:#7c2d12}
.badge.reason{background:#fee2e2;color:#7f1d1d}
.err{color:#b42318}
details{margin:4px 0}
summary{cursor:pointer;color:#0969da}
pre{background:var(--bg2);padding:8px;max-height:420px;overflow:auto;font-size:11px}
figure{margin:0}
"""


class Page:
    def __init__(self, params: Params, out: Path):
        self.params = params
        self.out = out
        self.thumbs = Thumbs(params.data, out, params.report.thumb_px, params.masks)
        self.charts = Charts(out)

    @property
    def figures(self) -> int:
        return self.charts.count

    def document(self, scan: Scan, body: list[str]) -> str:
        nav = "".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS)
        title = f"fakeforge report: {self.params.data_dir}"
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
            f'<header><h1>fakeforge report</h1><span class="meta">data_dir {code(self.params.data_dir)}'
            f" · {scan.rows:,} rows · seed {self.params.seed}</span><nav>{nav}</nav></header>\n"
            f'<main style="--t:{self.params.report.thumb_px}px">\n'
            + "\n".join(body)
            + "\n</main></body></html>\n"
        )

    def sample_card(self, r: dict[str, Any], parent_blob: str | None, extra: list[str]) -> str:
        panels = self.thumbs.sample(r, parent_blob)
        cells = []
        for cap, pic in panels:
            alt = f"{cap} of {r['key']}"
            cells.append(
                f'<div class="panel"><div class="thumbbox">{img(pic, alt)}'
                f'</div><div class="cap">{esc(cap)}</div></div>'
            )
        lines = [
            (
                f"<div>key {code(r['key'])} · {esc(_label(r.get('domain')))} / "
                f"{esc(_label(r.get('operation')))} · split {esc(_label(r.get('split')))}</div>"
            )
        ]
        mid = r.get("model_id")
        if mid or r.get("generator"):
            badge = (
                '<span class="badge standin">random-weight stand-in</span>' if stand_in(mid) else ""
            )
            lines.append(
                f"<div>{esc(_label(r.get('generator')))} {esc(r.get('generator_version') or '')}"
                f" · model {code(mid or '(none: classical)')}{badge}</div>"
            )
        size = (
            f"{r.get('width')}x{r.get('height')} {r.get('format') or ''}"
            if r.get("width")
            else "size n/a"
        )
        q = r.get("mask_quality")
        iou = r.get("mask_iou_requested")
        area = r.get("mask_area")
        lines.append(
            f"<div>{esc(size)} · mask {esc(_label(r.get('mask_source')))} "
            f"area {'n/a' if area is None else f'{area:.1%}'} · quality "
            f"{'n/a' if q is None else f'{q:.2f}'}"
            + ("" if iou is None else f" · IoU vs requested {iou:.2f}")
            + "</div>"
        )
        if r.get("label") == "real" and r.get("uri"):
            lines.append(f"<div>file {esc('/'.join(str(r['uri']).split('/')[-2:]))}</div>")
        lines += extra
        return (
            f'<div class="sample"><div class="panels">{"".join(cells)}</div>'
            f'<div class="meta-lines">{"".join(lines)}</div></div>'
        )


# --------------------------------------------------------------------------- sections


def counts_section(scan: Scan, params: Params, page: Page) -> str:
    total = scan.rows
    ok = sum(n for k, n in scan.cube.items() if k[_CUBE.index("status")] == "ok")
    shipped = sum(
        n
        for k, n in scan.cube.items()
        if k[_CUBE.index("status")] == "ok" and k[_CUBE.index("split")] is not None
    )
    real = sum(n for (lab,), n in scan.count(("label",)).items() if lab == "real")
    cards = [
        ("rows", total),
        ("shipped", shipped),
        ("status ok", ok),
        ("other status", total - ok),
        ("real", real),
        ("forged", total - real),
        ("duplicates", scan.dup_rows),
    ]
    out = [
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{fmt(v)}</b><span>{esc(k)}</span></div>' for k, v in cards)
        + "</div>"
    ]
    blocks = []
    for dim in COUNT_DIMS:
        rows = scan.by(dim)
        pic = bars_chart(page.charts, f"counts_{dim}", f"rows by {dim}", rows)
        trs = [[esc(_label(v)), n, o, n - o, f"{n / max(total, 1):.1%}"] for v, n, o in rows]
        if dim == "status":
            stage_of = Counter()
            for (st, sg), n in scan.count(("status", "stage")).items():
                stage_of[(st, sg)] += n
            stages = defaultdict(list)
            for (st, sg), _ in sorted(stage_of.items(), key=lambda t: str(t)):
                if sg:
                    stages[st].append(sg)
            trs = [
                [
                    esc(_label(v)),
                    n,
                    esc(", ".join(stages.get(v, [])) or "-"),
                    f"{n / max(total, 1):.1%}",
                ]
                for v, n, _ in rows
            ]
            tab = table(["status", "rows", "set by stage", "share"], trs)
        else:
            tab = table([dim, "rows", "ok", "other", "share"], trs)
        blocks.append(
            f'<div class="block"><div class="row">{img(pic, f"rows by {dim}")}{tab}</div></div>'
        )
    out.append('<div class="row">' + "".join(blocks) + "</div>")
    # domain x operation of ok rows, label x split
    cross = scan.count(("domain", "operation"), where={"status": "ok"})
    ops = sorted({o for _, o in cross}, key=_label)
    doms = sorted({d for d, _ in cross}, key=_label)
    rows = [[esc(_label(d))] + [cross.get((d, o), 0) for o in ops] for d in doms]
    ls = scan.count(("label", "split"))
    splits = sorted({s for _, s in ls}, key=_label)
    labels = sorted({lab for lab, _ in ls}, key=_label)
    rows2 = [[esc(_label(lab))] + [ls.get((lab, s), 0) for s in splits] for lab in labels]
    out.append(
        '<div class="row"><div><h3>domain x operation (status ok)</h3>'
        + table(["domain"] + [_label(o) for o in ops], rows)
        + "</div><div><h3>label x split (all rows)</h3>"
        + table(["label"] + [_label(s) for s in splits], rows2)
        + "</div></div>"
    )
    out.append(stage_metrics(params))
    return section(
        "counts",
        "Counts",
        "".join(out),
        f"All {total:,} rows of <code>data/manifest.parquet</code> (every record of the "
        "run, shipped or not), counted exactly. Orange: rows with a status other than "
        "ok (rejected, duplicate, failed).",
    )


def stage_metrics(params: Params) -> str:
    from pipeline import stages

    rows = []
    for name in stages.names():
        if name == STAGE_NAME:
            continue  # this stage's own metrics are written after the page
        m = read_json(params.metrics / f"{name}.json")
        if m is None:
            rows.append([esc(name), "n/a", "n/a", note("no metrics file")])
            continue
        statuses = m.get("by_status") if isinstance(m.get("by_status"), dict) else {}
        st = ", ".join(f"{esc(k)} {fmt(v)}" for k, v in statuses.items()) or "n/a"
        figures = ", ".join(
            f"{esc(k)} {fmt(v)}"
            for k, v in m.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k not in ("seconds", "total")
        )
        rows.append(
            [
                esc(name),
                _num(m.get("seconds")),
                _num(m.get("total")),
                st + (f'<div class="note">{figures}</div>' if figures else ""),
            ]
        )
    return (
        "<h3>stages</h3>"
        + table(["stage", "seconds", "rows", "statuses and figures"], rows)
        + note(f"from {code(params.metrics_dir)}/&lt;stage&gt;.json")
    )


def generators_section(scan: Scan, page: Page) -> str:
    gens = scan.by("generator")
    models = scan.count(("generator", "model_id"))
    cells = scan.count(("generator", "domain", "operation"))
    out = []
    gens = [t for t in gens if t[0] is not None]  # None: real rows
    limit = scan.p.max_generators
    for g, total, ok in gens[:limit]:
        mids = sorted({m for (gg, m) in models if gg == g and m}, key=str)
        standin = any(stand_in(m) for m in mids)
        badge = (
            '<span class="badge standin">random-weight stand-in: pixels are not realistic</span>'
            if standin
            else ""
        )
        rows = scan.gallery.rows(g)
        shown = len(rows)
        where = ", ".join(
            f"{_label(d)} / {_label(o)}"
            for (gg, d, o) in sorted(
                (k for k in cells if k[0] == g), key=lambda k: (_label(k[1]), _label(k[2]))
            )
        )
        mtext = ", ".join(code(m) for m in mids) or "(none: classical)"
        head = (
            f'<h3>{esc(g)}{badge}</h3><p class="note">{esc(where)} · model {mtext}'
            f" · {ok:,} ok of {total:,} rows · showing {shown} of "
            f"{scan.gallery.seen.get(g, 0):,} ok forgeries</p>"
        )
        cards = [
            page.sample_card(r, r.get("parent_blob") or _parent_blob(scan, r), []) for r in rows
        ]
        body = (
            f'<div class="samples">{"".join(cards)}</div>'
            if cards
            else note("no ok forgeries from this generator")
        )
        out.append(f'<div class="block">{head}{body}</div>')
    if not out:
        out.append(note("no forgeries in this run"))
    if len(gens) > limit:
        rest = ", ".join(esc(g) for g, _, _ in gens[limit:])
        out.append(
            note(
                f"{len(gens) - limit} more generators (fewer rows) not shown "
                f"(report.max_generators = {limit}): {rest}"
            )
        )
    lead = (
        "Per generator, a few shipped forgeries: the source image, the forgery, its mask drawn "
        "over the forgery (red; the region the generator was asked to change outlined in cyan) "
        "and the difference map against the source (kept diff map, else recomputed with the "
        "masks params). A full-size view of any sample: <code>python -m pipeline inspect KEY "
        "--params params.yaml</code>."
    )
    return section("generators", "Samples per generator", "".join(out), lead)


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _parent_blob(scan: Scan, r: dict[str, Any]) -> str | None:
    parent = scan.by_key.get(r.get("parent_key") or "")
    return parent.get("blob") if parent else None


def rejected_section(scan: Scan, page: Page) -> str:
    out = []
    reasons = [(s, n) for s, n, _ in scan.by("status") if s not in ("ok", "duplicate")]
    for status, n in reasons:
        rows = scan.rejected.rows(status)
        cards = [
            page.sample_card(
                r,
                r.get("parent_blob") or _parent_blob(scan, r),
                [
                    f'<div class="err">{esc(r.get("stage") or "?")}: {esc(r.get("error") or "(no error text)")}</div>'
                ],
            )
            for r in rows
        ]
        out.append(
            f'<div class="block"><h3>{esc(_label(status))}<span class="badge reason">{_rows(n)}</span></h3>'
            f'<p class="note">showing {len(rows)} of {n:,}</p><div class="samples">{"".join(cards)}</div></div>'
        )
    if not out:
        out.append(note("no rejected rows in this run: every row has status ok or duplicate"))
    return section(
        "rejected",
        "Rejected samples by reason",
        "".join(out),
        "Rows that were not shipped, per reason, with the error each one recorded, so "
        "the filters can be checked by eye. Near-duplicates are in the next section.",
    )


def duplicates_section(scan: Scan, page: Page) -> str:
    dedup = read_json(page.params.metrics / "dedup.json") or {}
    dedup = dedup.get("dedup") if isinstance(dedup.get("dedup"), dict) else dedup
    figures = (
        f"dedup metrics: {fmt(dedup.get('groups'))} groups, {fmt(dedup.get('exact_duplicates'))} "
        f"exact and {fmt(dedup.get('near_duplicates'))} near duplicates"
    )
    out = [note(f"{_rows(scan.dup_rows)} marked as duplicates · {figures}")]
    for g in sorted(scan.dup_groups, key=lambda k: (scan.dup_groups[k], k)):
        members = scan.members.get(g, [])
        n_real, n_forged = scan.group_sizes[(g, "real")], scan.group_sizes[(g, "forged")]
        cards = []
        for m in members:
            pic = page.thumbs.image(m["key"], m.get("blob"))
            if _shipped(m) and not m.get("duplicate_of"):
                badge = '<span class="badge shipped">shipped</span>'
            elif m.get("status") == "ok":
                badge = '<span class="badge shipped">shipped (keep_duplicates)</span>'
            else:
                badge = f'<span class="badge dropped">{esc(m.get("status"))}</span>'
            why = m.get("error") or (
                f"duplicate of {m['duplicate_of']} ({m.get('duplicate_kind')})"
                if m.get("duplicate_of")
                else ""
            )
            size = f"{m.get('width')}x{m.get('height')} {m.get('format') or ''} · {fmt(m.get('nbytes'))} bytes"
            where = "/".join(str(m.get("uri") or m.get("source") or "").split("/")[-2:])
            cards.append(
                f'<div class="sample"><div class="panel"><div class="thumbbox">{img(pic, m["key"])}</div></div>'
                f'<div class="meta-lines wrap" style="max-width:var(--t)"><div>{badge}</div>'
                f"<div>{code(m['key'])}</div><div>{esc(size)}</div><div>{esc(where)}</div>"
                f'<div class="err">{esc(why)}</div></div></div>'
            )
        out.append(
            f'<div class="block"><h3>group {code(g)}</h3><p class="note">{n_real} real members '
            f"(showing {len(members)}), {n_forged} forgeries made from the group</p>"
            f'<div class="samples">{"".join(cards)}</div></div>'
        )
    if not scan.dup_groups:
        out.append(note("no near-duplicate groups with more than one real member in this run"))
    return section(
        "duplicates",
        "Near-duplicate groups",
        "".join(out),
        "Groups of exact or perceptual (pHash) copies; one real member per group is "
        "shipped (the largest image, then the most bytes), the others are marked "
        "<code>duplicate</code> with the kept one named.",
    )


def distributions_section(scan: Scan, page: Page) -> str:
    h = scan.hist
    ch = page.charts
    pics = []
    # image sizes: 2-D histogram of width x height, all rows
    fig, ax = ch.new(4.2, 3.4)
    if h["size2d"].sum():
        from matplotlib.colors import LogNorm, Normalize
        from matplotlib.ticker import StrMethodFormatter

        top = float(h["size2d"].max())
        norm = LogNorm(vmin=1, vmax=top) if top > 50 else Normalize(vmin=0, vmax=top)
        m = ax.pcolormesh(
            2**SIZE_BINS,
            2**SIZE_BINS,
            np.ma.masked_equal(h["size2d"].T, 0),
            norm=norm,
            cmap="viridis",
        )
        bar = fig.colorbar(m, ax=ax, label="rows")
        bar.ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        nz = np.argwhere(h["size2d"] > 0)
        lo, hi = (
            2 ** SIZE_BINS[max(nz.min() - 2, 0)],
            2 ** SIZE_BINS[min(nz.max() + 3, len(SIZE_BINS) - 1)],
        )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("image sizes (all rows with a size)", fontsize=9, loc="left")
    pics.append(ch.save(fig, "dist_size2d"))
    pics.append(
        _step_hist(
            ch,
            "dist_side",
            "longest side (px), real vs forged",
            2**SIZE_BINS,
            [("real", h["side_real"], REAL_COLOR), ("forged", h["side_forged"], FAKE_COLOR)],
            logx=2,
            density=True,
        )
    )
    pics.append(
        _step_hist(
            ch,
            "dist_area",
            "mask area (tampered rows)",
            AREA_BINS,
            [("status ok", h["area_ok"], OK_COLOR), ("rejected", h["area_rejected"], BAD_COLOR)],
            logx=10,
            xlabel="fraction of pixels (log)",
        )
    )
    pics.append(
        _step_hist(
            ch,
            "dist_quality",
            "mask quality (derived masks)",
            QUALITY_BINS,
            [
                ("status ok", h["quality_ok"], OK_COLOR),
                ("rejected", h["quality_rejected"], BAD_COLOR),
            ],
            xlabel="quality (0 to 1)",
        )
    )
    pics.append(
        _step_hist(
            ch,
            "dist_jpeg",
            "JPEG quality estimate, real vs forged",
            JPEG_BINS,
            [("real", h["jpeg_real"], REAL_COLOR), ("forged", h["jpeg_forged"], FAKE_COLOR)],
            density=True,
            xlabel="quality",
        )
    )
    fmts = scan.count(("format", "label"))
    labels = sorted({lab for _, lab in fmts}, key=_label)
    names = sorted({f for f, _ in fmts}, key=_label)
    rows = [[esc(_label(f))] + [fmts.get((f, lab), 0) for lab in labels] for f in names]
    body = (
        '<div class="row">'
        + "".join(f"<figure>{img(p, p.src)}</figure>" for p in pics)
        + "<div><h3>format x label</h3>"
        + table(["format"] + [_label(x) for x in labels], rows)
        + "</div></div>"
    )
    return section(
        "distributions",
        "Distributions",
        body,
        "Exact histograms over every row. Real and forged rows should look alike in "
        "size, format and JPEG quality: any difference there is a shortcut a detector "
        "can learn instead of the forgery itself (real vs forged curves are normalised).",
    )


def _step_hist(
    ch: Charts,
    name: str,
    title: str,
    bins: np.ndarray,
    series: list[tuple[str, np.ndarray, str]],
    logx: int = 0,
    density: bool = False,
    xlabel: str = "",
) -> Pic:
    fig, ax = ch.new(4.2, 3.4)
    drawn = False
    for i, (label, counts, color) in enumerate(series):
        total = counts.sum()
        if not total:
            continue
        y = counts / total if density else counts
        if density:  # outlines; the second dashed so that equal curves both show
            ax.stairs(
                y,
                bins,
                label=f"{label} ({int(total):,})",
                color=color,
                linewidth=2.4 if i == 0 else 1.4,
                linestyle="-" if i == 0 else "--",
            )
        else:
            ax.stairs(
                y, bins, label=f"{label} ({int(total):,})", color=color, fill=True, alpha=0.55
            )
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes, color="#888")
    else:
        nz = np.flatnonzero(sum(c for _, c, _ in series) > 0)
        ax.set_xlim(bins[max(nz.min() - 1, 0)], bins[min(nz.max() + 2, len(bins) - 1)])
        ax.legend(fontsize=7, frameon=False)
    if logx:
        ax.set_xscale("log", base=logx)
    ax.set_xlabel(xlabel or title.split(",")[0], fontsize=8)
    ax.set_ylabel("share of rows" if density else "rows", fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return ch.save(fig, name)


# ---- exports


def exports_section(scan: Scan, params: Params, exports_dir: Path | None, page: Page) -> str:
    from pipeline.export import cell, folder_names, shares
    from pipeline.records import Record

    root = Path(exports_dir) if exports_dir else params.data / "exports"
    folders = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not folders:
        return section("exports", "Exports", note(f"no exports under {code(root)}"))
    p = params.export
    planned: dict[str, tuple[str, Any, float]] = {}
    for name, spec in p.exports.items():
        for folder, f in folder_names(name, spec):
            planned[folder] = (name, spec, f * p.fraction)
    # the shippable pool per split and cell, from the manifest counts
    pool: dict[str, Counter] = defaultdict(Counter)
    for (lab, dom, op, split), n in scan.count(
        ("label", "domain", "operation", "split"), where={"status": "ok"}
    ).items():
        if split is not None:
            pool[split][
                cell(
                    Record(
                        key="", source="", label=lab or "real", domain=dom, operation=op or "none"
                    )
                )
            ] += n
    by_name: dict[str, list[Path]] = defaultdict(list)
    for d in folders:
        by_name[planned[d.name][0] if d.name in planned else d.name].append(d)
    out = []
    for name, dirs in sorted(by_name.items()):
        dirs.sort(key=lambda d: (planned.get(d.name, ("", None, 9.0))[2], d.name))
        counts = {d.name: export_counts(d) for d in dirs}
        spec = planned[dirs[0].name][1] if dirs[0].name in planned else None
        splits = sorted({s for c in counts.values() for s in c}, key=lambda s: (s != "train", s))
        focus = "train" if "train" in splits else (splits[0] if splits else None)
        cells = sorted(
            {c for cnt in counts.values() for s in cnt for c in cnt[s]} | set(pool.get(focus, {}))
        )
        target = (
            shares(list(pool.get(focus, {})), spec) if spec is not None and spec.balance else {}
        )
        head = ["cell (domain / operation)", f"available ({focus})", "target share"]
        short = {
            d.name: d.name[len(name) + 1 :] if d.name.startswith(name + "-") else d.name
            for d in dirs
        }
        head += [short[d.name] for d in dirs] + [f"share in {short[dirs[-1].name]}"]
        last = counts[dirs[-1].name].get(focus, Counter())
        last_total = sum(last.values())
        rows = []
        for c in cells:
            t = target.get(c)
            rows.append(
                [
                    esc(f"{_label(c[0])} / {_label(c[1])}"),
                    pool.get(focus, {}).get(c, 0),
                    "n/a" if t is None else f"{t:.1%}",
                ]
                + [counts[d.name].get(focus, Counter()).get(c, 0) for d in dirs]
                + [f"{last.get(c, 0) / last_total:.1%}" if last_total else "n/a"]
            )
        totals = [
            [esc(s)] + [sum(counts[d.name].get(s, Counter()).values()) for d in dirs]
            for s in splits
        ]
        totals_head = ["split"] + [short[d.name] for d in dirs]
        fr = ", ".join(f"{d.name}: {planned[d.name][2]:g}" for d in dirs if d.name in planned)
        desc = (
            f"balance {'on' if spec.balance else 'off'}, short-cell rule {code(spec.short_cell)}, "
            f"real share per domain {spec.real_fraction:g}, domain weights "
            f"{esc(spec.domains or 'equal')}, operation weights {esc(spec.operations or 'equal')}; "
            f"fractions ({esc(', '.join(spec.fraction_splits))} only) {esc(fr)}"
            if spec is not None
            else "not in the params' export section (target n/a)"
        )
        chart = ""
        if target and focus:
            chart = img(
                _export_chart(page.charts, name, cells, target, counts, dirs, focus),
                f"export {name} shares",
            )
        cards = "".join(
            f"<details><summary>dataset card {code(d.name + '/README.md')}</summary>"
            f"<pre>{esc(_read_text(d / 'README.md'))}</pre></details>"
            for d in dirs
        )
        out.append(
            f'<div class="block"><h3>export {code(name)}</h3><p class="note">{desc}</p>'
            f'<div class="row"><div><b>cells, {esc(focus)} split</b>'
            + table(head, rows)
            + "<b>samples per split</b>"
            + table(totals_head, totals)
            + f"</div><div>{chart}</div></div>{cards}</div>"
        )
    return section(
        "exports",
        "Exports",
        "".join(out),
        "Per export and fraction, the samples per cell (domain, operation; real images "
        "are operation <code>none</code>) against the target balance, computed from the "
        "params' export section over the cells available in the split. Short cells give "
        "what they have (rule <code>fill</code>) and are below target.",
    )


def export_counts(folder: Path) -> dict[str, Counter]:
    """split -> cell -> samples, streamed from an export's manifest.parquet."""
    out: dict[str, Counter] = defaultdict(Counter)
    path = folder / "manifest.parquet"
    if not path.is_file():
        return out
    pf = pq.ParquetFile(path)
    cols = [c for c in ("split", "domain", "operation", "label") if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=65536, columns=cols):
        t = pa.Table.from_batches([batch])
        g = t.group_by(cols).aggregate([([], "count_all")])
        for r in g.to_pylist():
            op = "none" if r.get("label") == "real" else (r.get("operation") or "none")
            out[r.get("split") or "(none)"][(r.get("domain"), op)] += r["count_all"]
    return out


def _export_chart(ch: Charts, name: str, cells, target, counts, dirs, focus) -> Pic:
    fig, ax = ch.new(3.8, 0.8 + 0.22 * len(cells))
    y = np.arange(len(cells))
    series = [("target", [target.get(c, 0.0) for c in cells], "#111827")]
    d = dirs[-1]  # the largest fraction; the table has the others
    cnt = counts[d.name].get(focus, Counter())
    tot = sum(cnt.values()) or 1
    series.append((d.name, [cnt.get(c, 0) / tot for c in cells], OK_COLOR))
    hgt = 0.8 / len(series)
    for i, (lab, vals, color) in enumerate(series):
        ax.barh(y - 0.4 + hgt * (i + 0.5), vals, height=hgt, color=color, label=lab)
    ax.set_yticks(y, [f"{_label(d)} / {_label(o)}" for d, o in cells], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of the {focus} split", fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title(f"{name}: target vs actual share per cell", fontsize=9, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return ch.save(fig, f"export_{_slug(name)}")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s)[:80] or "x"


def _read_text(path: Path, limit: int = 20000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(unreadable: {e})"
    return text if len(text) <= limit else text[:limit] + "\n... (cut)"


# --------------------------------------------------------------------------- model files


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or is not a JSON object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        if Path(path).exists():
            log.warning("report: %s unreadable: %s", path, e)
        return None
    return obj if isinstance(obj, dict) else None


def read_csv(path: Path) -> list[dict[str, float | str]]:
    """Rows of a CSV with numbers parsed where they parse."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        if Path(path).exists():
            log.warning("report: %s unreadable: %s", path, e)
        return []
    out = []
    for r in rows:
        d: dict[str, float | str] = {}
        for k, v in r.items():
            if k is None:
                continue
            try:
                d[k] = float(v)
            except (TypeError, ValueError):
                d[k] = v if v is not None else ""
        out.append(d)
    return out


def _num(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def metric(block: Any, group: str, name: str) -> tuple[float | None, float | None, float | None]:
    """(value, lo, hi) of `block[group][name]` or `block[f"{group}_{name}"]`; a value is a
    number or {"value": x, "ci": [lo, hi]}; anything else is (None, None, None)."""
    if not isinstance(block, dict):
        return None, None, None
    cands = []
    g = block.get(group)
    if isinstance(g, dict) and name in g:
        cands.append((g[name], g.get(f"{name}_ci")))
    if f"{group}_{name}" in block:
        cands.append((block[f"{group}_{name}"], block.get(f"{group}_{name}_ci")))
    for v, ci in cands:
        if isinstance(v, dict):
            val = _num(v.get("value", v.get("mean")))
            ci = v.get("ci", v.get("ci95", ci))
        else:
            val = _num(v)
        lo = hi = None
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            lo, hi = _num(ci[0]), _num(ci[1])
        return val, lo, hi
    return None, None, None


def _ci(v: tuple[float | None, float | None, float | None], signed: bool = False) -> str:
    val, lo, hi = v
    if val is None:
        return "n/a"
    s = f"{val:+.3f}" if signed else f"{val:.3f}"
    if lo is not None and hi is not None:
        s += f' <span class="note">[{lo:.3f}, {hi:.3f}]</span>'
    return s


EVAL_COLUMNS = (
    ("image", "auc", "AUC"),
    ("image", "ap", "AP"),
    ("image", "accuracy", "acc@0.5"),
    ("image", "balanced_accuracy", "bal. acc"),
    ("pixel", "f1", "pixel F1@0.5"),
    ("pixel", "iou", "IoU@0.5"),
    ("pixel", "f1_best", "F1, best threshold per image"),
)
BREAKDOWNS = ("by_domain", "by_operation", "by_generator", "by_source")


def _n(block: Any) -> Any:
    if not isinstance(block, dict):
        return None
    for k in ("n", "n_images", "images", "samples"):
        if _num(block.get(k)) is not None:
            return block[k]
    return None


class ModelFiles:
    """What the model stages left, each part None when its file is absent."""

    def __init__(self) -> None:
        self.train: dict[str, Any] | None = None
        self.train_csv: list[dict] = []
        self.train_val_csv: list[dict] = []
        self.model_dir: Path | None = None
        self.evaluate: dict[str, Any] | None = None
        self.curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"roc": {}, "pr": {}}
        self.worst: list[dict[str, Any]] | None = None
        self.worst_path: Path | None = None
        self.scaling: dict[str, Any] | None = None
        self.transfer: dict[str, Any] | None = None

    @classmethod
    def read(cls, params: Params) -> ModelFiles:
        m = cls()
        metrics, plots, data = params.metrics, params.plots, params.data
        m.train = read_json(metrics / "train.json")
        m.train_csv = read_csv(plots / "train.csv")
        m.train_val_csv = read_csv(plots / "train_val.csv")
        m.model_dir = data / "train" / "model" if (data / "train" / "model").is_dir() else None
        m.evaluate = read_json(metrics / "evaluate.json")
        if plots.is_dir():
            for f in sorted(plots.glob("evaluate*.csv")):
                hit = re.fullmatch(r"evaluate[_-]?(roc|pr)(?:[_-](.+))?\.csv", f.name)
                if hit:
                    m._curve(hit.group(1), hit.group(2) or "", read_csv(f))
        m.worst_path = data / "evaluate" / "worst.parquet"
        if m.worst_path.is_file():
            try:
                m.worst = pq.read_table(m.worst_path).to_pylist()
            except Exception as e:  # noqa: BLE001 - a broken file is a note, not a crash
                log.warning("report: %s unreadable: %s", m.worst_path, e)
                m.worst = []
        m.scaling = read_json(metrics / "scaling.json")
        m.transfer = read_json(metrics / "transfer.json")
        for src in (m.scaling, m.evaluate):
            if m.transfer is None and src and isinstance(src.get("transfer"), dict):
                m.transfer = src["transfer"]
        return m

    def _curve(self, kind: str, label: str, rows: list[dict]) -> None:
        xk, yk = ("fpr", "tpr") if kind == "roc" else ("recall", "precision")
        groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            x, y = r.get(xk), r.get(yk)
            if isinstance(x, float) and isinstance(y, float):
                name = r.get("set", r.get("name", label))
                groups[str(name if name not in ("", None) else label) or kind].append((x, y))
        for name, pts in groups.items():
            a = np.array(pts)
            self.curves[kind][name] = (a[:, 0], a[:, 1])

    def present(self) -> dict[str, bool]:
        return {
            "train": self.train is not None or bool(self.train_csv),
            "evaluate": self.evaluate is not None,
            "curves": bool(self.curves["roc"] or self.curves["pr"]),
            "worst": self.worst is not None,
            "scaling": self.scaling is not None,
            "transfer": self.transfer is not None,
        }

    def worst_keys(self, p: ReportParams) -> list[str]:
        return sorted({r["key"] for r in self.worst_picks(p) if isinstance(r.get("key"), str)})

    def worst_picks(self, p: ReportParams) -> list[dict[str, Any]]:
        """The worst rows of the worst cells: cells by their lowest pixel F1 (then score)."""
        if not self.worst:
            return []
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.worst:
            if isinstance(r, dict) and r.get("key"):
                cells[(r.get("domain"), r.get("operation"), r.get("generator"))].append(r)

        def bad(r: dict) -> tuple:
            f1 = _num(r.get("pixel_f1"))
            return (f1 if f1 is not None else 2.0, -(_num(r.get("score")) or 0.0), str(r["key"]))

        ranked = sorted(cells.items(), key=lambda kv: (min(bad(r) for r in kv[1]), str(kv[0])))
        out = []
        for _, rows in ranked[: p.worst_cells]:
            seen = set()
            for r in sorted(rows, key=bad):
                if r["key"] not in seen and len(seen) < p.worst_per_cell:
                    seen.add(r["key"])
                    out.append(r)
        return out


def model_section(model: ModelFiles, scan: Scan, params: Params, page: Page) -> str:
    parts = [
        train_part(model, params, page),
        evaluate_part(model, params),
        curves_part(model, page),
        worst_part(model, scan, params, page),
        robustness_part(model),
        scaling_part(model, params, page),
        transfer_part(model, params, page),
    ]
    return section(
        "model",
        "Model",
        "".join(parts),
        "What the model stages left: each part appears when its file exists. Values "
        "a file does not have are shown as n/a.",
    )


def _absent(what: str, path: str) -> str:
    return (
        f'<p class="absent"><b>{esc(what)}</b>: not shown, {code(path)} does not exist '
        "(written by the model stages)</p>"
    )


def train_part(model: ModelFiles, params: Params, page: Page) -> str:
    if model.train is None and not model.train_csv:
        return _absent("training", f"{params.metrics_dir}/train.json")
    t = model.train or {}
    keys = [
        ("preset", "preset"),
        ("steps", "steps"),
        ("samples seen", "samples"),
        ("epochs", "epochs"),
        ("training samples", "train_samples"),
        ("loss, first logged", "loss_first"),
        ("loss, last 10%", "loss"),
        ("text loss", "loss_txt"),
        ("mask loss", "loss_seg"),
        ("samples/s (median)", "samples_per_s"),
        ("wall time (s)", "wall_s"),
        ("parameters, total", "params_total"),
        ("parameters, trainable", "params_trainable"),
        ("val pixel F1", "val_pixel_f1"),
        ("val image accuracy", "val_image_accuracy"),
    ]
    rows = [
        [
            esc(label),
            t.get(k)
            if _num(t.get(k)) is not None
            else fmt(t.get(k))
            if isinstance(t.get(k), str)
            else "n/a",
        ]
        for label, k in keys
    ]
    body = table(["", "value"], rows)
    if model.model_dir is not None:
        files = sorted(f for f in model.model_dir.rglob("*") if f.is_file())
        size = sum(f.stat().st_size for f in files)
        body += note(
            f"model folder {code(model.model_dir)}: {len(files)} files, {size / 2**20:.1f} MiB"
        )
    else:
        body += note("no model folder (data/train/model/)")
    chart = ""
    if model.train_csv or model.train_val_csv:
        chart = img(
            _train_chart(page.charts, model.train_csv, model.train_val_csv), "training curves"
        )
    return (
        f'<div class="block"><h3>training</h3><div class="row"><div>{body}</div>'
        f"<div>{chart}</div></div>{_raw(t, 'metrics/train.json')}</div>"
    )


def _series(rows: list[dict], prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    cols = {k for r in rows for k in r if k.startswith(prefix)}
    for c in sorted(cols):
        pts = [
            (r["step"], r[c])
            for r in rows
            if isinstance(r.get("step"), float)
            and isinstance(r.get(c), float)
            and math.isfinite(r[c])
        ]
        if pts:
            a = np.array(pts)
            out[c] = (a[:, 0], a[:, 1])
    return out


def _train_chart(ch: Charts, hist: list[dict], val: list[dict]) -> Pic:
    fig, (a1, a2) = ch.new(8.4, 3.0, cols=2)
    losses = _series(hist, "loss")
    for name, (x, y) in losses.items():
        a1.plot(x, y, label=name, linewidth=1.2)
    a1.set_title("training loss per logged step", fontsize=9, loc="left")
    a1.set_xlabel("step", fontsize=8)
    if losses:
        a1.legend(fontsize=7, frameon=False)
        if all((y > 0).all() for _, y in losses.values()):
            a1.set_yscale("log")
    vals = {
        k: v
        for k, v in {**_series(hist, "val_"), **_series(val, "val_")}.items()
        if ((v[1] >= 0) & (v[1] <= 1)).all()
    }  # fractions (F1, accuracy), not counts
    for name, (x, y) in vals.items():
        a2.plot(x, y, marker="o", markersize=3, label=name, linewidth=1.2)
    a2.set_title("validation per evaluation", fontsize=9, loc="left")
    a2.set_xlabel("step", fontsize=8)
    a2.set_ylim(-0.02, 1.02)
    if vals:
        a2.legend(fontsize=7, frameon=False)
    else:
        a2.text(0.5, 0.5, "no val_* columns", ha="center", transform=a2.transAxes, color="#888")
    return ch.save(fig, "train_curves")


def _raw(obj: Any, name: str) -> str:
    rows = [
        [code(k), fmt(v) if not isinstance(v, str) else esc(v[:200])] for k, v in _flatten(obj)
    ][:3000]
    if not rows:
        return ""
    return (
        f"<details><summary>every value in {code(name)} ({len(rows)})</summary>"
        + table(["key", "value"], rows)
        + "</details>"
    )


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and obj and all(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj if not isinstance(obj, list) else json.dumps(obj)[:200]


def eval_sets(ev: dict[str, Any]) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    for key, tag in (("sets", ""), ("splits", ""), ("benchmarks", "benchmark ")):
        v = ev.get(key)
        if isinstance(v, dict):
            for name, block in v.items():
                if isinstance(block, dict):
                    sets[f"{tag}{name}"] = block
    return sets


def _eval_row(name: str, block: Any, cls: str = "") -> str:
    cells = [f"<td>{name}</td>", f'<td class="n">{fmt(_n(block))}</td>']
    cells += [f'<td class="n">{_ci(metric(block, g, k))}</td>' for g, k, _ in EVAL_COLUMNS]
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>"


def _eval_table(rows: list[str]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in ["", "n"] + [c for _, _, c in EVAL_COLUMNS])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def evaluate_part(model: ModelFiles, params: Params) -> str:
    if model.evaluate is None:
        return _absent("evaluation", f"{params.metrics_dir}/evaluate.json")
    ev = model.evaluate
    sets = eval_sets(ev)
    top_baselines = ev.get("baselines") if isinstance(ev.get("baselines"), dict) else {}
    rows = []
    for name, block in sets.items():
        rows.append(_eval_row(f"<b>{esc(name)}</b>", block))
        base = block.get("baselines") if isinstance(block.get("baselines"), dict) else {}
        if not base and isinstance(top_baselines.get(name), dict):
            base = top_baselines[name]
        for bname, b in base.items():
            rows.append(
                _eval_row(
                    f'&nbsp;&nbsp;<span class="note">baseline: {esc(bname)}</span>', b, "base"
                )
            )
    body = (
        _eval_table(rows) if rows else note("no `sets`, `splits` or `benchmarks` in evaluate.json")
    )
    for name, block in sets.items():
        for by in BREAKDOWNS:
            parts = block.get(by)
            if not isinstance(parts, dict) or not parts:
                continue
            sub = [
                _eval_row(esc(k), v) for k, v in sorted(parts.items(), key=lambda kv: str(kv[0]))
            ]
            opened = " open" if by == "by_domain" else ""
            body += (
                f"<details{opened}><summary>{esc(name)}, {esc(by.replace('_', ' '))}</summary>"
                + _eval_table(sub)
                + "</details>"
            )
    return (
        '<div class="block"><h3>evaluation</h3>'
        + note(
            "95% bootstrap intervals in brackets where given; baselines (constant score, "
            "random score, empty mask, full mask) under each set"
        )
        + body
        + _raw(ev, "metrics/evaluate.json")
        + "</div>"
    )


def curves_part(model: ModelFiles, page: Page) -> str:
    if not (model.curves["roc"] or model.curves["pr"]):
        if model.evaluate is None:
            return ""
        return _absent("ROC and PR curves", f"{page.params.plots_dir}/evaluate_roc_<set>.csv")
    fig, (a1, a2) = page.charts.new(8.4, 3.3, cols=2)
    for name, (x, y) in sorted(model.curves["roc"].items()):
        o = np.argsort(x, kind="stable")
        a1.plot(x[o], y[o], label=name, linewidth=1.3)
    a1.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
    a1.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    a1.set_title("ROC (image level)", fontsize=9, loc="left")
    for name, (x, y) in sorted(model.curves["pr"].items()):
        o = np.argsort(x, kind="stable")
        a2.plot(x[o], y[o], label=name, linewidth=1.3)
    a2.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    a2.set_title("precision-recall (image level)", fontsize=9, loc="left")
    for a in (a1, a2):
        if a.lines:
            a.legend(fontsize=7, frameon=False)
    pic = page.charts.save(fig, "eval_curves")
    return f'<div class="block"><h3>ROC and PR curves</h3>{img(pic, "ROC and PR curves")}</div>'


def worst_part(model: ModelFiles, scan: Scan, params: Params, page: Page) -> str:
    if model.worst is None:
        return _absent("worst samples", "data/evaluate/worst.parquet")
    picks = model.worst_picks(params.report)
    if not picks:
        return f'<div class="block"><h3>worst samples</h3>{note("worst.parquet has no rows with a key")}</div>'
    th = page.thumbs
    cards = []
    for w in picks:
        key = str(w["key"])
        r = {
            **scan.by_key.get(key, {}),
            **{
                k: v
                for k, v in w.items()
                if v is not None and k in ("blob", "mask_blob", "mask_source")
            },
        }
        image, why = th.load(r.get("blob"))
        cells = []
        if image is None:
            cells.append(("image", f"no image: {why}"))
        else:
            cells.append(("image", th.save(f"{_slug(key)}-img", th.fit(image))))
            truth = th.mask_of(r, image.shape)
            if r.get("label", w.get("label")) == "real" and truth is None:
                truth = np.zeros(image.shape[:2], bool)
            cells.append(
                (
                    "true mask",
                    th.overlay(_slug(key), image, truth, tag="overlay")
                    if truth is not None
                    else "no true mask",
                )
            )
            pred_path = _pred_path(w, params)
            pred = None
            if pred_path is not None:
                from pipeline.imageio import decode_mask

                try:
                    pred = decode_mask(pred_path.read_bytes())
                except Exception as e:  # noqa: BLE001
                    log.warning("report: predicted mask %s unreadable: %s", pred_path, e)
            cells.append(
                (
                    "predicted mask",
                    th.overlay(_slug(key), image, pred, tag="pred")
                    if pred is not None
                    else "no predicted mask",
                )
            )
        html_cells = "".join(
            f'<div class="panel"><div class="thumbbox">{img(p, f"{c} of {key}")}</div>'
            f'<div class="cap">{esc(c)}</div></div>'
            for c, p in cells
        )
        lines = (
            f"<div>{code(key)} · {esc(_label(w.get('set')))}</div>"
            f"<div>{esc(_label(w.get('domain')))} / {esc(_label(w.get('operation')))} / "
            f"{esc(_label(w.get('generator')))}</div>"
            f"<div>label {esc(_label(w.get('label', r.get('label'))))} · score {fmt(_num(w.get('score')))}"
            f" · pixel F1 {fmt(_num(w.get('pixel_f1')))}"
            + (f" · worst by {esc(w.get('by'))}" if w.get("by") else "")
            + "</div>"
        )
        cards.append(
            f'<div class="sample"><div class="panels">{html_cells}</div>'
            f'<div class="meta-lines">{lines}</div></div>'
        )
    p = params.report
    return (
        '<div class="block"><h3>worst samples</h3>'
        + note(
            f"the {p.worst_per_cell} worst of each of the {p.worst_cells} worst cells "
            "(domain / operation / generator, ranked by their lowest pixel F1); true mask "
            "and predicted mask drawn over the image"
        )
        + f'<div class="samples">{"".join(cards)}</div></div>'
    )


def _pred_path(w: dict[str, Any], params: Params) -> Path | None:
    for k in ("pred_mask", "pred_mask_path", "predicted_mask"):
        v = w.get(k)
        if isinstance(v, str) and v:
            p = Path(v)
            for cand in [p] if p.is_absolute() else [params.data / p, params.data / "evaluate" / p]:
                if cand.is_file():
                    return cand
    return None


def robustness_part(model: ModelFiles) -> str:
    if model.evaluate is None:
        return ""
    rob = model.evaluate.get("robustness")
    if not isinstance(rob, dict) or not rob:
        return f'<div class="block"><h3>robustness</h3>{note("no `robustness` in evaluate.json")}</div>'

    def is_block(v: Any) -> bool:
        return (
            isinstance(v, dict)
            and any(k in v for k in ("image", "pixel", "delta"))
            or (isinstance(v, dict) and any(str(k).startswith(("image_", "pixel_")) for k in v))
        )

    per_set = (
        {"": rob}
        if all(is_block(v) for v in rob.values())
        else {s: v for s, v in rob.items() if isinstance(v, dict)}
    )
    cols = (
        ("image", "auc", "Δ AUC"),
        ("image", "accuracy", "Δ acc@0.5"),
        ("pixel", "f1", "Δ pixel F1"),
        ("pixel", "iou", "Δ IoU"),
    )
    rows = []
    for s, perts in per_set.items():
        for pert, block in perts.items():
            b = block.get("delta", block) if isinstance(block, dict) else block
            rows.append(
                [esc(f"{s}: {pert}" if s else pert)]
                + [_ci(metric(b, g, k), signed=True) for g, k, _ in cols]
            )
    return (
        '<div class="block"><h3>robustness</h3>'
        + note("metrics on perturbed copies minus the clean figures (negative: worse)")
        + table(["perturbation"] + [c for _, _, c in cols], rows)
        + "</div>"
    )


def scaling_part(model: ModelFiles, params: Params, page: Page) -> str:
    if model.scaling is None:
        return _absent("scaling law", f"{params.metrics_dir}/scaling.json")
    sc = model.scaling
    points = sc.get("points", sc.get("runs"))
    points = [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []
    mets = (("image", "auc", "image_auc", "image AUC"), ("pixel", "f1", "pixel_f1", "pixel F1"))

    def xval(pt: dict) -> float | None:
        for k in ("train_samples", "n_train", "samples"):
            if _num(pt.get(k)) is not None:
                return float(pt[k])
        return None

    def yval(pt: dict, g: str, k: str, flat: str) -> float | None:
        v = _num(pt.get(flat))
        return float(v) if v is not None else metric(pt, g, k)[0]

    fits = sc.get("fit") if isinstance(sc.get("fit"), dict) else {}
    fig, axes = page.charts.new(8.4, 3.0, cols=2)
    for ax, (g, k, flat, label) in zip(axes, mets, strict=True):
        pts = sorted(
            (x, y) for pt in points if (x := xval(pt)) and (y := yval(pt, g, k, flat)) is not None
        )
        if pts:
            a = np.array(pts)
            ax.plot(a[:, 0], a[:, 1], "o", color="#1d4ed8", label="runs")
            f = fits.get(flat) if isinstance(fits.get(flat), dict) else {}
            a_, b_, c_ = (_num(f.get(n)) for n in ("a", "b", "c"))
            if None not in (a_, b_, c_):
                xs = np.geomspace(a[:, 0].min(), a[:, 0].max() * 4, 100)
                ax.plot(
                    xs,
                    1 - (a_ * xs**-b_ + c_),
                    "--",
                    color="#dc2626",
                    label=f"fit: 1 - ({a_:.3g} N^-{b_:.3g} + {c_:.3g})",
                )
            ax.legend(fontsize=7, frameon=False)
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no points", ha="center", transform=ax.transAxes, color="#888")
        ax.set_xlabel("training samples", fontsize=8)
        ax.set_title(label, fontsize=9, loc="left")
    pic = page.charts.save(fig, "scaling")
    rows = [
        [fmt(_num(pt.get("fraction"))), fmt(xval(pt))]
        + [fmt(yval(pt, g, k, flat)) for g, k, flat, _ in mets]
        for pt in points
    ]
    return (
        f'<div class="block"><h3>scaling law</h3><div class="row">{img(pic, "scaling")}'
        + table(["fraction", "training samples", "image AUC", "pixel F1"], rows)
        + f"</div>{_raw(sc, 'metrics/scaling.json')}</div>"
    )


def transfer_part(model: ModelFiles, params: Params, page: Page) -> str:
    if model.transfer is None:
        return _absent("cross-domain transfer", f"{params.metrics_dir}/transfer.json")
    tr = model.transfer
    # {metric: {train: {eval: value}}}, or one matrix {train: {eval: value}}
    if all(
        isinstance(v, dict) and all(_num(x) is not None for x in v.values()) for v in tr.values()
    ):
        tr = {"value": tr}
    out = []
    for mname, mat in tr.items():
        if not isinstance(mat, dict):
            continue
        rows_k = sorted(mat, key=str)
        cols_k = sorted({c for r in mat.values() if isinstance(r, dict) for c in r}, key=str)
        if not rows_k or not cols_k:
            continue
        grid = np.array(
            [
                [
                    float(
                        _num(mat[r].get(c))
                        if isinstance(mat[r], dict) and _num(mat[r].get(c)) is not None
                        else np.nan
                    )
                    for c in cols_k
                ]
                for r in rows_k
            ]
        )
        fig, ax = page.charts.new(1.6 + 0.7 * len(cols_k), 1.0 + 0.45 * len(rows_k))
        im = ax.imshow(
            np.ma.masked_invalid(grid),
            cmap="viridis",
            vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0,
            vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1,
            aspect="auto",
        )
        ax.set_xticks(range(len(cols_k)), [str(c) for c in cols_k], fontsize=8, rotation=30)
        ax.set_yticks(range(len(rows_k)), [str(r) for r in rows_k], fontsize=8)
        ax.set_xlabel("evaluated on", fontsize=8)
        ax.set_ylabel("trained on", fontsize=8)
        for i in range(len(rows_k)):
            for j in range(len(cols_k)):
                if np.isfinite(grid[i, j]):
                    light = im.norm(grid[i, j]) > 0.6  # dark text on the light end of viridis
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="k" if light else "w",
                    )
        ax.set_title(str(mname), fontsize=9, loc="left")
        out.append(img(page.charts.save(fig, f"transfer_{_slug(str(mname))}"), f"transfer {mname}"))
    body = (
        '<div class="row">' + "".join(out) + "</div>"
        if out
        else note("no matrix in the transfer file")
    )
    return f'<div class="block"><h3>cross-domain transfer</h3>{body}{_raw(model.transfer, "transfer")}</div>'


def sampling_section(scan: Scan, p: ReportParams, manifest: Path) -> str:
    items = [
        (
            f"The stage streamed {code(manifest.name)} in {scan.batches:,} record batches of up to "
            f"{p.batch_rows:,} rows ({scan.rows:,} rows). Counts, tables and histograms are exact: "
            "every row is counted."
        ),
        (
            "Samples are picked, per cell, as the rows with the smallest "
            f"{code('sha256(seed:key)')} (seed {scan.seed}): up to {p.samples_per_generator} ok "
            f"forgeries per generator (the {p.max_generators} generators with the most rows), "
            f"{p.samples_per_reason} rows per rejection reason, "
            f"{p.duplicate_groups} near-duplicate groups (ranked by {code('sha256(seed:group:ID)')}) "
            f"with up to {p.members_per_group} real members each, the shipped one first. The pick "
            "is a uniform sample of each cell, does not depend on the row order, and is the same "
            "for the same inputs."
        ),
        (
            "A second streamed pass fetches only the rows the picks refer to (group members, the "
            "source image of a regeneration, the evaluation's worst keys)."
        ),
        (
            f"Thumbnails are JPEGs with the longest side {p.thumb_px} px (small images are enlarged "
            "at most 2x); masks and difference maps are max-pooled before shrinking, so thin edits "
            "stay visible. Settings: the <code>report</code> section of params.yaml."
        ),
    ]
    return section(
        "sampling",
        "How this page was made",
        "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>",
    )


STAGE_NAME = "report"
STAGE = Stage(
    name=STAGE_NAME,
    help="one static HTML page of the corpus and the model: data_dir/report/index.html",
    params=ReportParams,
    run=run,
    # blobs for thumbnails; the model (and its metrics) once trained
    reads=("manifest", "exports", "ingest", "synthesize", "masks", "model", "evaluate"),
    writes={"report": "report"},
    uses=("seed", "masks", "export"),
    # the overlay of `inspect`, the difference map of `masks`, the balance targets of `export`
    code=("pipeline/inspect.py", "pipeline/masks.py", "pipeline/export.py", "pipeline/imageio.py"),
)
