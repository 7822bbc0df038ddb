"""Shared diffusers plumbing for the diffusion generators: build a pipeline from params, run it.

Why one helper: the five diffusion generators (inpaint, edit, face_edit, t2i_synthesis,
regeneration) load pipelines the same way and must agree on what the record says about the
model. The helper does three things:

- `load_pipeline(task, params, device)`: a local directory or hub id through
  `<PipelineClass>.from_pretrained(model, dtype=..., revision=..., variant=...)`, or, the
  offline default (`model: null`, `"tiny-random"` or `"mid-random"`), a random-weight
  Stable-Diffusion-shaped pipeline built from config objects with a fixed seed, like
  diffusers' own tests (`get_dummy_components`). Its `model_id` is
  `"<preset>-random:<config hash>"` so every record says it holds random weights.
- `call_pipeline(...)`: one batched call with a list of prompts/images and a list of
  per-sample `torch.Generator`s, keeping only the keyword arguments the pipeline accepts (SD,
  SDXL and FLUX pipelines take different ones), returning uint8 arrays.
- small image helpers: work sizes (multiples of 8), resizing, object-shaped masks.

Generators call it from `setup(device)` (loading) and `generate_batch` (calling); their
`__init__` only validates params with `check_params` and `validate_common`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from generators.base import require

log = logging.getLogger(__name__)

# what each task needs from a pipeline: the class used by default and the UNet input
# channels of the random-weight stand-in (latents + masked-image latents + mask for
# inpainting, latents + image latents for InstructPix2Pix)
TASKS: dict[str, dict[str, Any]] = {
    "inpaint": {"pipeline": "StableDiffusionInpaintPipeline", "in_channels": 9},
    "instruct_pix2pix": {"pipeline": "StableDiffusionInstructPix2PixPipeline", "in_channels": 8},
    "img2img": {"pipeline": "StableDiffusionImg2ImgPipeline", "in_channels": 4},
    "text2img": {"pipeline": "StableDiffusionPipeline", "in_channels": 4},
}

# random-weight configurations; `tiny` is the offline default (CPU, seconds), `mid` is a
# mid-size SD-shaped network (about a quarter of SD 1.5's UNet width) for GPU benchmarks
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet_channels": [32, 64],
        "unet_layers": 1,
        "unet_down": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "unet_up": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "vae_channels": [32, 32, 64, 64],  # four blocks: downsampling by 8, as in SD
        "vae_layers": 1,
        "text_hidden": 32,
        "text_layers": 2,
        "text_heads": 4,
        "text_intermediate": 37,
        "norm_groups": 32,
    },
    "mid": {
        "unet_channels": [128, 256, 512, 512],
        "unet_layers": 2,
        "unet_down": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "unet_up": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 8,
        "vae_channels": [64, 128, 256, 256],
        "vae_layers": 2,
        "text_hidden": 512,
        "text_layers": 6,
        "text_heads": 8,
        "text_intermediate": 2048,
        "norm_groups": 32,
    },
}
RANDOM_MODELS = {f"{name}-random": name for name in RANDOM_PRESETS}  # params `model` values
RANDOM_SEED = 0  # weight-init seed of the random pipelines: the same weights in every worker
DTYPES = ("float32", "float16", "bfloat16")
TOKENS_MAX = 77

# params every diffusion generator accepts, with their defaults
COMMON_DEFAULTS: dict[str, Any] = {
    "model": None,  # null / "tiny-random" / "mid-random": random weights; else a path or hub id
    "revision": None,  # hub revision (commit, branch, tag) for a hub id
    "variant": None,  # weight file variant, e.g. "fp16"
    "pipeline": None,  # diffusers pipeline class name; null: the task's SD class
    "dtype": "float32",
    "num_inference_steps": 2,
    "guidance_scale": 7.5,
    "size": 64,  # work resolution (long side, multiple of 8): 64 for tiny, 512/1024 for real
    "safety_checker": False,  # SD's NSFW filter blacks out false positives; off for data
}


def validate_common(name: str, p: dict[str, Any]) -> None:
    """Checks the params shared by the diffusion generators; cheap, no diffusers import."""
    if p["dtype"] not in DTYPES:
        raise ValueError(f"generator {name!r}: dtype {p['dtype']!r}; allowed: {', '.join(DTYPES)}")
    if p["model"] is not None and (not isinstance(p["model"], str) or not p["model"]):
        raise ValueError(
            f"generator {name!r}: model {p['model']!r}; allowed: null, "
            f"{', '.join(RANDOM_MODELS)}, a local directory or a hub id"
        )
    pipe = p["pipeline"]
    if pipe is not None and not (
        isinstance(pipe, str) and pipe.isidentifier() and ("Pipeline" in pipe)
    ):
        raise ValueError(
            f"generator {name!r}: pipeline {pipe!r}; allowed: a diffusers pipeline "
            "class name such as StableDiffusionInpaintPipeline"
        )
    if not isinstance(p["num_inference_steps"], int) or p["num_inference_steps"] < 1:
        raise ValueError(
            f"generator {name!r}: num_inference_steps {p['num_inference_steps']!r}; "
            "allowed: an integer >= 1"
        )
    size = p["size"]
    if size is not None and (not isinstance(size, int) or size < 8 or size % 8):
        raise ValueError(
            f"generator {name!r}: size {size!r}; allowed: null (the source size) "
            "or a multiple of 8 >= 8"
        )
    if not isinstance(p["guidance_scale"], (int, float)) or p["guidance_scale"] < 0:
        raise ValueError(
            f"generator {name!r}: guidance_scale {p['guidance_scale']!r}; allowed: a number >= 0"
        )


def resources(device: str) -> dict[str, float]:
    """What one worker of a diffusion generator needs: a whole GPU on cuda, a core otherwise."""
    return {"cpus": 1, "gpus": 1 if str(device).startswith("cuda") else 0}


@dataclass
class Loaded:
    """A pipeline and what the record says about it."""

    pipe: Any
    model_id: str
    model_revision: str | None
    pipeline_class: str
    dtype: str
    device: str


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _random_preset(model: str | None) -> str | None:
    if model is None:
        return "tiny"
    return RANDOM_MODELS.get(model)


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer over single bytes (no merges), built locally: nothing to download."""
    from transformers import CLIPTokenizer

    # CLIP's byte-to-unicode table: printable bytes map to themselves, the rest above 255
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + n))
        n += b not in printable
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + chars + [c + "</w>" for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS_MAX)


