"""The masks stage: every tampered sample gets a trustworthy mask, or a recorded reason why not.

Diffusers edits change pixels outside the requested region, instruction edits have no region
at all and `pairs` sources come with none, so the edited region is derived by differencing
the forged file against its original (`derive`, `derive_mask`). A mask is what changed:

1. **What counts as a change depends on the forged file's codec** (`codec_of`).
   - Lossless (PNG, BMP, TIFF, lossless WebP): any change (> `threshold_lossless`, 0.5
     levels of the largest channel difference; 1.5 after a fitted global colour shift,
     whose lookup table rounds). Every changed pixel belongs to the mask.
   - JPEG: the original is re-encoded with the forged file's own quantisation tables and
     chroma subsampling (its *twin*). A forgery made from the original's pixels and saved
     that way equals its twin bit for bit in every block the edit did not touch. When at
     least 3/4 of the 8 x 8 blocks are identical the twin is *exact*: outside the edit's
     blocks nothing differs, and inside them a change counts above `exact_threshold` plus
     `exact_texture` x local contrast, unless it is below `relative` x the strongest change
     within `relative_reach` pixels (the edit's own echo through chroma subsampling and
     ringing); a block whose neighbours up to `interior_blocks` blocks away all differ is
     inside the edit however little it changed (weak edits: inpainting, retouching).
     With `luma_blocks`, the file's luma is compared with the twin's too (both decoded to
     luma alone): a JPEG codes each 8 x 8 block's luma on its own, so a block's luma differs
     exactly where the edit changed that block, with no echo (chroma subsampling and its
     upsampling spread an edit's colour into the neighbouring blocks; luma never). The mask
     is kept inside those blocks, and a block whose 4 neighbours differ too is inside the
     edit; where only the colour changed (a region with no changed luma block, or an MCU
     whose luma blocks are all unchanged) the derived mask stays.
   - Otherwise (another encoder, an unknown lossy codec) the noise is the median change,
     capped at `max_noise` and, with a twin, at `noise_factor` x a first JPEG encoding's
     own error on this image, so a change everywhere is never taken for noise; a change
     counts above max(`threshold_min`, `noise_factor` x noise) + `texture_factor` x local
     contrast, with `relative_lossy`.
   Lossy differences are taken after a 3 x 3 Gaussian on both images (halves JPEG noise),
   and a changed pixel is evidence where `density` of its block-sized window changed
   (codec noise is sparse, an edit dense).
2. **The whole frame**: when `full_cover` of the tiles (16 on the shorter side) changed
   beyond the codec's noise, the image was regenerated (instruction editing, img2img, a
   VAE round trip): its mask is full (`mask_source: full`), or, with `regenerated:
   reject`, the row gets status `regenerated`. A local edit with a requested region that
   changed the whole frame is `edit_leaked`.
3. **Regions**, at full resolution inside the box around the evidence: a closing of
   `close_px` pixels (gaps a codec leaves in an edit), holes filled up to `max_hole` of their
   region's area, lossy regions below `min_component` of the largest dropped. No size is a
   fraction of the image: one word changed on a 5000 x 7000 scan keeps its pixels. A lossy
   region then grows ring by ring across a soft edge (`feather_rings`: a feathered paste, a
   dodge/burn brush) while each one-pixel ring's luma moved towards the region's own change
   by `feather_ratio` of it and `feather_levels` levels on average; a JPEG's echo of a hard
   edge moves it by a few percent. The luma blocks (above) bound what grew.

4. **The edit as made**: a forgery this project encoded with a lossy codec (a JPEG source's
   tables, lossy WebP) comes with its pixels before encoding where they differ from the
   source (synthesize's `precodec_blob`). The mask is then the lossless mask of those pixels
   (the edit, without the codec's echo), as long as it and the file's own mask lie within
   `precodec_reach` pixels of each other (else the file's mask, with a warning); the file still
   decides whether the change is visible. A whole frame changed by a little (under a JPEG's
   noise) gets the full mask of those pixels when the file is their encoding with its own
   tables (`edit_as_made`). Forgeries from outside (`pairs`, `forensic`) have only their
   file.

Per-pixel work runs in cache-sized horizontal strips of uint8 OpenCV calls; nothing is
float at full resolution (bench/bench_masks.py).

`mask_quality` in [0, 1] is purity x coverage: purity is the share of all changed pixels
that fall inside the mask (low when changes are scattered over the image), coverage is the
share of mask pixels that are changed, saturating at one half (low for a region that is
mostly filled in by the clean-up). Quality filters record a reason in `status`, with what
was measured; rejected rows stay in the manifest.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from pipeline.executor import Executor, Resources, chunked
from pipeline.imageio import (
    apply_patch,
    decode,
    decode_mask,
    encode_gray,
    encode_mask,
    write_bytes,
)
from pipeline.params import Params
from pipeline.records import ManifestWriter, Record, counts, iter_records
from pipeline.stage import Stage

log = logging.getLogger(__name__)

# reasons this stage may set in `status`
REASONS = (
    "size_mismatch",
    "missing_mask",
    "unreadable",
    "no_visible_change",
    "mask_too_small",
    "mask_too_large",
    "degenerate_output",
    "edit_leaked",
    "regenerated",
    "low_quality",
    "mask_error",
)

_WINDOW_ROWS = 20_000  # manifest rows read at a time (the executor draws their chunks lazily)


@dataclass(frozen=True)
class MasksParams:
    # per-pixel change, in 0-255 levels of the largest channel difference
    threshold_lossless: float = 0.5  # lossless forgery: a change above this counts (any change)
    codec_twin: bool = True  # JPEG forgery: compare with the original re-encoded like it
    # JPEG whose twin is exact (identical outside the edit's blocks)
    exact_threshold: float = 3.0  # a change above this + exact_texture x local contrast counts
    exact_texture: float = 0.1
    exact_block: int = 3  # evidence window half-size, pixels
    relative: float = 0.4  # a change below this x the strongest one within relative_reach px
    relative_reach: int = 1  # is that change's codec echo (chroma subsampling, ringing)
    interior_blocks: int = 3  # a block is inside the edit when all blocks this far differ
    luma_blocks: bool = True  # bound the mask by the 8 x 8 blocks whose luma differs
    # other lossy codecs (and JPEG from another encoder)
    threshold_min: float = 3.0  # never count a change below this
    noise_factor: float = 2.0  # threshold >= noise_factor x the noise (median change)
    max_noise: float = 6.0  # a median change above this is an edit everywhere, not noise
    texture_factor: float = 0.25  # + this x local contrast (JPEG error grows near edges)
    relative_lossy: float = 0.5  # as `relative`, for these codecs
    block: int = 4  # evidence window half-size, pixels (half a JPEG block: thin edits stay dense)
    # both lossy kinds
    prefilter: bool = True  # 3x3 Gaussian on both images first: halves JPEG noise
    density: float = 0.3  # a changed pixel is evidence where this share of its window changed
    colour_correction: bool = True  # fit and remove a small global colour shift first
    max_colour_shift: float = 24.0  # levels; a larger fitted shift is not applied
    # region clean-up, in pixels of the image or fractions of each region's own size
    close_px: int = 5  # lossy: closing radius (gaps the codec left in an edit)
    close_px_lossless: int = 1
    max_hole: float = 0.25  # holes up to this fraction of their region's area are filled
    min_component: float = 0.02  # lossy: regions below this fraction of the largest dropped
    # lossy: a region grows ring by ring (1 px each, up to `feather_rings`) across a soft
    # edge: while the ring's luma moved towards the region's own change by at least
    # `feather_ratio` of that change and `feather_levels` levels on average (the first
    # ring; the next ones `feather_tail_ratio` and `feather_tail_levels`). A codec's echo
    # of a hard edge moves the luma by a few percent of the edge, a feathered paste by tens.
    feather_rings: int = 3
    feather_ratio: float = 0.10
    feather_levels: float = 1.5
    feather_tail_ratio: float = 0.02
    feather_tail_levels: float = 0.6
    # whole-frame change: the share of tiles (16 on the shorter side) changed beyond noise
    full_cover: float = 0.9
    regenerated: Literal["full", "reject"] = "full"  # full mask, or status `regenerated`
    # quality filters, in pixels of the image: what a visible edit needs, not a page fraction
    min_changed_pixels: int = 16  # fewer changed pixels: no_visible_change
    min_pixels: int = 64  # a smaller mask: mask_too_small
    max_area: float = 0.8  # a mask above this fraction of the image: mask_too_large
    min_quality: float = 0.0  # below: low_quality (0 disables)
    max_leak: float = 0.5  # share of the mask outside the dilated requested region
    leak_margin: float = 0.03  # dilation of the requested region, fraction of shorter side
    # the forged pixels as made, before a lossy codec (synthesize's `precodec_blob`)
    precodec: bool = True  # derive the mask from them where they agree with the file
    precodec_reach: int = 16  # pixels: how far a codec's echo reaches (a 4:2:0 JPEG MCU)
    precodec_tolerance: float = 0.1  # share of either mask allowed beyond that reach of the other
    check_synthetic: bool = True  # decode synthetic rows and reject constant/black outputs
    keep_diff: bool = False  # write the soft difference map (shipped as <key>.diff.png)

    def __post_init__(self) -> None:
        fractions = ("relative", "relative_lossy", "density", "max_hole", "min_component",
                     "full_cover", "max_area", "min_quality", "max_leak", "leak_margin",
                     "precodec_tolerance", "feather_ratio", "feather_tail_ratio")
        for name in fractions:
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"masks.{name}: {v!r} is not allowed; allowed: 0.0 to 1.0")
        levels = ("threshold_lossless", "exact_threshold", "exact_texture", "threshold_min",
                  "noise_factor", "max_noise", "texture_factor", "max_colour_shift",
                  "feather_levels", "feather_tail_levels")
        for name in levels:
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"masks.{name}: {v!r} is not allowed; allowed: >= 0")
        pixels = ("exact_block", "relative_reach", "interior_blocks", "block", "close_px",
                  "close_px_lossless", "min_changed_pixels", "min_pixels", "precodec_reach",
                  "feather_rings")
        for name in pixels:
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"masks.{name}: {v!r} is not allowed; allowed: >= 0 pixels")
        if self.regenerated not in ("full", "reject"):
            raise ValueError(f"masks.regenerated: {self.regenerated!r}; allowed: full, reject")


@dataclass
class Derivation:
    """What differencing found: the mask and the evidence behind it."""

    mask: np.ndarray  # H x W bool
    diff: np.ndarray  # H x W uint8: largest channel difference after colour correction
    threshold: float  # global part of the per-pixel threshold
    noise: float  # the codec's noise level (0 for a lossless forgery)
    changed: float  # fraction of pixels counted as changed
    quality: float  # purity x coverage, in [0, 1]
    colour_shift: float  # largest level shift removed by colour correction
    changed_pixels: int = 0  # pixels counted as changed
    codec: str = "unknown"  # lossless | jpeg (compared with the original re-encoded) | lossy
    cover: float = 0.0  # share of tiles whose pixels changed beyond the codec's noise
    regenerated: bool = False  # the whole frame changed: `mask` is all True

    @property
    def area(self) -> float:
        return float(np.count_nonzero(self.mask)) / self.mask.size

    @property
    def lossless(self) -> bool:
        return self.codec == "lossless"

    def soft(self) -> np.ndarray:
        """The difference map for people and for `<key>.diff.png`: 255 at 4x the threshold."""
        return cv2.convertScaleAbs(self.diff, alpha=255.0 / (4.0 * max(self.threshold, 1.0)))


def _odd(n: float) -> int:
    n = max(1, round(n))
    return n if n % 2 else n + 1


def _median_u8(a: np.ndarray) -> float:
    hist = cv2.calcHist([np.ascontiguousarray(a)], [0], None, [256], [0, 256]).ravel()
    return float(np.searchsorted(np.cumsum(hist), hist.sum() / 2.0))


def _sub(img: np.ndarray, step: int) -> np.ndarray:
    """Every `step`-th pixel; a nearest resize is ~6x faster than copying a strided view."""
    if step == 1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, w // step), max(1, h // step)), interpolation=cv2.INTER_NEAREST)


def _channel_max(img: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    c = cv2.split(img)
    return cv2.max(cv2.max(c[0], c[1]), c[2], dst=dst)


def _encode_mask(mask: np.ndarray) -> bytes:
    """A 0/255 single-channel PNG like `imageio.encode_mask`, run-length coded: masks are
    long runs, and zlib's default search costs 4x as much at 108 MP for the same size."""
    m = cv2.compare(np.ascontiguousarray(mask).view(np.uint8), 0, cv2.CMP_GT)
    ok, buf = cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                       cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        return encode_mask(mask)
    return buf.tobytes()


