"""Text erase: a run of words on one line of a scanned page is blanked out.

Word boxes come from OCR (see `text_replace.find_words`); the run's box is filled with the
page background estimated around it (fitted illumination plane plus matched noise), the way
a forger whites out a clause or an amount.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from generators.base import Forgery, SkipSample, Source, check_range
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
class TextEraseParams(OcrParams):
    max_words: int = 3  # a run of 1..max_words consecutive words on one line is erased

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("max_words", self.max_words, 1)


class TextErase:
    name = "text_erase"
    domain = "document"
    operation = "text_erase"
    version = "1.0"
    Params = TextEraseParams

    def __init__(self, params: TextEraseParams | None = None):
        self.params = params or TextEraseParams()

    def setup(self, device: str = "cpu") -> None:
        limit_ocr_threads()

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        img = source.image
        words, engine = find_words(img, p.ocr, p.min_conf, p.min_height)
        if not words:
            raise SkipSample(f"no words found ({engine})")
        i = int(rng.integers(len(words)))
        n = int(rng.integers(1, p.max_words + 1))
        run = [w for w in words[i : i + n] if w.line == words[i].line]
        x0 = min(w.x for w in run)
        y0 = min(w.y for w in run)
        x1 = max(w.x + w.w for w in run)
        y1 = max(w.y + w.h for w in run)
        h = y1 - y0
        box = pad_box((x0, y0, x1 - x0, h), max(1, h // 8), img.shape)
        out = fill_background(img, box, rng)
        return Forgery(
            image=out,
            mask=box_mask(box, img.shape),
            params={
                **asdict(p),
                "ocr_used": engine,
                "box": list(box),
                "words": len(run),
                "erased_text": " ".join(w.text for w in run if w.text) or None,
            },
        )