def random_config(task: str, preset: str = "tiny") -> dict[str, Any]:
    """The configs of the random-weight pipeline for `task`: what its hash is computed from."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}; allowed: {', '.join(TASKS)}")
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"random preset {preset!r}; allowed: {', '.join(RANDOM_PRESETS)}")
    c = RANDOM_PRESETS[preset]
    unet = {
        "block_out_channels": c["unet_channels"],
        "layers_per_block": c["unet_layers"],
        "sample_size": 64,
        "in_channels": TASKS[task]["in_channels"],
        "out_channels": 4,
        "down_block_types": c["unet_down"],
        "up_block_types": c["unet_up"],
        "cross_attention_dim": c["text_hidden"],
        "attention_head_dim": c["attention_head_dim"],
        "norm_num_groups": c["norm_groups"],
    }
    vae = {
        "block_out_channels": c["vae_channels"],
        "layers_per_block": c["vae_layers"],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(c["vae_channels"]),
        "up_block_types": ["UpDecoderBlock2D"] * len(c["vae_channels"]),
        "latent_channels": 4,
        "norm_num_groups": c["norm_groups"],
        "sample_size": 512,
    }
    text = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": c["text_hidden"],
        "intermediate_size": c["text_intermediate"],
        "num_attention_heads": c["text_heads"],
        "num_hidden_layers": c["text_layers"],
        "layer_norm_eps": 1e-5,
        "vocab_size": 1000,
        "max_position_embeddings": TOKENS_MAX,
    }
    scheduler = {  # SD 1.x's DDIM settings; eta 0 makes sampling deterministic given the noise
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    return {
        "task": task,
        "preset": preset,
        "seed": RANDOM_SEED,
        "unet": unet,
        "vae": vae,
        "text_encoder": text,
        "scheduler": scheduler,
        "tokenizer": "clip-bytes-v1",
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def build_random_pipeline(task: str, preset: str = "tiny", pipeline: str | None = None) -> Any:
    """A Stable-Diffusion-shaped pipeline with seeded random weights (float32, CPU).

    Deterministic: the global torch RNG is forked, seeded and restored, so building it
    neither depends on nor disturbs the caller's random state.
    """
    require("diffusers")
    require("transformers")
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = random_config(task, preset)
    cls_name = TASKS[task]["pipeline"]
    if pipeline is not None and pipeline != cls_name and not pipeline.startswith("AutoPipeline"):
        raise ValueError(
            f"pipeline {pipeline!r} with random weights: the random stand-in is "
            f"Stable-Diffusion-shaped; allowed: {cls_name} or an AutoPipeline class "
            "(set `model` to a checkpoint to use another pipeline)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    cls = getattr(diffusers, cls_name)
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipe


def load_pipeline(task: str, p: dict[str, Any], device: str = "cpu") -> Loaded:
    """The pipeline that params `p` name, on `device` in `p["dtype"]`, progress bars off."""
    require("diffusers")
    require("transformers")
    import diffusers

    dtype = torch_dtype(p["dtype"])
    preset = _random_preset(p["model"])
    if preset is not None:
        pipe = build_random_pipeline(task, preset, p["pipeline"])
        model_id = f"{preset}-random:{config_hash(random_config(task, preset))}"
        revision = None
    else:
        cls_name = p["pipeline"] or TASKS[task]["pipeline"]
        cls = getattr(diffusers, cls_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(
                f"pipeline {cls_name!r} is not a diffusers {diffusers.__version__} pipeline class"
            )
        kwargs: dict[str, Any] = {"dtype": dtype}
        if p["revision"]:
            kwargs["revision"] = p["revision"]
        if p["variant"]:
            kwargs["variant"] = p["variant"]
        if (
            not p["safety_checker"]
            and "safety_checker" in inspect.signature(cls.__init__).parameters
        ):
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        log.info("loading %s from %s", cls_name, p["model"])
        pipe = cls.from_pretrained(p["model"], **kwargs)
        model_id, revision = p["model"], p["revision"]
    pipe = pipe.to(device)
    if preset is not None and p["dtype"] != "float32":  # from_pretrained already cast
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Loaded(
        pipe=pipe,
        model_id=model_id,
        model_revision=revision,
        pipeline_class=type(pipe).__name__,
        dtype=p["dtype"],
        device=str(device),
    )


def generators_for(seeds: list[int]) -> list[Any]:
    """One CPU `torch.Generator` per sample: the same initial noise on every device."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s) % (2**63)) for s in seeds]


