"""Image bytes in and out: decode any stored image to RGB pixels, encode a forgery like its
source (container, mode, compression settings, metadata: `encode_like`), read and write 0/255
masks. Real images are never re-encoded; only forgeries and masks pass through `encode_like`
and `encode_mask`."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin

# extension we ship for each PIL format; anything else is shipped as PNG when re-encoded
FORMAT_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "TIFF": "tif",
    "BMP": "bmp",
    "GIF": "gif",
    "MPO": "jpg",
    "PPM": "ppm",
}
EXT_FORMAT = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "bmp": "BMP",
    "gif": "GIF",
    "ppm": "PPM",
}


def to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of a PIL image, as stored (no EXIF transpose), for any mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        scale = 65535.0 if hi > 255 else 255.0
        a = np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    return decode(Path(path).read_bytes())


@dataclass
class Encoded:
    """A forgery's bytes and how they reproduce the source's container."""

    data: bytes
    ext: str  # file extension we ship: jpg, png, webp, bmp, gif, tif, ...
    mode: str  # PIL mode of the encoded image
    notes: dict[str, Any] = field(default_factory=dict)  # what was kept; `unmatched`: why not
    # the RGB pixels the file holds before its codec (in its mode: grey, palette, alpha as
    # `decode` shows them); where `decode(data)` differs, the codec is lossy
    made: np.ndarray | None = field(default=None, repr=False)


# zlib FLEVEL (bits 6-7 of a PNG's first IDAT's second byte) -> a compression level writing it
_ZLIB_LEVELS = {0: 1, 1: 3, 2: 6, 3: 9}
# the 16 code-length counts of libjpeg's standard Huffman tables (DC/AC, luma/chroma)
_STD_HUFFMAN_COUNTS = {
    bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]),
    bytes([0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
    bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]),
    bytes([0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77]),
}
_SAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
# TIFF compressions Pillow's writer takes (reading knows more)
_TIFF_WRITES = {
    "raw",
    "tiff_deflate",
    "tiff_adobe_deflate",
    "tiff_lzw",
    "packbits",
    "jpeg",
    "group3",
    "group4",
    "webp",
}


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG marker segment before the first scan."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        yield marker, i, end
        if marker == 0xDA:  # start of scan: the header is over
            return
        i = end


def _jpeg_optimized(data: bytes) -> bool:
    """True when a Huffman table is not one of libjpeg's standard ones (an optimising
    encoder): the forgery then gets optimised tables too (Pillow `optimize=True`)."""
    for marker, start, end in _jpeg_segments(data):
        if marker != 0xC4:
            continue
        i = start + 4
        while i + 17 <= end:
            counts = data[i + 1 : i + 17]
            if counts not in _STD_HUFFMAN_COUNTS:
                return True
            i += 17 + sum(counts)
    return False


def _drop_jfif(data: bytes) -> bytes:
    """The JPEG without its JFIF APP0 segment (Pillow always writes one; cameras do not)."""
    for marker, start, end in _jpeg_segments(data):
        if marker == 0xE0 and data[start + 4 : start + 9] == b"JFIF\0":
            return data[:start] + data[end:]
    return data


def _png_level(data: bytes) -> int | None:
    """The zlib compression level class of a PNG's first IDAT, as a level that writes it."""
    i = 8
    while i + 12 <= len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        if data[i + 4 : i + 8] == b"IDAT" and n >= 2:
            return _ZLIB_LEVELS[data[i + 9] >> 6]
        i += 12 + n
    return None


def _webp_lossless(data: bytes) -> bool:
    """True when a WebP holds a lossless (VP8L) bitstream."""
    i = 12
    while i + 8 <= len(data):
        kind, n = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
        if kind == b"VP8L":
            return True
        if kind == b"VP8 ":
            return False
        i += 8 + n + (n & 1)
    return False


@lru_cache(maxsize=64)
def _webp_quality(source: bytes) -> int:
    """A lossy WebP's quality, estimated: the quality at which Pillow re-encodes the decoded
    source to the nearest file size (WebP stores no quality setting)."""
    with Image.open(io.BytesIO(source)) as img:
        img.load()
        target = len(source)

        def size(q: int) -> int:
            buf = io.BytesIO()
            img.save(buf, "WEBP", quality=q)
            return len(buf.getvalue())

        lo, hi = 0, 100
        while hi - lo > 1:  # sizes grow with quality
            mid = (lo + hi) // 2
            if size(mid) < target:
                lo = mid
            else:
                hi = mid
        return min((lo, hi), key=lambda q: abs(size(q) - target))


