"""DeFakerOne: one model that says whether an image is forged (text) and where (mask).

Two transformers models, coupled LISA-style:

- `InternVLForConditionalGeneration` reads the views of a crop (see `pipeline.views`) and the
  question `QUESTION`, and answers `real[SEG]` or `fake[SEG]`: the answer word, then the
  `[SEG]` token this module adds to the tokenizer.
- `Sam2Model` segments: the language model's last hidden state at `[SEG]` goes through a
  small MLP (`seg_proj`) into SAM2's prompt-embedding space, as the one sparse prompt of
  SAM2's mask decoder over SAM2's image features of the native-resolution crop.

Loss: `w_txt * CE(answer tokens) + w_seg * (BCE + Dice)(mask)`. The answer is `fake` when
the crop holds forged pixels (`fake_min_pixels` or more; every crop of a fully synthetic
image), else `real` with an all-zero mask target.

Presets (`PRESETS`): `tiny` builds both parts from small configs with random weights and a
word-level tokenizer made in code (nothing is downloaded); `defakerone-2b` loads a
transformers-native InternVL checkpoint and a SAM2.1 checkpoint (local paths or hub ids),
safetensors only, in bf16, with LoRA (peft) on the language model. The same code path
builds both once the base parts exist (`build_model`); `load_model(dir)` reloads a trained
model saved by `save_model`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.presets import PRESETS, Preset, preset  # noqa: F401  (re-exported)
from pipeline.views import normalize

log = logging.getLogger(__name__)

QUESTION = "Is this image real or fake? If fake, segment the forged region."
SEG_TOKEN = "[SEG]"
ANSWERS = ("real", "fake")  # index: 1 when the crop is forged
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
FORMAT_VERSION = 1
# float16 is left out: without loss scaling its gradients underflow
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model's structure (saved as `defakerone.json`)."""

    preset: str = "tiny"
    vlm: str | None = None
    sam: str | None = None
    crop: int = 128
    dtype: str = "float32"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    train_vision: bool = True
    train_sam_encoder: bool = True
    global_view: bool = True
    trust_remote_code: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        preset(self.preset)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.crop < 64 or self.crop % 32:
            raise ValueError(f"crop {self.crop}: must be a multiple of 32, at least 64")
        if self.lora_r < 1:
            raise ValueError(f"lora_r {self.lora_r}: must be >= 1")


# ---------------------------------------------------------------------------------------
# tiny preset: configs and tokenizer made in code


