"""The masks stage: derivation accuracy on edits with known truth, quality filters, inspect.

The edits are made here from scikit-image sample pictures, so the truth is exact: each edit
changes an object-shaped region placed on textured content (a blur or fill of a flat wall
changes nothing, and no method can see it).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import local_executor, make_params
from PIL import Image
from skimage import data as skdata

from pipeline import cli
from pipeline import inspect as inspect_mod
from pipeline.imageio import decode_mask, encode_mask, write_bytes
from pipeline.masks import (
    MasksParams,
    _clean,
    derive_mask,
    iou,
    is_degenerate,
    match_colours,
    run,
)
from pipeline.records import Record, iter_records, write_manifest

KINDS = ("copy_move", "recolour", "blur", "fill", "inpaint")


def _fit(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=interp)


def _images() -> dict[str, np.ndarray]:
    coffee = _fit(skdata.coffee(), 480)
    return {
        "chelsea": _fit(skdata.chelsea(), 450),
        "coffee": coffee,
        "page": np.repeat(_fit(skdata.page(), 512)[..., None], 3, axis=2),  # flat scan, as RGB
        "dark": np.rint(coffee.astype(np.float32) * 0.15).astype(np.uint8),  # ~15% brightness
        "astronaut": _fit(skdata.astronaut(), 400),
    }


IMAGES = _images()


def _blob(h: int, w: int, cy: int, cx: int, radius: int, rng: np.random.Generator) -> np.ndarray:
    """An object-like shape: a circle with a few random lobes."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0.05, 0.15) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    pts = np.stack([cx + radius * r * np.cos(t), cy + radius * r * np.sin(t)], 1)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.rint(pts).astype(np.int32)], 1)
    return m > 0


def _textured_centres(img: np.ndarray, radius: int, n: int) -> list[tuple[int, int]]:
    """The `n` most textured, well separated places for a region of `radius`."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mag = np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(g, cv2.CV_32F, 0, 1))
    score = cv2.blur(mag, (2 * radius + 1, 2 * radius + 1))
    h, w = g.shape
    m = int(radius * 1.4)
    score[:m], score[h - m :], score[:, :m], score[:, w - m :] = 0, 0, 0, 0
    out = []
    for _ in range(n):
        cy, cx = np.unravel_index(int(np.argmax(score)), score.shape)
        out.append((int(cy), int(cx)))
        cv2.circle(score, (int(cx), int(cy)), 3 * radius, 0, -1)
    return out


def make_edit(img: np.ndarray, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(forged image, truth mask) for one edit kind."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    radius = int(0.12 * min(h, w))
    (cy, cx), (sy, sx) = _textured_centres(img, radius, 2)
    mask = _blob(h, w, cy, cx, radius, rng)
    out = img.copy()
    if kind == "copy_move":  # content from elsewhere in the same image
        shift = np.float32([[1, 0, sx - cx], [0, 1, sy - cy]])
        src = cv2.warpAffine(img, shift, (w, h), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_REFLECT)
        out[mask] = src[mask]
    elif kind == "recolour":  # hue rotation and per-channel gain
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + 30) % 180
        rec = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
        rec *= np.float32([1.15, 1.0, 0.85])
        out[mask] = np.clip(rec, 0, 255).astype(np.uint8)[mask]
    elif kind == "blur":
        out[mask] = cv2.GaussianBlur(img, (0, 0), 3.0)[mask]
    elif kind == "fill":  # flat fill with the surrounding colour
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        out[mask] = np.median(img[ring & ~mask], axis=0).astype(np.uint8)
    elif kind == "inpaint":
        out = cv2.inpaint(img, mask.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
        out[~mask] = img[~mask]
    else:
        raise ValueError(f"edit kind {kind!r}; allowed: {', '.join(KINDS)}")
    return out, mask


def jpeg(img: np.ndarray, quality: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def colour_shift(img: np.ndarray) -> np.ndarray:
    """A small global shift: gain 1.02 and +3 levels."""
    return np.clip(img.astype(np.float32) * 1.02 + 3.0, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def edits() -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, kind) -> (original, forged, truth) over every image and edit kind."""
    return {(name, kind): (img, *make_edit(img, kind))
            for name, img in IMAGES.items() for kind in KINDS}


