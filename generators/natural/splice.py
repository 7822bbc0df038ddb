"""Splice: an object cut out of another corpus image (the donor) and pasted into this one.

The cut follows a segmentation (Felzenszwalb segments grown to an object-sized region, or
GrabCut), never a rectangle: rectangular pastes teach detectors a shortcut. The paste is
blended in one of several ways (Poisson, feathered alpha, hard) because detectors transfer
along blending artifacts. `object_mask` is also used by `removal`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range

log = logging.getLogger(__name__)

BLENDS = ("poisson", "poisson_mixed", "feather", "hard")
SEGMENTATIONS = ("segments", "grabcut")
WORK_SIDE = 256  # segmentation runs at this longest side; masks are scaled back up

Blend = Literal["poisson", "poisson_mixed", "feather", "hard"]


@dataclass(frozen=True)
class SpliceParams:
    min_frac: float = 0.03  # pasted area as a fraction of the target image, lower bound
    max_frac: float = 0.15  # and upper bound
    blends: tuple[Blend, ...] = BLENDS  # one is drawn per sample
    segmentation: Literal["segments", "grabcut"] = "segments"  # Felzenszwalb segments, grown
    feather: float = 6.0  # px of the inward alpha ramp for the feather blend

    def __post_init__(self) -> None:
        check_nonempty("blends", self.blends)
        check_range("min_frac", self.min_frac, 0, 0.6, lo_open=True, hi_open=True)
        check_range("max_frac", self.max_frac, self.min_frac, 0.6, hi_open=True)
        check_range("feather", self.feather, 0)


# --------------------------------------------------------------------------- segmentation


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, bool)
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _segments_region(
    small: np.ndarray, rng: np.random.Generator, lo: float, hi: float
) -> np.ndarray:
    """A region of Felzenszwalb segments: one object-sized segment, or a seed segment grown
    by its most similar neighbours until it reaches a drawn target size."""
    from skimage.segmentation import felzenszwalb

    h, w = small.shape[:2]
    labels = felzenszwalb(small, scale=float(rng.choice([50, 100, 200])), sigma=0.8, min_size=30)
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n) / (h * w)
    border = np.zeros(n, bool)
    border[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    fits = np.flatnonzero((area >= lo) & (area <= hi) & ~border)
    if len(fits):
        return labels == int(rng.choice(fits))
    # grow: adjacency from horizontally and vertically neighbouring pixel pairs
    lab = small.reshape(-1, 3).astype(np.float64)
    mean = np.stack([np.bincount(labels.ravel(), lab[:, c], n) for c in range(3)], 1)
    mean /= np.maximum(np.bincount(labels.ravel(), minlength=n), 1)[:, None]
    pairs = np.concatenate(
        [
            np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
            np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1),
        ]
    )
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], 1), axis=0)
    adj = np.zeros((n, n), bool)
    adj[pairs[:, 0], pairs[:, 1]] = adj[pairs[:, 1], pairs[:, 0]] = True
    seeds = np.flatnonzero(~border & (area < hi))
    if not len(seeds):
        seeds = np.flatnonzero(area < hi)
    if not len(seeds):
        return np.zeros((h, w), bool)
    target = rng.uniform(lo, hi)
    region = np.zeros(n, bool)
    region[int(rng.choice(seeds))] = True
    while area[region].sum() < target:
        cand = np.flatnonzero(adj[region].any(0) & ~region)
        if not len(cand):
            break
        ref = (mean[region] * area[region, None]).sum(0) / area[region].sum()
        dist = np.abs(mean[cand] - ref).sum(1) + 1000.0 * border[cand]  # avoid the frame
        nxt = cand[np.argsort(dist)[:1]]
        if area[region].sum() + area[nxt].sum() > hi:
            break
        region[nxt] = True
    return region[labels]


def _grabcut_region(
    small: np.ndarray, rng: np.random.Generator, lo: float, hi: float
) -> np.ndarray:
    """GrabCut foreground inside a random box about twice the target area."""
    h, w = small.shape[:2]
    target = rng.uniform(lo, hi) * 2.0
    bw = int(np.clip(np.sqrt(target * h * w) * rng.uniform(0.75, 1.33), 8, w - 4))
    bh = int(np.clip(target * h * w / bw, 8, h - 4))
    x = int(rng.integers(2, max(3, w - bw - 2)))
    y = int(rng.integers(2, max(3, h - bh - 2)))
    gc = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))  # GrabCut's k-means uses OpenCV's RNG
    cv2.grabCut(
        cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
        gc,
        (x, y, bw, bh),
        bgd,
        fgd,
        3,
        cv2.GC_INIT_WITH_RECT,
    )
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def _blob(h: int, w: int, rng: np.random.Generator, frac: float) -> np.ndarray:
    """A smooth random blob: the fallback when segmentation finds nothing object-sized."""
    n = int(rng.integers(6, 11))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.6, 1.0, n)
    r = np.sqrt(frac * h * w / np.pi) * 1.15
    cx = rng.uniform(r, max(r + 1, w - r))
    cy = rng.uniform(r, max(r + 1, h - r))
    pts = np.stack([cx + rad * r * np.cos(ang), cy + rad * r * np.sin(ang)], 1)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    k = max(3, int(r / 3) | 1)
    return cv2.GaussianBlur(m.astype(np.float32), (k, k), 0) > 0.5


def object_mask(
    image: np.ndarray,
    rng: np.random.Generator,
    min_frac: float,
    max_frac: float,
    method: str = "segments",
) -> tuple[np.ndarray, str]:
    """An object-shaped bool mask over `image` covering about [min_frac, max_frac] of it.

    Returns (mask, how): how is the method that produced it, or "blob" when segmentation
    found nothing of the right size and a smooth random blob was used instead.
    """
    if method not in SEGMENTATIONS:
        raise ValueError(f"segmentation {method!r}; allowed: {', '.join(SEGMENTATIONS)}")
    h, w = image.shape[:2]
    s = min(1.0, WORK_SIDE / max(h, w))
    small = cv2.resize(
        image, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA
    )
    region = (_grabcut_region if method == "grabcut" else _segments_region)(
        small, rng, min_frac, max_frac
    )
    region = ndimage.binary_fill_holes(_largest_component(region))
    frac = region.mean()
    how = method
    if not (min_frac / 3 <= frac <= max_frac * 2):
        region = _blob(*small.shape[:2], rng, rng.uniform(min_frac, max_frac))
        how = "blob"
    # back to full size, with edges smoothed at the full resolution
    up = cv2.resize(region.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    k = max(3, int(2 / s) | 1)
    mask = cv2.GaussianBlur(up, (k, k), 0) > 0.5
    mask = _largest_component(mask)
    if not mask.any():
        raise SkipSample(f"no object-shaped region found ({how})")
    return mask, how


# --------------------------------------------------------------------------- blending


def feather_alpha(mask: np.ndarray, width: float) -> np.ndarray:
    """Alpha ramping from 0 at the mask's edge to 1 `width` px inside: changes stay inside."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(dist / max(float(width), 1.0), 0.0, 1.0)