_JPEG_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


@cache
def _same_jpeg_decoder() -> bool:
    """Whether OpenCV decodes JPEGs to exactly the pixels Pillow gives (`imageio.decode`,
    what the forgeries were made from): checked once per process on 4:4:4, 4:2:2, 4:2:0 and
    progressive encodings of a photo-like pattern."""
    yy, xx = np.mgrid[0:67, 0:93].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 5 + yy / 9), 128 + 90 * np.cos(xx / 7),
                    128 + 80 * np.sin(yy / 4)], -1).astype(np.uint8)
    for kw in ({"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2},
               {"subsampling": 2, "progressive": True}):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=87, **kw)
        ours = cv2.imdecode(np.frombuffer(buf.getbuffer(), np.uint8), _JPEG_FLAGS)
        if ours is None or not np.array_equal(ours, decode(buf.getvalue())):
            return False
    return True


def _decode(data: bytes) -> np.ndarray:
    """`imageio.decode`, with colour JPEGs decoded by OpenCV when it gives the same pixels
    (a third less time, and no copies through Pillow)."""
    if data[:3] == b"\xff\xd8\xff" and _same_jpeg_decoder():
        with Image.open(io.BytesIO(data)) as im:
            plain = im.mode == "RGB" and "adobe_transform" not in im.info
        if plain:
            out = cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_FLAGS)
            if out is not None:
                return out
    return decode(data)


# --------------------------------------------------------------------------- codecs


