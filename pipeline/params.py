"""params.yaml -> frozen dataclasses, with unknown keys and bad values rejected by name.

Top-level keys: `data_dir`, `corpus`, `seed`, `metrics_dir`, `executor`, then one section per stage. Each
stage module declares its own section dataclass; `SECTIONS` below names them explicitly.
A params file that sets only some keys inherits the rest from these defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

# section name -> "module:Class"; the class's defaults are the defaults of params.yaml
SECTIONS: dict[str, str] = {
    "ingest": "pipeline.ingest:IngestParams",
    "dedup": "pipeline.dedup:DedupParams",
    "synthesize": "pipeline.synthesize:SynthesizeParams",
    "masks": "pipeline.masks:MasksParams",
    "split": "pipeline.split:SplitParams",
    "shard": "pipeline.shard:ShardParams",
    "export": "pipeline.export:ExportParams",
}

# stage order for `python -m pipeline run`
STAGES: tuple[str, ...] = ("ingest", "dedup", "synthesize", "masks", "split", "shard", "export")


class ParamsError(ValueError):
    """A params file or corpus manifest that does not fit its schema."""


@dataclass(frozen=True)
class ExecutorParams:
    # `ray` starts a local instance, or joins the cluster at `address` / $RAY_ADDRESS;
    # `local` runs everything in this process (for debugging).
    backend: Literal["ray", "local"] = "ray"
    address: str | None = None
    num_cpus: int | None = None  # local Ray instance size; None: all cores
    batch_size: int = 16  # items per task
    progress: bool = True


def section_class(name: str) -> type:
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class Params:
    data_dir: str = "data"
    corpus: tuple[str, ...] = ("manifests/default.yaml",)
    seed: int = 0
    metrics_dir: str = "metrics"  # metrics/<stage>.json (DVC metrics)
    plots_dir: str = "plots"  # plots/<stage>*.csv and PNGs (DVC plots)
    executor: ExecutorParams = field(default_factory=ExecutorParams)
    sections: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."  # directory relative paths in the file are resolved against

    def __getattr__(self, name: str) -> Any:
        # frozen dataclass: sections are reached as params.masks, params.shard, ...
        sections = object.__getattribute__(self, "sections")
        if name in sections:
            return sections[name]
        if name in SECTIONS:
            return section_class(name)()
        raise AttributeError(name)

    @property
    def data(self) -> Path:
        return self.resolve(self.data_dir)

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def corpus_paths(self) -> list[Path]:
        return [self.resolve(c) for c in self.corpus]

    def stage_dir(self, stage: str) -> Path:
        return self.data / stage

    @property
    def metrics(self) -> Path:
        return self.resolve(self.metrics_dir)

    @property
    def plots(self) -> Path:
        return self.resolve(self.plots_dir)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "data_dir": self.data_dir,
            "corpus": list(self.corpus),
            "seed": self.seed,
            "metrics_dir": self.metrics_dir,
            "plots_dir": self.plots_dir,
            "executor": _asdict(self.executor),
        }
        for name in SECTIONS:
            out[name] = _asdict(getattr(self, name))
        return out


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_asdict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _asdict(v) for k, v in obj.items()}
    return obj


def build(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and value against its type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{where}: {e}") from e


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ParamsError(f"{where}: {value!r} is not allowed; allowed values: {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, int, float)) and args and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> Params:
    if not isinstance(data, dict):
        raise ParamsError("params: expected a mapping at the top level")
    top = {"data_dir", "corpus", "seed", "metrics_dir", "plots_dir", "executor"}
    allowed = top | set(SECTIONS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ParamsError(
            f"params: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}"
        )
    hints = typing.get_type_hints(Params)
    kwargs: dict[str, Any] = {
        k: _coerce(hints[k], data[k], f"params.{k}") for k in top if k in data
    }
    kwargs["sections"] = {
        name: build(section_class(name), data.get(name), f"params.{name}") for name in SECTIONS
    }
    params = Params(base_dir=str(base_dir), **kwargs)
    _check_data_dir(params.data)
    return params


def _check_data_dir(data_dir: Path) -> None:
    """`data_dir` must be a folder, or not exist yet below a folder."""
    p = data_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        what = "is a file" if p == data_dir else f"is inside {p}, which is a file"
        raise ParamsError(f"params.data_dir: {str(data_dir)!r} {what}; data_dir must be a folder")


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Loads a params file; relative paths in it resolve against the current directory."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ParamsError(f"params file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{p}: not valid YAML: {e}") from e
    if overrides:
        data = _merge(data, overrides)
    return from_dict(data, base_dir=".")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def defaults() -> Params:
    return from_dict({})


def dump_defaults() -> str:
    return yaml.safe_dump(defaults().to_dict(), sort_keys=False)
