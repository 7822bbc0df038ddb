"""The pipeline: one ordered list of stage modules. Adding a stage is one module that ends
with `STAGE = Stage(...)` (see `pipeline/stage.py`) and one line here.

Everything else is derived from this list: the CLI's commands, the params sections,
`python -m pipeline run`, and `dvc.yaml` (`python -m pipeline dvc-yaml`; a test checks the
checked-in file matches).
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.stage import CORPUS, Stage, artifact_paths, manifest_of

MODULES: tuple[str, ...] = (
    "pipeline.ingest",
    "pipeline.dedup",
    "pipeline.synthesize",
    "pipeline.masks",
    "pipeline.split",
    "pipeline.shard",
    "pipeline.export",
    "pipeline.train",
    "pipeline.evaluate",
    "pipeline.focus",
    "pipeline.report",
)


@cache
def all_stages() -> tuple[Stage, ...]:
    stages = tuple(importlib.import_module(m).STAGE for m in MODULES)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"two stages share a name: {names}")
    artifact_paths(list(stages))  # every read is written earlier
    return stages


def names() -> tuple[str, ...]:
    return tuple(s.name for s in all_stages())


def get(name: str) -> Stage:
    for s in all_stages():
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names())}")


def artifacts() -> dict[str, str]:
    return artifact_paths(list(all_stages()))


def resolve(stage: Stage, params: Any) -> tuple[dict[str, Any], Path]:
    """The stage's inputs by artifact name (plus `manifest`: the first read's manifest) and
    its output folder, under the params' data_dir."""
    paths = artifacts()
    data = params.data
    inputs: dict[str, Any] = {}
    for name in stage.reads:
        inputs[name] = params.corpus_paths() if name == CORPUS else data / paths[name]
    first = stage.reads[0] if stage.reads else None
    if first is not None and first != CORPUS:
        inputs["manifest"] = manifest_of(inputs[first])
    for name, rel in stage.persist.items():
        inputs[name] = data / rel
    return inputs, data / stage.writes[stage.out]


# --------------------------------------------------------------------------- dvc.yaml

DVC_HEADER = """\
# Generated from the stage declarations (pipeline/stages.py): do not edit by hand.
#   python -m pipeline dvc-yaml --out dvc.yaml
# `dvc repro` rebuilds the corpus and the model; each stage is
# `python -m pipeline STAGE --params params.yaml`. To track your own data folders, add them
# to the ingest stage's deps after generating.
"""


def _module_path(module: str) -> str:
    return module.replace(".", "/") + ".py"


def dvc_stages(params: Any) -> dict[str, Any]:
    """`dvc.yaml`'s `stages:` mapping, from the declarations and the params' directories."""
    paths = artifacts()
    data = params.data_dir.rstrip("/")
    metrics = params.metrics_dir.rstrip("/")
    plots = params.plots_dir.rstrip("/")
    out: dict[str, Any] = {}
    for s in all_stages():
        deps: list[str] = []
        for name in s.reads:
            if name == CORPUS:
                deps.append("manifests")
            else:
                deps.append(f"{data}/{paths[name]}")
        deps += [_module_path(s.module), *s.code]
        entry: dict[str, Any] = {
            "cmd": f"python -m pipeline {s.name} --params params.yaml",
            "deps": list(dict.fromkeys(deps)),
            "params": list(dict.fromkeys([*s.uses, s.name])),
            "outs": [f"{data}/{rel}" for rel in s.writes.values()],
        }
        if s.persist:
            entry["outs"] += [
                {f"{data}/{rel}": {"persist": True, "cache": False}} for rel in s.persist.values()
            ]
        entry["metrics"] = [{f"{metrics}/{s.name}.json": {"cache": False}}]
        if s.plots:
            entry["plots"] = [{f"{plots}/{p}": {"cache": False}} for p in s.plots]
        out[s.name] = entry
    return out


def dvc_plots(params: Any) -> list[dict[str, Any]]:
    """`dvc.yaml`'s top-level `plots:` from the stages' plot definitions."""
    plots = params.plots_dir.rstrip("/")
    out = []
    for s in all_stages():
        for name, spec in s.plot_specs.items():
            spec = dict(spec)
            spec["y"] = {f"{plots}/{f}": list(cols) for f, cols in spec["y"].items()}
            out.append({name: spec})
    return out


def dvc_yaml(params: Any) -> str:
    import yaml

    doc: dict[str, Any] = {"stages": dvc_stages(params)}
    plots = dvc_plots(params)
    if plots:
        doc["plots"] = plots
    return DVC_HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)
