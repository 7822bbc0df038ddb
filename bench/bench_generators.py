"""Forgery generator throughput: images per second per generator, and diffusers overhead.

Two modes:

- default (CPU, about 1 MP): every generator in the registry with its default params (the
  diffusers ones with their offline tiny random-weight pipeline at its default work size),
  on 1152 x 864 sources made from scikit-image photos (chelsea for natural, page for
  documents, astronaut for faces). OpenCV and torch are held to `--threads` threads (1: per
  core figures). Reported: `generate` alone, and with what the synthesize stage adds per
  sample (paste-back outside the dilated mask and PNG encoding).

- diffusers mode (`--diffusers`, or any of `--device`, `--preset`, `--size`, `--batch`
  given): the diffusion generators with a random-weight
  preset (`--preset tiny|mid`) at `--size` px, `--batch` sources per `generate_batch` call,
  against a bare diffusers loop that calls the same pipeline object directly with the same
  batch, steps, guidance and per-sample seeds, in the same run; prints generator/bare.

Prints a table and merges its section into `metrics/bench_generators.json`.

    python bench/bench_generators.py                                  # CPU, under 2 min
    python bench/bench_generators.py --device cpu --size 64 --batch 2 # check of the GPU mode
    python bench/bench_generators.py --device cuda --preset mid --size 512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generators import diffusion as D
from generators import registry
from generators.base import SkipSample, Source
from pipeline import imageio
from pipeline.synthesize import SynthesizeParams

W, H = 1152, 864  # about 1 MP
DIFFUSION = ("inpaint", "edit", "t2i_synthesis", "regeneration", "face_edit")


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a[..., :3])


def _cover(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Centre crop to the w:h aspect, then resize to w x h."""
    ih, iw = a.shape[:2]
    s = max(w / iw, h / ih)
    cw, ch = round(w / s), round(h / s)
    x, y = (iw - cw) // 2, (ih - ch) // 2
    crop = a[y : y + ch, x : x + cw]
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp)


