"""The synthesize stage on a tiny ingested corpus, with the in-process executor.

Checks what the stage adds over the generators: deterministic bytes, format follows the
source (JPEG at its quality, PNG stays PNG), paste-back in the shipped bytes, the mix of
generators and forgeries per source, unsuitable sources recorded as `skipped`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, local_executor, save, write_manifest
from PIL import Image
from skimage import data as skdata

from generators import registry
from pipeline import imageio, synthesize
from pipeline.cli import run_stage
from pipeline.ingest import jpeg_quality
from pipeline.params import ParamsError, dump_defaults, from_dict
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
    assert {(r.format, r.mode) for r in plain} == {("png", "RGB")}
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


def test_round_jobs_draw_donors_from_train_sources_of_their_domain():
    """A round's splice takes its donor from the train sources of its domain, never itself;
    the only train source of its domain gets none. Sources are found by key (binary search
    in the sorted keys), rows in a `SourceTable` or a list alike."""
    rows = [synthesize.SourceRow(f"s{i:03d}", "src", f"id{i}", f"g{i}", None, "cc0",
                                 "face" if i == 7 else "natural", f"b/{i}.png", "png", None,
                                 None, None) for i in range(40)]
    split = {r.key: ("train", "train", "val", "test")[i % 4] for i, r in enumerate(rows)}
    split["s007"] = "train"
    p = synthesize.SynthesizeParams()
    train = [r.key for r in rows if split[r.key] == "train" and r.domain == "natural"]
    plan = {"round": 3, "jobs": [{"generator": "splice", "source": k} for k in train]
            + [{"generator": "face_swap", "source": "s007"},
               {"generator": "splice", "source": "s002"},  # val: refused
               {"generator": "splice", "source": "nope"}]}  # not a source: refused
    jobs, problems = synthesize.plan_round(plan, rows, p, 9, lambda r: split[r.key])
    assert len(problems) == 2 and "not train" in problems[0] and "nope" in problems[1]
    donors = [j["donor"].key for j in jobs["splice"]]
    assert [j["source"].key for j in jobs["splice"]] == train
    assert all(d in train and d != s for d, s in zip(donors, train))
    assert len(set(donors)) > len(train) // 3  # spread over the pool, not one image
    assert jobs["face_swap"][0]["donor"] is None  # the only train face
    again, _ = synthesize.plan_round(plan, rows, p, 9, lambda r: split[r.key])
    assert again == jobs


def test_the_mix_draw_is_numpys_choice_without_replacement():
    """`plan` draws each source's generators with `_draw`, numpy's weighted choice without
    replacement written out (a fifth of the time): the same indices, in the same order,
    from the same stream, also when draws repeat an index (one heavy weight)."""
    rs = np.random.default_rng(0)
    for trial in range(3000):
        n = int(rs.integers(1, 14))
        k = int(rs.integers(1, n + 1))
        w = rs.choice([0.01, 0.1, 0.5, 1.0, 2.0, 3.0, 10.0], size=n)
        if trial % 3 == 0:
            w[0] = 100.0
        prob = w / w.sum()
        seed = int(rs.integers(0, 2**63))
        want = np.random.default_rng(seed).choice(n, size=k, replace=False, p=prob)
        assert synthesize._draw(np.random.default_rng(seed), prob.tolist(), k) == want.tolist()


def test_sources_are_read_as_slim_rows_and_plan_the_same(tmp_path):
    """Issue 16: the stage holds its sources as Arrow columns of the `SourceRow` fields
    (`SourceTable`, not full Records, not a list of rows) and its jobs as indices; the
    sources are exactly the shippable real rows, sorted, and the plan of them is the plan of
    the full Records."""
    from pipeline.records import write_manifest as write_rows

    rows = [Record(key=f"r{i:03d}", source="s", source_id=f"sid{i % 7}", label="real",
                   domain=("natural", "face", "document")[i % 3], blob=f"b/{i}.png",
                   format="png", license="cc0", jpeg_quality=None if i % 2 else 90,
                   phash_variants="k" + "0" * 80)
            for i in range(60)]
    rows[3] = rows[3].replace(status="truncated")
    rows[4] = rows[4].replace(label="tampered")
    rows[5] = rows[5].replace(blob=None)
    rows[6] = rows[6].replace(kind="blocklist")
    rows.reverse()  # a manifest in any order
    path = write_rows(tmp_path / "m.parquet", rows) and tmp_path / "m.parquet"
    sources = synthesize.load_sources(path)
    full = sorted((r for r in rows if synthesize.is_source(r)), key=lambda r: r.key)
    assert [s.key for s in sources] == [r.key for r in full] and len(full) == 56
    assert isinstance(sources, synthesize.SourceTable)
    assert sources.table.column_names == list(synthesize.SourceRow._fields)
    assert sources.keys == [r.key for r in full]
    head = sources[:10]
    assert isinstance(head, synthesize.SourceTable) and len(head) == 10
    assert list(head) == list(sources)[:10] and head[-1] == sources[9]
    assert sources.rows([5, 2]) == [sources[5], sources[2]]
    for s, r in zip(sources, full):
        assert s == tuple(getattr(r, f) for f in synthesize.SourceRow._fields)
    p = synthesize.SynthesizeParams(per_source=2)
    split_of = {r.key: ("train", "val", "test")[int(r.key[1:]) % 3] for r in full}
    slim = synthesize.plan(sources, p, seed=2, split_of=lambda r: split_of[r.key])
    wide = synthesize.plan(full, p, seed=2, split_of=lambda r: split_of[r.key])
    assert set(slim) == set(wide) and sum(len(v) for v in slim.values()) == 112

    def ids(jobs):
        return [(j["source"].key, j["donor"] and j["donor"].key, j["key"], j["seed"])
                for j in jobs]

    for name in wide:
        assert ids(slim[name]) == ids(wide[name]), name
        assert ids(slim[name][1:3]) == ids(wide[name])[1:3]  # slices read like lists
    assert isinstance(slim["copy_move"], synthesize.Jobs)


def test_jobs_go_to_the_executor_in_windows_with_the_same_output(tmp_path, corpus,
                                                                 monkeypatch):
    """A generator's jobs become dicts a window at a time: windows of one job give the
    same rows, bytes and metrics as one window, build each generator once, and with `reuse`
    put reused and forged rows in plan order (the order of a fresh run)."""
    built: Counter = Counter()
    factory_call = synthesize._Factory.__call__

    def counted(self):
        built[self.name] += 1
        return factory_call(self)

    monkeypatch.setattr(synthesize._Factory, "__call__", counted)
    synth = {"generators": gens(copy_move=1, removal=1), "per_source": 2}
    params, m1, _, a = _run(tmp_path / "one", corpus, **synth)
    assert built == {"copy_move": 1, "removal": 1}
    monkeypatch.setattr(synthesize, "_WINDOW_JOBS", 1)
    _, m2, _, b = _run(tmp_path / "two", corpus, **synth)
    assert built == {"copy_move": 2, "removal": 2}  # once per run, not once per window
    assert len(a) >= 6 and max(v["planned"] for v in m1["per_generator"].values()) >= 3
    assert [(r.key, r.status, r.sha256) for r in a] == [(r.key, r.status, r.sha256) for r in b]
    assert m1["per_generator"] == m2["per_generator"]

    # reuse with one forgery's file gone: it alone is forged again, in its place
    lost = next(r for r in a[1:] if r.status == "ok" and r.generator == "copy_move")
    for window in (1, 20_000):
        monkeypatch.setattr(synthesize, "_WINDOW_JOBS", window)
        (params.data / lost.blob).unlink()
        built.clear()
        p2 = _params(params.data, corpus, **synth, reuse=True)
        out = params.data / "synthesize"
        m = synthesize.run(p2, {"manifest": params.data / "ingest" / "manifest.parquet"}, out,
                           local_executor())
        again = [r for r in read_records(out / "manifest.parquet") if r.stage == "synthesize"]
        assert [(r.key, r.sha256) for r in again] == [(r.key, r.sha256) for r in a], window
        assert m["reused"] == len(a) - 1 and built == {"copy_move": 1}, window


def test_a_stopped_run_keeps_its_rows_and_a_reuse_rerun_forges_only_the_rest(
        tmp_path, corpus, monkeypatch):
    """A failure that escapes the workers (a lost worker, an interrupt) leaves the rows
    written so far in `manifest.partial.parquet`; a rerun with `reuse` takes them and forges
    the rest, to the manifest of an uninterrupted run."""
    synth = {"generators": gens(copy_move=1, removal=1), "per_source": 2}
    params, _, _, fresh = _run(tmp_path / "fresh", corpus, **synth)
    calls = Counter()
    worker_call = synthesize._Worker.__call__

    def flaky(self, jobs):
        calls["jobs"] += len(jobs)
        if calls["jobs"] > 3 and not calls["failed"]:
            calls["failed"] += 1
            raise RuntimeError("worker lost")
        return worker_call(self, jobs)

    monkeypatch.setattr(synthesize._Worker, "__call__", flaky)
    p1 = _params(tmp_path / "run", corpus, **synth, reuse=True)
    ex = local_executor()
    run_stage("ingest", p1, ex)
    out = p1.data / "synthesize"
    inputs = {"manifest": p1.data / "ingest" / "manifest.parquet"}
    with pytest.raises(RuntimeError, match="worker lost"):
        synthesize.run(p1, inputs, out, ex)
    assert not (out / "manifest.parquet").exists()
    kept = [r for r in read_records(out / "manifest.partial.parquet") if r.stage == "synthesize"]
    assert 0 < len(kept) < len(fresh)
    calls.clear()
    calls["failed"] = 1
    m = synthesize.run(p1, inputs, out, ex)
    assert m["reused"] == len(kept) and calls["jobs"] == len(fresh) - len(kept)
    again = [r for r in read_records(out / "manifest.parquet") if r.stage == "synthesize"]
    assert [(r.key, r.sha256) for r in again] == [(r.key, r.sha256) for r in fresh]
    assert not (out / "manifest.partial.parquet").exists()


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


# --------------------------------------------------------------------------- no shortcuts


def _containers(root: Path) -> Path:
    """Real images in many containers and modes, each made to look like what is in the wild."""
    from PIL import ImageCms

    folder = root / "containers"
    coffee = Image.fromarray(skdata.coffee()).resize((176, 128))
    chelsea = Image.fromarray(skdata.chelsea()).resize((160, 120))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    rgba = np.asarray(coffee.convert("RGBA")).copy()
    rgba[:, :40, 3] = 90  # a translucent band and a transparent corner
    rgba[:16, :16, 3] = 0
    frames = [chelsea.convert("P"), chelsea.rotate(5).convert("P")]
    save(coffee, folder / "camera.jpg", "JPEG", quality=78, subsampling=2, progressive=True,
         exif=exif.tobytes(), icc_profile=icc, optimize=True)
    save(chelsea, folder / "q95_444.jpg", "JPEG", quality=95, subsampling=0)
    save(coffee.convert("CMYK"), folder / "cmyk.jpg", "JPEG", quality=88)
    save(chelsea.convert("L"), folder / "grey.jpg", "JPEG", quality=70)
    save(Image.fromarray(rgba), folder / "alpha.png", "PNG", compress_level=9)
    save(chelsea.convert("L"), folder / "grey.png", "PNG", compress_level=1)
    save(coffee.convert("P"), folder / "palette.png", "PNG")
    save(chelsea.convert("LA"), folder / "grey_alpha.png", "PNG")
    save(Image.fromarray(np.asarray(coffee.convert("L"), np.uint16) * 257), folder / "deep.png", "PNG")
    save(chelsea, folder / "scan.bmp", "BMP")
    save(coffee.convert("P"), folder / "palette.bmp", "BMP")
    save(chelsea.convert("P"), folder / "still.gif", "GIF")
    frames[0].save(folder / "animated.gif", "GIF", save_all=True, append_images=frames[1:])
    save(coffee, folder / "lossy.webp", "WEBP", quality=55)
    save(chelsea, folder / "lossless.webp", "WEBP", lossless=True)
    save(coffee, folder / "scan.tif", "TIFF", compression="tiff_lzw")
    return write_manifest(
        root / "containers.yaml",
        [{"name": "containers", "kind": "image_folder", "domain": "natural", "label": "real",
          "license": "test", "path": str(folder)}],
    )


def _jpeg_header(im: Image.Image, data: bytes) -> tuple:
    from PIL import JpegImagePlugin

    return (
        im.quantization,
        JpegImagePlugin.get_sampling(im),
        bool(im.info.get("progressive")),
        bool(imageio._jpeg_optimized(data) or im.info.get("progressive")),
        im.info.get("exif"),
        im.info.get("icc_profile"),
        "jfif" in im.info,
    )


@pytest.fixture(scope="module")
def containers_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("containers")
    return root, _run(root / "data", _containers(root), generators=gens(copy_move=1), per_source=1)


def test_forgeries_keep_their_sources_container(containers_run):
    """Issue 10 points 5-6, issue 17 point 3: container, mode, alpha, JPEG tables,
    subsampling, progressive and Huffman flags, EXIF and ICC, WebP kind follow the source;
    outside the edit a lossless forgery keeps the source's stored values exactly."""
    root, (params, _, inputs, forged) = containers_run
    by_key = {r.key: r for r in inputs}
    seen, with_patch = set(), set()
    for r in forged:
        assert r.status == "ok", r.error
        src = by_key[r.parent_key]
        name = src.uri.rsplit("/", 1)[-1]
        a = (params.data / src.blob).read_bytes()
        b = (params.data / r.blob).read_bytes()
        with Image.open(io.BytesIO(a)) as ia, Image.open(io.BytesIO(b)) as ib:
            assert (ib.format, r.format) == (ia.format, src.format), name
            assert (ib.mode, r.mode) == (ia.mode, ia.mode), name
            assert ib.size == ia.size
            if ia.format == "JPEG":
                assert _jpeg_header(ia, a) == _jpeg_header(ib, b), name
                assert r.jpeg_quality == src.jpeg_quality
            if ia.format == "WEBP":
                assert imageio._webp_lossless(a) == imageio._webp_lossless(b), name
            lossy = ia.format in ("JPEG",) or (ia.format == "WEBP" and not imageio._webp_lossless(a))
            ia.seek(0)
            stored_a, stored_b = np.asarray(ia), np.asarray(ib)
        prov = json.loads(r.params)
        if not lossy:
            requested = imageio.read_mask(params.data / r.requested_mask_blob)
            outside = ~_dilated(requested, params.synthesize.paste_back_dilate)
            assert np.array_equal(stored_a[outside], stored_b[outside]), name
            assert not np.array_equal(stored_a, stored_b), name
            if ia.mode in ("RGBA", "LA"):
                assert np.array_equal(stored_a[..., -1], stored_b[..., -1]), "alpha changed"
        # a lossy codec moved pixels: the pixels as made are kept where they changed the
        # source, and only there (masks derives the edit from them)
        if r.precodec_blob:
            source = imageio.decode(a)
            made = imageio.apply_patch(source, (params.data / r.precodec_blob).read_bytes())
            requested = imageio.read_mask(params.data / r.requested_mask_blob)
            outside = ~_dilated(requested, params.synthesize.paste_back_dilate)
            assert np.array_equal(made[outside], source[outside]), name
            assert not np.array_equal(made, source), name
            assert not np.array_equal(made, imageio.decode(b)), name
            with_patch.add(name)
        if name == "animated.gif":  # cannot be reproduced: the row says why
            assert any("first frame" in u for u in prov["encoding"]["unmatched"])
        else:
            assert "unmatched" not in prov["encoding"], (name, prov["encoding"])
        seen.add(name)
    assert len(seen) == 16
    # only lossy codecs move pixels; a palette, grey or alpha container is exact in its mode
    assert with_patch == {"camera.jpg", "q95_444.jpg", "cmyk.jpg", "grey.jpg", "lossy.webp"}


