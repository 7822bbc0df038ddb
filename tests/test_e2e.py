"""`python -m pipeline run` end to end on a real local Ray instance, and on the local backend."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from conftest import ROOT, only_exports, only_generators, save, write_manifest, write_params
from PIL import Image
from skimage import data as skdata

from pipeline.records import read_records

pytestmark = pytest.mark.slow


def _corpus(tmp_path):
    folder = tmp_path / "photos"
    for name in ("coffee", "chelsea", "rocket", "coins"):
        save(Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((128, 96)),
             folder / f"{name}.png", "PNG")
    save(Image.fromarray(skdata.astronaut()).resize((160, 160)), folder / "astronaut.jpg", "JPEG",
         quality=92)
    page = np.stack([skdata.page()] * 3, -1)
    save(Image.fromarray(page), tmp_path / "docs" / "page.png", "PNG")
    return write_manifest(tmp_path / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "auto", "label": "real",
         "license": "BSD-3-Clause", "path": str(folder)},
        {"name": "docs", "kind": "image_folder", "domain": "document", "label": "real",
         "license": "BSD-3-Clause", "path": str(tmp_path / "docs")},
    ])


@pytest.mark.parametrize("backend", ["ray", "local"])
def test_run_all_stages(tmp_path, backend):
    params = write_params(
        tmp_path, [_corpus(tmp_path)],
        executor={"backend": backend, "num_cpus": 2, "progress": False, "batch_size": 2},
        synthesize={"generators": only_generators(copy_move={}, removal={}, text_erase={},
                                                  gan_synthesis={}), "per_source": 2},
        export={"exports": only_exports(all={"balance": False, "imdl": False})},
        train={"export": "all", "steps": 2, "checkpoint_every": 2, "val_every": 2,
               "val_max_images": 1, "loader_workers": 0},
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "-v", "--params", str(params)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("starting ray (local instance)" in out.stderr) == (backend == "ray")
    for stage in ("ingest", "dedup", "synthesize", "masks", "split", "shard", "export", "train"):
        assert f"[{stage}]" in out.stdout  # one summary line per stage
        assert (tmp_path / "metrics" / f"{stage}.json").exists()
    rows = read_records(tmp_path / "data" / "manifest.parquet")
    assert len([r for r in rows if r.label == "real"]) == 6
    ok = [r for r in rows if r.status == "ok"]
    assert {r.label for r in ok} == {"real", "tampered", "synthetic"}
    assert {r.domain for r in ok} >= {"document", "natural", "aigc"}
    # shards: real images byte-identical to their sources, masks aligned
    sources = {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()}
    sources["page.png"] = (tmp_path / "docs" / "page.png").read_bytes()
    shipped = 0
    for tar in sorted((tmp_path / "data" / "shards").glob("*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            rec = json.loads(s["json"])
            img = Image.open(io.BytesIO(s[rec["format"]]))
            mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
            assert mask.shape == (img.height, img.width)
            if rec["label"] == "real":
                assert s[rec["format"]] in sources.values()
                assert not mask.any()
            else:
                assert mask.any()
            shipped += 1
    assert shipped == len(ok)
