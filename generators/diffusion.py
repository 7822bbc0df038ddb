"""The diffusers plumbing of the diffusion generators, in one place.

The five diffusion generators (inpaint, edit, face_edit, t2i_synthesis, regeneration) differ
in what they ask the model for; everything else lives here and they call it:

- `DiffusionParams`: the params they all take (model, dtype, steps, guidance, work size, ...),
  a frozen dataclass each generator's own params extend.
- `Diffusion`: the model one generator holds. It is picklable before and after `setup`
  (workers get the params, never the weights), loads once per worker in `setup(device)`,
  and runs a batch of `Call`s, one pipeline call per work size (`run`), or the
  crop-resize-call-paste of inpainting on square windows (`inpaint_windows`).
- Loading (`load_pipeline`, `load_vae`): a local directory or hub id through
  `<PipelineClass>.from_pretrained(...)`, safely: safetensors only, no custom pipeline or
  component code unless `trust_remote_code: true`, checked before anything is read; or, the
  offline default (`model: null`, `"tiny-random"` or `"mid-random"`), a random-weight
  Stable-Diffusion-shaped pipeline built from config objects with a fixed seed, like
  diffusers' own tests (`get_dummy_components`). Its `model_id` is
  `"<preset>-random:<config hash>"` so every record says it holds random weights
  (`is_stand_in`).
- Determinism: pixels are made with a fixed number of torch CPU threads (`threads`, default
  1) and cuDNN's deterministic kernels, so the bytes do not depend on the worker.
- Small image helpers: work sizes (multiples of 8), resizing, object-shaped masks, windows.

Nothing here imports torch or diffusers at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from generators.base import Forgery, require

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
# weight files torch would unpickle; only safetensors are loaded
PICKLED_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
CODE_LIBRARIES = (
    "diffusers",
    "transformers",
)  # model_index.json libraries that are not custom code


@dataclass(frozen=True)
class DiffusionParams:
    """Params every diffusion generator takes; each generator's params class extends it."""

    model: str | None = (
        None  # null / "tiny-random" / "mid-random": random weights; else a path or hub id
    )
    revision: str | None = None  # hub revision (commit, branch, tag) for a hub id
    variant: str | None = None  # weight file variant, e.g. "fp16"
    pipeline: str | None = None  # diffusers pipeline class name; null: the task's SD class
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    num_inference_steps: int = 2
    guidance_scale: float = 7.5
    size: int | None = (
        64  # work resolution (long side, multiple of 8): 64 for tiny, 512/1024 for real
    )
    negative_prompt: str | None = None
    safety_checker: bool = False  # SD's NSFW filter blacks out false positives; off for data
    trust_remote_code: bool = False  # run custom pipeline/component code shipped with a checkpoint
    threads: int | None = 1  # torch CPU threads while pixels are made (null: leave as is); fixed
    # so that outputs are the same bytes whatever the worker's thread count

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(
                f"model {self.model!r}; allowed: null, {', '.join(RANDOM_MODELS)}, "
                "a local directory or a hub id"
            )
        pipe = self.pipeline
        if pipe is not None and not (
            isinstance(pipe, str) and pipe.isidentifier() and "Pipeline" in pipe
        ):
            raise ValueError(
                f"pipeline {pipe!r}; allowed: a diffusers pipeline class name such as "
                "StableDiffusionInpaintPipeline"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps {self.num_inference_steps!r}; allowed: an integer >= 1"
            )
        if self.size is not None and (
            not isinstance(self.size, int) or self.size < 8 or self.size % 8
        ):
            raise ValueError(
                f"size {self.size!r}; allowed: null (the source size) or a multiple of 8 >= 8"
            )
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale {self.guidance_scale!r}; allowed: a number >= 0")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads {self.threads!r}; allowed: null or an integer >= 1")


def is_stand_in(model_id: str | None) -> bool:
    """True for the random-weight stand-ins' model ids (`tiny-random:<hash>`, ...)."""
    return bool(model_id) and model_id.split(":", 1)[0] in RANDOM_MODELS


@dataclass
class Loaded:
    """A pipeline (or a bare VAE) and what the record says about it."""

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


