"""HybridModel: shapes, presets, attention paths, packing invariance, save/load."""

import time

import pytest
import torch
from PIL import Image

from hybrid.checkpoint import load_pretrained_model, save_pretrained_model
from hybrid.config import PRESETS, HybridConfig
from hybrid.model import HybridModel
from hybrid.sequence import SampleBuilder, pack


def batch_for(cfg, tokenizer, samples, **kw):
    sb = SampleBuilder(tokenizer, cfg, caption_dropout=0.0)
    return pack([sb.tokenize(s) for s in samples], cfg.max_seq_len, cfg.pad_id, **kw)


def run(model, batch, x, t, impl="sdpa", und=None):
    return model(batch.input_ids, batch.position_ids, batch.attention_mask(impl), gen_tokens=x,
                 gen_index=batch.gen_index, gen_timesteps=t, und_features=und,
                 und_index=batch.und_index if und is not None else None)


SAMPLES = [["a photo of a red circle", Image.new("RGB", (32, 32), (255, 0, 0))],
           ["Here is a picture.", Image.new("RGB", (32, 32), (0, 0, 255)), "And another one below it."]]


def test_forward_shapes_and_debug_speed(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg).eval()
    batch = batch_for(debug_cfg, tokenizer, SAMPLES)
    n, N, P = batch.gen_index.shape[0], debug_cfg.image_tokens, debug_cfg.patch_dim
    x, t = torch.randn(n, N, P), torch.tensor([10.0, 700.0])
    start = time.perf_counter()
    with torch.no_grad():
        out = run(model, batch, x, t)
    assert time.perf_counter() - start < 1.0, "the debug preset must forward in well under a second"
    assert out.logits.shape == (*batch.input_ids.shape, debug_cfg.vocab_size)
    assert out.image_pred.shape == (n, N, P)
    assert torch.isfinite(out.logits).all()


def test_packed_equals_alone(debug_cfg, tokenizer):
    """Document masking + per-document positions: a sample packed behind another gives the same
    outputs as the sample alone in its row."""
    model = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(model.image_out.weight, std=0.02)  # non-zero head so image_pred is informative
    packed = batch_for(debug_cfg, tokenizer, [SAMPLES[1], SAMPLES[0]])
    alone = batch_for(debug_cfg, tokenizer, [SAMPLES[0]])
    assert packed.input_ids.shape[0] == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, debug_cfg.image_tokens, debug_cfg.patch_dim, generator=g)
    t = torch.tensor([300.0, 40.0])
    with torch.no_grad():
        p = run(model, packed, x, t)
        a = run(model, alone, x[1:], t[1:])
    L = (alone.document_ids[0] >= 0).sum().item()
    off = (packed.document_ids[0] == 0).sum().item()
    torch.testing.assert_close(p.logits[0, off : off + L], a.logits[0, :L], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.image_pred[1], a.image_pred[0], atol=1e-5, rtol=1e-5)


def test_image_tokens_are_bidirectional_text_is_causal(debug_cfg, tokenizer):
    """Changing the last patch of an image changes the predictions of earlier patches of the
    same image (bidirectional), but never the text logits before the image (causal)."""
    model = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    batch = batch_for(debug_cfg, tokenizer, [SAMPLES[0]])
    x = torch.randn(1, debug_cfg.image_tokens, debug_cfg.patch_dim)
    x2 = x.clone()
    x2[0, -1] += 1.0
    t = torch.tensor([500.0])
    with torch.no_grad():
        a, b = run(model, batch, x, t), run(model, batch, x2, t)
    boi = batch.gen_index[0, 0].item() - 1
    assert not torch.allclose(a.image_pred[0, 0], b.image_pred[0, 0])
    torch.testing.assert_close(a.logits[0, : boi + 1], b.logits[0, : boi + 1])


def test_flex_equals_sdpa_model_forward(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg).eval()
    batch = batch_for(debug_cfg, tokenizer, SAMPLES + SAMPLES)
    n = batch.gen_index.shape[0]
    x, t = torch.randn(n, debug_cfg.image_tokens, debug_cfg.patch_dim), torch.rand(n) * 1000
    with torch.no_grad():
        a, b = run(model, batch, x, t, "sdpa"), run(model, batch, x, t, "flex")
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.image_pred, b.image_pred, atol=1e-5, rtol=1e-5)


def test_understanding_features_go_through_the_aligner(debug_cfg, tokenizer):
    from hybrid.sequence import ImageSegment

    model = HybridModel(debug_cfg).eval()
    sb = SampleBuilder(tokenizer, debug_cfg)
    batch = pack([sb.tokenize([ImageSegment(Image.new("RGB", (32, 32)), "und"), "a photo of a red circle"])],
                 debug_cfg.max_seq_len, debug_cfg.pad_id)
    f = torch.randn(1, debug_cfg.und_tokens, debug_cfg.und_feature_dim)
    with torch.no_grad():
        a = run(model, batch, None, None, und=f)
        b = run(model, batch, None, None, und=f + 1)
    end = batch.und_index[0, -1].item()
    assert not torch.allclose(a.logits[0, end + 2], b.logits[0, end + 2]), "text after the image reads it"
    with pytest.raises(ValueError, match="und_index"):
        model(batch.input_ids, batch.position_ids, batch.attention_mask(), und_features=f)


