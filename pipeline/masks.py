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
3. region-level clean-up on a working resolution of at most `work_pixels`: the local density
   of changed pixels, closing, hole filling and small-component removal, every size a
   fraction of the image's shorter side or area; the result is scaled back to H x W.

`mask_quality` in [0, 1] is purity x coverage: purity is the share of all changed pixels
that fall inside the mask (low when changes are scattered over the image), coverage is the
share of mask pixels that are changed, saturating at one half (low for a region that is
mostly filled in by the clean-up). Quality filters record a reason in `status`; rejected
rows stay in the manifest.
"""

from __future__ import annotations

import json
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
from pipeline.imageio import decode, decode_mask, encode_mask, write_bytes
from pipeline.params import Params
from pipeline.records import ManifestWriter, Record, counts, iter_records

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
    work_pixels: int = 262_144  # region clean-up runs at most at this many pixels
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
        for name in ("threshold_lossless", "threshold_min", "noise_factor", "texture_factor", "max_colour_shift"):
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
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def _median_u8(a: np.ndarray) -> float:
    hist = cv2.calcHist([np.ascontiguousarray(a)], [0], None, [256], [0, 256]).ravel()
    return float(np.searchsorted(np.cumsum(hist), hist.sum() / 2.0))


def _channel_max(img: np.ndarray) -> np.ndarray:
    c = cv2.split(img)
    return cv2.max(cv2.max(c[0], c[1]), c[2])


def match_colours(original: np.ndarray, forged: np.ndarray, max_shift: float) -> tuple[np.ndarray, float]:
    """The original with a per-channel gain and offset towards `forged` applied.

    Fitted on a subsample from a median start with two inlier refits, so an edit covering
    less than half the image does not pull the fit. A channel whose values span little range
    gets an offset only; a channel whose shift exceeds `max_shift` levels is left alone (that
    is no longer a small global shift). Returns (image, largest shift applied).
    """
    h, w = original.shape[:2]
    step = max(1, int(np.sqrt(h * w / 16384)))
    o8 = original[::step, ::step].reshape(-1, 3)
    f8 = forged[::step, ::step].reshape(-1, 3)
    if np.count_nonzero((o8 == f8).all(axis=1)) * 2 > len(o8):
        return original, 0.0  # most pixels identical: there is no global shift
    o = o8.astype(np.float32)
    f = f8.astype(np.float32)
    v = np.arange(256, dtype=np.float32)
    lut = np.tile(v[:, None], (1, 3))
    for c in range(3):
        oc, fc = o[:, c], f[:, c]
        lo, hi = np.percentile(oc, [1, 99])
        ranged = hi - lo >= 64
        a, b = 1.0, float(np.median(fc - oc))
        for band in (8.0, 4.0):
            # saturated values carry no information about the shift
            inl = (np.abs(fc - (a * oc + b)) <= band) & (fc > 0) & (fc < 255)
            if np.count_nonzero(inl) < 64:
                break
            x, y = oc[inl], fc[inl]
            var = float(x.var())
            if ranged and var >= 16.0:
                a = float(np.clip(np.mean((x - x.mean()) * (y - y.mean())) / var, 0.8, 1.25))
            b = float(y.mean() - a * x.mean())
        seen = np.abs((a - 1.0) * np.array([lo, hi]) + b).max()
        if seen > max_shift:
            continue
        lut[:, c] = v + np.clip((a - 1.0) * v + b, -max_shift, max_shift)
    table = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
    if np.array_equal(table, np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))):
        return original, 0.0
    shift = float(np.abs(lut - v[:, None]).max())
    return cv2.LUT(np.ascontiguousarray(original), table.reshape(1, 256, 3)), shift


def derive_mask(original: np.ndarray, forged: np.ndarray, p: MasksParams | None = None) -> Derivation:
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
    noise = _median_u8(_channel_max(cv2.absdiff(forged[::step, ::step], original[::step, ::step])))
    lossy = noise >= 1
    if p.prefilter and lossy:
        # lossy: JPEG error is high-frequency, a 3x3 Gaussian halves it
        a = cv2.GaussianBlur(original, (3, 3), 0)
        b = cv2.GaussianBlur(forged, (3, 3), 0)
        diff = _channel_max(cv2.absdiff(b, a))
        noise = _median_u8(diff[::step, ::step])
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

    # region level, at the working resolution
    scale = min(1.0, float(np.sqrt(p.work_pixels / (h * w))))
    if scale < 1.0:
        ws, hs = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        dens = cv2.resize(changed, (ws, hs), interpolation=cv2.INTER_AREA)
    else:
        ws, hs, dens = w, h, changed
    side = min(ws, hs)
    k = _odd(p.window * side)
    local = cv2.blur(dens, (k, k)) if k > 1 else dens
    region = cv2.compare(local, p.density * 255.0, cv2.CMP_GT)
    r = max(1, int(round(p.close_radius * side)))
    region = cv2.morphologyEx(
        region, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    )
    region = _fill_holes(region, p.max_hole * ws * hs)
    region = _drop_small(region, p.min_component * ws * hs)

    inside = region > 0
    n_in = int(np.count_nonzero(inside))
    if n_in:
        total = float(dens.sum(dtype=np.float64))
        ev_in = float(dens[inside].sum(dtype=np.float64))
        purity = ev_in / total if total else 0.0
        coverage = min(1.0, ev_in / (255.0 * n_in) / 0.5)
        quality = float(np.clip(purity * coverage, 0.0, 1.0))
    else:
        quality = 0.0
    if scale < 1.0:
        mask = cv2.resize(region, (w, h), interpolation=cv2.INTER_LINEAR) > 127
    else:
        mask = inside
    return Derivation(
        mask=mask,
        diff=diff,
        threshold=float(threshold),
        noise=noise,
        changed=n_changed / (h * w),
        quality=quality,
        colour_shift=shift,
    )


def _fill_holes(region: np.ndarray, max_area: float) -> np.ndarray:
    """Fills background components that do not touch the border and are small."""
    if max_area < 1:
        return region
    bg = cv2.bitwise_not(region)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=4)
    if n <= 1:
        return region
    h, w = region.shape
    x, y, cw, ch, area = (stats[:, i] for i in range(5))
    touches = (x == 0) | (y == 0) | (x + cw == w) | (y + ch == h)
    fill = (~touches) & (area <= max_area)
    fill[0] = False  # label 0 is the foreground here
    if not fill.any():
        return region
    return np.where(fill[labels], np.uint8(255), region)


def _drop_small(region: np.ndarray, min_area: float) -> np.ndarray:
    if min_area < 1:
        return region
    n, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    if n <= 1:
        return region
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return np.where(keep[labels], np.uint8(255), np.uint8(0))


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
    r = max(1, int(round(margin * min(mask.shape))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    grown = cv2.dilate(requested.astype(np.uint8), kernel) > 0
    return float(np.count_nonzero(mask & ~grown) / n)


# --------------------------------------------------------------------------- the stage


def _rel(path: Path, data_dir: Path) -> str:
    try:
        return os.path.relpath(path, data_dir)
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _merge_extra(extra: str | None, info: dict[str, Any]) -> str:
    try:
        d = json.loads(extra) if extra else {}
        if not isinstance(d, dict):
            d = {"previous": d}
    except json.JSONDecodeError:
        d = {"previous": extra}
    d["masks"] = info
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


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
            except Exception as e:  # a bad sample is a row, never a crashed run
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
                except Exception as e:
                    return _reject(r, "unreadable", f"synthetic image: {type(e).__name__}: {e}")
                if why:
                    return _reject(r, "degenerate_output", why)
            return r
        if r.label != "tampered":
            return _reject(r, "mask_error", f"label {r.label!r}; allowed: real, tampered, synthetic")
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
        except Exception as e:
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
        except Exception as e:
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
            write_bytes(self.data / rel_diff, _encode_gray(d.soft()))
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
        changes["extra"] = _merge_extra(r.extra, {
            "noise": d.noise, "threshold": d.threshold, "changed": round(d.changed, 6),
            "colour_shift": round(d.colour_shift, 2), "leak": leak,
        })
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


def _encode_gray(a: np.ndarray) -> bytes:
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


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
