"""Reading shards of several image formats with Hugging Face `datasets` (declared features,
`pipeline.load.load_shards`) and with webdataset."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from conftest import local_executor, make_params, save, write_manifest
from PIL import Image
from skimage import data as skdata

from pipeline import imageio
from pipeline.cli import run_stage
from pipeline.load import features, image_extension, load_shards
from pipeline.records import read_records
from pipeline.records import write_manifest as write_records


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Shards of a corpus in four formats: PNG, JPEG, JPEG with an EXIF orientation (so
    `exif_orientation` is null in the first samples and an integer later), WebP; plus a
    tampered sample with a given mask."""
    tmp = tmp_path_factory.mktemp("mixed")
    folder = tmp / "imgs"
    base = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(16):
        img = Image.fromarray(base[i % 4]).resize((40 + i, 32 + i % 5))
        kind = ("png", "jpg", "exif", "webp")[i % 4]
        if kind == "png":
            save(img, folder / f"i{i:02d}.png", "PNG")
        elif kind == "jpg":
            save(img, folder / f"i{i:02d}.jpg", "JPEG", quality=85)
        elif kind == "exif":
            save(img, folder / f"z{i:02d}.jpg", "JPEG", quality=90, exif=exif.tobytes())
        else:
            save(img, folder / f"i{i:02d}.webp", "WEBP", quality=80)
    corpus = write_manifest(tmp / "corpus.yaml", [
        {"name": "imgs", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "cc0", "path": str(folder)}])
    params = make_params(tmp, [corpus], shard={"max_count": 3})
    run_stage("ingest", params, local_executor())
    recs = sorted(read_records(params.data / "ingest" / "manifest.parquet"), key=lambda r: r.key)
    out = [r.replace(split="train", group_id=r.sha256) for r in recs]
    t = out[0]
    mask = np.zeros((t.height, t.width), bool)
    mask[: t.height // 2] = True
    imageio.write_bytes(params.data / "given.png", imageio.encode_mask(mask))
    out.append(t.replace(key=t.key[:-4] + "ffff", label="tampered", mask_blob="given.png",
                         mask_source="given", operation="copy_move"))
    write_records(params.data / "split" / "manifest.parquet", out)
    run_stage("shard", params, local_executor())
    recs = {r.key: r for r in out}
    assert {r.format for r in recs.values()} == {"png", "jpg", "webp"}
    assert any(r.exif_orientation for r in recs.values())
    return params.data / "shards", recs, tmp


def test_declared_features_read_every_format(mixed):
    import datasets

    shards, recs, tmp = mixed
    tars = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               features=features(), cache_dir=str(tmp / "hf"))
    assert len(ds) == len(recs)
    for row in ds:
        rec = recs[row["__key__"]]
        have = [e for e in ("jpg", "png", "webp", "tif") if row[e] is not None]
        assert have == [rec.format]
        size = (rec.width, rec.height)
        if rec.exif_orientation in (5, 6, 7, 8):  # datasets applies the EXIF rotation
            size = size[::-1]
        assert row[rec.format].size == size
        assert row["json"]["exif_orientation"] == rec.exif_orientation
        # the mask PNG carries its image's EXIF orientation: datasets turns both alike
        assert row["mask.png"].size == size


@pytest.mark.parametrize("streaming", [False, True])
def test_load_shards_gives_one_image_column(mixed, streaming):
    shards, recs, tmp = mixed
    ds = load_shards(shards, split="train", streaming=streaming, cache_dir=str(tmp / "hf2"))
    rows = list(ds)
    assert sorted(r["__key__"] for r in rows) == sorted(recs)
    for row in rows:
        rec = recs[row["__key__"]]
        assert row["image"].size == (rec.width, rec.height)  # as stored, like the mask
        assert row["image"].format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[rec.format]
        mask = np.asarray(row["mask"])
        assert mask.shape == (rec.height, rec.width)
        assert bool(mask.any()) == (rec.label == "tampered")
        assert row["json"]["sha256"] == rec.sha256 and row["diff"] is None
        assert isinstance(row["json"]["width"], int)


def test_webdataset_reads_the_same_samples(mixed):
    shards, recs, _ = mixed
    tars = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    seen = {}
    for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s[meta["format"]]))
        seen[s["__key__"]] = img.size
    assert seen == {k: (r.width, r.height) for k, r in recs.items()}
    assert {image_extension(t) for t in tars} == {"jpg", "png", "webp"}
