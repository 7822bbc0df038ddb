"""The train stage: fine-tune DeFakerOne (`pipeline.model`) on one export's shards.

`run` (the driver) finds the export, fingerprints the run, and hands the training loop to
`executor.run_job`: Ray Train's `TorchTrainer` with `train.num_workers` workers on the `ray`
backend (locally or on the cluster at `executor.address`), a plain call on `local`. Each
worker streams its own part of the export's `train` tars (`pipeline.train_data`); rank 0
validates on `val` every `val_every` steps with the same tiling as `predict`. Nothing else
of the export is opened: not `test`, not `test_ood`.

Outputs, under `data_dir/train/`:
- `checkpoints/step-NNNNNN/`: trainable weights (safetensors), optimizer, scheduler and RNG
  state (`torch.load(weights_only=True)`), step counters and the loss history, written to a
  temporary name and renamed, every `checkpoint_every` steps and on Ctrl-C / SIGTERM. A
  rerun with the same fingerprint (params that change the result + the export's manifest
  hash) resumes from the newest one; another fingerprint starts over.
- `model/`: the final model (`pipeline.model.save_model`) with `params.yaml` (the params
  used) and `export.json` (export name and manifest sha256); `load_model` reads it.
- `metrics/train.json`, `plots/train.csv` (losses, lr, samples/s per logged step) and
  `plots/train_val.csv` (validation pixel F1 and image accuracy per validation).

With several workers, `data_dir` must be on storage every node sees.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from pipeline.executor import Executor, JobContext, Resources
from pipeline.params import Params
from pipeline.stage import Stage

log = logging.getLogger(__name__)

# params that do not change what is trained: a rerun with other values resumes
RUN_ONLY = ("resume", "checkpoint_every", "keep_checkpoints", "val_every", "val_max_images",
            "log_every", "threads", "cpus_per_worker", "tile_batch")


@dataclass(frozen=True)
class TrainParams:
    preset: str = "tiny"  # tiny (offline, random weights) | defakerone-2b (real checkpoints)
    export: str = "balanced-100pct"  # folder under data_dir/exports
    crop: int | None = None  # native crop side = SAM2 input; None: the preset's (128 / 1024)
    steps: int = 300
    batch_size: int = 4  # per worker
    lr: float | None = None  # None: the preset's (tiny 1e-3, defakerone-2b 1e-4)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    loss_txt: float = 1.0  # w_txt: cross-entropy of the answer tokens
    loss_seg: float = 1.0  # w_seg: BCE + Dice of the mask
    focus_prob: float = 0.5  # share of tampered crops placed on the forged region
    fake_min_pixels: int = 16  # a crop with this many forged pixels is answered "fake"
    global_view: bool = True  # the VLM also sees the whole image, resized
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    val_every: int = 100
    val_max_images: int = 32
    log_every: int = 5  # steps per row of plots/train.csv
    tile_batch: int = 8  # tiles per forward pass in validation
    num_workers: int = 1  # Ray Train workers (processes; one GPU each with use_gpu)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int | None = None  # torch threads per worker; None: int(cpus_per_worker)
    loader_workers: int = 1  # DataLoader processes per worker (reading, decoding, cropping)
    shuffle_buffer: int = 32
    vlm_model: str | None = None  # hub id or local path; None: the preset's
    sam_model: str | None = None
    dtype: Literal["float32", "bfloat16"] | None = None  # None: the preset's (2b: bfloat16)
    lora: bool | None = None  # LoRA on the language model; None: the preset's (2b: on)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    train_vision: bool | None = None  # train InternVL's vision tower; None: the preset's
    train_sam_encoder: bool | None = None  # train SAM2's image encoder; None: the preset's
    trust_remote_code: bool = False
    resume: bool = True
    # a model saved by an earlier run (its `data/train/model` folder): its weights start this
    # run instead of the preset's; the architecture must match. The data loop continues each
    # round's model this way.
    init_from: str | None = None

    def __post_init__(self) -> None:
        from pipeline.presets import preset

        preset(self.preset)
        positive = ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "val_every",
                    "log_every", "num_workers", "tile_batch", "shuffle_buffer", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: {getattr(self, name)!r}; allowed: >= 1")
        for name in ("warmup_steps", "loader_workers", "val_max_images", "fake_min_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}: {getattr(self, name)!r}; allowed: >= 0")
        for name in ("loss_txt", "loss_seg", "weight_decay", "grad_clip", "lora_alpha"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"train.{name}: {v!r}; allowed: a finite number >= 0")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0):
            raise ValueError(f"train.lr: {self.lr!r}; allowed: a finite number > 0")
        if not 0.0 <= self.focus_prob <= 1.0:
            raise ValueError(f"train.focus_prob: {self.focus_prob!r}; allowed: 0 to 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"train.lora_dropout: {self.lora_dropout!r}; allowed: 0 to <1")
        if self.crop is not None and (self.crop < 64 or self.crop % 32):
            raise ValueError(f"train.crop: {self.crop!r}; allowed: a multiple of 32, >= 64")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"train.cpus_per_worker: {self.cpus_per_worker!r}; allowed: > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads: {self.threads!r}; allowed: >= 1 or null")


def model_spec(p: TrainParams, seed: int):
    """The model this run builds: `p`'s values, the preset's where `p` says None."""
    from pipeline.model import ModelSpec, preset

    d = preset(p.preset)

    def pick(value, default):
        return default if value is None else value

    return ModelSpec(
        preset=p.preset, vlm=pick(p.vlm_model, d.vlm), sam=pick(p.sam_model, d.sam),
        crop=pick(p.crop, d.crop), dtype=pick(p.dtype, d.dtype), lora=pick(p.lora, d.lora),
        lora_r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
        train_vision=pick(p.train_vision, d.train_vision),
        train_sam_encoder=pick(p.train_sam_encoder, d.train_sam_encoder),
        global_view=p.global_view, trust_remote_code=p.trust_remote_code, seed=seed)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_export(exports: Path, name: str) -> Path:
    d = Path(exports) / name
    if not (d / "train").is_dir():
        have = sorted(p.name for p in Path(exports).iterdir() if (p / "train").is_dir()) \
            if Path(exports).is_dir() else []
        raise FileNotFoundError(
            f"train.export {name!r}: no {d / 'train'}; available exports: "
            f"{', '.join(have) or 'none (run the export stage first)'}")
    return d


def fingerprint(p: TrainParams, seed: int, manifest_sha: str) -> str:
    keep = {k: v for k, v in asdict(p).items() if k not in RUN_ONLY}
    text = json.dumps({"train": keep, "seed": seed, "export": manifest_sha}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# checkpoints


def _ckpt_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(root: Path, fp: str) -> Path | None:
    """Newest complete checkpoint of this fingerprint (renamed into place = complete)."""
    if not root.is_dir():
        return None
    for d in sorted(root.glob("step-*"), reverse=True):
        state = d / "state.json"
        if state.exists() and json.loads(state.read_text()).get("fingerprint") == fp:
            return d
    return None


def save_checkpoint(root: Path, model, opt, sched, state: dict[str, Any], keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from pipeline.model import unwrap

    core = unwrap(model)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _ckpt_name(state["step"])
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {n: p.detach().contiguous().cpu() for n, p in core.named_parameters() if p.requires_grad}
    save_file(weights, str(tmp / "trainable.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads the trainable weights into `model`; returns (state, optimizer/scheduler/rng)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        raise ValueError(f"{path}: checkpoint holds other trainable tensors than this model "
                         f"({len(set(weights) ^ wanted)} differ)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    other = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return json.loads((path / "state.json").read_text()), other


# ---------------------------------------------------------------------------------------
# validation


def init_weights(model, spec, path: Path) -> None:
    """Loads a saved model's weights into `model` (built from `spec`), after checking that
    both describe the same architecture."""
    from safetensors.torch import load_model as load_st

    from pipeline.model import SPEC, WEIGHTS

    meta_path = Path(path) / SPEC
    if not meta_path.exists() or not (Path(path) / WEIGHTS).exists():
        raise FileNotFoundError(f"train.init_from {path}: not a model saved by train (needs "
                                f"{SPEC} and {WEIGHTS})")
    theirs = json.loads(meta_path.read_text()).get("spec", {})
    ours = asdict(spec)
    differ = sorted(k for k in ours if k != "seed" and k in theirs and theirs[k] != ours[k])
    if differ:
        raise ValueError(f"train.init_from {path}: its architecture differs from this run's in "
                         + ", ".join(f"{k} ({theirs[k]!r} vs {ours[k]!r})" for k in differ))
    load_st(model, str(Path(path) / WEIGHTS), strict=True, device="cpu")


def pixel_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float(np.logical_and(pred, truth).sum())
    fp = float(np.logical_and(pred, ~truth).sum())
    fn = float(np.logical_and(~pred, truth).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def validate(model, shards, limit: int, tile_batch: int) -> dict[str, Any]:
    """Whole val images through `predict_image`: mean pixel F1 over forged images, image
    accuracy (score >= 0.5 means forged) over all."""
    from pipeline.predict import predict_image
    from pipeline.train_data import iter_split

    was = model.training
    model.eval()
    f1s, right, n = [], 0, 0
    for rec, rgb, mask in iter_split(shards, "val", limit):
        pred = predict_image(model, rgb, batch=tile_batch, answer=False)
        forged = rec["label"] != "real"
        right += int((pred.score >= 0.5) == forged)
        n += 1
        if forged:
            f1s.append(pixel_f1(pred.mask, mask))
    model.train(was)
    return {"val_images": n, "val_pixel_f1": float(np.mean(f1s)) if f1s else None,
            "val_image_accuracy": right / n if n else None}


# ---------------------------------------------------------------------------------------
# the training loop (one process of the job)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
                           for k in ("sam", "views", "mask", "valid")}
    out["fake"] = torch.tensor([s["fake"] for s in samples], dtype=torch.long)
    out["epoch"] = max(s["epoch"] for s in samples)
    out["key"] = [s["key"] for s in samples]
    return out


def _schedule(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def make_loader(shards, cfg, p: TrainParams, *, rank: int = 0, world: int = 1, seed: int = 0,
                skip_batches: int = 0, pin_memory: bool = False):
    """The DataLoader of one training process: `p.loader_workers` processes stream, decode
    and crop this rank's part of the shards; batches of `p.batch_size`."""
    from torch.utils.data import DataLoader

    from pipeline.train_data import CropStream

    stream = CropStream(shards, cfg, rank=rank, world=world, seed=seed,
                        shuffle_buffer=p.shuffle_buffer, skip_batches=skip_batches,
                        batch_size=p.batch_size)
    stream.check_slots(p.loader_workers)
    # loader processes come from a forkserver, not a fork of this process: after the earlier
    # stages of a `run` used OpenCV's thread pool here, a forked child deadlocks in OpenCV
    context = "forkserver" if p.loader_workers > 0 else None
    return DataLoader(stream, batch_size=p.batch_size, num_workers=p.loader_workers,
                      collate_fn=_collate, persistent_workers=p.loader_workers > 0,
                      prefetch_factor=4 if p.loader_workers else None, pin_memory=pin_memory,
                      worker_init_fn=_loader_worker_init, multiprocessing_context=context)


