"""Removal: an object-shaped region is filled in from its surroundings by OpenCV inpainting.

The region comes from a segmentation (see `generators.natural.splice.object_mask`), grown by a
few pixels so the object's outline goes too, and is filled with Telea's fast marching method
or the Navier-Stokes method: classical object removal, distinct from diffusion inpainting.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range
from generators.natural.splice import object_mask

log = logging.getLogger(__name__)

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


@dataclass(frozen=True)
class RemovalParams:
    min_frac: float = 0.01  # removed area as a fraction of the image, lower bound
    max_frac: float = 0.08  # and upper bound
    methods: tuple[Literal["telea", "ns"], ...] = ("telea", "ns")  # one is drawn per sample
    radius: int = 5  # inpainting neighbourhood radius, px
    grow: int = 3  # px the object mask is dilated by before filling
    segmentation: Literal["segments", "grabcut"] = "segments"

    def __post_init__(self) -> None:
        check_nonempty("methods", self.methods)
        check_range("min_frac", self.min_frac, 0, 0.5, lo_open=True, hi_open=True)
        check_range("max_frac", self.max_frac, self.min_frac, 0.5, hi_open=True)
        check_range("radius", self.radius, 1)
        check_range("grow", self.grow, 0)


class Removal:
    name = "removal"
    domain = "natural"
    operation = "removal"
    version = "1.0"
    Params = RemovalParams

    def __init__(self, params: RemovalParams | None = None):
        self.params = params or RemovalParams()

    def setup(self, device: str = "cpu") -> None:
        pass

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        img = source.image
        h, w = img.shape[:2]
        if min(h, w) < 16:
            raise SkipSample(f"image too small for a removal: {w}x{h}")
        region, how = object_mask(img, rng, p.min_frac, p.max_frac, p.segmentation)
        g = p.grow
        if g:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1))
            region = cv2.dilate(region.astype(np.uint8), k) > 0
        if region.all():
            raise SkipSample("removal region covers the whole image")
        method = str(rng.choice(p.methods))
        filled = cv2.inpaint(
            np.ascontiguousarray(img),
            region.astype(np.uint8) * 255,
            float(p.radius),
            METHODS[method],
        )
        out = np.where(region[..., None], filled, img)  # inpaint only writes inside; made sure
        return Forgery(
            image=out,
            mask=region,
            params={**asdict(p), "method": method, "segmentation_used": how},
        )
