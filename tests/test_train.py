"""The train stage on a real tiny corpus built by the pipeline: streaming crops, train split
only, checkpoints, resume after kill, Ctrl-C, the model it writes, and the Ray path."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from conftest import (
    ROOT,
    local_executor,
    make_params,
    only_exports,
    only_generators,
    save,
    write_manifest,
)
from PIL import Image
from skimage import data as skdata

from pipeline import cli
from pipeline import params as params_mod
from pipeline.model import build_model, load_model
from pipeline.predict import predict_image
from pipeline.stages import names as stage_names
from pipeline.train import TrainParams, latest_checkpoint, load_checkpoint, model_spec
from pipeline.train_data import CropConfig, CropStream, LeakError, crop_sample, list_shards

TRAIN = {"export": "all", "steps": 6, "batch_size": 2, "checkpoint_every": 3, "val_every": 3,
         "log_every": 1, "loader_workers": 0, "val_max_images": 8, "tile_batch": 4}


def _corpus(root: Path) -> Path:
    folder = root / "photos"
    names = ("coffee", "chelsea", "rocket", "coins", "camera", "astronaut", "immunohistochemistry",
             "hubble_deep_field")
    for i, name in enumerate(names):
        img = np.asarray(getattr(skdata, name)())
        img = img if img.ndim == 3 else np.stack([img] * 3, -1)
        size = (100, 90) if i == 0 else (200, 150)  # one image smaller than the crop
        save(Image.fromarray(img[..., :3]).resize(size), folder / f"{name}.png", "PNG")
    return write_manifest(root / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "BSD-3-Clause", "path": str(folder)}])


def _sections(**train):
    return {
        "synthesize": {"generators": only_generators(copy_move={}, removal={}),
                       "per_source": 2},
        "split": {"ratios": {"train": 0.5, "val": 0.25, "test": 0.25},
                  "ood_operations": ["removal"]},
        "export": {"exports": only_exports(all={"balance": False, "imdl": False,
                                                "max_count": 3})},
        "train": {**TRAIN, **train},
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A data_dir with every stage up to export run on 8 photos (train/val/test/test_ood)."""
    root = tmp_path_factory.mktemp("traincorpus")
    params = make_params(root, [_corpus(root)], **_sections())
    ex = local_executor()
    for stage in stage_names()[: stage_names().index("export") + 1]:
        cli.run_stage(stage, params, ex)
    splits = {p.name for p in (root / "data" / "exports" / "all").iterdir() if p.is_dir()}
    assert {"train", "val", "test", "test_ood"} <= splits
    return root


def _params(corpus: Path, tmp_path: Path, **train):
    """Params for a training run in `tmp_path` on a copy of the corpus's exports."""
    data = tmp_path / "data"
    shutil.copytree(corpus / "data" / "exports", data / "exports")
    p = make_params(tmp_path, [corpus / "corpus.yaml"], **_sections(**train))
    return params_mod.from_dict({**p.to_dict(), "plots_dir": str(tmp_path / "plots")})