def _loader_worker_init(worker_id: int) -> None:
    """One thread per loader process (torch already does this for itself): OpenCV's pool
    would otherwise compete with the training process for the same cores."""
    import cv2

    cv2.setNumThreads(1)


def train_step(model, opt, sched, batch: dict[str, Any], device, grad_clip: float, trainable):
    """One optimisation step on a collated batch; returns the model's Output."""
    import torch

    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "key"}
    out = model(batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    opt.step()
    sched.step()
    return out


class _Interrupt:
    """SIGTERM raises KeyboardInterrupt (main thread only), so both leave a checkpoint."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def train_job(ctx: JobContext, config: dict[str, Any]) -> dict[str, Any] | None:
    """Body of each training process; returns the run's summary on rank 0."""
    import torch
    from tqdm import tqdm

    from pipeline import params as params_mod
    from pipeline.model import build_model, parameter_counts, preset, save_model, unwrap
    from pipeline.train_data import CropConfig, list_shards

    params = params_mod.from_dict(config["params"], base_dir=config["base_dir"])
    p: TrainParams = params.train
    torch.set_num_threads(p.threads or max(1, int(p.cpus_per_worker)))
    rank0 = ctx.rank == 0
    export = Path(config["export_dir"])
    ckroot = Path(config["checkpoints"])
    fp = config["fingerprint"]

    spec = model_spec(p, params.seed)
    model = build_model(spec, loss_txt=p.loss_txt, loss_seg=p.loss_seg)
    counts = parameter_counts(model)
    ck = latest_checkpoint(ckroot, fp) if p.resume else None
    state: dict[str, Any] = {"step": 0, "samples": 0, "epoch": 0, "history": [], "val": [],
                             "fingerprint": fp, "wall_s": 0.0}
    other = None
    if ck is not None:
        state, other = load_checkpoint(ck, model)
        log.info("resuming from %s (step %d)", ck, state["step"])
    elif p.init_from:
        init_weights(model, spec, params.resolve(p.init_from))
        log.info("starting from the weights of %s", p.init_from)
    resumed_from = state["step"]
    torch.manual_seed(params.seed * 1000 + ctx.rank + state["step"])

    model = ctx.prepare_model(model)
    core = unwrap(model)
    device = torch.device(ctx.device)
    lr = p.lr if p.lr is not None else preset(p.preset).lr
    opt = torch.optim.AdamW(core.trainable_parameters(), lr=lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(p.warmup_steps, p.steps))
    if other is not None:
        opt.load_state_dict(other["optimizer"])
        sched.load_state_dict(other["scheduler"])
        torch.set_rng_state(other["rng"]["torch"])
        if "cuda" in other["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(other["rng"]["cuda"])

    shards = list_shards(export / "train")
    val_shards = list_shards(export / "val") if (export / "val").is_dir() else []
    cfg = CropConfig(crop=spec.crop, vlm_size=core.vlm_size, global_view=spec.global_view,
                     focus_prob=p.focus_prob, fake_min_pixels=p.fake_min_pixels)
    loader = make_loader(shards, cfg, p, rank=ctx.rank, world=ctx.world_size, seed=params.seed,
                         skip_batches=state["step"], pin_memory=device.type == "cuda")
    n_train = sum(s.count for s in shards)

    def checkpoint() -> None:
        if rank0:
            save_checkpoint(ckroot, model, opt, sched, state, p.keep_checkpoints)

    def run_val() -> None:
        if rank0 and val_shards:
            v = validate(core, val_shards, p.val_max_images, p.tile_batch)
            state["val"].append({"step": state["step"], **v})
            log.info("step %d: %s", state["step"], v)
        ctx.barrier()

    bar = tqdm(total=p.steps, initial=state["step"], desc="train", unit="step",
               disable=not (rank0 and config.get("progress", True)) or not sys.stderr.isatty(),
               dynamic_ncols=True)
    window = {"loss": 0.0, "loss_txt": 0.0, "loss_seg": 0.0, "n": 0, "samples": 0,
              "t": time.perf_counter()}
    t_start = time.perf_counter()
    wall0 = state["wall_s"]
    model.train()
    trainable = core.trainable_parameters()
    it = iter(loader)
    try:
        with _Interrupt():
            while state["step"] < p.steps:
                batch = next(it)
                epoch = batch.pop("epoch")
                out = train_step(model, opt, sched, batch, device, p.grad_clip, trainable)
                state["step"] += 1
                state["samples"] += len(batch["fake"]) * ctx.world_size
                state["epoch"] = max(state["epoch"], int(epoch))
                state["wall_s"] = wall0 + time.perf_counter() - t_start
                for k in ("loss", "loss_txt", "loss_seg"):
                    window[k] += getattr(out, k).detach()  # no device sync until logged
                window["n"] += 1
                window["samples"] += len(batch["fake"]) * ctx.world_size
                if state["step"] % p.log_every == 0 or state["step"] == p.steps:
                    dt = time.perf_counter() - window["t"]
                    row = {"step": state["step"], "samples": state["samples"],
                           "epoch": round(state["samples"] / n_train, 3),
                           **{k: round(float(window[k]) / window["n"], 5)
                              for k in ("loss", "loss_txt", "loss_seg")},
                           "lr": float(sched.get_last_lr()[0]),
                           "samples_per_s": round(window["samples"] / dt, 2) if dt > 0 else None}
                    state["history"].append(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=row["samples_per_s"])
                    window.update(loss=0.0, loss_txt=0.0, loss_seg=0.0, n=0, samples=0,
                                  t=time.perf_counter())
                bar.update(1)
                last = state["step"] == p.steps
                if state["step"] % p.val_every == 0 or last:
                    run_val()
                if state["step"] % p.checkpoint_every == 0 or last:
                    checkpoint()
    except KeyboardInterrupt:
        if state["step"] > resumed_from:
            checkpoint()
            log.warning("interrupted at step %d; checkpoint saved under %s", state["step"], ckroot)
        raise
    finally:
        bar.close()
        del it, loader
    if state["step"] == resumed_from and not state["val"] and val_shards:
        run_val()  # resumed at the end with nothing left to do: still report validation
    if not rank0:
        return None
    extra = {"params.yaml": yaml.safe_dump(config["params"], sort_keys=False),
             "export.json": json.dumps({"export": p.export, "path": str(export),
                                        "manifest_sha256": config["manifest_sha256"],
                                        "train_samples": n_train}, indent=1) + "\n"}
    save_model(model, Path(config["model_dir"]), extra)
    return {"state": state, "params": counts, "train_samples": n_train,
            "shards_read": [Path(s.url).name for s in shards], "resumed_from": resumed_from,
            "world_size": ctx.world_size, "backend": ctx.backend, "lr": lr,
            "spec": asdict(spec)}


# ---------------------------------------------------------------------------------------
# the stage


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols or ["step"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _tail_mean(rows: list[dict[str, Any]], key: str, frac: float = 0.1) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    n = max(1, int(len(vals) * frac))
    return round(float(np.mean(vals[-n:])), 5)


def run(params: Params, inputs: dict[str, Path], out: Path, executor: Executor) -> dict[str, Any]:
    """Trains on `inputs['exports'] / train.export`; writes the model to `out`
    (`data_dir/train/model`) and checkpoints to `inputs['checkpoints']`."""
    from pipeline.model import describe

    p: TrainParams = params.train
    export = find_export(inputs["exports"], p.export)
    manifest = export / "manifest.parquet"
    manifest_sha = sha256_file(manifest) if manifest.exists() else "none"
    if p.init_from:  # the starting weights are part of what is trained
        from pipeline.model import WEIGHTS

        init = params.resolve(p.init_from) / WEIGHTS
        if not init.exists():
            raise FileNotFoundError(f"train.init_from: no {init}")
        fp = fingerprint(p, params.seed, manifest_sha + "+" + sha256_file(init))
    else:
        fp = fingerprint(p, params.seed, manifest_sha)
    model_dir = Path(out).resolve()
    ckroot = Path(inputs["checkpoints"]).resolve()
    if ckroot.exists():  # checkpoints of other runs cannot be resumed: start clean
        stale = [d for d in ckroot.iterdir() if not p.resume or d.name.startswith(".")
                 or not (d / "state.json").exists()
                 or json.loads((d / "state.json").read_text()).get("fingerprint") != fp]
        for d in stale:
            log.info("removing checkpoint %s (another run)", d.name)
            shutil.rmtree(d, ignore_errors=True)
    config = {
        "params": params.to_dict(),
        "base_dir": str(Path(params.base_dir).resolve()),
        "export_dir": str(export.resolve()),
        "checkpoints": str(ckroot),
        "model_dir": str(model_dir),
        "fingerprint": fp,
        "manifest_sha256": manifest_sha,
        "progress": params.executor.progress,
    }
    t0 = time.perf_counter()
    res = executor.run_job(
        train_job, config, workers=p.num_workers,
        resources=Resources(cpus=p.cpus_per_worker, gpus=1.0 if p.use_gpu else 0.0),
        name="train", storage=model_dir.parent / "ray")
    wall = time.perf_counter() - t0
    state = res["state"]
    hist, val = state["history"], state["val"]
    _write_csv(params.plots / "train.csv", hist)
    _write_csv(params.plots / "train_val.csv", val)
    last_val = val[-1] if val else {}
    sps = [r["samples_per_s"] for r in hist if r.get("samples_per_s")]
    return {
        "preset": p.preset,
        "export": p.export,
        "export_manifest_sha256": manifest_sha,
        "fingerprint": fp,
        "backend": res["backend"],
        "world_size": res["world_size"],
        "steps": state["step"],
        "samples": state["samples"],
        "train_samples": res["train_samples"],
        "epochs": round(state["samples"] / max(1, res["train_samples"]), 3),
        "resumed_from_step": res["resumed_from"],
        "loss_first": hist[0]["loss"] if hist else None,
        "loss": _tail_mean(hist, "loss"),
        "loss_txt": _tail_mean(hist, "loss_txt"),
        "loss_seg": _tail_mean(hist, "loss_seg"),
        "samples_per_s": round(float(np.median(sps)), 2) if sps else None,
        "train_wall_s": round(state["wall_s"], 2),
        "wall_s": round(wall, 2),
        "params_total": res["params"]["total"],
        "params_trainable": res["params"]["trainable"],
        "lr": res["lr"],
        "val_pixel_f1": last_val.get("val_pixel_f1"),
        "val_image_accuracy": last_val.get("val_image_accuracy"),
        "val_images": last_val.get("val_images"),
        "shards_read": res["shards_read"],
        "model": res["spec"],
        "branches": describe(model_spec(p, params.seed)),
        "model_dir": str(model_dir),
    }


STAGE = Stage(
    name="train",
    help="fine-tune DeFakerOne (InternVL + SAM2) on an export; model to data/train/model",
    params=TrainParams,
    run=run,
    reads=("exports",),
    writes={"model": "train/model"},
    persist={"checkpoints": "train/checkpoints"},  # a killed `dvc repro` resumes from them
    uses=("seed",),
    code=("pipeline/train_data.py", "pipeline/model.py", "pipeline/views.py"),
    plots=("train.csv", "train_val.csv"),
    plot_specs={
        "train_loss": {"template": "linear", "x": "step",
                       "y": {"train.csv": ["loss", "loss_txt", "loss_seg"]}},
        "train_validation": {"template": "linear", "x": "step",
                             "y": {"train_val.csv": ["val_pixel_f1", "val_image_accuracy"]}},
    },
)