def _in_mode(
    forged: np.ndarray, src: Image.Image, base: np.ndarray | None, notes: dict
) -> Image.Image:
    """The forged RGB pixels in the source's mode (alpha, palette, grey, CMYK, 16-bit kept).

    With `base` (the source's decoded RGB, same size), pixels the forgery did not change keep
    their stored values exactly: alpha, palette indices, 16-bit levels, CMYK ink.
    """
    mode = src.mode
    rgb = Image.fromarray(np.ascontiguousarray(forged, dtype=np.uint8))
    same = base is not None and base.shape == forged.shape
    if mode == "RGB":
        return rgb
    if mode in ("L", "CMYK", "YCbCr", "LAB", "HSV"):
        out = rgb.convert(mode)
    elif mode == "1":
        out = rgb.convert("L").point(lambda v: 255 if v > 127 else 0).convert("1")
    elif mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = src.getchannel("A") if same else Image.new("L", rgb.size, 255)
        if not same:
            notes["alpha"] = "opaque: the generated image has no alpha of its own"
        out = rgb.convert(mode.replace("a", "A")[:-1] or "L")
        out = Image.merge(mode, (*out.split(), alpha))
    elif mode in ("P", "PA"):
        try:
            out = rgb.quantize(palette=src, dither=Image.Dither.NONE)
        except ValueError as e:
            notes.setdefault("unmatched", []).append(f"palette: {e}; encoded as RGB")
            return rgb
        if "transparency" in src.info:
            out.info["transparency"] = src.info["transparency"]
    elif mode.startswith("I"):
        grey = np.asarray(rgb.convert("L"), np.uint32)
        scale = 257 if np.asarray(src).max(initial=0) > 255 else 1
        dtype = np.uint16 if mode.startswith("I;16") else np.int32
        out = Image.fromarray((grey * scale).astype(dtype))
        if out.mode != mode:
            out = out.convert(mode)
    else:  # F and rarer modes: write RGB and say so
        notes.setdefault("unmatched", []).append(f"mode {mode}: encoded as RGB")
        return rgb
    if not same:
        return out
    changed = (forged != base).any(axis=2)
    if mode.startswith("I"):  # paste() ignores masks on 16/32-bit images
        return Image.fromarray(np.where(changed, np.asarray(out), np.asarray(src)))
    kept = src.copy()
    kept.info = {}
    if changed.any():
        kept.paste(out, (0, 0), Image.fromarray(changed.astype(np.uint8) * 255))
    return kept


def _jpeg_kwargs(src: Image.Image, source: bytes, notes: dict) -> dict[str, Any]:
    info = src.info
    kw: dict[str, Any] = {"format": "JPEG"}
    quant = getattr(src, "quantization", None)
    if quant:
        kw["qtables"] = [quant[k] for k in sorted(quant)]
        notes["qtables"] = "source"
    sampling = JpegImagePlugin.get_sampling(src)
    if sampling in _SAMPLING_NAMES:
        kw["subsampling"] = sampling
        notes["subsampling"] = _SAMPLING_NAMES[sampling]
    elif src.layers == 3:
        notes.setdefault("unmatched", []).append(
            "subsampling: the source's is not one Pillow writes; libjpeg's 4:2:0 used"
        )
    if info.get("progressive") or info.get("progression"):
        kw["progressive"] = True
    notes["progressive"] = bool(kw.get("progressive"))
    if _jpeg_optimized(source):
        kw["optimize"] = True
    notes["optimized_huffman"] = bool(kw.get("optimize") or kw.get("progressive"))
    if info.get("adobe_transform") == 0 and src.mode == "RGB":
        kw["keep_rgb"] = True
    for key in ("exif", "icc_profile", "dpi", "comment"):
        if info.get(key):
            kw[key] = info[key]
    notes["exif"], notes["icc"] = bool(info.get("exif")), bool(info.get("icc_profile"))
    return kw


def _png_kwargs(src: Image.Image, source: bytes, notes: dict) -> dict[str, Any]:
    info = src.info
    level = _png_level(source)
    kw: dict[str, Any] = {
        "format": "PNG",
        "optimize": False,
        "compress_level": 6 if level is None else level,
    }
    for key in ("icc_profile", "dpi", "exif", "transparency"):
        if info.get(key) is not None:
            kw[key] = info[key]
    chunks = PngImagePlugin.PngInfo()
    for k, v in getattr(src, "text", {}).items():
        chunks.add_text(k, v)
    if info.get("gamma"):
        chunks.add(b"gAMA", round(float(info["gamma"]) * 100000).to_bytes(4, "big"))
    if info.get("srgb") is not None:
        chunks.add(b"sRGB", bytes([int(info["srgb"])]))
    kw["pnginfo"] = chunks
    if info.get("interlace"):
        notes.setdefault("unmatched", []).append("interlace: Pillow writes non-interlaced PNG")
    notes["exif"], notes["icc"] = bool(info.get("exif")), bool(info.get("icc_profile"))
    return kw