def test_full_synthesis_ships_at_the_generators_size(tmp_path, corpus):
    """Issue 10 point 7: no upscaling; the record's size is the image's and the mask is
    built from it (shard writes all-255 masks of width x height)."""
    params, _, inputs, forged = _run(
        tmp_path / "gan", corpus, generators=gens(gan_synthesis=1, t2i_synthesis=1, regeneration=1),
        per_source=3,
    )
    assert {r.generator for r in forged} == {"gan_synthesis", "t2i_synthesis", "regeneration"}
    by_key = {r.key: r for r in inputs}
    for r in forged:
        assert r.status == "ok" and r.label == "synthetic" and r.mask_source == "full", r.error
        with Image.open(params.data / r.blob) as im:
            assert im.size == (r.width, r.height)
        src = by_key[r.parent_key]
        if r.generator == "gan_synthesis":
            assert (r.width, r.height) == (64, 64)
        else:  # the stand-in's 64 px work size at the source's aspect ratio
            assert max(r.width, r.height) == 64 and max(src.width, src.height) > 64
            assert (r.width >= r.height) == (src.width >= src.height)
        assert r.format == src.format  # still encoded like its source


# --------------------------------------------------------------------------- params and plan


def test_bad_generator_param_is_rejected_when_params_load(tmp_path, corpus):
    """Issue 14 point 2: `params: {modle: x}` fails at load, naming the key and the allowed
    ones, before any stage runs (also through the CLI, with exit status 2)."""
    with pytest.raises(ParamsError) as e:
        _params(tmp_path, corpus, generators={"inpaint": {"params": {"modle": "x"}}})
    msg = str(e.value)
    assert "generators.inpaint.params: unknown key 'modle'" in msg
    assert "allowed keys:" in msg and "model" in msg and "num_inference_steps" in msg
    for bad, word in [
        ({"inpaint": {"params": {"strength": 2}}}, "strength 2.0; allowed: 0 < strength <= 1"),
        ({"copy_move": {"params": {"shape": "square"}}}, "'square' is not allowed"),
        ({"removal": {"params": {"methods": []}}}, "methods []; allowed: a non-empty list"),
        ({"edit": {"params": {"size": "big"}}}, "size"),
        ({"copy_move": {"weight": float("inf")}}, "weight: inf is not allowed"),
        ({"copy_move": {"weight": float("nan")}}, "weight: nan is not allowed"),
        ({"copy_move": {"weight": -1}}, "weight -1"),
        ({"copy_move": {"device": "gpu"}}, "device 'gpu'"),
    ]:
        with pytest.raises(ParamsError, match=re.escape(word)):
            _params(tmp_path, corpus, generators=bad)
    with pytest.raises(ParamsError, match="max_sources"):
        _params(tmp_path, corpus, max_sources=-1)
    # through the CLI: rejected before ingest creates anything
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "never"), "corpus": [str(corpus)],
        "executor": {"backend": "local"},
        "synthesize": {"generators": {"inpaint": {"params": {"modle": "x"}}}},
    }))
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--params", str(bad)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2 and "unknown key 'modle'" in out.stderr
    assert not (tmp_path / "never").exists()


