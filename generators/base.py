"""The generator contract. Nothing else lives here: no shared base behaviour to inherit.

A generator is a class with
- `name`, `domain` (document|natural|face|aigc), `operation`, `version` class attributes;
- a cheap, picklable `__init__(**params)` that only validates and stores its params;
- `setup(device)` that loads weights or heavy state once per worker;
- `generate(source, rng) -> Forgery`, pure given its inputs: all randomness comes from `rng`
  (a `numpy.random.Generator`) and `source.seed` (for `torch.Generator`), both derived from
  (global seed, sample id) by the synthesize stage.

Optionally `generate_batch(sources, rngs) -> list[Forgery]` for batched models (diffusers),
`needs_donor = True` to receive a second corpus image in `source.donor` (splice, face swap),
and `resources(device)` returning a `pipeline.executor.Resources`-like dict.

The synthesize stage, not the generator, pastes the source back outside the dilated edit
region (`local = True`) and encodes the result in the source's format.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Source:
    """A decoded real image handed to a generator."""

    key: str
    image: np.ndarray  # H x W x 3, uint8, RGB, as stored (no EXIF transpose)
    domain: str
    seed: int  # derived from (global seed, sample id); seed torch.Generator with it
    format: str = "png"
    caption: str | None = None
    donor: Source | None = None  # another corpus image, for generators with needs_donor


@dataclass
class Forgery:
    """What a generator returns: the forged pixels, where it changed them, and provenance."""

    image: np.ndarray  # H x W x 3 uint8 RGB, same H x W as the source
    mask: np.ndarray  # H x W bool: the region the generator changed (requested region)
    local: bool = True  # a local edit: pixels outside the dilated mask are pasted back
    label: str = "tampered"  # tampered (local edit) or synthetic (every pixel generated)
    params: dict[str, Any] = field(default_factory=dict)  # the params actually used
    model_id: str | None = None
    model_revision: str | None = None
    source_region: list[int] | None = None  # copy-move: [x, y, w, h] the content came from
    mask_known: bool = True  # False when the generator cannot say where it edited (edit)


class SkipSample(Exception):
    """This source does not suit the generator (no face, no text found): recorded, not fatal."""


class Generator(Protocol):
    name: str
    domain: str
    operation: str
    version: str

    def setup(self, device: str = "cpu") -> None: ...

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery: ...


def require(package: str, install: str | None = None) -> None:
    """Raises ImportError naming what to install when an optional dependency is missing."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"this generator needs the Python package {package!r}; "
            f"install it with: pip install {install or package}"
        )


def check_params(name: str, given: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Merges `given` over `allowed` defaults; an unknown key is a ValueError naming it."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"generator {name!r}: unknown param {unknown[0]!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return {**allowed, **given}
