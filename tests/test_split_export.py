"""Exports: balance by domain and cell, stand-ins left out, nested fractions sharing storage,
cards, IMDL trees; the whole chain on package images (splits in tests/test_split.py)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
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

from pipeline import export, split
from pipeline.cli import run_stage
from pipeline.params import from_dict
from pipeline.records import Record, read_records
from pipeline.records import write_manifest as write_records
from pipeline.stages import names as stage_names


def _cells(n: dict[tuple[str, str], int], split_name: str = "train") -> list[Record]:
    rows = []
    for (domain, op), count in n.items():
        for i in range(count):
            rows.append(Record(key=f"{split_name}{domain}{op}{i:05d}", source="s", domain=domain,
                               operation=op, label="real" if op == "none" else "tampered",
                               split=split_name))
    return rows


def _allocate(avail: dict, **spec) -> dict:
    s = export.ExportSpec(**spec)
    return export.allocate(avail, export.shares(sorted(avail), s), s)


AVAIL = {("natural", "none"): 400, ("natural", "copy_move"): 300, ("natural", "splice"): 20,
         ("document", "none"): 100, ("document", "text_replace"): 250}


def test_shrink_balances_exactly():
    got = _allocate(AVAIL, short_cell="shrink")
    share = export.shares(list(AVAIL), export.ExportSpec())
    assert share[("natural", "none")] == pytest.approx(0.25)
    assert share[("natural", "splice")] == pytest.approx(0.125)
    # the scarcest cell (splice: 20 for a 1/8 share) sets the size; all cells in proportion
    assert got[("natural", "splice")] == 20
    for c in AVAIL:
        assert got[c] == pytest.approx(share[c] * 160, abs=1)


def test_fill_meets_domain_shares_and_fills_short_cells_inside_the_domain():
    """Issue 14.7: equal domain weights give equal domains; a short cell gives all it has and
    the rest of its domain takes its place."""
    got = _allocate(AVAIL)  # short_domain shrink, short_cell fill
    nat = sum(v for c, v in got.items() if c[0] == "natural")
    doc = sum(v for c, v in got.items() if c[0] == "document")
    assert nat == doc == 350  # document (350 available) sets the size
    assert got[("natural", "splice")] == 20  # short: all of it
    # natural's other cells keep their 2:1 ratio and fill the splice's place
    assert got[("natural", "none")] + got[("natural", "copy_move")] == 330
    assert got[("natural", "none")] == pytest.approx(2 * got[("natural", "copy_move")], abs=1)
    assert got[("document", "none")] == 100 and got[("document", "text_replace")] == 250


def test_short_domain_fill_uses_the_median_domain():
    avail = {("natural", "none"): 1000, ("face", "none"): 1000, ("document", "none"): 50}
    got = _allocate(avail, short_domain="fill")
    assert got == {("natural", "none"): 1000, ("face", "none"): 1000, ("document", "none"): 50}
    assert _allocate(avail) == {c: 50 for c in avail}  # shrink: exact shares


def _write_manifest(tmp_path: Path, rows: list[Record]) -> Path:
    """A final manifest whose rows point at tiny real blobs (4x4 PNGs, one per row)."""
    from pipeline import imageio
    data = tmp_path / "data"
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    imageio.write_bytes(data / "m.png", imageio.encode_mask(mask))
    out = []
    for i, r in enumerate(rows):
        img = Image.new("RGB", (4, 4), (i % 256, (i // 256) % 256, 7))
        save(img, data / "blobs" / f"{r.key}.png", "PNG")
        out.append(r.replace(blob=f"blobs/{r.key}.png", format="png", width=4, height=4,
                             mask_blob="m.png" if r.label == "tampered" else None, nbytes=100))
    write_records(data / "manifest.parquet", out)
    return data / "manifest.parquet"


def _export(tmp_path: Path, rows: list[Record], **section) -> tuple[dict, Path]:
    manifest = _write_manifest(tmp_path, rows)
    params = make_params(tmp_path, [], export=section)
    out = tmp_path / "data" / "exports"
    m = export.run(params, {"manifest": manifest}, out, local_executor())
    return m, out


def _keys(folder: Path) -> list[str]:
    return [r.key for r in read_records(folder / "manifest.parquet")]


def test_streaming_plan_takes_exactly_the_lowest_ranks(tmp_path):
    """The two-pass plan (histogram, then the boundary bins) picks, in each cell, exactly
    the round(f x n) samples of lowest rank, nested across fractions."""
    rows = _cells({("natural", "none"): 30000, ("natural", "copy_move"): 9000,
                   ("face", "none"): 6000, ("face", "face_swap"): 700})
    from pipeline.records import write_manifest as wm
    for r in rows:
        r.blob = "x"
    wm(tmp_path / "m.parquet", rows)
    p = export.ExportParams(exports={"b": export.ExportSpec(fractions=(0.1, 0.5, 1.0))})
    plans = export.plan(tmp_path / "m.parquet", p, seed=5)
    sp = plans["b"].splits["train"]
    by_cell = {}
    for r in rows:
        by_cell.setdefault(export.cell(r), []).append((split.group_hash(5, r.key), r.key))
    for c, n in sp.counts.items():
        ranked = sorted(by_cell[c])
        for i, f in enumerate((0.1, 0.5, 1.0)):
            want = {k for _, k in ranked[: export.fraction_count(n, f)]}
            got = {k for h, k in ranked if (lv := sp.level_of(c, h, k)) is not None and lv <= i}
            assert got == want, (c, f)
    # face (6,700) sets the size of natural under exact domain shares
    assert sum(n for c, n in sp.counts.items() if c[0] == "natural") == 6700


def test_export_is_balanced_by_domain_with_a_card_of_targets(tmp_path):
    rows = _cells({("natural", "none"): 300, ("natural", "copy_move"): 300,
                   ("aigc", "full_synthesis"): 400, ("face", "none"): 60,
                   ("face", "face_swap"): 20, ("document", "none"): 70,
                   ("document", "text_replace"): 70})
    rows = [r.replace(label="synthetic") if r.operation == "full_synthesis" else r for r in rows]
    m, out = _export(tmp_path, rows, exports={"balanced": None, "bal": {"imdl": False}})
    got = Counter(export.cell(r) for r in read_records(out / "bal" / "manifest.parquet"))
    dom = Counter()
    for c, n in got.items():
        dom[c[0]] += n
    assert set(dom.values()) == {80}, dom  # face (80) sets every domain's size
    assert got[("face", "face_swap")] == 20 and got[("face", "none")] == 60
    card = (out / "bal" / "README.md").read_text()
    assert "| domain | target share | achieved share | samples |" in card
    assert "| face | 0.250 | 0.250 | 80 |" in card
    assert "Short cells (fewer samples than their target): face/face_swap." in card
    assert m["exports"]["bal"]["short_cells"] == {"train": ["face/face_swap"]}
    assert m["exports"]["bal"]["domain_share"]["train"] == {d: 0.25 for d in dom}


def test_forensic_tampered_rows_are_never_counted_real(tmp_path):
    """Issue 10.9: tampered images of a forensic source (no generator, operation unknown)
    sit in their own cell and the card's generator table does not count them as real."""
    rows = _cells({("natural", "none"): 5})
    rows += [Record(key=f"casia{i}", source="casia", domain="natural", operation="unknown",
                    label="tampered", split="train") for i in range(4)]
    m, out = _export(tmp_path, rows, exports={"balanced": None,
                                              "all": {"balance": False, "imdl": False}})
    kept = read_records(out / "all" / "manifest.parquet")
    assert Counter(export.cell(r) for r in kept) == {("natural", "none"): 5,
                                                     ("natural", "unknown"): 4}
    card = (out / "all" / "README.md").read_text()
    generators = card[card.index("| generator |"):].split("\n\n")[0]
    assert "| real | 5 |" in generators and "| unknown (casia) | 4 |" in generators
    assert "| real | 9 |" not in card


