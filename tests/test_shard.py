"""Shards: layout, byte-identical rebuilds, resume after SIGKILL, reading back with
webdataset and with datasets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from conftest import ROOT, local_executor, make_params, save, write_manifest, write_params
from PIL import Image
from skimage import data as skdata

from pipeline.cli import run_stage
from pipeline.records import read_records
from pipeline.records import write_manifest as write_records


def _corpus(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "imgs"
    base = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    for i in range(n):
        img = Image.fromarray(base[i % len(base)]).resize((48 + i, 40 + (i % 7)))
        if i % 3 == 0:
            save(img, folder / f"i{i:03d}.jpg", "JPEG", quality=80 + i % 15)
        else:
            save(img, folder / f"i{i:03d}.png", "PNG")
    return write_manifest(tmp_path / "corpus.yaml", [
        {"name": "imgs", "kind": "image_folder", "domain": "natural", "label": "real", "license": "cc0",
         "path": str(folder)}])


def _split_manifest(params, tampered: bool = True) -> None:
    """A split manifest from ingest alone: every third sample to test, plus one given-mask
    tampered sample, so the shard stage can be tested without the middle stages."""
    recs = read_records(params.data / "ingest" / "manifest.parquet")
    out = []
    for i, r in enumerate(sorted(recs, key=lambda r: r.key)):
        out.append(r.replace(split="test" if i % 3 == 0 else "train", group_id=r.sha256))
    if tampered:
        r = out[0]
        mask = np.zeros((r.height, r.width), bool)
        mask[: r.height // 2, : r.width // 3] = True
        from pipeline import imageio
        imageio.write_bytes(params.data / "given.png", imageio.encode_mask(mask))
        out.append(r.replace(key=r.key[:-4] + "ffff", label="tampered", mask_blob="given.png",
                             mask_source="given", operation="copy_move"))
    write_records(params.data / "split" / "manifest.parquet", out)


def _tar_digests(shards: Path) -> dict[str, str]:
    return {str(p.relative_to(shards)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(shards.rglob("*")) if p.is_file()}


def test_shards_layout_and_byte_identical_rebuild(tmp_path):
    params = make_params(tmp_path, [_corpus(tmp_path, 10)], shard={"max_count": 3})
    run_stage("ingest", params, local_executor())
    _split_manifest(params)
    m = run_stage("shard", params, local_executor())
    shards = params.data / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["test", "train"]
    tars = sorted(shards.rglob("*.tar"))
    assert m["shipped"] == 11 and sum(m["splits"][s]["samples"] for s in m["splits"]) == 11
    for t in tars:
        stem = t.name[: -len(".tar")]
        assert (t.parent / f"{stem}.parquet").exists() and (t.parent / f"{stem}_stats.json").exists()
        stats = json.loads((t.parent / f"{stem}_stats.json").read_text())
        assert stats["count"] <= 3
        names = subprocess.run(["tar", "tf", str(t)], capture_output=True, text=True, check=True).stdout.split()
        assert all(n.count(".") >= 1 and "." not in n.split(".")[0] for n in names)
        assert len(names) == 3 * stats["count"]
    first = _tar_digests(shards)
    # a rebuild from scratch gives byte-identical files
    import shutil
    shutil.rmtree(shards)
    (params.data / "manifest.parquet").unlink()
    run_stage("shard", params, local_executor())
    assert _tar_digests(shards) == first
    # the final manifest holds every record
    assert len(read_records(params.data / "manifest.parquet")) == 11


def test_final_manifest_is_the_split_manifest_unless_a_row_lacks_a_split(tmp_path):
    params = make_params(tmp_path, [_corpus(tmp_path, 6)], shard={"max_count": 4})
    run_stage("ingest", params, local_executor())
    _split_manifest(params, tampered=False)
    src, final = params.data / "split" / "manifest.parquet", params.data / "manifest.parquet"
    run_stage("shard", params, local_executor())
    assert final.read_bytes() == src.read_bytes()  # nothing changed: the same file
    shipped = _tar_digests(params.data / "shards")

    # one ok row without a split: it becomes `no_split` and is not shipped; the rest stay
    recs = read_records(src)
    lost = recs[2].key
    write_records(src, [r.replace(split=None) if r.key == lost else r for r in recs])
    m = run_stage("shard", params, local_executor())
    out = {r.key: r for r in read_records(final)}
    assert final.read_bytes() != src.read_bytes()
    assert out[lost].status == "no_split" and out[lost].error == "no split assigned"
    assert m["shipped"] == len(recs) - 1 and m["by_status"] == {"no_split": 1, "ok": len(recs) - 1}
    assert [out[r.key] for r in recs if r.key != lost] == [r for r in recs if r.key != lost]
    assert _tar_digests(params.data / "shards") != shipped


def test_readback_webdataset_and_datasets(tmp_path):
    params = make_params(tmp_path, [_corpus(tmp_path, 8)], shard={"max_count": 4})
    run_stage("ingest", params, local_executor())
    _split_manifest(params)
    run_stage("shard", params, local_executor())
    recs = {r.key: r for r in read_records(params.data / "split" / "manifest.parquet")}
    tars = sorted(str(p) for p in (params.data / "shards").rglob("*.tar"))
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        rec = recs[key]
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["split"] == rec.split
        img_bytes = sample[rec.format]
        if rec.label == "real":
            source = Path(rec.local_path)
            assert img_bytes == source.read_bytes()  # the source file, byte for byte
            assert hashlib.sha256(img_bytes).hexdigest() == rec.sha256
        mask = Image.open(io.BytesIO(sample["mask.png"]))
        img = Image.open(io.BytesIO(img_bytes))
        assert mask.mode == "L" and mask.size == img.size
        vals = set(np.unique(np.asarray(mask)).tolist())
        assert vals <= {0, 255}
        assert (vals == {0}) == (rec.label == "real")
        seen.add(key)
    assert seen == {k for k, r in recs.items() if r.split}

    import datasets
    # every tar holds one member layout (stats say which), as `datasets` requires
    by_format: dict[str, list[str]] = {}
    for t in tars:
        stats = json.loads(Path(t[: -len(".tar")] + "_stats.json").read_text())
        by_format.setdefault(stats["format"], []).append(t)
    assert set(by_format) == {"jpg", "png"}
    rows = []
    for fmt, group in by_format.items():
        rows += list(datasets.load_dataset("webdataset", data_files={"train": group}, split="train"))
    assert len(rows) == len(seen)
    for row in rows:
        rec = recs[row["__key__"]]
        meta = row["json"]
        assert meta["sha256"] == rec.sha256
        pil = row[rec.format] if rec.format in row else None
        if pil is not None and rec.label == "real":
            assert pil.size == (rec.width, rec.height)
        assert row["mask.png"].size == (rec.width, rec.height)


def test_source_files_are_shipped_unchanged(tmp_path):
    corpus = _corpus(tmp_path, 4)
    params = make_params(tmp_path, [corpus])
    run_stage("ingest", params, local_executor())
    _split_manifest(params, tampered=False)
    run_stage("shard", params, local_executor())
    sources = {hashlib.sha256(p.read_bytes()).hexdigest(): p.read_bytes()
               for p in (tmp_path / "imgs").iterdir()}
    for t in (params.data / "shards").rglob("*.tar"):
        for sample in wds.WebDataset(str(t), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            assert sample[meta["format"]] == sources[meta["sha256"]]


def test_killed_shard_stage_resumes_without_loss_or_duplicates(tmp_path):
    """SIGKILL the shard stage at several points, run it again, compare with a clean run."""
    corpus = _corpus(tmp_path, 40)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    p_ref = write_params(ref_dir, [corpus], shard={"max_count": 1})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline"]
    subprocess.run(cmd + ["ingest", "--params", str(p_ref)], check=True, env=env, capture_output=True)
    params_ref = make_params(ref_dir, [corpus], shard={"max_count": 1})
    _split_manifest(params_ref)
    t0 = time.perf_counter()
    subprocess.run(cmd + ["shard", "--params", str(p_ref)], check=True, env=env, capture_output=True)
    full = time.perf_counter() - t0
    reference = _tar_digests(params_ref.data / "shards")

    work = tmp_path / "work"
    work.mkdir()
    p_work = write_params(work, [corpus], shard={"max_count": 1})
    subprocess.run(cmd + ["ingest", "--params", str(p_work)], check=True, env=env, capture_output=True)
    _split_manifest(make_params(work, [corpus], shard={"max_count": 1}))
    kills = 0
    for frac in (0.55, 0.7, 0.8, 0.9, 0.95):
        proc = subprocess.Popen(cmd + ["shard", "--params", str(p_work)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * frac)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    subprocess.run(cmd + ["shard", "--params", str(p_work)], check=True, env=env, capture_output=True)
    got = _tar_digests(work / "data" / "shards")
    assert got == reference
    keys = []
    for t in sorted((work / "data" / "shards").rglob("*.tar")):
        keys += [s["__key__"] for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)]
    assert len(keys) == len(set(keys)) == 41


def test_tar_bytes_equal_a_plain_webdataset_tarwriter(tmp_path):
    """The shard writer's plain-mode TarFile writes what webdataset's own writer writes."""
    from pipeline.shard import TAR_MTIME, _record_json, sample_members

    params = make_params(tmp_path, [_corpus(tmp_path, 6)], shard={"max_count": 100})
    run_stage("ingest", params, local_executor())
    _split_manifest(params)
    run_stage("shard", params, local_executor())
    for tar in sorted((params.data / "shards").rglob("*.tar")):
        records = read_records(tar.with_suffix(".parquet"))
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=TAR_MTIME, user="", group="") as w:
            for r in records:
                w.write(sample_members(r, params.data, _record_json(r)))
        assert tar.read_bytes() == buf.getvalue()
