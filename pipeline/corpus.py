"""Corpus manifests (`manifests/NAME.yaml`): a list of sources, each checked key by key.

Every source has `name`, `kind`, `domain`, `label`, `license` (and an optional
`description`), plus the keys of its kind, declared by the kind's `Options` dataclass in
`pipeline/sources/<kind>.py`. An unknown key, kind, domain or label, or a value of the
wrong type or range, is a `ParamsError` naming it and what is allowed. Relative paths
resolve against the manifest file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.params import ParamsError
from pipeline.sources import READERS
from pipeline.sources.base import COMMON, DOMAINS, LABELS, Source, build_options, option_keys

__all__ = ["Source", "load_corpus", "load_manifest", "parse_source"]


def _allowed(name: str, value: Any, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ParamsError(
            f"{where}: {name} {value!r} is not allowed; allowed values: {', '.join(allowed)}"
        )


def _string(d: dict[str, Any], key: str, where: str, default: str | None) -> str | None:
    value = d.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ParamsError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def parse_source(d: Any, where: str, base_dir: Path) -> Source:
    if not isinstance(d, dict):
        raise ParamsError(f"{where}: a source must be a mapping, got {d!r}")
    for req in ("name", "kind"):
        if req not in d:
            raise ParamsError(f"{where}: missing key {req!r}")
    kind = d["kind"]
    _allowed("kind", kind, tuple(READERS), where)
    name = _string(d, "name", where, "")
    where = f"{where} ({name})"
    cls = READERS[kind].Options
    own = option_keys(cls)
    unknown = sorted(set(d) - set(COMMON) - set(own), key=str)
    if unknown:
        allowed = ", ".join(sorted(set(COMMON) | set(own)))
        raise ParamsError(f"{where}: unknown key {unknown[0]!r} for kind {kind}; allowed keys: {allowed}")
    domain = d.get("domain", "auto")
    label = d.get("label", "real")
    _allowed("domain", domain, DOMAINS, where)
    _allowed("label", label, LABELS, where)
    options = build_options(cls, {k: v for k, v in d.items() if k in own}, where, kind)
    return Source(
        name=name,
        kind=kind,
        domain=domain,
        label=label,
        license=_string(d, "license", where, "unknown"),
        description=_string(d, "description", where, None),
        options=options,
        base_dir=str(base_dir),
    )


def load_manifest(path: str | Path) -> list[Source]:
    p = Path(path)
    if not p.exists():
        raise ParamsError(f"corpus manifest not found: {p}")
    if not p.is_file():
        raise ParamsError(f"corpus manifest is not a file: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamsError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or set(data) - {"sources", "description"}:
        extra = sorted(map(str, set(data) - {"sources", "description"})) if isinstance(data, dict) else []
        raise ParamsError(
            f"{p}: a manifest is a mapping with keys 'sources' (and optional 'description')"
            + (f"; unknown key {extra[0]!r}" if extra else "")
        )
    sources = data.get("sources") or []
    if not isinstance(sources, list):
        raise ParamsError(f"{p}: 'sources' must be a list")
    out = [parse_source(s, f"{p}: sources[{i}]", p.parent) for i, s in enumerate(sources)]
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ParamsError(f"{p}: source name {dup[0]!r} is used twice; names must be unique")
    return out


def load_corpus(paths: list[Path]) -> list[Source]:
    sources: list[Source] = []
    for p in paths:
        sources.extend(load_manifest(p))
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ParamsError(f"corpus: source name {dup[0]!r} appears in two manifests")
    return sources
