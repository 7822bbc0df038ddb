"""The data loop: the focus rule, round plans, continued training, and one round on the
embedded corpus where a starved cell gets its share back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import only_exports, only_generators

from pipeline import params as params_mod
from pipeline.focus import FocusParams, quotas, shares
from pipeline.model import build_model, save_model
from pipeline.synthesize import load_plan
from pipeline.train import TrainParams, init_weights, model_spec

ROOT = Path(__file__).resolve().parents[1]


def _stats(n, miss, f1):
    return {"n": n, "miss_rate": miss, "pixel_f1": f1, "pixel_n": n if f1 is not None else 0}


def test_focus_rule_lifts_starved_and_failing_cells_and_keeps_a_floor():
    stats = {"starved": _stats(0, None, None), "good": _stats(20, 0.0, 0.95),
             "bad": _stats(20, 0.8, 0.1), "synthetic": _stats(20, 0.5, None)}
    p = FocusParams(floor=0.1)
    s = shares(stats, p, "focus")
    share = {g: c["share"] for g, c in s.items()}
    assert sum(share.values()) == pytest.approx(1.0)
    assert share["starved"] > share["good"] and share["bad"] > share["good"]
    assert share["bad"] > share["synthetic"] > share["good"]
    assert min(share.values()) >= 0.1 - 1e-9
    assert s["starved"]["error"] is None and s["starved"]["shrunk_error"] == 0.5
    # no exploration, no floor: shares follow the (shrunk) errors alone
    plain = shares(stats, dataclasses.replace(p, explore=0.0, floor=0.0), "focus")
    assert plain["good"]["share"] < 0.1 < plain["bad"]["share"]
    uniform = shares(stats, p, "uniform")
    assert {c["share"] for c in uniform.values()} == {0.25}
    q = quotas(share, 10)
    assert sum(q.values()) == 10 and min(q.values()) >= 1 and q["bad"] > q["good"]
    assert sum(quotas(share, 3).values()) == 3  # fewer than the cells: no minimum of one


def test_bad_plans_are_refused_by_name(tmp_path):
    cases = {"not json": "{", "round 0": json.dumps({"round": 0, "jobs": []}),
             "job without source": json.dumps({"round": 1, "jobs": [{"generator": "removal"}]}),
             "jobs not a list": json.dumps({"round": 1, "jobs": {}})}
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(ValueError, match="synthesize.plan_from"):
            load_plan(path)
    with pytest.raises(ValueError, match="focus.floor"):
        FocusParams(floor=1.0)


def test_params_round_trip_keeps_removed_entries_removed():
    raw = {"synthesize": {"generators": only_generators(copy_move={"weight": 0.01},
                                                        removal={})},
           "export": {"exports": only_exports(all={"balance": False})}}
    p = params_mod.from_dict(raw)
    q = params_mod.from_dict(p.to_dict())
    assert list(q.synthesize.generators) == ["copy_move", "removal"]
    assert q.synthesize.generators["copy_move"].weight == 0.01
    assert list(q.export.exports) == ["all"] and q.to_dict() == p.to_dict()


def test_init_from_loads_a_saved_model_and_refuses_another_architecture(tmp_path):
    torch.manual_seed(0)
    spec = model_spec(TrainParams(), seed=0)
    a = build_model(spec)
    save_model(a, tmp_path / "a")
    b = build_model(model_spec(TrainParams(), seed=1))
    differ = [k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])]
    assert len(differ) > 10  # another seed: other random weights
    init_weights(b, spec, tmp_path / "a")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    other = model_spec(TrainParams(crop=96), seed=0)
    with pytest.raises(ValueError, match="crop"):
        init_weights(build_model(other), other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_weights(b, spec, tmp_path / "missing")


def _keys(manifest: Path, **where) -> list[str]:
    rows = pq.read_table(manifest).to_pylist()
    return [r["key"] for r in rows if all(r[k] == v for k, v in where.items())]


@pytest.mark.slow
def test_one_round_on_the_embedded_corpus_feeds_the_starved_cell(tmp_path):
    """copy_move starts starved (weight 0.01: one sample of round 0, from the planner's
    cover step); after one round its share of the new samples has risen, val and test are
    the same images, every new key is new, and both arms are recorded and compared."""
    from pipeline import loop

    params = {
        "data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics"),
        "plots_dir": str(tmp_path / "plots"), "corpus": [str(ROOT / "manifests/default.yaml")],
        "executor": {"backend": "local", "progress": False},
        "synthesize": {"generators": only_generators(
            copy_move={"weight": 0.01}, removal={}, text_erase={}, text_copy_move={},
            face_swap={}, gan_synthesis={}), "per_source": 1},
        "export": {"allow_stand_ins": True},
        "train": {"steps": 4, "checkpoint_every": 4, "val_every": 4, "val_max_images": 2,
                  "loader_workers": 0, "batch_size": 2},
        "evaluate": {"bootstrap": 200, "robustness_max_images": 0},
        "focus": {"budget": 8},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert loop.main(["--params", str(path), "--rounds", "1", "--compare", "uniform"]) == 0
    result = json.loads((tmp_path / "metrics" / "loop.json").read_text())
    r0, r1 = result["arms"]["focus"]
    share0 = r0["made"].get("copy_move", 0) / sum(r0["made"].values())
    share1 = r1["made"].get("copy_move", 0) / max(1, sum(r1["made"].values()))
    assert r0["made"].get("copy_move") == 1 and share1 > share0
    assert sum(r1["planned"].values()) == 8 and r1["new_keys"] == 8
    plan = json.loads((tmp_path / "data" / "loop" / "plans" / "focus-01.json").read_text())
    assert plan["cells"]["copy_move"]["n"] <= 1  # barely seen on val: the exploration term
    assert plan["cells"]["copy_move"]["share"] >= params["focus"].get("floor", 0.05)
    # val and test are the same images in round 0, round 1 and in the uniform arm
    for row in (r0, r1, result["arms"]["uniform"][1]):
        assert row["fixed_sets_unchanged"] is True
    rounds = tmp_path / "data" / "loop" / "rounds"
    k0 = json.loads((rounds / "focus-00" / "new_keys.json").read_text())
    k1 = json.loads((rounds / "focus-01" / "new_keys.json").read_text())
    rows = pq.read_table(tmp_path / "data" / "split" / "manifest.parquet").to_pylist()
    synth = [r["key"] for r in rows if r["kind"] == "synthesized"]
    assert len(synth) == len(set(synth)) == 19 + 8 and set(synth) == set(k0) | set(k1)
    assert len(k0) == 19 and len(k1) == 8 and not set(k0) & set(k1)
    assert {r["split"] for r in rows if r["key"] in set(k1)} == {"train"}
    # records: each round's params reproduce it; the model continued from round 0's
    rec = tmp_path / "data" / "loop" / "rounds" / "focus-01"
    p1 = yaml.safe_load((rec / "params.yaml").read_text())
    assert p1["train"]["init_from"].endswith("focus-00/model")
    assert p1["synthesize"]["plan_from"][0].endswith("focus-01.json")
    assert (rec / "model" / "model.safetensors").exists()
    assert set(result["compare"]["1"]) >= {"real"}
    assert (tmp_path / "plots" / "loop.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "loop.csv").read_text().startswith("arm,round,cell")



def test_round_plans_forge_train_sources_with_new_keys_and_reuse_earlier_work(tmp_path):
    """A round's plan: jobs on train sources get keys of their round; a job on a val or test
    source is refused with a reason; with `reuse`, the second run forges nothing again."""
    from conftest import local_executor, make_params, save, write_manifest
    from PIL import Image
    from skimage import data as skdata

    from pipeline.cli import run_stage
    from pipeline.records import read_records
    from pipeline.split import plan_groups

    folder = tmp_path / "photos"
    for name in ("coffee", "chelsea", "rocket", "coins", "camera", "astronaut"):
        img = getattr(skdata, name)()
        img = img if img.ndim == 3 else img[..., None].repeat(3, -1)
        save(Image.fromarray(img).resize((96, 80)), folder / f"{name}.png", "PNG")
    corpus = write_manifest(tmp_path / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "test", "path": str(folder)}])
    sections = {"synthesize": {"generators": only_generators(copy_move={}, removal={}),
                               "per_source": 1, "reuse": True},
                "split": {"ratios": {"train": 0.5, "val": 0.25, "test": 0.25}}}
    params = make_params(tmp_path, [corpus], **sections)
    ex = local_executor()
    for stage in ("ingest", "dedup"):
        run_stage(stage, params, ex)
    dedup = params.data / "dedup" / "manifest.parquet"
    groups = plan_groups(dedup, params.split, params.seed)
    reals = read_records(dedup)
    train = [r.key for r in reals if groups.of_record(r) == "train"]
    held = [r.key for r in reals if groups.of_record(r) in ("val", "test")]
    assert train and held
    plan = tmp_path / "plan-01.json"
    plan.write_text(json.dumps({"round": 1, "jobs": [
        {"generator": "copy_move", "source": train[0]},
        {"generator": "copy_move", "source": train[0]},  # twice: two keys, two seeds
        {"generator": "removal", "source": held[0]}]}))
    params = make_params(tmp_path, [corpus], **{
        **sections, "synthesize": {**sections["synthesize"], "plan_from": [str(plan)]}})
    m = run_stage("synthesize", params, ex)
    assert m["rounds"] == {"1": 2} and len(m["plan_problems"]) == 1
    assert "not train" in m["plan_problems"][0] and m["reused"] == 0
    rows = [r for r in read_records(params.data / "synthesize" / "manifest.parquet")
            if r.kind == "synthesized"]
    assert len(rows) == len({r.key for r in rows}) == len(reals) + 2
    blobs = {r.key: (params.data / r.blob).read_bytes() for r in rows if r.status == "ok"}
    again = run_stage("synthesize", params, ex)
    assert again["reused"] == len(rows) and again["by_status"] == m["by_status"]
    assert {r.key: (params.data / r.blob).read_bytes() for r in read_records(
        params.data / "synthesize" / "manifest.parquet")
        if r.kind == "synthesized" and r.status == "ok"} == blobs
