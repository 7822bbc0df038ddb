"""Golden bytes: a fixed tiny run must write the same shards as when the goldens were made.

The pipeline is deterministic (same inputs and params, same bytes); this pins it across
dependency upgrades (Pillow's encoders, zlib, diffusers, torch kernels...), which can change
bytes silently. When a change of bytes is intended, regenerate the goldens and commit them
with the change that explains it:

    UPDATE_GOLDENS=1 .venv/bin/python -m pytest tests/test_goldens.py

which rewrites `tests/goldens.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    local_executor,
    make_params,
    only_exports,
    only_generators,
    save,
    write_manifest,
)
from PIL import Image
from skimage import data as skdata

from pipeline.cli import run_stage
from pipeline.stages import names

GOLDENS = Path(__file__).with_name("goldens.json")
# stages whose outputs are pinned (the model stages are pinned by their own tests)
CORPUS_STAGES = ("ingest", "dedup", "synthesize", "masks", "split", "shard", "export")


def _run(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    for name, size in (("coffee", (160, 107)), ("chelsea", (150, 100)), ("rocket", (140, 96))):
        img = Image.fromarray(getattr(skdata, name)()).resize(size)
        save(img, folder / f"{name}.png", "PNG")
    save(Image.fromarray(skdata.astronaut()).resize((128, 128)), folder / "astro.jpg", "JPEG",
         quality=88)
    page = skdata.page()
    save(Image.fromarray(np.stack([page] * 3, -1)), tmp_path / "docs" / "page.png", "PNG")
    corpus = write_manifest(tmp_path / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "test", "path": str(folder)},
        {"name": "docs", "kind": "image_folder", "domain": "document", "label": "real",
         "license": "test", "path": str(tmp_path / "docs")},
    ])
    params = make_params(
        tmp_path, [corpus],
        synthesize={"generators": only_generators(copy_move={}, removal={}, inpaint={},
                                                  text_erase={}, gan_synthesis={}),
                    "per_source": 2},
        split={"ratios": {"train": 0.5, "val": 0.25, "test": 0.25}},
        export={"exports": only_exports(golden={"fractions": [0.5, 1.0], "imdl": False})},
    )
    ex = local_executor()
    for stage in names():
        if stage in CORPUS_STAGES:
            run_stage(stage, params, ex)
    return params.data


def _digests(data: Path) -> dict[str, str]:
    out = {}
    for f in sorted([*data.glob("shards/*/*.tar"), *data.glob("exports/*/*/*.tar")]):
        out[str(f.relative_to(data))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_a_fixed_tiny_run_writes_the_golden_bytes(tmp_path):
    got = _digests(_run(tmp_path))
    assert got, "the run wrote no shards"
    if os.environ.get("UPDATE_GOLDENS"):
        GOLDENS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"goldens rewritten: {GOLDENS}")
    want = json.loads(GOLDENS.read_text())
    changed = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    assert set(got) == set(want) and not changed, (
        f"shard bytes changed: {changed or sorted(set(got) ^ set(want))}. If intended, "
        "regenerate with UPDATE_GOLDENS=1 (see this module's docstring)"
    )