def check_checkpoint(model: str, trust_remote_code: bool = False) -> None:
    """Refuses a local checkpoint folder that would run code or unpickle weights.

    Checked before diffusers reads anything, whatever its version does by default:
    - custom code: a `*.py` file in the folder or a component subfolder, a custom pipeline
      (`_class_name: [module, Class]` in model_index.json) or a component from a library other
      than diffusers/transformers; allowed only with `trust_remote_code: true`;
    - pickled weights (`.bin`, `.ckpt`, `.pt`, ...) in a folder with no `.safetensors`: torch
      would unpickle them; convert the checkpoint to safetensors instead.
    Hub ids are not checked here (nothing is downloaded offline); `from_pretrained` gets
    `use_safetensors=True` and `trust_remote_code` for them.
    """
    root = Path(model)
    if not root.is_dir():
        return
    code: list[str] = []
    index = root / "model_index.json"
    if index.is_file():
        try:
            config = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"model {model!r}: model_index.json is not valid JSON: {e}") from e
        if isinstance(config.get("_class_name"), list):
            code.append(f"custom pipeline {config['_class_name']!r} in model_index.json")
        for name, value in config.items():
            if (
                not name.startswith("_")
                and isinstance(value, list)
                and value
                and value[0] is not None
                and value[0] not in CODE_LIBRARIES
            ):
                code.append(f"component {name!r} from module {value[0]!r}")
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        code.append(str(path.relative_to(root)))
    if code and not trust_remote_code:
        raise ValueError(
            f"model {model!r} holds custom code ({'; '.join(code)}); refusing to run it. "
            "Set the generator param trust_remote_code: true only for a checkpoint you trust"
        )
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        files = [p for p in folder.iterdir() if p.is_file()]
        pickled = [p for p in files if p.suffix in PICKLED_WEIGHTS]
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            raise ValueError(
                f"model {model!r}: {pickled[0].relative_to(root)} is a pickled weight file and "
                f"{folder.relative_to(root) if folder != root else 'the folder'} has no "
                ".safetensors weights; only safetensors are loaded (convert the checkpoint, e.g. "
                "load it once where you trust it and save_pretrained(safe_serialization=True))"
            )


def _from_pretrained(cls: Any, p: DiffusionParams, dtype: Any, **extra: Any) -> Any:
    """`cls.from_pretrained(p.model, ...)`, safetensors only, custom code only if trusted."""
    check_checkpoint(p.model, p.trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": p.trust_remote_code,
        **extra,
    }
    if p.revision:
        kwargs["revision"] = p.revision
    if p.variant:
        kwargs["variant"] = p.variant
    log.info("loading %s from %s", cls.__name__, p.model)
    return cls.from_pretrained(p.model, **kwargs)


