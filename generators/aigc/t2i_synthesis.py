"""Full synthesis with a diffusers text-to-image pipeline (SD, SDXL, FLUX, PixArt, ...; the
offline default is a tiny random-weight SD pipeline).

The real source supplies the aspect ratio and, when it has one, the caption. The image is
generated at the source's aspect ratio with long side `size` (multiples of 8) and shipped at
that size, the size the model made it: resampling it to the source's size would add
interpolation traces no real generator leaves. Every pixel is synthetic: `local = False`,
label `synthetic`, a full mask of the generated size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generators import diffusion as D
from generators.base import Forgery, Source, check_nonempty


@dataclass(frozen=True)
class TextToImageParams(D.DiffusionParams):
    # pipeline null: StableDiffusionPipeline; or AutoPipelineForText2Image,
    # StableDiffusionXLPipeline, FluxPipeline, PixArtSigmaPipeline, ... with a matching model
    prompts: tuple[str, ...] = (
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
    )
    use_caption: bool = True  # the source's caption when it has one, else a prompt from the list

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonempty("prompts", self.prompts)


class TextToImage(D.DiffusionGenerator):
    name = "t2i_synthesis"
    domain = "aigc"
    operation = "full_synthesis"
    version = "1.1"
    Params = TextToImageParams

    def __init__(self, params: TextToImageParams | None = None):
        self.params = params or TextToImageParams()
        self.diffusion = D.Diffusion("text2img", self.params)

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """One pipeline call per work size (sources of one aspect ratio share a call)."""
        p = self.params
        calls, origins = [], []
        for src, rng in zip(sources, rngs, strict=True):
            listed = p.prompts[int(rng.integers(0, len(p.prompts)))]  # drawn either way
            use = bool(p.use_caption and src.caption and src.caption.strip())
            origins.append("caption" if use else "list")
            prompt = src.caption.strip() if use else listed
            calls.append(D.Call(src.seed, D.work_size(*src.image.shape[:2], p.size), prompt))
        outputs = self.diffusion.run(calls)
        return [
            self.diffusion.forgery(
                image=out,
                mask=np.ones(out.shape[:2], bool),
                local=False,
                label="synthetic",
                params={
                    "prompt": call.prompt,
                    "prompt_source": origin,
                    "negative_prompt": p.negative_prompt,
                    **self.diffusion.provenance(),
                    "work_size": list(call.work),
                },
            )
            for call, origin, out in zip(calls, origins, outputs)
        ]
