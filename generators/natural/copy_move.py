"""Copy-move: a region of the image is copied, transformed and pasted elsewhere in it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from generators.base import Forgery, Source, check_range


@dataclass(frozen=True)
class CopyMoveParams:
    min_frac: float = 0.03  # pasted region area as a fraction of the image, lower bound
    max_frac: float = 0.12  # and upper bound
    max_rotation: float = 30.0  # degrees
    scale_range: tuple[float, float] = (0.8, 1.25)
    shape: Literal["ellipse", "polygon"] = "ellipse"  # object-like, never a plain rectangle
    feather: int = 0  # blend width in px; 0 pastes hard edges

    def __post_init__(self) -> None:
        check_range("min_frac", self.min_frac, 0, 0.5, lo_open=True)
        check_range("max_frac", self.max_frac, self.min_frac, 0.5)
        check_range("max_rotation", self.max_rotation, 0, 180)
        if len(self.scale_range) != 2:
            raise ValueError(f"scale_range {list(self.scale_range)!r}; allowed: [low, high]")
        check_range("scale_range[0]", self.scale_range[0], 0.1, 4)
        check_range("scale_range[1]", self.scale_range[1], self.scale_range[0], 4)
        check_range("feather", self.feather, 0)


class CopyMove:
    name = "copy_move"
    domain = "natural"
    operation = "copy_move"
    version = "1.1"
    Params = CopyMoveParams

    def __init__(self, params: CopyMoveParams | None = None):
        self.params = params or CopyMoveParams()

    def setup(self, device: str = "cpu") -> None:
        pass

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        img = source.image
        h, w = img.shape[:2]
        p = self.params
        frac = rng.uniform(p.min_frac, p.max_frac)
        rh = max(4, int(np.sqrt(frac * h * w) * rng.uniform(0.7, 1.3)))
        rw = max(4, int(frac * h * w / rh))
        rh, rw = min(rh, h // 2 or 1), min(rw, w // 2 or 1)
        # region shape inside a rw x rh box
        shape = np.zeros((rh, rw), np.uint8)
        if p.shape == "ellipse":
            cv2.ellipse(
                shape,
                (rw // 2, rh // 2),
                (max(1, rw // 2 - 1), max(1, rh // 2 - 1)),
                0,
                0,
                360,
                255,
                -1,
            )
        else:
            n = int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(0.6, 1.0, n)
            pts = np.stack(
                [
                    rw / 2 + rad * np.cos(ang) * (rw / 2 - 1),
                    rh / 2 + rad * np.sin(ang) * (rh / 2 - 1),
                ],
                1,
            ).astype(np.int32)
            cv2.fillPoly(shape, [pts], 255)
        sx = int(rng.integers(0, max(1, w - rw)))
        sy = int(rng.integers(0, max(1, h - rh)))
        patch = img[sy : sy + rh, sx : sx + rw]
        angle = float(rng.uniform(-p.max_rotation, p.max_rotation))
        scale = float(rng.uniform(*p.scale_range))
        if angle == 0.0 and scale == 1.0:
            # a pure translation is an exact copy: no resampling (a warp would shift the patch
            # by half a pixel and blur it)
            patch_t, shape_t, ow, oh = patch.copy(), shape > 127, rw, rh
        else:
            # rotate and scale the patch and its shape about the patch centre
            m = cv2.getRotationMatrix2D((rw / 2, rh / 2), angle, scale)
            cos, sin = abs(m[0, 0]), abs(m[0, 1])
            ow, oh = int(rh * sin + rw * cos) + 1, int(rh * cos + rw * sin) + 1
            ow, oh = min(ow, w), min(oh, h)
            m[0, 2] += ow / 2 - rw / 2
            m[1, 2] += oh / 2 - rh / 2
            patch_t = cv2.warpAffine(
                patch, m, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
            shape_t = cv2.warpAffine(shape, m, (ow, oh), flags=cv2.INTER_NEAREST) > 127
        # destination: far enough from the source that the move is visible
        for _ in range(20):
            dx = int(rng.integers(0, max(1, w - ow)))
            dy = int(rng.integers(0, max(1, h - oh)))
            if abs(dx - sx) > rw // 2 or abs(dy - sy) > rh // 2:
                break
        out = img.copy()
        region = out[dy : dy + oh, dx : dx + ow]
        if p.feather > 0:
            k = int(p.feather) * 2 + 1
            alpha = cv2.GaussianBlur(shape_t.astype(np.float32), (k, k), 0)[..., None]
            region[:] = (alpha * patch_t + (1 - alpha) * region).round().astype(np.uint8)
            placed = alpha[..., 0] > 0.5 / 255
        else:
            region[shape_t] = patch_t[shape_t]
            placed = shape_t
        mask = np.zeros((h, w), bool)
        mask[dy : dy + oh, dx : dx + ow] = placed
        return Forgery(
            image=out,
            mask=mask,
            params={**asdict(p), "angle": angle, "scale": scale, "dest_xy": [dx, dy]},
            source_region=[sx, sy, rw, rh],
        )
