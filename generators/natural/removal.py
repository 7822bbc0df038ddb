"""Removal: an object-shaped region is filled in from its surroundings by OpenCV inpainting.

The region comes from a segmentation (see `generators.natural.splice.object_mask`), grown by a
few pixels so the object's outline goes too, and is filled with Telea's fast marching method
or the Navier-Stokes method: classical object removal, distinct from diffusion inpainting.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from generators.base import Forgery, SkipSample, Source, check_params
from generators.natural.splice import SEGMENTATIONS, object_mask

log = logging.getLogger(__name__)

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

DEFAULTS: dict[str, Any] = {
    "min_frac": 0.01,  # removed area as a fraction of the image, lower bound
    "max_frac": 0.08,  # and upper bound
    "methods": list(METHODS),  # one is drawn per sample
    "radius": 5,  # inpainting neighbourhood radius, px
    "grow": 3,  # px the object mask is dilated by before filling
    "segmentation": "segments",  # segments | grabcut
}


class Removal:
    name = "removal"
    domain = "natural"
    operation = "removal"
    version = "1.0"

    def __init__(self, **params: Any):
        self.params = check_params(self.name, params, DEFAULTS)
        p = self.params
        bad = [m for m in p["methods"] if m not in METHODS]
        if bad or not p["methods"]:
            raise ValueError(f"removal: methods {p['methods']!r}; allowed: {', '.join(METHODS)}")
        if p["segmentation"] not in SEGMENTATIONS:
            raise ValueError(
                f"removal: segmentation {p['segmentation']!r}; allowed: {', '.join(SEGMENTATIONS)}"
            )
        if not 0 < p["min_frac"] <= p["max_frac"] < 0.5:
            raise ValueError(
                f"removal: need 0 < min_frac <= max_frac < 0.5, got "
                f"{p['min_frac']!r}, {p['max_frac']!r}"
            )
        if int(p["radius"]) < 1 or int(p["grow"]) < 0:
            raise ValueError(
                f"removal: radius {p['radius']!r} must be >= 1, grow {p['grow']!r} >= 0"
            )

    def setup(self, device: str = "cpu") -> None:
        pass

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        img = source.image
        h, w = img.shape[:2]
        if min(h, w) < 16:
            raise SkipSample(f"image too small for a removal: {w}x{h}")
        region, how = object_mask(img, rng, p["min_frac"], p["max_frac"], p["segmentation"])
        g = int(p["grow"])
        if g:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1))
            region = cv2.dilate(region.astype(np.uint8), k) > 0
        if region.all():
            raise SkipSample("removal region covers the whole image")
        method = str(rng.choice(p["methods"]))
        filled = cv2.inpaint(
            np.ascontiguousarray(img),
            region.astype(np.uint8) * 255,
            float(p["radius"]),
            METHODS[method],
        )
        out = np.where(region[..., None], filled, img)  # inpaint only writes inside; made sure
        return Forgery(
            image=out,
            mask=region,
            params={**p, "method": method, "segmentation_used": how},
        )
