"""DeFakerOne: tiny preset forward/backward, the real-preset code path on tiny checkpoints
(LoRA, bf16, safetensors only), save/load, safe-loading refusals, tiled prediction, and
that it learns 8 forged samples."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from pipeline import predict
from pipeline.model import (
    ANSWERS,
    SEG_TOKEN,
    DeFakerOne,
    ModelSpec,
    build_model,
    load_model,
    parameter_counts,
    save_model,
    tiny_configs,
    tiny_tokenizer,
)
from pipeline.train import pixel_f1
from pipeline.views import tiles

S = 128


def _batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, S, S)
    mask[1:3, 30:60, 40:90] = 1
    sam = torch.randint(0, 255, (b, 3, S, S), dtype=torch.uint8, generator=g)
    return {"sam": sam, "views": torch.stack([sam, sam], 1), "mask": mask,
            "valid": torch.ones(b, S, S, dtype=torch.bool),
            "fake": (mask.flatten(1).sum(1) > 0).long()}


@pytest.fixture(scope="module")
def tiny() -> DeFakerOne:
    torch.set_num_threads(1)
    return build_model(ModelSpec())


def test_tiny_forward_backward_reaches_seg_mlp_and_sam_decoder(tiny):
    counts = parameter_counts(tiny)
    assert 1_000_000 < counts["total"] < 5_000_000  # "a few million"
    tiny.zero_grad(set_to_none=True)
    out = tiny(_batch())
    assert out.mask_logits.shape == (4, S, S) and out.fake_prob.shape == (4,)
    assert torch.isfinite(out.loss) and out.loss_txt > 0 and out.loss_seg > 0
    out.loss.backward()
    for name, module in [("seg_proj", tiny.seg_proj), ("sam decoder", tiny.sam.mask_decoder),
                         ("language model", tiny.vlm.model.language_model)]:
        norms = [p.grad.norm() for p in module.parameters() if p.requires_grad]
        assert norms and sum(norms) > 0, name
    # every trainable tensor takes part in the loss (DDP needs no find_unused_parameters)
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_answers_end_in_seg_token_and_only_answers_are_targets(tiny):
    tok = tiny.tokenizer
    for k, word in enumerate(ANSWERS):
        ids = tiny.seq_ids[k]
        target = tiny.seq_target[k]
        answer = target[target != -100].tolist()
        assert tok.decode(answer, skip_special_tokens=False) == f"{word} {SEG_TOKEN} <|im_end|>"
        assert ids[tiny.seq_seg[k]] == tiny.seg_id == tok.convert_tokens_to_ids(SEG_TOKEN)
        assert (target[: tiny.prompt_len] == -100).all()
    assert "Is this image real or fake? If fake, segment the forged region." in tiny.prompt_text()
    assert tiny.prompt_text().count("<img>") == 2  # global + local view


def test_bad_specs_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown preset 'huge'; allowed: tiny, defakerone-2b"):
        ModelSpec(preset="huge")
    with pytest.raises(ValueError, match="crop 100"):
        ModelSpec(crop=100)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        ModelSpec(dtype="fp8")
    with pytest.raises(ValueError, match="needs train.vlm_model"):
        build_model(ModelSpec(preset="defakerone-2b"))


def _tiny_checkpoints(root, crop: int = S):
    """Base checkpoints as the real preset finds them: InternVL (no [SEG] yet) with its
    tokenizer, and SAM2, each saved with save_pretrained."""
    from transformers import InternVLForConditionalGeneration, Sam2Model

    tok = tiny_tokenizer()
    vcfg, scfg = tiny_configs(crop, len(tok), tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(1)
    vlm, sam = InternVLForConditionalGeneration(vcfg), Sam2Model(scfg)
    vlm.save_pretrained(root / "internvl")
    tok.save_pretrained(root / "internvl")
    sam.save_pretrained(root / "sam2")
    return vlm, sam


def _real_spec(root, **kw) -> ModelSpec:
    args = {"preset": "defakerone-2b", "vlm": str(root / "internvl"), "sam": str(root / "sam2"),
            "crop": S, "dtype": "bfloat16", "lora": True, "lora_r": 4, "lora_alpha": 8,
            "train_vision": False, "train_sam_encoder": False}
    return ModelSpec(**{**args, **kw})


def test_real_preset_path_loads_checkpoints_applies_lora_in_bf16(tmp_path):
    from peft.tuners.lora import LoraLayer

    vlm0, sam0 = _tiny_checkpoints(tmp_path)
    model = build_model(_real_spec(tmp_path))
    # weights come from the checkpoints, not from a fresh init
    lm = model.vlm.model.language_model
    w = lm.layers[0].mlp.down_proj.base_layer.weight
    assert torch.equal(w.float(), vlm0.model.language_model.layers[0].mlp.down_proj.weight.to(
        torch.bfloat16).float())
    ref = sam0.vision_encoder.neck.convs[0].weight
    assert torch.equal(model.sam.vision_encoder.neck.convs[0].weight.float(),
                       ref.to(torch.bfloat16).float())
    # LoRA on every projection of the language model, nowhere else
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 7 * len(lm.layers) and all("language_model" in n for n in lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)  # the new [SEG] row
    assert not any(n.startswith("vlm.model.vision_tower") for n in trainable)
    assert not any(n.startswith("sam.vision_encoder") for n in trainable)
    assert not any("base_layer" in n for n in trainable)
    assert any(n.startswith("sam.mask_decoder") for n in trainable)
    assert any(n.startswith("seg_proj") for n in trainable)
    # frozen base in bf16, what the optimizer updates in fp32
    assert lm.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    out = model(_batch(2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert sum(float(g.norm()) for n, g in grads.items() if "lora_B" in n) > 0
    counts = parameter_counts(model)
    assert counts["trainable"] < counts["total"] / 2


def test_save_and_load_model_roundtrip_with_lora(tmp_path):
    _tiny_checkpoints(tmp_path)
    model = build_model(_real_spec(tmp_path, dtype="float32"))
    with torch.no_grad():  # make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    b = _batch(2, seed=3)
    p0, m0 = model.infer(b["sam"], b["views"])
    out = save_model(model, tmp_path / "model", {"params.yaml": "x: 1\n"})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "vlm", "sam", "tokenizer", "defakerone.json", "params.yaml"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    loaded = load_model(out)
    assert loaded.spec == model.spec and loaded.seg_id == model.seg_id
    p1, m1 = loaded.infer(b["sam"], b["views"])
    assert torch.allclose(p0, p1, atol=1e-5) and torch.allclose(m0, m1, atol=1e-5)
    assert loaded.answer_text(b["views"][0]) == model.answer_text(b["views"][0])


def test_pickles_and_remote_code_are_refused(tmp_path):
    # a trained-model dir with only pickled weights
    model = build_model(ModelSpec())
    saved = save_model(model, tmp_path / "model")
    torch.save({"w": torch.zeros(1)}, saved / "model.bin")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"pickled weights \['model.bin'\] are refused"):
        load_model(saved)
    # a base checkpoint whose weights are a pickle
    vlm, _ = _tiny_checkpoints(tmp_path / "base")
    base = tmp_path / "base" / "internvl"
    (base / "model.safetensors").unlink()
    torch.save(vlm.state_dict(), base / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled checkpoints \(.bin, .pt\) are refused"):
        build_model(_real_spec(tmp_path / "base"))
    # a checkpoint that needs remote code
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}}))
    (remote / "configuration_internvl_chat.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(_real_spec(tmp_path, vlm=str(remote)))


def test_crop_must_match_sam_input(tmp_path):
    _tiny_checkpoints(tmp_path)
    with pytest.raises(ValueError, match="set train.crop to 128"):
        build_model(_real_spec(tmp_path, crop=256))


def test_predict_writes_masks_of_each_image_size(tmp_path, tiny):
    model_dir = save_model(tiny, tmp_path / "model")
    sizes = {"small.png": (70, 50), "wide.jpg": (300, 130), "square.webp": (256, 256)}
    coffee = skdata.coffee()
    paths = []
    for name, (w, h) in sizes.items():
        p = tmp_path / "in" / name
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(cv2.resize(coffee, (w, h))).save(p)
        paths.append(str(p))
    assert predict.main([*paths, "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    for name, (w, h) in sizes.items():
        stem = name.split(".")[0]
        mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}.mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        info = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert 0.0 <= info["score"] <= 1.0 and isinstance(info["answer"], str) and info["answer"]
        n_tiles = len(tiles(h, w, S))
        assert info["tiles"] == n_tiles and info["score"] == max(info["tile_scores"])
    # a file that is not an image is reported, the others still written
    bad = tmp_path / "in" / "notes.jpg"
    bad.write_text("not an image")
    assert predict.main([str(bad), paths[0], "--model", str(model_dir),
                         "--out", str(tmp_path / "out2")]) == 1
    assert (tmp_path / "out2" / "small.mask.png").exists()


def test_tiles_cover_the_image_at_native_resolution():
    from pipeline.views import tiles

    assert [(t.y, t.x, t.h, t.w) for t in tiles(150, 200, S)] == [
        (0, 0, 128, 128), (0, 72, 128, 128), (22, 0, 128, 128), (22, 72, 128, 128)]
    assert [(t.y, t.x, t.h, t.w) for t in tiles(50, 70, S)] == [(0, 0, 50, 70)]  # padded
    assert len(tiles(256, 384, S)) == 6  # exact multiples: no overlap


def test_tiles_are_stitched_in_place(tiny):
    """A tile's mask lands where the tile was cut: where only one tile covers the image, the
    stitched map is that tile's output (or empty when the tile is answered real)."""
    from pipeline.train_data import make_views
    from pipeline.views import chw, cut, tiles

    rgb = cv2.resize(skdata.astronaut(), (200, 150))
    pred = predict.predict_image(tiny, rgb, batch=3, answer=False)
    assert pred.prob.shape == (150, 200) and len(pred.tile_scores) == 4
    cfg = predict.crop_config(tiny)
    win = tiles(150, 200, S)[3]  # bottom-right; alone below row 128 and right of column 128
    crop = cut(rgb, win, S)
    p_fake, pm = tiny.infer(torch.from_numpy(chw(crop))[None],
                            torch.from_numpy(make_views(rgb, crop, cfg))[None])
    expect = pm[0].numpy() if float(p_fake) >= 0.5 else np.zeros((S, S), np.float32)
    assert np.allclose(pred.prob[128:, 128:], expect[128 - win.y :, 128 - win.x :], atol=1e-5)
    assert pred.tile_scores[3] == pytest.approx(float(p_fake), abs=1e-5)


