"""`python -m pipeline COMMAND`: one command per stage (from `pipeline/stages.py`), `run`,
`params`, `defaults`, `dvc-yaml`, and the tools (`inspect`)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import params as params_mod
from pipeline import stages as stages_mod
from pipeline.params import Params, ParamsError

log = logging.getLogger("pipeline")

# commands that are not stages: name -> (module with main(argv), help)
TOOLS: dict[str, tuple[str, str]] = {
    "inspect": ("pipeline.inspect", "write a PNG of a sample with its mask (see inspect --help)"),
    "predict": ("pipeline.predict", "masks and scores of images with a trained model "
                "(see predict --help)"),
    "loop": ("pipeline.loop", "rounds of focus -> synthesize -> ... -> train -> evaluate, "
             "steered by the model's failures; --compare uniform (see loop --help)"),
    "sweep": ("pipeline.sweep", ("data-fraction scaling and per-domain transfer sweeps: one "
                                 "model per point (see sweep --help)")),
}


def stage_io(stage: str, params: Params) -> tuple[dict[str, Any], Path]:
    """Inputs (artifact name -> path) and output folder of a stage, from its declaration."""
    return stages_mod.resolve(stages_mod.get(stage), params)


class DataDirBusy(RuntimeError):
    """Another run holds the lock on this data_dir."""


class DataDirLock:
    """An exclusive lock on `data_dir` for the length of a run, so two runs never write the
    same files at once (the second fails at once with a message naming the holder)."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> DataDirLock:
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataDirBusy(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or use "
                "another data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def run_stage(stage: str, params: Params, executor=None) -> dict[str, Any]:
    from pipeline.executor import Executor

    decl = stages_mod.get(stage)
    inputs, out = stages_mod.resolve(decl, params)
    first = decl.reads[0] if decl.reads else "corpus"
    if first != "corpus" and not Path(inputs[first]).exists():
        raise FileNotFoundError(
            f"{stage}: input {first!r} ({inputs[first]}) is missing; run the earlier stages first"
        )
    out.mkdir(parents=True, exist_ok=True)
    own = executor is None
    executor = executor or Executor(params.executor)
    t0 = time.perf_counter()
    executor.reset_stats()
    try:
        metrics = decl.run(params, inputs, out, executor)
        used = executor.reset_stats()
    finally:
        if own:
            executor.shutdown()
    metrics = {"stage": stage, "seconds": round(time.perf_counter() - t0, 3), **metrics,
               "executor": used}
    mdir = params.metrics
    mdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=1, sort_keys=True, default=str) + "\n"
    (mdir / f"{stage}.json").write_text(text)
    print(summary(stage, metrics), flush=True)
    return metrics


def summary(stage: str, m: dict[str, Any]) -> str:
    status = m.get("by_status", {})
    parts = [f"{m.get('total', 0)} rows"]
    if status:
        parts.append(
            ", ".join(f"{k}={v}" for k, v in sorted(status.items(), key=lambda kv: -kv[1]))
        )
    if "shipped" in m:
        parts.append(f"shipped={m['shipped']}")
    if stage == "train":
        parts = [f"{m.get('steps')} steps", f"{m.get('samples')} samples", f"loss {m.get('loss')}",
                 f"val pixel F1 {m.get('val_pixel_f1')}",
                 f"val accuracy {m.get('val_image_accuracy')}"]
    return f"[{stage}] {'; '.join(parts)} in {m['seconds']:.1f}s"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--backend", choices=("ray", "local"), help="override executor.backend")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    names = stages_mod.names()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Build a forgery detection/localization corpus: "
        + " -> ".join(names)
        + ". Each stage reads the artifacts of earlier stages under data_dir.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for s in stages_mod.all_stages():
        _common(sub.add_parser(s.name, help=s.help, description=s.help))
    r = sub.add_parser(
        "run",
        help="run every stage in order, without DVC, into the params' data_dir",
        description="Run every stage in order without DVC, into the data_dir of --params.",
    )
    _common(r)
    r.add_argument("--from", dest="start", choices=names, default=names[0], help="first stage")
    r.add_argument("--to", dest="stop", choices=names, default=names[-1], help="last stage")
    p = sub.add_parser(
        "params",
        help="print the effective params of a file (defaults merged with it) as YAML",
        description="Print the params a run with --params FILE would use: the defaults merged "
        "with FILE, nested mappings key by key. Fails like a run would on a bad file.",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    d = sub.add_parser(
        "defaults", help="print the default params as YAML", description="Print the default params."
    )
    d.add_argument("--out", help="write to this file instead of stdout")
    d.add_argument("--repro", action="store_true",
                   help="the checked-in params.yaml: the defaults plus what `make repro` sets")
    y = sub.add_parser(
        "dvc-yaml",
        help="print dvc.yaml as derived from the stage declarations",
        description="Print dvc.yaml derived from the stage declarations and the params' folders.",
    )
    y.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    y.add_argument("--out", help="write to this file instead of stdout")
    for name, (_, help_) in TOOLS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _write(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)


def _exit_on_signal(signum: int, frame: Any) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so `finally` blocks shut Ray down and close files
    raise SystemExit(128 + signum)


def setup_logging(verbose: bool) -> None:
    """A run prints the stages' summary lines and warnings; -v adds what each stage found."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # the model libraries' notices about optional backends and defaults
        for name in ("transformers", "diffusers"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        if args.command == "defaults":
            text = params_mod.dump_repro() if args.repro else params_mod.dump_defaults()
            _write(text, args.out)
            return 0
        if args.command == "params":
            _write(params_mod.dump(params_mod.load(args.params)), None)
            return 0
        if args.command == "dvc-yaml":
            path = Path(args.params)
            params = params_mod.load(path) if path.exists() else params_mod.defaults()
            _write(stages_mod.dvc_yaml(params), args.out)
            return 0
        overrides = {"executor": {"backend": args.backend}} if args.backend else None
        params = params_mod.load(args.params, overrides)
        from pipeline.corpus import load_corpus

        load_corpus(params.corpus_paths())  # a bad manifest fails before any work
        with DataDirLock(params.data):
            if args.command == "run":
                from pipeline.executor import Executor

                names = stages_mod.names()
                todo = names[names.index(args.start) : names.index(args.stop) + 1]
                executor = Executor(params.executor)
                try:
                    for stage in todo:
                        run_stage(stage, params, executor)
                finally:
                    executor.shutdown()
            else:
                run_stage(args.command, params)
    except (ParamsError, FileNotFoundError, DataDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
