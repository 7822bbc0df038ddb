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

from typing import Any

import cv2
import numpy as np
from PIL import Image

from generators import diffusion as D
from generators.base import Forgery, SkipSample, Source, check_params

DEFAULTS: dict[str, Any] = {
    **D.COMMON_DEFAULTS,
    "pipeline": None,  # null: StableDiffusionInstructPix2PixPipeline
    "instructions": [
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
    ],
    "negative_prompt": None,
    "image_guidance_scale": 1.5,  # how closely the output follows the input image
    "diff_threshold": 24,  # 0..255, on the 5x5-blurred max-channel absolute difference
    "morph_radius": 2,  # px at work resolution: open/close to drop speckle and fill holes
}


class InstructEdit:
    name = "edit"
    domain = "natural"
    operation = "edit"
    version = "1.0"
    task = "instruct_pix2pix"

    def __init__(self, **params: Any):
        self.params = check_params(self.name, params, DEFAULTS)
        p = self.params
        D.validate_common(self.name, p)
        if not p["instructions"] or not all(isinstance(s, str) for s in p["instructions"]):
            raise ValueError(
                f"edit: instructions {p['instructions']!r}; allowed: a non-empty list of strings"
            )
        if not 0 <= p["diff_threshold"] < 255:
            raise ValueError(f"edit: diff_threshold {p['diff_threshold']!r}; allowed: 0..254")
        if not isinstance(p["morph_radius"], int) or p["morph_radius"] < 0:
            raise ValueError(f"edit: morph_radius {p['morph_radius']!r}; allowed: an integer >= 0")
        if p["image_guidance_scale"] < 0:
            raise ValueError(
                f"edit: image_guidance_scale {p['image_guidance_scale']!r}; allowed: >= 0"
            )
        self._loaded: D.Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "_loaded": None}

    def resources(self, device: str) -> dict[str, float]:
        return D.resources(device)

    def setup(self, device: str = "cpu") -> None:
        if self._loaded is None or self._loaded.device != str(device):
            self._loaded = D.load_pipeline(self.task, self.params, device)

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        return self.generate_batch([source], [rng])[0]

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """One pipeline call per work size (aspect ratio kept); raises SkipSample naming the
        key when an edit changed nothing visible (the stage then retries one by one)."""
        if len(sources) != len(rngs):
            raise ValueError(f"edit: {len(sources)} sources but {len(rngs)} rngs")
        if self._loaded is None:
            self.setup("cpu")
        p = self.params
        prompts = [p["instructions"][int(r.integers(0, len(p["instructions"])))] for r in rngs]
        works = [D.work_size(*s.image.shape[:2], p["size"]) for s in sources]
        inputs = [D.resize(s.image, *wh) for s, wh in zip(sources, works)]
        outputs: list[np.ndarray | None] = [None] * len(sources)
        for wh in dict.fromkeys(works):
            idx = [i for i, x in enumerate(works) if x == wh]
            outs = D.call_pipeline(
                self._loaded,
                [sources[i].seed for i in idx],
                prompt=[prompts[i] for i in idx],
                negative_prompt=[p["negative_prompt"]] * len(idx) if p["negative_prompt"] else None,
                image=[Image.fromarray(inputs[i]) for i in idx],
                height=wh[0],
                width=wh[1],
                num_inference_steps=p["num_inference_steps"],
                guidance_scale=p["guidance_scale"],
                image_guidance_scale=p["image_guidance_scale"],
            )
            for i, out in zip(idx, outs):
                outputs[i] = out
        forgeries = []
        for src, prompt, wh, inp, out in zip(sources, prompts, works, inputs, outputs):
            h, w = src.image.shape[:2]
            small = self._diff_mask(inp, out)
            if not small.any():
                e = SkipSample(f"edit: {prompt!r} made no visible change to {src.key}")
                e.key = src.key  # type: ignore[attr-defined]
                raise e
            mask = cv2.resize(small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            forgeries.append(
                Forgery(
                    image=D.resize(out, h, w),
                    mask=mask,
                    local=True,
                    label="tampered",
                    mask_known=False,
                    params={
                        "prompt": prompt,
                        "negative_prompt": p["negative_prompt"],
                        "steps": p["num_inference_steps"],
                        "guidance": p["guidance_scale"],
                        "image_guidance": p["image_guidance_scale"],
                        "pipeline": self._loaded.pipeline_class,
                        "dtype": self._loaded.dtype,
                        "device": self._loaded.device,
                        "work_size": list(wh),
                        "diff_threshold": p["diff_threshold"],
                        "morph_radius": p["morph_radius"],
                    },
                    model_id=self._loaded.model_id,
                    model_revision=self._loaded.model_revision,
                )
            )
        return forgeries

    def _diff_mask(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        diff = np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=2).astype(np.uint8)
        diff = cv2.blur(diff, (5, 5))
        mask = (diff > self.params["diff_threshold"]).astype(np.uint8)
        r = self.params["morph_radius"]
        if r > 0:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k)
        return mask > 0