def _learning_set():
    """8 photos with a spliced rectangle of brick texture, 4 untouched ones, 128 x 128."""
    rng = np.random.default_rng(0)
    brick = cv2.resize(np.stack([skdata.brick()] * 3, -1), (S, S))
    images, masks = [], []
    for name in ("coffee", "chelsea", "astronaut", "rocket", "immunohistochemistry", "retina",
                 "cat", "hubble_deep_field"):
        a = cv2.resize(np.asarray(getattr(skdata, name)())[..., :3], (S, S),
                       interpolation=cv2.INTER_AREA)
        m = np.zeros((S, S), bool)
        h, w = rng.integers(24, 56, 2)
        y, x = rng.integers(0, S - h), rng.integers(0, S - w)
        m[y : y + h, x : x + w] = True
        a = a.copy()
        a[m] = brick[m]
        images.append(a)
        masks.append(m)
    for name in ("coins", "camera", "moon", "text"):
        g = cv2.resize(np.asarray(getattr(skdata, name)()), (S, S))
        images.append(np.stack([g] * 3, -1))
        masks.append(np.zeros((S, S), bool))
    return images, masks


@pytest.mark.slow
def test_it_learns_eight_forged_samples():
    torch.set_num_threads(1)
    images, masks = _learning_set()
    sam = torch.from_numpy(np.stack([i.transpose(2, 0, 1) for i in images]))
    views = torch.stack([sam, sam], 1)  # these images are their own global view
    mask = torch.from_numpy(np.stack(masks)).float()
    fake = torch.tensor([1] * 8 + [0] * 4)
    valid = torch.ones_like(mask)
    model = build_model(ModelSpec(seed=0))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def scores():
        model.eval()
        p, pm = model.infer(sam, views)
        model.train()
        f1 = [pixel_f1(pm[i].numpy() >= 0.5, masks[i]) for i in range(8)]
        return float(np.mean(f1)), float(((p >= 0.5).long() == fake).float().mean())

    f1_before, _ = scores()
    for step in range(200):
        idx = torch.from_numpy(np.random.default_rng(step).choice(12, 4, replace=False))
        out = model({"sam": sam[idx], "views": views[idx], "mask": mask[idx],
                     "valid": valid[idx], "fake": fake[idx]})
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        opt.step()
    f1, accuracy = scores()
    assert f1_before < 0.5
    assert f1 > 0.8 and accuracy == 1.0, (f1, accuracy)
    model.eval()
    assert model.answer_text(views[0]) == f"fake {SEG_TOKEN}"
    assert model.answer_text(views[8]) == f"real {SEG_TOKEN}"
