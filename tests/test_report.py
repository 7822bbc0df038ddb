"""The report page: built from a real run, opened in headless Chromium, every image it
references decodes, the model sections follow the files that exist, and the stage streams."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import find_browser, load
from conftest import ROOT, local_executor, only_exports, only_generators, save, write_manifest
from PIL import Image
from skimage import data as skdata

from pipeline import params as params_mod
from pipeline import report, stages
from pipeline.cli import run_stage
from pipeline.records import SCHEMA

SECTIONS = (
    "counts",
    "generators",
    "rejected",
    "duplicates",
    "distributions",
    "exports",
    "model",
    "sampling",
)


# --------------------------------------------------------------------------- a real run


def _corpus(root: Path) -> Path:
    folder = root / "photos"
    coffee = Image.fromarray(skdata.coffee())
    save(coffee.resize((200, 133)), folder / "coffee.png", "PNG")
    save(coffee.resize((150, 100)), folder / "copies" / "coffee_small.png", "PNG")  # near copy
    save(
        Image.fromarray(skdata.chelsea()).resize((150, 100)),
        folder / "chelsea.jpg",
        "JPEG",
        quality=90,
    )
    save(Image.fromarray(skdata.rocket()).resize((160, 106)), folder / "rocket.png", "PNG")
    save(Image.fromarray(skdata.astronaut()).resize((128, 128)), folder / "astronaut.png", "PNG")
    buf = io.BytesIO()
    Image.fromarray(skdata.coins()).save(buf, "JPEG", quality=90)
    (folder / "broken.jpg").write_bytes(buf.getvalue()[:600])  # truncated
    return write_manifest(
        root / "corpus.yaml",
        [
            {
                "name": "photos",
                "kind": "image_folder",
                "domain": "natural",
                "label": "real",
                "license": "BSD-3-Clause",
                "path": str(folder),
            },
        ],
    )


def _params_dict(root: Path, corpus: Path) -> dict:
    return {
        "data_dir": str(root / "data"),
        "metrics_dir": str(root / "metrics"),
        "plots_dir": str(root / "plots"),
        "corpus": [str(corpus)],
        "executor": {"backend": "local", "progress": False},
        "synthesize": {
            "generators": only_generators(copy_move={}, removal={}, inpaint={}, gan_synthesis={}),
            "per_source": 2,
        },
        # a low max_area rejects the larger edits, so the rejected section has rows
        "masks": {"max_area": 0.06},
        "export": {"exports": only_exports(bal={"fractions": [0.5, 1.0], "imdl": False})},
    }


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """Every corpus stage and the report on a small corpus with a near copy, a broken file,
    rejections and a random-weight stand-in model (the model stages are left out: their
    sections are tested on files written by hand)."""
    root = tmp_path_factory.mktemp("report_corpus")
    raw = _params_dict(root, _corpus(root))
    params = params_mod.from_dict(raw)
    ex = local_executor()
    try:
        for name in stages.names():
            if name not in ("train", "evaluate", "focus"):  # the model stages
                run_stage(name, params, ex)
    finally:
        ex.shutdown()
    return params, raw


def _write_model_files(params: params_mod.Params) -> dict:
    """What train and evaluate write, in the layout the report documents."""
    rows = pq.read_table(params.data / "manifest.parquet").to_pylist()
    forged = [r for r in rows if r["status"] == "ok" and r["label"] == "tampered"]
    metrics, plots = params.metrics, params.plots
    plots.mkdir(parents=True, exist_ok=True)
    (metrics / "train.json").write_text(
        json.dumps(
            {
                "preset": "tiny",
                "steps": 40,
                "samples": 320,
                "epochs": 12.5,
                "train_samples": 26,
                "loss_first": 2.31,
                "loss": 0.52,
                "loss_txt": 0.11,
                "loss_seg": 0.41,
                "samples_per_s": 17.3,
                "wall_s": 19.2,
                "params_total": 4_200_000,
                "params_trainable": 1_100_000,
                "val_pixel_f1": 0.61,
                "val_image_accuracy": 0.75,
                "something_new": {"nested": 1},
            }
        )
    )
    with open(plots / "train.csv", "w") as f:
        f.write("step,samples,loss,loss_txt,loss_seg,lr,samples_per_s\n")
        f.writelines(
            f"{s},{s * 8},{2.3 / s**0.5:.4f},{0.5 / s**0.5:.4f},{1.8 / s**0.5:.4f},0.0001,17\n"
            for s in range(5, 45, 5)
        )
    with open(plots / "train_val.csv", "w") as f:
        f.write(
            "step,val_pixel_f1,val_image_accuracy,val_images\n10,0.3,0.5,4\n20,0.5,0.75,4\n"
            "40,0.61,0.75,4\n"
        )
    block = {
        "n": 12,
        "image": {
            "auc": {"value": 0.83, "ci": [0.61, 0.97]},
            "ap": 0.8,
            "accuracy": 0.75,
            "balanced_accuracy": 0.7,
        },
        "pixel": {"f1": {"value": 0.47, "ci": [0.3, 0.6]}, "iou": 0.35, "f1_best": 0.58},
    }
    base = {
        "constant_score": {"image": {"auc": 0.5, "accuracy": 0.5}},
        "empty_mask": {"pixel": {"f1": 0.0, "iou": 0.0}},
        "full_mask": {"pixel": {"f1": 0.12, "iou": 0.07}},
    }
    (metrics / "evaluate.json").write_text(
        json.dumps(
            {
                "splits": {
                    "test": {
                        **block,
                        "baselines": base,
                        "by_domain": {"natural": block, "aigc": {"n": 3, "image_auc": 0.9}},
                    },
                    "test_ood": {"n": 0},
                },
                "benchmarks": {
                    "casia_tiny": {
                        "n": 5,
                        "image_auc": 0.66,
                        "image_auc_ci": [0.4, 0.9],
                        "pixel_f1": 0.21,
                    }
                },
                "robustness": {
                    "test": {
                        "jpeg_70": {"image": {"auc": -0.08}, "pixel": {"f1": -0.12}},
                        "resize_0.5": {"delta": {"image": {"auc": -0.15}}},
                    }
                },
            }
        )
    )
    with open(plots / "evaluate_roc_test.csv", "w") as f:
        f.write("fpr,tpr,threshold\n0,0,1\n0.1,0.6,0.8\n0.3,0.85,0.5\n1,1,0\n")
    with open(plots / "evaluate_pr.csv", "w") as f:  # one file with a set column
        f.write(
            "set,recall,precision\ntest,0,1\ntest,0.5,0.8\ntest,1,0.5\n"
            "casia_tiny,0,1\ncasia_tiny,1,0.4\n"
        )
    (params.data / "evaluate" / "pred").mkdir(parents=True, exist_ok=True)
    worst = []
    cells = {}  # one sample per (domain, operation, generator): the report shows each cell
    for r in forged:
        cells.setdefault((r["domain"], r["operation"], r["generator"]), r)
    for i, r in enumerate(list(cells.values())[:6]):
        pred = np.zeros((r["height"], r["width"]), np.uint8)
        pred[: r["height"] // 3, : r["width"] // 3] = 255  # a wrong corner
        Image.fromarray(pred).save(params.data / "evaluate" / "pred" / f"{r['key']}.png")
        worst.append(
            {
                "key": r["key"],
                "domain": r["domain"],
                "operation": r["operation"],
                "generator": r["generator"],
                "label": r["label"],
                "by": "pixel_f1",
                "pixel_f1": 0.05 * i,
                "score": 0.3,
                "set": "test",
                "pred_mask": f"pred/{r['key']}.png",
            }
        )
    pq.write_table(pa.Table.from_pylist(worst), params.data / "evaluate" / "worst.parquet")
    (metrics / "scaling.json").write_text(
        json.dumps(
            {
                "points": [
                    {"fraction": f, "train_samples": n, "image_auc": a, "pixel_f1": p}
                    for f, n, a, p in (
                        (0.25, 6, 0.6, 0.2),
                        (0.5, 13, 0.7, 0.3),
                        (1.0, 26, 0.8, 0.4),
                    )
                ],
                "fit": {"image_auc": {"a": 0.8, "b": 0.3, "c": 0.05}},
            }
        )
    )
    (metrics / "transfer.json").write_text(
        json.dumps(
            {
                "image_auc": {
                    "natural": {"natural": 0.8, "aigc": 0.55},
                    "aigc": {"natural": 0.5, "aigc": 0.9},
                }
            }
        )
    )
    return {"worst_keys": [w["key"] for w in worst]}


@pytest.fixture(scope="module")
def model_run(corpus_run, tmp_path_factory):
    """The same run copied, with the model stages' files beside it, and the report again."""
    params, raw = corpus_run
    root = tmp_path_factory.mktemp("report_model")
    shutil.copytree(params.data, root / "data")
    shutil.copytree(params.metrics, root / "metrics")
    raw = {
        **raw,
        "data_dir": str(root / "data"),
        "metrics_dir": str(root / "metrics"),
        "plots_dir": str(root / "plots"),
    }
    params = params_mod.from_dict(raw)
    info = _write_model_files(params)
    run_stage("report", params, local_executor())
    return params, raw, info


