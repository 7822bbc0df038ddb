"""Edits with known truth for the masks stage, made from package photos and scans.

Two disjoint sets, so the derivation is not tuned to the images it is judged on:

- `tune`: edits drawn here (copy-move, splice, removal, recolour, retouch, dodge/burn, text)
  on scikit-image's coffee, chelsea, astronaut, rocket and page, scikit-learn's china and a
  dark photo;
- `heldout`: other images (the motorcycle, scikit-learn's flower, matplotlib's Grace
  Hopper, the retina, brick and camera scans, scikit-image's `text` and a receipt typeset
  here with DejaVu fonts), other seeds, and half of the edits made by the project's own
  classical generators (copy_move, splice, removal, text_replace, text_erase,
  text_copy_move), whose truth is the region they report.

Each edit is saved like real pairs are:

- `png`: lossless original and forgery;
- `jpeg90` / `jpeg75`: the original a camera JPEG (4:2:0) at that quality, the forger edits
  its decoded pixels and saves a JPEG with the same quality and subsampling;
- `png_jpeg90`: a lossless original, the edit saved as JPEG-90 (4:2:0);
- `casia`: CASIA-like splices and copy-moves at 384 x 256: a camera JPEG (quality 92,
  4:2:0) decoded and re-saved by *another* encoder (its own colour conversion and chroma
  filter, quality 90, 4:2:0), so the original re-encoded here never matches the forgery's
  codec exactly.

The truth is the support of the edit (every pixel the edit operation wrote, including the
ones whose value it happened to keep), never derived by differencing.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from generators.base import SkipSample

FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
CODECS = ("png", "jpeg90", "jpeg75", "png_jpeg90", "casia")
PHOTO_KINDS = ("copy_move", "splice", "removal", "recolour", "retouch", "dodge")
DOC_KINDS = ("text", "copy_move", "removal")
GENERATOR_KINDS = ("copy_move", "splice", "removal")
DOC_GENERATOR_KINDS = ("text_replace", "text_erase", "text_copy_move")


def font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3], dtype=np.uint8)


def fit(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=interp)


def receipt(seed: int = 3, size: tuple[int, int] = (520, 760)) -> np.ndarray:
    """A photographed receipt: DejaVu Mono lines on warm paper, uneven light, grain, blur."""
    rng = np.random.default_rng(seed)
    w, h = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.truetype(str(font_path("DejaVuSansMono.ttf")), 17)
    items = ["COFFEE", "BAGEL", "ORANGE JUICE", "MUFFIN", "TEA", "SANDWICH", "WATER", "SOUP"]
    y = 30
    draw.text((w // 2 - 90, y), "CORNER CAFE  #0412", font=font, fill=255)
    y += 44
    total = 0
    while y < h - 90:
        name = items[int(rng.integers(len(items)))]
        price = int(rng.integers(150, 1500))
        total += price
        draw.text((30, y), f"{int(rng.integers(1, 4))} {name}", font=font, fill=255)
        draw.text((w - 130, y), f"{price // 100:3d}.{price % 100:02d}", font=font, fill=255)
        y += 28
    draw.text((30, h - 60), "TOTAL", font=font, fill=255)
    draw.text((w - 140, h - 60), f"{total // 100:4d}.{total % 100:02d}", font=font, fill=255)
    ink = np.asarray(canvas, np.float32) / 255.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 - 0.12 * (xx / w) - 0.08 * (yy / h)
    paper = np.array([246, 240, 226], np.float32) * light[..., None]
    img = paper * (1 - ink[..., None]) + np.array([40, 36, 44], np.float32) * ink[..., None]
    img += rng.normal(0, 2.5, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@cache
def images(which: str) -> dict[str, np.ndarray]:
    """The set's images, RGB uint8, a few hundred pixels on the long side."""
    from skimage import data as sk
    from sklearn.datasets import load_sample_image

    if which == "tune":
        coffee = fit(sk.coffee(), 512)
        return {
            "coffee": coffee,
            "chelsea": fit(sk.chelsea(), 480),
            "astronaut": fit(sk.astronaut(), 448),
            "rocket": fit(sk.rocket(), 512),
            "china": fit(load_sample_image("china.jpg"), 512),
            "page": rgb(fit(sk.page(), 640)),
            "dark": np.rint(coffee.astype(np.float32) * 0.18).astype(np.uint8),
        }
    if which == "heldout":
        import matplotlib

        hopper = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data"
                                       / "grace_hopper.jpg").convert("RGB"))
        return {
            "motorcycle": fit(sk.stereo_motorcycle()[0], 560),
            "flower": fit(load_sample_image("flower.jpg"), 512),
            "hopper": fit(hopper, 480),
            "retina": fit(sk.retina()[150:1250, 150:1250], 480),
            "brick": rgb(fit(sk.brick(), 448)),
            "camera": rgb(fit(sk.camera(), 448)),
            "text": rgb(fit(sk.text(), 640)),
            "receipt": receipt(),
        }
    raise ValueError(f"image set {which!r}; allowed: tune, heldout")


