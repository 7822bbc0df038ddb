"""Text replace: one word of a scanned page is erased and another is typeset in its place.

Word boxes come from tesseract OCR (Debian's `tesseract-ocr` through pytesseract) when the
binary is present, else from an OpenCV morphological word detector. The word is erased by
filling its box with the page background estimated around it (a fitted illumination plane
plus matched noise), and the new word is rendered with a DejaVu font (shipped with
matplotlib) at the original's ink height, width and colour. Numbers become other numbers of
the same length, words other words: the edits document forgers make.

`find_words`, `fill_background` and `ink_colour` are shared with `text_erase` and
`text_copy_move`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range

log = logging.getLogger(__name__)

ENGINES = ("auto", "tesseract", "opencv")
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
)

# replacement vocabulary: common words of many lengths (numbers are drawn, not listed)
VOCABULARY = """
    a an as at be by do go he if in is it me my no of on or so to up us we and are but can
    did for had has her him his its may new not now one our out see she the two was way who
    you also back been body case city data does each even fact form from give good have here
    high into just know last life long made make many more most much must name next only
    open over part paid said same some such take than that them then they this time upon
    used very want well were what when will with work year about above after again below
    could every first found great group house large later never order other place point
    right small state still their there these thing think three total under value water
    where which while world would amount annual before change credit during figure number
    office people public result second signed within account between company control general
    payment private process program receipt service balance contract document national
    approved business clinical customer evidence material personal quantity question
    agreement committee available important insurance reference statement transfer