def _ious(edits, save) -> dict[tuple[str, str], float]:
    return {k: iou(derive_mask(o, save(f)).mask, t) for k, (o, f, t) in edits.items()}


def _report(ious: dict) -> str:
    worst = sorted(ious.items(), key=lambda kv: kv[1])[:6]
    return ", ".join(f"{a}/{b}={v:.2f}" for (a, b), v in worst)


def test_edit_kinds_change_their_region(edits):
    # the test's own truth: every edit visibly changes its region and nothing else
    for (name, kind), (o, f, t) in edits.items():
        d = np.abs(f.astype(np.int16) - o.astype(np.int16)).max(axis=2)
        assert np.count_nonzero(d[~t]) == 0, (name, kind)
        assert np.count_nonzero(d[t] > 2) > 0.3 * t.sum(), (name, kind)


def test_accuracy_lossless(edits):
    ious = _ious(edits, lambda f: f)
    mean = float(np.mean(list(ious.values())))
    assert mean >= 0.9, f"mean IoU {mean:.3f}; worst: {_report(ious)}"
    for name in IMAGES:  # no image kind is left behind by the others
        per = np.mean([v for (n, _), v in ious.items() if n == name])
        assert per >= 0.8, f"{name}: mean IoU {per:.3f}"


def test_accuracy_jpeg90(edits):
    ious = _ious(edits, jpeg)
    mean = float(np.mean(list(ious.values())))
    assert mean >= 0.8, f"mean IoU {mean:.3f}; worst: {_report(ious)}"


@pytest.mark.parametrize("save", ["png", "jpeg90"])
def test_global_colour_shift_does_not_blow_up(edits, save):
    enc = (lambda f: f) if save == "png" else jpeg
    plain = _ious(edits, enc)
    for k, (o, f, t) in edits.items():
        d = derive_mask(o, enc(colour_shift(f)))
        shifted = iou(d.mask, t)
        assert d.mask.sum() <= 1.5 * t.sum(), f"{k}: mask grew to {d.area:.1%}"
        assert shifted >= plain[k] - 0.1, f"{k}: IoU {plain[k]:.2f} -> {shifted:.2f} with a shift"
    # the shift alone is not an edit
    o = IMAGES["chelsea"]
    d = derive_mask(o, enc(colour_shift(o)))
    assert d.area < 0.01
    assert d.colour_shift >= 2.0


def test_match_colours_recovers_shift():
    o = IMAGES["astronaut"]
    fixed, shift = match_colours(o, colour_shift(o), 24.0)
    assert 3.0 <= shift <= 9.0
    err = np.abs(fixed.astype(np.int16) - colour_shift(o).astype(np.int16))
    assert np.percentile(err, 99) <= 1
    same, none = match_colours(o, o, 24.0)
    assert none == 0.0 and same is o


def test_derive_mask_larger_than_work_resolution():
    # the region clean-up runs on a reduced map; the mask comes back at full size, aligned
    o, f, t = (IMAGES["coffee"], *make_edit(IMAGES["coffee"], "recolour"))
    d = derive_mask(o, f, MasksParams(work_pixels=16384))
    assert d.mask.shape == t.shape
    assert iou(d.mask, t) >= 0.85


def test_clean_fills_small_holes_and_drops_small_components():
    r = np.zeros((200, 200), np.uint8)
    cv2.rectangle(r, (20, 20), (120, 120), 255, -1)
    cv2.circle(r, (40, 40), 4, 0, -1)  # small hole: filled
    cv2.rectangle(r, (60, 60), (110, 110), 0, -1)  # big hole: kept
    cv2.circle(r, (85, 85), 8, 255, -1)  # island in the big hole: kept
    cv2.circle(r, (170, 170), 3, 255, -1)  # speck: dropped
    out = _clean(r, min_area=100, max_hole=200)
    assert out[40, 40] == 255 and out[70, 70] == 0 and out[85, 85] == 255
    assert out[170, 170] == 0 and out[30, 100] == 255
    assert np.array_equal(_clean(r, 0, 0), r)


def test_derive_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="H x W x 3"):
        derive_mask(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))