def test_generator_params_are_typed_and_shown_in_the_defaults():
    from generators.natural.inpaint import InpaintParams

    p = from_dict({"synthesize": {"generators": {"inpaint": {"params": {"prompts": ["a fox"]}}}}})
    spec = p.synthesize.generators["inpaint"]
    assert isinstance(spec.params, InpaintParams)
    assert spec.params.prompts == ("a fox",) and spec.params.strength == 1.0
    defaults = yaml.safe_load(dump_defaults())["synthesize"]["generators"]
    assert defaults["inpaint"]["params"]["num_inference_steps"] == 2
    assert defaults["copy_move"]["params"]["shape"] == "ellipse"
    assert all(v["params"] for v in defaults.values())  # no `params: {}` left
    # the defaults file round-trips to the same params
    again = from_dict({"synthesize": {"generators": defaults}})
    assert again.synthesize == synthesize.SynthesizeParams()


def _sources(**domains: int) -> list[Record]:
    return sorted(
        (r for d, n in domains.items() for r in _fake_sources(n, d)), key=lambda r: r.key
    )


def test_plan_gives_every_generator_work_on_a_small_corpus():
    """Issue 14 point 4: the embedded corpus's mix (2 documents, 9 natural, 2 faces) with
    per_source 2 plans every generator, faces get face generators, and the plan is a pure
    function; a generator no source can take gets none."""
    sources = _sources(document=2, natural=9, face=2)
    p = synthesize.SynthesizeParams()
    for seed in range(20):
        jobs = synthesize.plan(sources, p, seed=seed)
        assert set(jobs) == set(registry.REGISTRY), seed
        assert sum(len(v) for v in jobs.values()) == 2 * len(sources)
        for name, js in jobs.items():
            domain = registry.generator_class(name).domain
            assert all(j["source"].domain in (domain, "aigc") or domain == "aigc" for j in js)
        per_source = Counter(j["source"].key for js in jobs.values() for j in js)
        assert set(per_source.values()) == {2}
    assert synthesize.plan(sources, p, seed=3) == synthesize.plan(sources, p, seed=3)
    only_natural = synthesize.plan(_sources(natural=5), p, seed=0)
    assert not {"face_swap", "text_erase"} & set(only_natural)


