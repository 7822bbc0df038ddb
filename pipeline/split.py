"""The split stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the split stage is not written yet")