@dataclass
class Codec:
    """How the forged file stores pixels, and the original stored the same way."""

    kind: str  # lossless | jpeg | lossy (a lossy codec this stage cannot reproduce)
    twin: np.ndarray | None = None  # jpeg: the original encoded with the forgery's tables
    settings: dict[str, Any] | None = None  # jpeg: mode, qtables, subsampling
    original: np.ndarray | None = None  # jpeg: for `noise`
    data: bytes | None = None  # jpeg: the forged file, for `luma_blocks`
    twin_data: bytes | None = None  # jpeg: the twin as encoded

    def luma_blocks(self, forged: np.ndarray | None = None) -> np.ndarray | None:
        """jpeg: 255 for each 8 x 8 block (the last row and column partial) whose luma in
        the forged file differs from the twin's, else 0; both files decoded to their luma
        plane alone. With an exact twin these are the blocks the edit changed. A greyscale
        JPEG's pixels are its luma: `forged` (its decoded pixels) and the twin serve as
        they are, with no decode."""
        if self.kind != "jpeg" or self.data is None or self.twin_data is None:
            return None
        if (self.settings or {}).get("mode") == "L" and forged is not None \
                and self.twin is not None:
            ours, twin = forged[..., 0], self.twin[..., 0]
        else:
            ours, twin = (cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)
                          for b in (self.data, self.twin_data))
        if ours is None or twin is None or ours.shape != twin.shape:
            return None
        return cv2.compare(_reduce(cv2.compare(ours, twin, cv2.CMP_NE), 8), 0, cv2.CMP_GT)

    @property
    def noise(self) -> float | None:
        """jpeg: the median error (after a 3 x 3 Gaussian) of a first encoding with these
        tables: a crop of the original off the block grid by (3, 5) pixels, so its blocks
        are not already quantised. The edit's blocks are encoded for the first time."""
        if self.kind != "jpeg" or self.original is None or self.settings is None:
            return None
        h, w = self.original.shape[:2]
        ch, cw = min(h - 3, 256), min(w - 5, 256)
        if ch < 16 or cw < 16:
            return None
        y0 = min((h - ch) // 2 // 16 * 16 + 3, h - ch)
        x0 = min((w - cw) // 2 // 16 * 16 + 5, w - cw)
        crop = np.ascontiguousarray(self.original[y0 : y0 + ch, x0 : x0 + cw])
        fresh = _jpeg_round_trip(crop, self.settings)
        return _median_u8(_channel_max(cv2.absdiff(cv2.GaussianBlur(fresh, (3, 3), 0),
                                                   cv2.GaussianBlur(crop, (3, 3), 0))))


_LOSSLESS = {"PNG", "BMP", "PPM", "TGA", "QOI"}


def codec_of(original: np.ndarray, forged_bytes: bytes, twin: bool = True) -> Codec:
    """The forged file's codec; for a JPEG, the original re-encoded with the forged file's
    own quantisation tables and chroma subsampling (its "twin"). A forgery made from these
    original pixels and saved as that JPEG equals its twin, bit for bit, in every 8 x 8
    block (16 x 16 with 4:2:0) the edit did not touch, so only the edit's blocks differ."""
    from PIL import JpegImagePlugin

    with Image.open(io.BytesIO(forged_bytes)) as im:
        fmt = im.format or ""
        if fmt in _LOSSLESS:
            return Codec("lossless")
        if fmt == "TIFF":
            comp = str(im.info.get("compression", "raw"))
            return Codec("lossy" if "jpeg" in comp else "lossless")
        if fmt == "WEBP":
            return Codec("lossless" if forged_bytes[12:16] == b"VP8L" else "lossy")
        if fmt not in ("JPEG", "MPO") or not twin or im.mode not in ("RGB", "L"):
            return Codec("lossy")
        tables = dict(im.quantization or {})
        sampling = JpegImagePlugin.get_sampling(im)
        mode = im.mode
    if not tables or (mode == "RGB" and sampling < 0):
        return Codec("lossy")
    settings: dict[str, Any] = {"mode": mode, "qtables": tables}
    if mode == "RGB":
        settings["subsampling"] = sampling
    twin = _jpeg_encode(original, settings)
    return Codec("jpeg", _jpeg_decode(twin, settings), settings, original, forged_bytes, twin)


def _jpeg_encode(img: np.ndarray, settings: dict[str, Any]) -> bytes:
    """`img` (RGB uint8) encoded by Pillow with `settings`."""
    kw = {k: v for k, v in settings.items() if k != "mode"}
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "RGB")
    if settings["mode"] == "L":
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _jpeg_decode(data: bytes, settings: dict[str, Any]) -> np.ndarray:
    """A JPEG this module encoded, decoded by OpenCV (the same libjpeg-turbo as Pillow, a
    third of its decoding time); RGB uint8."""
    buf = np.frombuffer(data, np.uint8)
    if settings["mode"] == "L":
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2RGB)
    return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)


