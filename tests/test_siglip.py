"""The SigLIP understanding encoder (both backends) and the siglip training stage.

Tiny random models only: an open_clip ViT and a timm-based open_clip tower (timm's ``test_vit3``,
MAP-pooled like SigLIP, with a class token to strip), and a transformers ``SiglipVisionModel``.
Features are compared with each backend's own forward on its own PIL preprocessing.
"""

import json

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from encoders.siglip import SiglipEncoder, _preprocess_for_open_clip_name
from train.__main__ import main
from train.shapes import ShapesWorld

SIGLIP_PP = {"size": 32, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
             "resize_mode": "squash", "fill_color": 0}
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
            "no_causal_mask": True, "pool_type": "last", "proj_bias": True}
VIT_CFG = {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT_CFG,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                          "pool_type": "avg"}}
TIMM_CFG = {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT_CFG,
            "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit3", "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"}}
BACKENDS = ["open_clip_vit", "open_clip_timm", "transformers"]


def clip_model(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    return open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}, init_logit_bias=-10.0)


def make(kind: str, **kw) -> tuple[SiglipEncoder, object]:
    """(encoder, the backend object it wraps: the open_clip model or (HF model, processor))."""
    if kind == "open_clip_vit":
        model = clip_model(VIT_CFG)
        return SiglipEncoder.from_open_clip_model(model, VIT_CFG, SIGLIP_PP, **kw), model
    if kind == "open_clip_timm":
        model = clip_model(TIMM_CFG)
        return SiglipEncoder.from_open_clip_model(model, TIMM_CFG, {**SIGLIP_PP, "size": 160}, **kw), model
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8)).eval()
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    return SiglipEncoder.from_transformers_model(model, processor, **kw), (model, processor)


