"""`domain: auto`: document, face or natural, decided from a small copy of the image.

A document heuristic runs first (cheap); the face detector (OpenCV's Haar cascades, which
ship inside OpenCV) runs only when the image is not a document, on a copy just large
enough that the smallest face that counts (`face_min_frac` of the image area) is the
cascade's 24 px window, with a coarse step between window sizes. That keeps a 1 MP image
at about 20 ms instead of the 150-350 ms of the face generators' full-size detection.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

_DOC_SIDE = 512  # the document heuristic looks at this size (longest side)
_FACE_PX = 40  # the smallest face that counts is detected at this size (px): cascades
# find faces of 40-50 px reliably and miss many at their 24 px minimum


def looks_like_document(rgb: np.ndarray) -> bool:
    """Scanned pages: mostly a bright, low-saturation background with many small dark marks
    that sit on that background (ink on paper; a dark coat or a textured lawn is not)."""
    small = _small(rgb, _DOC_SIDE)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    low_sat = float((hsv[..., 1] < 40).mean())
    if low_sat <= 0.85:
        return False
    # local background via a large median; ink is darker than its background
    bg = cv2.medianBlur(gray, 21)
    ink = (bg.astype(np.int16) - gray.astype(np.int16)) > 30
    ink_frac = float(ink.mean())
    bright = bg > 120
    bright_bg = float(bright.mean())
    if not (bright_bg > 0.6 and 0.01 < ink_frac < 0.35):
        return False
    ink_on_paper = float((ink & bright).sum()) / max(1, int(ink.sum()))
    _, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    small_marks = int(((stats[1:, cv2.CC_STAT_AREA] >= 4) & (stats[1:, cv2.CC_STAT_AREA] < 800)).sum())
    return small_marks > 40 and ink_on_paper > 0.8


def has_face(rgb: np.ndarray, face_min_frac: float = 0.02) -> bool:
    """Whether a frontal face box covers at least `face_min_frac` of the image area."""
    from generators.face.detect import detect_faces

    h, w = rgb.shape[:2]
    min_face = math.sqrt(face_min_frac * h * w)  # side of the smallest face that counts
    small = _small(rgb, max(1, round(max(h, w) * min(1.0, _FACE_PX / min_face))))
    sh, sw = small.shape[:2]
    min_side = max(1.0, 0.8 * math.sqrt(face_min_frac * sh * sw))
    frac = min(0.99, max(1e-3, min_side / min(sh, sw)))
    faces = detect_faces(small, min_size_frac=frac, max_side=max(sh, sw), scale_factor=1.2)
    return any(fw * fh >= face_min_frac * sh * sw for _, _, fw, fh in faces)


def guess_domain(rgb: np.ndarray, face_min_frac: float = 0.02) -> str:
    small = _small(rgb, _DOC_SIDE)
    if looks_like_document(small):
        return "document"
    return "face" if has_face(small, face_min_frac) else "natural"


def _small(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