def _jpeg_round_trip(img: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
    """`img` encoded with `settings` and decoded; RGB uint8."""
    return _jpeg_decode(_jpeg_encode(img, settings), settings)


# --------------------------------------------------------------------------- derivation


def colour_table(
    original: np.ndarray, forged: np.ndarray, max_shift: float
) -> tuple[np.ndarray | None, float]:
    """A per-channel gain and offset taking `original` towards `forged`, as a 1 x 256 x 3
    lookup table for `cv2.LUT` (None: no shift), and the largest shift it applies.

    Fitted on a subsample from a median start with two inlier refits, so an edit covering
    less than half the image does not pull the fit. A channel whose values span little range
    gets an offset only; a channel whose shift exceeds `max_shift` levels is left alone (that
    is no longer a small global shift).
    """
    h, w = original.shape[:2]
    step = max(1, int(np.sqrt(h * w / 4096)))  # ~4k samples fit 2 numbers per channel
    o8 = original[::step, ::step].reshape(-1, 3)
    f8 = forged[::step, ::step].reshape(-1, 3)
    if np.count_nonzero((o8 == f8).all(axis=1)) * 2 > len(o8):
        return None, 0.0  # most pixels identical: there is no global shift
    o = o8.astype(np.float32)
    f = f8.astype(np.float32)
    # all three channels at once: per-call overhead, not arithmetic, dominates at 4k samples
    lo, hi = np.percentile(o, [1, 99], axis=0)
    ranged = hi - lo >= 64
    a = np.ones(3, np.float32)
    b = np.median(f - o, axis=0).astype(np.float32)
    unsaturated = (f > 0) & (f < 255)  # saturated values carry no information about the shift
    for band in (8.0, 4.0):
        w = ((np.abs(f - (a * o + b)) <= band) & unsaturated).astype(np.float32)
        n = w.sum(axis=0)
        fit = n >= 64
        if not fit.any():
            break
        n = np.maximum(n, 1.0)
        mx, my = (w * o).sum(axis=0) / n, (w * f).sum(axis=0) / n
        dx = o - mx
        var = (w * dx * dx).sum(axis=0) / n
        cov = (w * dx * (f - my)).sum(axis=0) / n
        gain = np.where(ranged & (var >= 16.0), np.clip(cov / np.maximum(var, 1e-6), 0.8, 1.25), a)
        a = np.where(fit, gain, a)
        b = np.where(fit, my - a * mx, b)
    v = np.arange(256, dtype=np.float32)
    seen = np.maximum(np.abs((a - 1.0) * lo + b), np.abs((a - 1.0) * hi + b))
    # a channel whose fitted shift is too large is left alone: not a small global shift
    fitted = np.clip((a - 1.0) * v[:, None] + b, -max_shift, max_shift)
    delta = np.where(seen <= max_shift, fitted, 0.0)
    lut = v[:, None] + delta
    shift = float(np.abs(lut - v[:, None]).max())
    if shift < 1.0:
        # below one level the table rounds to (nearly) the identity; the thresholds absorb it
        return None, 0.0
    table = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
    return table.reshape(1, 256, 3), shift


def match_colours(
    original: np.ndarray, forged: np.ndarray, max_shift: float
) -> tuple[np.ndarray, float]:
    """The original with `colour_table`'s shift towards `forged` applied, and that shift."""
    table, shift = colour_table(original, forged, max_shift)
    if table is None:
        return original, 0.0
    return cv2.LUT(np.ascontiguousarray(original), table), shift



def derive(original: np.ndarray, forged_bytes: bytes, p: MasksParams | None = None) -> Derivation:
    """The edited region of the forged file `forged_bytes` relative to the `original` pixels
    (H x W x 3 uint8), using what the file says about its codec (see `codec_of`)."""
    p = p or MasksParams()
    forged = _decode(forged_bytes)
    if forged.shape != original.shape:
        raise ValueError(f"original {original.shape} and forged {forged.shape} differ in size")
    return derive_mask(original, forged, p, codec_of(original, forged_bytes, p.codec_twin))


def derive_mask(
    original: np.ndarray,
    forged: np.ndarray,
    p: MasksParams | None = None,
    codec: Codec | None = None,
) -> Derivation:
    """The edited region of `forged` (H x W x 3 uint8) relative to `original` (same shape).

    Without `codec` the forged pixels' codec is guessed: lossless when most pixels are
    identical, else an unknown lossy codec whose noise is the median change (at most
    `max_noise` levels, so a change everywhere is not mistaken for noise).
    """
    p = p or MasksParams()
    if original.shape != forged.shape or original.ndim != 3 or original.shape[2] != 3:
        raise ValueError(
            f"original {original.shape} and forged {forged.shape} must both be H x W x 3"
        )
    original = np.ascontiguousarray(original, dtype=np.uint8)
    forged = np.ascontiguousarray(forged, dtype=np.uint8)
    h, w = forged.shape[:2]
    kind = codec.kind if codec is not None else "unknown"
    ref = codec.twin if codec is not None and codec.twin is not None else original
    table, shift = None, 0.0
    if p.colour_correction:
        table, shift = colour_table(ref, forged, p.max_colour_shift)
    raw = _raw_diff(ref, forged, table)
    step = max(1, int(np.sqrt(h * w / 65536)))
    if kind == "unknown":
        kind = "lossless" if _median_u8(_sub(raw, step)) < 1 else "lossy"
    if kind == "lossless":
        diff = raw
        # a fitted colour shift is applied through a rounded table: +-1 level remains
        threshold = p.threshold_lossless if shift == 0 else max(p.threshold_lossless, 1.5)
        changed = cv2.compare(raw, threshold, cv2.CMP_GT)
        evidence = changed
        noise = 0.0
    else:
        # the twin reproduces the forgery's codec when most of its blocks are bit-identical
        exact = kind == "jpeg" and _identical_blocks(raw) >= 0.75
        if not exact:  # another encoder, or an unknown lossy codec
            kind = "lossy"
        if exact:
            # outside the edit's own blocks nothing differs: only the edit's codec echo
            # (ringing, chroma subsampling) is left to tell from the edit, in the box
            # around the blocks that differ
            noise = 0.0
            threshold, texture = p.exact_threshold, p.exact_texture
            relative, block = p.relative, p.exact_block
            x, y, bw, bh = cv2.boundingRect(raw)
        else:
            x, y, bw, bh = 0, 0, w, h
            threshold = texture = relative = 0.0
            block = p.block
        diff = np.zeros((h, w), np.uint8)
        contrast = np.zeros((h, w), np.uint8)
        m = 2 * max(p.relative_reach, block) + 4  # the reach of the neighbourhoods below
        x0, y0, x1, y1 = max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m)
        win = (slice(y0, y1), slice(x0, x1))
        if bw and bh:
            _lossy_maps(ref[win], forged[win], table, p.prefilter, diff[win], contrast[win])
        if not exact:
            noise = min(_median_u8(_sub(diff, step)), p.max_noise)
            if codec is not None and codec.kind == "jpeg":
                # another encoder with the same tables differs from the twin by less than
                # twice a first encoding's error; a larger median change is an edit
                first = codec.noise
                if first is not None:
                    noise = min(noise, max(1.0, p.noise_factor * first))
            threshold = max(p.threshold_min, p.noise_factor * noise)
            texture, relative = p.texture_factor, p.relative_lossy
        changed = np.zeros((h, w), np.uint8)
        evidence = np.zeros((h, w), np.uint8)
        if bw and bh:
            d = diff[win]
            # JPEG error grows with the local contrast of the original
            limit = cv2.convertScaleAbs(contrast[win], alpha=texture, beta=threshold)
            if relative > 0:
                # a strong edit spreads into its neighbours (chroma subsampling, ringing)
                kr = 2 * p.relative_reach + 1
                strongest = cv2.dilate(d, cv2.getStructuringElement(cv2.MORPH_RECT, (kr, kr)))
                cv2.max(limit, cv2.convertScaleAbs(strongest, alpha=relative), dst=limit)
            cv2.compare(d, limit, cv2.CMP_GT, dst=changed[win])
            # codec noise is sparse at the scale of its blocks; an edit is dense
            k = 2 * block + 1
            dense = cv2.compare(cv2.blur(changed[win], (k, k)), p.density * 255.0, cv2.CMP_GT)
            cv2.bitwise_and(changed[win], dense, dst=evidence[win])
        if exact and p.interior_blocks > 0:
            # weak edits: blocks deep inside the differing ones are the edit's, however
            # little they changed
            evidence = cv2.bitwise_or(evidence, _interior(raw, p.interior_blocks))
    n_changed = cv2.countNonZero(changed)
    cover = _cover(evidence, p)
    regenerated = cover >= p.full_cover and n_changed > 0
    if regenerated:
        mask = np.ones((h, w), bool)
    else:
        m = _regions(evidence, p, lossless=kind == "lossless")
        if kind == "lossless":  # every changed pixel belongs to the mask
            cv2.bitwise_or(m, changed, dst=m)
        elif p.feather_rings:
            _feathered_edges(m, ref, forged, table, p)
        if kind != "lossless" and exact and p.luma_blocks and codec is not None and bw and bh:
            blocks = codec.luma_blocks(forged)
            if blocks is not None:
                _within_luma_blocks(m, blocks, win, p, _mcu(codec.settings))
        mask = m > 0
    # purity: the share of the evidence inside the mask; coverage: the share of the mask
    # that is evidence, saturating at one half
    n_mask = int(np.count_nonzero(mask))
    n_evidence = cv2.countNonZero(evidence)
    if n_mask and n_evidence:
        inside = n_evidence if regenerated or kind == "lossless" else cv2.countNonZero(
            cv2.bitwise_and(evidence, mask.view(np.uint8)))
        quality = float(np.clip(inside / n_evidence * min(1.0, inside / n_mask / 0.5), 0, 1))
    else:
        quality = 0.0
    return Derivation(
        mask=mask,
        diff=diff,
        threshold=float(threshold),
        noise=float(noise),
        changed=n_changed / (h * w),
        quality=quality,
        colour_shift=shift,
        changed_pixels=n_changed,
        codec=kind,
        cover=cover,
        regenerated=regenerated,
    )