def pil_and_pixels(h: int, w: int, seed: int = 0) -> tuple[Image.Image, torch.Tensor]:
    """A uint8 noise image (the worst case for resampling) and the same as (1, 3, h, w) in [0, 1]."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255


def backend_reference(kind: str, backend, image: Image.Image) -> torch.Tensor:
    """Patch features the backend's own code computes from its own PIL preprocessing."""
    with torch.no_grad():
        if kind == "transformers":
            model, processor = backend
            return model(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"]).last_hidden_state
        visual = backend.visual
        x = image_transform_v2(PreprocessCfg(**{**SIGLIP_PP, "size": visual.image_size[0]}), is_train=False)(image)[None]
        if kind == "open_clip_timm":  # the trunk's features minus its prefix (class) token
            return visual.trunk.forward_features(x)[:, visual.trunk.num_prefix_tokens:]
        visual.output_tokens = True  # open_clip's VisionTransformer token output
        try:
            return visual(x)[1]
        finally:
            visual.output_tokens = False


@pytest.mark.parametrize("kind", BACKENDS)
def test_features_equal_the_backends_own_forward(kind):
    enc, backend = make(kind)
    size = enc.image_size
    image, pixels = pil_and_pixels(size, size)
    feats = enc(pixels)
    assert feats.shape == (1, enc.num_tokens, enc.feature_dim)
    torch.testing.assert_close(feats, backend_reference(kind, backend, image), rtol=0, atol=1e-5)
    # any input size: resized to the model's, same token grid
    other = enc(torch.rand(2, 3, size + 8, size - 4))
    assert other.shape == (2, enc.num_tokens, enc.feature_dim)
    expected = {"open_clip_vit": (16, 32), "open_clip_timm": (100, 96), "transformers": (16, 32)}[kind]
    assert (enc.num_tokens, enc.feature_dim) == expected


def test_feature_layer_selects_hidden_states():
    # transformers: hidden_states[-2] of the model's own forward
    enc, (model, processor) = make("transformers", feature_layer=-2)
    image, pixels = pil_and_pixels(32, 32)
    ref = model(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(enc(pixels), ref.hidden_states[-2], rtol=0, atol=1e-5)
    # open_clip ViT: the same convention (index into [embeddings, block 1, ..., block L], no final
    # norm), checked against running the blocks by hand
    enc, model = make("open_clip_vit", feature_layer=1)
    x = (pixels - 0.5) / 0.5
    with torch.no_grad():
        h = model.visual.transformer.resblocks[0](model.visual._embeds(x))
    torch.testing.assert_close(enc(pixels), h[:, 1:], rtol=0, atol=1e-5)
    assert not torch.allclose(enc(pixels), make("open_clip_vit")[0](pixels), atol=1e-3)
    with pytest.raises(ValueError, match="out of range"):
        make("open_clip_vit", feature_layer=3)
    with pytest.raises(ValueError, match="patch embeddings"):
        make("open_clip_vit", feature_layer=0)


@pytest.mark.parametrize("kind", ["open_clip_squash", "open_clip_shortest", "open_clip_longest", "transformers"])
def test_tensor_preprocessing_equals_the_backends_pil_preprocessing(kind):
    if kind == "transformers":
        enc, (_, processor) = make("transformers")
        mean, std = 0.5, 0.5

        def reference(image):
            return processor(images=image, return_tensors="pt")["pixel_values"]
    else:
        mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]  # not SigLIP's: checks they are applied
        pp = {**SIGLIP_PP, "resize_mode": kind.split("_")[-1], "mean": mean, "std": std}
        enc = SiglipEncoder.from_open_clip_model(clip_model(VIT_CFG), VIT_CFG, pp)
        transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)

        def reference(image):
            return transform(image)[None]

    # at the model's size no resampling happens: equal up to float rounding
    image, pixels = pil_and_pixels(32, 32)
    torch.testing.assert_close(enc.preprocess(pixels), reference(image), rtol=0, atol=1e-5)
    # resized: the backends resample uint8 images, so equal up to uint8 rounding (~1/255)
    level = 1 / 255 / min(np.atleast_1d(std))  # one uint8 step after normalisation
    naive_worst = 0.0
    for h, w in [(48, 48), (64, 40), (40, 64), (20, 28), (100, 37)]:
        image, pixels = pil_and_pixels(h, w, seed=h * w)
        ours, ref = enc.preprocess(pixels), reference(image)
        assert ours.shape == ref.shape == (1, 3, 32, 32)
        assert (ours - ref).abs().max() <= 1.2 * level, (h, w)
        assert (ours - ref).abs().mean() <= 0.4 * level, (h, w)
        if kind.endswith("squash") or kind == "transformers":
            naive = TF.resize(pixels, [32, 32], InterpolationMode.BICUBIC, antialias=True)
            naive = (naive - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
            naive_worst = max(naive_worst, (naive - ref).abs().max().item())
    if naive_worst:  # the tolerance is tight enough to reject a plain one-pass float resize
        assert naive_worst > 5 * level


def test_frozen_by_default_and_trainable_by_flag():
    for trainable in (False, True):
        enc, _ = make("open_clip_vit", trainable=trainable)
        head = nn.Linear(enc.feature_dim, 1)
        parent = nn.Sequential(enc, head).train()
        assert enc.training is trainable and enc.tower.training is trainable
        assert all(p.requires_grad is trainable for p in enc.parameters())
        parent(torch.rand(2, 3, 32, 32)).sum().backward()
        no_grad = {n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
        assert head.weight.grad is not None
        if trainable:  # everything but the pooled-embedding projection, which patch features skip
            assert no_grad == {"tower.proj"}
        else:
            assert no_grad == {n for n, _ in enc.named_parameters()}
    enc, _ = make("transformers")
    nn.Sequential(enc).train()
    assert not enc.tower.training and not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("kind,layer", [("open_clip_vit", None), ("open_clip_timm", -2), ("transformers", -2),
                                        ("transformers", None)])
def test_save_load_round_trip_is_exact(tmp_path, kind, layer):
    enc, _ = make(kind, feature_layer=layer)
    enc.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no pickle
    loaded = SiglipEncoder.from_pretrained(tmp_path)
    assert (loaded.backend, loaded.feature_layer, loaded.image_size, loaded.num_tokens, loaded.feature_dim) == \
        (enc.backend, layer, enc.image_size, enc.num_tokens, enc.feature_dim)
    a, b = enc.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = torch.rand(2, 3, 45, 45)
    assert torch.equal(enc(pixels), loaded(pixels))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    enc.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the saved precision is kept
    loaded = SiglipEncoder.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(enc(pixels), loaded(pixels))


def test_open_clip_named_models_use_their_tags_preprocessing():
    # open_clip gives a local weights file the OpenAI mean/std; SigLIP's tags say 0.5 and squash
    pp = _preprocess_for_open_clip_name("ViT-B-16-SigLIP", None)
    assert pp == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}


def test_open_clip_model_by_name_with_a_local_weights_file(tmp_path):
    """The open_clip path users take with a real SigLIP: a registered model name + a local weights
    file (here a tiny timm-based config registered under a new name)."""
    from safetensors.torch import save_file

    name = "hybrid-test-tiny-SigLIP"
    (tmp_path / f"{name}.json").write_text(json.dumps({**TIMM_CFG, "init_logit_bias": -10.0}))  # as SigLIP configs
    open_clip.add_model_config(tmp_path / f"{name}.json")
    model = clip_model(TIMM_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    enc = SiglipEncoder.open_clip(name, tmp_path / "weights.safetensors")
    assert (enc.num_tokens, enc.feature_dim, enc.image_size) == (100, 96, 160)  # timm test_vit3: width 96
    # the weights came from the file (a name with no pretrained tags keeps open_clip's preprocessing)
    reference = SiglipEncoder.from_open_clip_model(model, TIMM_CFG, enc.preprocess_cfg)
    pixels = torch.rand(2, 3, 160, 160)
    torch.testing.assert_close(enc(pixels), reference(pixels), rtol=0, atol=0)


def test_bad_inputs_fail_clearly(tmp_path):
    enc, model = make("open_clip_vit")
    for bad in (torch.rand(3, 32, 32), torch.rand(2, 1, 32, 32), torch.rand(2, 4, 32, 32)):
        with pytest.raises(ValueError, match="shape \\(B, 3, H, W\\)"):
            enc(bad)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected pixels in \\[0, 1\\]"):
        enc(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="expected pixels in \\[0, 1\\]"):
        enc(torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="unknown SigLIP backend 'jax'"):
        SiglipEncoder("jax", model.visual, {})
    with pytest.raises(FileNotFoundError, match="not a saved SiglipEncoder"):
        SiglipEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SiglipEncoder.transformers(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SiglipEncoder.open_clip("ViT-B-16-SigLIP", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-16-SigLIPP'.*ViT-B-16-SigLIP"):
        SiglipEncoder.open_clip("ViT-B-16-SigLIPP", tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="hf-hub"):
        SiglipEncoder.open_clip("hf-hub:timm/ViT-B-16-SigLIP")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a SiglipEncoder config"):
        SiglipEncoder.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- the siglip stage
TINY = ["steps=6", "batch_size=8", "vision_width=32", "vision_layers=1", "vision_head_width=16", "text_width=32",
        "text_layers=1", "text_heads=2", "embed_dim=32", "eval_per_split=24", "eval_every=3", "save_every=2",
        "log_every=1", "num_threads=1"]


def run_stage(out, *extra) -> None:
    assert main(["train/configs/siglip.yaml", f"output_dir={out}", *TINY, *extra]) == 0


def test_siglip_stage_trains_resumes_exactly_and_exports_an_encoder(tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage(straight)
    run_stage(resumed, "stop_at=4")
    state = json.loads((resumed / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and not (resumed / "final").exists()
    run_stage(resumed)  # same command again: resumes at step 4
    a = load_file(straight / "final" / "open_clip_model.safetensors")
    b = load_file(resumed / "final" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    logs = [[r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]
            for d in (straight, resumed)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], abs=1e-5)

    final = straight / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    for split in ("heldout", "train"):
        for k in ("i2t", "t2i"):
            assert 0 <= metrics[split][f"{k}_top1"] <= 1 and 0 < metrics[split][f"{k}_chance"] < 1
    assert any("heldout_i2t_top1" in json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines())
    assert (final / "tokenizer" / "tokenizer.json").is_file()
    # the export loads as an understanding encoder, and equals open_clip's own loading of the folder
    enc = SiglipEncoder.from_pretrained(final)
    pixels = torch.rand(3, 3, 32, 32)
    feats = enc(pixels)
    assert feats.shape == (3, 16, 32) and (enc.num_tokens, enc.feature_dim, enc.image_size) == (16, 32, 32)
    torch.testing.assert_close(feats, SiglipEncoder.open_clip(final)(pixels), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def world_tokenizer():
    from hybrid.tokenizer import train_tokenizer

    world = ShapesWorld(32, 0)
    return world, train_tokenizer(world.corpus_texts(), 512)  # as the stage trains it


def test_siglip_stage_config_and_batches(world_tokenizer):
    from train.siglip_stage import DistinctCaptionPairs, load_config

    cfg = load_config("train/configs/siglip.yaml", ["steps=7", "lr=1e-4"])
    assert (cfg.steps, cfg.lr, cfg.output_dir, cfg.stage) == (7, 1e-4, "runs/siglip", "siglip")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config("train/configs/siglip.yaml", ["stepz=3"])
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        load_config(None, ["patch_size=5"])
    world, tok = world_tokenizer
    data = DistinctCaptionPairs(world, tok, batch_size=16, context_length=12)
    ids = torch.stack([data[i][1] for i in range(16, 32)])  # the second batch
    assert len({tuple(r.tolist()) for r in ids}) == 16  # distinct captions within a batch
    again = DistinctCaptionPairs(world, tok, batch_size=16, context_length=12)[20]
    assert torch.equal(again[0], data[20][0]) and torch.equal(again[1], data[20][1])  # a function of the index
    with pytest.raises(ValueError, match="more than context_length=4"):
        DistinctCaptionPairs(world, tok, batch_size=4, context_length=4)[0]


def test_zero_shot_retrieval_scores_an_oracle_and_its_chance_levels(world_tokenizer):
    """A stand-in CLIP that knows each image's caption scores 1.0, one that knows nothing less;
    the chance levels are those of the candidate sets."""
    from train.siglip_stage import SiglipTrainConfig, tokenize, zero_shot_retrieval

    world, tok = world_tokenizer
    cfg = SiglipTrainConfig(eval_per_split=24)
    examples = [world.caption_example(i, "heldout") for i in range(36)]
    captions = sorted({e.prompt for e in examples})
    ids = tokenize(tok, captions, cfg.context_length)

    class Oracle(nn.Module):
        def __init__(self, know: bool):
            super().__init__()
            self.know = know
            self.calls = 0

        def encode_image(self, pixels, normalize=True):  # images arrive in example order
            rows = torch.tensor([captions.index(e.prompt) for e in examples])
            return nn.functional.one_hot(rows, len(captions)).float() if self.know else torch.ones(len(pixels), 1)

        def encode_text(self, text, normalize=True):
            rows = torch.tensor([next(i for i, r in enumerate(ids) if torch.equal(r, t)) for t in text])
            return nn.functional.one_hot(rows, len(captions)).float() if self.know else torch.ones(len(text), 1)

    res = zero_shot_retrieval(Oracle(True), tok, examples, cfg, torch.device("cpu"))
    assert res["i2t_top1"] == 1.0 and res["t2i_top1"] == 1.0
    tags = {e.tag for e in examples}
    n_caps = {t: len({e.prompt for e in examples if e.tag == t}) for t in tags}
    assert res["i2t_chance"] == pytest.approx(sum(1 / n_caps[e.tag] for e in examples) / len(examples))
    assert {t: r["candidates"] for t, r in res["per_tag"].items()} == n_caps
    blind = zero_shot_retrieval(Oracle(False), tok, examples, cfg, torch.device("cpu"))
    assert blind["i2t_top1"] < res["i2t_top1"]