def test_train_stage_end_to_end_local(corpus, tmp_path):
    torch.set_num_threads(1)
    params = _params(corpus, tmp_path)
    m = cli.run_stage("train", params, local_executor())
    assert m["steps"] == 6 and m["samples"] == 12 and m["backend"] == "local"
    assert m["epochs"] > 0 and m["samples_per_s"] > 0 and m["train_wall_s"] > 0
    assert 0 < m["params_trainable"] <= m["params_total"]
    assert m["val_images"] >= 1 and 0.0 <= m["val_pixel_f1"] <= 1.0
    assert m["shards_read"] and all(s.startswith("train-") for s in m["shards_read"])
    saved = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert saved["steps"] == 6 and saved["loss"] == m["loss"]
    rows = (tmp_path / "plots" / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,samples,epoch,loss,loss_txt,loss_seg,lr,samples_per_s")
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    val = (tmp_path / "plots" / "train_val.csv").read_text().splitlines()
    assert val[0].startswith("step,val_images,val_pixel_f1,val_image_accuracy") and len(val) == 3
    ck = tmp_path / "data" / "train" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000003", "step-0000006"]
    # the model directory: weights, configs, tokenizer, params used, export hash; loads
    model_dir = tmp_path / "data" / "train" / "model"
    export = json.loads((model_dir / "export.json").read_text())
    assert export["manifest_sha256"] == m["export_manifest_sha256"] and export["export"] == "all"
    assert yaml.safe_load((model_dir / "params.yaml").read_text())["train"]["steps"] == 6
    model = load_model(model_dir)
    tar = min((tmp_path / "data" / "exports" / "all" / "val").glob("*.tar"))
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    rec = json.loads(sample["json"])
    rgb = np.asarray(Image.open(io.BytesIO(sample[rec["format"]])).convert("RGB"))
    pred = predict_image(model, rgb)
    assert pred.prob.shape == rgb.shape[:2] and 0 <= pred.score <= 1
    # the same params again: resumes at the end, trains nothing, same model
    again = cli.run_stage("train", params, local_executor())
    assert again["resumed_from_step"] == 6 and again["steps"] == 6
    # a changed param that matters starts over
    other = _params_with(params, steps=4)
    assert cli.run_stage("train", other, local_executor())["resumed_from_step"] == 0


def _params_with(params, **train):
    d = params.to_dict()
    d["train"].update(train)
    return params_mod.from_dict(d)


def test_missing_export_lists_available(corpus, tmp_path):
    params = _params(corpus, tmp_path, export="balanced-100pct")
    with pytest.raises(FileNotFoundError, match="train.export 'balanced-100pct'.*available exports: all"):
        cli.run_stage("train", params, local_executor())


def test_bad_train_params_are_rejected_by_name():
    with pytest.raises(params_mod.ParamsError, match="unknown key 'step'"):
        params_mod.from_dict({"train": {"step": 3}})
    with pytest.raises(params_mod.ParamsError, match="train.steps: 0"):
        params_mod.from_dict({"train": {"steps": 0}})
    with pytest.raises(params_mod.ParamsError, match="unknown preset 'big'"):
        params_mod.from_dict({"train": {"preset": "big"}})
    with pytest.raises(params_mod.ParamsError, match="train.crop: 100"):
        params_mod.from_dict({"train": {"crop": 100}})
    with pytest.raises(params_mod.ParamsError, match="train.dtype: 'fp8' is not allowed"):
        params_mod.from_dict({"train": {"dtype": "fp8"}})
    spec = model_spec(TrainParams(preset="defakerone-2b"), seed=0)
    assert spec.lora and spec.dtype == "bfloat16" and spec.crop == 1024
    assert not spec.train_vision and not spec.train_sam_encoder
    assert spec.vlm == "OpenGVLab/InternVL3-2B-hf" and spec.sam == "facebook/sam2.1-hiera-large"
    assert model_spec(TrainParams(preset="defakerone-2b", train_vision=True), 0).train_vision


def test_reads_the_train_split_only(corpus, tmp_path, monkeypatch):
    """test and test_ood tars are never opened (they are garbage here); a train tar that
    smuggles a test record stops the run."""
    import webdataset.tariterators as tarit

    torch.set_num_threads(1)
    params = _params(corpus, tmp_path, steps=3, val_every=3, checkpoint_every=3)
    exp = tmp_path / "data" / "exports" / "all"
    test_tar = min((exp / "test").glob("*.tar"))
    smuggled = next(iter(wds.WebDataset(str(test_tar), shardshuffle=False)))
    for split in ("test", "test_ood"):
        for tar in (exp / split).glob("*.tar"):
            tar.write_bytes(b"garbage, not a tar")
    opened: list[str] = []
    real = tarit.url_opener

    def spy(data, *a, **kw):
        for s in data:
            opened.append(s["url"])
            yield from real([s], *a, **kw)

    monkeypatch.setattr(tarit, "url_opener", spy)
    m = cli.run_stage("train", params, local_executor())
    assert m["steps"] == 3
    assert opened and {Path(u).parent.name for u in opened} == {"train", "val"}
    # a test record inside a train tar
    bad = exp / "train" / "train-000099.tar"
    with wds.TarWriter(str(bad)) as w:
        w.write({k: v for k, v in smuggled.items() if not k.startswith("__url")})
    (exp / "train" / "train-000099_stats.json").write_text(json.dumps({"count": 1}))
    shards = [s for s in list_shards(exp / "train") if s.url == str(bad)]
    cfg = CropConfig(crop=128, vlm_size=128)
    with pytest.raises(LeakError, match="split 'test'.*only 'train'"):
        next(iter(CropStream(shards, cfg)))


def test_crops_native_padded_and_focused():
    cfg = CropConfig(crop=128, vlm_size=64, focus_prob=1.0)
    rgb = np.random.default_rng(0).integers(0, 255, (90, 300, 3), dtype=np.uint8)
    mask = np.zeros((90, 300), bool)
    mask[40:50, 250:260] = True
    rec = {"label": "tampered", "key": "k"}
    for seed in range(20):
        s = crop_sample(rec, rgb, mask, cfg, np.random.default_rng(seed))
        assert s["sam"].shape == (3, 128, 128) and s["views"].shape == (2, 3, 64, 64)
        assert s["valid"][:90].any() and not s["valid"][90:].any()  # padded, never upscaled
        assert not s["sam"][:, 90:].any()
        n = int(s["mask"].sum())  # focused: the window holds forged pixels
        assert n > 0 and s["fake"] == int(n >= cfg.fake_min_pixels)
        # pixels and mask cut from the same window, at native resolution
        cols = s["valid"][0].sum()
        x = next(x for x in range(300 - cols + 1)
                 if np.array_equal(rgb[:, x : x + cols], s["sam"][:, :90, :cols].transpose(1, 2, 0)))
        assert np.array_equal(mask[:, x : x + cols], s["mask"][:90, :cols].astype(bool))
    real = crop_sample({"label": "real", "key": "r"}, rgb, np.zeros((90, 300), bool), cfg,
                       np.random.default_rng(0))
    assert real["fake"] == 0 and not real["mask"].any()
    synth = crop_sample({"label": "synthetic", "key": "s"}, rgb, np.ones((90, 300), bool), cfg,
                        np.random.default_rng(0))
    assert synth["fake"] == 1 and synth["mask"][:90].all()


def _keys(stream: CropStream, n: int) -> list[str]:
    it = iter(stream)
    return [next(it)["key"] for _ in range(n)]


@pytest.mark.parametrize("mode", ["by_shard", "by_sample"])
def test_each_slot_reads_its_own_part(corpus, mode):
    """Enough shards: each slot reads whole shards of its own; too few: every n-th sample.
    Either way an epoch gives every train sample to exactly one slot."""
    shards = list_shards(corpus / "data" / "exports" / "all" / "train")
    assert len(shards) >= 2
    total = sum(s.count for s in shards)
    world = 2 if mode == "by_shard" else len(shards) + 1
    cfg = CropConfig(crop=128, vlm_size=128)
    seen = []
    for rank in range(world):
        stream = CropStream(shards, cfg, rank=rank, world=world, seed=3)
        assert stream._assignment(0, rank, world)[1] == (mode == "by_sample")
        seen.append(_keys(stream, stream._epoch_len(0, rank, world)))
    flat = [k for part in seen for k in part]
    assert len(flat) == total and len(set(flat)) == total
    assert all(seen)


def test_stream_resumes_where_it_stopped(corpus):
    shards = list_shards(corpus / "data" / "exports" / "all" / "train")
    cfg = CropConfig(crop=128, vlm_size=128)
    full = _keys(CropStream(shards, cfg, seed=5, batch_size=2), 30)  # several epochs
    for skip in (3, 11):
        resumed = _keys(CropStream(shards, cfg, seed=5, batch_size=2, skip_batches=skip), 6)
        assert resumed == full[2 * skip : 2 * skip + 6]


def test_data_slots_cannot_exceed_samples(corpus):
    shards = list_shards(corpus / "data" / "exports" / "all" / "train")
    stream = CropStream(shards, CropConfig(crop=128, vlm_size=128), world=4)
    with pytest.raises(ValueError, match="lower train.loader_workers"):
        stream.check_slots(100)


def _subprocess_params(corpus: Path, tmp_path: Path, **train) -> Path:
    params = _params(corpus, tmp_path, **train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


def _start(path: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "-v", "--params", str(path)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_checkpoint(ck: Path, step: int, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in ck.glob("step-*")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(corpus, tmp_path):
    path = _subprocess_params(corpus, tmp_path, steps=60, checkpoint_every=5, val_every=1000,
                              keep_checkpoints=3)
    ck = tmp_path / "data" / "train" / "checkpoints"
    proc = _start(path, tmp_path)
    _wait_for_checkpoint(ck, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "data" / "train" / "model" / "model.safetensors").exists()
    last = max(int(p.name.split("-")[1]) for p in ck.glob("step-*"))
    assert 10 <= last < 60
    rerun = _start(path, tmp_path)
    _out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resuming from {ck / f'step-{last:07d}'} (step {last})" in err
    m = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert m["resumed_from_step"] == last and m["steps"] == 60
    steps = [int(r.split(",")[0]) for r in
             (tmp_path / "plots" / "train.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 61))  # history kept across the kill, no step twice
    assert m["samples"] == 60 * 2
    load_model(tmp_path / "data" / "train" / "model")


@pytest.mark.slow
def test_ctrl_c_leaves_a_usable_checkpoint(corpus, tmp_path):
    path = _subprocess_params(corpus, tmp_path, steps=500, checkpoint_every=5, val_every=1000)
    ck = tmp_path / "data" / "train" / "checkpoints"
    proc = _start(path, tmp_path)
    _wait_for_checkpoint(ck, 5, proc)
    time.sleep(1.0)  # between two periodic checkpoints
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "checkpoint saved" in err
    params = params_mod.load(path)
    from pipeline.train import fingerprint, sha256_file
    exp = tmp_path / "data" / "exports" / "all"
    fp = fingerprint(params.train, params.seed, sha256_file(exp / "manifest.parquet"))
    newest = latest_checkpoint(ck, fp)
    assert newest is not None and not list(ck.glob(".*tmp"))
    model = build_model(model_spec(params.train, params.seed))
    state, other = load_checkpoint(newest, model)
    assert state["step"] > 5 and f"interrupted at step {state['step']};" in err
    assert len(state["history"]) == state["step"] and "optimizer" in other


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_train_stage_on_ray(corpus, tmp_path, workers):
    """The TorchTrainer path: Ray Train workers with torch.distributed set up (gloo); with 2,
    DDP over two processes that each stream their own part of the shards."""
    path = _subprocess_params(corpus, tmp_path, steps=3, checkpoint_every=3, val_every=3,
                              loader_workers=1, num_workers=workers, cpus_per_worker=0.5)
    d = yaml.safe_load(path.read_text())
    d["executor"].update(backend="ray", num_cpus=2)
    path.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-m", "pipeline", "train", "--params", str(path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert m["backend"] == "ray" and m["world_size"] == workers and m["steps"] == 3
    assert m["samples"] == 3 * 2 * workers
    load_model(tmp_path / "data" / "train" / "model")