def test_zero_forgeries_and_stand_ins_are_warned_about(tmp_path, corpus, caplog):
    """Issue 14 point 1: a run that plans nothing says why. Issue 10 point 12: stand-in
    generators and their counts are named, with their model ids recorded."""
    with caplog.at_level(logging.WARNING, logger="pipeline.synthesize"):
        _, metrics, _, forged = _run(
            tmp_path / "zero", corpus, generators=gens(copy_move=0, face_edit=0)
        )
    assert forged == [] and metrics["total"] == 0
    assert "0 forgeries planned for 5 sources" in caplog.text
    assert "weight 0" in caplog.text and "copy_move" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.synthesize"):
        _, metrics, _, forged = _run(
            tmp_path / "docs", corpus, generators=gens(text_erase=1, copy_move=1)
        )
    assert "text_erase forges document sources and the sources are face, natural" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.synthesize"):
        _, metrics, _, forged = _run(
            tmp_path / "stand", corpus, generators=gens(inpaint=1, copy_move=1), per_source=2
        )
    n = sum(r.generator == "inpaint" and r.status == "ok" for r in forged)
    assert n == 3 and all(
        r.model_id.startswith("tiny-random:") for r in forged if r.generator == "inpaint"
    )
    model_id = next(r.model_id for r in forged if r.generator == "inpaint")
    assert metrics["stand_ins"] == {"inpaint": {model_id: 3}}
    assert f"3 forgeries come from random-weight stand-in models (inpaint 3 ({model_id}))" in (
        caplog.text
    )


