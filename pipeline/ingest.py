"""The ingest stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IngestParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the ingest stage is not written yet")