""".split()


@dataclass
class Word:
    """A word box on the page: x, y, w, h in pixels; text when OCR read it."""

    x: int
    y: int
    w: int
    h: int
    text: str | None
    line: int
    conf: float = -1.0

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h


# --------------------------------------------------------------------------- word boxes


@lru_cache(maxsize=1)
def tesseract_available() -> bool:
    """True when pytesseract imports and the tesseract binary runs."""
    try:
        import pytesseract

        if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
            return False
        pytesseract.get_tesseract_version()
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the OpenCV fallback
        return False


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)


def _tesseract_words(gray: np.ndarray, min_conf: float) -> list[Word]:
    import pytesseract

    d = pytesseract.image_to_data(gray, output_type=pytesseract.Output.DICT)
    words, lines = [], {}
    for i, text in enumerate(d["text"]):
        text = (text or "").strip()
        conf = float(d["conf"][i])
        if not text or conf < min_conf:
            continue
        line = lines.setdefault((d["block_num"][i], d["par_num"][i], d["line_num"][i]), len(lines))
        words.append(
            Word(
                int(d["left"][i]),
                int(d["top"][i]),
                int(d["width"][i]),
                int(d["height"][i]),
                text,
                line,
                conf,
            )
        )
    return words


def _opencv_words(gray: np.ndarray) -> list[Word]:
    """Words as horizontally merged ink components of an adaptively thresholded page."""
    h, w = gray.shape
    block = max(15, (min(h, w) // 12) | 1)
    ink = cv2.adaptiveThreshold(
        gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY_INV, block, 15
    )
    n, _, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    hs = stats[1:, cv2.CC_STAT_HEIGHT]
    areas = stats[1:, cv2.CC_STAT_AREA]
    chars = hs[(areas >= 6) & (hs >= 4) & (hs < h / 4)]
    if len(chars) < 3:
        return []
    ch = float(np.median(chars))
    # letters of a word are closer than ~0.35 x-height-ish; words are further apart
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (max(2, int(round(ch * 0.45))), 1))
    joined = cv2.dilate(ink, k)
    n, _, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    words = []
    for x, y, bw, bh, area in stats[1:]:
        if not (0.6 * ch <= bh <= 2.5 * ch and bw >= 0.8 * ch and area >= 0.25 * bw * bh * 0.3):
            continue
        if bw > w * 0.6:  # rules and lines, not words
            continue
        words.append(Word(int(x), int(y), int(bw), int(bh), None, -1))
    # lines: cluster by vertical centre
    words.sort(key=lambda wd: (wd.y + wd.h / 2, wd.x))
    line, last = -1, -1e9
    for wd in words:
        cy = wd.y + wd.h / 2
        if cy - last > 0.6 * ch:
            line += 1
            last = cy
        wd.line = line
    return words


def find_words(
    image: np.ndarray, engine: str = "auto", min_conf: float = 60.0, min_height: int = 8
) -> tuple[list[Word], str]:
    """Word boxes on a page and the engine that found them.

    `auto` uses tesseract when it is installed and falls back to the OpenCV word finder when
    tesseract finds no word (handwriting, slanted text). Words shorter than `min_height` px
    are dropped: too small to edit convincingly.
    """
    if engine not in ENGINES:
        raise ValueError(f"ocr engine {engine!r}; allowed: {', '.join(ENGINES)}")
    gray = _gray(image)
    used = engine
    if engine == "tesseract" and not tesseract_available():
        raise RuntimeError(
            "ocr engine 'tesseract' requested but the tesseract binary is missing; "
            "install Debian's tesseract-ocr (apt-get install tesseract-ocr)"
        )
    if engine == "auto":
        used = "tesseract" if tesseract_available() else "opencv"
    words = _tesseract_words(gray, min_conf) if used == "tesseract" else _opencv_words(gray)
    if engine == "auto" and used == "tesseract" and not words:
        # tesseract reads printed lines; handwriting and slanted scans give it nothing, while
        # the OpenCV word finder still finds the ink clusters
        words, used = _opencv_words(gray), "opencv"
    H, W = gray.shape
    words = [
        wd
        for wd in words
        if wd.h >= min_height
        and wd.w >= 2
        and wd.h < H / 3
        and wd.x >= 0
        and wd.y >= 0
        and wd.x + wd.w <= W
        and wd.y + wd.h <= H
    ]
    words.sort(key=lambda wd: (wd.line, wd.x))
    return words, used


# --------------------------------------------------------------------------- erase and ink


def _split_ink(lum: np.ndarray) -> tuple[float, bool]:
    """Otsu threshold of a luminance sample and whether ink is the dark side."""
    t, _ = cv2.threshold(
        lum.astype(np.uint8).reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    dark_is_ink = (lum <= t).mean() < 0.5
    return float(t), bool(dark_is_ink)


def fill_background(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    rng: np.random.Generator,
    ring: int | None = None,
) -> np.ndarray:
    """`image` with `box` (x, y, w, h) replaced by the background around it.

    The background is a plane per channel fitted to the non-ink pixels of a ring around the
    box (scans have illumination gradients), plus noise with the ring's residual spread.
    Only pixels inside the box change.
    """
    H, W = image.shape[:2]
    x, y, w, h = box
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        return image.copy()
    r = int(ring or max(3, h // 2))
    rx0, ry0, rx1, ry1 = max(0, x0 - r), max(0, y0 - r), min(W, x1 + r), min(H, y1 + r)
    win = image[ry0:ry1, rx0:rx1].astype(np.float64)
    yy, xx = np.mgrid[ry0:ry1, rx0:rx1]
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    lum = _gray(image[ry0:ry1, rx0:rx1]).astype(np.float64)
    t, dark_ink = _split_ink(lum)
    bg = ~inside & ((lum > t) if dark_ink else (lum <= t))
    if bg.sum() < 6:
        bg = ~inside
    if bg.sum() < 3:  # the box covers the whole window: fill with the median colour
        out = image.copy()
        out[y0:y1, x0:x1] = np.median(image.reshape(-1, image.shape[-1]), 0).astype(np.uint8)
        return out
    a = np.stack([xx[bg] - x0, yy[bg] - y0, np.ones(bg.sum())], 1)
    coef, *_ = np.linalg.lstsq(a, win[bg], rcond=None)
    resid = win[bg] - a @ coef
    spread = np.sqrt(np.mean(resid**2, 0)).clip(0, 12)
    bx, by = np.meshgrid(np.arange(x1 - x0), np.arange(y1 - y0))
    plane = np.stack([bx, by, np.ones_like(bx)], -1).astype(np.float64) @ coef
    noise = rng.standard_normal(plane.shape) * spread
    out = image.copy()
    out[y0:y1, x0:x1] = (plane + noise).round().clip(0, 255).astype(np.uint8)
    return out


def ink_colour(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Median RGB of the ink pixels in `box` (the minority side of an Otsu split)."""
    x, y, w, h = box
    patch = image[y : y + h, x : x + w]
    lum = _gray(patch).astype(np.float64)
    t, dark_ink = _split_ink(lum)
    ink = (lum <= t) if dark_ink else (lum > t)
    if not ink.any():
        return np.median(patch.reshape(-1, 3), 0)
    # the core of the strokes, not their anti-aliased edges
    core = ink & (
        (lum <= np.percentile(lum[ink], 60)) if dark_ink else (lum >= np.percentile(lum[ink], 40))
    )
    return np.median(patch[core if core.any() else ink].reshape(-1, 3), 0)