def test_stand_ins_are_left_out_unless_allowed(tmp_path):
    rows = _cells({("natural", "none"): 6, ("natural", "inpaint"): 6, ("natural", "copy_move"): 6})
    for r in rows:
        if r.operation == "inpaint":
            r.model_id = "tiny-random:abc123"
        elif r.operation == "copy_move":
            r.model_id = "opencv-4"
    m, out = _export(tmp_path / "a", rows, exports={"balanced": None,
                                                    "all": {"balance": False, "imdl": False}})
    kept = read_records(out / "all" / "manifest.parquet")
    assert len(kept) == 12 and not any(r.operation == "inpaint" for r in kept)
    assert m["stand_ins_left_out"] == {"tiny-random:abc123": 6}
    card = (out / "all" / "README.md").read_text()
    assert "stand-in samples left out: 6 (`tiny-random:abc123` 6)" in card
    assert "| opencv-4 | 6 |" in card and "| none | 6 |" in card
    m, out = _export(tmp_path / "b", rows, allow_stand_ins=True,
                     exports={"balanced": None, "all": {"balance": False, "imdl": False}})
    assert len(read_records(out / "all" / "manifest.parquet")) == 18
    assert "| tiny-random:abc123 | 6 |" in (out / "all" / "README.md").read_text()


