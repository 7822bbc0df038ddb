"""The synthesize stage on a tiny ingested corpus, with the in-process executor.

Checks what the stage adds over the generators: deterministic bytes, format follows the
source (JPEG at its quality, PNG stays PNG), paste-back in the shipped bytes, the mix of
generators and forgeries per source, unsuitable sources recorded as `skipped`.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import local_executor, save, write_manifest
from PIL import Image
from skimage import data as skdata

from pipeline import imageio, synthesize
from pipeline.cli import run_stage
from pipeline.ingest import jpeg_quality
from pipeline.params import ParamsError, from_dict
from pipeline.records import Record, read_records

SOURCE_JPEG_QUALITY = 83


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Natural photos (a JPEG and two PNGs), a face photo and a faceless 'face' photo."""
    root = tmp_path_factory.mktemp("corpus")
    nat, face = root / "natural", root / "faces"
    save(
        Image.fromarray(skdata.chelsea()).resize((180, 120)),
        nat / "chelsea.jpg",
        "JPEG",
        quality=SOURCE_JPEG_QUALITY,
    )
    save(Image.fromarray(skdata.coffee()).resize((160, 120)), nat / "coffee.png", "PNG")
    save(Image.fromarray(skdata.rocket()).resize((120, 160)), nat / "rocket.png", "PNG")
    save(Image.fromarray(skdata.astronaut()).resize((160, 160)), face / "astronaut.png", "PNG")
    save(Image.fromarray(skdata.coffee()).resize((150, 110)), face / "no_face.png", "PNG")
    return write_manifest(
        root / "corpus.yaml",
        [
            {
                "name": "photos",
                "kind": "image_folder",
                "domain": "natural",
                "label": "real",
                "license": "test",
                "path": str(nat),
            },
            {
                "name": "faces",
                "kind": "image_folder",
                "domain": "face",
                "label": "real",
                "license": "test",
                "path": str(face),
            },
        ],
    )


def _params(data_dir: Path, corpus: Path, **synth):
    return from_dict(
        {
            "data_dir": str(data_dir),
            "metrics_dir": str(data_dir / "metrics"),
            "corpus": [str(corpus)],
            "seed": 11,
            "executor": {"backend": "local", "progress": False},
            "synthesize": synth,
        }
    )


def _run(data_dir: Path, corpus: Path, **synth) -> tuple[object, dict, list[Record], list[Record]]:
    """Ingest then synthesize into `data_dir`; returns (params, metrics, inputs, forged rows)."""
    params = _params(data_dir, corpus, **synth)
    ex = local_executor()
    run_stage("ingest", params, ex)
    manifest = params.data / "ingest" / "manifest.parquet"
    out = params.data / "synthesize"
    metrics = synthesize.run(params, {"manifest": manifest}, out, ex)
    rows = read_records(out / "manifest.parquet")
    inputs = [r for r in rows if r.stage == "ingest"]
    forged = [r for r in rows if r.stage == "synthesize"]
    return params, metrics, inputs, forged


def gens(**weights: float) -> dict:
    """Just these generators (the others removed: params mappings merge with the defaults)."""
    from generators.registry import REGISTRY

    return {name: {"weight": weights[name]} if name in weights else None for name in REGISTRY}


def _dilated(mask: np.ndarray, r: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), k) > 0


def test_stage_is_deterministic(tmp_path, corpus):
    synth = {
        "generators": gens(copy_move=1, removal=1, face_edit=1, gan_synthesis=1),
        "per_source": 2,
    }
    _, m1, _, a = _run(tmp_path / "one", corpus, **synth)
    _, _, _, b = _run(tmp_path / "two", corpus, **synth)
    assert [r.key for r in a] == [r.key for r in b]
    ok = [r for r in a if r.status == "ok"]
    assert len(ok) >= 6 and m1["by_status"]["ok"] == len(ok)
    for ra, rb in zip(a, b):
        assert (ra.status, ra.sha256, ra.seed, ra.params) == (
            rb.status,
            rb.sha256,
            rb.seed,
            rb.params,
        )
        if ra.status == "ok":
            pa = tmp_path / "one" / ra.blob
            pb = tmp_path / "two" / rb.blob
            assert pa.read_bytes() == pb.read_bytes()
            assert ra.sha256 is not None
    # seeds derive from (global seed, forgery key): another global seed, other forgeries
    other = _params(tmp_path / "three", corpus, **synth)
    assert synthesize.derive_seed(other.seed + 1, a[0].key) != a[0].seed


def test_format_follows_the_source(tmp_path, corpus):
    _, _, inputs, forged = _run(
        tmp_path / "like", corpus, generators=gens(copy_move=1), per_source=1
    )
    by_key = {r.key: r for r in inputs}
    jpeg_seen = png_seen = 0
    for r in forged:
        assert r.status == "ok", r.error
        src = by_key[r.parent_key]
        assert r.format == src.format
        data = (tmp_path / "like" / r.blob).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == {"jpg": "JPEG", "png": "PNG"}[src.format]
            assert im.size == (src.width, src.height)
            if src.format == "jpg":
                jpeg_seen += 1
                assert src.jpeg_quality == SOURCE_JPEG_QUALITY
                assert abs(jpeg_quality(im) - SOURCE_JPEG_QUALITY) <= 2
                assert r.jpeg_quality == src.jpeg_quality
            else:
                png_seen += 1
        prov = json.loads(r.params)
        assert prov["encoded_like_source"] is True and prov["source_format"] == src.format
    assert jpeg_seen == 1 and png_seen == 2  # copy_move forges the natural photos only

    _, _, _, plain = _run(
        tmp_path / "png",
        corpus,
        generators=gens(copy_move=1),
        per_source=1,
        match_source_format=False,
    )
    assert {r.format for r in plain} == {"png"}
    assert all(json.loads(r.params)["encoded_like_source"] is False for r in plain)
    assert all(r.jpeg_quality is None for r in plain)