def _page(params) -> tuple[Path, str]:
    path = params.data / "report" / "index.html"
    return path, path.read_text()


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)


def _refs(text: str) -> _Refs:
    p = _Refs()
    p.feed(text)
    return p


# --------------------------------------------------------------------------- tests


@pytest.mark.slow  # the corpus run behind it takes about 40 s
@pytest.mark.parametrize("which", ["corpus", "model"])
def test_page_loads_in_headless_chromium(which, corpus_run, model_run, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no Chromium on PATH: `apt-get install chromium` (make install does it as root)"
        )
    params = (corpus_run if which == "corpus" else model_run)[0]
    path, _ = _page(params)
    shot = tmp_path / f"report_{which}.png"
    page = load(browser, path.as_uri(), screenshot=shot)
    assert page.console_errors == [] and page.exceptions == []
    assert page.failed_requests == []
    assert page.requests and all(u.startswith(("file://", "data:")) for u in page.requests)
    assert page.images, "the page shows no images"
    broken = [i["src"] for i in page.images if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == []
    assert page.section_ids == list(SECTIONS)
    with Image.open(shot) as im:  # the screenshot is the whole page
        assert im.width == 1400 and im.height == page.height > 2000
        assert np.asarray(im.convert("L")).std() > 20


@pytest.mark.slow  # the corpus run behind it takes about 40 s
@pytest.mark.parametrize("which", ["corpus", "model"])
def test_every_referenced_file_exists_and_decodes(which, corpus_run, model_run):
    params = (corpus_run if which == "corpus" else model_run)[0]
    path, text = _page(params)
    refs = _refs(text)
    assert "script" not in refs.tags  # static: no JavaScript
    local = [r for r in refs.refs if not r.startswith(("#", "data:"))]
    assert local and not [r for r in local if "://" in r or r.startswith("/")]
    for rel in local:
        with Image.open(path.parent / rel) as im:
            im.load()
            assert im.width > 0
    on_disk = {
        str(p.relative_to(path.parent)) for p in path.parent.rglob("*.*") if p.name != "index.html"
    }
    assert on_disk == set(local)  # nothing stale beside the page


def _section(text: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.DOTALL)
    assert m, f"section {sid} missing"
    return m.group(1)


@pytest.mark.slow  # the corpus run behind it takes about 40 s
def test_corpus_sections_show_what_a_person_checks(corpus_run):
    params, _ = corpus_run
    _, text = _page(params)
    rows = pq.read_table(params.data / "manifest.parquet").to_pylist()
    statuses = {r["status"] for r in rows}
    assert {"duplicate", "truncated", "mask_too_large"} <= statuses  # the corpus did its job
    counts = _section(text, "counts")
    for dim in ("domain", "operation", "generator", "split", "status"):
        assert f"counts_{dim}.png" in counts
    assert f"<b>{len(rows):,}</b><span>rows</span>" in counts
    gens = _section(text, "generators")
    for g in ("copy_move", "removal", "inpaint", "gan_synthesis"):
        assert f"<h3>{g}" in gens
    # the inpainting model is a random-weight stand-in, and says so; the GAN is not
    inpaint = gens.split("<h3>inpaint")[1].split("<h3>")[0]
    assert "random-weight stand-in" in inpaint and "tiny-random:" in inpaint
    gan = gens.split("<h3>gan_synthesis")[1].split("<h3>")[0]
    assert "random-weight stand-in" not in gan
    assert "size/format template" in gan and "mask: whole image" in gan
    shown = [r for r in rows if r["key"] in gens]
    assert shown and all(r["status"] == "ok" and r["label"] != "real" for r in shown)
    for r in shown:  # key, mask area and quality next to each sample
        assert f"area {r['mask_area']:.1%}" in gens
    rejected = _section(text, "rejected")
    for status in statuses - {"ok", "duplicate"}:
        assert f"<h3>{status}<" in rejected
    too_large = [r for r in rows if r["status"] == "mask_too_large"]
    assert any(r["key"] in rejected and r["error"].split(" > ")[0] in rejected for r in too_large)
    dups = _section(text, "duplicates")
    dup = next(r for r in rows if r["status"] == "duplicate")
    kept = next(
        r
        for r in rows
        if r["group_id"] == dup["group_id"] and r["label"] == "real" and r["status"] == "ok"
    )
    assert dup["key"] in dups and kept["key"] in dups
    assert dups.index(kept["key"]) < dups.index(dup["key"])  # the shipped one first
    assert 'badge shipped">shipped<' in dups and 'badge dropped">duplicate<' in dups
    exports = _section(text, "exports")
    assert "bal-50pct" in exports and "bal-100pct" in exports and "target share" in exports
    assert "README.md" in exports and "# Export" in exports  # the dataset cards
    for name in ("dist_size2d", "dist_area", "dist_quality", "dist_jpeg"):
        assert f"fig/{name}.png" in _section(text, "distributions")
    sampling = _section(text, "sampling")
    assert f"({len(rows):,} rows)" in sampling and "smallest" in sampling


@pytest.mark.slow  # the corpus run behind it takes about 40 s
def test_model_sections_absent_say_so_in_one_line(corpus_run):
    _, text = _page(corpus_run[0])
    model = _section(text, "model")
    for what, path in (
        ("training", "train.json"),
        ("evaluation", "evaluate.json"),
        ("worst samples", "worst.parquet"),
        ("scaling law", "scaling.json"),
        ("cross-domain transfer", "transfer.json"),
    ):
        line = re.search(rf'<p class="absent"><b>{what}</b>: not shown, .*?</p>', model)
        assert line and path in line.group(0)
    assert "<img" not in model


@pytest.mark.slow  # the corpus run behind it takes about 40 s
def test_model_sections_read_the_documented_files(model_run):
    params, _, info = model_run
    _, text = _page(params)
    model = _section(text, "model")
    assert 'class="absent"' not in model
    assert "fig/train_curves.png" in model and "fig/eval_curves.png" in model
    assert "fig/scaling.png" in model and "fig/transfer_image_auc.png" in model
    assert "4,200,000" in model and "0.52" in model  # params_total, loss
    assert "0.830 <span" in model and "[0.610, 0.970]" in model  # a value with its interval
    assert "baseline: constant_score" in model and "baseline: full_mask" in model
    assert "benchmark casia_tiny" in model and "0.660" in model
    assert "test: jpeg_70" in model and "-0.080" in model and "-0.150" in model
    assert "n/a" in model  # keys a block does not have
    assert "something_new.nested" in model  # unknown keys are listed, not dropped
    for key in info["worst_keys"]:
        assert f"thumbs/{key}-pred.jpg" in model
    # the predicted mask (a top-left corner) is drawn: the pred thumbnail is red there
    with Image.open(params.data / "report" / "thumbs" / f"{info['worst_keys'][0]}-pred.jpg") as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    corner = a[: a.shape[0] // 4, : a.shape[1] // 4]
    assert (corner[..., 0] - corner[..., 1]).mean() > 40


@pytest.mark.slow  # the corpus run behind it takes about 40 s
def test_malformed_model_files_show_na_and_never_crash(model_run, tmp_path):
    _, raw, _ = model_run
    p = params_mod.from_dict(
        {**raw, "metrics_dir": str(tmp_path / "metrics"), "plots_dir": str(tmp_path / "plots")}
    )
    p.metrics.mkdir()
    p.plots.mkdir()
    (p.metrics / "train.json").write_text("[1, 2, 3]")  # not an object
    (p.metrics / "evaluate.json").write_text(
        json.dumps(
            {
                "splits": {
                    "test": {"image": {"auc": "high", "ap": None}, "pixel": 3, "n": "many"},
                    "bad": 7,
                },
                "robustness": {"test": {"jpeg": {"image": {"auc": [1, 2]}}}},
                "baselines": "none",
            }
        )
    )
    (p.metrics / "scaling.json").write_text(
        json.dumps({"points": [{"fraction": "x"}, 5], "fit": {"image_auc": {"a": "?"}}})
    )
    (p.metrics / "transfer.json").write_text(json.dumps({"auc": {"a": {"b": "c"}}, "x": 1}))
    (p.plots / "train.csv").write_text("step,loss\n1,nan\nx,y\n")
    (p.plots / "evaluate_roc_test.csv").write_text("fpr\n0.1\n")
    out = tmp_path / "report"
    out.mkdir()
    inputs, _ = stages.resolve(stages.get("report"), p)
    report.run(p, inputs, out, local_executor())
    model = _section((out / "index.html").read_text(), "model")
    assert "n/a" in model
    refs = _refs(model).refs
    for rel in refs:
        with Image.open(out / rel) as im:
            im.load()


@pytest.mark.slow  # the corpus run behind it takes about 40 s
def test_same_inputs_give_the_same_page(corpus_run, tmp_path):
    params, _ = corpus_run
    inputs, _ = stages.resolve(stages.get("report"), params)
    ex = local_executor()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        report.run(params, inputs, tmp_path / name, ex)
    files = sorted(
        str(f.relative_to(tmp_path / "a")) for f in (tmp_path / "a").rglob("*") if f.is_file()
    )
    assert files == sorted(
        str(f.relative_to(tmp_path / "b")) for f in (tmp_path / "b").rglob("*") if f.is_file()
    )
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# --------------------------------------------------------------------------- scale


def synthetic_manifest(path: Path, n: int, seed: int = 0) -> None:
    """`n` records without images: realistic columns, every status and generator mix."""
    rng = np.random.default_rng(seed)
    gens = np.array(["copy_move", "inpaint", "splice", "t2i_synthesis", "removal"])
    statuses = np.array(
        ["ok"] * 16 + ["mask_too_small", "no_visible_change", "duplicate", "truncated"]
    )
    writer = pq.ParquetWriter(path, SCHEMA)
    step = 20_000
    for start in range(0, n, step):
        m = min(step, n - start)
        real = rng.random(m) < 0.4
        g = gens[rng.integers(0, len(gens), m)]
        status = statuses[rng.integers(0, len(statuses), m)]
        cols = {
            "key": [f"k{start + i:09d}" for i in range(m)],
            "source": ["synthetic"] * m,
            "group_id": [f"g{(start + i) // 3:08d}" for i in range(m)],
            "label": np.where(real, "real", "tampered").tolist(),
            "domain": np.array(["natural", "face", "document", "aigc"])[
                rng.integers(0, 4, m)
            ].tolist(),
            "operation": np.where(real, "none", g).tolist(),
            "generator": [None if r else x for r, x in zip(real, g, strict=True)],
            "model_id": [
                None if r else ("tiny-random:abc" if x == "inpaint" else None)
                for r, x in zip(real, g, strict=True)
            ],
            "width": rng.integers(64, 4000, m).tolist(),
            "height": rng.integers(64, 4000, m).tolist(),
            "format": np.where(rng.random(m) < 0.5, "jpg", "png").tolist(),
            "jpeg_quality": rng.integers(50, 100, m).tolist(),
            "mask_area": np.where(real, 0.0, rng.random(m) ** 3).tolist(),
            "mask_quality": np.where(real, np.nan, rng.random(m)).tolist(),
            "mask_source": np.where(real, "none", "derived").tolist(),
            "split": np.where(status == "ok", "train", None).tolist(),
            "status": status.tolist(),
            "error": np.where(status == "ok", None, "a reason").tolist(),
            "blob": [f"missing/{start + i}.png" for i in range(m)],
        }
        cols["mask_quality"] = [None if np.isnan(v) else v for v in cols["mask_quality"]]
        t = pa.table({f.name: pa.array(cols.get(f.name, [None] * m), f.type) for f in SCHEMA})
        writer.write_table(t)
    writer.close()


_CHILD = """
import resource, sys, time
from pathlib import Path
from pipeline import params as params_mod, report, stages
from pipeline.executor import Executor
from pipeline.params import ExecutorParams
root = Path(sys.argv[1])
p = params_mod.from_dict({"data_dir": str(root / "data"), "metrics_dir": str(root / "metrics"),
                          "plots_dir": str(root / "plots"), "report": {"batch_rows": 8192}})
inputs, out = stages.resolve(stages.get("report"), p)
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
m = report.run(p, inputs, out, Executor(ExecutorParams(backend="local", progress=False)))
picks = sum(m["sampled"]["generators"].values()) + sum(m["sampled"]["rejected"].values())
print(m["rows"], m["batches"], picks + m["sampled"]["duplicate_groups"], m["html_bytes"],
      time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_the_stage_streams_a_large_manifest(tmp_path):
    """10^5 rows render with the same peak memory as 10^4 (the manifest is never loaded
    whole), the page stays small, and it says how it sampled."""
    results = {}
    for n in (10_000, 100_000):
        root = tmp_path / str(n)
        (root / "data").mkdir(parents=True)
        synthetic_manifest(root / "data" / "manifest.parquet", n)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(root)],
            capture_output=True,
            check=False,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        rows, batches, picks, html_bytes, seconds, rss_kib = out.stdout.split()
        results[n] = (int(batches), int(picks), int(html_bytes), float(seconds), int(rss_kib))
        assert int(rows) == n and int(batches) == -(-n // 8192)
        text = (root / "data" / "report" / "index.html").read_text()
        assert f"in {-(-n // 8192)} record batches" in text and f"({n:,} rows)" in text
        assert f"<b>{n:,}</b><span>rows</span>" in text
    small, big = results[10_000], results[100_000]
    # the same number of picks (4 per generator, 3 per reason, 4 groups): sampled
    assert big[1] == small[1] == 5 * 4 + 3 * 3 + 4
    assert big[2] < 1.3 * small[2] and big[2] < 400_000  # the page does not grow with the corpus
    assert big[4] < 1.25 * small[4], f"peak RSS {small[4]} KiB at 10^4 rows, {big[4]} at 10^5"
    assert big[3] < 120, f"{big[3]:.1f} s for 10^5 rows"


def test_many_generators_are_capped_and_named(tmp_path):
    (tmp_path / "data").mkdir()
    synthetic_manifest(tmp_path / "data" / "manifest.parquet", 3000)
    p = params_mod.from_dict(
        {
            "data_dir": str(tmp_path / "data"),
            "metrics_dir": str(tmp_path / "metrics"),
            "plots_dir": str(tmp_path / "plots"),
            "report": {"max_generators": 2, "samples_per_generator": 1},
        }
    )
    inputs, out = stages.resolve(stages.get("report"), p)
    out.mkdir()
    m = report.run(p, inputs, out, local_executor())
    gens = _section((out / "index.html").read_text(), "generators")
    assert gens.count("<h3>") == 2 and "3 more generators (fewer rows) not shown" in gens
    # every sample's image is missing here: each panel says so instead of a broken <img>
    assert "no image: FileNotFoundError" in gens and m["thumbnails"] == 0


def test_a_page_without_images_loads_in_chromium_too(tmp_path):
    """The quick browser check (the corpus-run ones are slow): a manifest whose images are
    gone gives a page that still loads cleanly and says what is missing."""
    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no Chromium on PATH: `apt-get install chromium` (make install does it as root)"
        )
    (tmp_path / "data").mkdir()
    synthetic_manifest(tmp_path / "data" / "manifest.parquet", 2000)
    p = params_mod.from_dict(
        {
            "data_dir": str(tmp_path / "data"),
            "metrics_dir": str(tmp_path / "metrics"),
            "plots_dir": str(tmp_path / "plots"),
        }
    )
    inputs, out = stages.resolve(stages.get("report"), p)
    out.mkdir()
    report.run(p, inputs, out, local_executor())
    page = load(browser, (out / "index.html").as_uri(), screenshot=tmp_path / "page.png")
    assert page.console_errors == [] and page.exceptions == [] and page.failed_requests == []
    assert page.section_ids == list(SECTIONS)
    assert page.images and all(i["naturalWidth"] > 0 for i in page.images)  # the charts


def test_bottom_k_picks_do_not_depend_on_row_order():
    rng = np.random.default_rng(1)
    keys = [f"key{i}" for i in range(500)]
    cats = np.array(["a" if i % 3 else "b" for i in range(500)], dtype=object)
    from pipeline.split import unit_hash

    ranks = np.array([unit_hash(7, k) for k in keys])
    picks = []
    for order in (np.arange(500), rng.permutation(500)):
        bk = report.BottomK(4)
        for chunk in np.array_split(order, 7):
            t = pa.table({"key": [keys[i] for i in chunk]})
            bk.offer(t, cats[chunk], ranks[chunk], np.ones(len(chunk), bool))
        picks.append({c: [r["key"] for r in bk.rows(c)] for c in ("a", "b")})
    assert picks[0] == picks[1]
    for c in ("a", "b"):
        want = sorted(
            (k for k, cc in zip(keys, cats, strict=True) if cc == c), key=lambda k: unit_hash(7, k)
        )[:4]
        assert picks[0][c] == want


def test_report_params_are_checked():
    with pytest.raises(ValueError, match="report.thumb_px"):
        report.ReportParams(thumb_px=8)
    with pytest.raises(params_mod.ParamsError, match="report.samples_per_generator"):
        params_mod.from_dict({"report": {"samples_per_generator": -1}})


def test_report_is_the_last_stage_and_reads_the_run():
    s = stages.get("report")
    assert stages.names()[-1] == "report"
    assert s.writes == {"report": "report"} and "manifest" in s.reads and "exports" in s.reads