def test_default_corpus_plan_forges_every_generator(tmp_path):
    """Issue 14 point 4: on the embedded corpus (`manifests/default.yaml`) with the default
    params, every generator is planned, and both face sources get face generators."""
    params = from_dict({
        "data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics"),
        "corpus": [str(ROOT / "manifests" / "default.yaml")],
        "executor": {"backend": "local", "progress": False},
    })  # fmt: skip
    run_stage("ingest", params, local_executor())
    rows = read_records(params.data / "ingest" / "manifest.parquet")
    sources = sorted((r for r in rows if synthesize.is_source(r)), key=lambda r: r.key)
    jobs = synthesize.plan(sources, params.synthesize, params.seed)
    assert set(jobs) == set(registry.REGISTRY)
    faces = {r.key for r in sources if r.domain == "face"}
    assert len(faces) == 2
    for key in faces:
        names = {n for n, js in jobs.items() for j in js if j["source"].key == key}
        assert len(names) == 2 and names & {"face_swap", "face_edit"}, names


def test_donors_pair_sources_so_linked_groups_stay_small():
    """A splice or face swap ties its source's and its donor's groups together in split;
    donors are partners two by two, so a linked unit is at most three groups whatever the
    corpus size and mix, and a source's donor does not depend on the generator mix."""
    sources = _sources(natural=51)
    heavy = synthesize.SynthesizeParams(
        generators={"splice": synthesize.GeneratorSpec(weight=5.0),
                    "copy_move": synthesize.GeneratorSpec()},
        per_source=2,
    )
    parent = {s.key: s.key for s in sources}

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k

    donors = {}
    for job in synthesize.plan(sources, heavy, seed=4)["splice"]:
        donors[job["source"].key] = job["donor"].key
        parent[root(job["source"].key)] = root(job["donor"].key)
    assert len(donors) == 51  # every source spliced (weight 5 of 6, two slots)
    units = Counter(root(k) for k in parent)
    assert max(units.values()) <= 3 and sorted(units.values()).count(3) == 1
    light = synthesize.SynthesizeParams(
        generators={"splice": synthesize.GeneratorSpec(), "removal": synthesize.GeneratorSpec(),
                    "copy_move": synthesize.GeneratorSpec()},
        per_source=1,
    )
    for job in synthesize.plan(sources, light, seed=4)["splice"]:
        assert donors[job["source"].key] == job["donor"].key


