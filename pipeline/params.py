"""params.yaml -> frozen dataclasses, with unknown keys and bad values rejected by name.

Top-level keys: `data_dir`, `corpus`, `seed`, `metrics_dir`, `plots_dir`, `executor`, then one
section per stage, named after it: each stage declares its section's dataclass in its
`STAGE` (see `pipeline/stages.py`). A params file is merged over the defaults in code, nested
mappings key by key, so a file that sets only some keys inherits the rest; inside a mapping
of named entries (`synthesize.generators`, `export.exports`, ...) an entry set to `null` is
removed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


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


def section_names() -> tuple[str, ...]:
    from pipeline import stages

    return stages.names()


def section_class(name: str) -> type:
    from pipeline import stages

    return stages.get(name).params


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
        if name in section_names():
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
        for name in section_names():
            cls = section_class(name)
            out[name] = removals(cls, _asdict(cls()), _asdict(getattr(self, name)))
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


def merged(tp: Any, base: Any, given: Any) -> Any:
    """`given` over `base` (raw mappings), nested mappings key by key as type `tp` describes
    them. A field declared with `metadata={"merge": False}` (a distribution such as
    `split.ratios`) is replaced whole; a mapping entry that `base` lacks is taken as given."""
    if not isinstance(given, dict) or not isinstance(base, dict):
        return given
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return merged(inner[0], base, given) if len(inner) == 1 else given
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        out = dict(base)
        for k, v in given.items():
            f = fields.get(k)
            whole = f is None or f.metadata.get("merge") is False
            out[k] = v if whole else merged(hints[k], base.get(k), v)
        return out
    if get_origin(tp) is dict:
        vt = get_args(tp)[1] if get_args(tp) else Any
        out = dict(base)
        for k, v in given.items():
            out[k] = merged(vt, base[k], v) if k in base else v
        return out
    return given


def removals(tp: Any, base: Any, value: Any) -> Any:
    """`value` (a raw mapping) with `name: null` for each entry of a merged mapping that
    `base` has and `value` lacks, so that loading it over the defaults (`merged`) gives
    `value` back: `to_dict` -> `from_dict` is the identity."""
    if not isinstance(value, dict) or not isinstance(base, dict):
        return value
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return removals(inner[0], base, value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        return {k: v if k not in fields or fields[k].metadata.get("merge") is False
                else removals(hints[k], base.get(k), v) for k, v in value.items()}
    if get_origin(tp) is dict:
        vt = get_args(tp)[1] if get_args(tp) else Any
        if vt is Any or type(None) in get_args(vt):
            return value  # null is a value here, not a removal
        out = {k: removals(vt, base[k], v) if k in base else v for k, v in value.items()}
        return out | {k: None for k in base if k not in value}
    return value


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
        nullable = vt is Any or type(None) in get_args(vt)
        return {
            _coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}")
            for k, v in value.items()
            if v is not None or nullable  # `name: null` removes a named entry
        }
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
        if not math.isfinite(value):
            raise ParamsError(f"{where}: {value!r} is not allowed; expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    return value


TOP_LEVEL = ("data_dir", "corpus", "seed", "metrics_dir", "plots_dir", "executor")


def from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> Params:
    """Params from a mapping merged over the defaults (nested mappings key by key)."""
    if not isinstance(data, dict):
        raise ParamsError("params: expected a mapping at the top level")
    top = set(TOP_LEVEL)
    allowed = top | set(section_names())
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ParamsError(
            f"params: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}"
        )
    hints = typing.get_type_hints(Params)
    kwargs: dict[str, Any] = {}
    for k in top & set(data):
        value = data[k]
        if k == "executor":
            value = merged(ExecutorParams, _asdict(ExecutorParams()), value)
        kwargs[k] = _coerce(hints[k], value, f"params.{k}")
    sections = {}
    for name in section_names():
        cls = section_class(name)
        given = merged(cls, _asdict(cls()), data.get(name))
        sections[name] = build(cls, given, f"params.{name}")
    kwargs["sections"] = sections
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
    """`b` over `a`, nested mappings key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def defaults() -> Params:
    return from_dict({})


PARAMS_HEADER = """\
# Params of the DVC pipeline (dvc.yaml). Generated from the defaults in code:
#   python -m pipeline defaults --out params.yaml   (then edit). See README 'Params'.
"""


def dump(params: Params) -> str:
    return yaml.safe_dump(params.to_dict(), sort_keys=False, width=100)


def dump_defaults() -> str:
    return PARAMS_HEADER + dump(defaults())


# What the checked-in params.yaml (the `make repro` run on the embedded corpus) sets apart
# from the defaults in code, each with the comment that says why.
REPRO_OVERRIDES: dict[str, Any] = {"export": {"allow_stand_ins": True}}
REPRO_NOTES: dict[str, str] = {
    "allow_stand_ins": "make repro only: the embedded run's diffusers models are "
    "random-weight stand-ins (nothing is downloaded), exported so the run shows every "
    "stage; leave false (the default) for a corpus you train on",
}


def dump_repro() -> str:
    """params.yaml as checked in: the defaults with `REPRO_OVERRIDES`, commented."""
    lines = dump(from_dict(REPRO_OVERRIDES)).splitlines()
    for i, line in enumerate(lines):
        key = line.strip().split(":", 1)[0]
        if key in REPRO_NOTES:
            lines[i] = f"{line}  # {REPRO_NOTES[key]}"
    return PARAMS_HEADER.replace(
        "python -m pipeline defaults --out params.yaml   (then edit)",
        "python -m pipeline defaults --repro --out params.yaml",
    ) + "\n".join(lines) + "\n"
