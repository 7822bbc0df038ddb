"""Diffusion inpainting: an object-shaped region is regenerated from a prompt by a diffusers
inpainting pipeline (SD 1.5/2, SDXL, FLUX Fill, ...; the offline default is a tiny
random-weight SD pipeline).

The model runs on a square crop around the mask (`context` times the mask's extent) resized
to `size`, so the edited region gets the model's full resolution on any source size; the
result is resized back into the crop. Pixels outside the mask still change (the VAE round
trip, the resizes): the synthesize stage pastes the source back outside the dilated mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from generators import diffusion as D
from generators.base import Forgery, Source, check_nonempty, check_range


@dataclass(frozen=True)
class InpaintParams(D.DiffusionParams):
    # pipeline null: StableDiffusionInpaintPipeline; or AutoPipelineForInpainting,
    # StableDiffusionXLInpaintPipeline, FluxFillPipeline, ... with a matching `model`
    prompts: tuple[str, ...] = (
        "a cat",
        "a dog",
        "a potted plant",
        "a red car",
        "a wooden chair",
        "a stone wall",
        "green grass",
        "a person walking",
        "a bird",
        "a pile of books",
        "an empty background",
        "a window",
        "a bicycle",
        "a lamp",
        "flowers",
    )
    strength: float = 1.0  # 1.0 ignores the masked content; lower keeps some of it
    min_frac: float = 0.02  # mask area as a fraction of the image, lower bound
    max_frac: float = 0.12  # and upper bound
    shape: Literal["ellipse", "polygon", "random"] = "random"  # object-like, never a rectangle
    context: float = 2.0  # crop side / mask extent

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonempty("prompts", self.prompts)
        check_range("min_frac", self.min_frac, 0, 1, lo_open=True, hi_open=True)
        check_range("max_frac", self.max_frac, self.min_frac, 1, hi_open=True)
        check_range("strength", self.strength, 0, 1, lo_open=True)
        check_range("context", self.context, 1)


class DiffusersInpaint(D.DiffusionGenerator):
    name = "inpaint"
    domain = "natural"
    operation = "inpaint"
    version = "1.0"
    Params = InpaintParams

    def __init__(self, params: InpaintParams | None = None):
        self.params = params or InpaintParams()
        self.diffusion = D.Diffusion("inpaint", self.params)

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """One pipeline call per work size (one call when `size` is set: all crops are square)."""
        p = self.params
        masks, prompts, windows = [], [], []
        for src, rng in zip(sources, rngs, strict=True):
            h, w = src.image.shape[:2]
            mask = D.object_mask(h, w, rng, p.min_frac, p.max_frac, p.shape)
            prompts.append(p.prompts[int(rng.integers(0, len(p.prompts)))])
            windows.append(D.square_window(mask, p.context))
            masks.append(mask)
        edited = self.diffusion.inpaint_windows(
            [s.image for s in sources],
            [s.seed for s in sources],
            windows,
            masks,
            prompts,
            strength=p.strength,
        )
        return [
            self.diffusion.forgery(
                image=image,
                mask=mask,
                params={
                    "prompt": prompt,
                    "negative_prompt": p.negative_prompt,
                    "strength": p.strength,
                    **self.diffusion.provenance(),
                    "work_size": list(work),
                    "window": list(window),  # [x, y, side] of the crop the model saw
                    "min_frac": p.min_frac,
                    "max_frac": p.max_frac,
                    "shape": p.shape,
                    "context": p.context,
                },
            )
            for (image, work), mask, prompt, window in zip(edited, masks, prompts, windows)
        ]
