from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import (
    awkward_corpus,
    broken_corpus,
    local_executor,
    make_params,
    save,
    write_manifest,
)
from PIL import Image
from skimage import data as skdata

from pipeline import ingest
from pipeline.cli import run_stage
from pipeline.records import read_records


def _ingest(tmp_path: Path, sources: list[dict], **sections):
    manifest = write_manifest(tmp_path / "corpus.yaml", sources)
    params = make_params(tmp_path, [manifest], **sections)
    metrics = run_stage("ingest", params, local_executor())
    return params, metrics, read_records(params.data / "ingest" / "manifest.parquet")


def test_awkward_valid_images_are_ingested_byte_identical(tmp_path):
    root = tmp_path / "awkward"
    made = awkward_corpus(root)
    params, metrics, recs = _ingest(tmp_path, [
        {"name": "awk", "kind": "image_folder", "domain": "natural", "label": "real", "license": "x",
         "path": str(root)}])
    by_uri = {r.uri: r for r in recs}
    assert len(recs) == len(made)
    for rel, what in made.items():
        r = by_uri[rel]  # relative to the source folder
        assert r.local_path == str(root / rel)
        assert r.status == "ok", (what, r.error)
        src = (root / rel).read_bytes()
        assert (params.data / r.blob).read_bytes() == src, what
        assert r.sha256 == hashlib.sha256(src).hexdigest()
        with Image.open(root / rel) as im:
            assert (r.width, r.height) == im.size, what
        assert len(r.phash) == 16
    assert by_uri["rotated.jpg"].exif_orientation == 6
    assert by_uri["rotated.jpg"].jpeg_quality == 85
    assert by_uri["UPPER.JPG"].jpeg_quality == 92
    assert by_uri["cmyk.jpg"].mode == "CMYK"
    assert by_uri["photo.webp"].format == "webp"
    assert by_uri["scan.tif"].format == "tif"
    assert by_uri["a/same.png"].key != by_uri["b/same.png"].key
    assert metrics["by_status"] == {"ok": len(made)}


def test_bad_inputs_are_rows_with_reasons_and_good_files_survive(tmp_path):
    root = tmp_path / "mixed"
    expected = broken_corpus(root)
    save(Image.fromarray(skdata.coffee()).resize((64, 48)), root / "good.png", "PNG")
    _, _, recs = _ingest(tmp_path, [
        {"name": "mixed", "kind": "image_folder", "domain": "natural", "label": "real", "license": "x",
         "path": str(root)},
        {"name": "gone", "kind": "image_folder", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "no-such-dir")},
    ], ingest={"max_pixels": 50_000_000})
    status = {Path(r.uri).name if r.uri != "." else Path(r.local_path).name: r.status for r in recs}
    for name, reason in expected.items():
        assert status[name] == reason, name
        r = next(r for r in recs if Path(r.uri).name == name)
        assert r.error and isinstance(r.error, str)
    assert status["good.png"] == "ok"
    assert status["no-such-dir"] == "missing_path"
    m = json.loads((tmp_path / "metrics" / "ingest.json").read_text())
    for reason in expected.values():
        assert m["errors_by_reason"][reason] >= 1
    assert m["by_status"]["ok"] == 1


def test_package_samples_and_auto_domain(tmp_path):
    _, _, recs = _ingest(tmp_path, [
        {"name": "pkg", "kind": "package_samples", "domain": "auto", "label": "real", "license": "x",
         "items": ["skimage:page.png", "matplotlib:grace_hopper.jpg", "skimage:coffee.png"]}])
    dom = {r.uri: r.domain for r in recs}
    assert dom == {"skimage:page.png": "document", "matplotlib:grace_hopper.jpg": "face",
                   "skimage:coffee.png": "natural"}


def test_forensic_imdl_json_and_tp_gt(tmp_path):
    base = tmp_path / "forensic"
    img = Image.fromarray(skdata.chelsea()).resize((100, 80))
    save(img, base / "Tp" / "t1.jpg", "JPEG", quality=90)
    save(img.rotate(5), base / "Tp" / "t2.png", "PNG")
    save(img.rotate(9), base / "Tp" / "t3.png", "PNG")
    m = np.zeros((80, 100), np.uint8)
    m[10:30, 20:50] = 255
    save(Image.fromarray(m), base / "Gt" / "t1_gt.png", "PNG")
    save(Image.fromarray(np.zeros((40, 50), np.uint8)), base / "Gt" / "t2.png", "PNG")  # wrong size
    save(img, base / "Au" / "a1.jpg", "JPEG", quality=90)
    (base / "list.json").write_text(json.dumps([["Tp/t1.jpg", "Gt/t1_gt.png"], ["Au/a1.jpg", "Negative"]]))
    params, _, recs = _ingest(tmp_path, [
        {"name": "folders", "kind": "forensic", "domain": "natural", "label": "tampered", "license": "x",
         "path": str(base)},
        {"name": "imdl", "kind": "forensic", "domain": "natural", "label": "tampered", "license": "x",
         "path": str(base / "list.json")}])
    by = {(r.source, Path(r.uri).name): r for r in recs}
    t1 = by[("folders", "t1.jpg")]
    assert t1.status == "ok" and t1.mask_source == "given" and t1.label == "tampered"
    mask = np.asarray(Image.open(params.data / t1.mask_blob))
    assert mask.shape == (80, 100) and set(np.unique(mask)) == {0, 255}
    assert abs(t1.mask_area - 600 / 8000) < 1e-9
    assert by[("folders", "t2.png")].status == "mask_size_mismatch"
    assert "50x40" in by[("folders", "t2.png")].error
    assert by[("folders", "t3.png")].status == "missing_mask"
    assert by[("folders", "a1.jpg")].label == "real"
    assert by[("imdl", "t1.jpg")].mask_source == "given"
    assert by[("imdl", "a1.jpg")].label == "real"


