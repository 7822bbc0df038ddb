"""Sweeps on the embedded corpus: a 3-point data-fraction sweep (scaling law: points,
power-law fit, plot) and the per-domain transfer matrix, each point trained (tiny preset, few
steps) and evaluated in its own folder by child processes; the power-law fit on known curves;
the DVC collection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    ROOT,
    local_executor,
    make_params,
    only_exports,
    only_generators,
    write_manifest,
)
from PIL import Image

from pipeline import cli
from pipeline import params as params_mod
from pipeline.stages import names as stage_names
from pipeline.sweep import dvc_points, fit_power_law, main, plot_scaling

# ----------------------------------------------------------------------------- the fit


def test_power_law_fit_recovers_a_known_curve():
    n = np.array([10, 30, 100, 300, 1000, 3000], float)
    err = 2.0 * n ** -0.5 + 0.05
    f = fit_power_law(list(n), list(1 - err))
    assert f["identifiable"] and f["note"] == ""
    assert f["a"] == pytest.approx(2.0, rel=1e-3) and f["b"] == pytest.approx(0.5, rel=1e-3)
    assert f["c"] == pytest.approx(0.05, abs=1e-4) and f["rmse"] < 1e-6


def test_power_law_fit_with_few_points_says_it_is_not_identifiable():
    f = fit_power_law([10, 100, 1000], [0.6, 0.7, 0.75])
    assert f["a"] is not None and not f["identifiable"] and "3 points" in f["note"]
    f = fit_power_law([10, 100], [0.6, None])
    assert f["a"] is None and not f["identifiable"] and "no fit" in f["note"]
    # noisy, flat points (the default run's): a fit is given, flagged as saying nothing
    f = fit_power_law([2, 4, 18, 25], [0.33, 0.67, 0.33, 0.33])
    assert not f["identifiable"] and "not identifiable" in f["note"]
    # within its bounds whatever the data: a metric that gets worse with more data
    f = fit_power_law([10, 100, 1000, 10000], [0.9, 0.8, 0.7, 0.6])
    assert f["a"] >= 0 and 0 <= f["b"] <= 3 and 0 <= f["c"] <= 1


def test_dvc_points_from_exp_show_rows():
    """exp_show rows as DVC 3 gives them (lists left out), metrics files read per revision."""
    def ev(auc, f1):
        return {"splits": {"test": {"image": {"auc": {"value": auc, "ci": [auc - 0.2, auc]}},
                                    "pixel": {"f1": {"value": f1, "ci": None}}}}}
    files = {("a1", "metrics/evaluate.json"): ev(0.7, 0.2), ("a1", "metrics/train.json"):
             {"train_samples": 12, "steps": 20}, ("b2", "metrics/evaluate.json"): ev(0.8, None),
             ("b2", "metrics/train.json"): {"train_samples": 24, "steps": 20}}
    rows = [
        {"Experiment": None, "rev": "workspace", "typ": "baseline", "export.fraction": 1.0},
        {"Experiment": "frac100", "rev": "b2", "params.yaml:export.fraction": 1.0,
         "splits.test.image.auc.value": 0.8},
        {"Experiment": "frac50", "rev": "a1", "export.fraction": 0.5},
        {"Experiment": "broken", "rev": "c3", "export.fraction": 0.25},  # no metrics: skipped
    ]
    pts = dvc_points(rows, "test", lambda rev, path: files.get((rev, path)))
    assert [(p["name"], p["fraction"], p["train_samples"]) for p in pts] == [
        ("frac50", 0.5, 12), ("frac100", 1.0, 24)]
    assert pts[0]["image_auc"] == 0.7 and pts[0]["image_auc_ci"] == pytest.approx([0.5, 0.7])
    assert pts[1]["pixel_f1"] is None


def test_scaling_plot_is_drawn(tmp_path):
    sc = {"set": "test", "points": [
        {"train_samples": n, "image_auc": a, "image_auc_ci": [a - 0.1, min(1, a + 0.1)],
         "pixel_f1": f, "pixel_f1_ci": None} for n, a, f in ((5, 0.6, 0.1), (10, 0.7, 0.2),
                                                           (20, 0.75, None))]}
    sc["fit"] = {"image_auc": fit_power_law([5, 10, 20], [0.6, 0.7, 0.75]),
                 "pixel_f1": fit_power_law([5, 10], [0.1, 0.2])}
    png = plot_scaling(sc, tmp_path / "s.png")
    assert Image.open(png).size[0] > 500


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> Path:
    """A data_dir with every stage up to export on the embedded corpus
    (`manifests/default.yaml`, what `make repro` uses); nested fractions 34/67/100%."""
    root = tmp_path_factory.mktemp("sweep")
    sections = {
        "plots_dir": str(root / "plots"),
        "synthesize": {"generators": only_generators(copy_move={}, removal={},
                                                     gan_synthesis={}), "per_source": 2},
        "split": {"ratios": {"train": 0.6, "val": 0.1, "test": 0.3}},
        "export": {"exports": only_exports(all={"balance": False, "imdl": False,
                                                "fractions": [0.34, 0.67, 1.0]})},
        "train": {"export": "all-100pct", "steps": 20, "batch_size": 2, "checkpoint_every": 20,
                  "val_every": 20, "loader_workers": 0, "val_max_images": 1, "tile_batch": 4},
        "evaluate": {"bootstrap": 100, "robustness_max_images": 0},
    }
    params = make_params(root, [ROOT / "manifests" / "default.yaml"], **sections)
    ex = local_executor()
    for stage in stage_names()[: stage_names().index("export") + 1]:
        cli.run_stage(stage, params, ex)
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return root


@pytest.mark.slow
def test_fraction_sweep_writes_points_fit_and_plot(sweep_run, capsys):
    root = sweep_run
    assert main(["--params", str(root / "params.yaml"), "--steps", "20"]) == 0
    sc = json.loads((root / "metrics" / "scaling.json").read_text())
    pts = sc["points"]
    assert [p["fraction"] for p in pts] == [0.34, 0.67, 1.0]
    n = [p["train_samples"] for p in pts]
    assert n[0] < n[1] < n[2] and all(p["steps"] == 20 for p in pts)
    assert sc["evaluated_on"] == "all-100pct"  # one test set for every point
    for m in ("image_auc", "pixel_f1"):
        f = sc["fit"][m]
        assert f["form"].startswith("err(N) = a * N^-b + c")
        if f["a"] is not None:
            assert {"a", "b", "c", "se", "rmse"} <= set(f)
        assert not f["identifiable"]  # 3 points for 3 parameters: said so
        assert f["note"]
    assert any(p["image_auc"] is not None or p["pixel_f1"] is not None for p in pts)
    png = root / "plots" / "scaling.png"
    assert Image.open(png).size[0] > 500
    # each point in its own folder; the main model is not touched
    for p in pts:
        d = root / "data" / "sweeps" / "fraction" / p["name"]
        assert (d / "data" / "train" / "model" / "model.safetensors").exists()
        ev = json.loads((d / "metrics" / "evaluate.json").read_text())
        assert ev["export"] == "all-100pct"
        got = yaml.safe_load((d / "data" / "train" / "model" / "params.yaml").read_text())
        assert got["train"]["export"] == p["name"] and got["train"]["steps"] == 20
    assert not (root / "data" / "train").exists()
    # a second run finds every point up to date
    capsys.readouterr()
    assert main(["--params", str(root / "params.yaml"), "--steps", "20"]) == 0
    assert json.loads((root / "metrics" / "scaling.json").read_text())["points"] == pts


@pytest.mark.slow
def test_domain_sweep_writes_the_transfer_matrix(sweep_run):
    root = sweep_run
    assert main(["--params", str(root / "params.yaml"), "--by", "domain", "--steps", "10"]) == 0
    tr = json.loads((root / "metrics" / "transfer.json").read_text())
    assert set(tr) == {"image_auc", "image_accuracy", "pixel_f1"}
    train_domains = {"aigc", "document", "face", "natural"}
    for m, mat in tr.items():
        assert set(mat) == train_domains | {"all"}, m
        cols = {c for row in mat.values() for c in row}
        assert cols and cols <= train_domains
        for row in mat.values():
            assert set(row) == cols
            assert all(v is None or 0.0 <= v <= 1.0 for v in row.values())
    assert any(v is not None for row in tr["image_accuracy"].values() for v in row.values())
    # each domain's model trained on exactly that domain's part of the export
    import pyarrow.parquet as pq

    base = pq.read_table(root / "data" / "exports" / "all-100pct" / "manifest.parquet").to_pylist()
    details = json.loads((root / "data" / "sweeps" / "domain" / "transfer_details.json").read_text())
    for d in train_domains:
        exp = root / "data" / "sweeps" / "domain" / f"only-{d}" / "data" / "exports"
        got = pq.read_table(exp / f"all-100pct-only-{d}" / "manifest.parquet").to_pylist()
        assert {r["key"] for r in got} == {r["key"] for r in base if r["domain"] == d
                                           and r["split"] in ("train", "val")}
        assert details["train_samples"][d] == sum(r["split"] == "train" for r in got)
    assert details["train_samples"]["all"] == sum(details["train_samples"][d] for d in train_domains)
    assert Image.open(root / "plots" / "transfer.png").size[0] > 300


def test_sweep_needs_several_fractions(tmp_path, capsys):
    params = make_params(tmp_path, [write_manifest(tmp_path / "c.yaml", [])])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    assert main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert "fraction folder" in capsys.readouterr().err
    params_mod.load(tmp_path / "params.yaml")