def _webp_kwargs(src: Image.Image, source: bytes, notes: dict) -> dict[str, Any]:
    kw: dict[str, Any] = {"format": "WEBP"}
    if _webp_lossless(source):
        kw.update(lossless=True, exact=True)
        notes["webp"] = "lossless"
    else:
        kw["quality"] = _webp_quality(source)
        notes["webp"] = "lossy"
        notes["webp_quality"] = kw["quality"]  # estimated by matching the file size
    for key in ("exif", "icc_profile", "xmp"):
        if src.info.get(key):
            kw[key] = src.info[key]
    notes["exif"], notes["icc"] = bool(src.info.get("exif")), bool(src.info.get("icc_profile"))
    return kw


def _gif_kwargs(src: Image.Image, source: bytes, notes: dict) -> dict[str, Any]:
    kw: dict[str, Any] = {"format": "GIF", "optimize": False}  # interlace: set by encode_like
    for key in ("transparency", "background", "comment"):
        if src.info.get(key) is not None:
            kw[key] = src.info[key]
    return kw


def _tiff_kwargs(src: Image.Image, source: bytes, notes: dict) -> dict[str, Any]:
    compression = src.info.get("compression", "raw")
    if compression not in _TIFF_WRITES:
        notes.setdefault("unmatched", []).append(
            f"compression {compression}: Pillow cannot write it; tiff_deflate used"
        )
        compression = "tiff_deflate"
    kw: dict[str, Any] = {"format": "TIFF", "compression": compression}
    for key in ("dpi", "icc_profile"):
        if src.info.get(key):
            kw[key] = src.info[key]
    return kw


def _bmp_kwargs(src: Image.Image, source: bytes, notes: dict) -> dict[str, Any]:
    if src.info.get("compression") in (1, 2):  # BI_RLE8, BI_RLE4
        notes.setdefault("unmatched", []).append("RLE compression: Pillow writes uncompressed BMP")
    kw: dict[str, Any] = {"format": "BMP"}
    if src.info.get("dpi"):
        kw["dpi"] = src.info["dpi"]
    return kw


_KWARGS = {
    "JPEG": _jpeg_kwargs,
    "MPO": _jpeg_kwargs,
    "PNG": _png_kwargs,
    "WEBP": _webp_kwargs,
    "GIF": _gif_kwargs,
    "TIFF": _tiff_kwargs,
    "BMP": _bmp_kwargs,
}


def encode_like(image: np.ndarray, source: bytes, base: np.ndarray | None = None) -> Encoded:
    """Encodes forged RGB pixels the way the `source` file is encoded, so that nothing in the
    file but the forged pixels tells it from its source.

    Same container, mode (alpha, palette, grey, CMYK, 16-bit) and metadata: JPEG with the
    source's quantisation tables, chroma subsampling, progressive and Huffman-optimisation
    flags, EXIF, ICC, density and comment (and no JFIF header where the source has none);
    PNG at the source's zlib level class with its ICC, EXIF, text, gamma and transparency;
    WebP lossless stays lossless, lossy stays lossy at an estimated quality; GIF, BMP, TIFF
    (same compression), PPM in their own format. With `base`, the source's decoded RGB at the
    same size (a local edit), unchanged pixels keep their stored values. What cannot be
    reproduced is listed in `notes["unmatched"]`; a container Pillow cannot write becomes PNG.
    """
    notes: dict[str, Any] = {}
    with Image.open(io.BytesIO(source)) as src:
        fmt = src.format or "PNG"
        frames = getattr(src, "n_frames", 1)
        interlace = src.tile[0].args[1] if fmt == "GIF" and src.tile else None  # gone after load
        # pixels are read only where the mode needs them (alpha, palette, stored values)
        if frames > 1:
            notes.setdefault("unmatched", []).append(
                f"{frames} frames: the forgery is the first frame only"
            )
        img = _in_mode(image, src, base, notes)
        kw = _KWARGS.get(fmt, lambda *a: {"format": fmt})(src, source, notes)
        has_jfif = "jfif" in src.info
    if interlace is not None:
        kw["interlace"] = int(bool(interlace))
    save_fmt = kw.pop("format")
    if save_fmt == "JPEG" and img.mode not in ("L", "RGB", "CMYK"):
        notes.setdefault("unmatched", []).append(f"mode {img.mode}: JPEG holds RGB")
        img = img.convert("RGB")
    buf = io.BytesIO()
    try:
        img.save(buf, save_fmt, **kw)
        ext = FORMAT_EXT.get(fmt, fmt.lower())
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.setdefault("unmatched", []).append(
            f"container {fmt}/{img.mode}: Pillow cannot write it ({e}); encoded as PNG"
        )
        buf = io.BytesIO()
        if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        img.save(buf, "PNG", compress_level=6)
        ext = "png"
    data = buf.getvalue()
    if save_fmt == "JPEG" and ext == "jpg" and not has_jfif:
        data = _drop_jfif(data)
    notes["container"], notes["mode"] = ext, img.mode
    return Encoded(data, ext, img.mode, notes, to_rgb(img))


