"""Splits by near-duplicate unit (no leakage), test_ood, blocklist; balanced nested exports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import local_executor, make_params, save, write_manifest
from PIL import Image
from skimage import data as skdata

from pipeline import export, split
from pipeline.cli import run_stage
from pipeline.params import STAGES, ParamsError, from_dict
from pipeline.records import Record, read_records
from pipeline.records import write_manifest as write_records


def _records(n_groups: int = 60) -> list[Record]:
    """Real rows in near-duplicate groups (some with two copies) and forgeries of them."""
    rows = []
    for g in range(n_groups):
        gid = f"g{g:04d}"
        rows.append(Record(key=f"r{g:04d}a", source="s", group_id=gid, domain="natural"))
        if g % 3 == 0:  # a near-duplicate copy, same group
            rows.append(Record(key=f"r{g:04d}b", source="s", group_id=gid, domain="natural"))
        for op in ("copy_move", "removal"):
            rows.append(Record(key=f"f{g:04d}{op}", source="s", label="tampered", domain="natural",
                               operation=op, generator=op, parent_key=f"r{g:04d}a",
                               group_id=gid))
        # a splice whose donor is the next group's photo: the two groups become one unit
        donor = f"r{(g + 1) % n_groups:04d}a"
        rows.append(Record(key=f"f{g:04d}splice", source="s", label="tampered", domain="natural",
                           operation="splice", generator="splice", parent_key=f"r{g:04d}a",
                           group_id=gid, donor_key=donor)
                    if g % 10 == 5 else
                    Record(key=f"f{g:04d}gan", source="s", label="synthetic", domain="aigc",
                           operation="full_synthesis", generator="gan_synthesis",
                           parent_key=f"r{g:04d}a", group_id=gid))
    return rows


def _split(tmp_path: Path, rows: list[Record], seed: int = 0, **section) -> dict[str, Record]:
    params = make_params(tmp_path, [], seed=seed, split=section)
    src = tmp_path / "in.parquet"
    write_records(src, rows)
    out = tmp_path / f"split-{seed}"
    split.run(params, {"manifest": src}, out, local_executor())
    return {r.key: r for r in read_records(out / "manifest.parquet")}


def test_split_keeps_groups_and_forgeries_together(tmp_path):
    rows = _records()
    got = _split(tmp_path, rows)
    assert set(got) == {r.key for r in rows}  # nothing lost
    by_group: dict[str, set[str]] = {}
    for r in got.values():
        by_group.setdefault(r.group_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_group.values()), "a near-duplicate group spans splits"
    for r in got.values():
        if r.parent_key:
            assert r.split == got[r.parent_key].split
        if r.donor_key:
            assert r.split == got[r.donor_key].split
    assert Counter(r.split for r in got.values()).keys() <= {"train", "val", "test"}
    # roughly the ratios (units are hashed, not counted), and every split used
    share = Counter(r.split for r in got.values() if r.key.startswith("r"))
    assert set(share) == {"train", "val", "test"}
    assert 0.6 < share["train"] / sum(share.values()) < 0.95


def test_split_is_deterministic_and_depends_on_seed(tmp_path):
    rows = _records()
    a = _split(tmp_path / "a", rows, seed=1)
    b = _split(tmp_path / "b", rows, seed=1)
    c = _split(tmp_path / "c", rows, seed=2)
    assert {k: r.split for k, r in a.items()} == {k: r.split for k, r in b.items()}
    assert {k: r.split for k, r in a.items()} != {k: r.split for k, r in c.items()}


def test_ood_generators_go_only_to_test_ood(tmp_path):
    got = _split(tmp_path, _records(), ood_generators=["removal"], ood_operations=["full_synthesis"])
    for r in got.values():
        if r.generator == "removal" or r.operation == "full_synthesis":
            assert r.split == "test_ood"
        else:
            assert r.split in ("train", "val", "test")


def test_blocklist_removes_its_near_duplicates_from_train_and_val(tmp_path):
    rows = _records(10)
    rows.append(Record(key="bench1", source="benchmark", group_id="g0003", kind="blocklist",
                       status="blocklist"))
    got = _split(tmp_path, rows, ratios={"train": 1.0})
    for key in ("r0003a", "f0003copy_move", "f0003removal"):
        assert got[key].status == "blocklisted" and got[key].split is None
        assert "bench1" in got[key].error
    assert got["bench1"].split is None and got["bench1"].status == "blocklist"
    assert got["r0004a"].status == "ok" and got["r0004a"].split == "train"


@pytest.mark.parametrize("section,needle", [
    ({"ratios": {"train": 0.5, "val": 0.1}}, "must sum to 1"),
    ({"ratios": {"train": 0.9, "dev": 0.1}}, "unknown split 'dev'"),
])
def test_bad_split_params_are_rejected(section, needle):
    with pytest.raises(ParamsError, match=needle):
        from_dict({"split": section})


# ----------------------------------------------------------------------------- exports


def _cells(n: dict[tuple[str, str], int]) -> list[Record]:
    rows = []
    for (domain, op), count in n.items():
        for i in range(count):
            rows.append(Record(key=f"{domain}{op}{i:05d}", source="s", domain=domain, operation=op,
                               label="real" if op == "none" else "tampered", split="train"))
    return rows


def test_shrink_balances_exactly_and_fill_never_exceeds_a_share():
    avail = {("natural", "none"): 400, ("natural", "copy_move"): 300, ("natural", "splice"): 20,
             ("document", "none"): 100, ("document", "text_replace"): 250}
    rows = _cells(avail)
    spec = export.ExportSpec(short_cell="shrink")
    got = Counter(export.cell(r) for r in export.select(rows, spec, seed=0, fraction=1.0))
    share = export.shares(list(avail), spec)
    assert share[("natural", "none")] == pytest.approx(0.25)
    assert share[("natural", "splice")] == pytest.approx(0.125)
    # the scarcest cell (splice: 20 for a 1/8 share) sets the size; all cells in proportion
    assert got[("natural", "splice")] == 20
    for c in avail:
        assert got[c] == pytest.approx(share[c] * 160, abs=1)
    fill = export.ExportSpec(short_cell="fill")
    got = Counter(export.cell(r) for r in export.select(rows, fill, seed=0, fraction=1.0))
    assert got[("natural", "splice")] == 20  # short: gives all it has
    assert sum(got.values()) > 160  # not limited by the scarcest cell
    lam = max(got[c] / share[c] for c in avail)
    for c in avail:  # every cell is at its share of the common size, or short
        assert got[c] == avail[c] or got[c] == pytest.approx(share[c] * lam, abs=1)


def test_fractions_are_nested():
    rows = _cells({("natural", "none"): 300, ("natural", "copy_move"): 200, ("face", "none"): 90,
                   ("face", "face_swap"): 40})
    spec = export.ExportSpec()
    sets = [{r.key for r in export.select(rows, spec, 0, f)} for f in (0.1, 0.25, 0.5, 1.0)]
    for small, large in zip(sets, sets[1:]):
        assert small < large
    assert len(sets[0]) == pytest.approx(len(sets[3]) * 0.1, abs=4)


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
        seed=3,  # splice donors join these 8 groups into 2-3 units; this seed gives all three splits
        synthesize={"generators": {"copy_move": {}, "splice": {}, "gan_synthesis": {}}, "per_source": 2},
        split={"ratios": {"train": 0.5, "val": 0.25, "test": 0.25}},
        export={"exports": {"bal": {"fractions": [0.5, 1.0]}, "all": {"balance": False, "imdl": False}}},
    )
    ex = local_executor()
    for stage in STAGES:
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
    rows = {r.key: r for r in read_records(pipeline_run.data / "manifest.parquet")}
    splices = [r for r in rows.values() if r.generator == "splice" and r.status == "ok"]
    assert splices
    for r in splices:
        donor = r.donor_key
        assert donor in rows and donor != r.parent_key
        assert rows[donor].split == r.split == rows[r.parent_key].split


def test_export_rerun_removes_stale_exports(pipeline_run, tmp_path):
    params = from_dict({**pipeline_run.to_dict(),
                        "export": {"exports": {"only": {"fractions": [1.0], "imdl": False}}}})
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
    params = make_params(tmp_path, [corpus], synthesize={"generators": {}},
                         split={"ratios": {"train": 1.0}}, export={"exports": {}})
    ex = local_executor()
    for stage in STAGES:
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