def ink_coverage(image: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Fraction of `box` covered by ink, counting partial (anti-aliased, blurred) pixels."""
    x, y, w, h = box
    lum = _gray(image[y : y + h, x : x + w]).astype(np.float64)
    if lum.size == 0:
        return 0.0
    t, dark_ink = _split_ink(lum)
    ink = (lum <= t) if dark_ink else (lum > t)
    if not ink.any() or ink.all():
        return float(ink.mean())
    bg, fg = np.median(lum[~ink]), np.percentile(lum[ink], 20 if dark_ink else 80)
    return float(np.clip((lum - bg) / (fg - bg if fg != bg else 1.0), 0, 1).mean())


# --------------------------------------------------------------------------- rendering


@cache
def font_path(name: str) -> str:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"font {name!r} not found under {path.parent}; allowed: {', '.join(FONTS)}"
        )
    return str(path)


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(font_path(name), size)


def render_word(
    text: str, font: str, ink_height: int, width: int, ref: str | None, blur: float
) -> tuple[np.ndarray, int, int]:
    """Alpha (float32, 0..1) of `text` typeset so that the reference word's ink (`ref`, the
    word it replaces, when known) is `ink_height` px high, then squeezed or stretched so its
    ink is `width` px wide.

    Returns (alpha, top, left): the alpha row where the reference ink starts and the alpha
    column where the new ink starts, for placing it over the old word's box.
    """
    from PIL import Image, ImageDraw

    probe = 100
    f = _font(font, probe)
    ref_box = f.getbbox(ref or text, anchor="ls")  # left, top, right, bottom about the baseline
    size = max(4, int(round(probe * ink_height / max(1, ref_box[3] - ref_box[1]))))
    f = _font(font, size)
    ref_box = f.getbbox(ref or text, anchor="ls")
    tb = f.getbbox(text, anchor="ls")
    top, bottom = min(tb[1], ref_box[1]), max(tb[3], ref_box[3])
    pad = 2 + int(np.ceil(2 * blur))
    ink_w = max(1, tb[2] - tb[0])
    canvas = Image.new("L", (ink_w + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - tb[0], pad - top), text, font=f, fill=255, anchor="ls")
    alpha = np.asarray(canvas, np.float32) / 255.0
    sx = max(1, width) / ink_w
    new_w = max(1, int(round(alpha.shape[1] * sx)))
    alpha = cv2.resize(
        alpha, (new_w, alpha.shape[0]), interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR
    )
    if blur > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), blur)
    alpha[alpha < 1.0 / 512] = 0.0  # no invisible tails: the mask covers every changed pixel
    return alpha, pad + (ref_box[1] - top), int(round(pad * sx))


def composite_ink(
    image: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x: int, y: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lays ink of `colour` with `alpha` onto `image` with alpha's (0, 0) at (x, y), clipped to
    the image; returns the new image and the bool mask of pixels the alpha covers."""
    H, W = image.shape[:2]
    ah, aw = alpha.shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + aw), min(H, y + ah)
    out = image.copy()
    mask = np.zeros((H, W), bool)
    if x1 <= x0 or y1 <= y0:
        return out, mask
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = (
        (region * (1 - a) + colour[None, None, :] * a).round().clip(0, 255).astype(np.uint8)
    )
    mask[y0:y1, x0:x1] = a[..., 0] > 0
    return out, mask