def load_pipeline(task: str, p: DiffusionParams, device: str = "cpu") -> Loaded:
    """The pipeline that params `p` name, on `device` in `p.dtype`, progress bars off."""
    require("diffusers")
    require("transformers")
    import diffusers

    dtype = torch_dtype(p.dtype)
    preset = _random_preset(p.model)
    if preset is not None:
        pipe = build_random_pipeline(task, preset, p.pipeline)
        model_id = f"{preset}-random:{config_hash(random_config(task, preset))}"
        revision = None
    else:
        cls_name = p.pipeline or TASKS[task]["pipeline"]
        cls = getattr(diffusers, cls_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(
                f"pipeline {cls_name!r} is not a diffusers {diffusers.__version__} pipeline class"
            )
        extra: dict[str, Any] = {}
        if not p.safety_checker and "safety_checker" in inspect.signature(cls.__init__).parameters:
            extra.update(safety_checker=None, requires_safety_checker=False)
        pipe = _from_pretrained(cls, p, dtype, **extra)
        model_id, revision = p.model, p.revision
    pipe = pipe.to(device)
    if preset is not None and p.dtype != "float32":  # from_pretrained already cast
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Loaded(pipe, model_id, revision, type(pipe).__name__, p.dtype, str(device))


def load_vae(
    task: str, p: DiffusionParams, device: str = "cpu", subfolder: str | None = "vae"
) -> Loaded:
    """Only the autoencoder of the pipeline `p` names (a VAE round trip needs nothing else)."""
    require("diffusers")
    preset = _random_preset(p.model)
    if preset is not None:
        vae = build_random_pipeline(task, preset).vae
        model_id = f"{preset}-random:{config_hash(random_config(task, preset))}"
        if p.dtype != "float32":
            vae = vae.to(dtype=torch_dtype(p.dtype))
    else:
        from diffusers import AutoencoderKL

        extra = {"subfolder": subfolder} if subfolder else {}
        vae = _from_pretrained(AutoencoderKL, p, torch_dtype(p.dtype), **extra)
        model_id = p.model
    vae = vae.to(device).eval()
    revision = p.revision if preset is None else None
    return Loaded(vae, model_id, revision, type(vae).__name__, p.dtype, str(device))


@contextlib.contextmanager
def deterministic(device: str, threads: int | None = 1) -> Iterator[None]:
    """Inference mode with a fixed torch CPU thread count and cuDNN's deterministic kernels,
    restored afterwards: CPU float sums split over another number of threads round
    differently, and outputs moved by one level between 1 and 2 threads."""
    import torch

    old_threads = torch.get_num_threads()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if threads is not None and threads != old_threads:
        torch.set_num_threads(threads)
    if str(device).startswith("cuda"):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with torch.inference_mode():
            yield
    finally:
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


def generators_for(seeds: list[int]) -> list[Any]:
    """One CPU `torch.Generator` per sample: the same initial noise on every device."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s) % (2**63)) for s in seeds]


def call_pipeline(
    loaded: Loaded, seeds: list[int], threads: int | None = 1, **kwargs: Any
) -> list[np.ndarray]:
    """One batched pipeline call; returns H x W x 3 uint8 arrays, one per seed.

    Keyword arguments the pipeline's `__call__` does not take are dropped (FLUX takes no
    `negative_prompt` or `strength`, ...), so generators can pass the SD superset.
    """
    accepted = inspect.signature(loaded.pipe.__call__).parameters
    takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in accepted.values())
    known = {k: v for k, v in kwargs.items() if v is not None and k in accepted}
    dropped = sorted(set(k for k, v in kwargs.items() if v is not None) - set(known))
    if dropped and not takes_any:
        log.debug("%s does not take %s", loaded.pipeline_class, dropped)
    with deterministic(loaded.device, threads):
        out = loaded.pipe(**known, generator=generators_for(seeds), output_type="np")
    images = out.images if hasattr(out, "images") else out[0]
    return [to_uint8(im) for im in images]


def vae_round_trip(
    loaded: Loaded, images: list[np.ndarray], threads: int | None = 1
) -> list[np.ndarray]:
    """Encode, take the posterior mean (deterministic, no noise), decode."""
    import torch

    vae = loaded.pipe
    dtype = next(vae.parameters()).dtype
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = x.to(loaded.device, torch.float32).div(127.5).sub(1).to(dtype)
    with deterministic(loaded.device, threads):
        latents = vae.encode(x).latent_dist.mode()
        y = vae.decode(latents).sample
    y = ((y.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [np.ascontiguousarray(a) for a in y.permute(0, 2, 3, 1).cpu().numpy()]


# --------------------------------------------------------------------------- the helper object


@dataclass
class Call:
    """One sample's share of a pipeline call: inputs at the work size `work` (height, width)."""

    seed: int
    work: tuple[int, int]
    prompt: str | None = None
    image: np.ndarray | None = None  # H x W x 3 uint8 at `work`
    mask: np.ndarray | None = None  # H x W bool at `work` (inpainting)


