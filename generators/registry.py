"""The explicit registry of forgery generators: name -> "module:Class".

Modules are imported when a generator is asked for, so a generator whose optional
dependency is missing fails with an error naming the package, and only when it is used.
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


def build(name: str, params: dict[str, Any] | None = None) -> Any:
    """Builds (but does not set up) the generator `name` with its params."""
    return generator_class(name)(**(params or {}))