def pad_box(
    box: tuple[int, int, int, int], pad: int, shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """`box` grown by `pad` px on each side, clipped to an image of `shape`."""
    x, y, w, h = box
    H, W = shape[:2]
    x0, y0 = max(0, x - pad), max(0, y - pad)
    return x0, y0, min(W, x + w + pad) - x0, min(H, y + h + pad) - y0


def box_mask(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape[:2], bool)
    x, y, w, h = box
    m[max(0, y) : y + h, max(0, x) : x + w] = True
    return m


def replacement(text: str | None, box: tuple[int, int, int, int], rng: np.random.Generator) -> str:
    """Another token like `text`: digits become other digits of the same length, words other
    words of about the same length in the same case; punctuation around it is kept."""
    if not text:
        x, y, w, h = box
        n = int(np.clip(round(w / max(1.0, 0.55 * h)), 2, 12))
        text = "x" * n
    core_idx = [i for i, c in enumerate(text) if c.isalnum()]
    if not core_idx:
        core_idx = list(range(len(text)))
    a, b = core_idx[0], core_idx[-1] + 1
    pre, core, post = text[:a], text[a:b], text[b:]
    if core.isdigit():
        for _ in range(10):
            new = "".join(str(d) for d in rng.integers(0, 10, len(core)))
            if len(core) > 1 and new[0] == "0":
                new = str(int(rng.integers(1, 10))) + new[1:]
            if new != core:
                break
        return pre + new + post
    for slack in (0, 1, 2, 99):
        pool = [v for v in VOCABULARY if abs(len(v) - len(core)) <= slack and v != core.lower()]
        if pool:
            break
    new = str(rng.choice(pool))
    if core.isupper() and len(core) > 1:
        new = new.upper()
    elif core[:1].isupper():
        new = new.capitalize()
    return pre + new + post


# --------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class OcrParams:
    """How the document generators find words; each one's params extend it."""

    ocr: Literal["auto", "tesseract", "opencv"] = "auto"  # auto: tesseract, else opencv
    min_conf: float = 60.0  # tesseract confidence a word needs to take part
    min_height: int = 8  # px; smaller words are left alone

    def __post_init__(self) -> None:
        check_range("min_height", self.min_height, 1)
        check_range("min_conf", self.min_conf, -1, 100)


Font = Literal[
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
]


@dataclass(frozen=True)
class TextReplaceParams(OcrParams):
    fonts: tuple[Font, ...] = ("DejaVuSerif.ttf", "DejaVuSans.ttf")  # one is drawn per sample
    blur: float = 0.5  # Gaussian sigma (px) of the rendered ink, to match scan softness

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonempty("fonts", self.fonts)
        check_range("blur", self.blur, 0, 10)


def limit_ocr_threads() -> None:
    """Tesseract's OpenMP threads fight the executor's workers for cores: one each."""
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")


class TextReplace:
    name = "text_replace"
    domain = "document"
    operation = "text_replace"
    version = "1.0"
    Params = TextReplaceParams

    def __init__(self, params: TextReplaceParams | None = None):
        self.params = params or TextReplaceParams()

    def setup(self, device: str = "cpu") -> None:
        limit_ocr_threads()

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        img = source.image
        words, engine = find_words(img, p.ocr, p.min_conf, p.min_height)
        words = [w for w in words if w.text is None or any(c.isalnum() for c in w.text)]
        if not words:
            raise SkipSample(f"no editable words found ({engine})")
        word = words[int(rng.integers(len(words)))]
        new = replacement(word.text, word.box, rng)
        font = str(rng.choice(p.fonts))
        colour = ink_colour(img, word.box).astype(np.float32)
        ebox = pad_box(word.box, max(1, word.h // 8), img.shape)
        erased = fill_background(img, ebox, rng)
        alpha, top, left = render_word(new, font, word.h, word.w, word.text, float(p.blur))
        # scans are heavier than a clean rasterisation: match the old word's ink coverage,
        # with the bold face when the regular one is far too light
        gain = ink_coverage(img, word.box) / max(1e-6, float(alpha.sum()) / (word.w * word.h))
        bold = font.replace(".ttf", "-Bold.ttf")
        if gain > 1.6 and bold in FONTS:
            font = bold
            alpha, top, left = render_word(new, font, word.h, word.w, word.text, float(p.blur))
            gain = ink_coverage(img, word.box) / max(1e-6, float(alpha.sum()) / (word.w * word.h))
        alpha = np.clip(alpha * float(np.clip(gain, 1.0, 2.0)), 0.0, 1.0)
        out, ink = composite_ink(erased, alpha, colour, word.x - left, word.y - top)
        mask = box_mask(ebox, img.shape) | ink
        return Forgery(
            image=out,
            mask=mask,
            params={
                **asdict(p),
                "ocr_used": engine,
                "font": font,
                "box": list(word.box),
                "old_text": word.text,
                "new_text": new,
                "ink_rgb": [round(float(c)) for c in colour],
            },
        )
