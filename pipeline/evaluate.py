"""The evaluate stage: detection and localization figures of the trained model, with
intervals, baselines, breakdowns, robustness, and the worst samples.

Sets. Each split of `evaluate.splits` (`test`, `test_ood`) of the export the model was
trained on (`evaluate.export`, default `train.export`; fractions only cut `train`, so every
fraction of a sweep is tested on the same images), and each outside benchmark of
`evaluate.benchmarks`: a corpus manifest (say a `forensic` source with an IMDL-BenCo JSON of
CASIA, or `image_folder` sources of real and fake images) whose rows ingest reads and marks
`status=benchmark` (`mark_benchmark`): never forged from, never shipped, and their
near-duplicates are kept out of train and val by dedup and split, like `blocklist` sources.
At most `max_images` images per set, in key order (keys are content hashes: a uniform
sample). Every image goes whole through `pipeline.predict.predict_image` (native-resolution
tiles, score = max of the tiles' P(fake)).

Figures (scikit-learn computes every point estimate):
- image level, label "forged" = tampered or synthetic: ROC AUC, average precision, accuracy
  at `threshold` and balanced accuracy. AUC and AP need both classes: with one class they
  are `null` with `undefined` saying why.
- pixel level, over tampered images with a mask: per image F1 and IoU of `P(forged) >=
  threshold` against the true mask (`f1_score` / `jaccard_score` on the flattened masks),
  averaged; and `f1_best`, the *best threshold per image* F1 (the best F1 along each image's
  own precision-recall curve: an oracle choice per image that some papers report; it is
  optimistic by construction).
- 95% intervals: percentile bootstrap (`scipy.stats.bootstrap`, `bootstrap` resamples).
  Image metrics resample real and forged images separately (class counts fixed, so AUC is
  defined in every resample); pixel metrics resample the tampered images. Resampled AUCs are
  Mann-Whitney U / (n_pos n_neg) (scipy, equal to `roc_auc_score`), resampled accuracies and
  pixel figures means of per-image values; AP intervals (one `average_precision_score` per
  resample) are given for whole sets only.
- baselines in each set: `constant_score` (0.5 for every image), `random_score` (uniform,
  seeded by key), `empty_mask`, `full_mask` (binary masks: their `f1_best` is their F1).
- breakdowns `by_domain`, `by_operation`, `by_generator`, `by_source`. A group of forgeries
  only (one operation, one generator) is scored against all real images of its set
  (`versus`), so its AUC is defined.
- robustness: the first `robustness_max_images` images of each set again, perturbed
  (`jpeg90` = JPEG quality 90, `resize0.5` = half size with the mask resized by nearest
  neighbour, `blur2` = Gaussian blur sigma 2, `noise5` = Gaussian noise sigma 5 levels), as
  deltas against the clean figures of the same images (paired bootstrap intervals).

Outputs: `metrics/evaluate.json` (`splits`, `benchmarks`, `robustness`), per set
`plots/evaluate_roc_<set>.csv` (fpr, tpr) and `plots/evaluate_pr_<set>.csv` (recall,
precision) (DVC plots; the files of `test` and `test_ood` are always written, header only
when the set is empty or has one class), the predicted masks `data/evaluate/pred/<set>/<key>.png`
(0/255) and `data/evaluate/worst.parquet`: per set and (domain, operation, generator) cell
the `worst_k` samples by pixel F1 (tampered) and by score error (|label - score|), with
their keys and predicted-mask paths, and `data/evaluate/predictions.parquet`: one row per
evaluated image (set, key, domain, operation, generator, source, label, score, pixel F1 and
IoU, predicted-mask path), which `focus` and the data loop read per cell.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import shutil
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.executor import Executor
from pipeline.params import Params, ParamsError
from pipeline.records import Record
from pipeline.stage import Stage

log = logging.getLogger(__name__)

BENCHMARK_STATUS = "benchmark"  # ingest's status for rows of an outside benchmark
DECLARED_SETS = ("test", "test_ood")  # their curve files are DVC plots: always written
PERTURBATION = re.compile(r"^(jpeg|resize|blur|noise)([0-9]+(?:\.[0-9]+)?)$")
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class EvaluateParams:
    benchmarks: tuple[str, ...] = ()  # corpus manifests of outside benchmarks: never trained on
    export: str | None = None  # export whose test splits are evaluated; None: train.export
    # val too: `focus` steers the next round by the val cells (test stays for reporting)
    splits: tuple[str, ...] = ("val", "test", "test_ood")
    max_images: int = 200  # per set, in key order (a uniform sample: keys are hashes)
    threshold: float = 0.5  # on the image score and on each pixel's P(forged)
    bootstrap: int = 1000  # resamples of the percentile intervals; 0: no intervals
    confidence: float = 0.95
    worst_k: int = 3  # per (domain, operation, generator) cell, by pixel F1 and by score
    perturbations: tuple[str, ...] = ("jpeg90", "jpeg70", "jpeg50", "resize0.75", "resize0.5",
                                      "blur1", "blur2", "noise5")
    robustness_max_images: int = 50  # per set; 0: no robustness
    tile_batch: int = 8  # tiles per forward pass
    device: str = "cpu"
    threads: int | None = 1  # torch threads, as train (more on a shared CPU is slower); None: all

    def __post_init__(self) -> None:
        from pipeline.records import SPLITS

        for s in self.splits:
            if s not in SPLITS:
                raise ValueError(f"evaluate.splits: {s!r}; allowed: {', '.join(SPLITS)}")
        for name in ("max_images", "tile_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluate.{name}: {getattr(self, name)!r}; allowed: >= 1")
        for name in ("bootstrap", "worst_k", "robustness_max_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"evaluate.{name}: {getattr(self, name)!r}; allowed: >= 0")
        if 0 < self.bootstrap < 100:
            raise ValueError(f"evaluate.bootstrap: {self.bootstrap}; allowed: 0 (no intervals) "
                             "or >= 100")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"evaluate.threshold: {self.threshold!r}; allowed: 0 < t < 1")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"evaluate.confidence: {self.confidence!r}; allowed: 0.5 to <1")
        for name in self.perturbations:
            parse_perturbation(name)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"evaluate.threads: {self.threads!r}; allowed: >= 1 or null")


def parse_perturbation(name: str) -> tuple[str, float]:
    """`jpeg70` -> ("jpeg", 70.0); ValueError naming what is allowed."""
    m = PERTURBATION.match(name)
    allowed = ("allowed: jpeg<quality 1-100>, resize<factor 0-1>, blur<sigma>, noise<sigma "
               "in levels>, e.g. jpeg70, resize0.5, blur2, noise5")
    if not m:
        raise ValueError(f"perturbation {name!r}; {allowed}")
    kind, v = m.group(1), float(m.group(2))
    ok = {"jpeg": 1 <= v <= 100 and v == int(v), "resize": 0 < v < 1,
          "blur": v > 0, "noise": v > 0}[kind]
    if not ok:
        raise ValueError(f"perturbation {name!r}: value out of range; {allowed}")
    return kind, v


# ---------------------------------------------------------------------------------------
# outside benchmarks: read by ingest, marked, never shipped (dedup and split keep their
# near-duplicates out of train and val)


def benchmark_manifests(params: Params) -> dict[str, Path]:
    """{benchmark name (the manifest's file stem): manifest path} of `evaluate.benchmarks`."""
    from pipeline.records import SPLITS

    out: dict[str, Path] = {}
    for b in params.evaluate.benchmarks:
        path = params.resolve(b)
        name = _NAME.sub("_", path.stem).strip("_") or "benchmark"
        if name in out:
            raise ParamsError(f"evaluate.benchmarks: two manifests named {name!r} ({out[name]}, "
                              f"{path}); benchmarks are named by their file name")
        if name in SPLITS:
            raise ParamsError(f"evaluate.benchmarks: {path}: a benchmark cannot be named like a "
                              f"split ({name!r}); rename the manifest file")
        out[name] = path
    return out


def benchmark_sources(params: Params) -> dict[str, str]:
    """{source name: benchmark name} of every source of the benchmark manifests."""
    from pipeline.corpus import load_manifest

    out: dict[str, str] = {}
    for name, path in benchmark_manifests(params).items():
        for s in load_manifest(path):
            out[s.name] = name
    return out


def mark_benchmark(rec: Record, sources: dict[str, str]) -> Record:
    """A benchmark source's readable row gets `status=benchmark` (never shipped); its error
    rows keep their reason."""
    if rec.source in sources and rec.status == "ok":
        return rec.replace(status=BENCHMARK_STATUS, stage="ingest",
                           error=f"outside benchmark {sources[rec.source]}: evaluated, never "
                                 "trained on or shipped")
    return rec


# ---------------------------------------------------------------------------------------
# metrics: scikit-learn for every point estimate


def _sk():
    import sklearn

    return sklearn.config_context(assume_finite=True)


def image_metrics(y: np.ndarray, score: np.ndarray, threshold: float = 0.5
                  ) -> dict[str, float | None | str]:
    """AUC, AP, accuracy and balanced accuracy (scikit-learn) of scores against labels
    (1 = forged). With one class, `auc` and `ap` are None and `undefined` says why."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        roc_auc_score,
    )

    y = np.asarray(y, int)
    score = np.asarray(score, float)
    out: dict[str, Any] = {"auc": None, "ap": None, "accuracy": None, "balanced_accuracy": None}
    if len(y) == 0:
        out["undefined"] = "no images"
        return out
    pred = (score >= threshold).astype(int)
    with _sk(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class: sklearn warns; we say so in `undefined`
        out["accuracy"] = float(accuracy_score(y, pred))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        if len(np.unique(y)) < 2:
            only = "forged" if y[0] == 1 else "real"
            out["undefined"] = f"one class only (all {only}): AUC and AP need both"
        else:
            out["auc"] = float(roc_auc_score(y, score))
            out["ap"] = float(average_precision_score(y, score))
    return out


def pixel_scores(truth: np.ndarray, prob: np.ndarray | None, threshold: float = 0.5,
                 pred: np.ndarray | None = None) -> tuple[float, float, float]:
    """(F1, IoU, best-threshold F1) of one image (scikit-learn on the flattened masks).
    `prob` is P(forged) per pixel; a binary prediction `pred` alone (a baseline mask) has no
    threshold to choose, so its best-threshold F1 is its F1."""
    from sklearn.metrics import f1_score, jaccard_score, precision_recall_curve

    t = np.asarray(truth, bool).ravel()
    if pred is None:
        if prob is None:
            raise ValueError("pixel_scores needs prob or pred")
        pred = np.asarray(prob) >= threshold
    p = np.asarray(pred, bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction of {p.size} pixels against a mask of {t.size}")
    with _sk():
        f1 = float(f1_score(t, p, zero_division=0.0))
        iou = float(jaccard_score(t, p, zero_division=0.0))
        if prob is None or not t.any():
            return f1, iou, f1
        precision, recall, _ = precision_recall_curve(t, np.asarray(prob, np.float32).ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.nan_to_num(2 * precision * recall / (precision + recall))
    return f1, iou, float(max(f.max(), f1))


def bootstrap_ci(stat: Callable[..., Any], sizes: tuple[int, ...], n_resamples: int,
                 confidence: float, seed: int, vectorized: bool = True) -> list[float] | None:
    """Percentile interval of `stat(*index_arrays, axis=-1)` when each stratum's indices
    (0..n-1) are resampled with replacement, independently (`scipy.stats.bootstrap`). None
    without resamples or with a stratum of fewer than 2 items."""
    from scipy.stats import bootstrap

    if n_resamples <= 0 or not sizes or min(sizes) < 2:
        return None
    data = tuple(np.arange(n) for n in sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap(data, stat, n_resamples=n_resamples, confidence_level=confidence,
                        method="percentile", vectorized=vectorized, paired=False, axis=-1,
                        random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return [round(float(lo), 4), round(float(hi), 4)]


def mann_whitney_auc(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC as U / (n_pos n_neg) (scipy's Mann-Whitney U, ties counted half): equal to
    `roc_auc_score`, and vectorized over resamples."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(pos, neg, axis=axis, method="asymptotic", use_continuity=False).statistic
    return u / (pos.shape[axis] * neg.shape[axis])


# ---------------------------------------------------------------------------------------
# per-image results and blocks of figures


@dataclass
class Scored:
    """One evaluated image."""

    key: str
    label: str
    score: float
    domain: str
    operation: str
    generator: str
    source: str
    f1: float | None = None  # pixel figures: tampered images with a mask only
    iou: float | None = None
    f1_best: float | None = None
    full_f1: float | None = None  # the full-mask and empty-mask baselines
    full_iou: float | None = None
    empty_f1: float | None = None
    empty_iou: float | None = None
    pred_mask: str | None = None
    blob: str | None = None
    mask_blob: str | None = None

    @property
    def y(self) -> int:
        return int(self.label != "real")

    @property
    def has_pixels(self) -> bool:
        return self.f1 is not None


def _v(value: float | None, ci: list[float] | None = None, undefined: str | None = None
       ) -> dict[str, Any]:
    out: dict[str, Any] = {"value": None if value is None else round(float(value), 4), "ci": ci}
    if undefined:
        out["undefined"] = undefined
    return out


def _explain(part: dict[str, Any], bootstrap: int, why: str) -> dict[str, Any]:
    """Says why a figure has no interval (too few images to resample)."""
    if bootstrap > 0:
        for v in part.values():
            if v["value"] is not None and v["ci"] is None:
                v.setdefault("ci_undefined", why)
    return part


def _seed(seed: int, *parts: object) -> int:
    h = hashlib.sha256(repr((seed, *parts)).encode()).hexdigest()
    return int(h[:12], 16)


def image_part(y: np.ndarray, score: np.ndarray, p: EvaluateParams, seed: int,
               ap_ci: bool = True) -> dict[str, Any]:
    """{auc, ap, accuracy, balanced_accuracy}, each {value, ci[, undefined]}."""
    m = image_metrics(y, score, p.threshold)
    why = m.pop("undefined", None)
    pos, neg = score[y == 1], score[y == 0]
    right = ((score >= p.threshold).astype(int) == y).astype(float)
    rp, rn = right[y == 1], right[y == 0]
    b, c = p.bootstrap, p.confidence
    out: dict[str, Any] = {}
    if m["auc"] is None:
        out["auc"] = _v(None, undefined=why)
        out["ap"] = _v(None, undefined=why)
    else:
        out["auc"] = _v(m["auc"], bootstrap_ci(
            lambda i, j, axis=-1: mann_whitney_auc(pos[i], neg[j], axis),
            (len(pos), len(neg)), b, c, _seed(seed, "auc")))
        ap = None
        if ap_ci:
            from sklearn.metrics import average_precision_score

            def ap_stat(i, j):
                with _sk():
                    return average_precision_score(
                        np.r_[np.ones(len(i)), np.zeros(len(j))], np.r_[pos[i], neg[j]])
            ap = bootstrap_ci(ap_stat, (len(pos), len(neg)), b, c, _seed(seed, "ap"),
                              vectorized=False)
        out["ap"] = _v(m["ap"], ap)
    strata = [a for a in (rp, rn) if len(a)]
    if not strata:
        out["accuracy"] = _v(None, undefined="no images")
        out["balanced_accuracy"] = _v(None, undefined="no images")
        return out
    sizes = tuple(len(a) for a in strata)

    def acc(*idx, axis=-1):
        return sum(a[i].sum(axis=axis) for a, i in zip(strata, idx)) / sum(sizes)

    def bal(*idx, axis=-1):
        return sum(a[i].mean(axis=axis) for a, i in zip(strata, idx)) / len(strata)

    out["accuracy"] = _v(m["accuracy"], bootstrap_ci(acc, sizes, b, c, _seed(seed, "acc")))
    out["balanced_accuracy"] = _v(m["balanced_accuracy"],
                                  bootstrap_ci(bal, sizes, b, c, _seed(seed, "bal")))
    if not ap_ci and b and out["ap"]["value"] is not None:
        out["ap"]["ci_undefined"] = "AP intervals are given for whole sets only"
    return _explain(out, b, "fewer than 2 images in a class")


def mean_part(values: dict[str, np.ndarray], p: EvaluateParams, seed: int, what: str
              ) -> dict[str, Any]:
    """Means of per-image values with bootstrap intervals; `what` names the images."""
    out = {}
    for name, a in values.items():
        if len(a) == 0:
            out[name] = _v(None, undefined=f"no {what}")
            continue
        out[name] = _v(float(np.mean(a)), bootstrap_ci(
            lambda i, axis=-1, a=a: a[i].mean(axis=axis), (len(a),), p.bootstrap,
            p.confidence, _seed(seed, name)))
    return _explain(out, p.bootstrap, f"fewer than 2 {what}")


def block(rows: list[Scored], p: EvaluateParams, seed: int, ap_ci: bool = False
          ) -> dict[str, Any]:
    """The figures of a group of images: n, image, pixel."""
    y = np.array([r.y for r in rows], int)
    score = np.array([r.score for r in rows], float)
    px = [r for r in rows if r.has_pixels]
    return {
        "n": len(rows),
        "n_real": int((y == 0).sum()),
        "n_forged": int((y == 1).sum()),
        "n_pixel": len(px),
        "image": image_part(y, score, p, seed, ap_ci),
        "pixel": mean_part({"f1": np.array([r.f1 for r in px]),
                            "iou": np.array([r.iou for r in px]),
                            "f1_best": np.array([r.f1_best for r in px])},
                           p, seed, "tampered images with a mask"),
    }


def random_scores(rows: list[Scored], seed: int) -> np.ndarray:
    return np.array([np.random.default_rng(_seed(seed, "random", r.key)).random() for r in rows])


def baselines(rows: list[Scored], p: EvaluateParams, seed: int) -> dict[str, Any]:
    y = np.array([r.y for r in rows], int)
    px = [r for r in rows if r.has_pixels]
    n = {"n": len(rows), "n_real": int((y == 0).sum()), "n_forged": int((y == 1).sum())}
    what = "tampered images with a mask"
    return {
        "constant_score": {**n, "score": 0.5,
                           "image": image_part(y, np.full(len(rows), 0.5), p, seed, ap_ci=False)},
        "random_score": {**n, "image": image_part(y, random_scores(rows, seed), p, seed,
                                                  ap_ci=False)},
        "empty_mask": {"n": len(px), "n_pixel": len(px), "pixel": mean_part(
            {k: np.array([r.empty_f1 if k != "iou" else r.empty_iou for r in px])
             for k in ("f1", "iou", "f1_best")}, p, seed, what)},
        "full_mask": {"n": len(px), "n_pixel": len(px), "pixel": mean_part(
            {k: np.array([r.full_f1 if k != "iou" else r.full_iou for r in px])
             for k in ("f1", "iou", "f1_best")}, p, seed, what)},
    }


BREAKDOWNS = ("domain", "operation", "generator", "source")


def set_block(rows: list[Scored], p: EvaluateParams, seed: int) -> dict[str, Any]:
    """A set's block, its baselines and its breakdowns."""
    out = block(rows, p, _seed(seed, "all"), ap_ci=True)
    out["baselines"] = baselines(rows, p, seed)
    reals = [r for r in rows if r.y == 0]
    for by in BREAKDOWNS:
        groups: dict[str, list[Scored]] = defaultdict(list)
        for r in rows:
            groups[getattr(r, by)].append(r)
        parts = {}
        for value, g in sorted(groups.items()):
            versus = None
            if by in ("operation", "generator") and all(r.y == 1 for r in g) and reals:
                g, versus = g + reals, "all real images of the set"
            parts[value] = block(g, p, _seed(seed, by, value))
            if versus:
                parts[value]["versus"] = versus
        out[f"by_{by}"] = parts
    return out


def delta_block(clean: list[Scored], pert: list[Scored], p: EvaluateParams, seed: int
                ) -> dict[str, Any]:
    """Perturbed minus clean figures on the same images, with paired bootstrap intervals."""
    y = np.array([r.y for r in clean], int)
    s0 = np.array([r.score for r in clean])
    s1 = np.array([r.score for r in pert])
    m0, m1 = image_metrics(y, s0, p.threshold), image_metrics(y, s1, p.threshold)
    b, c = p.bootstrap, p.confidence
    image: dict[str, Any] = {}
    pos, neg = y == 1, y == 0
    if m0["auc"] is None:
        image["auc"] = _v(None, undefined=m0.get("undefined"))
        image["ap"] = _v(None, undefined=m0.get("undefined"))
    else:
        p0, n0, p1, n1 = s0[pos], s0[neg], s1[pos], s1[neg]
        image["auc"] = _v(m1["auc"] - m0["auc"], bootstrap_ci(
            lambda i, j, axis=-1: mann_whitney_auc(p1[i], n1[j], axis)
            - mann_whitney_auc(p0[i], n0[j], axis), (len(p0), len(n0)), b, c, _seed(seed, "auc")))
        image["ap"] = _v(m1["ap"] - m0["ap"])
        if b:
            image["ap"]["ci_undefined"] = "AP intervals are given for whole sets only"
    r0 = ((s0 >= p.threshold).astype(int) == y).astype(float)
    r1 = ((s1 >= p.threshold).astype(int) == y).astype(float)
    strata = [(r1[m] - r0[m]) for m in (pos, neg) if m.any()]
    sizes = tuple(len(a) for a in strata)
    image["accuracy"] = _v(m1["accuracy"] - m0["accuracy"], bootstrap_ci(
        lambda *idx, axis=-1: sum(a[i].sum(axis=axis) for a, i in zip(strata, idx)) / sum(sizes),
        sizes, b, c, _seed(seed, "acc")))
    image["balanced_accuracy"] = _v(m1["balanced_accuracy"] - m0["balanced_accuracy"], bootstrap_ci(
        lambda *idx, axis=-1: sum(a[i].mean(axis=axis) for a, i in zip(strata, idx)) / len(strata),
        sizes, b, c, _seed(seed, "bal")))
    _explain(image, b, "fewer than 2 images in a class")
    both = [(a, z) for a, z in zip(clean, pert) if a.has_pixels and z.has_pixels]
    pixel = mean_part({k: np.array([getattr(z, k) - getattr(a, k) for a, z in both])
                       for k in ("f1", "iou", "f1_best")}, p, seed, "tampered images with a mask")
    perturbed = block(pert, replace(p, bootstrap=0), seed)
    return {"n": len(clean), "n_pixel": len(both), "image": image, "pixel": pixel,
            "perturbed": {"image": perturbed["image"], "pixel": perturbed["pixel"]}}


# ---------------------------------------------------------------------------------------
# perturbations


def perturb(rgb: np.ndarray, mask: np.ndarray | None, name: str, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """A perturbed copy of an image (and its mask, resized with nearest neighbour)."""
    import cv2
    from PIL import Image

    kind, v = parse_perturbation(name)
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=int(v))
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB")), mask
    if kind == "resize":
        h, w = rgb.shape[:2]
        size = (max(1, round(w * v)), max(1, round(h * v)))
        out = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        return out, mask
    if kind == "blur":
        return cv2.GaussianBlur(rgb, (0, 0), sigmaX=v, sigmaY=v), mask
    noisy = rgb.astype(np.float32) + rng.normal(0.0, v, rgb.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------------------------------
# the sets


@dataclass
class Item:
    rec: dict[str, Any]
    rgb: np.ndarray
    mask: np.ndarray | None  # None: a forged image whose mask is unknown


def split_items(export: Path, split: str, limit: int) -> Iterator[Item]:
    from pipeline.train_data import iter_split, list_shards

    shards = list_shards(export / split)
    for rec, rgb, mask in iter_split(shards, split, limit):
        yield Item(rec, rgb, mask)


def benchmark_rows(manifest: Path, sources: set[str]) -> tuple[list[Record], Counter]:
    """The rows of a benchmark's sources in the run's manifest: those to evaluate (status
    `benchmark`), and the count of the others by status."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.records import FIELDS

    table = pq.read_table(manifest, filters=pc.field("source").isin(sorted(sources)))
    rows = [Record(**{k: v for k, v in r.items() if k in FIELDS}) for r in table.to_pylist()]
    other = Counter(r.status for r in rows if r.status != BENCHMARK_STATUS)
    return sorted((r for r in rows if r.status == BENCHMARK_STATUS), key=lambda r: r.key), other


def benchmark_items(rows: list[Record], data_dir: Path) -> Iterator[Item]:
    from pipeline import imageio

    for r in rows:
        rgb = imageio.read_rgb(data_dir / r.blob)
        if r.label == "real":
            mask = np.zeros(rgb.shape[:2], bool)
        elif r.mask_blob:
            mask = imageio.read_mask(data_dir / r.mask_blob)
        elif r.label == "synthetic":
            mask = np.ones(rgb.shape[:2], bool)
        else:
            mask = None  # a fake whose forged region the benchmark does not give
        if mask is not None and mask.shape != rgb.shape[:2]:
            raise ValueError(f"benchmark row {r.key}: mask {mask.shape} and image "
                             f"{rgb.shape[:2]} differ")
        yield Item(r.to_dict(), rgb, mask)


def _s(v: Any) -> str:
    return "none" if v in (None, "") else str(v)


def score_item(model, item: Item, p: EvaluateParams, rgb: np.ndarray | None = None,
               mask: np.ndarray | None = None, with_baselines: bool = True):
    """(Scored, predicted bool mask) of one image through `predict_image`."""
    from pipeline.predict import predict_image

    rec = item.rec
    rgb = item.rgb if rgb is None else rgb
    mask = item.mask if mask is None else mask
    pred = predict_image(model, rgb, batch=p.tile_batch, answer=False)
    s = Scored(key=rec["key"], label=rec["label"], score=float(pred.score),
               domain=_s(rec.get("domain")), operation=_s(rec.get("operation")),
               generator=_s(rec.get("generator")), source=_s(rec.get("source")),
               blob=rec.get("blob"), mask_blob=rec.get("mask_blob"))
    binary = pred.prob >= p.threshold
    if rec["label"] == "tampered" and mask is not None and mask.any():
        s.f1, s.iou, s.f1_best = pixel_scores(mask, pred.prob, p.threshold, pred=binary)
        if with_baselines:
            s.full_f1, s.full_iou, _ = pixel_scores(mask, None, pred=np.ones_like(mask))
            s.empty_f1, s.empty_iou, _ = pixel_scores(mask, None, pred=np.zeros_like(mask))
    return s, binary


def evaluate_set(model, name: str, items: Iterator[Item], p: EvaluateParams, out: Path,
                 data_dir: Path, seed: int) -> tuple[list[Scored], dict[str, list[Scored]]]:
    """Every image of a set, clean (its predicted mask written under `out/pred/<set>/`)
    and, for the first `robustness_max_images`, perturbed."""
    from pipeline import imageio

    rows: list[Scored] = []
    robust: dict[str, list[Scored]] = defaultdict(list)
    pred_dir = out / "pred" / name
    for i, item in enumerate(items):
        s, binary = score_item(model, item, p)
        path = pred_dir / f"{s.key}.png"
        imageio.write_bytes(path, imageio.encode_mask(binary))
        s.pred_mask = _rel(path, data_dir)
        rows.append(s)
        if i < p.robustness_max_images:
            for pert in p.perturbations:
                rng = np.random.default_rng(_seed(seed, "noise", pert, s.key))
                rgb, mask = perturb(item.rgb, item.mask, pert, rng)
                ps, _ = score_item(model, item, p, rgb=rgb, mask=mask, with_baselines=False)
                robust[pert].append(ps)
    return rows, dict(robust)


def _rel(path: Path, data_dir: Path) -> str:
    """A path relative to data_dir when inside it (the report resolves it there)."""
    try:
        return str(path.resolve().relative_to(data_dir.resolve()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------------------------------
# outputs


def write_curves(plots: Path, name: str, rows: list[Scored]) -> str | None:
    """`evaluate_roc_<name>.csv` (fpr, tpr) and `evaluate_pr_<name>.csv` (recall,
    precision); header only (and the reason returned) when the set has one class."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.array([r.y for r in rows], int)
    s = np.array([r.score for r in rows], float)
    roc: list[tuple[float, float]] = []
    pr: list[tuple[float, float]] = []
    why = None
    if len(rows) == 0:
        why = "no images"
    elif len(np.unique(y)) < 2:
        why = "one class only"
    else:
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        roc = list(zip(fpr.tolist(), tpr.tolist()))
        pr = list(zip(recall.tolist()[::-1], precision.tolist()[::-1]))
    _csv(plots / f"evaluate_roc_{name}.csv", ("fpr", "tpr"), roc)
    _csv(plots / f"evaluate_pr_{name}.csv", ("recall", "precision"), pr)
    return why


def _csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows((round(a, 6), round(b, 6)) for a, b in rows)
    os.replace(tmp, path)


WORST_COLUMNS = {"set": "string", "by": "string", "rank": "int64", "key": "string",
                 "domain": "string", "operation": "string", "generator": "string",
                 "source": "string", "label": "string", "score": "float64",
                 "pixel_f1": "float64", "pixel_iou": "float64", "pred_mask": "string",
                 "blob": "string", "mask_blob": "string"}


def worst_rows(name: str, rows: list[Scored], k: int) -> list[dict[str, Any]]:
    """Per (domain, operation, generator) cell: the k lowest pixel F1 (tampered images) and
    the k largest score errors |label - score|."""
    cells: dict[tuple[str, str, str], list[Scored]] = defaultdict(list)
    for r in rows:
        cells[(r.domain, r.operation, r.generator)].append(r)
    out = []
    for _, rs in sorted(cells.items()):
        by_f1 = sorted((r for r in rs if r.has_pixels), key=lambda r: (r.f1, r.key))[:k]
        by_score = sorted(rs, key=lambda r: (-abs(r.y - r.score), r.key))[:k]
        for by, picked in (("pixel_f1", by_f1), ("score", by_score)):
            for rank, r in enumerate(picked):
                out.append({"set": name, "by": by, "rank": rank, "key": r.key,
                            "domain": r.domain, "operation": r.operation,
                            "generator": r.generator, "source": r.source, "label": r.label,
                            "score": round(r.score, 6), "pixel_f1": r.f1, "pixel_iou": r.iou,
                            "pred_mask": r.pred_mask, "blob": r.blob, "mask_blob": r.mask_blob})
    return out


PREDICTION_COLUMNS = {"set": "string", "key": "string", "domain": "string",
                      "operation": "string", "generator": "string", "source": "string",
                      "label": "string", "score": "float64", "pixel_f1": "float64",
                      "pixel_iou": "float64", "pred_mask": "string"}


def prediction_rows(name: str, rows: list[Scored]) -> list[dict[str, Any]]:
    """One row per evaluated image: what `focus` and the loop read per cell."""
    return [{"set": name, "key": r.key, "domain": r.domain, "operation": r.operation,
             "generator": r.generator, "source": r.source, "label": r.label,
             "score": round(r.score, 6), "pixel_f1": r.f1, "pixel_iou": r.iou,
             "pred_mask": r.pred_mask} for r in rows]


def write_table(path: Path, rows: list[dict[str, Any]], columns: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(k, getattr(pa, t)()) for k, t in columns.items()])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def write_worst(path: Path, rows: list[dict[str, Any]], manifest: Path) -> None:
    """worst.parquet, with each row's blob and mask blob from the run's manifest."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    need = sorted({r["key"] for r in rows if not r.get("blob")})
    if need and manifest.exists():
        t = pq.read_table(manifest, columns=["key", "blob", "mask_blob"],
                          filters=pc.field("key").isin(need))
        found = {r["key"]: r for r in t.to_pylist()}
        for r in rows:
            f = found.get(r["key"])
            if f and not r.get("blob"):
                r["blob"], r["mask_blob"] = f["blob"], f["mask_blob"]
    write_table(path, rows, WORST_COLUMNS)


# ---------------------------------------------------------------------------------------
# the stage


DEFINITIONS = {
    "forged": "label tampered or synthetic (image level); pixel figures over tampered images "
              "with a mask",
    "accuracy": "score >= threshold means forged",
    "pixel.f1": "per-image F1 of P(forged) >= threshold against the true mask, averaged",
    "pixel.iou": "per-image IoU (Jaccard) at the same threshold, averaged",
    "pixel.f1_best": "best threshold per image: the best F1 along each image's own "
                     "precision-recall curve (an oracle per image; optimistic), averaged",
    "ci": "percentile bootstrap; image metrics resample real and forged images separately, "
          "AP intervals for whole sets only",
    "versus": "a breakdown group of forgeries only, scored against all real images of its set",
    "robustness": "perturbed minus clean on the same images (first robustness_max_images)",
}


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Evaluates the model at `inputs['model']` on the export's test splits and on the
    benchmarks; writes `out/worst.parquet`, `out/pred/`, the curves under plots_dir."""
    import torch

    from pipeline.model import load_model

    p: EvaluateParams = params.evaluate
    out = Path(out)
    model_dir = Path(inputs["model"])
    if not (model_dir / "defakerone.json").exists():
        raise FileNotFoundError(f"evaluate: no trained model at {model_dir}; run the train "
                                "stage first")
    export_name = p.export or params.train.export
    export = Path(inputs["exports"]) / export_name
    if not export.is_dir():
        raise FileNotFoundError(f"evaluate: export {export_name!r} not found under "
                                f"{inputs['exports']}")
    if p.threads:
        torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    model = load_model(model_dir, device=p.device)
    if (out / "pred").exists():
        shutil.rmtree(out / "pred")
    data_dir = params.data
    plots = params.plots
    metrics: dict[str, Any] = {
        "model": str(model_dir), "export": export_name, "threshold": p.threshold,
        "bootstrap": {"resamples": p.bootstrap, "confidence": p.confidence,
                      "method": "percentile"},
        "definitions": DEFINITIONS, "splits": {}, "benchmarks": {}, "robustness": {},
        "skipped": {}, "curves": {}, "images": {}, "benchmark_rows": {},
    }
    worst: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    sets: list[tuple[str, str, Callable[[], Iterator[Item]]]] = []
    for split in p.splits:
        if not (export / split).is_dir() or not any((export / split).glob("*.tar")):
            metrics["skipped"][split] = f"no {split} shards in export {export_name}"
            continue
        sets.append(("splits", split, lambda s=split: split_items(export, s, p.max_images)))
    of_source = benchmark_sources(params)
    for name, path in benchmark_manifests(params).items():
        mine = {s for s, b in of_source.items() if b == name}
        rows, other = benchmark_rows(Path(inputs["manifest"]), mine)
        metrics["benchmark_rows"][name] = {BENCHMARK_STATUS: len(rows), **dict(other)}
        if not rows:
            metrics["skipped"][name] = (
                f"benchmark {path}: no readable rows in {inputs['manifest']}; rerun ingest "
                "after adding a benchmark (its rows are read by ingest)")
            continue
        rows = rows[: p.max_images]
        sets.append(("benchmarks", name, lambda r=rows: benchmark_items(r, data_dir)))
    total = 0
    for group, name, items in sets:
        t1 = time.perf_counter()
        rows, robust = evaluate_set(model, name, items(), p, out, data_dir, params.seed)
        total += len(rows)
        metrics["images"][name] = {"n": len(rows), "seconds": round(time.perf_counter() - t1, 2)}
        log.info("evaluate %s: %d images in %.1fs", name, len(rows), time.perf_counter() - t1)
        if not rows:
            metrics["skipped"][name] = "no images"
            continue
        metrics[group][name] = set_block(rows, p, _seed(params.seed, name))
        why = write_curves(plots, name, rows)
        metrics["curves"][name] = why or "written"
        worst += worst_rows(name, rows, p.worst_k)
        predictions += prediction_rows(name, rows)
        if robust:
            by_key = {r.key: r for r in rows}
            metrics["robustness"][name] = {
                pert: delta_block([by_key[r.key] for r in prs], prs, p,
                                  _seed(params.seed, name, pert))
                for pert, prs in robust.items()}
    for name in DECLARED_SETS:  # DVC plots: the declared files always exist
        if name not in metrics["curves"]:
            write_curves(plots, name, [])
            metrics["curves"][name] = "no images"
    write_worst(out / "worst.parquet", worst, Path(inputs["manifest"]))
    write_table(out / "predictions.parquet", predictions, PREDICTION_COLUMNS)
    metrics["total"] = total
    metrics["worst_rows"] = len(worst)
    metrics["wall_s"] = round(time.perf_counter() - t0, 2)
    return metrics


def headline(metrics: dict[str, Any]) -> str:
    """One line per set: image AUC and pixel F1 with their intervals."""
    parts = []
    for group in ("splits", "benchmarks"):
        for name, b in metrics.get(group, {}).items():
            auc, f1 = b["image"]["auc"], b["pixel"]["f1"]

            def f(v):
                return "n/a" if v["value"] is None else f"{v['value']:.3f}"
            parts.append(f"{name}: n={b['n']} AUC {f(auc)} pixel F1 {f(f1)}")
    return "; ".join(parts) or "nothing evaluated"


STAGE = Stage(
    name="evaluate",
    help="detection and localization figures of the model on the test splits and outside "
         "benchmarks: metrics/evaluate.json, ROC/PR plots, data/evaluate/worst.parquet",
    params=EvaluateParams,
    run=run,
    reads=("manifest", "model", "exports", "ingest"),  # ingest: benchmark images and masks
    writes={"evaluate": "evaluate"},
    uses=("seed", "train.export"),
    code=("pipeline/predict.py", "pipeline/model.py", "pipeline/views.py",
          "pipeline/train_data.py"),
    plots=tuple(f"evaluate_{k}_{s}.csv" for s in DECLARED_SETS for k in ("roc", "pr")),
    plot_specs={
        "evaluate_roc": {"template": "simple", "x": "fpr",
                         "y": {f"evaluate_roc_{s}.csv": ["tpr"] for s in DECLARED_SETS}},
        "evaluate_pr": {"template": "simple", "x": "recall",
                        "y": {f"evaluate_pr_{s}.csv": ["precision"] for s in DECLARED_SETS}},
    },
)
