"""The dedup stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DedupParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the dedup stage is not written yet")
