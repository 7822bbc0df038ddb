"""The export stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the export stage is not written yet")
