"""Diffusion inpainting: an object-shaped region is regenerated from a prompt by a diffusers
inpainting pipeline (SD 1.5/2, SDXL, FLUX Fill, ...; the offline default is a tiny
random-weight SD pipeline).

The model runs on a square crop around the mask (`context` times the mask's extent) resized
to `size`, so the edited region gets the model's full resolution on any source size; the
result is resized back into the crop. Pixels outside the mask still change (the VAE round
trip, the resizes): the synthesize stage pastes the source back outside the dilated mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from generators import diffusion as D
from generators.base import Forgery, Source, check_params

DEFAULTS: dict[str, Any] = {
    **D.COMMON_DEFAULTS,
    "pipeline": None,  # null: StableDiffusionInpaintPipeline; or AutoPipelineForInpainting,
    # StableDiffusionXLInpaintPipeline, FluxFillPipeline, ... with a matching `model`
    "prompts": [
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
    ],
    "negative_prompt": None,
    "strength": 1.0,  # 1.0 ignores the masked content; lower keeps some of it
    "min_frac": 0.02,  # mask area as a fraction of the image, lower bound
    "max_frac": 0.12,  # and upper bound
    "shape": "random",  # ellipse | polygon | random: object-like, never a plain rectangle
    "context": 2.0,  # crop side / mask extent
}


class DiffusersInpaint:
    name = "inpaint"
    domain = "natural"
    operation = "inpaint"
    version = "1.0"
    task = "inpaint"

    def __init__(self, **params: Any):
        self.params = check_params(self.name, params, DEFAULTS)
        p = self.params
        D.validate_common(self.name, p)
        if not p["prompts"] or not all(isinstance(s, str) for s in p["prompts"]):
            raise ValueError(
                f"inpaint: prompts {p['prompts']!r}; allowed: a non-empty list of strings"
            )
        if not 0 < p["min_frac"] <= p["max_frac"] < 1:
            raise ValueError(
                f"inpaint: min_frac {p['min_frac']!r}, max_frac {p['max_frac']!r}; "
                "allowed: 0 < min_frac <= max_frac < 1"
            )
        if p["shape"] not in ("ellipse", "polygon", "random"):
            raise ValueError(f"inpaint: shape {p['shape']!r}; allowed: ellipse, polygon, random")
        if not 0 < p["strength"] <= 1:
            raise ValueError(f"inpaint: strength {p['strength']!r}; allowed: 0 < strength <= 1")
        if p["context"] < 1:
            raise ValueError(f"inpaint: context {p['context']!r}; allowed: >= 1")
        self._loaded: D.Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "_loaded": None}  # ship params, not the pipeline

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
        """One pipeline call per work size (one call when `size` is set: all crops are square)."""
        if len(sources) != len(rngs):
            raise ValueError(f"inpaint: {len(sources)} sources but {len(rngs)} rngs")
        if self._loaded is None:
            self.setup("cpu")
        p = self.params
        plans = []
        for src, rng in zip(sources, rngs):
            h, w = src.image.shape[:2]
            mask = D.object_mask(h, w, rng, p["min_frac"], p["max_frac"], p["shape"])
            prompt = p["prompts"][int(rng.integers(0, len(p["prompts"])))]
            x, y, side = D.square_window(mask, p["context"])
            wh = D.work_size(side, side, p["size"])
            plans.append({"mask": mask, "prompt": prompt, "window": (x, y, side), "work": wh})
        results: list[np.ndarray | None] = [None] * len(sources)
        for wh in dict.fromkeys(pl["work"] for pl in plans):
            idx = [i for i, pl in enumerate(plans) if pl["work"] == wh]
            images, masks = [], []
            for i in idx:
                x, y, side = plans[i]["window"]
                crop = sources[i].image[y : y + side, x : x + side]
                mcrop = plans[i]["mask"][y : y + side, x : x + side].astype(np.uint8) * 255
                images.append(Image.fromarray(D.resize(crop, *wh)))
                # area-resize then any coverage: the model never sees less than the mask
                masks.append(Image.fromarray(((D.resize(mcrop, *wh) > 0) * 255).astype(np.uint8)))
            outs = D.call_pipeline(
                self._loaded,
                [sources[i].seed for i in idx],
                prompt=[plans[i]["prompt"] for i in idx],
                negative_prompt=[p["negative_prompt"]] * len(idx) if p["negative_prompt"] else None,
                image=images,
                mask_image=masks,
                height=wh[0],
                width=wh[1],
                num_inference_steps=p["num_inference_steps"],
                guidance_scale=p["guidance_scale"],
                strength=p["strength"],
            )
            for i, out in zip(idx, outs):
                results[i] = out
        forgeries = []
        for src, pl, out in zip(sources, plans, results):
            x, y, side = pl["window"]
            image = src.image.copy()
            image[y : y + side, x : x + side] = D.resize(out, side, side)
            forgeries.append(
                Forgery(
                    image=image,
                    mask=pl["mask"],
                    local=True,
                    label="tampered",
                    params=self._provenance(pl),
                    model_id=self._loaded.model_id,
                    model_revision=self._loaded.model_revision,
                )
            )
        return forgeries

    def _provenance(self, plan: dict[str, Any]) -> dict[str, Any]:
        p, ld = self.params, self._loaded
        return {
            "prompt": plan["prompt"],
            "negative_prompt": p["negative_prompt"],
            "steps": p["num_inference_steps"],
            "guidance": p["guidance_scale"],
            "strength": p["strength"],
            "pipeline": ld.pipeline_class,
            "dtype": ld.dtype,
            "device": ld.device,
            "work_size": list(plan["work"]),
            "window": list(plan["window"]),  # [x, y, side] of the crop the model saw
            "min_frac": p["min_frac"],
            "max_frac": p["max_frac"],
            "shape": p["shape"],
            "context": p["context"],
        }
