"""Full synthesis with a diffusers text-to-image pipeline (SD, SDXL, FLUX, PixArt, ...; the
offline default is a tiny random-weight SD pipeline).

The real source supplies the size and, when it has one, the caption: the synthetic image is
generated at the source's aspect ratio (long side `size`, multiples of 8) and resized to the
source's H x W, so a detector cannot tell real from fake by size. Every pixel is synthetic:
`local = False`, label `synthetic`, a full mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from generators import diffusion as D
from generators.base import Forgery, Source, check_params

DEFAULTS: dict[str, Any] = {
    **D.COMMON_DEFAULTS,
    "pipeline": None,  # null: StableDiffusionPipeline; or AutoPipelineForText2Image,
    # StableDiffusionXLPipeline, FluxPipeline, PixArtSigmaPipeline, ... with a matching model
    "prompts": [
        "a photo of a city street at dusk",
        "a portrait photo of a person smiling",
        "a photo of a dog in a park",
        "a landscape with mountains and a lake",
        "a photo of a kitchen interior",
        "a close-up photo of flowers",
        "a scanned page of a printed document",
        "a photo of a cat on a sofa",
        "an aerial photo of farmland",
        "a photo of a busy market",
    ],
    "use_caption": True,  # the source's caption when it has one, else a prompt from the list
    "negative_prompt": None,
}


class TextToImage:
    name = "t2i_synthesis"
    domain = "aigc"
    operation = "full_synthesis"
    version = "1.0"
    task = "text2img"

    def __init__(self, **params: Any):
        self.params = check_params(self.name, params, DEFAULTS)
        p = self.params
        D.validate_common(self.name, p)
        if not p["prompts"] or not all(isinstance(s, str) for s in p["prompts"]):
            raise ValueError(
                f"t2i_synthesis: prompts {p['prompts']!r}; allowed: a non-empty list of strings"
            )
        if not isinstance(p["use_caption"], bool):
            raise ValueError(
                f"t2i_synthesis: use_caption {p['use_caption']!r}; allowed: true, false"
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
        """One pipeline call per work size (sources of one aspect ratio share a call)."""
        if len(sources) != len(rngs):
            raise ValueError(f"t2i_synthesis: {len(sources)} sources but {len(rngs)} rngs")
        if self._loaded is None:
            self.setup("cpu")
        p = self.params
        prompts, origins = [], []
        for src, rng in zip(sources, rngs):
            listed = p["prompts"][int(rng.integers(0, len(p["prompts"])))]  # drawn either way
            use = bool(p["use_caption"] and src.caption and src.caption.strip())
            prompts.append(src.caption.strip() if use else listed)
            origins.append("caption" if use else "list")
        works = [D.work_size(*s.image.shape[:2], p["size"]) for s in sources]
        outputs: list[np.ndarray | None] = [None] * len(sources)
        for wh in dict.fromkeys(works):
            idx = [i for i, x in enumerate(works) if x == wh]
            outs = D.call_pipeline(
                self._loaded,
                [sources[i].seed for i in idx],
                prompt=[prompts[i] for i in idx],
                negative_prompt=[p["negative_prompt"]] * len(idx) if p["negative_prompt"] else None,
                height=wh[0],
                width=wh[1],
                num_inference_steps=p["num_inference_steps"],
                guidance_scale=p["guidance_scale"],
            )
            for i, out in zip(idx, outs):
                outputs[i] = out
        forgeries = []
        for src, prompt, origin, wh, out in zip(sources, prompts, origins, works, outputs):
            h, w = src.image.shape[:2]
            forgeries.append(
                Forgery(
                    image=D.resize(out, h, w),
                    mask=np.ones((h, w), bool),
                    local=False,
                    label="synthetic",
                    params={
                        "prompt": prompt,
                        "prompt_source": origin,
                        "negative_prompt": p["negative_prompt"],
                        "steps": p["num_inference_steps"],
                        "guidance": p["guidance_scale"],
                        "pipeline": self._loaded.pipeline_class,
                        "dtype": self._loaded.dtype,
                        "device": self._loaded.device,
                        "work_size": list(wh),
                    },
                    model_id=self._loaded.model_id,
                    model_revision=self._loaded.model_revision,
                )
            )
        return forgeries
