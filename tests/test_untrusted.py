"""Untrusted corpora (issue 17): bad given masks, EXIF orientation, malformed listings,
broken WebDataset tars, wrongly typed manifests, hostile folders, local paths in shipped
records. Each case ends in a row with its reason or a params error naming the key; no
traceback, no hang, no silent wrong label, no good image lost. The README's reliability
table lists these cases."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_ingest, save, ship, source, write_manifest
from PIL import Image, ImageOps
from skimage import data as skdata

from pipeline import imageio
from pipeline.params import ParamsError

CAT = Image.fromarray(skdata.chelsea()).resize((100, 80))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture
def no_hang():
    """Fails a test that runs longer than 60 s instead of hanging the suite."""
    def boom(*_):
        raise TimeoutError("ingest hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# --- 1. given masks ---------------------------------------------------------------------------


def _region() -> np.ndarray:
    m = np.zeros((80, 100), bool)
    m[10:30, 20:60] = True
    return m


def test_given_masks_any_nonzero_pixel_is_tampered_and_empty_masks_are_rows(tmp_path):
    base = tmp_path / "ds"
    region = _region()
    masks = {
        "red": np.where(region[..., None], np.array([255, 0, 0], np.uint8), 0).astype(np.uint8),
        "zero_one": region.astype(np.uint8),  # 0/1 values
        "grey76": (region * 76).astype(np.uint8),
        "white": (region * 255).astype(np.uint8),
        "empty": np.zeros((80, 100), np.uint8),
    }
    for name, m in masks.items():
        save(CAT, base / "Tp" / f"{name}.png", "PNG")
        save(Image.fromarray(m), base / "Gt" / f"{name}.png", "PNG")
    rgba = np.zeros((80, 100, 4), np.uint8)  # white on transparent
    rgba[region] = (255, 255, 255, 255)
    save(CAT, base / "Tp" / "rgba.png", "PNG")
    save(Image.fromarray(rgba, "RGBA"), base / "Gt" / "rgba_mask.png", "PNG")
    params, _, recs = run_ingest(tmp_path, [source("ds", "forensic", base, label="tampered")])
    by = {Path(r.uri).stem: r for r in recs}
    for name in ("red", "zero_one", "grey76", "white", "rgba"):
        r = by[name]
        assert r.status == "ok" and r.mask_source == "given", (name, r.status, r.error)
        assert r.mask_area == pytest.approx(region.mean()), name
        stored = imageio.read_mask(params.data / r.mask_blob)
        assert (stored == region).all(), name
    assert by["empty"].status == "empty_mask" and "mask_threshold" in by["empty"].error
    assert by["empty"].mask_blob is None


def test_declared_mask_threshold_ignores_noise_below_it(tmp_path):
    base = tmp_path / "ds"
    region = _region()
    noisy = np.where(region, 250, 0).astype(np.uint8)
    noisy[60:70, 70:90] = 12  # JPEG-like noise far from the region
    save(CAT, base / "Tp" / "a.png", "PNG")
    save(Image.fromarray(noisy), base / "Gt" / "a.png", "PNG")
    _, _, loose = run_ingest(tmp_path / "t0", [source("ds", "forensic", base, label="tampered")])
    _, _, strict = run_ingest(tmp_path / "t127", [source("ds", "forensic", base, label="tampered",
                                                         mask_threshold=127)])
    assert loose[0].mask_area == pytest.approx(region.mean() + 200 / 8000)
    assert strict[0].mask_area == pytest.approx(region.mean())


# --- 2. EXIF orientation: every reader agrees on mask vs image --------------------------------


def _oriented_corpus(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A real JPEG with EXIF orientation 6 and two tampered ones with a bright square and
    its given mask: one mask in stored pixels, one drawn on the displayed (rotated) image."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = np.asarray(CAT).copy()  # stored 100 x 80
    region = _region()
    photo[region] = (255, 255, 0)
    folder, base = tmp_path / "photos", tmp_path / "forensic"
    folder.mkdir()
    (folder / "rotated.jpg").write_bytes(_jpeg(CAT, exif=exif.tobytes()))
    for name in ("stored", "displayed"):
        (base / "Tp").mkdir(parents=True, exist_ok=True)
        (base / "Tp" / f"{name}.jpg").write_bytes(_jpeg(Image.fromarray(photo), exif=exif.tobytes()))
    save(Image.fromarray(region.astype(np.uint8) * 255), base / "Gt" / "stored.png", "PNG")
    shown = ImageOps.exif_transpose(Image.open(base / "Tp" / "stored.jpg")).size
    assert shown == (80, 100)  # displayed rotated
    disp = Image.fromarray(region.astype(np.uint8) * 255).transpose(Image.Transpose.ROTATE_270)
    save(disp, base / "Gt" / "displayed.png", "PNG")
    return folder, base, region


def test_exif_orientation_masks_agree_with_images_in_every_reader(tmp_path):
    import cv2

    folder, base, region = _oriented_corpus(tmp_path)
    params, _, recs = run_ingest(tmp_path, [
        source("photos", "image_folder", folder),
        source("forensic", "forensic", base, label="tampered")])
    assert all(r.status == "ok" for r in recs), [(r.uri, r.status, r.error) for r in recs]
    assert {r.exif_orientation for r in recs} == {6}
    # both given masks end up in stored-pixel orientation, equal to the truth
    for r in recs:
        if r.label == "tampered":
            assert (imageio.read_mask(params.data / r.mask_blob) == region).all(), r.uri
    samples = ship(params)
    assert len(samples) == 3
    for s in samples:
        meta = json.loads(s["json"])
        img_b, mask_b = s["jpg"], s["mask.png"]
        img, mask = Image.open(io.BytesIO(img_b)), Image.open(io.BytesIO(mask_b))
        # raw readers (PIL as stored, webdataset's "pil" decoder): stored orientation
        assert img.size == mask.size == (100, 80)
        # EXIF-aware readers (exif_transpose as Hugging Face datasets does; cv2.imdecode)
        ti, tm = ImageOps.exif_transpose(img), ImageOps.exif_transpose(mask)
        assert ti.size == tm.size == (80, 100)
        ci = cv2.imdecode(np.frombuffer(img_b, np.uint8), cv2.IMREAD_COLOR)
        cm = cv2.imdecode(np.frombuffer(mask_b, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert ci.shape[:2] == cm.shape == (100, 80)
        if meta["label"] == "tampered":  # the bright square is where the mask is, in every view
            for im, m in ((np.asarray(img.convert("RGB")), np.asarray(mask)),
                          (np.asarray(ti.convert("RGB")), np.asarray(tm)),
                          (ci[..., ::-1], cm)):
                yellow = (im[..., 0] > 200) & (im[..., 1] > 200) & (im[..., 2] < 90)
                inside = m > 0
                assert (yellow & inside).sum() / inside.sum() > 0.9
                assert (yellow & ~inside).sum() < 0.02 * inside.sum()
        else:
            assert not np.asarray(tm).any()


def test_exif_orientation_through_hugging_face_datasets(tmp_path):
    import datasets

    folder, base, _ = _oriented_corpus(tmp_path)
    params, _, _ = run_ingest(tmp_path, [source("photos", "image_folder", folder),
                                         source("forensic", "forensic", base, label="tampered")])
    ship(params)
    tars = sorted(str(p) for p in (params.data / "shards").rglob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 3
    for row in ds:  # datasets applies exif_transpose to both
        assert row["jpg"].size == row["mask.png"].size == (80, 100)


# --- 4. bad entries are rows ------------------------------------------------------------------


def test_imdl_json_bad_entries_are_rows_and_good_entries_survive(tmp_path):
    base = tmp_path / "imdl"
    save(CAT, base / "a.png", "PNG")
    save(CAT.rotate(5), base / "b.png", "PNG")
    save(Image.fromarray(_region().astype(np.uint8) * 255), base / "b_gt.png", "PNG")
    entries = [["a.png", "Negative"], [], None, {"image": "a.png"}, ["a.png"], [5, "Negative"],
               ["b.png", "b_gt.png"], ["a.png", "Negative"]]
    (base / "list.json").write_text(json.dumps(entries))
    (base / "broken.json").write_text("[[\"a.png\", \"Negative\"], oops")
    (base / "dict.json").write_text(json.dumps({"a.png": "Negative"}))
    _, metrics, recs = run_ingest(tmp_path, [
        source("list", "forensic", base / "list.json", label="tampered"),
        source("broken", "forensic", base / "broken.json", label="tampered"),
        source("dict", "forensic", base / "dict.json", label="tampered")])
    lst = [r for r in recs if r.source == "list"]
    assert len(lst) == len(entries)  # one row per entry, none lost
    assert sorted(r.status for r in lst) == sorted(["ok", "ok", "duplicate_entry"] + ["bad_entry"] * 5)
    bad = [r for r in lst if r.status == "bad_entry"]
    assert {r.uri for r in bad} == {f"list.json[{i}]" for i in (1, 2, 3, 4, 5)}
    assert all("expected [image path" in r.error for r in bad)
    b = next(r for r in lst if r.uri == "b.png")
    assert b.label == "tampered" and b.mask_source == "given"
    for name in ("broken", "dict"):
        (r,) = [r for r in recs if r.source == name]
        assert r.status == "bad_listing" and r.error
    assert metrics["errors_by_reason"]["bad_entry"] == 5


def test_pairs_bad_rows_and_wrong_columns_are_rows(tmp_path):
    p = tmp_path / "p"
    save(CAT, p / "o.png", "PNG")
    edited = np.asarray(CAT).copy()
    edited[5:15, 5:25] = 0
    save(Image.fromarray(edited), p / "e.png", "PNG")
    (p / "short.csv").write_text("original,edited\no.png,e.png\no.png\n,e.png\n")
    (p / "cols.csv").write_text("a,b\no.png,e.png\n")
    (p / "rows.jsonl").write_text("\n".join([
        json.dumps({"original": "o.png", "edited": "e.png"}), json.dumps({"original": 5, "edited": "e.png"}),
        json.dumps({"original": None, "edited": "e.png"}), "not json", json.dumps(["o.png", "e.png"])]))
    (p / "binary.csv").write_bytes(b"\xff\xfe\x00garbage\x00")
    _, _, recs = run_ingest(tmp_path, [source(n, "pairs", p / f, label="tampered") for n, f in
                                       (("short", "short.csv"), ("cols", "cols.csv"),
                                        ("rows", "rows.jsonl"), ("binary", "binary.csv"))])
    by = {}
    for r in recs:
        by.setdefault(r.source, []).append(r)
    short = by["short"]
    assert [r.status for r in short] == ["ok", "ok", "bad_entry", "bad_entry"]
    assert "'edited'" in short[2].error and "'original'" in short[3].error
    (cols,) = by["cols"]
    assert cols.status == "bad_listing" and "columns are a, b" in cols.error
    rows = by["rows"]
    assert [r.status for r in rows] == ["ok", "ok", "bad_entry", "bad_entry", "bad_entry", "bad_entry"]
    assert "got 5" in rows[2].error and "got None" in rows[3].error and "not JSON" in rows[4].error
    (binary,) = by["binary"]
    assert binary.status == "bad_listing"


def test_hf_dataset_missing_image_file_is_a_row(tmp_path):
    import datasets

    good = tmp_path / "imgs" / "a.png"
    data = save(CAT, good, "PNG")
    gone = tmp_path / "imgs" / "gone.png"
    save(CAT, gone, "PNG")  # exists while the datasets are written, deleted before ingest
    ds = datasets.Dataset.from_dict({"image": [str(good), str(gone), "", None]})
    ds.save_to_disk(str(tmp_path / "paths"))
    feat = datasets.Dataset.from_dict({"image": [str(good), str(gone)]})
    feat = feat.cast_column("image", datasets.Image(decode=False))
    feat.to_parquet(str(tmp_path / "pq" / "d.parquet"))
    gone.unlink()
    _, _, recs = run_ingest(tmp_path, [source("paths", "hf_dataset", tmp_path / "paths"),
                                       source("feat", "hf_dataset", tmp_path / "pq", format="parquet")])
    status = {(r.source, r.uri): r.status for r in recs}
    assert status == {("paths", "#0"): "ok", ("paths", "#1"): "missing_file",
                      ("paths", "#2"): "not_an_image", ("paths", "#3"): "not_an_image",
                      ("feat", "train#0"): "ok", ("feat", "train#1"): "missing_file"}
    ok = [r for r in recs if r.status == "ok"]
    assert all(r.sha256 == hashlib.sha256(data).hexdigest() for r in ok)


# --- 5. WebDataset tars as streams ------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]], link: str | None = None) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)


def test_webdataset_never_drops_good_images_and_records_what_it_cannot_use(tmp_path):
    imgs = {i: _jpeg(CAT.rotate(3 * i)) for i in range(14)}
    members = [
        ("s01.jpg", imgs[0]), ("s01.txt", b"first"),
        ("s02.jpg", imgs[1]), ("s02.jpg", imgs[2]),  # duplicate member name
        ("s03.jpg", imgs[3]), ("s03.png", imgs[4]),  # two images under one key
        ("s04.cls", b"7"),  # no image
        ("s01.png", imgs[5]),  # a key that comes back later
        ("README", b"no extension"),
    ] + [(f"t{i:02d}.jpg", imgs[i]) for i in range(6, 13)]  # 7 good samples after all that
    _tar(tmp_path / "w-000.tar", members, link="s99.jpg")
    full = (tmp_path / "w-000.tar").read_bytes()
    (tmp_path / "cut-000.tar").write_bytes(full[: 512 * 14])  # breaks inside the tar
    _, _, recs = run_ingest(tmp_path, [
        source("w", "webdataset", tmp_path / "w-*.tar", caption_key="txt"),
        source("cut", "webdataset", tmp_path / "cut-*.tar")])
    w = {r.uri: r for r in recs if r.source == "w"}
    ok = {u for u, r in w.items() if r.status == "ok"}
    assert ok == {"w-000.tar#s01.jpg", "w-000.tar#s02.jpg", "w-000.tar#s02.jpg@2", "w-000.tar#s03.jpg",
                  "w-000.tar#s03.png", "w-000.tar#s01.png"} | {f"w-000.tar#t{i:02d}.jpg" for i in range(6, 13)}
    assert {w[u].sha256 for u in ok} == {hashlib.sha256(imgs[i]).hexdigest() for i in range(13)}
    assert w["w-000.tar#s01.jpg"].caption == "first"
    assert w["w-000.tar#s04"].status == "not_an_image" and "cls" in w["w-000.tar#s04"].error
    assert w["w-000.tar#README"].status == "not_an_image"
    assert w["w-000.tar#s99.jpg"].status == "not_a_file"
    assert len(w) == 13 + 3
    cut = [r for r in recs if r.source == "cut"]
    assert cut[-1].status == "bad_tar" and "after member" in cut[-1].error
    kept = [r for r in cut if r.status == "ok"]
    assert kept and all(w[r.uri.replace("cut-", "w-")].sha256 == r.sha256 for r in kept)


def test_webdataset_member_over_the_size_cap_is_a_row(tmp_path):
    big, small = _jpeg(Image.fromarray(skdata.astronaut())), _jpeg(CAT)
    _tar(tmp_path / "w.tar", [("big.jpg", big), ("small.jpg", small)])
    _, _, recs = run_ingest(tmp_path, [source("w", "webdataset", tmp_path / "w.tar")],
                            ingest={"max_bytes": len(small) + 1})
    assert {r.uri: r.status for r in recs} == {"w.tar#big.jpg": "too_large", "w.tar#small.jpg": "ok"}


# --- 6. manifest field types --------------------------------------------------------------------


@pytest.mark.parametrize("extra,needle", [
    ({"extensions": 5}, "extensions must be a list of strings or null, got 5"),
    ({"extensions": "png"}, "extensions must be a list of strings or null, got 'png'"),
    ({"extensions": []}, "extensions must list at least one"),
    ({"generator": 12}, "generator must be a string or null, got 12"),
    ({"recursive": "no"}, "recursive must be true or false, got 'no'"),
    ({"path": 123}, "path must be a string, got 123"),
    ({"follow_external_links": 1}, "follow_external_links must be true or false"),
])
def test_wrongly_typed_folder_keys_are_params_errors(tmp_path, extra, needle):
    from pipeline.corpus import load_manifest

    entry = {**source("x", "image_folder", tmp_path), **extra}
    with pytest.raises(ParamsError, match=needle.replace("(", r"\(")):
        load_manifest(write_manifest(tmp_path / "m.yaml", [entry]))


@pytest.mark.parametrize("entry,needle", [
    ({"kind": "webdataset", "path": "x.tar", "image_keys": "jpg"}, "image_keys must be a list of strings"),
    ({"kind": "forensic", "path": "x", "mask_threshold": 300}, "mask_threshold 300"),
    ({"kind": "forensic", "path": "x", "mask_threshold": "high"}, "mask_threshold must be an integer"),
    ({"kind": "forensic", "path": "x", "operation": "none"}, "operation 'none' is for real images"),
    ({"kind": "forensic", "path": "x", "format": "zip"}, "format must be one of 'auto'"),
    ({"kind": "hf_dataset", "path": "x", "image_column": 3}, "image_column must be a string"),
    ({"kind": "pairs", "path": "x", "original_column": "a", "edited_column": "a"}, "must differ"),
    ({"kind": "package_samples", "items": "skimage:page.png"}, "items must be a list of strings"),
    ({"kind": "package_samples", "items": ["numpy:x.png"]}, "is not 'package:file'"),
    ({"kind": "image_folder", "path": "x", "license": 5}, "license must be a non-empty string"),
    ({"kind": "image_folder", "path": ""}, "path must not be empty"),
])
def test_wrongly_typed_kind_keys_are_params_errors(tmp_path, entry, needle):
    from pipeline.corpus import load_manifest

    entry = {"name": "x", "domain": "natural", "label": "real", "license": "t", **entry}
    with pytest.raises(ParamsError, match=needle.replace("(", r"\(")):
        load_manifest(write_manifest(tmp_path / "m.yaml", [entry]))


def test_data_dir_that_is_a_file_is_a_params_error(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, write_params

    from pipeline.params import from_dict

    (tmp_path / "file").write_text("x")
    for d in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ParamsError, match="data_dir"):
            from_dict({"data_dir": str(d)})
    params = write_params(tmp_path, [ROOT / "manifests" / "default.yaml"])
    text = params.read_text().replace(str(tmp_path / "data"), str(tmp_path / "file"))
    params.write_text(text)
    out = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--params", str(params)],
                         check=False, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "data_dir" in out.stderr and "Traceback" not in out.stderr


# --- 7. untrusted folders -----------------------------------------------------------------------


def test_hostile_folder_entries_are_rows_and_never_hang(tmp_path, monkeypatch, no_hang):
    root, outside = tmp_path / "photos", tmp_path / "elsewhere"
    good = {f"g{i}.png": save(CAT.rotate(7 * i), root / f"g{i}.png", "PNG") for i in range(3)}
    good["sub/g9.png"] = save(CAT.rotate(40), root / "sub" / "g9.png", "PNG")
    secret = save(CAT.rotate(90), outside / "secret.png", "PNG")
    save(CAT.rotate(60), outside / "dir" / "x.png", "PNG")
    os.mkfifo(root / "fifo.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "outdir").symlink_to(outside / "dir")
    (root / "loop").symlink_to(root)  # a folder link back inside
    (root / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000)
    locked = root / "locked"
    save(CAT, locked / "hidden.png", "PNG")
    real_scandir = os.scandir
    if os.geteuid() == 0:  # root reads any folder: make this one fail as it would for a user
        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied")
            return real_scandir(path)
        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        _, _, recs = run_ingest(tmp_path, [source("photos", "image_folder", root)],
                                ingest={"max_bytes": 100_000})
        _, _, follow = run_ingest(tmp_path / "f", [source("photos", "image_folder", root,
                                                          follow_external_links=True)],
                                  ingest={"max_bytes": 100_000})
    finally:
        locked.chmod(0o755)
    status = {r.uri: r.status for r in recs}
    assert status == {
        **{u: "ok" for u in good},
        "fifo.png": "not_a_file", "zero.png": "external_link", "out.png": "external_link",
        "outdir": "external_link", "loop": "linked_directory", "big.png": "too_large",
        "locked": "unreadable_dir",
    }
    assert all(r.local_path and r.local_path.startswith(str(root)) for r in recs)
    fstatus = {r.uri: r.status for r in follow}
    assert fstatus["zero.png"] == "not_a_file"  # a character device is never read
    assert fstatus["out.png"] == "ok" and fstatus["outdir/x.png"] == "ok"
    (out,) = [r for r in follow if r.uri == "out.png"]
    assert out.sha256 == hashlib.sha256(secret).hexdigest()


def test_missing_and_non_folder_sources_are_rows(tmp_path):
    save(CAT, tmp_path / "a.png", "PNG")
    _, _, recs = run_ingest(tmp_path, [source("gone", "image_folder", tmp_path / "nope"),
                                       source("file", "image_folder", tmp_path / "a.png"),
                                       source("tars", "webdataset", tmp_path / "w-{000..001}.tar")])
    status = {(r.source, r.uri): r.status for r in recs}
    assert status == {("gone", "."): "missing_path", ("file", "."): "not_a_directory",
                      ("tars", "w-000.tar"): "missing_file", ("tars", "w-001.tar"): "missing_file"}


# --- 8. shipped records carry paths relative to the source root ------------------------------------


def test_shipped_records_carry_no_local_paths(tmp_path):
    root = tmp_path / "private" / "layout" / "photos"
    save(CAT, root / "a" / "one.png", "PNG")
    (root / "two.jpg").parent.mkdir(parents=True, exist_ok=True)
    (root / "two.jpg").write_bytes(_jpeg(CAT))
    params, _, recs = run_ingest(tmp_path, [source("photos", "image_folder", root)])
    assert sorted(r.uri for r in recs) == ["a/one.png", "two.jpg"]
    samples = ship(params)
    assert len(samples) == 2
    secret = str(tmp_path)
    for s in samples:
        assert secret not in s["json"].decode()
    for p in (params.data / "shards").rglob("*.parquet"):
        table = pq.read_table(p).to_pylist()
        assert table and all(secret not in str(v) for row in table for v in row.values())
        assert all(row["local_path"] is None for row in table)
    # the full path stays in the local manifest
    local = {r["uri"]: r["local_path"] for r in pq.read_table(params.data / "manifest.parquet").to_pylist()}
    assert local == {"a/one.png": str(root / "a" / "one.png"), "two.jpg": str(root / "two.jpg")}
