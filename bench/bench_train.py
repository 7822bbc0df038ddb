"""Benchmark: the training loop's input pipeline, tiny preset, on this machine's cores.

1. Throughput: samples/s of the full loop (streaming WebDataset tars, decoding JPEGs,
   native-resolution crops and views in DataLoader worker processes, then the training step)
   against the same steps on batches already in memory (the compute-bound rate), measured
   back to back in each of `--repeats` rounds (median of the per-round ratios). Target:
   full / in-memory >= 0.9. On a machine shared with other work the wall-clock ratio swings
   with the load, so the CPU time is measured too: the training process's CPU seconds per
   step in both loops, and the loader process's CPU seconds per batch. With one core for
   the step and one for the loader, the loop runs at in-memory CPU per step / max(full-loop
   CPU per step, loader CPU per batch) of the compute-bound rate (`cpu_bound_ratio`).
2. Memory: peak RSS of a training run (main process and, separately, the largest loader
   worker) that reads every sample of 4 and of 16 shards, each in a fresh process. Target:
   the 16-shard run's peak within 1.1x of the 4-shard one (streaming, nothing accumulates).

    python bench/bench_train.py [--samples-per-shard 24] [--steps 60] [--out metrics/bench_train.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_shards(folder: Path, n_shards: int, per_shard: int, side: int = 512, seed: int = 0) -> list:
    """Tars in the export layout (`train-NNNNNN.tar` + `_stats.json`): camera-like JPEGs cut
    from package photos, half of them with a pasted rectangle and its mask."""
    import numpy as np
    import webdataset as wds
    from PIL import Image
    from skimage import data as skdata

    from pipeline.train_data import list_shards

    folder.mkdir(parents=True, exist_ok=True)
    bases = [skdata.rocket(), skdata.coffee(), skdata.chelsea(), skdata.astronaut(),
             skdata.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    k = 0
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as w:
            for _ in range(per_shard):
                b = bases[k % len(bases)]
                h, wd = b.shape[:2]
                scale = side / min(h, wd) * rng.uniform(1.0, 1.4)
                img = np.asarray(Image.fromarray(b).resize((int(wd * scale), int(h * scale))))
                y, x = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
                img = img[y : y + side, x : x + int(side * 4 / 3)].copy()
                mask = np.zeros(img.shape[:2], np.uint8)
                label = "real"
                if k % 2:
                    label = "tampered"
                    mh, mw = rng.integers(40, 120, 2)
                    my, mx = rng.integers(0, img.shape[0] - mh), rng.integers(0, img.shape[1] - mw)
                    img[my : my + mh, mx : mx + mw] = img[::-1, ::-1][my : my + mh, mx : mx + mw]
                    mask[my : my + mh, mx : mx + mw] = 255
                jpg, png = io.BytesIO(), io.BytesIO()
                Image.fromarray(img).save(jpg, "JPEG", quality=90)
                Image.fromarray(mask, "L").save(png, "PNG")
                key = f"s{seed}_{k:06d}"
                rec = {"key": key, "label": label, "split": "train", "status": "ok", "format": "jpg"}
                w.write({"__key__": key, "jpg": jpg.getvalue(), "mask.png": png.getvalue(),
                         "json": json.dumps(rec).encode()})
                k += 1
        (folder / f"train-{s:06d}_stats.json").write_text(json.dumps({"count": per_shard}))
    return list_shards(folder)


def setup(threads: int):
    import torch

    from pipeline.model import build_model
    from pipeline.train import TrainParams, _schedule, model_spec

    torch.set_num_threads(threads)
    p = TrainParams()
    model = build_model(model_spec(p, 0))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(p.warmup_steps, 10_000))
    return p, model, opt, sched


def run_steps(model, opt, sched, batches, steps: int, warmup: int, batch_size: int
              ) -> tuple[float, float]:
    """(samples/s, CPU seconds per step of this process) over `steps` steps after
    `warmup`, taking batches from an iterator."""
    import torch

    from pipeline.train import train_step

    trainable = model.trainable_parameters()
    device = torch.device("cpu")
    for _ in range(warmup):
        b = next(batches)
        b.pop("epoch", None)
        train_step(model, opt, sched, b, device, 1.0, trainable)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        b = next(batches)
        b.pop("epoch", None)
        train_step(model, opt, sched, b, device, 1.0, trainable)
    return steps * batch_size / (time.perf_counter() - t0), (time.process_time() - c0) / steps


class Loaders:
    """Polls /proc for the DataLoader worker processes (grandchildren: train starts them
    from a forkserver, so RUSAGE_CHILDREN never sees them): their peak RSS (VmHWM) and CPU
    seconds, as last seen before they exit (polled every 20 ms)."""

    def __init__(self) -> None:
        import threading

        self.peak_kib: dict[int, int] = {}
        self.cpu_s: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(0.02):
            parent = {}
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        stat = Path(f"/proc/{d}/stat").read_text()
                        parent[int(d)] = (int(stat.rsplit(")", 1)[1].split()[1]), stat)
                    except (OSError, IndexError, ValueError):
                        pass
            for pid, (ppid, stat) in parent.items():
                if ppid in parent and parent[ppid][0] == me:  # a child of a child of ours
                    fields = stat.rsplit(")", 1)[1].split()
                    self.cpu_s[pid] = (int(fields[11]) + int(fields[12])) / tick
                    try:
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0),
                                                         int(line.split()[1]))
                    except OSError:
                        pass

    def cpu(self) -> float:
        return sum(self.cpu_s.values())

    def peak(self) -> int:
        return max(self.peak_kib.values(), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


LOADERS: Loaders | None = None


def children_cpu() -> float:
    """CPU seconds of the loader workers so far (see `Loaders`)."""
    global LOADERS
    if LOADERS is None:
        LOADERS = Loaders()
    return LOADERS.cpu()


def throughput(tmp: Path, steps: int, per_shard: int, repeats: int, loader_workers: int) -> dict:
    import itertools

    from pipeline.train import _collate, make_loader
    from pipeline.train_data import CropConfig, CropStream

    shards = make_shards(tmp / "shards", 8, per_shard)
    p, model, opt, sched = setup(threads=1)
    from dataclasses import replace

    p = replace(p, loader_workers=loader_workers)
    cfg = CropConfig(crop=model.spec.crop, vlm_size=model.vlm_size)
    # the in-memory baseline: the same crops, decoded and collated beforehand
    it = iter(CropStream(shards, cfg, batch_size=p.batch_size))
    cached = [_collate([next(it) for _ in range(p.batch_size)]) for _ in range(16)]
    import gc

    full, mem, inline = [], [], []
    cpu_mem, cpu_full, cpu_loader = [], [], []
    for _ in range(repeats):
        sps, cpu = run_steps(model, opt, sched, (dict(b) for b in itertools.cycle(cached)),
                             steps, 5, p.batch_size)
        mem.append(sps)
        cpu_mem.append(cpu)
        before = children_cpu()
        loader = make_loader(shards, cfg, p)
        sps, cpu = run_steps(model, opt, sched, iter(loader), steps, 5, p.batch_size)
        full.append(sps)
        cpu_full.append(cpu)
        del loader
        gc.collect()
        time.sleep(0.5)  # the worker's last CPU reading, before it exits
        produced = steps + 5 + 4 * max(1, loader_workers)  # consumed + warmup + prefetched
        cpu_loader.append((children_cpu() - before) / produced)
        p0 = replace(p, loader_workers=0)
        inline.append(run_steps(model, opt, sched, iter(make_loader(shards, cfg, p0)), steps, 5,
                                p.batch_size)[0])
    import statistics

    # each repeat measures the three back to back: their ratio is robust to the load of a
    # shared machine drifting between repeats
    return {"in_memory_samples_per_s": round(max(mem), 2),
            "full_loop_samples_per_s": round(max(full), 2),
            "no_loader_workers_samples_per_s": round(max(inline), 2),
            "ratio_full_vs_in_memory": round(statistics.median(
                f / m for f, m in zip(full, mem)), 3),
            "ratio_no_workers_vs_in_memory": round(statistics.median(
                i / m for i, m in zip(inline, mem)), 3),
            "ratios_per_repeat": [round(f / m, 3) for f, m in zip(full, mem)],
            "cpu_s_per_step_in_memory": round(statistics.median(cpu_mem), 4),
            "cpu_s_per_step_full_loop": round(statistics.median(cpu_full), 4),
            "loader_cpu_s_per_batch": round(statistics.median(cpu_loader), 4),
            "cpu_bound_ratio": round(statistics.median(cpu_mem) / max(
                statistics.median(cpu_full), statistics.median(cpu_loader)), 3),
            "loader_workers": loader_workers, "torch_threads": 1, "steps": steps,
            "batch_size": p.batch_size, "crop": model.spec.crop,
            "image_px": "512x682 JPEG q90"}


def child(folder: Path, n_shards: int, per_shard: int, loader_workers: int) -> None:
    """Trains through every sample of `n_shards` shards; prints peak RSS (KiB) as JSON."""
    from dataclasses import replace

    import pipeline.model  # noqa: F401  (imports are part of the baseline)
    from pipeline.train import make_loader
    from pipeline.train_data import CropConfig

    shards = make_shards(folder, n_shards, per_shard, seed=n_shards)
    p, model, opt, sched = setup(threads=1)
    p = replace(p, loader_workers=loader_workers)
    cfg = CropConfig(crop=model.spec.crop, vlm_size=model.vlm_size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaders = Loaders()
    steps = -(-n_shards * per_shard // p.batch_size)  # one epoch: every shard read
    loader = make_loader(shards, cfg, p)
    run_steps(model, opt, sched, iter(loader), steps, 0, p.batch_size)
    del loader
    import gc

    gc.collect()
    time.sleep(0.5)
    print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "base_rss_kib": base,
                      "loader_peak_rss_kib": loaders.peak(),
                      "steps": steps}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--samples-per-shard", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_train.json"))
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "SHARDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), args.samples_per_shard, args.loader_workers)
        return
    import os

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    load_before = os.getloadavg()[0]
    try:
        result = throughput(tmp, args.steps, args.samples_per_shard, args.repeats,
                            args.loader_workers)
        result["throughput_target"] = 0.9
        peaks = {}
        for n in (4, 16):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(tmp / f"mem{n}"), str(n),
                 "--samples-per-shard", str(args.samples_per_shard),
                 "--loader-workers", str(args.loader_workers)],
                capture_output=True, text=True, check=True, cwd=ROOT)
            peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
        for n in (4, 16):
            result[f"peak_rss_mb_{n}_shards"] = round(peaks[n]["peak_rss_kib"] / 1024, 1)
            result[f"loader_peak_rss_mb_{n}_shards"] = round(peaks[n]["loader_peak_rss_kib"] / 1024, 1)
            result[f"steps_{n}_shards"] = peaks[n]["steps"]
        result["memory_growth_16_vs_4"] = round(
            peaks[16]["peak_rss_kib"] / peaks[4]["peak_rss_kib"], 3)
        result["loader_memory_growth_16_vs_4"] = round(
            peaks[16]["loader_peak_rss_kib"] / peaks[4]["loader_peak_rss_kib"], 3)
        result["memory_growth_target"] = 1.1
        result["cpus"] = os.cpu_count()
        result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:36s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
