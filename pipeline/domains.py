"""`domain: auto`: document, face or natural, decided from a small copy of the image.

A document heuristic runs first (cheap). The face check runs only when the image is not a
document, on a copy just large enough that the smallest face that counts (`face_min_frac`
of the image area) is 40 px: OpenCV's LBP frontal-face cascade proposes faces, and the
Haar `alt2` cascade must confirm each one in its neighbourhood (the LBP cascade alone
takes a cat for a face). Both cascades ship inside installed packages: the LBP one inside
scikit-image, the Haar one inside OpenCV. The whole decision takes about 13 ms of one
core for a 1 MP image (6 ms of it the face check), against about 200 ms for the face
generators' two full Haar passes at 640 px (`generators.face.detect.detect_faces`), which
remain the fallback if scikit-image's cascade file is missing; `bench/bench_ingest.py`
measures ingest with and without `auto`.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import cv2
import numpy as np

_DOC_SIDE = 512  # the document heuristic looks at this size (longest side)
_FACE_PX = 40  # the smallest face that counts is searched for at this size (px)
_HAAR_ALT2 = "haarcascade_frontalface_alt2.xml"


@cache
def _lbp_cascade() -> cv2.CascadeClassifier | None:
    """OpenCV's LBP frontal-face cascade as scikit-image ships it
    (`skimage/data/lbpcascade_frontalface_opencv.xml`). That file misspells one tag
    (`featuhreParams`), which OpenCV's reader rejects, so it is read from memory with the
    tag spelt right. None when the file is not there."""
    try:
        import skimage

        text = (Path(skimage.__file__).parent / "data" / "lbpcascade_frontalface_opencv.xml").read_text()
    except (ImportError, OSError):
        return None
    fs = cv2.FileStorage(text.replace("featuhreParams", "featureParams"),
                         cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
    clf = cv2.CascadeClassifier()
    return clf if clf.read(fs.getFirstTopLevelNode()) and not clf.empty() else None


@cache
def _haar_alt2() -> cv2.CascadeClassifier:
    clf = cv2.CascadeClassifier(cv2.data.haarcascades + _HAAR_ALT2)
    if clf.empty():
        raise RuntimeError(f"could not load OpenCV cascade {_HAAR_ALT2}; reinstall opencv-python-headless")
    return clf


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
    lbp = _lbp_cascade()
    if lbp is None:  # the slower detector of the face generators
        from generators.face.detect import detect_faces

        h, w = rgb.shape[:2]
        return any(fw * fh >= face_min_frac * h * w for _, _, fw, fh in detect_faces(rgb))
    h, w = rgb.shape[:2]
    min_face = math.sqrt(face_min_frac * h * w)  # side of the smallest face that counts
    small = _small(rgb, max(1, round(max(h, w) * min(1.0, _FACE_PX / min_face))))
    gray = small if small.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(small[..., :3]), cv2.COLOR_RGB2GRAY)
    gray = cv2.equalizeHist(gray)
    gh, gw = gray.shape
    need = face_min_frac * gh * gw
    side = max(20, int(0.8 * math.sqrt(need)))
    for x, y, bw, bh in lbp.detectMultiScale(gray, scaleFactor=1.2, minNeighbors=3, minSize=(side, side)):
        if bw * bh < 0.8 * need:
            continue
        pad = bw // 2
        x0, y0 = max(0, x - pad), max(0, y - pad)
        roi = gray[y0 : min(gh, y + bh + pad), x0 : min(gw, x + bw + pad)]
        confirmed = _haar_alt2().detectMultiScale(roi, scaleFactor=1.1, minNeighbors=3,
                                                  minSize=(int(bw * 0.6), int(bh * 0.6)))
        for cx, cy, cw, ch in confirmed:
            if cw * ch >= need and _overlap((x - x0, y - y0, bw, bh), (cx, cy, cw, ch)) > 0.5:
                return True
    return False


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box."""
    ax, ay, aw, ah = (int(v) for v in a)
    bx, by, bw, bh = (int(v) for v in b)
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / max(1, min(aw * ah, bw * bh))


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