class Diffusion:
    """The diffusers model of one generator: picklable params, weights loaded per worker.

    `part="vae"` loads only the pipeline's autoencoder (`run` is then a VAE round trip).
    """

    def __init__(
        self,
        task: str,
        params: DiffusionParams,
        part: str = "pipeline",
        vae_subfolder: str | None = "vae",
    ):
        if task not in TASKS:
            raise ValueError(f"task {task!r}; allowed: {', '.join(TASKS)}")
        if part not in ("pipeline", "vae"):
            raise ValueError(f"part {part!r}; allowed: pipeline, vae")
        self.task, self.params, self.part, self.vae_subfolder = task, params, part, vae_subfolder
        self.loaded: Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "loaded": None}  # ship params, not the weights

    def setup(self, device: str = "cpu") -> None:
        if self.loaded is None or self.loaded.device != str(device):
            if self.part == "vae":
                self.loaded = load_vae(self.task, self.params, device, self.vae_subfolder)
            else:
                self.loaded = load_pipeline(self.task, self.params, device)

    def ready(self) -> Loaded:
        """The loaded model (set up on CPU first when `setup` was not called)."""
        if self.loaded is None:
            self.setup("cpu")
        return self.loaded

    def run(self, calls: list[Call], **shared: Any) -> list[np.ndarray]:
        """Outputs (uint8, at each call's work size) in the order of `calls`: one model call
        per work size, so sources of one aspect ratio share a batch. `shared` keyword
        arguments (strength, image_guidance_scale, ...) go to every pipeline call."""
        loaded, p = self.ready(), self.params
        out: list[np.ndarray | None] = [None] * len(calls)
        for work in dict.fromkeys(c.work for c in calls):
            idx = [i for i, c in enumerate(calls) if c.work == work]
            group = [calls[i] for i in idx]
            if self.part == "vae":
                results = vae_round_trip(loaded, [c.image for c in group], p.threads)
            else:
                kwargs: dict[str, Any] = {
                    "prompt": [c.prompt or "" for c in group],
                    "negative_prompt": [p.negative_prompt] * len(group)
                    if p.negative_prompt
                    else None,
                    "height": work[0],
                    "width": work[1],
                    "num_inference_steps": p.num_inference_steps,
                    "guidance_scale": p.guidance_scale,
                    **shared,
                }
                if group[0].image is not None:
                    kwargs["image"] = [Image.fromarray(c.image) for c in group]
                if group[0].mask is not None:
                    kwargs["mask_image"] = [
                        Image.fromarray(c.mask.astype(np.uint8) * 255) for c in group
                    ]
                results = call_pipeline(loaded, [c.seed for c in group], p.threads, **kwargs)
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    def inpaint_windows(
        self,
        images: list[np.ndarray],
        seeds: list[int],
        windows: list[tuple[int, int, int]],
        masks: list[np.ndarray],
        prompts: list[str],
        **shared: Any,
    ) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """Inpaints `masks` (full-size bool) of `images`, each on its square window
        (x, y, side) resized to the work size and resized back into a copy of the image.

        Returns (image, work size) per sample. Pixels of the window outside the mask change
        too (VAE, resizes): the synthesize stage pastes the source back outside the mask.
        """
        calls = []
        for img, seed, (x, y, side), mask, prompt in zip(
            images, seeds, windows, masks, prompts, strict=True
        ):
            work = work_size(side, side, self.params.size)
            crop = img[y : y + side, x : x + side]
            mcrop = mask[y : y + side, x : x + side].astype(np.uint8) * 255
            # area-resize then any coverage: the model never sees less than the mask
            calls.append(Call(seed, work, prompt, resize(crop, *work), resize(mcrop, *work) > 0))
        outs = self.run(calls, **shared)
        results = []
        for img, (x, y, side), call, out in zip(images, windows, calls, outs):
            edited = img.copy()
            edited[y : y + side, x : x + side] = resize(out, side, side)
            results.append((edited, call.work))
        return results

    def provenance(self) -> dict[str, Any]:
        """What every diffusion record says about the model call."""
        ld, p = self.ready(), self.params
        out = {"pipeline": ld.pipeline_class, "dtype": ld.dtype, "device": ld.device}
        if self.part != "vae":
            out.update(steps=p.num_inference_steps, guidance=p.guidance_scale)
        return out

    def forgery(self, **fields: Any) -> Forgery:
        """A Forgery carrying this model's id and revision."""
        ld = self.ready()
        return Forgery(model_id=ld.model_id, model_revision=ld.model_revision, **fields)


class DiffusionGenerator:
    """The one mixin of the diffusion generators: `setup` loads `self.diffusion` (None: a
    generator running without a model, face_edit's classical method), `generate` is a batch of
    one. A subclass sets `self.diffusion` in `__init__` and defines `generate_batch`."""

    diffusion: Diffusion | None = None

    def setup(self, device: str = "cpu") -> None:
        if self.diffusion is not None:
            self.diffusion.setup(device)

    def generate(self, source: Any, rng: np.random.Generator) -> Forgery:
        return self.generate_batch([source], [rng])[0]


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