def encode_png(image: np.ndarray) -> bytes:
    """Plain RGB PNG (`synthesize.match_source_format: false`)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        buf, "PNG", compress_level=6
    )
    return buf.getvalue()


def encode_gray(a: np.ndarray) -> bytes:
    """A single-channel 8-bit PNG (difference maps)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """A single-channel PNG with values 0 and 255 only."""
    return encode_gray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))


def encode_patch(base: np.ndarray, image: np.ndarray, max_share: float = 1.0) -> bytes | None:
    """`image` (H x W x 3 uint8) where it differs from `base` (same shape): an RGB PNG of the
    box around every differing pixel, its place in a text chunk (`box`: x y w h H W). None
    when nothing differs, or when more than `max_share` of the pixels differ.
    `apply_patch(base, patch)` gives `image` back, bit for bit."""
    import cv2

    if image.shape != base.shape:
        raise ValueError(f"patch of {image.shape} over a base of {base.shape}")
    changed = cv2.absdiff(np.ascontiguousarray(image), np.ascontiguousarray(base)).max(axis=2)
    if cv2.countNonZero(changed) > max_share * changed.size:
        return None
    x, y, w, h = cv2.boundingRect(changed)
    if not w or not h:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text("box", f"{x} {y} {w} {h} {base.shape[1]} {base.shape[0]}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[y : y + h, x : x + w], dtype=np.uint8), "RGB").save(
        buf, "PNG", compress_level=1, pnginfo=info
    )
    return buf.getvalue()


def apply_patch(base: np.ndarray, patch: bytes) -> np.ndarray:
    """A copy of `base` with the `encode_patch` bytes `patch` pasted at their box; a patch
    made for another image size, or whose box does not fit, raises ValueError."""
    with Image.open(io.BytesIO(patch)) as im:
        im.load()
        box = im.info.get("box")
        pixels = np.asarray(im.convert("RGB"))
    try:
        x, y, w, h, full_w, full_h = (int(v) for v in str(box).split())
    except ValueError:
        raise ValueError(f"patch without a valid box: {box!r}") from None
    if (full_h, full_w) != base.shape[:2]:
        raise ValueError(
            f"patch made for {full_w}x{full_h}, image is {base.shape[1]}x{base.shape[0]}"
        )
    if pixels.shape[:2] != (h, w) or x < 0 or y < 0 or x + w > full_w or y + h > full_h:
        raise ValueError(
            f"patch of {pixels.shape[1]}x{pixels.shape[0]} does not fit box {box!r}"
        )
    out = base.copy()
    out[y : y + h, x : x + w] = pixels
    return out


def tag_orientation(png: bytes, orientation: int | None) -> bytes:
    """The mask PNG `png` carrying EXIF orientation `orientation` (an eXIf chunk), so that
    readers which apply EXIF orientation (PIL `exif_transpose`, Hugging Face `datasets`,
    `cv2.imread`) rotate a mask exactly as they rotate its image, and raw readers rotate
    neither. Orientation 1 or none: the bytes unchanged."""
    if not orientation or orientation == 1:
        return png
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        exif = Image.Exif()
        exif[0x0112] = int(orientation)
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=6, exif=exif.tobytes())
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Bool H x W from any mask image (nonzero in any channel is inside)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        a = np.asarray(img.convert("L")) if img.mode not in ("1", "L") else np.asarray(img)
    return a > 127 if a.dtype == np.uint8 else a > 0


def read_mask(path: str | os.PathLike) -> np.ndarray:
    return decode_mask(Path(path).read_bytes())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomic write: a killed run never leaves a half-written file under the final name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def paste_back(
    original: np.ndarray, forged: np.ndarray, mask: np.ndarray, dilate: int
) -> np.ndarray:
    """Source pixels everywhere outside `mask` dilated by `dilate` px (diffusers' VAE changes
    unmasked pixels too); returns the composited image."""
    import cv2

    keep = np.asarray(mask, bool)
    if dilate > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1))
        keep = cv2.dilate(keep.astype(np.uint8), k) > 0
    out = original.copy()
    out[keep] = forged[keep]
    return out