def test_fractions_share_storage_and_are_prefixes_of_one_shard_sequence(tmp_path):
    """Issue 14.8: the 10/25/50% folders hold hard links to the first shards of the 100%
    folder; IMDL trees link the stored files; disk use stays near the 100% export's."""
    rows = _cells({("natural", "none"): 120, ("natural", "copy_move"): 120,
                   ("face", "none"): 100, ("face", "face_swap"): 100})
    rows += _cells({("natural", "none"): 20, ("face", "none"): 20}, "val")
    m, out = _export(tmp_path, rows, exports={"balanced": {"fractions": [0.1, 0.25, 0.5, 1.0],
                                                           "max_count": 16}})
    full = out / "balanced-100pct"
    seq = sorted(p.name for p in (full / "train").glob("*.tar"))
    keys_full = set(_keys(full))
    prev: set[str] = set()
    for f in ("10", "25", "50", "100"):
        folder = out / f"balanced-{f}pct"
        tars = sorted(p.name for p in (folder / "train").glob("*.tar"))
        assert tars == seq[: len(tars)]  # a prefix of the same sequence
        for t in tars:
            assert os.path.samefile(folder / "train" / t, full / "train" / t)
        keys = set(_keys(folder))
        in_tars = {s["__key__"] for t in tars
                   for s in wds.WebDataset(str(folder / "train" / t), shardshuffle=False)}
        assert in_tars == {k for k in keys if k.startswith("train")}
        assert prev < keys <= keys_full
        prev = keys
        # val is the same in every fraction
        assert {k for k in keys if k.startswith("val")} == {k for k in keys_full if k.startswith("val")}
        for image, mask in json.loads((folder / "imdl" / "train.json").read_text()):
            blob = tmp_path / "data" / "blobs" / Path(image).name
            assert os.path.samefile(folder / "imdl" / image, blob)
    n10 = len([k for k in _keys(out / "balanced-10pct") if k.startswith("train")])
    n100 = len([k for k in keys_full if k.startswith("train")])
    assert n10 == pytest.approx(n100 * 0.1, abs=4)
    usage = export.disk_usage(out)
    # the 100% export alone: its shards, indexes, manifest and card (IMDL entries are links)
    alone = sum(p.stat().st_size for p in full.rglob("*")
                if p.is_file() and "imdl" not in p.relative_to(full).parts)
    assert usage["new"] <= 1.2 * alone, (usage, alone)
    assert usage["listed"] > 1.8 * alone  # what full copies would have cost
    assert m["disk"] == usage


