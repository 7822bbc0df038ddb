"""Face and eye detection with cascades that ship inside OpenCV: no weights to download.

Used by the face generators (swap, edit) to find where to work and to skip sources without
a face. Cascades are loaded once per process and cached.
"""

from __future__ import annotations

import logging
from functools import cache

import cv2
import numpy as np

log = logging.getLogger(__name__)

FACE_CASCADE = "haarcascade_frontalface_default.xml"
FACE_CASCADE_ALT = "haarcascade_frontalface_alt2.xml"
EYE_CASCADE = "haarcascade_eye.xml"
EYE_GLASSES_CASCADE = "haarcascade_eye_tree_eyeglasses.xml"

# detection runs on a copy no larger than this (longest side): speed, and cascades are
# trained on small faces anyway
_MAX_SIDE = 640
# small images are enlarged up to this factor first: the cascades miss faces of 30-40 px
# on one frame and find them on the next (astronaut at 160 px), and are stable once enlarged
_MAX_UPSCALE = 2.0


@cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + name
    clf = cv2.CascadeClassifier(path)
    if clf.empty():
        raise RuntimeError(
            f"could not load OpenCV cascade {path!r}; reinstall opencv-python-headless"
        )
    return clf


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        g = image
    elif image.shape[2] == 1:
        g = image[..., 0]
    else:
        g = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    return cv2.equalizeHist(np.ascontiguousarray(g, dtype=np.uint8))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box: two cascades agree when their boxes nest."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / max(1, min(aw * ah, bw * bh))


def detect_faces(image: np.ndarray, min_size_frac: float = 0.08) -> list[tuple[int, int, int, int]]:
    """Frontal faces as (x, y, w, h) in `image` pixels, largest first.

    A face must be at least `min_size_frac` of the shorter image side, and two different
    cascades (default and alt2) must both fire on it: one cascade alone finds faces in
    textures (coffee foam, printed text).
    """
    if not 0 < min_size_frac < 1:
        raise ValueError(f"min_size_frac {min_size_frac!r}; allowed: 0 < min_size_frac < 1")
    h, w = image.shape[:2]
    scale = min(_MAX_UPSCALE, _MAX_SIDE / max(h, w))
    gray = _gray(image)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=interp)
    min_side = max(20, int(min(gray.shape) * min_size_frac))
    kw = {"scaleFactor": 1.1, "minSize": (min_side, min_side)}
    main = _cascade(FACE_CASCADE).detectMultiScale(gray, minNeighbors=5, **kw)
    if len(main) == 0:
        return []
    alt = _cascade(FACE_CASCADE_ALT).detectMultiScale(gray, minNeighbors=3, **kw)
    faces = []
    for box in (tuple(int(v) for v in b) for b in main):
        if any(_overlap(box, tuple(int(v) for v in a)) > 0.5 for a in alt):
            faces.append(tuple(round(v / scale) for v in box))
    faces.sort(key=lambda b: b[2] * b[3], reverse=True)
    return faces


# (cascade, equalise histogram, minNeighbors): strict first, then looser and glasses-aware
_EYE_PASSES = (
    (EYE_CASCADE, True, 5),
    (EYE_CASCADE, False, 3),
    (EYE_GLASSES_CASCADE, False, 3),
    (EYE_CASCADE, True, 2),
)


def detect_eyes(image: np.ndarray, face_box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """Eye centres (x, y) in `image` pixels inside the upper part of `face_box`, left to right.

    Returns two eyes (one per half of the face) when found, fewer when the cascades miss one,
    so callers fall back to the face box. Tries a strict pass first, then looser ones
    (glasses defeat the plain eye cascade on histogram-equalised crops).
    """
    x, y, w, h = (int(v) for v in face_box)
    H, W = image.shape[:2]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(W, x + w), min(H, y + int(h * 0.6))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return []
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    gray = crop if crop.ndim == 2 else cv2.cvtColor(crop[..., :3], cv2.COLOR_RGB2GRAY)
    # normalise the face width so the eye size range is stable
    scale = 200.0 / (x1 - x0)
    size = (200, max(8, round((y1 - y0) * scale)))
    plain = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    equalised = cv2.equalizeHist(plain)
    best: list[tuple[int, int]] = []
    for cascade, eq, neighbours in _EYE_PASSES:
        eyes = _cascade(cascade).detectMultiScale(
            equalised if eq else plain,
            scaleFactor=1.1,
            minNeighbors=neighbours,
            minSize=(15, 15),
            maxSize=(80, 80),
        )
        if len(eyes) == 0:
            continue
        c = np.array([(ex + ew / 2, ey + eh / 2, ew * eh) for ex, ey, ew, eh in eyes], float)
        # eyes lie in the upper 15-55% of the face box
        fy = c[:, 1] / scale / h + (y0 - y) / h
        c = c[(fy > 0.15) & (fy < 0.55)]
        picked = []
        for lo, hi in ((0, 100), (100, 200)):  # one per half of the face, the largest
            half = c[(c[:, 0] >= lo) & (c[:, 0] < hi)]
            if len(half):
                e = half[np.argmax(half[:, 2])]
                picked.append((int(round(x0 + e[0] / scale)), int(round(y0 + e[1] / scale))))
        if len(picked) == 2:
            return picked
        if len(picked) > len(best):
            best = picked
    return best
