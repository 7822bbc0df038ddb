"""`python -m pipeline STAGE --params FILE`, `run`, `inspect`, `defaults`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import params as params_mod
from pipeline.params import STAGES, Params, ParamsError

log = logging.getLogger("pipeline")

STAGE_HELP = {
    "ingest": "read every corpus source into data/ingest (original bytes, records, errors)",
    "dedup": "exact and near-duplicate groups over real sources",
    "synthesize": "forge real sources with the configured generators",
    "masks": "derive masks by differencing and reject broken forgeries",
    "split": "assign train/val/test/test_ood by duplicate group",
    "shard": "write WebDataset shards per split and data/manifest.parquet",
    "export": "balanced exports, data fractions, dataset cards, IMDL-BenCo JSON",
    "train": "fine-tune DeFakerOne (InternVL + SAM2) on an export; model to data/train/model",
}


def stage_io(stage: str, params: Params) -> tuple[dict[str, Any], Path]:
    """Inputs and output directory of a stage: each reads the previous stage's manifest."""
    data = params.data
    if stage == "ingest":
        return {"corpus": params.corpus_paths()}, data / "ingest"
    if stage == "shard":
        return {"manifest": data / "split" / "manifest.parquet"}, data / "shards"
    if stage == "export":
        return {"manifest": data / "manifest.parquet", "shards": data / "shards"}, data / "exports"
    if stage == "train":
        return {"exports": data / "exports"}, data / "train"
    prev = STAGES[STAGES.index(stage) - 1]
    return {"manifest": data / prev / "manifest.parquet"}, data / stage


def run_stage(stage: str, params: Params, executor=None) -> dict[str, Any]:
    import importlib

    from pipeline.executor import Executor

    module = importlib.import_module(f"pipeline.{stage}")
    inputs, out = stage_io(stage, params)
    for name, path in inputs.items():
        if name == "manifest" and not Path(path).exists():
            raise FileNotFoundError(f"{stage}: input {path} is missing; run the earlier stages first")
    out.mkdir(parents=True, exist_ok=True)
    own = executor is None
    executor = executor or Executor(params.executor)
    t0 = time.perf_counter()
    try:
        metrics = module.run(params, inputs, out, executor)
    finally:
        if own:
            executor.shutdown()
    metrics = {"stage": stage, "seconds": round(time.perf_counter() - t0, 3), **metrics}
    mdir = params.metrics
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / f"{stage}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str) + "\n")
    print(summary(stage, metrics), flush=True)
    return metrics


def summary(stage: str, m: dict[str, Any]) -> str:
    status = m.get("by_status", {})
    parts = [f"{m.get('total', 0)} rows"]
    if status:
        parts.append(", ".join(f"{k}={v}" for k, v in sorted(status.items(), key=lambda kv: -kv[1])))
    if "shipped" in m:
        parts.append(f"shipped={m['shipped']}")
    if stage == "train":
        parts = [f"{m.get('steps')} steps", f"{m.get('samples')} samples", f"loss {m.get('loss')}",
                 f"val pixel F1 {m.get('val_pixel_f1')}", f"val accuracy {m.get('val_image_accuracy')}"]
    return f"[{stage}] {'; '.join(parts)} in {m['seconds']:.1f}s"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--backend", choices=("ray", "local"), help="override executor.backend")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Build a forgery detection/localization corpus: "
        + " -> ".join(STAGES) + ". Each stage reads the previous stage's manifest under data_dir.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        _common(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))
    r = sub.add_parser("run", help="run every stage in order, without DVC, into the params' data_dir",
                       description="Run every stage in order without DVC, into the data_dir of --params.")
    _common(r)
    r.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0], help="first stage")
    r.add_argument("--to", dest="stop", choices=STAGES, default=STAGES[-1], help="last stage")
    sub.add_parser("inspect", help="write a PNG of a sample with its mask (see inspect --help)", add_help=False)
    sub.add_parser("predict", help="masks and scores of images with a trained model (see predict --help)",
                   add_help=False)
    d = sub.add_parser("defaults", help="print the default params as YAML", description="Print the default params.")
    d.add_argument("--out", help="write to this file instead of stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        from pipeline import inspect

        return inspect.main(argv[1:])
    if argv and argv[0] == "predict":
        from pipeline import predict

        return predict.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "defaults":
        text = params_mod.dump_defaults()
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    try:
        overrides = {"executor": {"backend": args.backend}} if args.backend else None
        params = params_mod.load(args.params, overrides)
        from pipeline.corpus import load_corpus

        load_corpus(params.corpus_paths())  # a bad manifest fails before any work
        if args.command == "run":
            from pipeline.executor import Executor

            stages = STAGES[STAGES.index(args.start) : STAGES.index(args.stop) + 1]
            executor = Executor(params.executor)
            try:
                for stage in stages:
                    run_stage(stage, params, executor)
            finally:
                executor.shutdown()
        else:
            run_stage(args.command, params)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
