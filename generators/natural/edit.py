"""Instruction editing (InstructPix2Pix through diffusers): the whole image is edited from a
text instruction ("make it winter"), so there is no requested mask.

The generator returns `mask_known = False` and, as its mask, the pixels that differ between
the model's input and output at the work resolution (blurred absolute difference above
`diff_threshold`, cleaned by a morphological open/close, upscaled to the source). Comparing
at the work resolution keeps resize blur out of the difference. The masks stage derives the
shipped mask by differencing the encoded forgery against its source; the synthesize stage
pastes the source back outside the dilated difference mask, so unedited areas stay pristine.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from generators import diffusion as D
from generators.base import Forgery, SkipSample, Source, check_nonempty, check_range


@dataclass(frozen=True)
class EditParams(D.DiffusionParams):
    # pipeline null: StableDiffusionInstructPix2PixPipeline
    instructions: tuple[str, ...] = (
        "make it winter",
        "turn the sky into a sunset",
        "make it look like night",
        "add snow on the ground",
        "turn it into autumn",
        "make the colours warmer",
        "add fog",
        "make it rainy",
        "turn the grass yellow",
        "add a rainbow",
    )
    image_guidance_scale: float = 1.5  # how closely the output follows the input image
    diff_threshold: int = 24  # 0..254, on the 5x5-blurred max-channel absolute difference
    morph_radius: int = 2  # px at work resolution: open/close to drop speckle and fill holes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonempty("instructions", self.instructions)
        check_range("diff_threshold", self.diff_threshold, 0, 255, hi_open=True)
        check_range("morph_radius", self.morph_radius, 0)
        check_range("image_guidance_scale", self.image_guidance_scale, 0)


class InstructEdit(D.DiffusionGenerator):
    name = "edit"
    domain = "natural"
    operation = "edit"
    version = "1.0"
    Params = EditParams

    def __init__(self, params: EditParams | None = None):
        self.params = params or EditParams()
        self.diffusion = D.Diffusion("instruct_pix2pix", self.params)

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """One pipeline call per work size (aspect ratio kept); raises SkipSample when an edit
        changed nothing visible (the stage then retries one by one)."""
        p = self.params
        calls, prompts = [], []
        for src, rng in zip(sources, rngs, strict=True):
            prompts.append(p.instructions[int(rng.integers(0, len(p.instructions)))])
            work = D.work_size(*src.image.shape[:2], p.size)
            calls.append(D.Call(src.seed, work, prompts[-1], D.resize(src.image, *work)))
        outputs = self.diffusion.run(calls, image_guidance_scale=p.image_guidance_scale)
        forgeries = []
        for src, prompt, call, out in zip(sources, prompts, calls, outputs):
            h, w = src.image.shape[:2]
            small = self._diff_mask(call.image, out)
            if not small.any():
                raise SkipSample(f"edit: {prompt!r} made no visible change to {src.key}")
            mask = cv2.resize(small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            forgeries.append(
                self.diffusion.forgery(
                    image=D.resize(out, h, w),
                    mask=mask,
                    mask_known=False,
                    params={
                        "prompt": prompt,
                        "negative_prompt": p.negative_prompt,
                        "image_guidance": p.image_guidance_scale,
                        **self.diffusion.provenance(),
                        "work_size": list(call.work),
                        "diff_threshold": p.diff_threshold,
                        "morph_radius": p.morph_radius,
                    },
                )
            )
        return forgeries

    def _diff_mask(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        diff = np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=2).astype(np.uint8)
        diff = cv2.blur(diff, (5, 5))
        mask = (diff > self.params.diff_threshold).astype(np.uint8)
        r = self.params.morph_radius
        if r > 0:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k)
        return mask > 0