def test_presets_and_base_size():
    assert {"debug", "tiny", "base"} <= set(PRESETS)
    with torch.device("meta"):
        base = HybridModel(HybridConfig.from_preset("base"))
    n = base.num_parameters()
    assert 1.0e9 < n < 2.0e9, f"base preset should be ~1-2B parameters like Janus-Pro-1B, got {n / 1e9:.2f}B"


def test_config_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        HybridConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        HybridConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown HybridConfig keys"):
        HybridConfig.from_dict({"dimension": 3})
    cfg = HybridConfig.from_preset("debug")
    cfg.save(tmp_path / "config.json")
    assert HybridConfig.load(tmp_path / "config.json") == cfg


def test_max_seq_len_is_enforced(debug_cfg):
    model = HybridModel(debug_cfg)
    T = debug_cfg.max_seq_len + 1
    ids = torch.zeros(1, T, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(ids, torch.arange(T)[None], torch.ones(1, 1, T, T, dtype=torch.bool))


def test_save_load_round_trip(debug_cfg, tokenizer, tmp_path):
    model = HybridModel(debug_cfg).eval()
    save_pretrained_model(model, tmp_path / "m")
    loaded = load_pretrained_model(tmp_path / "m").eval()
    batch = batch_for(debug_cfg, tokenizer, SAMPLES)
    x, t = torch.randn(2, debug_cfg.image_tokens, debug_cfg.patch_dim), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        assert torch.equal(run(model, batch, x, t).logits, run(loaded, batch, x, t).logits)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "m" / "model.safetensors").unlink()
        load_pretrained_model(tmp_path / "m")


def test_adaln_starts_as_the_add_model_and_modulates_only_image_tokens(debug_cfg, tokenizer):
    """adaLN-Zero: at initialisation the model computes exactly what time_conditioning="add" does;
    once its modulations are non-zero the image predictions change and the text logits of a
    caption before the image do not (text tokens are never modulated)."""
    torch.manual_seed(0)
    add = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(add.image_out.weight, std=0.02)
    cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "time_conditioning": "adaln"})
    ada = HybridModel(cfg).eval()
    missing, unexpected = ada.load_state_dict(add.state_dict(), strict=False)
    assert not unexpected and missing and all("ada" in k for k in missing)
    batch = batch_for(debug_cfg, tokenizer, SAMPLES)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, debug_cfg.image_tokens, debug_cfg.patch_dim, generator=g), torch.tensor([900.0, 50.0])
    with torch.no_grad():
        a, b = run(add, batch, x, t), run(ada, batch, x, t)
        torch.testing.assert_close(b.image_pred, a.image_pred)
        torch.testing.assert_close(b.logits, a.logits)
        for m in [ada.final_ada, *(blk.ada for blk in ada.layers)]:
            torch.nn.init.normal_(m.weight, std=0.05, generator=g)
        c = run(ada, batch, x, t)
    assert (c.image_pred - a.image_pred).abs().max() > 1e-3
    first_image = int(batch.gen_index.min())  # positions before the first image: text only
    torch.testing.assert_close(c.logits.view(-1, c.logits.shape[-1])[:first_image],
                               a.logits.view(-1, a.logits.shape[-1])[:first_image])
    with pytest.raises(ValueError, match="time_conditioning"):
        HybridConfig.from_dict({**debug_cfg.to_dict(), "time_conditioning": "film"})


def test_pooled_text_condition_reads_the_images_own_text(debug_cfg, tokenizer):
    """pooled_text_conditioning: an image's prediction depends on the text before it (its caption
    or document text), not on text of another sample in the packed row; a batch with no generated
    image runs the head on nothing."""
    cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "time_conditioning": "adaln", "pooled_text_conditioning": True})
    torch.manual_seed(0)
    model = HybridModel(cfg).eval()
    for p in model.parameters():  # zero-initialised heads and adaLN: make them count
        if p.dim() >= 2 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, cfg.image_tokens, cfg.patch_dim, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        a = run(model, batch_for(cfg, tokenizer, [["a photo of a red circle", red]]), x, t).image_pred
        b = run(model, batch_for(cfg, tokenizer, [["a photo of two blue squares", red]]), x, t).image_pred
        packed = batch_for(cfg, tokenizer, [["Here is a picture.", blue], ["a photo of a red circle", red]])
        c = run(model, packed, torch.cat([x, x]), torch.cat([t, t])).image_pred
        pooled = model.pooled_text(packed.input_ids, packed.gen_index, None)
        empty = model.pooled_text(packed.input_ids, packed.gen_index[:0], None)
    assert (a - b).abs().max() > 1e-3  # another caption, another prediction
    torch.testing.assert_close(c[1], a[0], atol=1e-5, rtol=1e-5)  # packed behind another sample: the same
    own = model.embed_tokens(torch.tensor(tokenizer.encode("a photo of a red circle", add_special_tokens=False)))
    torch.testing.assert_close(pooled[1], own.mean(0))
    assert empty.shape == (0, cfg.dim)
