"""`domain: auto`: face vs natural with a face detector that ships in a package, and a
simple heuristic for scanned documents."""

from __future__ import annotations

import cv2
import numpy as np


def looks_like_document(rgb: np.ndarray) -> bool:
    """Scanned pages: mostly a bright, low-saturation background with many small dark marks."""
    small = _small(rgb, 512)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    low_sat = float((hsv[..., 1] < 40).mean())
    # local background via a large median; ink is darker than its background
    bg = cv2.medianBlur(gray, 21)
    ink = (bg.astype(np.int16) - gray.astype(np.int16)) > 30
    ink_frac = float(ink.mean())
    bright_bg = float((bg > 120).mean())
    n, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    small_marks = int(((stats[1:, cv2.CC_STAT_AREA] >= 4) & (stats[1:, cv2.CC_STAT_AREA] < 800)).sum())
    return low_sat > 0.85 and bright_bg > 0.6 and 0.01 < ink_frac < 0.35 and small_marks > 40


def guess_domain(rgb: np.ndarray, face_min_frac: float = 0.01) -> str:
    if looks_like_document(rgb):
        return "document"
    from generators.face.detect import detect_faces

    h, w = rgb.shape[:2]
    faces = detect_faces(rgb)
    if faces and max(fw * fh for _, _, fw, fh in faces) >= face_min_frac * h * w:
        return "face"
    return "natural"


def _small(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, int(w * s)), max(1, int(h * s))), interpolation=cv2.INTER_AREA)
