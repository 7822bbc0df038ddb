"""`python -m pipeline predict IMAGE... --model DIR --out OUT`: masks and scores for any images.

A full image is cut into `crop` x `crop` tiles at its own resolution (never resized for the
segmentation branch; the last row and column end at the image border and overlap their
neighbours), each tile is run with the global view of the whole image, and the tile masks
are stitched back in place (averaged where tiles overlap). A tile answered "real" gives an
empty mask: the question asks to segment only if fake. The image's score is the *maximum*
of the tiles' P(fake): an image is forged when any part of it is, and unlike noisy-or the
maximum does not drift towards 1 as large images give more tiles. The answer text is the
model's own greedy answer on the tile with the highest score.

Per image: `OUT/<stem>.mask.png` (0/255, the image's size: pixels with P(forged) >= 0.5)
and `OUT/<stem>.json` with `score`, `answer`, `tiles`, `tile_scores` and the model path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import imageio
from pipeline.model import DeFakerOne, load_model
from pipeline.train_data import CropConfig, make_views
from pipeline.views import chw, cut, tiles

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    prob: np.ndarray  # H x W float32, P(pixel forged)
    score: float  # P(image forged): max over tiles
    answer: str
    tile_scores: list[float]

    @property
    def mask(self) -> np.ndarray:
        return self.prob >= 0.5


def crop_config(model: DeFakerOne) -> CropConfig:
    return CropConfig(crop=model.spec.crop, vlm_size=model.vlm_size,
                      global_view=model.spec.global_view)


@torch.no_grad()
def predict_image(model: DeFakerOne, rgb: np.ndarray, batch: int = 8, answer: bool = True
                  ) -> Prediction:
    """Tiles an RGB image at native resolution, runs the model, stitches the mask."""
    cfg = crop_config(model)
    device = next(model.parameters()).device
    h, w = rgb.shape[:2]
    wins = tiles(h, w, cfg.crop)
    total = np.zeros((h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    scores: list[float] = []
    views_all = []
    for i in range(0, len(wins), batch):
        part = wins[i : i + batch]
        crops = [cut(rgb, win, cfg.crop) for win in part]
        px = torch.from_numpy(np.stack([chw(c) for c in crops])).to(device)
        views = torch.from_numpy(np.stack([make_views(rgb, c, cfg) for c in crops])).to(device)
        p_fake, p_mask = model.infer(px, views)
        p_mask = p_mask.cpu().numpy()
        for win, pm, pf in zip(part, p_mask, p_fake.tolist()):
            if pf >= 0.5:  # a tile answered "real" has no forged region
                total[win.y : win.y + win.h, win.x : win.x + win.w] += pm[: win.h, : win.w]
            count[win.y : win.y + win.h, win.x : win.x + win.w] += 1
            scores.append(float(pf))
        views_all.append(views.cpu())
    best = int(np.argmax(scores))
    text = ""
    if answer:
        views = torch.cat(views_all)[best].to(device)
        text = model.answer_text(views)
    return Prediction(total / count, max(scores), text, scores)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline predict",
        description="Score images and segment their forged regions with a trained model: "
        "writes OUT/<stem>.mask.png (0/255, the image's size) and OUT/<stem>.json "
        "(score = P(forged), answer = the model's text).")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    ap.add_argument("--model", required=True, help="trained model directory (data/train/model)")
    ap.add_argument("--out", default="predictions", help="output directory (default: predictions)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model(args.model, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems: dict[str, int] = {}
    failed = 0
    for path in args.images:
        p = Path(path)
        try:
            rgb = imageio.read_rgb(p)
        except (OSError, ValueError, SyntaxError) as e:
            print(f"error: {p}: not a readable image ({e})", file=sys.stderr)
            failed += 1
            continue
        stem = p.stem if p.stem not in stems else f"{p.stem}-{stems[p.stem]}"
        stems[p.stem] = stems.get(p.stem, 0) + 1
        pred = predict_image(model, rgb, batch=args.batch)
        imageio.write_bytes(out / f"{stem}.mask.png", imageio.encode_mask(pred.mask))
        info = {"image": str(p), "score": round(pred.score, 6), "answer": pred.answer,
                "width": rgb.shape[1], "height": rgb.shape[0], "mask_area": float(pred.mask.mean()),
                "tiles": len(pred.tile_scores), "tile_scores": [round(s, 6) for s in pred.tile_scores],
                "combine": "max over tiles", "model": str(Path(args.model).resolve())}
        imageio.write_bytes(out / f"{stem}.json", (json.dumps(info, indent=1) + "\n").encode())
        print(f"{p}: score {pred.score:.3f} answer {pred.answer!r} -> {out / (stem + '.mask.png')}")
    return 1 if failed else 0