def images(w: int = W, h: int = H) -> dict[str, np.ndarray]:
    """Sources per domain at w x h, plus donors."""
    from skimage import data

    astro = _rgb(data.astronaut())[:384]  # the upper 4:3 part holds the face
    page = _rgb(data.page())
    # the page is 2:1; stack it so that text keeps its proportions at 4:3
    page = np.concatenate([page, page[: page.shape[0] // 2]], axis=0)
    out = {
        "natural": _cover(_rgb(data.chelsea()), w, h),
        "document": _cover(page, w, h),
        "face": _cover(astro, w, h),
        "donor_natural": _cover(_rgb(data.coffee()), w, h),
    }
    out["aigc"] = out["natural"]
    out["donor_face"] = np.ascontiguousarray(out["face"][:, ::-1])
    return out


def make_source(domain: str, imgs: dict[str, np.ndarray], key: str, seed: int) -> Source:
    donor_img = imgs.get(f"donor_{domain}", imgs["natural"])
    donor = Source(key=f"{key}-donor", image=donor_img, domain=domain, seed=seed + 1)
    return Source(key=key, image=imgs[domain], domain=domain, seed=seed, format="png", donor=donor)


def set_threads(n: int) -> None:
    cv2.setNumThreads(n)
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_THREAD_LIMIT"] = str(n)  # tesseract


def _machine() -> dict[str, Any]:
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # shared machines: context
    }


# --------------------------------------------------------------------------- CPU, 1 MP


def bench_cpu(names: list[str], budget: float, max_runs: int) -> dict[str, Any]:
    imgs = images()
    stored = {d: imageio.encode_png(a) for d, a in imgs.items()}  # the sources' PNG bytes
    dilate = SynthesizeParams().paste_back_dilate
    rows: dict[str, Any] = {}
    for name in names:
        cls = registry.generator_class(name)
        t0 = time.perf_counter()
        gen = registry.build(name)
        gen.setup("cpu")
        setup_s = time.perf_counter() - t0
        gen_times, stage_times, skipped = [], [], 0
        i = 0
        spent = 0.0
        # one warm-up call, then timed calls until the budget or max_runs is reached
        while i <= max_runs and (i < 3 or spent < budget):
            src = make_source(cls.domain, imgs, f"k{i}", seed=1000 + i)
            rng = np.random.default_rng(1000 + i)
            t0 = time.perf_counter()
            try:
                f = gen.generate(src, rng)
            except SkipSample:
                skipped += 1
                i += 1
                if skipped > 5 and not gen_times:
                    break
                continue
            t1 = time.perf_counter()
            img = f.image
            if f.local and f.label == "tampered":
                img = imageio.paste_back(src.image, img, f.mask, dilate)
            same = img.shape == src.image.shape
            imageio.encode_like(img, stored[cls.domain], src.image if same else None)
            t2 = time.perf_counter()
            if i > 0:
                gen_times.append(t1 - t0)
                stage_times.append(t2 - t0)
                spent += t2 - t0
            i += 1
        row: dict[str, Any] = {"domain": cls.domain, "setup_s": round(setup_s, 3),
                               "runs": len(gen_times), "skipped": skipped}
        if gen_times:
            g, s = float(np.median(gen_times)), float(np.median(stage_times))
            row.update(
                seconds_median=round(g, 4),
                images_per_s=round(1 / g, 2),
                images_per_s_best=round(1 / min(gen_times), 2),
                images_per_s_with_stage=round(1 / s, 2),  # + paste-back + PNG encode
                model_id=getattr(f, "model_id", None),
            )
        rows[name] = row
        print(_cpu_line(name, row), flush=True)
    return {"size": [W, H], "megapixels": round(W * H / 1e6, 3), "generators": rows}


def _cpu_line(name: str, r: dict[str, Any]) -> str:
    if "images_per_s" not in r:
        return f"{name:16s} {r['domain']:9s} no output ({r['skipped']} skipped)"
    return (f"{name:16s} {r['domain']:9s} {r['images_per_s']:8.2f} {r['images_per_s_best']:8.2f} "
            f"{r['images_per_s_with_stage']:10.2f} {r['seconds_median'] * 1000:9.1f} "
            f"{r['setup_s']:7.2f} {r['runs']:5d}")


# --------------------------------------------------------------------------- diffusers vs bare


def _bare_inputs(name: str, gen: Any, sources: list[Source], size: int) -> tuple[dict, list[int]]:
    """The keyword arguments a hand-written diffusers loop would pass for this batch: inputs
    at the generator's work size, the generator's steps, guidance and strength, per-sample
    seeds."""
    from PIL import Image

    p = gen.params
    h, w = sources[0].image.shape[:2]
    n = len(sources)
    kw: dict[str, Any] = {"num_inference_steps": p.num_inference_steps,
                          "guidance_scale": p.guidance_scale}
    if name in ("inpaint", "face_edit"):
        wh = (size, size)  # both run on a square crop
        mask = np.zeros(wh, np.uint8)
        cv2.ellipse(mask, (size // 2, size // 2), (size // 4, size // 5), 20, 0, 360, 255, -1)
        crop = sources[0].image[:, (w - h) // 2 : (w - h) // 2 + h]
        kw.update(prompt=["a cat"] * n, image=[Image.fromarray(D.resize(crop, *wh))] * n,
                  mask_image=[Image.fromarray(mask)] * n, strength=p.strength)
    else:
        wh = D.work_size(h, w, p.size)
        img = Image.fromarray(D.resize(sources[0].image, *wh))
        if name == "t2i_synthesis":
            kw.update(prompt=[p.prompts[0]] * n)
        elif name == "edit":
            kw.update(prompt=[p.instructions[0]] * n, image=[img] * n,
                      image_guidance_scale=p.image_guidance_scale)
        else:  # regeneration, img2img
            kw.update(prompt=[p.prompt] * n, image=[img] * n, strength=p.strength)
    kw.update(height=wh[0], width=wh[1])
    return kw, [s.seed for s in sources]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _one_diffusers(name: str, imgs: dict[str, np.ndarray], device: str, preset: str, size: int,
                   batch: int, steps: int, dtype: str, repeat: int) -> dict[str, Any] | None:
    """Generator vs bare pipeline call for one generator; None when the sources do not suit."""
    import torch

    cls = registry.generator_class(name)
    params = {"model": f"{preset}-random", "size": size, "num_inference_steps": steps,
              "dtype": dtype}
    if name == "regeneration" and steps * 0.5 < 1:
        params["strength"] = 1.0
    gen = registry.build(name, params)
    t0 = time.perf_counter()
    gen.setup(device)
    setup_s = time.perf_counter() - t0
    pipe = gen.diffusion.ready().pipe  # the very pipeline object the generator calls
    sources = [make_source(cls.domain, imgs, f"k{i}", seed=100 + i) for i in range(batch)]
    kw, seeds = _bare_inputs(name, gen, sources, size)

    def run_gen() -> None:
        gen.generate_batch(sources, [np.random.default_rng(100 + i) for i in range(batch)])
        _sync(device)

    def run_bare() -> None:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with torch.inference_mode():
            pipe(**kw, generator=gens, output_type="np")
        _sync(device)

    try:
        run_gen()  # warm-up (kernels, allocator, caches)
        run_bare()
    except SkipSample as e:
        print(f"{name:16s} skipped: {e}", flush=True)
        return None
    tg, tb = [], []
    for _ in range(repeat):  # interleaved, so drift hits both alike
        t0 = time.perf_counter()
        run_gen()
        tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_bare()
        tb.append(time.perf_counter() - t0)
    g, b = float(np.median(tg)), float(np.median(tb))
    return {
        "setup_s": round(setup_s, 3),
        "generator_s_per_batch": round(g, 4),
        "bare_s_per_batch": round(b, 4),
        "generator_images_per_s": round(batch / g, 3),
        "bare_images_per_s": round(batch / b, 3),
        "ratio_generator_over_bare": round(g / b, 3),
        "work_size": [kw["height"], kw["width"]],
        "model_id": gen.diffusion.ready().model_id,
    }


def bench_diffusers(names: list[str], device: str, preset: str, size: int, batch: int,
                    steps: int, dtype: str, repeat: int) -> dict[str, Any]:
    import torch

    imgs = images()
    rows: dict[str, Any] = {}
    for name in names:
        r = _one_diffusers(name, imgs, device, preset, size, batch, steps, dtype, repeat)
        if r is None:
            continue
        rows[name] = r
        print(f"{name:16s} {r['generator_images_per_s']:10.3f} {r['bare_images_per_s']:10.3f} "
              f"{r['ratio_generator_over_bare']:7.3f} "
              f"{r['work_size'][0]:5d}x{r['work_size'][1]:<5d} {r['setup_s']:7.2f}", flush=True)
    info: dict[str, Any] = {"device": device, "preset": preset, "size": size, "batch": batch,
                            "steps": steps, "dtype": dtype, "repeat": repeat,
                            "source_size": [W, H], "generators": rows}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# --------------------------------------------------------------------------- main


def _merge_write(path: Path, section: str, data: dict[str, Any]) -> None:
    """Merges `section` into the JSON file: CPU and GPU runs accumulate in one file."""
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    old[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers", action="store_true",
                    help="time the diffusion generators against a bare diffusers loop; implied "
                         "by --device, --preset, --size or --batch")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (diffusers mode; "
                                                   "default cpu)")
    ap.add_argument("--preset", default=None, choices=sorted(D.RANDOM_PRESETS),
                    help="random-weight pipeline preset (diffusers mode; default tiny)")
    ap.add_argument("--size", type=int, default=None,
                    help="work size, px, a multiple of 8 (diffusers mode; default 512)")
    ap.add_argument("--batch", type=int, default=None,
                    help="sources per call (diffusers mode; default 4)")
    ap.add_argument("--steps", type=int, default=None,
                    help="inference steps (diffusers mode; default 20 on cuda, 2 on cpu)")
    ap.add_argument("--dtype", default=None, choices=D.DTYPES,
                    help="default float16 on cuda, float32 on cpu")
    ap.add_argument("--repeat", type=int, default=3, help="timed batches (diffusers mode)")
    ap.add_argument("--generators", default=None,
                    help="comma-separated names (default: all, or the diffusion ones)")
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds of timed runs per generator (CPU mode)")
    ap.add_argument("--max-runs", type=int, default=20, help="timed runs per generator (CPU mode)")
    ap.add_argument("--threads", type=int, default=1, help="OpenCV / torch threads")
    ap.add_argument("--out", default="metrics/bench_generators.json", help="JSON output path")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    diffusers_mode = args.diffusers or any(
        v is not None for v in (args.device, args.preset, args.size, args.batch))
    args.device = args.device or "cpu"
    args.preset = args.preset or "tiny"
    args.size = args.size or 512
    args.batch = args.batch or 4
    if args.size % 8 or args.size < 8 or args.batch < 1:
        ap.error(f"--size {args.size} must be a multiple of 8 and --batch {args.batch} >= 1")
    names = args.generators.split(",") if args.generators else None
    for n in names or []:
        registry.generator_class(n)  # unknown names: the registry's error, listing valid ones
    t0 = time.perf_counter()
    if diffusers_mode:
        names = names or list(DIFFUSION)
        cuda = args.device.startswith("cuda")
        steps = args.steps or (20 if cuda else 2)
        dtype = args.dtype or ("float16" if cuda else "float32")
        print(f"diffusers mode: device={args.device} preset={args.preset} size={args.size} "
              f"batch={args.batch} steps={steps} dtype={dtype} threads={args.threads}")
        print(f"{'generator':16s} {'gen img/s':>10s} {'bare img/s':>10s} {'ratio':>7s} "
              f"{'work':>11s} {'setup s':>7s}")
        res = bench_diffusers(names, args.device, args.preset, args.size, args.batch, steps,
                              dtype, args.repeat)
        section = f"diffusers/{args.device}/{args.preset}/{args.size}px/b{args.batch}"
    else:
        names = names or list(registry.REGISTRY)
        print(f"CPU, {W}x{H} sources, threads={args.threads}; img/s = 1 / median time")
        print(f"{'generator':16s} {'domain':9s} {'img/s':>8s} {'best':>8s} {'w/ stage':>10s} "
              f"{'ms/img':>9s} {'setup s':>7s} {'runs':>5s}")
        res = bench_cpu(names, args.budget, args.max_runs)
        res["threads"] = args.threads
        section = "cpu_1mp"
    res.update(_machine())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    _merge_write(out, section, res)
    print(f"wrote section {section!r} of {out} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
