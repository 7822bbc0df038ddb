"""The synthesize stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthesizeParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the synthesize stage is not written yet")