def edit_as_made(original: np.ndarray, made: np.ndarray, d: Derivation,
                 p: MasksParams | None = None, forged: np.ndarray | None = None,
                 forged_bytes: bytes | None = None) -> tuple[Derivation, str | None]:
    """The derivation of a lossy forgery whose pixels before encoding (`made`) are known, and
    None; or `d` (the file's own derivation) and why `made` was not used.

    The mask is the lossless mask of `made` against `original`: the edit, without the
    codec's echo around it. The file still says whether the change is visible
    (`changed_pixels`, `noise`, `threshold`, `diff` are `d`'s). `made` belongs to other pixels
    (another decoder, another original) when it changed the whole frame and the file did not,
    or when more than `precodec_tolerance` of either mask lies further than `precodec_reach`
    pixels from the other. One exception: a whole frame changed by a little (a resampling, an
    autoencoder's round trip, grain) hides under a JPEG's noise pixel by pixel, so the file
    alone cannot tell it from another encoder's re-save; when the file (`forged_bytes`,
    decoded `forged`) is `made` encoded with the file's own tables, bit for bit in most
    blocks, the frame did change and `made`'s full mask stands."""
    p = p or MasksParams()
    if d.codec == "lossless":
        return d, "the file is lossless: its own mask is the edit"
    e = derive_mask(original, made, p, Codec("lossless"))
    if not e.changed_pixels:
        return d, "the pixels as made do not differ from the original"
    if e.regenerated and not d.regenerated:
        if forged is not None and forged_bytes is not None and _encodes(made, forged,
                                                                        forged_bytes):
            return dataclasses.replace(
                e, diff=d.diff, noise=d.noise, threshold=d.threshold, changed=d.changed,
                changed_pixels=d.changed_pixels,
                codec=f"{d.codec}, edit known before encoding (the whole frame)"), None
        return d, (f"the pixels as made changed {e.cover:.0%} of the tiles, the file "
                   f"{d.cover:.0%}: they were made from other pixels than the original's")
    for a, b, what in ((d.mask, e.mask, "the file's mask lies more than {} pixels from the "
                        "edit as made"),
                       (e.mask, d.mask, "the edit as made lies more than {} pixels from the "
                        "file's mask")):
        away = _farther(a, b, p.precodec_reach)
        if away > p.precodec_tolerance:
            return d, (f"{away:.0%} of {what.format(p.precodec_reach)} "
                       f"(precodec_tolerance {p.precodec_tolerance:.0%})")
    return dataclasses.replace(
        e, diff=d.diff, noise=d.noise, threshold=d.threshold, changed=d.changed,
        changed_pixels=d.changed_pixels, codec=f"{d.codec}, edit known before encoding"), None


def _encodes(made: np.ndarray, forged: np.ndarray, forged_bytes: bytes) -> bool:
    """Whether the JPEG `forged_bytes` (decoded: `forged`) is `made` encoded with its own
    tables and subsampling: the twin of `made` is bit-identical to it in most blocks."""
    c = codec_of(made, forged_bytes)
    if c.kind != "jpeg" or c.twin is None or c.twin.shape != forged.shape:
        return False
    return _identical_blocks(_raw_diff(c.twin, forged, None)) >= 0.75


def _mcu(settings: dict[str, Any] | None) -> tuple[int, int]:
    """A JPEG's MCU in 8 x 8 blocks (height, width): 4:2:0 (2, 2), 4:2:2 (1, 2), else (1, 1)."""
    sub = (settings or {}).get("subsampling", 0) if (settings or {}).get("mode") == "RGB" else 0
    return {2: (2, 2), 1: (1, 2)}.get(sub, (1, 1))


