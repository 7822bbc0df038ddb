"""Corpus manifests (`manifests/NAME.yaml`): a list of sources, each checked key by key.

Every source has `name`, `kind`, `domain`, `label`, `license`, and the keys of its kind.
An unknown key, kind, domain or label is a `ParamsError` naming it and the allowed values.
Relative paths resolve against the manifest file's directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import ParamsError

DOMAINS = ("document", "natural", "face", "aigc", "auto")
LABELS = ("real", "tampered", "synthetic")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")

COMMON = {"name", "kind", "domain", "label", "license", "description"}
# kind -> {key: default}; a default of ... means required
KIND_KEYS: dict[str, dict[str, Any]] = {
    "package_samples": {"items": ...},
    "image_folder": {"path": ..., "recursive": True, "extensions": None, "generator": None},
    "hf_dataset": {
        "path": ...,
        "format": "auto",  # auto | save_to_disk | parquet | imagefolder
        "image_column": "image",
        "caption_column": None,
        "split": None,
        "generator": None,
    },
    "webdataset": {"path": ..., "image_keys": list(IMAGE_KEYS), "caption_key": None, "generator": None},
    "forensic": {"path": ..., "format": "auto"},  # auto | imdl_json | tp_gt
    "pairs": {"path": ..., "original_column": "original", "edited_column": "edited", "generator": None},
    "blocklist": {"path": ..., "recursive": True},
}
HF_FORMATS = ("auto", "save_to_disk", "parquet", "imagefolder")
FORENSIC_FORMATS = ("auto", "imdl_json", "tp_gt")


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    domain: str = "auto"
    label: str = "real"
    license: str = "unknown"
    description: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."

    def path(self, key: str = "path") -> Path:
        p = Path(str(self.options[key])).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def get(self, key: str) -> Any:
        return self.options.get(key)


def _allowed(name: str, value: Any, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ParamsError(
            f"{where}: {name} {value!r} is not allowed; allowed values: {', '.join(allowed)}"
        )


def parse_source(d: Any, where: str, base_dir: Path) -> Source:
    if not isinstance(d, dict):
        raise ParamsError(f"{where}: a source must be a mapping, got {d!r}")
    for req in ("name", "kind"):
        if req not in d:
            raise ParamsError(f"{where}: missing key {req!r}")
    kind = d["kind"]
    _allowed("kind", kind, tuple(KIND_KEYS), where)
    where = f"{where} ({d['name']})"
    spec = KIND_KEYS[kind]
    unknown = sorted(set(d) - COMMON - set(spec))
    if unknown:
        allowed = ", ".join(sorted(COMMON | set(spec)))
        raise ParamsError(f"{where}: unknown key {unknown[0]!r} for kind {kind}; allowed keys: {allowed}")
    options = {}
    for key, default in spec.items():
        if key in d:
            options[key] = d[key]
        elif default is ...:
            raise ParamsError(f"{where}: kind {kind} needs key {key!r}")
        else:
            options[key] = default
    domain = d.get("domain", "auto")
    label = d.get("label", "real")
    _allowed("domain", domain, DOMAINS, where)
    _allowed("label", label, LABELS, where)
    if kind == "hf_dataset":
        _allowed("format", options["format"], HF_FORMATS, where)
    if kind == "forensic":
        _allowed("format", options["format"], FORENSIC_FORMATS, where)
    if kind == "package_samples":
        items = options["items"]
        if not isinstance(items, list) or not all(isinstance(i, str) and ":" in i for i in items):
            raise ParamsError(f"{where}: items must be a list of 'package:file' strings, e.g. 'skimage:page.png'")
    if not isinstance(d["name"], str) or not d["name"]:
        raise ParamsError(f"{where}: name must be a non-empty string")
    return Source(
        name=d["name"],
        kind=kind,
        domain=domain,
        label=label,
        license=str(d.get("license", "unknown")),
        description=d.get("description"),
        options=options,
        base_dir=str(base_dir),
    )


def load_manifest(path: str | Path) -> list[Source]:
    p = Path(path)
    if not p.exists():
        raise ParamsError(f"corpus manifest not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or set(data) - {"sources", "description"}:
        extra = sorted(set(data) - {"sources", "description"}) if isinstance(data, dict) else []
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