DOCUMENTS = {"page", "text", "receipt"}


# --------------------------------------------------------------------------- edits


def blob(h: int, w: int, cy: float, cx: float, radius: float, rng: np.random.Generator
         ) -> np.ndarray:
    """An object-like shape: a circle with random lobes, stretched and turned."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4, 6):
        r += rng.uniform(0.04, 0.18) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    a = rng.uniform(0.7, 1.3)
    turn = rng.uniform(0, np.pi)
    x, y = radius * r * np.cos(t) * a, radius * r * np.sin(t) / a
    pts = np.stack([cx + x * np.cos(turn) - y * np.sin(turn),
                    cy + x * np.sin(turn) + y * np.cos(turn)], 1)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.rint(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return m > 0


def _place(h: int, w: int, radius: float, rng: np.random.Generator) -> tuple[float, float]:
    m = radius * 1.4
    return rng.uniform(m, max(m + 1, h - m)), rng.uniform(m, max(m + 1, w - m))


def _affine_from(img: np.ndarray, dy: float, dx: float, angle: float, scale: float,
                 centre: tuple[float, float]) -> np.ndarray:
    """`img` resampled so that content from (centre + (dy, dx)) lands on `centre`."""
    h, w = img.shape[:2]
    cy, cx = centre
    m = cv2.getRotationMatrix2D((cx + dx, cy + dy), angle, scale)
    m[0, 2] -= dx
    m[1, 2] -= dy
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Alpha in [0, 1]: the mask blurred."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _blend(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return np.clip(np.rint(base * (1 - a) + top * a), 0, 255).astype(np.uint8)


def _blended(base: np.ndarray, top: np.ndarray, alpha: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """(blend, truth): the truth is the blend's inside (alpha >= 1/2) and every pixel of its
    soft edge whose value the blend changed."""
    out = _blend(base.astype(np.float32), top, alpha)
    changed = (out != np.clip(np.rint(base), 0, 255).astype(np.uint8)).any(axis=2)
    return out, (alpha >= 0.5) | changed


def _word_boxes(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Word boxes of a page: dark strokes joined horizontally (an OpenCV word finder)."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    ink = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 25, 15)
    joined = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_RECT, (7, 3)))
    _, _, stats, _ = cv2.connectedComponentsWithStats(joined)
    boxes = []
    for x, y, bw, bh, area in stats[1:]:
        if 8 <= bh <= 60 and 14 <= bw <= 260 and area > 40:
            boxes.append((int(x), int(y), int(bw), int(bh)))
    return boxes


def text_edit(img: np.ndarray, rng: np.random.Generator, font_px: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """A word erased (background fitted from its surroundings, with the page's grain) and
    another typeset in a DejaVu font in the page's ink colour. Truth: the erased box and the
    new word's strokes."""
    h, w = img.shape[:2]
    boxes = _word_boxes(img)
    if not boxes:
        raise ValueError("no words found")
    x, y, bw, bh = boxes[int(rng.integers(len(boxes)))]
    p = max(2, bh // 5)
    x0, y0, x1, y1 = max(0, x - p), max(0, y - p), min(w, x + bw + p), min(h, y + bh + p)
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    ring = np.zeros((h, w), bool)
    ring[max(0, y0 - p):min(h, y1 + p), max(0, x0 - p):min(w, x1 + p)] = True
    ring[y0:y1, x0:x1] = False
    paper = ring & (g > np.percentile(g[ring], 40))
    box = np.zeros((h, w), bool)
    box[y0:y1, x0:x1] = True
    out = img.astype(np.float32)
    bg = np.median(img[paper], axis=0) if paper.any() else np.median(img[ring], axis=0)
    spread = np.std(img[paper].astype(np.float32), axis=0).clip(0.5, 8) if paper.any() else 1.0
    out[box] = bg + rng.normal(0, 1, (int(box.sum()), 3)) * spread
    inside = g[y:y + bh, x:x + bw]
    ink = np.median(img[y:y + bh, x:x + bw][inside < np.percentile(inside, 15)], axis=0)
    word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"),
                              size=max(2, int(bw / max(bh * 0.55, 1)))))
    size = int(font_px or max(8, round(bh * 1.1)))
    font = ImageFont.truetype(str(font_path(FONTS[int(rng.integers(len(FONTS)))])), size)
    layer = Image.new("L", (w, h), 0)
    ImageDraw.Draw(layer).text((x0 + p, y0 + (y1 - y0) // 2), word, font=font, fill=255,
                               anchor="lm")
    alpha = np.asarray(layer, np.float32) / 255.0
    out = _blend(out, np.broadcast_to(ink, out.shape).astype(np.float32), alpha)
    out[~box & (alpha == 0)] = img[~box & (alpha == 0)]
    return out, box | (alpha >= 0.5) | (out != img).any(axis=2)


def edit(img: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray | None = None,
         size: tuple[float, float] = (0.05, 0.2)) -> tuple[np.ndarray, np.ndarray]:
    """(forged, truth) for one of the drawn edit kinds on `img`."""
    h, w = img.shape[:2]
    if kind == "text":
        return text_edit(img, rng)
    radius = rng.uniform(*size) * min(h, w)
    cy, cx = _place(h, w, radius, rng)
    mask = blob(h, w, cy, cx, radius, rng)
    f = img.astype(np.float32)
    if kind == "copy_move":
        for _ in range(20):
            sy, sx = _place(h, w, radius, rng)
            if np.hypot(sy - cy, sx - cx) > 2.2 * radius:
                break
        src = _affine_from(img, sy - cy, sx - cx, rng.uniform(-15, 15), rng.uniform(0.9, 1.1),
                           (cy, cx))
        out = img.copy()
        out[mask] = src[mask]
        return out, mask
    if kind == "splice":
        d = donor if donor is not None else img[::-1, ::-1]
        d = cv2.resize(d, (w, h), interpolation=cv2.INTER_AREA)
        sy, sx = _place(h, w, radius, rng)
        src = _affine_from(d, sy - cy, sx - cx, rng.uniform(-10, 10), rng.uniform(0.8, 1.2),
                           (cy, cx))
        if rng.random() < 0.5:  # hard cut
            out = img.copy()
            out[mask] = src[mask]
            return out, mask
        alpha = _feather(mask, rng.uniform(0.8, 2.0))
        return _blended(f, src.astype(np.float32), alpha)
    if kind == "removal":
        out = cv2.inpaint(img, mask.astype(np.uint8) * 255, 5,
                          cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS)
        out[~mask] = img[~mask]
        return out, mask
    if kind == "recolour":
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(20, 160))) % 180
        hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * 1.3 + 25, 0, 255).astype(np.uint8)
        top = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
        alpha = _feather(mask, 1.0)
        return _blended(f, top, alpha)
    if kind == "retouch":  # skin smoothing / blur brush
        top = cv2.bilateralFilter(img, 9, 60, 7).astype(np.float32)
        top = cv2.GaussianBlur(top, (0, 0), 2.5)
        out = img.copy()
        out[mask] = np.clip(np.rint(top[mask]), 0, 255).astype(np.uint8)
        return out, mask
    if kind == "dodge":  # dodge or burn brush
        gain = rng.choice([0.7, 1.35])
        alpha = _feather(mask, 2.0)
        return _blended(f, f * gain + (8 if gain > 1 else -8), alpha)
    raise ValueError(f"edit kind {kind!r}; allowed: {', '.join(PHOTO_KINDS + ('text',))}")


