"""Text copy-move: a word of a scanned page is copied over another word of the same size.

The destination word is first erased (page background estimated around it), then the copied
word is pasted either as its whole box (background included: a visible seam, as careless
forgers leave) or as ink only (darken blend). The record keeps where the content came from.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range
from generators.document.text_replace import (
    OcrParams,
    box_mask,
    fill_background,
    find_words,
    limit_ocr_threads,
    pad_box,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextCopyMoveParams(OcrParams):
    height_tolerance: float = 0.3  # destination height within this fraction of the source's
    blends: tuple[Literal["box", "ink"], ...] = ("box", "ink")  # one is drawn per sample

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonempty("blends", self.blends)
        check_range("height_tolerance", self.height_tolerance, 0, 1, lo_open=True, hi_open=True)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (
        a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
    )


class TextCopyMove:
    name = "text_copy_move"
    domain = "document"
    operation = "copy_move"
    version = "1.0"
    Params = TextCopyMoveParams

    def __init__(self, params: TextCopyMoveParams | None = None):
        self.params = params or TextCopyMoveParams()

    def setup(self, device: str = "cpu") -> None:
        limit_ocr_threads()

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        img = source.image
        words, engine = find_words(img, p.ocr, p.min_conf, p.min_height)
        if len(words) < 2:
            raise SkipSample(f"fewer than two words found ({engine})")
        tol = float(p.height_tolerance)
        order = rng.permutation(len(words))
        for i in order:
            src = words[int(i)]
            sbox = pad_box(src.box, max(1, src.h // 8), img.shape)
            dests = [
                w
                for w in words
                if w is not src
                and abs(w.h - src.h) <= tol * src.h
                and not _overlaps(pad_box(w.box, max(1, w.h // 8), img.shape), sbox)
            ]
            if dests:
                break
        else:
            raise SkipSample(f"no two non-overlapping words of similar height ({engine})")
        # prefer a destination of about the same width: the copy then covers it, no more
        similar = [w for w in dests if abs(w.w - src.w) <= 0.25 * src.w]
        dests = similar or dests
        dst = dests[int(rng.integers(len(dests)))]
        H, W = img.shape[:2]
        # paste the source box with its bottom on the destination's bottom (the baseline,
        # give or take descenders) and its left edge on the destination's left edge
        sx, sy, sw, sh = sbox
        px = min(max(0, dst.x - (src.x - sx)), W - sw)
        py = min(max(0, dst.y + dst.h + (sy + sh - src.y - src.h) - sh), H - sh)
        ebox = pad_box(dst.box, max(1, dst.h // 8), img.shape)
        out = fill_background(img, ebox, rng)
        patch = img[sy : sy + sh, sx : sx + sw]
        blend = str(rng.choice(p.blends))
        region = out[py : py + sh, px : px + sw]
        if blend == "box":
            region[:] = patch
        else:  # ink only: keep whichever pixel is darker (dark ink on a light page)
            darker = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY) < cv2.cvtColor(
                region, cv2.COLOR_RGB2GRAY
            )
            region[darker] = patch[darker]
        mask = box_mask(ebox, img.shape) | box_mask((px, py, sw, sh), img.shape)
        return Forgery(
            image=out,
            mask=mask,
            params={
                **asdict(p),
                "ocr_used": engine,
                "blend": blend,
                "dest_box": list(ebox),
                "dest_xy": [px, py],
                "text": src.text,
                "replaced_text": dst.text,
            },
            source_region=[sx, sy, sw, sh],
        )