def test_donors_come_from_their_sources_split():
    """Issue 14 point 6: the split of each group is decided before synthesis
    (`split.plan_groups`), and a splice or face swap takes its donor from its source's split,
    so donor pixels never cross splits; a group in no split (near a blocklist item) gets none."""
    sources = _sources(natural=40)
    which = {s.key: ("train", "val", "test", None)[i % 4] for i, s in enumerate(sources)}
    p = synthesize.SynthesizeParams(
        generators={"splice": synthesize.GeneratorSpec(weight=5.0),
                    "copy_move": synthesize.GeneratorSpec()},
        per_source=2,
    )
    jobs = synthesize.plan(sources, p, seed=4, split_of=lambda r: which[r.key])["splice"]
    assert len(jobs) > 20
    for job in jobs:
        src = job["source"].key
        if which[src] is None:
            assert job["donor"] is None
        else:
            assert job["donor"] is not None and which[job["donor"].key] == which[src]


@pytest.mark.slow
def test_ray_and_local_backends_give_the_same_bytes(tmp_path, corpus):
    """Issue 17 point 10: the diffusers generators that moved by one level between thread
    counts (Ray workers run with one thread, a local run with all cores) give the same
    forgeries on both backends, and every file the run ships (shards, exports, the final
    manifest) has the same bytes, with one Ray worker or two."""
    got, shipped = {}, {}
    for run, backend, cpus in (("local", "local", 2), ("ray", "ray", 2), ("ray1", "ray", 1)):
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump({
            "data_dir": str(tmp_path / run), "metrics_dir": str(tmp_path / f"m-{run}"),
            "corpus": [str(corpus)], "seed": 11,
            "executor": {"backend": backend, "num_cpus": cpus, "progress": False},
            "synthesize": {"generators": gens(t2i_synthesis=1, regeneration=1, edit=1,
                                              inpaint=1), "per_source": 2},
        }))  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--params", str(path), "--to", "export"],
            capture_output=True, text=True, cwd=tmp_path, timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        rows = read_records(tmp_path / run / "synthesize" / "manifest.parquet")
        got[run] = {r.key: (r.status, r.sha256) for r in rows if r.stage == "synthesize"}
        data = tmp_path / run
        shipped[run] = {
            str(f.relative_to(data)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted([data / "manifest.parquet", *data.glob("shards/**/*"),
                             *data.glob("exports/**/*")])
            if f.is_file()}
    assert got["local"] == got["ray"] == got["ray1"]
    assert len(shipped["local"]) > 10
    for run in ("ray", "ray1"):
        differ = sorted(k for k in shipped["local"].keys() | shipped[run].keys()
                        if shipped["local"].get(k) != shipped[run].get(k))
        assert not differ, (run, differ)
    assert sum(s == "ok" for s, _ in got["local"].values()) >= 8