def call_pipeline(loaded: Loaded, seeds: list[int], **kwargs: Any) -> list[np.ndarray]:
    """One batched pipeline call; returns H x W x 3 uint8 arrays, one per seed.

    Keyword arguments the pipeline's `__call__` does not take are dropped (FLUX takes no
    `negative_prompt` or `strength`, ...), so generators can pass the SD superset.
    """
    import torch

    accepted = inspect.signature(loaded.pipe.__call__).parameters
    takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in accepted.values())
    known = {k: v for k, v in kwargs.items() if v is not None and k in accepted}
    dropped = sorted(set(k for k, v in kwargs.items() if v is not None) - set(known))
    if dropped and not takes_any:
        log.debug("%s does not take %s", loaded.pipeline_class, dropped)
    with torch.inference_mode():
        out = loaded.pipe(**known, generator=generators_for(seeds), output_type="np")
    images = out.images if hasattr(out, "images") else out[0]
    return [to_uint8(im) for im in images]


def to_uint8(image: Any) -> np.ndarray:
    """A pipeline's float [0, 1] output (numpy or PIL) as H x W x 3 uint8."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def work_size(h: int, w: int, size: int | None, multiple: int = 8) -> tuple[int, int]:
    """(height, width) to run the model at: long side `size` (or the source's), aspect kept,
    each a multiple of `multiple`."""
    if size is None:
        th, tw = h, w
    else:
        scale = size / max(h, w)
        th, tw = h * scale, w * scale
    return (
        max(multiple, int(round(th / multiple)) * multiple),
        max(multiple, int(round(tw / multiple)) * multiple),
    )


def resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area filter to shrink, bicubic to enlarge: deterministic OpenCV resizes."""
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    shrink = h * w < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)