def test_export_rerun_is_byte_identical(tmp_path):
    rows = _cells({("natural", "none"): 40, ("natural", "copy_move"): 30})
    _, out = _export(tmp_path, rows, exports={"balanced": {"fractions": [0.5, 1.0],
                                                           "max_count": 8}})
    first = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}
    shutil.rmtree(out)
    params = make_params(tmp_path, [], export={"exports": {"balanced": {"fractions": [0.5, 1.0],
                                                                       "max_count": 8}}})
    export.run(params, {"manifest": tmp_path / "data" / "manifest.parquet"}, out,
               local_executor())
    again = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}
    assert first == again and first

@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """All stages, in process, on eight package images with three cheap generators."""
    tmp = tmp_path_factory.mktemp("export")
    folder = tmp / "photos"
    for name in ("coffee", "chelsea", "rocket", "coins", "hubble_deep_field", "immunohistochemistry",
                 "camera", "astronaut"):
        img = getattr(skdata, name)()
        img = img if img.ndim == 3 else np.stack([img] * 3, -1)
        save(Image.fromarray(img).resize((160, 120)), folder / f"{name}.png", "PNG")
    corpus = write_manifest(tmp / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "BSD-3-Clause", "path": str(folder)}])
    params = make_params(
        tmp, [corpus],
        synthesize={"generators": only_generators(copy_move={}, splice={}, gan_synthesis={}),
                    "per_source": 2},
        split={"ratios": {"train": 0.5, "val": 0.25, "test": 0.25}},
        export={"exports": only_exports(bal={"fractions": [0.5, 1.0]},
                                        all={"balance": False, "imdl": False})},
    )
    ex = local_executor()
    for stage in stage_names()[: stage_names().index("export") + 1]:  # the corpus, not the model
        run_stage(stage, params, ex)
    return params


