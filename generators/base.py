"""The generator contract, and the two small checks every generator's params use.

No shared behaviour to inherit: a generator is a plain class with

- class attributes `name`, `domain` (document|natural|face|aigc), `operation`, `version`;
- `Params`: a frozen dataclass of its params with their defaults. The synthesize stage builds
  it from `synthesize.generators.<name>.params` when the params file loads (unknown keys and
  values of the wrong type rejected by `pipeline.params.build`, value ranges by the
  dataclass's `__post_init__`, both as a ValueError naming the key and what is allowed);
- `__init__(params: Params | None = None)`: cheap and picklable, stores the params (None:
  the defaults); `generators.registry.build(name, mapping)` builds them from a mapping;
- `setup(device)`: loads weights or other heavy state once per worker (may do nothing);
- `generate(source, rng) -> Forgery`: pure given its inputs. All randomness comes from `rng`
  (a `numpy.random.Generator`) and `source.seed` (for `torch.Generator`s), both derived from
  (global seed, forgery key) by the synthesize stage. A source the generator cannot use (no
  face, no text) raises `SkipSample` with the reason; the stage records it on the row.

Optional: `generate_batch(sources, rngs) -> list[Forgery]` for batched models (diffusers; the
stage falls back to `generate` one by one when a batch fails), and `needs_donor = True` to
get a second corpus image of the same domain in `source.donor` (splice, face swap).

What a Forgery promises: a local edit (`local=True`, label `tampered`) has the source's
height and width and a mask of the region it asked to change; the synthesize stage pastes
the source back outside that region dilated by a few pixels, then encodes the result in the
source's container (`pipeline.imageio.encode_like`). A full synthesis (`local=False`, label
`synthetic`) is shipped at the size the generator made it, with an all-true mask of that size.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np


@dataclass
class Source:
    """A decoded real image handed to a generator."""

    key: str
    image: np.ndarray  # H x W x 3, uint8, RGB, as stored (no EXIF transpose)
    domain: str
    seed: int  # derived from (global seed, forgery key); seed torch.Generator with it
    format: str = "png"
    caption: str | None = None
    donor: Source | None = None  # another corpus image, for generators with needs_donor


@dataclass
class Forgery:
    """What a generator returns: the forged pixels, where it changed them, and provenance."""

    image: np.ndarray  # h x w x 3 uint8 RGB: the source's size for local edits
    mask: np.ndarray  # h x w bool: the region the generator changed (requested region)
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
    name: ClassVar[str]
    domain: ClassVar[str]
    operation: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, params: Any = None) -> None: ...

    def setup(self, device: str = "cpu") -> None: ...

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery: ...


def require(package: str, install: str | None = None) -> None:
    """Raises ImportError naming what to install when an optional dependency is missing."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"this generator needs the Python package {package!r}; "
            f"install it with: pip install {install or package}"
        )


def check_nonempty(key: str, values: tuple[Any, ...] | list[Any]) -> None:
    """A list param that must hold something: a ValueError naming the key otherwise."""
    if not values:
        raise ValueError(f"{key} {list(values)!r}; allowed: a non-empty list")


def check_range(
    key: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """`lo <= value <= hi` (`<` where open; None: unbounded), finite: a ValueError naming the
    key and the allowed range otherwise."""
    v = float(value)
    ok = np.isfinite(v)
    ok = ok and (lo is None or (lo < v if lo_open else lo <= v))
    ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        left = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        right = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ValueError(f"{key} {value!r}; allowed: {left}{key}{right}")
