"""The evaluate stage: metric functions against scikit-learn on hand-made cases (degenerate
ones included), intervals, perturbations, and the stage end to end on a small corpus with an
outside benchmark given as an IMDL-BenCo JSON whose near-copy in the training corpus never
reaches train or val."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
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
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    roc_auc_score,
)

from pipeline import cli
from pipeline.evaluate import (
    EvaluateParams,
    Scored,
    block,
    bootstrap_ci,
    delta_block,
    image_metrics,
    mann_whitney_auc,
    parse_perturbation,
    perturb,
    pixel_scores,
    set_block,
    worst_rows,
)
from pipeline.params import ParamsError
from pipeline.stages import names as stage_names

# ----------------------------------------------------------------------------- metrics


IMAGE_CASES = {
    "mixed": ([0, 0, 1, 1, 1, 0, 1], [0.1, 0.6, 0.55, 0.9, 0.2, 0.3, 0.8]),
    "ties": ([0, 1, 0, 1, 1, 0], [0.5, 0.5, 0.5, 0.7, 0.5, 0.2]),
    "perfect": ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]),
    "inverted": ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]),
    "constant": ([0, 1, 1, 0, 1], [0.5] * 5),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_metrics_equal_sklearn(case):
    y, s = map(np.array, IMAGE_CASES[case])
    m = image_metrics(y, s, 0.5)
    pred = (s >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["ap"] == pytest.approx(average_precision_score(y, s))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    # the resampled AUC (scipy's Mann-Whitney U) is the same number, ties included
    assert mann_whitney_auc(s[y == 1], s[y == 0]) == pytest.approx(roc_auc_score(y, s))


def test_mann_whitney_auc_is_vectorized_over_resamples():
    rng = np.random.default_rng(1)
    pos, neg = rng.random((5, 7)), rng.random((5, 4)) * 0.8
    got = mann_whitney_auc(pos, neg, axis=-1)
    want = [roc_auc_score(np.r_[np.ones(7), np.zeros(4)], np.r_[p, n]) for p, n in zip(pos, neg)]
    np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0]])
def test_one_class_auc_is_undefined_and_says_so(y):
    y = np.array(y)
    s = np.linspace(0.2, 0.9, len(y))
    m = image_metrics(y, s)
    assert m["auc"] is None and m["ap"] is None
    assert "one class only" in m["undefined"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, (s >= 0.5).astype(int)))
    with pytest.warns(UserWarning, match="[Oo]nly one class"):  # what we guard against:
        assert np.isnan(roc_auc_score(y, s))  # scikit-learn's NaN and a warning


def test_no_images():
    m = image_metrics(np.array([], int), np.array([]))
    assert m["undefined"] == "no images" and m["accuracy"] is None


def _masks():
    truth = np.zeros((6, 8), bool)
    truth[1:4, 2:6] = True
    prob = np.zeros((6, 8), np.float32)
    prob[1:4, 3:7] = 0.8  # overlaps 9 of 12 true pixels, 3 false
    prob[0, 0] = 0.6  # a false positive
    prob[3, 2] = 0.3  # a true pixel below the threshold: a better threshold exists
    return truth, prob


def test_pixel_scores_equal_sklearn_on_flattened_masks():
    truth, prob = _masks()
    f1, iou, best = pixel_scores(truth, prob, 0.5)
    pred = (prob >= 0.5).ravel()
    assert f1 == pytest.approx(f1_score(truth.ravel(), pred))
    assert iou == pytest.approx(jaccard_score(truth.ravel(), pred))
    # best threshold per image: the max of sklearn's F1 over every threshold the map allows
    brute = max(f1_score(truth.ravel(), (prob >= t).ravel()) for t in np.unique(prob) if t > 0)
    assert best == pytest.approx(brute) and best > f1


def test_pixel_scores_degenerate_masks():
    truth, prob = _masks()
    empty = np.zeros_like(truth)
    assert pixel_scores(truth, None, pred=empty) == (0.0, 0.0, 0.0)
    full = np.ones_like(truth)
    f1, iou, best = pixel_scores(truth, None, pred=full)
    assert f1 == pytest.approx(f1_score(truth.ravel(), full.ravel()))
    assert iou == pytest.approx(truth.mean()) and best == f1  # a binary mask: no threshold
    exact = pixel_scores(truth, truth.astype(np.float32))
    assert exact == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="pixels"):
        pixel_scores(truth, prob[:, :4])


def test_bootstrap_interval():
    a = np.random.default_rng(0).random(40)
    ci = bootstrap_ci(lambda i, axis=-1: a[i].mean(axis=axis), (40,), 500, 0.95, seed=3)
    assert ci[0] < a.mean() < ci[1] and ci[1] - ci[0] < 0.4
    assert ci == bootstrap_ci(lambda i, axis=-1: a[i].mean(axis=axis), (40,), 500, 0.95, seed=3)
    assert bootstrap_ci(lambda i, axis=-1: a[i].mean(axis=axis), (1,), 500, 0.95, 0) is None
    assert bootstrap_ci(lambda i, axis=-1: a[i].mean(axis=axis), (40,), 0, 0.95, 0) is None


def _scored(n_real=6, n_fake=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_real):
        rows.append(Scored(key=f"r{i}", label="real", score=float(rng.random() * 0.7),
                           domain="natural", operation="none", generator="none", source="a"))
    for i in range(n_fake):
        dom = "natural" if i % 2 else "document"
        f1 = float(rng.random())
        rows.append(Scored(key=f"f{i}", label="tampered", score=float(0.3 + rng.random() * 0.7),
                           domain=dom, operation="splice" if i % 3 else "copy_move",
                           generator="g1" if i % 2 else "g2", source="a", f1=f1, iou=f1 / 2,
                           f1_best=min(1.0, f1 + 0.1), full_f1=0.2, full_iou=0.1, empty_f1=0.0,
                           empty_iou=0.0))
    return rows


def test_blocks_with_intervals_baselines_and_breakdowns():
    p = EvaluateParams(bootstrap=200)
    rows = _scored()
    b = set_block(rows, p, seed=1)
    json.dumps(b)  # serialisable
    y = np.array([r.y for r in rows])
    s = np.array([r.score for r in rows])
    assert b["image"]["auc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    lo, hi = b["image"]["auc"]["ci"]
    assert lo <= b["image"]["auc"]["value"] <= hi
    assert b["image"]["ap"]["ci"] is not None  # whole sets get AP intervals
    f1 = np.mean([r.f1 for r in rows if r.f1 is not None])
    assert b["pixel"]["f1"]["value"] == pytest.approx(f1, abs=1e-4)
    assert b["n"] == 12 and b["n_pixel"] == 6
    base = b["baselines"]
    assert base["constant_score"]["image"]["auc"]["value"] == 0.5
    assert base["constant_score"]["image"]["auc"]["ci"] == [0.5, 0.5]
    assert base["empty_mask"]["pixel"]["f1"]["value"] == 0.0
    assert base["full_mask"]["pixel"]["f1"]["value"] == pytest.approx(0.2)
    assert set(b["by_domain"]) == {"natural", "document"}
    # a group of forgeries only is scored against the set's real images
    g1 = b["by_generator"]["g1"]
    assert g1["versus"] == "all real images of the set" and g1["n_real"] == 6
    assert g1["image"]["auc"]["value"] is not None
    # the real images alone: one class, said so
    none = b["by_operation"]["none"]["image"]["auc"]
    assert none["value"] is None and "one class" in none["undefined"]
    assert b["by_operation"]["none"]["pixel"]["f1"]["undefined"]


def test_tiny_groups_say_why_they_have_no_interval():
    p = EvaluateParams(bootstrap=200)
    b = block(_scored(n_real=1, n_fake=3), p, seed=0)
    auc = b["image"]["auc"]
    assert auc["value"] is not None and auc["ci"] is None
    assert "fewer than 2" in auc["ci_undefined"]


def test_robustness_delta_is_perturbed_minus_clean():
    p = EvaluateParams(bootstrap=200)
    clean = _scored()
    pert = [Scored(**{**r.__dict__, "score": 1.0 - r.score,
                      "f1": None if r.f1 is None else r.f1 / 2}) for r in clean]
    d = delta_block(clean, pert, p, seed=0)
    y = np.array([r.y for r in clean])
    want = roc_auc_score(y, [r.score for r in pert]) - roc_auc_score(y, [r.score for r in clean])
    assert d["image"]["auc"]["value"] == pytest.approx(want, abs=1e-4)
    lo, hi = d["image"]["auc"]["ci"]
    assert lo <= d["image"]["auc"]["value"] <= hi and lo < 0
    f1 = np.mean([r.f1 / 2 - r.f1 for r in clean if r.f1 is not None])
    assert d["pixel"]["f1"]["value"] == pytest.approx(f1, abs=1e-4)


def test_worst_rows_per_cell():
    rows = _scored()
    w = worst_rows("test", rows, 1)
    cells = {(r["domain"], r["operation"], r["generator"]) for r in w}
    assert cells == {(r.domain, r.operation, r.generator) for r in rows}
    for r in w:
        cell = [x for x in rows if (x.domain, x.operation, x.generator) ==
                (r["domain"], r["operation"], r["generator"])]
        if r["by"] == "pixel_f1":
            assert r["pixel_f1"] == min(x.f1 for x in cell if x.f1 is not None)
        else:
            assert abs(r["score"] - (r["label"] != "real")) == pytest.approx(
                max(abs(x.y - x.score) for x in cell), abs=1e-6)


def test_perturbations():
    rgb = np.asarray(Image.fromarray(skdata.coffee()).resize((90, 60)))
    mask = np.zeros(rgb.shape[:2], bool)
    mask[10:30, 20:50] = True
    rng = np.random.default_rng(0)
    for name in EvaluateParams().perturbations:
        out, m = perturb(rgb, mask, name, rng)
        assert out.dtype == np.uint8 and out.shape[2] == 3
        assert m.dtype == bool and m.shape == out.shape[:2]
        kind, v = parse_perturbation(name)
        if kind == "resize":
            assert out.shape[:2] == (round(60 * v), round(90 * v))
            assert 0.8 < m.mean() / mask.mean() < 1.25  # nearest: still the same region
        else:
            assert m is mask and not np.array_equal(out, rgb)
    a, _ = perturb(rgb, None, "noise5", np.random.default_rng(7))
    b, _ = perturb(rgb, None, "noise5", np.random.default_rng(7))
    assert np.array_equal(a, b)
    for bad in ("jpeg0", "resize1.5", "blur", "sharpen2"):
        with pytest.raises(ValueError, match="allowed"):
            parse_perturbation(bad)


def test_params_are_checked():
    with pytest.raises(ValueError, match="bootstrap"):
        EvaluateParams(bootstrap=10)
    with pytest.raises(ValueError, match="splits"):
        EvaluateParams(splits=("holdout",))
    with pytest.raises(ValueError, match="perturbation"):
        EvaluateParams(perturbations=("jpeg101",))


# ----------------------------------------------------------------------------- the stage


def _photo(name: str, size=(200, 150)) -> Image.Image:
    img = np.asarray(getattr(skdata, name)())
    img = img if img.ndim == 3 else np.stack([img] * 3, -1)
    return Image.fromarray(img[..., :3]).resize(size)


AUTHENTIC = ("rocket", "grass", "text")


def _benchmark(root: Path) -> tuple[Path, Path]:
    """An IMDL-BenCo JSON benchmark: 3 tampered images with masks (a patch of another photo
    pasted), 3 authentic ("Negative"); returns (manifest, the authentic images' folder)."""
    bench = root / "bench"
    pairs = []
    donor = np.asarray(_photo("chelsea"))
    for i, name in enumerate(("coins", "moon", "page")):
        img = np.array(_photo(name, (160, 120)))
        mask = np.zeros(img.shape[:2], np.uint8)
        y, x = 20 + 10 * i, 30 + 15 * i
        img[y : y + 40, x : x + 50] = donor[40:80, 60:110]
        mask[y : y + 40, x : x + 50] = 255
        save(Image.fromarray(img), bench / "Tp" / f"tp{i}.png", "PNG")
        save(Image.fromarray(mask), bench / "Gt" / f"tp{i}.png", "PNG")
        pairs.append([f"Tp/tp{i}.png", f"Gt/tp{i}.png"])
    for name in AUTHENTIC:
        save(_photo(name, (160, 120)), bench / "Au" / f"{name}.png", "PNG")
        pairs.append([f"Au/{name}.png", "Negative"])
    (bench / "bench.json").write_text(json.dumps(pairs))
    manifest = write_manifest(root / "manifests" / "casia_mini.yaml", [
        {"name": "casia_mini", "kind": "forensic", "domain": "natural", "label": "tampered",
         "license": "test", "path": str(bench / "bench.json")}])
    return manifest, bench / "Au"


def _corpus(root: Path, authentic: Path) -> Path:
    folder = root / "photos"
    for name in ("coffee", "chelsea", "camera", "astronaut", "immunohistochemistry", "coins"):
        save(_photo(name), folder / f"{name}.png", "PNG")
    # near-copies of the benchmark's authentic images: resized and re-encoded as JPEG
    for name in AUTHENTIC:
        copy = Image.open(authentic / f"{name}.png").convert("RGB").resize((200, 150))
        save(copy, folder / f"{name}_copy.jpg", "JPEG", quality=85)
    return write_manifest(root / "corpus.yaml", [
        {"name": "photos", "kind": "image_folder", "domain": "natural", "label": "real",
         "license": "BSD-3-Clause", "path": str(folder)}])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Every stage up to evaluate on 7 photos (one a near-copy of a benchmark image) plus
    the benchmark, tiny model, 20 steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evalrun")
    bench, authentic = _benchmark(root)
    corpus = _corpus(root, authentic)
    params = make_params(
        root, [corpus],
        plots_dir=str(root / "plots"),
        synthesize={"generators": only_generators(copy_move={}, removal={}), "per_source": 2},
        split={"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
        export={"exports": only_exports(all={"balance": False, "imdl": False})},
        train={"export": "all", "steps": 20, "batch_size": 2, "checkpoint_every": 20,
               "val_every": 20, "loader_workers": 0, "val_max_images": 2, "tile_batch": 4},
        evaluate={"benchmarks": [str(bench)], "bootstrap": 200, "robustness_max_images": 2,
                  "perturbations": ["jpeg70", "resize0.5"]},
    )
    ex = local_executor()
    names = stage_names()
    for stage in names[: names.index("evaluate") + 1]:
        cli.run_stage(stage, params, ex)
    return root


@pytest.mark.slow
def test_benchmark_near_copies_never_reach_train_or_val(run_dir):
    rows = pq.read_table(run_dir / "data" / "manifest.parquet").to_pylist()
    bench = [r for r in rows if r["source"] == "casia_mini"]
    assert len(bench) == 6 and {r["status"] for r in bench} == {"benchmark"}
    assert all(r["split"] is None for r in bench)  # never shipped
    family = []
    for name in AUTHENTIC:
        copy = next(r for r in rows if r["uri"] == f"{name}_copy.jpg")
        original = next(r for r in bench if r["uri"].endswith(f"{name}.png"))
        assert copy["group_id"] == original["group_id"]  # dedup saw the near-copy
        family += [r for r in rows if copy["key"] in (r["key"], r["parent_key"], r["donor_key"])]
    assert len(family) > len(AUTHENTIC)  # the copies and their forgeries
    for r in family:
        assert r["split"] not in ("train", "val"), r
    # those whose unit would have gone to train or val were taken out, saying why
    blocked = [r for r in family if r["status"] == "blocklisted"]
    assert blocked and all("near-duplicate" in r["error"] for r in blocked)
    # and nothing of it is in the training shards
    keys = set()
    for t in (run_dir / "data" / "exports" / "all").glob("*/*.parquet"):
        if t.parent.name in ("train", "val"):
            keys |= {r["key"] for r in pq.read_table(t, columns=["key"]).to_pylist()}
    assert not keys & {r["key"] for r in family} and not keys & {r["key"] for r in bench}
    ingest = json.loads((run_dir / "metrics" / "ingest.json").read_text())
    assert ingest["by_status"]["benchmark"] == 6 and "benchmark" not in ingest["errors_by_reason"]


@pytest.mark.slow
def test_evaluate_reports_the_benchmark_and_the_test_split(run_dir):
    m = json.loads((run_dir / "metrics" / "evaluate.json").read_text())
    b = m["benchmarks"]["casia_mini"]
    assert b["n"] == 6 and b["n_real"] == 3 and b["n_forged"] == 3 and b["n_pixel"] == 3
    for k in ("auc", "ap", "accuracy", "balanced_accuracy"):
        assert 0.0 <= b["image"][k]["value"] <= 1.0
    for k in ("f1", "iou", "f1_best"):
        assert 0.0 <= b["pixel"][k]["value"] <= 1.0
    assert b["pixel"]["f1_best"]["value"] >= b["pixel"]["f1"]["value"]
    assert set(b["baselines"]) == {"constant_score", "random_score", "empty_mask", "full_mask"}
    # the full mask's F1 on these pasted patches, computed here from the given masks
    full = []
    for i in range(3):
        t = np.asarray(Image.open(run_dir / "bench" / "Gt" / f"tp{i}.png")) > 0
        full.append(f1_score(t.ravel(), np.ones(t.size, bool)))
    assert b["baselines"]["full_mask"]["pixel"]["f1"]["value"] == pytest.approx(
        np.mean(full), abs=1e-4)
    assert set(b["by_source"]) == {"casia_mini"} and b["by_domain"]
    assert m["benchmark_rows"]["casia_mini"] == {"benchmark": 6}
    assert "test" in m["splits"] or "test" in m["skipped"]
    assert m["skipped"]["test_ood"].startswith("no test_ood shards")  # no OOD split asked
    rob = m["robustness"]["casia_mini"]
    assert set(rob) == {"jpeg70", "resize0.5"} and rob["jpeg70"]["n"] == 2
    plots = run_dir / "plots"
    roc = (plots / "evaluate_roc_casia_mini.csv").read_text().splitlines()
    assert roc[0] == "fpr,tpr" and len(roc) >= 3
    pr = (plots / "evaluate_pr_casia_mini.csv").read_text().splitlines()
    assert pr[0] == "recall,precision" and len(pr) >= 3
    # DVC-declared curve files exist even for a set that was not evaluated
    assert (plots / "evaluate_roc_test_ood.csv").read_text().strip() == "fpr,tpr"
    # worst samples: keys, cells and predicted masks of the images' own size
    w = pq.read_table(run_dir / "data" / "evaluate" / "worst.parquet").to_pylist()
    bw = [r for r in w if r["set"] == "casia_mini"]
    assert {r["by"] for r in bw} == {"pixel_f1", "score"}
    for r in bw:
        pred = np.asarray(Image.open(run_dir / "data" / r["pred_mask"]))
        assert set(np.unique(pred)) <= {0, 255}
        img = Image.open(io.BytesIO((run_dir / "data" / r["blob"]).read_bytes()))
        assert pred.shape == img.size[::-1]


def test_missing_model_is_a_clear_error(tmp_path):
    params = make_params(tmp_path, [write_manifest(tmp_path / "c.yaml", [])])
    (tmp_path / "data").mkdir()
    pq.write_table(__import__("pyarrow").table({"key": []}), tmp_path / "data" / "manifest.parquet")
    with pytest.raises(FileNotFoundError, match="no trained model"):
        cli.run_stage("evaluate", params, local_executor())


def test_benchmark_named_like_a_split_is_refused(tmp_path):
    m = write_manifest(tmp_path / "test.yaml", [])
    params = make_params(tmp_path, [write_manifest(tmp_path / "c.yaml", [])],
                         evaluate={"benchmarks": [str(m)]})
    from pipeline.evaluate import benchmark_manifests

    with pytest.raises(ParamsError, match="named like a split"):
        benchmark_manifests(params)
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
