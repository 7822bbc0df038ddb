"""How a stage declares itself.

A stage module ends with one `STAGE = Stage(...)`: its name and help line, its params
dataclass (the `params.yaml` section of the same name), the artifacts it reads and writes by
name, the top-level params it uses, and the code it depends on. `pipeline/stages.py` lists
the stage modules in order; the CLI, the params sections, `python -m pipeline run` and
`dvc.yaml` (`python -m pipeline dvc-yaml`) are all derived from that list.

Artifacts are named outputs under `data_dir`, declared by the stage that writes them
(`writes={"masks": "masks"}`: the artifact `masks` is the folder `data_dir/masks`). A stage
reads artifacts of earlier stages by name; `corpus` is the one artifact from outside (the
corpus manifests named in params, and the folders they point at).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = "corpus"  # the one artifact no stage writes: the corpus manifests in params


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as data."""

    name: str
    help: str
    params: type  # frozen dataclass: the params.yaml section named after the stage
    run: Callable[..., dict[str, Any]]  # run(params, inputs, out, executor) -> metrics
    reads: tuple[str, ...]  # artifacts, by name; the first one's manifest is inputs["manifest"]
    writes: Mapping[str, str]  # artifact name -> path under data_dir; the first is `out`
    uses: tuple[str, ...] = ()  # top-level params keys it reads besides its section (seed, ...)
    code: tuple[str, ...] = ()  # code it depends on besides its own module (dvc deps)
    plots: tuple[str, ...] = ()  # files under plots_dir it writes (DVC plots)
    # DVC plot definitions (dvc.yaml top-level `plots:`): name -> {template, x, y: {file: cols}}
    plot_specs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    persist: Mapping[str, str] = field(default_factory=dict)  # artifacts kept across reruns
    # (DVC `persist: true`, not cached): e.g. training checkpoints a rerun resumes from

    def __post_init__(self) -> None:
        if not self.writes:
            raise ValueError(f"stage {self.name!r} writes nothing")

    @property
    def module(self) -> str:
        return self.run.__module__

    @property
    def out(self) -> str:
        """The artifact whose folder is the stage's `out` argument."""
        return next(iter(self.writes))


def artifact_paths(stages: list[Stage]) -> dict[str, str]:
    """Every artifact's path under data_dir; checks each read is written by an earlier stage."""
    paths: dict[str, str] = {}
    for s in stages:
        for name in s.reads:
            if name != CORPUS and name not in paths:
                raise ValueError(
                    f"stage {s.name!r} reads {name!r}, which no earlier stage writes; "
                    f"written so far: {', '.join(paths) or 'nothing'}"
                )
        for name, rel in {**s.writes, **s.persist}.items():
            if name in paths:
                raise ValueError(f"artifact {name!r} is written by two stages")
            paths[name] = rel
    return paths


def manifest_of(path: Path) -> Path:
    """The manifest of an artifact: the file itself, or `<folder>/manifest.parquet`."""
    return path if path.suffix == ".parquet" else path / "manifest.parquet"
