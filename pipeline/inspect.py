"""`python -m pipeline inspect KEY`: one sample as a PNG, so a person can check it by eye.

Panels side by side: the image, its mask overlaid in red and, for derived masks, the
difference map (the kept `diff_blob`, else recomputed with `derive_mask` and the params'
masks section) and the original it was derived from. A title line names the key, status,
operation, mask source and mask quality; a rejected sample shows its reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline import params as params_mod
from pipeline.imageio import decode, decode_mask
from pipeline.params import Params, ParamsError
from pipeline.records import FIELDS, Record

log = logging.getLogger(__name__)

PANEL_HEIGHT = 384  # every panel is scaled to this height (never up past 2x)
_TITLE = 34
_CAPTION = 16
_GAP = 6


def manifests(data: Path) -> list[Path]:
    """Manifests under `data_dir`, latest stage first: each holds every row before it."""
    order = ("manifest.parquet", "split/manifest.parquet", "masks/manifest.parquet",
             "synthesize/manifest.parquet", "dedup/manifest.parquet", "ingest/manifest.parquet")
    return [data / rel for rel in order if (data / rel).is_file()]


def find_record(data: Path, key: str) -> tuple[Record, Path] | None:
    """The row with `key` from the latest manifest that has it, and that manifest."""
    for path in manifests(data):
        table = pq.read_table(path, filters=[("key", "==", key)])
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            return Record(**{k: v for k, v in row.items() if k in FIELDS}), path
    return None


def _load(data: Path, rel: str | None) -> tuple[np.ndarray | None, str]:
    if not rel:
        return None, "no file"
    try:
        return decode((data / rel).read_bytes()), ""
    except Exception as e:  # noqa: BLE001 - a broken sample is exactly what one inspects
        return None, f"{type(e).__name__}: {e}"


def _load_mask(data: Path, rel: str | None) -> np.ndarray | None:
    if not rel:
        return None
    try:
        return decode_mask((data / rel).read_bytes())
    except Exception as e:  # noqa: BLE001
        log.warning("inspect: mask %s unreadable: %s", rel, e)
        return None


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` with `mask` tinted red and outlined, so both content and edge stay visible."""
    m = mask
    if m.shape != image.shape[:2]:
        m = cv2.resize(m.astype(np.uint8), (image.shape[1], image.shape[0]),
                       interpolation=cv2.INTER_NEAREST) > 0
    out = image.copy()
    red = np.array([255, 0, 0], np.float32)
    out[m] = (0.5 * image[m].astype(np.float32) + 0.5 * red).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 0, 0), max(1, min(image.shape[:2]) // 300))
    return out


def _message_panel(text: str, height: int = PANEL_HEIGHT) -> Image.Image:
    im = Image.new("RGB", (height, height), (60, 60, 60))
    ImageDraw.Draw(im).multiline_text((8, 8), _wrap(text, 40), fill=(255, 255, 255))
    return im


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i : i + width] for i in range(0, len(text), width))


def _panel(a: np.ndarray) -> Image.Image:
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))
    h = im.height
    target = min(PANEL_HEIGHT, 2 * h)
    if h != target:
        w = max(1, round(im.width * target / h))
        im = im.resize((w, target), Image.NEAREST if target > h else Image.LANCZOS)
    return im


def panels(r: Record, data: Path, params: Params) -> list[tuple[str, Image.Image]]:
    """(caption, picture) pairs for one record."""
    from pipeline.masks import derive_mask

    image, why = _load(data, r.blob)
    out: list[tuple[str, Image.Image]] = []
    if image is None:
        return [("image", _message_panel(f"image unreadable: {why}"))]
    out.append(("image", _panel(image)))
    if r.mask_source == "full":
        mask = np.ones(image.shape[:2], bool)
    else:
        mask = _load_mask(data, r.mask_blob)
    if mask is not None:
        out.append((f"mask ({r.mask_source})", _panel(overlay(image, mask))))
    else:
        out.append(("mask", _message_panel("no mask")))
    requested = _load_mask(data, r.requested_mask_blob)
    if requested is not None:
        out.append(("requested region", _panel(overlay(image, requested))))
    if r.parent_blob:
        original, why = _load(data, r.parent_blob)
        diff = _load_mask_gray(data, r.diff_blob)
        if diff is None and original is not None and original.shape == image.shape:
            diff = derive_mask(original, image, params.masks).soft()
        if diff is not None:
            heat = cv2.applyColorMap(diff, cv2.COLORMAP_INFERNO)[..., ::-1]  # BGR -> RGB
            out.append(("difference", _panel(heat)))
        if original is not None:
            out.append(("original", _panel(original)))
        else:
            out.append(("original", _message_panel(f"original unreadable: {why}")))
    return out


def _load_mask_gray(data: Path, rel: str | None) -> np.ndarray | None:
    if not rel:
        return None
    try:
        with Image.open(data / rel) as im:
            return np.asarray(im.convert("L"))
    except Exception as e:  # noqa: BLE001
        log.warning("inspect: difference map %s unreadable: %s", rel, e)
        return None


def title(r: Record) -> str:
    q = "-" if r.mask_quality is None else f"{r.mask_quality:.2f}"
    line = (f"{r.key}  status={r.status}  operation={r.operation}  "
            f"mask_source={r.mask_source}  mask_quality={q}")
    if r.mask_iou_requested is not None:
        line += f"  iou_requested={r.mask_iou_requested:.2f}"
    return line


def render(r: Record, data: Path, params: Params) -> Image.Image:
    """The sheet: a title line, then captioned panels left to right."""
    parts = panels(r, data, params)
    height = max(p.height for _, p in parts)
    width = sum(p.width for _, p in parts) + _GAP * (len(parts) + 1)
    font = ImageFont.load_default()
    text_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title(r), font=font))
    sheet = Image.new("RGB", (max(width, text_w + 2 * _GAP), _TITLE + _CAPTION + height + _GAP),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((_GAP, 4), title(r), fill=(0, 0, 0), font=font)
    if r.status != "ok" and r.error:
        draw.text((_GAP, 4 + _TITLE // 2), f"reason: {r.error}"[:160], fill=(180, 0, 0), font=font)
    x = _GAP
    for caption, p in parts:
        draw.text((x, _TITLE), caption, fill=(0, 0, 0), font=font)
        sheet.paste(p, (x, _TITLE + _CAPTION))
        x += p.width + _GAP
    return sheet


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline inspect",
        description="Write a PNG of one sample: the image, its mask overlaid in red and, for "
        "derived masks, the difference map and the original. Looks the key up in the latest "
        "manifest under data_dir.",
    )
    ap.add_argument("key", help="the sample's key (the `key` column of a manifest)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--out", help="PNG to write (default: DATA_DIR/inspect/KEY.png)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = params_mod.load(args.params)
    except (ParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = params.data
    if not manifests(data):
        print(f"error: no manifest under {data}; run the pipeline first", file=sys.stderr)
        return 2
    found = find_record(data, args.key)
    if found is None:
        searched = ", ".join(str(p) for p in manifests(data))
        print(f"error: key {args.key!r} is in none of: {searched}", file=sys.stderr)
        return 2
    r, path = found
    log.info("inspect: %s from %s", r.key, path)
    out = Path(args.out) if args.out else data / "inspect" / f"{r.key}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    render(r, data, params).save(out, "PNG")
    print(out)
    return 0
