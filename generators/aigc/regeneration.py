"""Regeneration: a real image passed through a generative model, same content, every pixel
synthetic (label `synthetic`, `local = False`, a full mask).

Two modes:
- `img2img` (default): a diffusers image-to-image pipeline re-noises the image to `strength`
  and denoises it, guided by the source's caption (or `prompt`);
- `vae`: an autoencoder round trip (encode, take the latent mean, decode), the cheapest
  regeneration and the one closest to the source; run it at `size: null` (the source's own
  size, rounded to a multiple of 8) to keep full detail.

The output ships at the work size the model ran at (long side `size`, the source's aspect
ratio), never resampled afterwards. The offline default is a tiny random-weight SD pipeline
(its VAE for `vae`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from generators import diffusion as D
from generators.base import Forgery, Source, check_range


@dataclass(frozen=True)
class RegenerationParams(D.DiffusionParams):
    # pipeline, img2img: null is StableDiffusionImg2ImgPipeline; or AutoPipelineForImage2Image,
    # StableDiffusionXLImg2ImgPipeline, FluxImg2ImgPipeline, ...
    mode: Literal["img2img", "vae"] = "img2img"
    strength: float = (
        0.5  # img2img: fraction of the schedule re-run (0 keeps the image, 1 ignores it)
    )
    prompt: str = "a high quality photo"  # img2img, when the source has no caption
    use_caption: bool = True
    vae_subfolder: str | None = (
        "vae"  # vae mode, a checkpoint: where its AutoencoderKL lives (null: root)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("strength", self.strength, 0, 1, lo_open=True)
        if self.mode == "img2img" and self.num_inference_steps * self.strength < 1:
            raise ValueError(
                f"num_inference_steps {self.num_inference_steps} x strength {self.strength} "
                "runs no denoising step; allowed: a product >= 1"
            )


class Regeneration(D.DiffusionGenerator):
    name = "regeneration"
    domain = "aigc"
    operation = "regeneration"
    version = "1.1"
    Params = RegenerationParams

    def __init__(self, params: RegenerationParams | None = None):
        self.params = p = params or RegenerationParams()
        part = "vae" if p.mode == "vae" else "pipeline"
        self.diffusion = D.Diffusion("img2img", p, part, p.vae_subfolder)

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """One model call per work size (sources of one aspect ratio share a call)."""
        p = self.params
        calls = []
        for src, _ in zip(sources, rngs, strict=True):
            caption = src.caption.strip() if p.use_caption and src.caption else ""
            work = D.work_size(*src.image.shape[:2], p.size)
            calls.append(D.Call(src.seed, work, caption or p.prompt, D.resize(src.image, *work)))
        outputs = self.diffusion.run(calls, strength=p.strength)
        forgeries = []
        for call, out in zip(calls, outputs):
            params = {"mode": p.mode, **self.diffusion.provenance(), "work_size": list(call.work)}
            if p.mode == "img2img":
                params.update(
                    prompt=call.prompt, negative_prompt=p.negative_prompt, strength=p.strength
                )
            forgeries.append(
                self.diffusion.forgery(
                    image=out,
                    mask=np.ones(out.shape[:2], bool),
                    local=False,
                    label="synthetic",
                    params=params,
                )
            )
        return forgeries