def visible(original: np.ndarray, forged: np.ndarray, truth: np.ndarray) -> bool:
    """An edit a person could see: at least a third of its region changed by > 6 levels."""
    d = np.abs(forged.astype(np.int16) - original.astype(np.int16)).max(axis=2)
    return bool(truth.any() and np.count_nonzero(d[truth] > 6) >= truth.sum() / 3)


def generator_edit(name: str, img: np.ndarray, donor: np.ndarray, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(forged, truth) from one of the project's classical generators: its reported region.
    These generators change nothing outside it (their contract test checks it)."""
    key = (name, seed, hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest())
    if key not in _GENERATED:
        _GENERATED[key] = _generate(name, img, donor, seed)
    forged, truth = _GENERATED[key]
    return forged.copy(), truth.copy()


_GENERATED: dict[tuple[str, int, str], tuple[np.ndarray, np.ndarray]] = {}


def _generate(name: str, img: np.ndarray, donor: np.ndarray, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    from generators import registry
    from generators.base import Source

    gen = registry.build(name)
    gen.setup("cpu")
    domain = registry.generator_class(name).domain
    src = Source(key=f"case{seed}", image=img.copy(), domain=domain, seed=seed,
                 donor=Source(key="donor", image=donor, domain=domain, seed=seed + 1))
    f = gen.generate(src, np.random.default_rng(seed))
    changed = (f.image != img).any(axis=2)
    return f.image, np.asarray(f.mask, bool) | changed


# --------------------------------------------------------------------------- saving


def encode(img: np.ndarray, fmt: str, quality: int = 90, subsampling: int = 2) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img).save(buf, "PNG", compress_level=0)  # in memory: fast
    else:
        Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def other_encoder(img: np.ndarray, quality: int) -> bytes:
    """A JPEG from an encoder that is not libjpeg's RGB path: its own colour conversion
    (float, truncating), its own chroma pre-filter, 4:2:0; what an editing program gives."""
    f = img.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    cb = cv2.GaussianBlur(cb, (0, 0), 0.8)
    cr = cv2.GaussianBlur(cr, (0, 0), 0.8)
    ycc = np.clip(np.floor(np.stack([y, cb, cr], -1) + 0.3), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ycc, "YCbCr").save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def other_decoder(img: np.ndarray) -> np.ndarray:
    """Pixels of the same JPEG as another program decodes them: +-1 level apart."""
    f = img.astype(np.float32)
    return np.clip(np.floor(f * 0.996 + 0.8), 0, 255).astype(np.uint8)


@dataclass
class Case:
    name: str  # image/kind/seed
    image: str
    kind: str
    codec: str
    original: np.ndarray  # H x W x 3: the original as decoded
    original_bytes: bytes
    forged_bytes: bytes
    truth: np.ndarray  # H x W bool
    source: str  # "drawn" or "generator"
    made: np.ndarray | None = None  # the forged pixels before saving (what synthesize keeps)

    @property
    def forged(self) -> np.ndarray:
        return decode(self.forged_bytes)


def save(img: np.ndarray, make: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
         codec: str) -> tuple[np.ndarray, bytes, bytes, np.ndarray, np.ndarray]:
    """(original pixels, original bytes, forged bytes, truth, forged pixels before saving):
    the original stored as `codec` says, the edit made on its decoded pixels."""
    if codec in ("png", "png_jpeg90"):
        ob = encode(img, "png")
    elif codec == "jpeg90":
        ob = encode(img, "jpeg", 90)
    elif codec == "jpeg75":
        ob = encode(img, "jpeg", 75)
    elif codec == "casia":
        ob = encode(img, "jpeg", 92)
    else:
        raise ValueError(f"codec {codec!r}; allowed: {', '.join(CODECS)}")
    o = decode(ob)
    seen = other_decoder(o) if codec == "casia" else o
    forged, truth = make(seen)
    if codec == "casia":
        forged = forged.copy()
        forged[~truth] = seen[~truth]
    if codec == "png":
        fb = encode(forged, "png")
    elif codec == "jpeg75":
        fb = encode(forged, "jpeg", 75)
    elif codec == "casia":
        fb = other_encoder(forged, 90)
    else:
        fb = encode(forged, "jpeg", 90)
    return o, ob, fb, truth, forged


def _plans(which: str) -> Iterator[tuple[str, str, str, int, Callable]]:
    imgs = images(which)
    names = list(imgs)
    base = 0 if which == "tune" else 1000
    for i, name in enumerate(names):
        donor = imgs[names[(i + 1) % len(names)]]
        doc = name in DOCUMENTS
        kinds = DOC_KINDS if doc else PHOTO_KINDS
        for j, kind in enumerate(kinds):
            seed = base + 17 * i + j
            yield name, kind, "drawn", seed, (
                lambda o, kind=kind, seed=seed, donor=donor, doc=doc: edit(
                    o, kind, np.random.default_rng(seed), donor,
                    size=(0.03, 0.08) if doc else (0.05, 0.2)))
        if which == "heldout":
            gens = DOC_GENERATOR_KINDS if doc else GENERATOR_KINDS
            for j, gname in enumerate(gens):
                seed = base + 500 + 17 * i + j
                yield name, gname, "generator", seed, (
                    lambda o, gname=gname, seed=seed, donor=donor: generator_edit(
                        gname, o, donor, seed))


def cases(which: str, codecs: tuple[str, ...] = CODECS) -> Iterator[Case]:
    """Every edit of the set saved every way in `codecs` (`casia`: photo splices and
    copy-moves only, at 384 x 256). Edits that are not visible are left out."""
    for name, kind, source, seed, make in _plans(which):
        for codec in codecs:
            img = images(which)[name]
            if codec == "casia":
                if name in DOCUMENTS or kind not in ("copy_move", "splice"):
                    continue
                img = _casia_size(img)
            try:
                o, ob, fb, truth, forged = save(img, make, codec)
            except (SkipSample, ValueError):  # no words, no face: not an edit for this image
                continue
            if not visible(o, forged, truth):
                continue
            yield Case(f"{name}/{kind}/{seed}", name, kind, codec, o, ob, fb, truth, source,
                       forged)


def _casia_size(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    size = (384, 256) if w >= h else (256, 384)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)
