"""The contract of a source kind, and what every kind shares.

A kind is one `Reader` subclass in one file (`pipeline/sources/<kind>.py`), named in the
explicit registry `pipeline.sources.READERS`. It declares

- `Options`: a frozen dataclass of its manifest keys (defaults in code; a field without a
  default is required), checked when the manifest loads (`build_options`: unknown key
  named with the allowed ones, types and values checked);
- `units(batch)`: its work units, each a picklable list of entries, listed in the driver
  without reading any image; a problem found while listing is a `Failure` entry;
- `read(entry, ctx)`: the records of one entry, made through the ingest `Context` (which
  probes and stores bytes, and reads files safely).

Record `uri`s are relative to the source's root (the folder, listing file, tar folder or
dataset), so shipped records never carry the local file system layout; the full path is
`local_path`, which stays in the local manifests.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args, get_origin

from pipeline.params import ParamsError
from pipeline.records import Record

DOMAINS = ("document", "natural", "face", "aigc", "auto")
LABELS = ("real", "tampered", "synthetic")
COMMON = ("name", "kind", "domain", "label", "license", "description")


@dataclass(frozen=True)
class Source:
    """One manifest entry: the common keys and the kind's typed options."""

    name: str
    kind: str
    domain: str = "auto"
    label: str = "real"
    license: str = "unknown"
    description: str | None = None
    options: Any = None  # the kind's Options instance
    base_dir: str = "."  # folder of the manifest file; relative paths resolve against it

    def path(self, key: str = "path") -> Path:
        p = Path(str(getattr(self.options, key))).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def get(self, key: str) -> Any:
        return getattr(self.options, key, None)


@dataclass(frozen=True)
class Failure:
    """A problem found while listing a source (missing folder, unreadable directory, link
    not followed, bad listing entry): it becomes one row with `reason`."""

    uri: str
    reason: str
    message: str
    item_id: str | None = None
    local_path: str | None = None


class Context(Protocol):
    """What a reader gets from ingest (implemented by `pipeline.ingest.Context`)."""

    def item(self, source: Source, uri: str, data: bytes, *, item_id: str | None = None,
             label: str | None = None, caption: str | None = None,
             local_path: str | None = None) -> Record: ...

    def file(self, source: Source, uri: str, path: str | Path, *, item_id: str | None = None,
             label: str | None = None) -> Record: ...

    def error(self, source: Source, uri: str, reason: str, message: str, *,
              item_id: str | None = None, local_path: str | None = None) -> Record: ...

    def read_file(self, path: str | Path) -> bytes: ...

    def attach_mask(self, rec: Record, mask: Any) -> Record: ...


class Reader:
    """One source kind. Subclasses set `kind` and `Options` and implement `units` and `read`."""

    kind: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, source: Source, params: Any = None):
        self.source = source
        self.options = source.options
        self.params = params  # the ingest params (max_bytes, rows per task, ...)

    def units(self, batch: int) -> Iterator[list[Any]]:
        """Work units (picklable lists of entries); no image is read here."""
        raise NotImplementedError

    def read(self, entry: Any, ctx: Context) -> Iterator[Record]:
        """The records of one entry."""
        raise NotImplementedError

    def read_unit(self, unit: list[Any], ctx: Context) -> Iterator[Record]:
        """Every entry of a unit; a listing `Failure` or an unexpected error in one entry is a
        row, and the other entries go on."""
        for entry in unit:
            if isinstance(entry, Failure):
                yield ctx.error(self.source, entry.uri, entry.reason, entry.message,
                                item_id=entry.item_id, local_path=entry.local_path)
                continue
            try:
                yield from self.read(entry, ctx)
            except Exception as e:  # noqa: BLE001 - one bad entry never stops the source
                uri = getattr(entry, "uri", None) or str(entry)
                yield ctx.error(self.source, uri, "read_error", f"{type(e).__name__}: {e}",
                                item_id=f"{uri}#read_error")


# --- options: typed keys, checked like params ------------------------------------------------


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0], str(args[0]))
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(tp, str(tp))


def _check(tp: Any, value: Any) -> Any:
    """`value` as type `tp`, or raises TypeError. No coercion: a string is not a list,
    "no" is not false, 5 is not a string."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value)
            except TypeError:
                pass
        raise TypeError
    if origin is Literal:
        if value not in args:
            raise TypeError
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError
        return tuple(_check(args[0], v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


def build_options(cls: type, data: dict[str, Any], where: str, kind: str) -> Any:
    """The kind's Options from the manifest keys it owns (unknown keys are rejected by the
    caller, which knows the common keys too). Each value must have the declared type;
    `__post_init__` of the Options class checks ranges and raises ValueError."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{where}: kind {kind} needs key {f.name!r}")
            continue
        value = data[f.name]
        try:
            kwargs[f.name] = _check(hints[f.name], value)
        except TypeError:
            raise ParamsError(
                f"{where}: {f.name} must be {_describe(hints[f.name])}, got {value!r}"
            ) from None
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ParamsError(f"{where}: {e}") from None


def option_keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def nonempty(name: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{name} must not be empty")


def extensions_ok(name: str, values: tuple[str, ...] | None) -> None:
    if values is None:
        return
    if not values:
        raise ValueError(f"{name} must list at least one extension, e.g. [jpg, png]")
    for v in values:
        if not v.strip(". ") or "/" in v:
            raise ValueError(f"{name}: {v!r} is not a file extension, e.g. jpg or .png")