def test_is_degenerate():
    assert "black" in is_degenerate(np.zeros((64, 64, 3), np.uint8))
    assert "constant" in is_degenerate(np.full((64, 64, 3), 128, np.uint8))
    assert "non-finite" in is_degenerate(np.full((4, 4), np.nan, np.float32))
    assert is_degenerate(IMAGES["dark"]) is None  # dark is not black


def test_params_validation():
    with pytest.raises(ValueError, match="min_area"):
        MasksParams(min_area=0.5, max_area=0.1)
    with pytest.raises(ValueError, match="density"):
        MasksParams(density=2.0)


# --------------------------------------------------------------------------- the stage


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _put(data: Path, rel: str, img: np.ndarray) -> str:
    write_bytes(data / rel, _png(img))
    return rel


def _tampered(data: Path, key: str, original: np.ndarray, forged: np.ndarray,
              requested: np.ndarray | None = None) -> Record:
    req = None
    if requested is not None:
        req = f"synthesize/requested/{key}.png"
        write_bytes(data / req, encode_mask(requested))
    return Record(
        key=key, source="test", label="tampered", domain="natural", operation="splice",
        generator="test", width=forged.shape[1], height=forged.shape[0], format="png",
        blob=_put(data, f"synthesize/blobs/{key}.png", forged),
        parent_blob=_put(data, f"ingest/blobs/{key}_src.png", original),
        requested_mask_blob=req, mask_source="derived", parent_key=f"{key}src", stage="synthesize",
    )


