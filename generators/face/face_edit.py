"""Face attribute edit: one part of the largest detected face (eyes, mouth or nose) is changed.

Two methods, chosen by `model`:
- `model: null` (the offline default): a classical edit with OpenCV inside an ellipse mask
  around the part: `recolour` (hue and saturation shift, e.g. lips or eye colour), `smooth`
  (edge-preserving smoothing, as beauty filters do) or `warp` (enlarge or shrink the part
  with a radial remap that is the identity on the ellipse boundary). Pixels outside the mask
  are bit-identical to the source.
- `model` set (`"tiny-random"`, a local directory or a hub id of an inpainting checkpoint):
  diffusion inpainting of the part mask on a square crop around the face, with a prompt
  chosen for the part ("closed eyes", "a wide smile", ...).

Faces and eyes come from `generators.face.detect` (OpenCV's bundled cascades); a source with
no face raises `SkipSample`. The part geometry follows the eye centres when both are found,
the face box proportions otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from generators import diffusion as D
from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range
from generators.face.detect import detect_eyes, detect_faces

Part = Literal["eyes", "mouth", "nose"]
Edit = Literal["recolour", "smooth", "warp"]
PART_PROMPTS: dict[str, list[str]] = {
    "eyes": ["closed eyes", "blue eyes", "sunglasses", "wide open eyes", "green eyes"],
    "mouth": ["a wide smile", "an open mouth", "red lipstick", "a moustache", "a frown"],
    "nose": ["a small nose", "a large nose", "a freckled nose", "a pierced nose"],
}


@dataclass(frozen=True)
class FaceEditParams(D.DiffusionParams):
    # model null: the classical OpenCV edit; else an inpainting model (or "tiny-random"),
    # with pipeline null meaning StableDiffusionInpaintPipeline
    parts: tuple[Part, ...] = ("eyes", "mouth", "nose")  # parts to choose from
    edits: tuple[Edit, ...] = ("recolour", "smooth", "warp")  # classical edits to choose from
    strength: float = 1.0  # diffusion inpainting strength
    face_context: float = 1.4  # diffusion crop side / face box side
    min_face_frac: float = 0.08  # smallest face, as a fraction of the shorter image side
    feather: float = 0.25  # classical: blend ramp inside the mask, as a fraction of the part size

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonempty("parts", self.parts)
        check_nonempty("edits", self.edits)
        check_range("min_face_frac", self.min_face_frac, 0, 1, lo_open=True, hi_open=True)
        check_range("feather", self.feather, 0, 1)
        check_range("face_context", self.face_context, 1)
        check_range("strength", self.strength, 0, 1, lo_open=True)


class FaceEdit(D.DiffusionGenerator):
    name = "face_edit"
    domain = "face"
    operation = "face_edit"
    version = "1.1"
    Params = FaceEditParams

    def __init__(self, params: FaceEditParams | None = None):
        self.params = params or FaceEditParams()
        self.method = "classical" if self.params.model is None else "diffusion"
        self.diffusion = D.Diffusion("inpaint", self.params) if self.method == "diffusion" else None

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """Diffusion: one pipeline call per work size. Raises SkipSample when a source has no
        face, before any model call, so the stage can retry one by one."""
        plans = [self._plan(s, r) for s, r in zip(sources, rngs, strict=True)]
        if self.diffusion is None:
            return [self._classical(s, pl, r) for s, pl, r in zip(sources, plans, rngs)]
        return self._diffusion(sources, plans)

    # -- geometry -----------------------------------------------------------------------------

    def _plan(self, source: Source, rng: np.random.Generator) -> dict[str, Any]:
        p = self.params
        faces = detect_faces(source.image, p.min_face_frac)
        if not faces:
            raise SkipSample(f"face_edit: no face found in {source.key}")
        box = faces[0]
        part = p.parts[int(rng.integers(0, len(p.parts)))]
        ellipses = self._part_ellipses(source.image, box, part)
        h, w = source.image.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        for (cx, cy), (ax, ay), ang in ellipses:
            cv2.ellipse(
                mask,
                (int(round(cx)), int(round(cy))),
                (max(2, int(ax)), max(2, int(ay))),
                ang,
                0,
                360,
                255,
                -1,
            )
        if not mask.any():
            raise SkipSample(f"face_edit: the {part} region of {source.key} lies outside the image")
        return {"box": box, "part": part, "ellipses": ellipses, "mask": mask > 0}

    def _part_ellipses(
        self, image: np.ndarray, box: tuple[int, int, int, int], part: str
    ) -> list[tuple[tuple[float, float], tuple[float, float], float]]:
        """((cx, cy), (half axes), angle deg) per ellipse of the part, from eyes or the box."""
        x, y, w, h = box
        eyes = detect_eyes(image, box)
        if len(eyes) == 2:
            (lx, ly), (rx, ry) = eyes
            d = max(1.0, float(np.hypot(rx - lx, ry - ly)))
            ang = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
            mx, my = (lx + rx) / 2, (ly + ry) / 2
            nx, ny = -np.sin(np.radians(ang)), np.cos(np.radians(ang))  # down the face
        else:
            d = 0.42 * w
            ang = 0.0
            lx, ly, rx, ry = x + 0.29 * w, y + 0.38 * h, x + 0.71 * w, y + 0.38 * h
            mx, my, nx, ny = x + 0.5 * w, y + 0.38 * h, 0.0, 1.0
        if part == "eyes":
            return [((lx, ly), (0.32 * d, 0.2 * d), ang), ((rx, ry), (0.32 * d, 0.2 * d), ang)]
        if part == "nose":
            return [((mx + 0.5 * d * nx, my + 0.5 * d * ny), (0.24 * d, 0.36 * d), ang)]
        return [((mx + 1.05 * d * nx, my + 1.05 * d * ny), (0.5 * d, 0.22 * d), ang)]  # mouth

    # -- classical ----------------------------------------------------------------------------

    def _classical(self, source: Source, plan: dict[str, Any], rng: np.random.Generator) -> Forgery:
        p = self.params
        img, mask = source.image, plan["mask"]
        edit = p.edits[int(rng.integers(0, len(p.edits)))]
        ys, xs = np.nonzero(mask)
        pad = 4
        y0, y1 = max(0, ys.min() - pad), min(img.shape[0], ys.max() + 1 + pad)
        x0, x1 = max(0, xs.min() - pad), min(img.shape[1], xs.max() + 1 + pad)
        roi = np.ascontiguousarray(img[y0:y1, x0:x1])
        m = mask[y0:y1, x0:x1]
        size = float(min(ax for _, axes, _ in plan["ellipses"] for ax in axes)) * 2
        info: dict[str, Any] = {}
        if edit == "recolour":
            hue = int(rng.integers(6, 21)) * (1 if rng.random() < 0.5 else -1)  # OpenCV hue: 0..179
            sat = float(rng.uniform(1.1, 1.5))
            hsv = cv2.cvtColor(roi, cv2.COLOR_RGB2HSV).astype(np.int16)
            hsv[..., 0] = (hsv[..., 0] + hue) % 180
            hsv[..., 1] = np.clip(np.maximum(hsv[..., 1], 40) * sat, 0, 255)
            edited = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
            info = {"hue_shift": hue * 2, "saturation_scale": round(sat, 4)}  # hue in degrees
        elif edit == "smooth":
            d = int(max(5, size / 3)) | 1
            edited = cv2.bilateralFilter(roi, d, 80, d)
            edited = cv2.bilateralFilter(edited, d, 80, d)
            info = {"diameter": d}
        else:  # warp
            k = float(rng.uniform(0.2, 0.4)) * (1 if rng.random() < 0.5 else -1)
            edited = self._warp(roi, plan["ellipses"], (x0, y0), k)
            info = {"bulge": round(k, 4)}  # > 0 enlarges the part, < 0 shrinks it
        alpha = m.astype(np.float32)
        if edit != "warp" and p.feather > 0:
            # a ramp inside the mask only: zero outside keeps those pixels bit-identical
            r = max(1, int(p.feather * size / 2))
            inner = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)
            alpha = np.clip(inner / r, 0, 1) * m
        a = alpha[..., None]
        blended = (a * edited.astype(np.float32) + (1 - a) * roi.astype(np.float32)).round()
        out = img.copy()
        out[y0:y1, x0:x1] = blended.astype(np.uint8)
        changed = np.zeros(mask.shape, bool)
        changed[y0:y1, x0:x1] = (out[y0:y1, x0:x1] != roi).any(axis=2)
        if not changed.any():
            raise SkipSample(
                f"face_edit: {edit} of the {plan['part']} changed nothing in {source.key}"
            )
        return Forgery(
            image=out,
            mask=mask,
            local=True,
            label="tampered",
            params={
                "method": "classical",
                "part": plan["part"],
                "edit": edit,
                "face_box": list(plan["box"]),
                "feather": p.feather,
                **info,
            },
        )

    @staticmethod
    def _warp(roi: np.ndarray, ellipses: list, origin: tuple[int, int], k: float) -> np.ndarray:
        """Radial bulge (k > 0) or pinch (k < 0) inside each ellipse, identity on its edge."""
        h, w = roi.shape[:2]
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        mapx, mapy = gx.copy(), gy.copy()
        for (cx, cy), (ax, ay), ang in ellipses:
            cx, cy = cx - origin[0], cy - origin[1]
            t = np.radians(ang)
            dx, dy = gx - cx, gy - cy
            u = (dx * np.cos(t) + dy * np.sin(t)) / max(ax, 1)
            v = (-dx * np.sin(t) + dy * np.cos(t)) / max(ay, 1)
            rho2 = u * u + v * v
            f = np.where(rho2 < 1, 1 - k * (1 - rho2) ** 2, 1).astype(np.float32)
            inside = rho2 < 1
            mapx[inside] = (cx + dx * f)[inside]
            mapy[inside] = (cy + dy * f)[inside]
        return cv2.remap(roi, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    # -- diffusion ----------------------------------------------------------------------------

    def _diffusion(self, sources: list[Source], plans: list[dict[str, Any]]) -> list[Forgery]:
        p = self.params
        for src, pl in zip(sources, plans):
            x, y, w, h = pl["box"]
            H, W = src.image.shape[:2]
            side = int(min(max(w, h) * p.face_context, min(H, W)))
            ys, xs = np.nonzero(pl["mask"])
            side = max(side, int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1))
            side = min(side, min(H, W))
            # centre on the face and the part together so the crop holds the whole mask
            cx = (min(x, xs.min()) + max(x + w, xs.max() + 1)) / 2
            cy = (min(y, ys.min()) + max(y + h, ys.max() + 1)) / 2
            wx = int(np.clip(round(cx - side / 2), 0, W - side))
            wy = int(np.clip(round(cy - side / 2), 0, H - side))
            pl["window"] = (wx, wy, side)
            prompts = PART_PROMPTS[pl["part"]]
            # the prompt is drawn from the seed, so the plan's rng draws stay those of classical
            pl["prompt"] = prompts[int(np.random.default_rng(src.seed).integers(0, len(prompts)))]
        edited = self.diffusion.inpaint_windows(
            [s.image for s in sources],
            [s.seed for s in sources],
            [pl["window"] for pl in plans],
            [pl["mask"] for pl in plans],
            [pl["prompt"] for pl in plans],
            strength=p.strength,
        )
        return [
            self.diffusion.forgery(
                image=image,
                mask=pl["mask"],
                params={
                    "method": "diffusion",
                    "part": pl["part"],
                    "prompt": pl["prompt"],
                    "face_box": list(pl["box"]),
                    "window": list(pl["window"]),
                    "work_size": list(work),
                    "strength": p.strength,
                    **self.diffusion.provenance(),
                },
            )
            for (image, work), pl in zip(edited, plans)
        ]