def test_pairs_and_blocklist(tmp_path):
    img = Image.fromarray(skdata.coffee()).resize((90, 60))
    save(img, tmp_path / "p" / "orig.png", "PNG")
    edited = np.asarray(img).copy()
    edited[10:20, 10:30] = 0
    save(Image.fromarray(edited), tmp_path / "p" / "edit.png", "PNG")
    (tmp_path / "p" / "pairs.csv").write_text("original,edited\norig.png,edit.png\norig.png,missing.png\n")
    save(img, tmp_path / "block" / "bench.png", "PNG")
    _, _, recs = _ingest(tmp_path, [
        {"name": "pairs", "kind": "pairs", "domain": "natural", "label": "tampered", "license": "x",
         "path": str(tmp_path / "p" / "pairs.csv")},
        {"name": "block", "kind": "blocklist", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "block")}])
    edits = [r for r in recs if r.source == "pairs" and r.label == "tampered"]
    assert len(edits) == 2
    ok = next(r for r in edits if r.status == "ok")
    orig = next(r for r in recs if r.key == ok.parent_key)
    assert orig.label == "real" and ok.parent_blob == orig.blob and ok.mask_source == "derived"
    assert next(r for r in edits if r.status != "ok").status == "missing_file"
    block = [r for r in recs if r.source == "block"]
    assert [r.status for r in block] == ["blocklist"]


def test_hf_dataset_formats_keep_original_bytes(tmp_path):
    import datasets

    srcs = {}
    for name, fmt in (("a.jpg", "JPEG"), ("b.png", "PNG")):
        p = tmp_path / "imgs" / "train" / name
        srcs[name] = save(Image.fromarray(skdata.chelsea()).resize((70, 50)), p, fmt)
    files = [str(tmp_path / "imgs" / "train" / n) for n in sorted(srcs)]
    ds = datasets.Dataset.from_dict({"image": files, "caption": ["a cat", "a cat again"]}).cast_column(
        "image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    params, _, recs = _ingest(tmp_path, [
        {"name": "saved", "kind": "hf_dataset", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "saved"), "caption_column": "caption"},
        {"name": "pq", "kind": "hf_dataset", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "pq"), "format": "parquet"},
        {"name": "folder", "kind": "hf_dataset", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "imgs"), "format": "imagefolder"}])
    assert len(recs) == 6 and all(r.status == "ok" for r in recs)
    originals = {hashlib.sha256(b).hexdigest() for b in srcs.values()}
    for r in recs:
        assert r.sha256 in originals and (params.data / r.blob).read_bytes() in srcs.values()
    assert next(r for r in recs if r.source == "saved").caption.startswith("a cat")


def test_webdataset_source(tmp_path):
    data = save(Image.fromarray(skdata.coffee()).resize((40, 30)), tmp_path / "x.jpg", "JPEG", quality=77)
    with wds.TarWriter(str(tmp_path / "in-000.tar")) as w:
        w.write({"__key__": "s1", "jpg": data, "txt": "coffee"})
        w.write({"__key__": "s2", "cls": b"3"})
    _, _, recs = _ingest(tmp_path, [
        {"name": "w", "kind": "webdataset", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "in-*.tar"), "caption_key": "txt"}])
    by = {r.uri: r for r in recs}
    assert by["in-000.tar#s1.jpg"].status == "ok" and by["in-000.tar#s1.jpg"].jpeg_quality == 77
    assert by["in-000.tar#s1.jpg"].sha256 == hashlib.sha256(data).hexdigest()
    assert by["in-000.tar#s1.jpg"].caption == "coffee"
    assert by["in-000.tar#s2"].status == "not_an_image"


def test_jpeg_quality_estimate():
    img = Image.fromarray(skdata.coffee()).resize((64, 64))
    for q in (50, 75, 90, 95):
        import io
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        with Image.open(buf) as im:
            assert ingest.jpeg_quality(im) == q


@pytest.mark.parametrize("bad,needle", [
    ({"name": "x", "kind": "image_folder", "path": ".", "colour": "red"}, "unknown key 'colour'"),
    ({"name": "x", "kind": "folder", "path": "."}, "allowed values: package_samples"),
    ({"name": "x", "kind": "image_folder", "path": ".", "domain": "medical"}, "domain 'medical'"),
    ({"name": "x", "kind": "image_folder"}, "needs key 'path'"),
])
def test_bad_manifest_is_rejected_by_name(tmp_path, bad, needle):
    from pipeline.corpus import load_manifest
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match=needle.replace("(", r"\(")):
        load_manifest(write_manifest(tmp_path / "m.yaml", [bad]))