def test_export_writes_nested_readable_shard_sets_with_card_and_imdl(pipeline_run):
    out = pipeline_run.data / "exports"
    assert sorted(p.name for p in out.iterdir()) == ["all", "bal-100pct", "bal-50pct"]
    full = {r.key: r for r in read_records(out / "bal-100pct" / "manifest.parquet")}
    half = {r.key: r for r in read_records(out / "bal-50pct" / "manifest.parquet")}
    assert set(half) < set(full)
    # only train is cut; the other splits are the same in every fraction
    assert {k for k, r in half.items() if r.split != "train"} == {k for k, r in full.items() if r.split != "train"}
    everything = read_records(out / "all" / "manifest.parquet")
    shipped = [r for r in read_records(pipeline_run.data / "manifest.parquet") if r.status == "ok"]
    assert len(everything) == len(shipped)
    # the shards hold exactly the manifest's samples, masks aligned with images
    seen = set()
    for tar in sorted((out / "bal-100pct").glob("*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            rec = json.loads(s["json"])
            ext = rec["format"]
            img = Image.open(__import__("io").BytesIO(s[ext]))
            mask = Image.open(__import__("io").BytesIO(s["mask.png"]))
            assert mask.size == img.size and mask.mode == "L"
            seen.add(rec["key"])
    assert seen == set(full)
    card = (out / "bal-100pct" / "README.md").read_text()
    assert "| domain | samples |" in card and "BSD-3-Clause" in card and "copy_move" in card
    pairs = json.loads((out / "bal-100pct" / "imdl" / "train.json").read_text())
    train = [r for r in full.values() if r.split == "train"]
    assert len(pairs) == len(train)
    for image, mask in pairs:
        assert (out / "bal-100pct" / "imdl" / image).exists()
        key = Path(image).stem
        if full[key].label == "real":
            assert mask == "Negative"
        else:
            m = np.asarray(Image.open(out / "bal-100pct" / "imdl" / mask))
            assert set(np.unique(m)) <= {0, 255} and m.any()
    assert not (out / "all" / "imdl").exists()


def test_splice_donors_share_the_split_of_their_forgery(pipeline_run):
    """A shipped splice's donor is in its split; one whose donor ended elsewhere (donors are
    not yet drawn per split by synthesize) is a `donor_leak` row and is never shipped."""
    rows = {r.key: r for r in read_records(pipeline_run.data / "manifest.parquet")}
    splices = [r for r in rows.values() if r.generator == "splice" and r.donor_key]
    assert splices
    shipped = {json.loads(s["json"])["key"] for t in (pipeline_run.data / "shards").glob("*/*.tar")
               for s in wds.WebDataset(str(t), shardshuffle=False)}
    for r in splices:
        donor = rows[r.donor_key]
        assert r.donor_key != r.parent_key
        if r.status == "ok":
            assert donor.split == r.split == rows[r.parent_key].split and r.key in shipped
        elif r.status == "donor_leak":
            assert donor.split != rows[r.parent_key].split and r.key not in shipped


def test_export_rerun_removes_stale_exports(pipeline_run, tmp_path):
    params = from_dict({**pipeline_run.to_dict(),
                        "export": {"exports": only_exports(only={"fractions": [1.0],
                                                                 "imdl": False})}})
    run_stage("export", params, local_executor())
    assert sorted(p.name for p in (params.data / "exports").iterdir()) == ["only"]


def test_pairs_get_derived_masks_and_blocklist_copies_leave_train(tmp_path):
    """A `pairs` edit gets its mask by differencing; its original, a copy of a blocklisted
    benchmark image, is dropped from train with the edit and never shipped."""
    coffee = Image.fromarray(skdata.coffee()).resize((200, 134))
    save(coffee, tmp_path / "p" / "orig.png", "PNG")
    edited = np.asarray(coffee).copy()
    edited[30:70, 40:120] = (20, 200, 30)  # a flat green fill
    save(Image.fromarray(edited), tmp_path / "p" / "edit.png", "PNG")
    (tmp_path / "p" / "pairs.csv").write_text("original,edited\norig.png,edit.png\n")
    chelsea = Image.fromarray(skdata.chelsea()).resize((180, 120))
    save(chelsea, tmp_path / "q" / "cat.png", "PNG")
    save(coffee.resize((100, 67)), tmp_path / "block" / "benchmark_copy.jpg", "JPEG", quality=80)
    corpus = write_manifest(tmp_path / "corpus.yaml", [
        {"name": "pairs", "kind": "pairs", "domain": "natural", "label": "tampered", "license": "x",
         "path": str(tmp_path / "p" / "pairs.csv")},
        {"name": "other", "kind": "image_folder", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "q")},
        {"name": "bench", "kind": "blocklist", "domain": "natural", "label": "real", "license": "x",
         "path": str(tmp_path / "block")},
    ])
    params = make_params(tmp_path, [corpus], synthesize={"per_source": 0},
                         split={"ratios": {"train": 1.0}}, export={"exports": only_exports()})
    ex = local_executor()
    for stage in stage_names()[: stage_names().index("export") + 1]:  # the corpus, not the model
        run_stage(stage, params, ex)
    rows = read_records(params.data / "masks" / "manifest.parquet")
    edit = next(r for r in rows if r.source == "pairs" and r.label == "tampered")
    assert edit.mask_source == "derived" and edit.status == "ok"
    mask = np.asarray(Image.open(params.data / edit.mask_blob)) > 0
    truth = np.zeros_like(mask)
    truth[30:70, 40:120] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    final = {r.key: r for r in read_records(params.data / "manifest.parquet")}
    orig = final[edit.parent_key]
    assert orig.status == final[edit.key].status == "blocklisted"
    cat = next(r for r in final.values() if r.source == "other")
    assert cat.status == "ok" and cat.split == "train"
    shipped = {json.loads(s["json"])["key"] for t in (params.data / "shards").glob("*/*.tar")
               for s in wds.WebDataset(str(t), shardshuffle=False)}
    assert shipped == {cat.key}
