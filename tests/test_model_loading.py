"""Loading a diffusers checkpoint from params is safe: no custom code, no pickles.

A tiny random-weight pipeline is saved with `save_pretrained` into a local folder (nothing
is downloaded), loaded back, then tampered with: a custom pipeline file, a custom component
module ("remote code" shipped inside the checkpoint) and pickled `.bin` weights. Each is
refused with an error that says what was found and what to do, before diffusers reads it
(`generators.diffusion.check_checkpoint`), and again by diffusers itself because the project
passes `use_safetensors=True` and `trust_remote_code=False` explicitly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from generators import diffusion as D
from generators import registry

MARKER = "code_ran.txt"  # written by the planted code if it ever runs


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-inpaint"
    D.build_random_pipeline("inpaint").save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(saved, dest)
    return dest


def _plant_code(path: Path, cls: str, base: str) -> None:
    path.write_text(
        f"open({str(path.parent / MARKER)!r}, 'w').write('ran')\n"
        f"from diffusers import {base}\n"
        f"class {cls}({base}):\n    pass\n"
    )


def _index(folder: Path, **changes) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.fixture
def tampered(saved, tmp_path) -> dict[str, Path]:
    pipe = _copy(saved, tmp_path, "custom-pipeline")
    _index(pipe, _class_name=["pipeline", "MyPipeline"])
    _plant_code(pipe / "pipeline.py", "MyPipeline", "StableDiffusionInpaintPipeline")

    remote = _copy(saved, tmp_path, "remote-code")
    _index(remote, unet=["my_unet", "MyUNet"])
    _plant_code(remote / "unet" / "my_unet.py", "MyUNet", "UNet2DConditionModel")

    pickled = _copy(saved, tmp_path, "pickled")
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))  # a pickle, as old repos ship
    weights.unlink()
    return {"custom_pipeline": pipe, "remote_code": remote, "pickled": pickled}


def test_a_saved_checkpoint_loads(saved):
    gen = registry.build("inpaint", {"model": str(saved)})
    gen.setup("cpu")
    assert gen.diffusion.loaded.model_id == str(saved)
    assert gen.diffusion.loaded.pipeline_class == "StableDiffusionInpaintPipeline"
    vae = D.load_vae("img2img", D.DiffusionParams(model=str(saved)))
    assert vae.pipeline_class == "AutoencoderKL"


@pytest.mark.parametrize(
    "case,words",
    [
        ("custom_pipeline", ["custom pipeline", "pipeline.py", "trust_remote_code"]),
        ("remote_code", ["component 'unet'", "my_unet.py", "trust_remote_code"]),
        ("pickled", ["unet/diffusion_pytorch_model.bin", "pickled", "safetensors"]),
    ],
)
def test_unsafe_checkpoints_are_refused_by_name(tampered, case, words):
    folder = tampered[case]
    for name in ("inpaint", "regeneration"):  # a pipeline and, for regeneration, the VAE too
        params = {"model": str(folder)}
        if name == "regeneration":
            params["mode"] = "vae"
        with pytest.raises(ValueError) as e:
            registry.build(name, params).setup("cpu")
        for w in words:
            assert w in str(e.value), str(e.value)
    assert not list(folder.rglob(MARKER)), "the planted code ran"


@pytest.mark.parametrize("case", ["custom_pipeline", "remote_code", "pickled"])
def test_diffusers_refuses_them_too_with_the_flags_we_pass(tampered, monkeypatch, case):
    """Defence in depth: with the pre-check out of the way, diffusers still refuses, because
    `use_safetensors=True` and `trust_remote_code=False` are passed explicitly (without
    `use_safetensors`, diffusers 0.42 unpickles the `.bin`)."""
    monkeypatch.setattr(D, "check_checkpoint", lambda *a, **k: None)
    folder = tampered[case]
    with pytest.raises((ValueError, OSError)) as e:
        D.load_pipeline("inpaint", D.DiffusionParams(model=str(folder)))
    assert "safetensors" in str(e.value) or "trust_remote_code" in str(e.value)
    assert not list(folder.rglob(MARKER)), "the planted code ran"


def test_trust_remote_code_is_a_param_and_off_by_default(tampered, monkeypatch):
    seen = {}

    def fake(model, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(diffusers.StableDiffusionInpaintPipeline, "from_pretrained", fake)
    folder = str(tampered["custom_pipeline"])
    with pytest.raises(RuntimeError, match="stop before loading"):
        D.load_pipeline("inpaint", D.DiffusionParams(model=folder, trust_remote_code=True))
    assert seen["trust_remote_code"] is True and seen["use_safetensors"] is True
    assert D.DiffusionParams().trust_remote_code is False
    # a pickle is refused whatever trust_remote_code says: convert it to safetensors
    with pytest.raises(ValueError, match="pickled"):
        D.check_checkpoint(str(tampered["pickled"]), trust_remote_code=True)
