"""The explicit registry of forgery generators: name -> "module:Class".

Modules are imported when a generator is asked for, so importing the registry is cheap and a
generator whose optional dependency is missing fails with an error naming the package, and
only when it is used. Generator modules import neither torch nor diffusers at module level.
"""

from __future__ import annotations

import importlib
from typing import Any

REGISTRY: dict[str, str] = {
    # natural photos
    "copy_move": "generators.natural.copy_move:CopyMove",
    "splice": "generators.natural.splice:Splice",
    "removal": "generators.natural.removal:Removal",
    "inpaint": "generators.natural.inpaint:DiffusersInpaint",
    "edit": "generators.natural.edit:InstructEdit",
    # documents
    "text_replace": "generators.document.text_replace:TextReplace",
    "text_erase": "generators.document.text_erase:TextErase",
    "text_copy_move": "generators.document.text_copy_move:TextCopyMove",
    # faces
    "face_swap": "generators.face.face_swap:FaceSwap",
    "face_edit": "generators.face.face_edit:FaceEdit",
    # fully AI-generated
    "gan_synthesis": "generators.aigc.gan_synthesis:GanSynthesis",
    "t2i_synthesis": "generators.aigc.t2i_synthesis:TextToImage",
    "regeneration": "generators.aigc.regeneration:Regeneration",
}


def generator_class(name: str) -> type:
    if name not in REGISTRY:
        raise ValueError(
            f"unknown generator {name!r}; valid generators: {', '.join(sorted(REGISTRY))}"
        )
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def params_class(name: str) -> type:
    """The frozen dataclass of generator `name`'s params."""
    return generator_class(name).Params


def make_params(name: str, params: Any = None, where: str | None = None) -> Any:
    """Generator `name`'s params from a mapping (None: the defaults), checked like every
    params section: unknown keys and wrong types named by `pipeline.params.build`, bad values
    by the dataclass. An instance of the params class is returned as it is."""
    cls = params_class(name)
    if isinstance(params, cls):
        return params
    if params is not None and not isinstance(params, dict):
        raise ValueError(
            f"{where or name}: expected a mapping or {cls.__name__}, got {type(params).__name__}"
        )
    from pipeline.params import build as build_dataclass

    return build_dataclass(cls, params or {}, where or f"generators.{name}.params")


def build(name: str, params: Any = None) -> Any:
    """Builds (but does not set up) the generator `name` with its params (mapping or dataclass)."""
    return generator_class(name)(make_params(name, params))