def object_mask(
    h: int,
    w: int,
    rng: np.random.Generator,
    min_frac: float,
    max_frac: float,
    shape: str = "random",
) -> np.ndarray:
    """An object-shaped (rotated ellipse or irregular blob polygon) bool mask, never a box.

    Its area is a `min_frac`..`max_frac` fraction of the image and it lies wholly inside it.
    """
    if shape == "random":
        shape = ("ellipse", "polygon")[int(rng.integers(0, 2))]
    if shape not in ("ellipse", "polygon"):
        raise ValueError(f"mask shape {shape!r}; allowed: ellipse, polygon, random")
    frac = float(rng.uniform(min_frac, max_frac))
    aspect = float(rng.uniform(0.6, 1.6))
    area = frac * h * w / (np.pi / 4)  # of the bounding box of an ellipse of that area
    bw = np.sqrt(area * aspect)
    bh = area / bw
    # rotated, the shape stays within radius hypot/2: keep that inside the image
    k = min(1.0, 0.9 * min(h, w) / np.hypot(bw, bh))
    bw, bh = max(4.0, bw * k), max(4.0, bh * k)
    r = min(0.5 * np.hypot(bw, bh), 0.5 * min(h, w) - 1)
    cx = float(rng.uniform(r, max(r + 1e-3, w - r)))
    cy = float(rng.uniform(r, max(r + 1e-3, h - r)))
    angle = float(rng.uniform(0, 180))
    mask = np.zeros((h, w), np.uint8)
    if shape == "ellipse":
        cv2.ellipse(
            mask,
            (int(round(cx)), int(round(cy))),
            (max(2, int(bw / 2)), max(2, int(bh / 2))),
            angle,
            0,
            360,
            255,
            -1,
        )
    else:
        n = int(rng.integers(7, 13))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.55, 1.0, n)
        t = np.deg2rad(angle)
        px, py = rad * np.cos(ang) * bw / 2, rad * np.sin(ang) * bh / 2
        pts = np.stack(
            [cx + px * np.cos(t) - py * np.sin(t), cy + px * np.sin(t) + py * np.cos(t)], 1
        )
        pts = np.clip(np.round(pts), 0, [w - 1, h - 1]).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255)
    if not mask.any():  # degenerate tiny image: a small central disc
        cv2.circle(mask, (w // 2, h // 2), max(1, min(h, w) // 4), 255, -1)
    return mask > 127


def square_window(mask: np.ndarray, context: float) -> tuple[int, int, int]:
    """(x, y, side) of a square crop around `mask`, `context` times its larger extent, clipped.

    Running the model on a crop keeps the edited region at the model's resolution however
    large the source is (the same idea as diffusers' `padding_mask_crop`).
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    extent = int(max(y1 - y0, x1 - x0))
    if extent > min(h, w):
        raise ValueError(f"mask extent {extent} px does not fit a square crop of a {w}x{h} image")
    side = int(np.clip(np.ceil(extent * context), min(h, w, 32), min(h, w)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x = int(np.clip(round(cx - side / 2), 0, w - side))
    y = int(np.clip(round(cy - side / 2), 0, h - side))
    return x, y, side
