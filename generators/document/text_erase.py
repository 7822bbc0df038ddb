"""Text erase: a run of words on one line of a scanned page is blanked out.

Word boxes come from OCR (see `text_replace.find_words`); the run's box is filled with the
page background estimated around it (fitted illumination plane plus matched noise), the way
a forger whites out a clause or an amount.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from generators.base import Forgery, SkipSample, Source, check_params
from generators.document.text_replace import (
    box_mask,
    check_document_params,
    fill_background,
    find_words,
    limit_ocr_threads,
    pad_box,
)

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "ocr": "auto",  # auto (tesseract when installed, else opencv) | tesseract | opencv
    "min_conf": 60.0,  # tesseract confidence a word needs to be erased
    "min_height": 8,  # px; smaller words are left alone
    "max_words": 3,  # a run of 1..max_words consecutive words on one line is erased
}


class TextErase:
    name = "text_erase"
    domain = "document"
    operation = "text_erase"
    version = "1.0"

    def __init__(self, **params: Any):
        self.params = check_params(self.name, params, DEFAULTS)
        check_document_params(self.name, self.params)
        if int(self.params["max_words"]) < 1:
            raise ValueError(f"text_erase: max_words {self.params['max_words']!r} must be >= 1")

    def setup(self, device: str = "cpu") -> None:
        limit_ocr_threads()

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        p = self.params
        img = source.image
        words, engine = find_words(img, p["ocr"], p["min_conf"], p["min_height"])
        if not words:
            raise SkipSample(f"no words found ({engine})")
        i = int(rng.integers(len(words)))
        n = int(rng.integers(1, int(p["max_words"]) + 1))
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
                **p,
                "ocr_used": engine,
                "box": list(box),
                "words": len(run),
                "erased_text": " ".join(w.text for w in run if w.text) or None,
            },
        )