def tiny_tokenizer():
    """A word-level tokenizer over the prompt's words, with InternVL's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", TURN_START, TURN_END, IMG_START, IMG_END, IMG_CONTEXT]
    words = ["user", "assistant", "system", "\n", *ANSWERS]
    for w in QUESTION.replace("?", " ? ").replace(",", " , ").replace(".", " . ").split():
        if w not in words:
            words.append(w)
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token=TURN_END,
        additional_special_tokens=[TURN_START, TURN_END, IMG_START, IMG_END, IMG_CONTEXT])


def tiny_configs(crop: int, vocab_size: int, image_token_id: int):
    """InternVL and SAM2 configs of a few million parameters; the VLM's input is `crop`, so
    its local view is the native crop."""
    from transformers import (
        InternVLConfig,
        InternVLVisionConfig,
        Qwen2Config,
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    patch = 16
    vision = InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, image_size=crop, patch_size=patch)
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                       max_position_embeddings=1024, tie_word_embeddings=True)
    vlm = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=(crop // patch) ** 2 // 4)
    c = crop
    sam = Sam2Config(
        vision_config=Sam2VisionConfig(
            backbone_config=Sam2HieraDetConfig(
                hidden_size=32, image_size=[c, c], blocks_per_stage=[1, 2, 2, 1],
                embed_dim_per_stage=[32, 64, 128, 256], num_attention_heads_per_stage=[1, 2, 4, 4],
                window_size_per_stage=[8, 4, 4, 4], global_attention_blocks=[4],
                window_positional_embedding_background_size=[4, 4]),
            backbone_channel_list=[256, 128, 64, 32],
            backbone_feature_sizes=[[c // 4, c // 4], [c // 8, c // 8], [c // 16, c // 16]],
            fpn_hidden_size=64),
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=64, image_size=c, patch_size=16),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=64, mlp_dim=256, num_hidden_layers=2, num_attention_heads=4,
            iou_head_hidden_dim=64, dynamic_multimask_via_stability=False))
    return vlm, sam


# ---------------------------------------------------------------------------------------
# the model


@dataclass
class Output:
    loss: torch.Tensor | None
    loss_txt: torch.Tensor | None
    loss_seg: torch.Tensor | None
    mask_logits: torch.Tensor  # B x S x S
    fake_prob: torch.Tensor  # B, P(answer "fake") against "real"


class DeFakerOne(nn.Module):
    def __init__(self, vlm, sam, tokenizer, spec: ModelSpec, loss_txt: float = 1.0,
                 loss_seg: float = 1.0):
        super().__init__()
        self.spec = spec
        self.tokenizer = tokenizer
        self.w_txt, self.w_seg = loss_txt, loss_seg
        self.vlm, self.sam = vlm, sam
        self.compute_dtype = DTYPES[spec.dtype]

        sam_size = int(sam.config.prompt_encoder_config.image_size)
        if sam_size != spec.crop:
            raise ValueError(f"crop {spec.crop} differs from the SAM2 checkpoint's input size "
                             f"{sam_size}; set train.crop to {sam_size}")
        # one mask per [SEG], the same in training and inference (no stability fallback)
        sam.mask_decoder.dynamic_multimask_via_stability = False
        self.vlm_size = int(vlm.config.vision_config.image_size[0])
        self.n_views = 2 if spec.global_view else 1

        self._add_seg_token()
        hidden = vlm.config.text_config.hidden_size
        prompt_dim = sam.config.mask_decoder_config.hidden_size
        # LISA's text_hidden_fcs: LM hidden state at [SEG] -> SAM2 prompt embedding
        self.seg_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, prompt_dim))
        self._build_sequences()
        if spec.lora:
            self._inject_lora()
        self._set_trainable()

    # -- tokens and sequences --------------------------------------------------------

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {token!r} into {len(ids)} tokens; an InternVL "
                             "chat tokenizer (transformers-native, '-hf') is needed")
        return ids[0]

    def _add_seg_token(self) -> None:
        tok = self.tokenizer
        if SEG_TOKEN not in tok.get_vocab():
            tok.add_tokens([SEG_TOKEN])
        emb = self.vlm.get_input_embeddings()
        if len(tok) > emb.num_embeddings:
            self.vlm.resize_token_embeddings(len(tok), mean_resizing=True)
        self.seg_id = self._token_id(SEG_TOKEN)
        image_id = self._token_id(IMG_CONTEXT)
        if image_id != self.vlm.config.image_token_id:
            raise ValueError(f"tokenizer's {IMG_CONTEXT} is id {image_id} but the model expects "
                             f"{self.vlm.config.image_token_id}")

    def prompt_text(self) -> str:
        image = IMG_START + IMG_CONTEXT * int(self.vlm.config.image_seq_length) + IMG_END + "\n"
        return (f"{TURN_START}user\n{image * self.n_views}{QUESTION}{TURN_END}\n"
                f"{TURN_START}assistant\n")

    def _build_sequences(self) -> None:
        tok = self.tokenizer
        prompt = tok.encode(self.prompt_text(), add_special_tokens=False)
        end = self._token_id(TURN_END)
        words = [tok.encode(a, add_special_tokens=False) for a in ANSWERS]
        if not words[0] or not words[1] or words[0][0] == words[1][0]:
            raise ValueError(f"answers {ANSWERS} must start with different tokens")
        answers = [w + [self.seg_id, end] for w in words]
        n = len(prompt)
        length = n + max(len(a) for a in answers)
        pad = tok.pad_token_id if tok.pad_token_id is not None else end
        ids = torch.full((2, length), pad, dtype=torch.long)
        target = torch.full((2, length), -100, dtype=torch.long)
        for k, a in enumerate(answers):
            ids[k, :n] = torch.tensor(prompt)
            ids[k, n : n + len(a)] = torch.tensor(a)
            target[k, n : n + len(a)] = torch.tensor(a)
        self.prompt_len = n
        self.answer_first = (words[0][0], words[1][0])
        self.end_id = end
        self.register_buffer("seq_ids", ids, persistent=False)
        self.register_buffer("seq_target", target, persistent=False)
        self.register_buffer("seq_seg", torch.tensor([n + len(w) for w in words]), persistent=False)
        if int((ids[0] == self.vlm.config.image_token_id).sum()) != (
                self.n_views * self.vlm.config.image_seq_length):
            raise ValueError("image placeholder tokens do not match image_seq_length")

    # -- trainable parts ---------------------------------------------------------------

    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=self.spec.lora_r, lora_alpha=self.spec.lora_alpha,
                         lora_dropout=self.spec.lora_dropout, target_modules=LORA_TARGETS,
                         trainable_token_indices={"embed_tokens": [self.seg_id]})
        inject_adapter_in_model(cfg, self.vlm)

    def _set_trainable(self) -> None:
        spec = self.spec
        for p in self.parameters():
            p.requires_grad_(False)
        train: list[nn.Module] = [self.seg_proj, self.sam.mask_decoder,
                                  self.sam.prompt_encoder.no_mask_embed]
        vlm = self.vlm.model
        if spec.lora:
            for name, p in self.vlm.named_parameters():
                if "lora_" in name or "trainable_tokens_delta" in name:
                    p.requires_grad_(True)
        else:
            train += [vlm.language_model, self.vlm.lm_head]
        if spec.train_vision:
            train += [vlm.vision_tower, vlm.multi_modal_projector]
        if spec.train_sam_encoder:
            train += [self.sam.vision_encoder]
            self.sam.no_memory_embedding.requires_grad_(True)
        for m in train:
            for p in m.parameters():
                p.requires_grad_(True)
        # outputs the loss never uses: frozen, so every trainable tensor gets a gradient (DDP)
        dec = self.sam.mask_decoder
        for m in (dec.iou_prediction_head, dec.pred_obj_score_head):
            for p in m.parameters():
                p.requires_grad_(False)
        if self.compute_dtype != torch.float32:
            for p in self.parameters():  # fp32 master weights for what the optimizer updates
                if p.requires_grad:
                    p.data = p.data.float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- forward -------------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def image_tokens(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 B x V x 3 x s x s views -> B x (V*T) x hidden image tokens for the LM."""
        b = views.shape[0]
        px = normalize(views.flatten(0, 1))
        feats = self.vlm.model.get_image_features(pixel_values=px).pooler_output
        return feats.reshape(b, -1, feats.shape[-1])

    def language(self, image_tokens: torch.Tensor, fake: torch.Tensor):
        """Teacher-forced answer for each row (`fake` 0/1): answer-token logits, their
        targets, P(fake) at the answer position and the hidden state at [SEG]."""
        ids = self.seq_ids[fake]
        embeds = self.vlm.get_input_embeddings()(ids)
        place = (ids == self.vlm.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(place, image_tokens.to(embeds.dtype))
        # right padding and causal attention: no mask needed, padding never reaches a token
        hidden = self.vlm.model.language_model(inputs_embeds=embeds).last_hidden_state
        n = self.prompt_len
        logits = self.vlm.lm_head(hidden[:, n - 1 : -1]).float()
        pair = logits[:, 0, list(self.answer_first)]
        fake_prob = pair.softmax(-1)[:, 1]
        seg = hidden[torch.arange(len(ids), device=ids.device), self.seq_seg[fake]]
        return logits, self.seq_target[fake][:, n:], fake_prob, seg

    def sam_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """SAM2 image embeddings (high-res features first) of uint8 B x 3 x S x S crops."""
        b = pixels.shape[0]
        out = self.sam.get_image_features(normalize(pixels))
        maps = list(out.fpn_hidden_states)
        maps[-1] = maps[-1] + self.sam.no_memory_embedding
        return [f.permute(1, 2, 0).reshape(b, -1, *size)
                for f, size in zip(maps, self.sam.backbone_feature_sizes)]

    def decode_mask(self, features: list[torch.Tensor], seg_hidden: torch.Tensor) -> torch.Tensor:
        """Mask logits B x S x S from SAM2's decoder prompted with the projected [SEG] state."""
        b = seg_hidden.shape[0]
        prompt = self.seg_proj(seg_hidden.to(self.seg_proj[0].weight.dtype))
        image = features[-1]
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            b, -1, image.shape[-2], image.shape[-1])
        pos = self.sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1)
        low, _, _, _ = self.sam.mask_decoder(
            image_embeddings=image, image_positional_embeddings=pos,
            sparse_prompt_embeddings=prompt[:, None, None, :].to(image.dtype),
            dense_prompt_embeddings=dense, multimask_output=False,
            high_resolution_features=features[:-1])
        low = low[:, 0].float()  # B x 1 x S/4 x S/4
        return F.interpolate(low, size=(self.spec.crop, self.spec.crop), mode="bilinear",
                             align_corners=False)[:, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> Output:
        """Training step: `sam` B x 3 x S x S uint8, `views` B x V x 3 x s x s uint8, `fake`
        B (0/1), and for the loss `mask` B x S x S (0/1) and `valid` B x S x S (not padding)."""
        fake = batch["fake"].long()
        with self._autocast(batch["sam"].device):
            logits, target, fake_prob, seg = self.language(self.image_tokens(batch["views"]), fake)
            mask_logits = self.decode_mask(self.sam_features(batch["sam"]), seg)
        if "mask" not in batch:
            return Output(None, None, None, mask_logits, fake_prob)
        loss_txt = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        loss_seg = seg_loss(mask_logits, batch["mask"].float(), batch["valid"].float())
        loss = self.w_txt * loss_txt + self.w_seg * loss_seg
        return Output(loss, loss_txt.detach(), loss_seg.detach(), mask_logits, fake_prob)

    @torch.no_grad()
    def infer(self, pixels: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per crop: P(fake) and the mask probabilities, the mask decoded from the [SEG] that
        follows the model's own (argmax) answer."""
        with self._autocast(pixels.device):
            tokens = self.image_tokens(views)
            zeros = torch.zeros(len(pixels), dtype=torch.long, device=pixels.device)
            _, _, fake_prob, seg = self.language(tokens, zeros)
            chosen = (fake_prob >= 0.5).long()
            if chosen.any():  # the answer is causal: P(fake) is the same in both sequences
                _, _, _, seg_fake = self.language(tokens, chosen)
                seg = torch.where(chosen[:, None].bool(), seg_fake, seg)
            logits = self.decode_mask(self.sam_features(pixels), seg)
        return fake_prob.float(), torch.sigmoid(logits)

    @torch.no_grad()
    def answer_text(self, views: torch.Tensor, max_new_tokens: int = 4) -> str:
        """Greedy decoding of the model's answer for one crop (uint8 V x 3 x s x s views)."""
        with self._autocast(views.device):
            tokens = self.image_tokens(views[None])
            ids = self.seq_ids[0, : self.prompt_len][None]
            out: list[int] = []
            for _ in range(max_new_tokens):
                embeds = self.vlm.get_input_embeddings()(ids)
                place = (ids == self.vlm.config.image_token_id).unsqueeze(-1)
                embeds = embeds.masked_scatter(place, tokens.to(embeds.dtype))
                hidden = self.vlm.model.language_model(inputs_embeds=embeds).last_hidden_state
                nxt = int(self.vlm.lm_head(hidden[:, -1]).argmax(-1))
                if nxt == self.end_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], 1)
        return self.tokenizer.decode(out, skip_special_tokens=False).strip()


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE + Dice over the valid (non-padding) pixels, averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    p = torch.sigmoid(logits) * valid
    t = target * valid
    inter = (p * t).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    return (bce + dice).mean()


