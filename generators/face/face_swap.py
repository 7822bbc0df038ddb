"""Face swap: the face of a donor image replaces the face in this one.

Classical pipeline, no learned weights: OpenCV's cascades find the faces and eyes
(`generators.face.detect`), the donor face is aligned by a similarity transform through the
two eye centres (or through the face boxes when the eyes are not found), its colours are
matched to the target face (mean and spread per channel in CIELAB), and it is blended over
an elliptical face mask (Poisson or feathered alpha). The mask is the blended region.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range
from generators.face.detect import detect_eyes, detect_faces
from generators.natural.splice import blend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceSwapParams:
    blends: tuple[Literal["poisson", "feather"], ...] = ("poisson", "feather")  # one per sample
    align: Literal["auto", "eyes", "box"] = (
        "auto"  # auto: eyes when found in both faces, else boxes
    )
    colour_match: bool = True  # match the donor face's LAB mean/std to the target face
    mask_scale: float = 1.0  # scales the elliptical face mask around its centre
    feather: float = 0.08  # alpha ramp width as a fraction of the face width (feather blend)
    min_face_frac: float = 0.08  # smallest face, as a fraction of the shorter image side

    def __post_init__(self) -> None:
        check_nonempty("blends", self.blends)
        check_range("mask_scale", self.mask_scale, 0.5, 1.5)
        check_range("min_face_frac", self.min_face_frac, 0, 1, lo_open=True, hi_open=True)
        check_range("feather", self.feather, 0, 1)


def _similarity_from_eyes(d: list[tuple[int, int]], s: list[tuple[int, int]]) -> np.ndarray:
    """2x3 matrix taking the donor eye pair onto the source eye pair (rotation, scale, shift)."""
    d1, d2 = complex(*d[0]), complex(*d[1])
    s1, s2 = complex(*s[0]), complex(*s[1])
    a = (s2 - s1) / (d2 - d1)
    t = s1 - a * d1
    return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]], np.float64)


def _similarity_from_boxes(d: tuple[int, ...], s: tuple[int, ...]) -> np.ndarray:
    k = (s[2] / d[2] + s[3] / d[3]) / 2
    dc = np.array([d[0] + d[2] / 2, d[1] + d[3] / 2])
    sc = np.array([s[0] + s[2] / 2, s[1] + s[3] / 2])
    t = sc - k * dc
    return np.array([[k, 0.0, t[0]], [0.0, k, t[1]]], np.float64)


def face_ellipse(
    shape: tuple[int, ...], box: tuple[int, int, int, int], scale: float
) -> np.ndarray:
    """Bool mask of the face oval inside a cascade face box (brows to chin)."""
    x, y, w, h = box
    m = np.zeros(shape[:2], np.uint8)
    centre = (int(round(x + w / 2)), int(round(y + h * 0.55)))
    axes = (max(2, int(round(w * 0.40 * scale))), max(2, int(round(h * 0.56 * scale))))
    cv2.ellipse(m, centre, axes, 0, 0, 360, 1, -1)
    return m > 0


def match_colour_lab(content: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`content` with its LAB mean and std over `mask` moved to those of `target` there."""
    c = cv2.cvtColor(content.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    t = cv2.cvtColor(target.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    cm, cs = c[mask].mean(0), c[mask].std(0) + 1e-3
    tm, ts = t[mask].mean(0), t[mask].std(0) + 1e-3
    out = (c - cm) / cs * ts + tm
    rgb = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_LAB2RGB)
    return (rgb * 255.0).round().clip(0, 255).astype(np.uint8)


class FaceSwap:
    name = "face_swap"
    domain = "face"
    operation = "face_swap"
    version = "1.1"
    needs_donor = True
    Params = FaceSwapParams

    def __init__(self, params: FaceSwapParams | None = None):
        self.params = params or FaceSwapParams()

    def setup(self, device: str = "cpu") -> None:
        pass

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        if source.donor is None:
            raise SkipSample("face_swap needs a donor face image and none was given")
        img, donor = source.image, source.donor.image
        sfaces = detect_faces(img, p.min_face_frac)
        if not sfaces:
            raise SkipSample("no face found in the source")
        dfaces = detect_faces(donor, p.min_face_frac)
        if not dfaces:
            raise SkipSample(f"no face found in the donor {source.donor.key}")
        sbox, dbox = sfaces[0], dfaces[0]
        m, align = None, "box"
        if p.align in ("auto", "eyes"):
            seyes, deyes = detect_eyes(img, sbox), detect_eyes(donor, dbox)
            if len(seyes) == 2 and len(deyes) == 2:
                m = _similarity_from_eyes(deyes, seyes)
                k = np.hypot(m[0, 0], m[1, 0])
                k_box = sbox[2] / dbox[2]
                angle = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
                if 0.67 < k / k_box < 1.5 and abs(angle) < 30:  # eyes agree with the boxes
                    align = "eyes"
                else:
                    m = None
            if m is None and p.align == "eyes":
                raise SkipSample("eyes not found in both faces (align=eyes)")
        if m is None:
            m = _similarity_from_boxes(dbox, sbox)
        h, w = img.shape[:2]
        warped = cv2.warpAffine(
            donor, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        valid = cv2.warpAffine(
            np.ones(donor.shape[:2], np.uint8), m, (w, h), flags=cv2.INTER_NEAREST
        )
        mask = face_ellipse(img.shape, sbox, float(p.mask_scale)) & (valid > 0)
        mask[:2] = mask[-2:] = False  # Poisson cloning ignores the frame
        mask[:, :2] = mask[:, -2:] = False
        if mask.sum() < 64:
            raise SkipSample("face region too small after alignment")
        if p.colour_match:
            warped = match_colour_lab(warped, img, mask)
        how = str(rng.choice(p.blends))
        out = blend(img, warped, mask, how, float(p.feather) * sbox[2])
        return Forgery(
            image=out,
            mask=mask,
            params={
                **asdict(p),
                "blend": how,
                "align_used": align,
                "face_box": list(sbox),
                "donor_key": source.donor.key,
                "donor_face_box": list(dbox),
                "transform": [round(float(v), 5) for v in m.ravel()],
            },
        )
