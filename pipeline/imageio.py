"""Image bytes in and out: decode any stored image to RGB pixels, encode a forgery like its
source, read and write 0/255 masks. Real images are never re-encoded; only forgeries and
masks pass through `encode_like` and `encode_mask`."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

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
EXT_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF",
              "tiff": "TIFF", "bmp": "BMP", "gif": "GIF", "ppm": "PPM"}


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


def encode_like(image: np.ndarray, fmt: str, quality: int | None = None) -> tuple[bytes, str]:
    """Encodes forged pixels in the source's container: returns (bytes, extension).

    A JPEG source gives a JPEG at `quality` (the source's estimate); lossless formats stay
    lossless. Formats PIL cannot write back sensibly become PNG.
    """
    ext = fmt.lower().lstrip(".")
    pil_fmt = EXT_FORMAT.get(ext, "PNG")
    if pil_fmt in ("GIF", "PPM", "BMP"):
        pil_fmt, ext = "PNG", "png"
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    if pil_fmt == "JPEG":
        q = int(quality) if quality else 95
        img.save(buf, "JPEG", quality=max(1, min(q, 100)), subsampling=0 if q >= 90 else 2)
        ext = "jpg"
    elif pil_fmt == "WEBP":
        if quality:
            img.save(buf, "WEBP", quality=int(quality))
        else:
            img.save(buf, "WEBP", lossless=True)
    elif pil_fmt == "TIFF":
        img.save(buf, "TIFF", compression="tiff_deflate")
        ext = "tif"
    else:
        img.save(buf, "PNG", optimize=False, compress_level=6)
        ext = "png"
    return buf.getvalue(), ext


def encode_gray(a: np.ndarray) -> bytes:
    """A single-channel 8-bit PNG (difference maps)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """A single-channel PNG with values 0 and 255 only."""
    return encode_gray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))


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


def paste_back(original: np.ndarray, forged: np.ndarray, mask: np.ndarray, dilate: int) -> np.ndarray:
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