@pytest.fixture
def stage_inputs(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A hand-built synthesize manifest, one row per outcome: (manifest, data_dir, truth)."""
    data = tmp_path / "data"
    o = _fit(skdata.chelsea(), 320)
    h, w = o.shape[:2]
    good, truth = make_edit(o, "copy_move")
    far = np.zeros((h, w), bool)
    far[: h // 6, : w // 6] = True  # requested top-left; the edit is elsewhere
    rows = [
        _tampered(data, "good", o, good, requested=truth),
        _tampered(data, "identical", o, o.copy()),
        _tampered(data, "black", o, np.zeros_like(o)),
        _tampered(data, "constant", o, np.full_like(o, 90)),
        _tampered(data, "leaked", o, good, requested=far),
        _tampered(data, "mismatch", o[:, : w - 8], good),
        Record(key="real", source="test", label="real", domain="natural", width=w, height=h,
               blob=_put(data, "ingest/blobs/real.png", o)),
        Record(key="synthblack", source="test", label="synthetic", domain="aigc",
               operation="text2image",
               blob=_put(data, "synthesize/blobs/sb.png", np.zeros_like(o))),
        Record(key="given", source="test", label="tampered", domain="natural", width=w, height=h,
               blob=_put(data, "ingest/blobs/given.png", good),
               mask_blob=_put(data, "ingest/masks/given.png", (truth * 255).astype(np.uint8))),
        Record(key="nomask", source="test", label="tampered", domain="natural",
               blob=_put(data, "ingest/blobs/nomask.png", good)),
        Record(key="upstream", source="test", label="real", status="truncated", error="cut short"),
    ]
    manifest = data / "synthesize" / "manifest.parquet"
    write_manifest(manifest, rows)
    return manifest, data, {"good": truth}


def _run(tmp_path: Path, manifest: Path, **masks) -> tuple[dict, dict[str, Record]]:
    params = make_params(tmp_path, [], masks=masks)
    out = params.data / "masks"
    metrics = run(params, {"manifest": manifest}, out, local_executor())
    rows = {r.key: r for r in iter_records(out / "manifest.parquet")}
    return metrics, rows


def test_stage_outcomes_and_reasons(tmp_path, stage_inputs):
    manifest, data, truth = stage_inputs
    metrics, rows = _run(tmp_path, manifest, keep_diff=True)
    assert len(rows) == 11  # rejected rows stay, with their reason
    status = {k: r.status for k, r in rows.items()}
    assert status == {
        "good": "ok", "identical": "no_visible_change", "black": "degenerate_output",
        "constant": "degenerate_output", "leaked": "edit_leaked", "mismatch": "size_mismatch",
        "real": "ok", "synthblack": "degenerate_output", "given": "ok", "nomask": "missing_mask",
        "upstream": "truncated",
    }
    for k in ("identical", "black", "constant", "leaked", "mismatch", "synthblack", "nomask"):
        assert rows[k].error and rows[k].stage == "masks", k
    assert "black" in rows["black"].error and "constant" in rows["constant"].error
    good = rows["good"]
    assert good.mask_source == "derived"
    assert good.mask_iou_requested is not None and good.mask_iou_requested >= 0.85
    assert 0.5 <= good.mask_quality <= 1.0
    mask = decode_mask((data / good.mask_blob).read_bytes())
    assert iou(mask, truth["good"]) == pytest.approx(good.mask_iou_requested)
    assert good.mask_area == pytest.approx(mask.mean())
    diff = np.asarray(Image.open(data / good.diff_blob))
    assert diff.shape == mask.shape and diff[mask].mean() > 4 * diff[~mask].mean()
    assert good.mask_leak < 0.05
    assert rows["leaked"].mask_iou_requested == pytest.approx(0.0, abs=0.01)
    assert rows["real"].mask_source == "none" and rows["given"].mask_source == "given"
    assert rows["given"].mask_area == pytest.approx(truth["good"].mean(), rel=0.01)
    assert metrics["rejected"] == {"degenerate_output": 3, "edit_leaked": 1, "missing_mask": 1,
                                   "no_visible_change": 1, "size_mismatch": 1}
    assert metrics["rejected_total"] == 7
    assert metrics["by_status"]["truncated"] == 1
    assert metrics["mask_source"] == {"derived": 1, "given": 1, "none": 1}


def test_stage_area_filters_and_no_diff_by_default(tmp_path, stage_inputs):
    manifest, _, _ = stage_inputs
    metrics, rows = _run(tmp_path, manifest, min_area=0.5)
    assert rows["good"].status == "mask_too_small" and "min_area" in rows["good"].error
    assert rows["good"].mask_blob and rows["good"].diff_blob is None  # the evidence is kept
    assert metrics["rejected"]["mask_too_small"] == 2  # good and leaked: same edit
    metrics, rows = _run(tmp_path, manifest, max_area=0.01)
    assert rows["good"].status == "mask_too_large" and "max_area" in rows["good"].error
    assert metrics["rejected"]["mask_too_large"] == 2


# --------------------------------------------------------------------------- inspect


def _params_file(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "corpus": [],
                                 "executor": {"backend": "local", "progress": False}}))
    return p


def test_inspect_writes_panels(tmp_path, stage_inputs, capsys):
    manifest, data, _ = stage_inputs
    _run(tmp_path, manifest)  # no diff kept: inspect recomputes it
    params = _params_file(tmp_path)
    assert cli.main(["inspect", "good", "--params", str(params)]) == 0
    out = data / "inspect" / "good.png"
    assert capsys.readouterr().out.strip() == str(out)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    src_h, src_w = Image.open(data / "synthesize/blobs/good.png").size[::-1]
    # image, mask, requested region, difference, original: five panels side by side
    assert sheet.shape[1] >= 5 * src_w * sheet.shape[0] / (src_h + 80) - 5
    reddish = (sheet[..., 0].astype(int) - sheet[..., 1] > 100).mean()
    assert reddish > 0.005  # the mask overlay is drawn

    # a rejected sample is shown too, at a chosen path
    target = tmp_path / "leak.png"
    assert inspect_mod.main(["leaked", "--params", str(params), "--out", str(target)]) == 0
    assert Image.open(target).size[0] > 3 * src_w

    # before the masks stage ran, the synthesize manifest is used
    (data / "masks" / "manifest.parquet").unlink()
    assert inspect_mod.main(["real", "--params", str(params)]) == 0
    assert (data / "inspect" / "real.png").is_file()


def test_inspect_unknown_key_and_help(tmp_path, stage_inputs, capsys):
    params = _params_file(tmp_path)
    assert inspect_mod.main(["nope", "--params", str(params)]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert inspect_mod.main(["x", "--params", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit) as e:
        inspect_mod.main(["--help"])
    assert e.value.code == 0
    assert "difference map" in capsys.readouterr().out