def test_paste_back_holds_in_the_shipped_bytes(tmp_path, corpus):
    params, _, inputs, forged = _run(
        tmp_path / "pb", corpus, generators=gens(inpaint=1, removal=1, copy_move=1), per_source=3
    )
    dilate = params.synthesize.paste_back_dilate
    by_key = {r.key: r for r in inputs}
    checked = Counter()
    for r in forged:
        assert r.status == "ok", r.error
        src = by_key[r.parent_key]
        if src.format != "png":
            continue
        assert r.parent_blob == src.blob and r.requested_mask_blob
        forged_px = imageio.read_rgb(params.data / r.blob)
        source_px = imageio.read_rgb(params.data / src.blob)
        requested = imageio.read_mask(params.data / r.requested_mask_blob)
        assert requested.shape == forged_px.shape[:2] and requested.any()
        outside = ~_dilated(requested, dilate)
        assert np.array_equal(forged_px[outside], source_px[outside]), r.generator
        assert (forged_px != source_px).any(axis=2)[~outside].any(), "no visible edit"
        checked[r.generator] += 1
    assert checked == {"inpaint": 2, "removal": 2, "copy_move": 2}  # the two natural PNGs


def test_per_source_count_and_zero_weights(tmp_path, corpus):
    _, metrics, inputs, forged = _run(
        tmp_path / "mix",
        corpus,
        generators=gens(copy_move=1, removal=1, gan_synthesis=1, splice=0, face_edit=1),
        per_source=2,
    )
    per_parent = Counter(r.parent_key for r in forged)
    assert set(per_parent) == {r.key for r in inputs}
    assert set(per_parent.values()) == {2}
    for parent in per_parent:
        names = [r.generator for r in forged if r.parent_key == parent]
        assert len(set(names)) == 2
        domain = next(r.domain for r in inputs if r.key == parent)
        allowed = {"copy_move", "removal"} if domain == "natural" else {"face_edit"}
        assert set(names) <= allowed | {"gan_synthesis"}
    assert "splice" not in {r.generator for r in forged}
    assert metrics["sources"] == 5 and metrics["total"] == 10
    assert sum(v["planned"] for v in metrics["per_generator"].values()) == 10


def _fake_sources(n: int, domain: str) -> list[Record]:
    return [
        Record(
            key=f"{domain}{i:04d}",
            source="s",
            label="real",
            domain=domain,
            blob="x.png",
            format="png",
        )
        for i in range(n)
    ]


def test_plan_respects_generator_and_domain_weights():
    sources = _fake_sources(400, "natural")
    p = synthesize.SynthesizeParams(
        generators={
            "copy_move": synthesize.GeneratorSpec(weight=3.0),
            "removal": synthesize.GeneratorSpec(weight=1.0),
            "gan_synthesis": synthesize.GeneratorSpec(weight=1.0),
        },
        domain_weights={"natural": 1.0, "aigc": 0.0},
        per_source=1,
    )
    jobs = synthesize.plan(sources, p, seed=5)
    n = {k: len(v) for k, v in jobs.items()}
    assert "gan_synthesis" not in n  # its domain weighs 0
    assert n["copy_move"] + n["removal"] == 400
    assert 0.68 < n["copy_move"] / 400 < 0.82  # 3:1, about 0.75
    assert jobs == synthesize.plan(sources, p, seed=5)  # a pure function of its inputs
    assert jobs != synthesize.plan(sources, p, seed=6)
    # per_source larger than the generators that fit a source: each is used once
    p2 = synthesize.SynthesizeParams(
        generators={"copy_move": synthesize.GeneratorSpec()}, per_source=3
    )
    assert len(synthesize.plan(sources[:10], p2, seed=5)["copy_move"]) == 10


def test_unsuitable_sources_are_skipped_rows(tmp_path, corpus):
    _, metrics, inputs, forged = _run(
        tmp_path / "skip", corpus, generators=gens(face_edit=1, face_swap=1), per_source=2
    )
    faces = {r.key: r for r in inputs if r.domain == "face"}
    assert len(forged) == 2 * len(faces)  # every planned forgery is a row
    by = {(faces[r.parent_key].uri.split("/")[-1], r.generator): r for r in forged}
    for gen in ("face_edit", "face_swap"):
        bad = by[("no_face.png", gen)]
        assert bad.status == "skipped" and "face" in bad.error
        assert bad.blob is None and bad.generator == gen
    assert by[("astronaut.png", "face_edit")].status == "ok"
    # face_swap on the astronaut has no other face image to take a donor from
    assert by[("astronaut.png", "face_swap")].status == "skipped"
    assert metrics["by_status"]["skipped"] == 3
    # the input rows pass through
    assert len(inputs) == 5


def test_unknown_generator_in_params_is_rejected(tmp_path, corpus):
    with pytest.raises(ParamsError, match="valid generators: .*copy_move"):
        _params(tmp_path, corpus, generators={"nope": {}})
    with pytest.raises(ParamsError, match="weight"):
        _params(tmp_path, corpus, generators={"copy_move": {"wieght": 2}})
