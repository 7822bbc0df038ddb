"""The shard stage (being written; see ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardParams:
    pass


def run(params, inputs, out, executor):
    raise NotImplementedError("the shard stage is not written yet")