def _within_luma_blocks(m: np.ndarray, blocks: np.ndarray, win: tuple[slice, slice],
                        p: MasksParams, mcu: tuple[int, int] = (2, 2)) -> None:
    """`m` (0/255, the derived regions) kept inside the 8 x 8 blocks whose luma changed
    (`Codec.luma_blocks`), with the blocks whose 4 neighbours changed too filled in, and
    cleaned again (`_regions`); in place. The work is inside `win`, the box around every
    block that differs at all. Where the colour changed and the luma did not (chroma is
    subsampled and spreads, so no block bounds it) the derived pixels stay: a region that
    overlaps no changed luma block, and the derived pixels of every MCU (`mcu`: its height
    and width in blocks, from the chroma subsampling) whose luma blocks are all unchanged;
    the echo of a luma edit falls mostly inside its own MCUs."""
    h, w = m.shape
    ys, xs = win
    y0, y1, x0, x1 = ys.start, ys.stop, xs.start, xs.stop
    by0, bx0 = y0 // 8, x0 // 8
    by1, bx1 = -(-y1 // 8), -(-x1 // 8)

    def pixels(b: np.ndarray) -> np.ndarray:
        sub = np.ascontiguousarray(b[by0:by1, bx0:bx1])
        up = cv2.resize(sub, (sub.shape[1] * 8, sub.shape[0] * 8),
                        interpolation=cv2.INTER_NEAREST)
        return up[y0 - by0 * 8 : y1 - by0 * 8, x0 - bx0 * 8 : x1 - bx0 * 8]

    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    touched = pixels(blocks)
    mh, mw = mcu
    hb, wb = blocks.shape
    grid = np.pad(blocks, ((0, -hb % mh), (0, -wb % mw)))
    grid = grid.reshape(grid.shape[0] // mh, mh, grid.shape[1] // mw, mw).max(axis=(1, 3))
    in_luma_mcu = pixels(np.repeat(np.repeat(grid, mh, 0), mw, 1)[:hb, :wb])
    inner = pixels(cv2.erode(blocks, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0))
    derived = m[win].copy()
    n, labels = cv2.connectedComponents(derived, connectivity=8)
    colour_only = np.bincount(labels[touched > 0], minlength=n) == 0
    colour_only[0] = False
    base = np.zeros((h, w), np.uint8)
    base[win] = cv2.bitwise_or(cv2.bitwise_and(derived, touched), inner)
    refined = _regions(base, p, lossless=False)
    m[:] = 0
    m[win] = cv2.bitwise_and(refined[win], touched)
    if colour_only.any():
        m[win][colour_only[labels]] = 255
    # colour changes in MCUs whose luma did not change
    cv2.bitwise_or(m[win], cv2.bitwise_and(derived, cv2.bitwise_not(in_luma_mcu)), dst=m[win])


_LUMA = np.array([[0.299, 0.587, 0.114]], np.float32)  # ITU-R BT.601, as JPEG's Y
_FEATHER_WINDOW = 4  # px: a ring pixel's "own change" is the region's mean within this reach


def _feathered_edges(m: np.ndarray, ref: np.ndarray, forged: np.ndarray,
                     table: np.ndarray | None, p: MasksParams) -> None:
    """Grows each region of `m` (0/255) across a feathered edge, in place (see
    `MasksParams.feather_rings`). A soft paste changes the pixels just outside its
    half-alpha line by a share of what it changed inside, in the same direction; the
    threshold misses them where that share is below the codec's noise, but a whole ring of
    them, averaged, is not. The luma alone is measured: a 4:2:0 encoder's chroma (and an
    editor's chroma filter) bleeds past any edge, hard or soft, while its luma keeps hard
    edges hard. Each region is worked on in the box around it, and its float arrays only in
    strips, kept for the pixels its rings can reach (a region of half a 108 MP frame costs
    a few masks of its box, not a dozen float copies)."""
    bx, by, bw, bh = cv2.boundingRect(m)
    if not bw:
        return
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m[by:by + bh, bx:bx + bw],
                                                           connectivity=8)
    stats[:, 0] += bx
    stats[:, 1] += by
    h, w = m.shape
    reach = p.feather_rings + _FEATHER_WINDOW + 1
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    grown = []
    for i in range(1, n):
        x, y, cw, ch = (int(v) for v in stats[i, :4])
        ly, lx = max(0, y - reach), max(0, x - reach)  # the window's corner
        win = (slice(ly, min(h, y + ch + reach)), slice(lx, min(w, x + cw + reach)))
        region = np.zeros((win[0].stop - ly, win[1].stop - lx), np.uint8)
        region[y - ly:y - ly + ch, x - lx:x - lx + cw] = (
            labels[y - by:y - by + ch, x - bx:x - bx + cw] == i)
        free = m[win] == 0
        band = (cv2.dilate(region, cross, iterations=p.feather_rings) > 0) & free
        ys, xs = np.nonzero(band)
        if not len(ys):
            continue
        towards, scale = _towards_and_scale(region, ref[win], forged[win], table, ys, xs)
        cur = region.copy()
        grew = False
        for ring_no in range(p.feather_rings):
            ring = (cv2.dilate(cur, cross) > cur) & free  # inside `band`
            on = ring[ys, xs]
            count = np.count_nonzero(on)
            if not count:
                break
            moved = float(towards[on].sum())
            ratio, levels = ((p.feather_ratio, p.feather_levels) if ring_no == 0
                             else (p.feather_tail_ratio, p.feather_tail_levels))
            if moved < ratio * float(scale[on].sum()) or moved < levels * count:
                break
            cur[ring] = 1
            grew = True
        if grew:
            grown.append((win, cur))
    for win, cur in grown:
        m[win][cur > 0] = 255


_FEATHER_STRIP = 1 << 18  # pixels per strip of `_towards_and_scale`'s float arrays


def _towards_and_scale(region: np.ndarray, ref: np.ndarray, forged: np.ndarray,
                       table: np.ndarray | None, ys: np.ndarray, xs: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """At the pixels (ys, xs) (row-major order) of a region's box: the luma change in the
    direction of the region's own mean change within `_FEATHER_WINDOW` px, and the size of
    that mean change. Float arrays exist a strip of rows at a time."""
    r = _FEATHER_WINDOW
    k = 2 * r + 1
    hh, ww = region.shape
    rows = max(1, _FEATHER_STRIP // max(1, ww))
    towards = np.empty(len(ys), np.float32)
    scale = np.empty(len(ys), np.float32)
    for r0 in range(0, hh, rows):
        r1 = min(hh, r0 + rows)
        i0, i1 = np.searchsorted(ys, [r0, r1])
        if i0 == i1:
            continue
        a0, a1 = max(0, r0 - r), min(hh, r1 + r)  # the rows the means reach
        o = ref[a0:a1] if table is None else cv2.LUT(ref[a0:a1], table)
        dy = (cv2.transform(forged[a0:a1].astype(np.float32), _LUMA)
              - cv2.transform(o.astype(np.float32), _LUMA))
        reg = region[a0:a1]
        own = cv2.blur(dy * reg, (k, k))  # the region's mean change x its share near
        share = cv2.blur(reg.astype(np.float32), (k, k))
        yy, xx = ys[i0:i1] - a0, xs[i0:i1]
        o_at = own[yy, xx]
        towards[i0:i1] = dy[yy, xx] * np.sign(o_at)
        scale[i0:i1] = np.abs(o_at) / np.maximum(share[yy, xx], 1e-6)
    return towards, scale


def _farther(a: np.ndarray, b: np.ndarray, reach: int) -> float:
    """Share of `a`'s pixels further than `reach` pixels from `b` (both H x W bool), measured
    in the box around both: the cost follows the masks, not the image."""
    n = np.count_nonzero(a)
    if not n:
        return 0.0
    h, w = a.shape
    x, y, bw, bh = cv2.boundingRect(cv2.bitwise_or(a.view(np.uint8), b.view(np.uint8)))
    x0, y0 = max(0, x - reach - 1), max(0, y - reach - 1)
    x1, y1 = min(w, x + bw + reach + 1), min(h, y + bh + reach + 1)
    near = cv2.dilate(b[y0:y1, x0:x1].view(np.uint8),
                      cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1,) * 2))
    return np.count_nonzero(a[y0:y1, x0:x1] & (near == 0)) / n


_STRIP = 1 << 17  # pixels per strip of the per-pixel pass: its arrays stay in cache


def _rows(h: int, w: int) -> int:
    return max(8, _STRIP // max(1, w) // 8 * 8)


def _raw_diff(ref: np.ndarray, forged: np.ndarray, table: np.ndarray | None) -> np.ndarray:
    """Largest channel difference, in strips; the colour table is applied strip by strip,
    so no corrected copy of the image is made."""
    h, w = forged.shape[:2]
    raw = np.empty((h, w), np.uint8)
    rows = _rows(h, w)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        r = ref[y0:y1] if table is None else cv2.LUT(ref[y0:y1], table)
        _channel_max(cv2.absdiff(forged[y0:y1], r), dst=raw[y0:y1])
    return raw


def _lossy_maps(ref: np.ndarray, forged: np.ndarray, table: np.ndarray | None,
                prefilter: bool, diff: np.ndarray, contrast: np.ndarray) -> None:
    """Into `diff` the largest channel difference after a 3 x 3 Gaussian on both images
    (halves JPEG noise), into `contrast` the reference's local contrast (3 x 3 gradient);
    in strips with two rows of margin for the neighbourhoods."""
    h, w = forged.shape[:2]
    rows = _rows(h, w)
    kernel = np.ones((3, 3), np.uint8)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        m0, m1 = max(0, y0 - 2), min(h, y1 + 2)
        i0, i1 = y0 - m0, y1 - m0
        r = ref[m0:m1] if table is None else cv2.LUT(ref[m0:m1], table)
        f = forged[m0:m1]
        if prefilter:
            r, f = cv2.GaussianBlur(r, (3, 3), 0), cv2.GaussianBlur(f, (3, 3), 0)
        _channel_max(cv2.absdiff(r, f)[i0:i1], dst=diff[y0:y1])
        _channel_max(cv2.morphologyEx(r, cv2.MORPH_GRADIENT, kernel)[i0:i1], dst=contrast[y0:y1])


_TILES = 16  # tiles on the shorter side for the whole-frame test


def _interior(raw: np.ndarray, k: int) -> np.ndarray:
    """0/255: the 8 x 8 blocks that differ at all and whose neighbours up to `k` blocks away
    all differ too (with an exact twin, only an edit's blocks differ: these are inside it,
    away from the codec echo around it)."""
    h, w = raw.shape
    touched = cv2.compare(_reduce(cv2.compare(raw, 0, cv2.CMP_GT), 8), 0, cv2.CMP_GT)
    inner = cv2.erode(touched, np.ones((2 * k + 1, 2 * k + 1), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.resize(inner, (touched.shape[1] * 8, touched.shape[0] * 8),
                      interpolation=cv2.INTER_NEAREST)[:h, :w]


def _identical_blocks(raw: np.ndarray) -> float:
    """Share of 8 x 8 blocks (JPEG's) with no difference at all in `raw`."""
    h, w = raw.shape
    hb, wb = h // 8, w // 8
    if not hb or not wb:
        return 0.0
    # a block's mean of a 0/255 map is 0 only when none of its 64 pixels differ
    touched = _reduce(cv2.compare(raw[: hb * 8, : wb * 8], 0, cv2.CMP_GT), 8)
    return float(touched.size - cv2.countNonZero(touched)) / touched.size


def _reduce(m: np.ndarray, f: int) -> np.ndarray:
    """Mean of `m` (0/255) over f x f cells, the partial last row/column of cells included
    (only those are padded: no copy of a full-size map)."""
    if f == 1:
        return m
    h, w = m.shape
    hs, ws = h // f, w // f
    out = np.empty((-(-h // f), -(-w // f)), np.uint8)
    if hs and ws:
        out[:hs, :ws] = cv2.resize(m[: hs * f, : ws * f], (ws, hs), interpolation=cv2.INTER_AREA)
    if h % f:
        strip = cv2.copyMakeBorder(m[hs * f :], 0, f - h % f, 0, -w % f, cv2.BORDER_REPLICATE)
        out[hs:] = cv2.resize(strip, (out.shape[1], 1), interpolation=cv2.INTER_AREA)
    if w % f and hs:
        strip = cv2.copyMakeBorder(m[: hs * f, ws * f :], 0, 0, 0, f - w % f,
                                   cv2.BORDER_REPLICATE)
        out[:hs, ws:] = cv2.resize(strip, (1, hs), interpolation=cv2.INTER_AREA)
    return out


def _cover(evidence: np.ndarray, p: MasksParams) -> float:
    """Share of tiles (16 on the shorter side) in which `density` of the pixels changed."""
    h, w = evidence.shape
    t = max(1, min(h, w) // _TILES)
    th, tw = max(1, round(h / t)), max(1, round(w / t))
    # an integer reduction first (OpenCV's fast path), then to the tile grid
    coarse = _reduce(evidence, max(1, t // 8))
    tiles = cv2.resize(coarse, (tw, th), interpolation=cv2.INTER_AREA)
    return float(np.count_nonzero(tiles > p.density * 255.0)) / tiles.size


def _regions(evidence: np.ndarray, p: MasksParams, lossless: bool) -> np.ndarray:
    """Region clean-up at full resolution, inside the box around the changed pixels: a
    small closing (gaps a codec leaves in an edit), holes filled up to `max_hole` of their
    region's area and, for lossy codecs, regions below `min_component` of the largest one
    dropped. Every size is in pixels or relative to a region, never to the image."""
    h, w = evidence.shape
    out = np.zeros((h, w), np.uint8)
    x, y, bw, bh = cv2.boundingRect(evidence)
    if not bw or not bh:
        return out
    r = p.close_px_lossless if lossless else p.close_px
    pad = r + 2
    x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(w, x + bw + pad), min(h, y + bh + pad)
    region = evidence[y0:y1, x0:x1]
    if r >= 1:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, disk)
    out[y0:y1, x0:x1] = _clean(region, 0.0 if lossless else p.min_component, p.max_hole)
    return out


def _clean(region: np.ndarray, min_component: float, max_hole: float) -> np.ndarray:
    """Drops regions smaller than `min_component` x the largest region and fills each hole
    up to `max_hole` x the area of the region around it (0/255 map in, 0/255 map out).

    One contour pass (outer boundaries and holes, 8- and 4-connected like the components they
    bound) instead of two labelings: it is tens of times faster on a mostly empty map.
    Small regions go first, so an island inside a small hole ends up filled, not dropped.
    """
    if min_component <= 0 and max_hole <= 0:
        return region
    contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return region
    out = region.copy()
    parent = hierarchy[0][:, 3]
    # a contour's polygon area misses half its boundary pixels; add them back
    area = np.array([cv2.contourArea(c) + 0.5 * cv2.arcLength(c, True) + 1 for c in contours])
    outer = parent < 0
    if min_component > 0:
        least = min_component * area[outer].max()
        small = [c for c, a, o in zip(contours, area, outer) if o and a < least]
        if small:
            cv2.drawContours(out, small, -1, 0, thickness=cv2.FILLED)
    if max_hole > 0:
        holes = [c for c, a, q in zip(contours, area, parent)
                 if q >= 0 and a <= max_hole * area[q]]
        if holes:
            cv2.drawContours(out, holes, -1, 255, thickness=cv2.FILLED)
    return out


def is_degenerate(image: np.ndarray) -> str | None:
    """Why an output is unusable (constant, all black, non-finite), or None."""
    a = np.asarray(image)
    if a.size == 0:
        return "empty image"
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return "non-finite pixel values"
    h, w = a.shape[:2]
    step = max(1, int(np.sqrt(h * w / 262144)))
    s = a[::step, ::step]
    lo, hi = float(s.min()), float(s.max())
    if hi <= 4:
        return "all black (a safety checker's output)"
    if hi - lo <= 2:
        return f"constant image (values {lo:.0f}..{hi:.0f})"
    return None


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    inter = np.count_nonzero(a & b)
    union = np.count_nonzero(a | b)
    return float(inter / union) if union else 1.0


def leak_fraction(mask: np.ndarray, requested: np.ndarray, margin: float) -> float:
    """Share of `mask` outside `requested` dilated by `margin` x its shorter side.

    Measured on cells of about 1/16 of the margin, so the cost does not grow with the
    square of the image size (a 3% margin is 270 pixels at 108 MP); the mask's share of
    each cell is kept, and the dilation errs by at most one cell of that margin."""
    n = np.count_nonzero(mask)
    if not n:
        return 0.0
    r = max(1, round(margin * min(mask.shape)))
    f = max(1, r // 16)
    m = _reduce(cv2.compare(mask.view(np.uint8), 0, cv2.CMP_GT), f)
    q = cv2.compare(_reduce(cv2.compare(requested.view(np.uint8), 0, cv2.CMP_GT), f), 0, cv2.CMP_GT)
    rr = max(1, round(r / f))
    grown = cv2.dilate(q, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rr + 1, 2 * rr + 1)))
    total = cv2.sumElems(m)[0]
    outside = cv2.sumElems(cv2.bitwise_and(m, cv2.bitwise_not(grown)))[0]
    return float(outside / total) if total else 0.0


# --------------------------------------------------------------------------- the stage


def _rel(path: Path, data_dir: Path) -> str:
    try:
        return os.path.relpath(path, data_dir)
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _reject(r: Record, status: str, error: str) -> Record:
    return r.replace(status=status, error=error, stage="masks")


class _Worker:
    """Maps a chunk of records to the same records with masks set or a reason recorded."""

    def __init__(self, p: MasksParams, data_dir: str, out: str):
        self.p = p
        self.data = Path(data_dir)
        self.out = Path(out)

    def __call__(self, chunk: list[Record]) -> list[Record]:
        results = []
        for r in chunk:
            try:
                results.append(self.one(r))
            except Exception as e:  # noqa: BLE001 - a bad sample is a row, never a crashed run
                log.warning("masks: %s failed: %s", r.key, e)
                results.append(_reject(r, "mask_error", f"{type(e).__name__}: {e}"))
        return results

    def _read(self, rel: str) -> bytes:
        return (self.data / rel).read_bytes()

    def one(self, r: Record) -> Record:
        if r.status != "ok":
            return r
        if r.label == "real":
            return r.replace(mask_source="none", mask_area=0.0)
        if r.label == "synthetic":
            r = r.replace(mask_source="full", mask_area=1.0)
            if self.p.check_synthetic and r.blob:
                try:
                    why = is_degenerate(decode(self._read(r.blob)))
                except Exception as e:  # noqa: BLE001
                    return _reject(r, "unreadable", f"synthetic image: {type(e).__name__}: {e}")
                if why:
                    return _reject(r, "degenerate_output", why)
            return r
        if r.label != "tampered":
            return _reject(r, "mask_error",
                           f"label {r.label!r}; allowed: real, tampered, synthetic")
        if r.parent_blob:
            return self.derived(r)
        if r.mask_blob:
            return self.given(r)
        return _reject(r, "missing_mask", "tampered sample with neither a mask nor an original")

    def given(self, r: Record) -> Record:
        path = self.data / r.mask_blob
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001
            return _reject(r, "missing_mask", f"given mask unreadable: {type(e).__name__}: {e}")
        if r.width and r.height and size != (r.width, r.height):
            return _reject(
                r, "size_mismatch", f"mask is {size[0]}x{size[1]}, image is {r.width}x{r.height}"
            )
        r = r.replace(mask_source="given")
        if r.mask_area is None:
            m = decode_mask(path.read_bytes())
            area = float(np.count_nonzero(m)) / m.size
            if area == 0.0:
                return _reject(r.replace(mask_area=0.0), "missing_mask", "given mask is empty")
            r = r.replace(mask_area=area)
        return r

    def derived(self, r: Record) -> Record:
        p = self.p
        try:
            original = _decode(self._read(r.parent_blob))
            forged_bytes = self._read(r.blob)
            forged = _decode(forged_bytes)
        except Exception as e:  # noqa: BLE001
            return _reject(r, "unreadable", f"{type(e).__name__}: {e}")
        if original.shape != forged.shape:
            return _reject(
                r, "size_mismatch",
                f"original is {original.shape[1]}x{original.shape[0]}, "
                f"forged is {forged.shape[1]}x{forged.shape[0]}",
            )
        why = is_degenerate(forged)
        if why:
            return _reject(r, "degenerate_output", why)
        d = derive_mask(original, forged, p, codec_of(original, forged_bytes, p.codec_twin))
        if r.precodec_blob and p.precodec:
            d = self.known_edit(r, original, d, forged, forged_bytes)
        del forged_bytes
        h, w = forged.shape[:2]
        rel_mask = _rel(self.out / "masks" / f"{r.key}.png", self.data)
        write_bytes(self.data / rel_mask, _encode_mask(d.mask))
        changes: dict[str, Any] = {
            "mask_blob": rel_mask,
            "mask_source": "full" if d.regenerated else "derived",
            "mask_area": d.area,
            "mask_quality": d.quality,
            "mask_iou_requested": None,
            "width": w,
            "height": h,
        }
        if p.keep_diff:
            rel_diff = _rel(self.out / "diff" / f"{r.key}.png", self.data)
            write_bytes(self.data / rel_diff, encode_gray(d.soft()))
            changes["diff_blob"] = rel_diff
        leak = None
        if r.requested_mask_blob:
            requested = decode_mask(self._read(r.requested_mask_blob))
            if requested.shape == d.mask.shape:
                changes["mask_iou_requested"] = iou(d.mask, requested)
                leak = leak_fraction(d.mask, requested, p.leak_margin)
            else:
                log.warning("masks: %s requested mask %s does not fit the image %s",
                            r.key, requested.shape, d.mask.shape)
        changes.update(mask_noise=float(d.noise), mask_threshold=float(d.threshold),
                       mask_changed=round(d.changed, 8), colour_shift=round(d.colour_shift, 2),
                       mask_leak=leak)
        r = r.replace(**changes)
        return self.filter(r, d, original, forged, leak)

    def known_edit(self, r: Record, original: np.ndarray, d: Derivation,
                   forged: np.ndarray | None = None, forged_bytes: bytes | None = None
                   ) -> Derivation:
        """`d`, or the mask of the pixels as made (`precodec_blob`) where they agree."""
        try:
            made = apply_patch(original, self._read(r.precodec_blob))
        except Exception as e:  # noqa: BLE001
            log.warning("masks: %s pixels before encoding unusable (%s: %s); the mask is the "
                        "file's", r.key, type(e).__name__, e)
            return d
        known, why = edit_as_made(original, made, d, self.p, forged, forged_bytes)
        if why:
            log.warning("masks: %s: %s; the mask is the file's", r.key, why)
        return known

    def filter(self, r: Record, d: Derivation, original: np.ndarray, forged: np.ndarray,
               leak: float | None) -> Record:
        """The quality filters; every reason text says what was measured."""
        p = self.p
        h, w = d.mask.shape
        n_mask = int(np.count_nonzero(d.mask))
        measured = (f"{d.changed_pixels} of {w}x{h} pixels changed by more than "
                    f"{d.threshold:.1f} levels ({d.codec} forgery, noise {d.noise:.1f})")
        if d.changed_pixels < p.min_changed_pixels:
            return _reject(r, "no_visible_change",
                           f"{measured}; a visible edit needs {p.min_changed_pixels}")
        if n_mask == 0:
            return _reject(r, "no_visible_change",
                           f"{measured}, scattered like codec noise: no region")
        if d.regenerated:
            outside = ("" if leak is None else
                       f"; {leak:.0%} of it outside the requested region")
            why = (f"the whole frame changed: {measured}, in {d.cover:.0%} of the tiles "
                   f"(full_cover {p.full_cover:.0%}){outside}")
            if leak is not None and leak > p.max_leak:
                return _reject(r, "edit_leaked", why)
            if p.regenerated == "reject":
                return _reject(r, "regenerated", why)
            return r
        if r.model_id:
            # a model's output blacked out by a safety checker, pasted back into the source
            region = forged[d.mask]
            if region.size and int(region.max()) == 0 and float(original[d.mask].mean()) > 16:
                return _reject(r, "degenerate_output", "edited region is all black")
        if n_mask < p.min_pixels:
            return _reject(r, "mask_too_small",
                           f"mask of {n_mask} pixels < min_pixels {p.min_pixels} ({measured})")
        if d.area > p.max_area:
            return _reject(r, "mask_too_large",
                           f"mask covers {d.area:.1%} of the image > max_area {p.max_area:.0%} "
                           f"({measured}, in {d.cover:.0%} of the tiles)")
        if leak is not None and leak > p.max_leak:
            return _reject(r, "edit_leaked",
                           f"{leak:.0%} of the mask lies outside the requested region grown by "
                           f"{max(1, round(p.leak_margin * min(h, w)))} pixels "
                           f"(max_leak {p.max_leak:.0%})")
        if d.quality < p.min_quality:
            return _reject(r, "low_quality", f"mask quality {d.quality:.2f} < {p.min_quality:.2f}")
        return r


@dataclass(frozen=True)
class _Factory:
    """Picklable: builds one worker per process."""

    p: MasksParams
    data_dir: str
    out: str

    def __call__(self) -> _Worker:
        return _Worker(self.p, self.data_dir, self.out)


def _windows(records, size: int):
    buf: list[Record] = []
    for r in records:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict:
    """Sets masks on every row of the synthesize manifest; writes `out/manifest.parquet`."""
    p: MasksParams = params.masks
    if "manifest" not in inputs:
        raise ValueError(f"masks: inputs must name 'manifest'; got {sorted(inputs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    factory = _Factory(p, str(params.data), str(out))
    batch = params.executor.batch_size
    reasons: Counter = Counter()
    sources: Counter = Counter()
    quality: list[float] = []
    ious: list[float] = []
    with ManifestWriter(out / "manifest.parquet") as writer:
        # one map call over the whole manifest (its workers are built once), read a window
        # of rows at a time
        chunks = (c for window in _windows(iter_records(inputs["manifest"]), _WINDOW_ROWS)
                  for c in chunked(window, batch))
        for chunk in executor.map(factory, chunks, Resources(cpus=1), desc="masks"):
            for r in chunk:
                writer.write(r)
                if r.stage == "masks" and r.status != "ok":
                    reasons[r.status] += 1
                if r.status == "ok":
                    sources[r.mask_source] += 1
                    if r.mask_source == "derived":
                        if r.mask_quality is not None:
                            quality.append(r.mask_quality)
                        if r.mask_iou_requested is not None:
                            ious.append(r.mask_iou_requested)
    metrics: dict[str, Any] = counts(iter_records(out / "manifest.parquet"))
    metrics["rejected"] = dict(sorted(reasons.items()))
    metrics["rejected_total"] = sum(reasons.values())
    metrics["mask_source"] = dict(sorted(sources.items()))
    metrics["derived_mask_quality_mean"] = float(np.mean(quality)) if quality else None
    metrics["derived_iou_requested_mean"] = float(np.mean(ious)) if ious else None
    log.info("masks: %d rows, %d rejected %s", metrics["total"], metrics["rejected_total"],
             metrics["rejected"])
    return metrics


STAGE = Stage(
    name="masks",
    help="derive masks by differencing and reject broken forgeries",
    params=MasksParams,
    run=run,
    reads=("synthesize", "ingest"),  # ingest: the originals the forgeries are compared with
    writes={"masks": "masks"},
)