# ---------------------------------------------------------------------------------------
# building, saving, loading


def _check_native_internvl(path: str, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ValueError(f"{path}: the checkpoint needs remote code; this is refused unless "
                             "train.trust_remote_code is true") from e
        raise
    if cfg.model_type != "internvl":
        raise ValueError(f"{path}: model_type {cfg.model_type!r} is not a transformers-native "
                         "InternVL; use an '-hf' checkpoint such as OpenGVLab/InternVL3-2B-hf")


def _from_pretrained(cls, path: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as e:
        raise ValueError(f"{what} {path}: could not load safetensors weights ({e}); pickled "
                         "checkpoints (.bin, .pt) are refused") from e


def build_model(spec: ModelSpec, loss_txt: float = 1.0, loss_seg: float = 1.0) -> DeFakerOne:
    """A fresh model: tiny random weights, or the base checkpoints named in `spec`."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration, Sam2Model

    dtype = DTYPES[spec.dtype]
    if spec.vlm is None or spec.sam is None:
        if spec.preset != "tiny":
            raise ValueError(f"preset {spec.preset!r} needs train.vlm_model and train.sam_model")
        tok = tiny_tokenizer()
        vcfg, scfg = tiny_configs(spec.crop, len(tok), tok.convert_tokens_to_ids(IMG_CONTEXT))
        torch.manual_seed(spec.seed)  # the random weights are part of the run's identity
        vlm = InternVLForConditionalGeneration(vcfg).to(dtype)
        sam = Sam2Model(scfg).to(dtype)
    else:
        remote = spec.trust_remote_code
        _check_native_internvl(spec.vlm, remote)
        tok = AutoTokenizer.from_pretrained(spec.vlm, trust_remote_code=remote)
        vlm = _from_pretrained(InternVLForConditionalGeneration, spec.vlm, "InternVL checkpoint",
                               dtype=dtype, trust_remote_code=remote)
        sam = _from_pretrained(Sam2Model, spec.sam, "SAM2 checkpoint", dtype=dtype,
                               trust_remote_code=remote)
        torch.manual_seed(spec.seed)  # seg_proj, LoRA and new-token init
    return DeFakerOne(vlm, sam, tok, spec, loss_txt=loss_txt, loss_seg=loss_seg)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return {"total": sum(p.numel() for p in seen.values()),
            "trainable": sum(p.numel() for p in seen.values() if p.requires_grad)}


def unwrap(model: nn.Module) -> DeFakerOne:
    return model.module if hasattr(model, "module") else model


WEIGHTS = "model.safetensors"
SPEC = "defakerone.json"


def save_model(model: nn.Module, out: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Writes `out/` (replaced atomically): safetensors weights, the two configs, the
    tokenizer, the spec, and any `extra` text files (params used, export hash)."""
    from safetensors.torch import save_model as save_st

    m = unwrap(model)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_st(m, str(tmp / WEIGHTS), metadata={"format": "pt"})
    m.vlm.config.save_pretrained(tmp / "vlm")
    m.sam.config.save_pretrained(tmp / "sam")
    m.tokenizer.save_pretrained(tmp / "tokenizer")
    meta = {"format_version": FORMAT_VERSION, "spec": asdict(m.spec), "question": QUESTION,
            "answers": list(ANSWERS), "seg_token": SEG_TOKEN, "vlm_size": m.vlm_size,
            "loss_weights": {"txt": m.w_txt, "seg": m.w_seg}}
    (tmp / SPEC).write_text(json.dumps(meta, indent=1) + "\n")
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def load_model(path: str | os.PathLike, device: str = "cpu") -> DeFakerOne:
    """The model saved by `save_model`, weights from safetensors only, no remote code unless
    the model was trained with `trust_remote_code` (for its tokenizer)."""
    from safetensors.torch import load_model as load_st
    from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration, Sam2Model

    path = Path(path)
    if not (path / SPEC).exists():
        raise FileNotFoundError(f"{path}: not a trained model directory (no {SPEC})")
    if not (path / WEIGHTS).exists():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise FileNotFoundError(f"{path}: no {WEIGHTS}" + (
            f"; pickled weights {found} are refused" if found else ""))
    meta = json.loads((path / SPEC).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}")
    known = {f.name for f in fields(ModelSpec)}
    spec = ModelSpec(**{k: v for k, v in meta["spec"].items() if k in known})
    dtype = DTYPES[spec.dtype]
    tok = AutoTokenizer.from_pretrained(path / "tokenizer", trust_remote_code=spec.trust_remote_code)
    vlm = InternVLForConditionalGeneration._from_config(AutoConfig.from_pretrained(path / "vlm"),
                                                        dtype=dtype)
    sam = Sam2Model._from_config(AutoConfig.from_pretrained(path / "sam"), dtype=dtype)
    w = meta.get("loss_weights", {})
    model = DeFakerOne(vlm, sam, tok, spec, loss_txt=w.get("txt", 1.0), loss_seg=w.get("seg", 1.0))
    load_st(model, str(path / WEIGHTS), strict=True, device="cpu")
    return model.to(device).eval()


def describe(spec: ModelSpec) -> dict[str, Any]:
    """What each branch sees, for metrics and the model card."""
    return {"sam": f"native {spec.crop}x{spec.crop} crop or tile",
            "vlm": ("global view (whole image resized) + local view (the crop resized)"
                    if spec.global_view else "local view (the crop resized)")}
