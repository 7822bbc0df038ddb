"""The model presets (`train.preset`), apart from `pipeline.model` so that checking params
does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Defaults of one preset; `TrainParams` fields left at None take these."""

    vlm: str | None  # checkpoint (hub id or local path); None: built from a tiny config
    sam: str | None
    crop: int  # native-resolution crop side = SAM2's input size
    dtype: str
    lora: bool
    train_vision: bool  # InternVL vision tower + projector
    train_sam_encoder: bool
    lr: float


PRESETS: dict[str, Preset] = {
    "tiny": Preset(vlm=None, sam=None, crop=128, dtype="float32", lora=False,
                   train_vision=True, train_sam_encoder=True, lr=1e-3),
    "defakerone-2b": Preset(vlm="OpenGVLab/InternVL3-2B-hf", sam="facebook/sam2.1-hiera-large",
                            crop=1024, dtype="bfloat16", lora=True, train_vision=False,
                            train_sam_encoder=False, lr=1e-4),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]