def blend(
    target: np.ndarray, content: np.ndarray, mask: np.ndarray, how: str, feather: float
) -> np.ndarray:
    """Composites `content` (aligned with `target`, same size) into `target` over `mask`.

    Every changed pixel lies inside `mask`. `mask` must not touch the image border for the
    Poisson blends (seamlessClone ignores the outermost pixel row and column).
    """
    if how in ("poisson", "poisson_mixed"):
        m = mask.astype(np.uint8) * 255
        x, y, bw, bh = cv2.boundingRect(m)
        flag = cv2.NORMAL_CLONE if how == "poisson" else cv2.MIXED_CLONE
        out = cv2.seamlessClone(content, target, m, (x + bw // 2, y + bh // 2), flag)
        return np.where(mask[..., None], out, target)
    if how == "feather":
        a = feather_alpha(mask, feather)[..., None]
        return (a * content + (1.0 - a) * target).round().clip(0, 255).astype(np.uint8)
    if how == "hard":
        return np.where(mask[..., None], content, target)
    raise ValueError(f"blend {how!r}; allowed: {', '.join(BLENDS)}")


# --------------------------------------------------------------------------- generator


class Splice:
    name = "splice"
    domain = "natural"
    operation = "splice"
    version = "1.0"
    needs_donor = True
    Params = SpliceParams

    def __init__(self, params: SpliceParams | None = None):
        self.params = params or SpliceParams()

    def setup(self, device: str = "cpu") -> None:
        pass

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        donor = source.donor
        if donor is None:
            raise SkipSample("splice needs a donor image and none was given")
        p = self.params
        img = source.image
        h, w = img.shape[:2]
        if min(h, w) < 16:
            raise SkipSample(f"image too small for a splice: {w}x{h}")
        # the object is cut at a donor-relative size, then scaled to the drawn target size
        dmask, how = object_mask(donor.image, rng, 0.02, 0.25, p.segmentation)
        bx, by, bw, bh = cv2.boundingRect(dmask.astype(np.uint8))
        patch = donor.image[by : by + bh, bx : bx + bw]
        pmask = dmask[by : by + bh, bx : bx + bw]
        target = rng.uniform(p.min_frac, p.max_frac) * h * w
        s = np.sqrt(target / max(1, pmask.sum()))
        s = min(s, 0.8 * (w - 4) / bw, 0.8 * (h - 4) / bh)
        pw, ph = max(4, round(bw * s)), max(4, round(bh * s))
        patch = cv2.resize(
            patch, (pw, ph), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        )
        pmask = cv2.resize(pmask.astype(np.float32), (pw, ph), interpolation=cv2.INTER_LINEAR) > 0.5
        pmask = _largest_component(pmask)
        if not pmask.any():
            raise SkipSample("spliced object vanished when scaled to the target")
        # keep one pixel clear of the frame: seamlessClone ignores the border
        dx = int(rng.integers(2, max(3, w - pw - 1)))
        dy = int(rng.integers(2, max(3, h - ph - 1)))
        content = img.copy()
        content[dy : dy + ph, dx : dx + pw] = patch
        mask = np.zeros((h, w), bool)
        mask[dy : dy + ph, dx : dx + pw] = pmask
        blend_how = str(rng.choice(p.blends))
        out = blend(img, content, mask, blend_how, p.feather)
        return Forgery(
            image=out,
            mask=mask,
            params={
                **asdict(p),
                "blend": blend_how,
                "segmentation_used": how,
                "donor_key": donor.key,
                "donor_region": [bx, by, bw, bh],
                "scale": round(float(s), 4),
                "dest_xy": [dx, dy],
            },
        )
