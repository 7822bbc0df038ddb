"""Regeneration: a real image passed through a generative model, same content, every pixel
synthetic (label `synthetic`, `local = False`, a full mask).

Two modes:
- `img2img` (default): a diffusers image-to-image pipeline re-noises the image to `strength`
  and denoises it, guided by the source's caption (or `prompt`);
- `vae`: an autoencoder round trip (encode, take the latent mean, decode), the cheapest
  regeneration and the one closest to the source; run it at `size: null` (the source's own
  size, rounded to a multiple of 8) to keep full detail.

The offline default is a tiny random-weight SD pipeline (its VAE for `vae`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from generators import diffusion as D
from generators.base import Forgery, Source, check_params, require

DEFAULTS: dict[str, Any] = {
    **D.COMMON_DEFAULTS,
    "pipeline": None,  # img2img: null is StableDiffusionImg2ImgPipeline; or
    # AutoPipelineForImage2Image, StableDiffusionXLImg2ImgPipeline, FluxImg2ImgPipeline, ...
    "mode": "img2img",  # img2img | vae
    "strength": 0.5,  # img2img: fraction of the schedule re-run (0 keeps the image, 1 ignores it)
    "prompt": "a high quality photo",  # img2img, when the source has no caption
    "use_caption": True,
    "negative_prompt": None,
    "vae_subfolder": "vae",  # vae mode, a checkpoint: where its AutoencoderKL lives (null: root)
}
MODES = ("img2img", "vae")


class Regeneration:
    name = "regeneration"
    domain = "aigc"
    operation = "regeneration"
    version = "1.0"
    task = "img2img"

    def __init__(self, **params: Any):
        self.params = check_params(self.name, params, DEFAULTS)
        p = self.params
        D.validate_common(self.name, p)
        if p["mode"] not in MODES:
            raise ValueError(f"regeneration: mode {p['mode']!r}; allowed: {', '.join(MODES)}")
        if not 0 < p["strength"] <= 1:
            raise ValueError(
                f"regeneration: strength {p['strength']!r}; allowed: 0 < strength <= 1"
            )
        if p["mode"] == "img2img" and p["num_inference_steps"] * p["strength"] < 1:
            raise ValueError(
                f"regeneration: num_inference_steps {p['num_inference_steps']} x strength "
                f"{p['strength']} runs no denoising step; allowed: a product >= 1"
            )
        if not isinstance(p["prompt"], str):
            raise ValueError(f"regeneration: prompt {p['prompt']!r}; allowed: a string")
        self._loaded: D.Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "_loaded": None}

    def resources(self, device: str) -> dict[str, float]:
        return D.resources(device)

    def setup(self, device: str = "cpu") -> None:
        if self._loaded is not None and self._loaded.device == str(device):
            return
        p = self.params
        if p["mode"] == "img2img":
            self._loaded = D.load_pipeline(self.task, p, device)
        else:
            self._loaded = self._load_vae(device)

    def _load_vae(self, device: str) -> D.Loaded:
        require("diffusers")
        p = self.params
        preset = D.RANDOM_MODELS.get(p["model"], "tiny" if p["model"] is None else None)
        if preset is not None:
            vae = D.build_random_pipeline(self.task, preset).vae
            model_id = f"{preset}-random:{D.config_hash(D.random_config(self.task, preset))}"
            if p["dtype"] != "float32":
                vae = vae.to(dtype=D.torch_dtype(p["dtype"]))
        else:
            from diffusers import AutoencoderKL

            kwargs: dict[str, Any] = {"dtype": D.torch_dtype(p["dtype"])}
            for key in ("revision", "variant"):
                if p[key]:
                    kwargs[key] = p[key]
            if p["vae_subfolder"]:
                kwargs["subfolder"] = p["vae_subfolder"]
            vae = AutoencoderKL.from_pretrained(p["model"], **kwargs)
            model_id = p["model"]
        vae = vae.to(device).eval()
        return D.Loaded(
            pipe=vae,
            model_id=model_id,
            model_revision=p["revision"] if preset is None else None,
            pipeline_class=type(vae).__name__,
            dtype=p["dtype"],
            device=str(device),
        )

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        return self.generate_batch([source], [rng])[0]

    def generate_batch(
        self, sources: list[Source], rngs: list[np.random.Generator]
    ) -> list[Forgery]:
        """One model call per work size (sources of one aspect ratio share a call)."""
        if len(sources) != len(rngs):
            raise ValueError(f"regeneration: {len(sources)} sources but {len(rngs)} rngs")
        if self._loaded is None:
            self.setup("cpu")
        p = self.params
        prompts = [
            s.caption.strip()
            if p["use_caption"] and s.caption and s.caption.strip()
            else p["prompt"]
            for s in sources
        ]
        works = [D.work_size(*s.image.shape[:2], p["size"]) for s in sources]
        inputs = [D.resize(s.image, *wh) for s, wh in zip(sources, works)]
        outputs: list[np.ndarray | None] = [None] * len(sources)
        for wh in dict.fromkeys(works):
            idx = [i for i, x in enumerate(works) if x == wh]
            if p["mode"] == "vae":
                outs = self._vae_round_trip([inputs[i] for i in idx])
            else:
                outs = D.call_pipeline(
                    self._loaded,
                    [sources[i].seed for i in idx],
                    prompt=[prompts[i] for i in idx],
                    negative_prompt=[p["negative_prompt"]] * len(idx)
                    if p["negative_prompt"]
                    else None,
                    image=[Image.fromarray(inputs[i]) for i in idx],
                    height=wh[0],
                    width=wh[1],
                    strength=p["strength"],
                    num_inference_steps=p["num_inference_steps"],
                    guidance_scale=p["guidance_scale"],
                )
            for i, out in zip(idx, outs):
                outputs[i] = out
        forgeries = []
        for src, prompt, wh, out in zip(sources, prompts, works, outputs):
            h, w = src.image.shape[:2]
            params = {
                "mode": p["mode"],
                "pipeline": self._loaded.pipeline_class,
                "dtype": self._loaded.dtype,
                "device": self._loaded.device,
                "work_size": list(wh),
            }
            if p["mode"] == "img2img":
                params.update(
                    prompt=prompt,
                    negative_prompt=p["negative_prompt"],
                    strength=p["strength"],
                    steps=p["num_inference_steps"],
                    guidance=p["guidance_scale"],
                )
            forgeries.append(
                Forgery(
                    image=D.resize(out, h, w),
                    mask=np.ones((h, w), bool),
                    local=False,
                    label="synthetic",
                    params=params,
                    model_id=self._loaded.model_id,
                    model_revision=self._loaded.model_revision,
                )
            )
        return forgeries

    def _vae_round_trip(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Encode, take the posterior mean (deterministic, no noise), decode."""
        import torch

        vae = self._loaded.pipe
        dtype = next(vae.parameters()).dtype
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        x = x.to(self._loaded.device, torch.float32).div(127.5).sub(1).to(dtype)
        with torch.inference_mode():
            latents = vae.encode(x).latent_dist.mode()
            y = vae.decode(latents).sample
        y = ((y.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [np.ascontiguousarray(a) for a in y.permute(0, 2, 3, 1).cpu().numpy()]
