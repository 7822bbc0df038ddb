"""What each branch of the model sees: native-resolution crops and tiles, and the resized views.

Forensic traces (resampling, JPEG grids, noise) are erased by resizing, so the segmentation
branch (SAM2) only ever sees pixels at the image's own resolution:

- training: one `crop` x `crop` window per sample, the mask cut from the same window; an
  image smaller than the crop is padded at the right and bottom (never upscaled) and the
  padding is excluded from the loss (`valid`);
- prediction: the image cut into a grid of `crop` x `crop` tiles at native resolution, the
  last row and column shifted back to end at the image border (overlapping their
  neighbours, so no tile holds padding unless the image is smaller than the crop); tile
  masks are pasted back in place and averaged where tiles overlap.

The language model (InternVL) sees two views per crop or tile, each resized to its vision
input size (`vlm_size`): a *global* view (the whole image, downscaled: the context) and a
*local* view (the crop or tile itself; native when `vlm_size == crop`, as in the tiny
preset, downscaled otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# InternVL and SAM2 both normalise with the ImageNet statistics
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class Window:
    """A crop or tile: top-left corner in the image and the part of it inside the image."""

    y: int
    x: int
    h: int  # rows of the window inside the image (the rest is padding)
    w: int


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """`size` x `size` RGB; area averaging when shrinking, bilinear when growing (views only)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    shrink = rgb.shape[0] >= size and rgb.shape[1] >= size
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def cut(a: np.ndarray, win: Window, size: int) -> np.ndarray:
    """The window of `a` (H x W or H x W x C) as a `size` x `size` array, zero-padded."""
    out = np.zeros((size, size, *a.shape[2:]), a.dtype)
    out[: win.h, : win.w] = a[win.y : win.y + win.h, win.x : win.x + win.w]
    return out


def valid_mask(win: Window, size: int) -> np.ndarray:
    v = np.zeros((size, size), bool)
    v[: win.h, : win.w] = True
    return v


def random_window(mask: np.ndarray, size: int, rng: np.random.Generator, focus: bool) -> Window:
    """A `size` window of an H x W image; with `focus`, one containing a random masked pixel."""
    h, w = mask.shape
    ch, cw = min(size, h), min(size, w)
    if focus and mask.any():
        ys, xs = np.nonzero(mask)
        i = int(rng.integers(len(ys)))
        py, px = int(ys[i]), int(xs[i])
        y = int(rng.integers(max(0, py - ch + 1), min(py, h - ch) + 1))
        x = int(rng.integers(max(0, px - cw + 1), min(px, w - cw) + 1))
    else:
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
    return Window(y, x, ch, cw)


def _starts(n: int, size: int) -> list[int]:
    if n <= size:
        return [0]
    starts = list(range(0, n - size + 1, size))
    if starts[-1] + size < n:
        starts.append(n - size)  # the last tile ends at the border, overlapping its neighbour
    return starts


def tiles(h: int, w: int, size: int) -> list[Window]:
    """`size` tiles covering an H x W image row by row; the last row and column end at the
    border, so only an image smaller than `size` gives padded tiles."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image of size {w}x{h} has no pixels")
    return [Window(y, x, min(size, h - y), min(size, w - x))
            for y in _starts(h, size) for x in _starts(w, size)]


def normalize(pixels, dtype=None):
    """uint8 N x 3 x H x W (torch) -> float, ImageNet-normalised."""
    import torch

    mean = torch.as_tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    out = (pixels.float() / 255.0 - mean) / std
    return out if dtype is None else out.to(dtype)


def chw(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
