"""The masks stage: every tampered sample gets a trustworthy mask, or a recorded reason why not.

Diffusers edits change pixels outside the requested region, instruction edits have no region
at all and `pairs` sources come with none, so the edited region is derived by differencing
the forged image against its original:

1. a small global colour shift between the two is fitted (per-channel gain and offset on a
   subsample, robust to the edit) and removed from the original with a lookup table;
2. the per-pixel change is the largest absolute channel difference; a pixel counts as changed
   when it exceeds a threshold that rises with the noise floor (the median change, which is
   zero for a lossless save and a few levels after JPEG) and with the local contrast of the
   original (JPEG errors concentrate on edges);
3. region-level clean-up on a working resolution of about `work_pixels` (an integer
   reduction): the local density of changed pixels, closing, hole filling and small-component
   removal (one contour pass), every size a fraction of the image's shorter side or area; the
   result is scaled back to H x W.

Everything per pixel is a uint8 OpenCV op (absdiff, channel max, compare); nothing is float
at full resolution, so a 1 MP JPEG pair takes about 10 ms on one core (bench/bench_masks.py).

`mask_quality` in [0, 1] is purity x coverage: purity is the share of all changed pixels
that fall inside the mask (low when changes are scattered over the image), coverage is the
share of mask pixels that are changed, saturating at one half (low for a region that is
mostly filled in by the clean-up). Quality filters record a reason in `status`; rejected
rows stay in the manifest.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipeline.executor import Executor, Resources, chunked
from pipeline.imageio import decode, decode_mask, encode_gray, encode_mask, write_bytes
from pipeline.params import Params
from pipeline.records import ManifestWriter, Record, counts, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

# reasons this stage may set in `status`
REASONS = (
    "size_mismatch",
    "missing_mask",
    "unreadable",
    "no_visible_change",
    "mask_too_small",
    "mask_too_large",
    "degenerate_output",
    "edit_leaked",
    "low_quality",
    "mask_error",
)

_WINDOW_ROWS = 20_000  # rows handed to the executor per call, so manifests stream


@dataclass(frozen=True)
class MasksParams:
    # per-pixel change, in 0-255 levels of the largest channel difference
    threshold_lossless: float = 1.5  # threshold when the noise floor is zero (lossless save)
    threshold_min: float = 3.0  # lossy saves: never count a change below this
    noise_factor: float = 2.0  # lossy: threshold >= noise_factor x median change (noise floor)
    texture_factor: float = 0.25  # + this x local contrast of the original (JPEG edge noise)
    prefilter: bool = True  # 3x3 Gaussian on both images first: halves JPEG noise
    colour_correction: bool = True  # fit and remove a small global colour shift first
    max_colour_shift: float = 24.0  # levels; a larger fitted shift is not applied
    # region level; sizes are fractions of the working image's shorter side or area
    work_pixels: int = 262_144  # region clean-up runs at about this many pixels (integer reduction)
    window: float = 0.012  # density window
    density: float = 0.3  # share of changed pixels in the window that makes it edited
    close_radius: float = 0.012  # closing radius
    max_hole: float = 0.02  # holes up to this fraction of the image are filled
    min_component: float = 0.0004  # components below this fraction of the image are dropped
    # quality filters
    min_area: float = 0.0005  # mask area below this fraction: mask_too_small
    max_area: float = 0.8  # above: mask_too_large
    min_changed: float = 0.0001  # changed pixels below this fraction: no_visible_change
    min_quality: float = 0.0  # below: low_quality (0 disables)
    max_leak: float = 0.5  # share of the mask outside the dilated requested region
    leak_margin: float = 0.03  # dilation of the requested region, fraction of shorter side
    check_synthetic: bool = True  # decode synthetic rows and reject constant/black outputs
    keep_diff: bool = False  # write the soft difference map (shipped as <key>.diff.png)

    def __post_init__(self) -> None:
        fractions = ("window", "density", "close_radius", "max_hole", "min_component",
                     "min_area", "max_area", "min_changed", "min_quality", "max_leak",
                     "leak_margin")
        for name in fractions:
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"masks.{name}: {v!r} is not allowed; allowed: 0.0 to 1.0")
        if self.min_area > self.max_area:
            raise ValueError(
                f"masks.min_area ({self.min_area}) must not exceed masks.max_area ({self.max_area})"
            )
        levels = ("threshold_lossless", "threshold_min", "noise_factor", "texture_factor",
                  "max_colour_shift")
        for name in levels:
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"masks.{name}: {v!r} is not allowed; allowed: >= 0")
        if self.work_pixels < 4096:
            raise ValueError(f"masks.work_pixels: {self.work_pixels!r}; allowed: >= 4096")


@dataclass
class Derivation:
    """What differencing found: the mask and the evidence behind it."""

    mask: np.ndarray  # H x W bool
    diff: np.ndarray  # H x W uint8: largest channel difference after colour correction
    threshold: float  # global part of the per-pixel threshold
    noise: float  # median change: the noise floor
    changed: float  # fraction of pixels counted as changed
    quality: float  # purity x coverage, in [0, 1]
    colour_shift: float  # largest level shift removed by colour correction

    @property
    def area(self) -> float:
        return float(np.count_nonzero(self.mask)) / self.mask.size

    def soft(self) -> np.ndarray:
        """The difference map for people and for `<key>.diff.png`: 255 at 4x the threshold."""
        return cv2.convertScaleAbs(self.diff, alpha=255.0 / (4.0 * max(self.threshold, 1.0)))


def _odd(n: float) -> int:
    n = max(1, round(n))
    return n if n % 2 else n + 1


def _median_u8(a: np.ndarray) -> float:
    hist = cv2.calcHist([np.ascontiguousarray(a)], [0], None, [256], [0, 256]).ravel()
    return float(np.searchsorted(np.cumsum(hist), hist.sum() / 2.0))


def _sub(img: np.ndarray, step: int) -> np.ndarray:
    """Every `step`-th pixel; a nearest resize is ~6x faster than copying a strided view."""
    if step == 1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, w // step), max(1, h // step)), interpolation=cv2.INTER_NEAREST)


def _channel_max(img: np.ndarray) -> np.ndarray:
    c = cv2.split(img)
    return cv2.max(cv2.max(c[0], c[1]), c[2])


def match_colours(
    original: np.ndarray, forged: np.ndarray, max_shift: float
) -> tuple[np.ndarray, float]:
    """The original with a per-channel gain and offset towards `forged` applied.

    Fitted on a subsample from a median start with two inlier refits, so an edit covering
    less than half the image does not pull the fit. A channel whose values span little range
    gets an offset only; a channel whose shift exceeds `max_shift` levels is left alone (that
    is no longer a small global shift). Returns (image, largest shift applied).
    """
    h, w = original.shape[:2]
    step = max(1, int(np.sqrt(h * w / 4096)))  # ~4k samples fit 2 numbers per channel
    o8 = original[::step, ::step].reshape(-1, 3)
    f8 = forged[::step, ::step].reshape(-1, 3)
    if np.count_nonzero((o8 == f8).all(axis=1)) * 2 > len(o8):
        return original, 0.0  # most pixels identical: there is no global shift
    o = o8.astype(np.float32)
    f = f8.astype(np.float32)
    # all three channels at once: per-call overhead, not arithmetic, dominates at 4k samples
    lo, hi = np.percentile(o, [1, 99], axis=0)
    ranged = hi - lo >= 64
    a = np.ones(3, np.float32)
    b = np.median(f - o, axis=0).astype(np.float32)
    unsaturated = (f > 0) & (f < 255)  # saturated values carry no information about the shift
    for band in (8.0, 4.0):
        w = ((np.abs(f - (a * o + b)) <= band) & unsaturated).astype(np.float32)
        n = w.sum(axis=0)
        fit = n >= 64
        if not fit.any():
            break
        n = np.maximum(n, 1.0)
        mx, my = (w * o).sum(axis=0) / n, (w * f).sum(axis=0) / n
        dx = o - mx
        var = (w * dx * dx).sum(axis=0) / n
        cov = (w * dx * (f - my)).sum(axis=0) / n
        gain = np.where(ranged & (var >= 16.0), np.clip(cov / np.maximum(var, 1e-6), 0.8, 1.25), a)
        a = np.where(fit, gain, a)
        b = np.where(fit, my - a * mx, b)
    v = np.arange(256, dtype=np.float32)
    seen = np.maximum(np.abs((a - 1.0) * lo + b), np.abs((a - 1.0) * hi + b))
    # a channel whose fitted shift is too large is left alone: not a small global shift
    fitted = np.clip((a - 1.0) * v[:, None] + b, -max_shift, max_shift)
    delta = np.where(seen <= max_shift, fitted, 0.0)
    lut = v[:, None] + delta
    shift = float(np.abs(lut - v[:, None]).max())
    if shift < 1.0:
        # below one level the table rounds to (nearly) the identity; the thresholds absorb it
        return original, 0.0
    table = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(original), table.reshape(1, 256, 3)), shift


def derive_mask(
    original: np.ndarray, forged: np.ndarray, p: MasksParams | None = None
) -> Derivation:
    """The edited region of `forged` (H x W x 3 uint8) relative to `original` (same shape)."""
    p = p or MasksParams()
    if original.shape != forged.shape or original.ndim != 3 or original.shape[2] != 3:
        raise ValueError(
            f"original {original.shape} and forged {forged.shape} must both be H x W x 3"
        )
    original = np.ascontiguousarray(original, dtype=np.uint8)
    forged = np.ascontiguousarray(forged, dtype=np.uint8)
    h, w = forged.shape[:2]
    shift = 0.0
    if p.colour_correction:
        original, shift = match_colours(original, forged, p.max_colour_shift)
    # noise floor: the median change (most of the image is untouched); zero for lossless
    step = max(1, int(np.sqrt(h * w / 65536)))
    noise = _median_u8(_channel_max(cv2.absdiff(_sub(forged, step), _sub(original, step))))
    lossy = noise >= 1
    if p.prefilter and lossy:
        # lossy: JPEG error is high-frequency, a 3x3 Gaussian halves it
        a = cv2.GaussianBlur(original, (3, 3), 0)
        b = cv2.GaussianBlur(forged, (3, 3), 0)
        diff = _channel_max(cv2.absdiff(b, a))
        noise = _median_u8(_sub(diff, step))
    else:
        a = original
        diff = _channel_max(cv2.absdiff(forged, original))
    if lossy:
        threshold = max(p.threshold_min, p.noise_factor * noise)
    else:
        threshold = p.threshold_lossless
    # local contrast of the original, max over channels: JPEG error grows near edges
    contrast = _channel_max(cv2.morphologyEx(a, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)))
    limit = cv2.convertScaleAbs(contrast, alpha=p.texture_factor, beta=threshold)
    changed = cv2.compare(diff, limit, cv2.CMP_GT)  # 0/255
    n_changed = cv2.countNonZero(changed)

    # region level, at the working resolution: an integer reduction, so INTER_AREA takes its
    # fast path; the rows and columns past the last whole block are cropped, then replicated
    f = max(1, min(int(np.sqrt(h * w / p.work_pixels) + 0.5), h, w))
    hs, ws = max(1, h // f), max(1, w // f)
    dens = changed if f == 1 else cv2.resize(changed[: hs * f, : ws * f], (ws, hs),
                                             interpolation=cv2.INTER_AREA)
    side = min(ws, hs)
    k = _odd(p.window * side)
    local = cv2.blur(dens, (k, k)) if k > 1 else dens
    region = cv2.compare(local, p.density * 255.0, cv2.CMP_GT)
    r = max(1, round(p.close_radius * side))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, disk)
    region = _clean(region, p.min_component * ws * hs, p.max_hole * ws * hs)

    n_in = cv2.countNonZero(region)
    if n_in:
        total = cv2.sumElems(dens)[0]
        ev_in = cv2.sumElems(cv2.bitwise_and(dens, region))[0]
        purity = ev_in / total if total else 0.0
        coverage = min(1.0, ev_in / (255.0 * n_in) / 0.5)
        quality = float(np.clip(purity * coverage, 0.0, 1.0))
    else:
        quality = 0.0
    if f > 1:
        up = cv2.resize(region, (ws * f, hs * f), interpolation=cv2.INTER_LINEAR)
        if up.shape != (h, w):
            up = cv2.copyMakeBorder(up, 0, h - hs * f, 0, w - ws * f, cv2.BORDER_REPLICATE)
        mask = up > 127
    else:
        mask = region > 0
    return Derivation(
        mask=mask,
        diff=diff,
        threshold=float(threshold),
        noise=noise,
        changed=n_changed / (h * w),
        quality=quality,
        colour_shift=shift,
    )


def _clean(region: np.ndarray, min_area: float, max_hole: float) -> np.ndarray:
    """Drops components smaller than `min_area` and fills holes up to `max_hole` pixels.

    One contour pass (outer boundaries and holes, 8- and 4-connected like the components they
    bound) instead of two labelings: it is tens of times faster on a mostly empty map.
    Small components go first, so an island inside a small hole ends up filled, not dropped.
    """
    if min_area < 1 and max_hole < 1:
        return region
    contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return region
    out = region.copy()
    parent = hierarchy[0][:, 3]
    # a contour's polygon area misses half its boundary pixels; add them back
    area = np.array([cv2.contourArea(c) + 0.5 * cv2.arcLength(c, True) + 1 for c in contours])
    small = [c for c, a, q in zip(contours, area, parent) if q < 0 and a < min_area]
    if small:
        cv2.drawContours(out, small, -1, 0, thickness=cv2.FILLED)
    holes = [c for c, a, q in zip(contours, area, parent) if q >= 0 and a <= max_hole]
    if holes:
        cv2.drawContours(out, holes, -1, 255, thickness=cv2.FILLED)
    return out


def is_degenerate(image: np.ndarray) -> str | None:
    """Why an output is unusable (constant, all black, non-finite), or None."""
    a = np.asarray(image)
    if a.size == 0:
        return "empty image"
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return "non-finite pixel values"
    h, w = a.shape[:2]
    step = max(1, int(np.sqrt(h * w / 262144)))
    s = a[::step, ::step]
    lo, hi = float(s.min()), float(s.max())
    if hi <= 4:
        return "all black (a safety checker's output)"
    if hi - lo <= 2:
        return f"constant image (values {lo:.0f}..{hi:.0f})"
    return None


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    inter = np.count_nonzero(a & b)
    union = np.count_nonzero(a | b)
    return float(inter / union) if union else 1.0


def leak_fraction(mask: np.ndarray, requested: np.ndarray, margin: float) -> float:
    """Share of `mask` outside `requested` dilated by `margin` x its shorter side."""
    n = np.count_nonzero(mask)
    if not n:
        return 0.0
    r = max(1, round(margin * min(mask.shape)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    grown = cv2.dilate(requested.astype(np.uint8), kernel) > 0
    return float(np.count_nonzero(mask & ~grown) / n)


# --------------------------------------------------------------------------- the stage


def _rel(path: Path, data_dir: Path) -> str:
    try:
        return os.path.relpath(path, data_dir)
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _reject(r: Record, status: str, error: str) -> Record:
    return r.replace(status=status, error=error, stage="masks")


class _Worker:
    """Maps a chunk of records to the same records with masks set or a reason recorded."""

    def __init__(self, p: MasksParams, data_dir: str, out: str):
        self.p = p
        self.data = Path(data_dir)
        self.out = Path(out)

    def __call__(self, chunk: list[Record]) -> list[Record]:
        results = []
        for r in chunk:
            try:
                results.append(self.one(r))
            except Exception as e:  # noqa: BLE001 - a bad sample is a row, never a crashed run
                log.warning("masks: %s failed: %s", r.key, e)
                results.append(_reject(r, "mask_error", f"{type(e).__name__}: {e}"))
        return results

    def _read(self, rel: str) -> bytes:
        return (self.data / rel).read_bytes()

    def one(self, r: Record) -> Record:
        if r.status != "ok":
            return r
        if r.label == "real":
            return r.replace(mask_source="none", mask_area=0.0)
        if r.label == "synthetic":
            r = r.replace(mask_source="full", mask_area=1.0)
            if self.p.check_synthetic and r.blob:
                try:
                    why = is_degenerate(decode(self._read(r.blob)))
                except Exception as e:  # noqa: BLE001
                    return _reject(r, "unreadable", f"synthetic image: {type(e).__name__}: {e}")
                if why:
                    return _reject(r, "degenerate_output", why)
            return r
        if r.label != "tampered":
            return _reject(r, "mask_error",
                           f"label {r.label!r}; allowed: real, tampered, synthetic")
        if r.parent_blob:
            return self.derived(r)
        if r.mask_blob:
            return self.given(r)
        return _reject(r, "missing_mask", "tampered sample with neither a mask nor an original")

    def given(self, r: Record) -> Record:
        path = self.data / r.mask_blob
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001
            return _reject(r, "missing_mask", f"given mask unreadable: {type(e).__name__}: {e}")
        if r.width and r.height and size != (r.width, r.height):
            return _reject(
                r, "size_mismatch", f"mask is {size[0]}x{size[1]}, image is {r.width}x{r.height}"
            )
        r = r.replace(mask_source="given")
        if r.mask_area is None:
            m = decode_mask(path.read_bytes())
            area = float(np.count_nonzero(m)) / m.size
            if area == 0.0:
                return _reject(r.replace(mask_area=0.0), "missing_mask", "given mask is empty")
            r = r.replace(mask_area=area)
        return r

    def derived(self, r: Record) -> Record:
        p = self.p
        try:
            original = decode(self._read(r.parent_blob))
            forged = decode(self._read(r.blob))
        except Exception as e:  # noqa: BLE001
            return _reject(r, "unreadable", f"{type(e).__name__}: {e}")
        if original.shape != forged.shape:
            return _reject(
                r, "size_mismatch",
                f"original is {original.shape[1]}x{original.shape[0]}, "
                f"forged is {forged.shape[1]}x{forged.shape[0]}",
            )
        why = is_degenerate(forged)
        if why:
            return _reject(r, "degenerate_output", why)
        d = derive_mask(original, forged, p)
        h, w = forged.shape[:2]
        rel_mask = _rel(self.out / "masks" / f"{r.key}.png", self.data)
        write_bytes(self.data / rel_mask, encode_mask(d.mask))
        changes: dict[str, Any] = {
            "mask_blob": rel_mask,
            "mask_source": "derived",
            "mask_area": d.area,
            "mask_quality": d.quality,
            "mask_iou_requested": None,
            "width": w,
            "height": h,
        }
        if p.keep_diff:
            rel_diff = _rel(self.out / "diff" / f"{r.key}.png", self.data)
            write_bytes(self.data / rel_diff, encode_gray(d.soft()))
            changes["diff_blob"] = rel_diff
        leak = None
        requested = None
        if r.requested_mask_blob:
            requested = decode_mask(self._read(r.requested_mask_blob))
            if requested.shape == d.mask.shape:
                changes["mask_iou_requested"] = iou(d.mask, requested)
                leak = leak_fraction(d.mask, requested, p.leak_margin)
            else:
                log.warning("masks: %s requested mask %s does not fit the image %s",
                            r.key, requested.shape, d.mask.shape)
        changes.update(mask_noise=float(d.noise), mask_threshold=float(d.threshold),
                       mask_changed=round(d.changed, 6), colour_shift=round(d.colour_shift, 2),
                       mask_leak=leak)
        r = r.replace(**changes)
        return self.filter(r, d, original, forged, leak)

    def filter(self, r: Record, d: Derivation, original: np.ndarray, forged: np.ndarray,
               leak: float | None) -> Record:
        p = self.p
        area = d.area
        if d.changed < p.min_changed or area == 0.0:
            return _reject(r, "no_visible_change",
                           f"{d.changed:.2%} of pixels changed above {d.threshold:.1f} levels")
        if r.model_id:
            # a model's output blacked out by a safety checker, pasted back into the source
            region = forged[d.mask]
            if region.size and int(region.max()) == 0 and float(original[d.mask].mean()) > 16:
                return _reject(r, "degenerate_output", "edited region is all black")
        if area < p.min_area:
            return _reject(r, "mask_too_small", f"mask area {area:.4%} < min_area {p.min_area:.4%}")
        if area > p.max_area:
            return _reject(r, "mask_too_large", f"mask area {area:.2%} > max_area {p.max_area:.2%}")
        if leak is not None and leak > p.max_leak:
            return _reject(r, "edit_leaked",
                           f"{leak:.0%} of the changed region lies outside the requested region "
                           f"(max_leak {p.max_leak:.0%})")
        if d.quality < p.min_quality:
            return _reject(r, "low_quality", f"mask quality {d.quality:.2f} < {p.min_quality:.2f}")
        return r


@dataclass(frozen=True)
class _Factory:
    """Picklable: builds one worker per process."""

    p: MasksParams
    data_dir: str
    out: str

    def __call__(self) -> _Worker:
        return _Worker(self.p, self.data_dir, self.out)


def _windows(records, size: int):
    buf: list[Record] = []
    for r in records:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict:
    """Sets masks on every row of the synthesize manifest; writes `out/manifest.parquet`."""
    p: MasksParams = params.masks
    if "manifest" not in inputs:
        raise ValueError(f"masks: inputs must name 'manifest'; got {sorted(inputs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    factory = _Factory(p, str(params.data), str(out))
    batch = params.executor.batch_size
    reasons: Counter = Counter()
    sources: Counter = Counter()
    quality: list[float] = []
    ious: list[float] = []
    with ManifestWriter(out / "manifest.parquet") as writer:
        for window in _windows(iter_records(inputs["manifest"]), _WINDOW_ROWS):
            results = executor.map(factory, chunked(window, batch), Resources(cpus=1), desc="masks")
            for chunk in results:
                for r in chunk:
                    writer.write(r)
                    if r.stage == "masks" and r.status != "ok":
                        reasons[r.status] += 1
                    if r.status == "ok":
                        sources[r.mask_source] += 1
                        if r.mask_source == "derived":
                            if r.mask_quality is not None:
                                quality.append(r.mask_quality)
                            if r.mask_iou_requested is not None:
                                ious.append(r.mask_iou_requested)
    metrics: dict[str, Any] = counts(iter_records(out / "manifest.parquet"))
    metrics["rejected"] = dict(sorted(reasons.items()))
    metrics["rejected_total"] = sum(reasons.values())
    metrics["mask_source"] = dict(sorted(sources.items()))
    metrics["derived_mask_quality_mean"] = float(np.mean(quality)) if quality else None
    metrics["derived_iou_requested_mean"] = float(np.mean(ious)) if ious else None
    log.info("masks: %d rows, %d rejected %s", metrics["total"], metrics["rejected_total"],
             metrics["rejected"])
    return metrics


STAGE = Stage(
    name="masks",
    help="derive masks by differencing and reject broken forgeries",
    params=MasksParams,
    run=run,
    reads=("synthesize", "ingest"),  # ingest: the originals the forgeries are compared with
    writes={"masks": "masks"},
)
