"""Source kinds: one reader class per kind and file, one registry, typed options; forensic
layouts and operations; the embedded corpus and its `auto` domains."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, run_ingest, save, source
from PIL import Image
from skimage import data as skdata

from pipeline import domains, imageio
from pipeline.corpus import load_manifest
from pipeline.sources import READERS
from pipeline.sources.base import Reader
from pipeline.sources.package_samples import package_sample_path

CAT = Image.fromarray(skdata.chelsea()).resize((100, 80))


def test_each_kind_is_one_reader_in_its_own_file_with_frozen_typed_options():
    for kind, cls in READERS.items():
        assert issubclass(cls, Reader) and cls.kind == kind
        assert Path(cls.__module__.replace(".", "/") + ".py").name == f"{kind}.py"
        assert dataclasses.is_dataclass(cls.Options)
        assert cls.Options.__dataclass_params__.frozen
        for m in ("units", "read"):
            assert m in cls.__dict__ or any(m in b.__dict__ for b in cls.__mro__[1:-2]), (kind, m)


def test_ingest_and_corpus_do_not_branch_on_kind_names():
    for module in ("pipeline/ingest.py", "pipeline/corpus.py"):
        text = (ROOT / module).read_text()
        for kind in set(READERS) - {"blocklist"}:  # `blocklist` is also a status
            assert not re.search(rf"[\"']{kind}[\"']", text), (module, kind)
        assert not re.search(r"kind\s*(==|!=|in\b)", text), module


def test_unknown_key_names_the_allowed_keys(tmp_path):
    from conftest import write_manifest

    from pipeline.params import ParamsError

    with pytest.raises(ParamsError) as e:
        load_manifest(write_manifest(tmp_path / "m.yaml", [source("x", "forensic", tmp_path, colour=1)]))
    msg = str(e.value)
    assert "unknown key 'colour' for kind forensic" in msg
    assert "mask_threshold" in msg and "operation" in msg and "license" in msg


# --- forensic ------------------------------------------------------------------------------------


def test_forensic_folder_without_the_expected_layout_says_what_was_expected(tmp_path):
    base = tmp_path / "casia"
    save(CAT, base / "images" / "a.png", "PNG")
    save(CAT, base / "masks" / "a.png", "PNG")
    (tmp_path / "empty").mkdir()
    _, metrics, recs = run_ingest(tmp_path, [source("casia", "forensic", base, label="tampered"),
                                             source("empty", "forensic", tmp_path / "empty")])
    by = {r.source: r for r in recs}
    assert len(recs) == 2
    assert by["casia"].status == "bad_layout"
    assert "expected Tp/" in by["casia"].error and "found images, masks" in by["casia"].error
    assert "empty folder" in by["empty"].error
    assert metrics["errors_by_reason"] == {"bad_layout": 2}


def test_forensic_tampered_images_are_never_operation_none(tmp_path):
    base = tmp_path / "ds"
    m = np.zeros((80, 100), np.uint8)
    m[10:30, 10:40] = 255
    for name in ("t1", "t2"):
        save(CAT.rotate(int(name[1]) * 4), base / "Tp" / f"{name}.png", "PNG")
    save(Image.fromarray(m), base / "Gt" / "t1_mask.png", "PNG")  # t2 has no mask
    save(Image.fromarray(m), base / "Gt" / "orphan.png", "PNG")
    save(CAT, base / "Au" / "a1.png", "PNG")
    (base / "list.json").write_text(json.dumps([["Tp/t1.png", "Gt/t1_mask.png"], ["Au/a1.png", "Negative"]]))
    _, _, recs = run_ingest(tmp_path, [
        source("unknown", "forensic", base, label="tampered"),
        source("declared", "forensic", base, label="tampered", operation="splice"),
        source("imdl", "forensic", base / "list.json", label="tampered")])
    for r in recs:
        if r.label == "tampered":
            assert r.operation == ("splice" if r.source == "declared" else "unknown"), r.uri
        elif r.status == "ok":
            assert r.label == "real" and r.operation == "none" and r.mask_source == "none"
    by = {(r.source, r.uri): r for r in recs}
    assert by[("unknown", "Tp/t1.png")].status == "ok"
    assert by[("unknown", "Tp/t2.png")].status == "missing_mask"
    assert by[("unknown", "Gt/orphan.png")].status == "orphan_mask"
    assert by[("unknown", "Au/a1.png")].label == "real"
    assert by[("imdl", "Tp/t1.png")].operation == "unknown"


# --- the embedded corpus ---------------------------------------------------------------------------


def _default_items():
    for s in load_manifest(ROOT / "manifests" / "default.yaml"):
        for item in s.options.items:
            yield s, item


def test_default_corpus_has_every_domain_and_a_license_per_source():
    counts: dict[str, int] = {}
    for s, item in _default_items():
        assert package_sample_path(item).is_file(), item
        assert s.license and s.license != "unknown"
        counts[s.domain] = counts.get(s.domain, 0) + 1
    assert counts["document"] >= 2 and counts["face"] >= 2 and counts["natural"] >= 12
    assert sum(counts.values()) >= 19


def test_auto_domain_agrees_with_the_declared_domains_of_the_embedded_corpus():
    cv2.setNumThreads(1)
    for s, item in _default_items():
        rgb = imageio.read_rgb(package_sample_path(item))
        want = s.domain if s.domain != "auto" else "natural"
        assert domains.guess_domain(rgb) == want, item
        h, w = rgb.shape[:2]  # the decision does not depend on the image size
        f = (1e6 / (h * w)) ** 0.5
        big = cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
        assert domains.guess_domain(big) == want, (item, "1 MP")


def test_auto_domain_through_ingest(tmp_path):
    entries = [{**source(s.name, "package_samples", None, domain="auto"), "items": list(s.options.items)}
               for s in load_manifest(ROOT / "manifests" / "default.yaml")]
    declared = {item: s.domain for s, item in _default_items()}
    _, metrics, recs = run_ingest(tmp_path, entries)
    assert metrics["by_status"] == {"ok": len(declared)}
    for r in recs:
        assert r.domain == (declared[r.uri] if declared[r.uri] != "auto" else "natural"), r.uri


def test_auto_domain_on_awkward_images_never_fails(tmp_path):
    from conftest import awkward_corpus

    made = awkward_corpus(tmp_path / "awk")
    _, metrics, recs = run_ingest(tmp_path, [source("awk", "image_folder", tmp_path / "awk", domain="auto")])
    assert metrics["by_status"] == {"ok": len(made)}
    assert {r.domain for r in recs} <= {"natural", "face", "document"}


def test_face_check_finds_pasted_faces_on_any_background_and_none_without():
    import math

    import matplotlib
    from PIL import Image as PILImage

    cv2.setNumThreads(1)
    hopper = np.asarray(PILImage.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    heads = [skdata.astronaut()[20:240, 150:330], hopper[60:420, 80:420]]
    backgrounds = [skdata.coffee(), skdata.rocket(), skdata.hubble_deep_field(),
                   np.stack([skdata.camera()] * 3, -1), np.stack([skdata.grass()] * 3, -1)]
    rng = np.random.default_rng(0)
    for i, bg in enumerate(backgrounds):
        h, w = bg.shape[:2]
        f = (1e6 / (h * w)) ** 0.5
        big = cv2.resize(bg, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
        assert not domains.has_face(domains._small(big, 512)), i
        for head in heads:  # a head of about 8% of the image: a face box of about 4%
            side = int(math.sqrt(0.08 * big.shape[0] * big.shape[1]))
            hd = cv2.resize(head, (side, side * head.shape[0] // head.shape[1]), interpolation=cv2.INTER_AREA)
            y = rng.integers(0, big.shape[0] - hd.shape[0])
            x = rng.integers(0, big.shape[1] - hd.shape[1])
            img = big.copy()
            img[y : y + hd.shape[0], x : x + hd.shape[1]] = hd
            assert domains.guess_domain(img) == "face", i
