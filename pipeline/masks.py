"""The masks stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MasksParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the masks stage is not written yet")
