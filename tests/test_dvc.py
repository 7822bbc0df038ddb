"""DVC end to end on a tiny corpus in a scratch git repo: `dvc repro` twice (the second does
nothing), then a data-fraction sweep with `dvc exp run --queue -S export.fraction=...` and
`dvc queue start`, one export per fraction, nested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, save
from PIL import Image
from skimage import data as skdata

from pipeline import params as params_mod
from pipeline.stages import names as stage_names

pytestmark = pytest.mark.slow

VENV_BIN = Path(os.sys.executable).parent


def _sh(*args: str, cwd: Path, timeout: int = 600) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repo holding the project's code, dvc.yaml and a tiny corpus."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for d in ("pipeline", "generators"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for name in ("coffee", "chelsea", "rocket", "coins", "camera", "astronaut"):
        img = getattr(skdata, name)()
        img = img if img.ndim == 3 else np.stack([img] * 3, -1)
        save(Image.fromarray(img).resize((128, 96)), repo / "photos" / f"{name}.png", "PNG")
    (repo / "manifests").mkdir()
    (repo / "manifests" / "tiny.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "BSD-3-Clause", "path": "../photos"}]}))
    params = params_mod.defaults().to_dict()
    params.update(corpus=["manifests/tiny.yaml"])
    params["executor"].update(backend="local", progress=False)
    for name, spec in params["synthesize"]["generators"].items():
        spec["weight"] = 1.0 if name in ("copy_move", "removal") else 0.0
    params["split"]["ratios"] = {"train": 1.0}
    # mappings merge with the defaults key by key: `null` removes the default export
    balanced = params["export"]["exports"]["balanced"]
    params["export"]["exports"] = {"balanced": None,
                                   "sweep": {**balanced, "fractions": [1.0], "imdl": False},
                                   # nested fractions over small shards: links between them
                                   "nested": {**balanced, "fractions": [0.5, 1.0], "imdl": False,
                                              "balance": False, "max_count": 2}}
    params["train"].update(export="sweep", steps=2, checkpoint_every=2, val_every=2,
                           val_max_images=1, loader_workers=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n")
    _sh("git", "init", "-q", "-b", "main", cwd=repo)
    _sh("dvc", "init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the project's cache links
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "tiny corpus", cwd=repo)
    return repo


def test_dvc_repro_twice_second_does_nothing(repo):
    first = _sh("dvc", "repro", cwd=repo)
    for stage in stage_names():
        assert f"Running stage '{stage}'" in first
    assert json.loads((repo / "metrics" / "shard.json").read_text())["shipped"] > 0
    second = _sh("dvc", "repro", cwd=repo)
    assert "Running stage" not in second, second
    assert "up to date" in second.lower() or "didn't change" in second
    # nested fractions share their shards on disk after DVC has cached them (the project's
    # .dvc/config links outputs to the cache instead of copying them)
    half = sorted((repo / "data" / "exports" / "nested-50pct" / "train").glob("*.tar"))
    assert half
    for tar in half:
        full = repo / "data" / "exports" / "nested-100pct" / "train" / tar.name
        assert full.exists() and tar.stat().st_ino == full.stat().st_ino, tar.name
    # the model the pipeline trained loads with one function
    from pipeline.model import load_model

    model = load_model(repo / "data" / "train" / "model")
    assert model is not None
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "baseline", cwd=repo)


def test_fraction_sweep_with_dvc_queue(repo):
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the baseline from test_dvc_repro_twice_second_does_nothing")
    fractions = (0.25, 0.5)
    for f in fractions:
        _sh("dvc", "exp", "run", "--queue", "-S", f"export.fraction={f}", "-n", f"frac{int(f * 100)}",
            cwd=repo)
    _sh("dvc", "queue", "start", "-j", "1", cwd=repo)
    deadline = time.time() + 540
    while time.time() < deadline:
        status = _sh("dvc", "queue", "status", cwd=repo)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, _sh("dvc", "queue", "logs", "frac25", cwd=repo)
    samples = {}
    for f in fractions:
        name = f"frac{int(f * 100)}"
        _sh("dvc", "exp", "apply", name, cwd=repo)
        m = json.loads((repo / "metrics" / "export.json").read_text())
        assert m["fraction"] == f
        samples[f] = m["exports"]["sweep"]["samples"]
        keys = {r["key"] for r in __import__("pyarrow.parquet", fromlist=["x"]).read_table(
            repo / "data" / "exports" / "sweep" / "manifest.parquet", columns=["key"]).to_pylist()}
        samples[f] = keys
    full = json.loads(_sh("git", "show", "HEAD:metrics/export.json", cwd=repo))
    assert 0 < len(samples[0.25]) < len(samples[0.5]) < full["exports"]["sweep"]["samples"]
    assert samples[0.25] < samples[0.5]  # nested


def _corrupt_cache_files(repo: Path) -> list[str]:
    """Files of DVC's cache whose bytes no longer match the md5 they are named by."""
    import hashlib

    bad = []
    for f in (repo / ".dvc" / "cache" / "files" / "md5").glob("*/*"):
        want = f.parent.name + f.name.removesuffix(".dir")
        if hashlib.md5(f.read_bytes()).hexdigest() != want:
            bad.append(str(f.relative_to(repo)))
    return bad


def test_stages_run_outside_dvc_never_write_into_its_cache(repo):
    """The outputs DVC left are links to its cache (`.dvc/config`): a stage run directly on
    that data dir (`python -m pipeline run`, the loop, a sweep) must replace files, never
    write into them, or it would rewrite the cache's copy too (root is not stopped by the
    read-only bits)."""
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the baseline from test_dvc_repro_twice_second_does_nothing")
    _sh("dvc", "checkout", "-f", cwd=repo)
    linked = [f for f in (repo / "data").rglob("*") if f.is_file() and f.stat().st_nlink > 1]
    assert linked, "dvc left no links to its cache"
    assert not _corrupt_cache_files(repo)
    other = yaml.safe_load((repo / "params.yaml").read_text())
    other["seed"] = 1  # other forgeries, splits, shards, model and pages, same data_dir
    (repo / "other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    _sh(str(VENV_BIN / "python"), "-m", "pipeline", "run", "--params", "other.yaml", cwd=repo)
    changed = json.loads((repo / "metrics" / "synthesize.json").read_text())
    assert changed["total"] > 0
    assert not _corrupt_cache_files(repo)
