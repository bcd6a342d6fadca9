"""hybrid_loss: each modality is scored on its own positions only, and a debug model overfits."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.latents import PixelCodec, patchify
from hybrid.losses import hybrid_loss
from hybrid.model import HybridModel
from hybrid.sequence import IGNORE, ImageSegment, SampleBuilder
from schedulers import get_scheduler

RED, BLUE = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
SAMPLES = [["a photo of a red circle", RED], ["Here is a picture.", BLUE, "And another one below it."]]


@pytest.fixture
def setup(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg)
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    batch = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)(SAMPLES)
    return model, batch


@pytest.mark.parametrize("sched", ["ddpm", "flow"])
def test_parts_match_manual_computation(setup, debug_cfg, sched):
    model, batch = setup
    scheduler = get_scheduler(sched)
    loss = hybrid_loss(model, batch, scheduler, PixelCodec(), debug_cfg.patch_size, 5.0,
                       generator=torch.Generator().manual_seed(0))
    # Recompute by hand with the same draws.
    g = torch.Generator().manual_seed(0)
    x0 = patchify(batch.gen_images * 2 - 1, debug_cfg.patch_size)
    t = scheduler.sample_timesteps(x0.shape[0], generator=g)
    noise = torch.randn(x0.shape, generator=g)
    out = model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_tokens=scheduler.add_noise(x0, noise, t),
                gen_index=batch.gen_index, gen_timesteps=t)
    text_mask = batch.targets != IGNORE
    ce = F.cross_entropy(out.logits[text_mask], batch.targets[text_mask])
    mse = F.mse_loss(out.image_pred, scheduler.training_target(x0, noise, t))
    torch.testing.assert_close(loss.text, ce)
    torch.testing.assert_close(loss.image, mse)
    torch.testing.assert_close(loss.total, ce + 5.0 * mse)
    assert loss.text_tokens == int(text_mask.sum()) and loss.image_tokens == batch.gen_index.numel()


def test_no_text_target_inside_an_image_span(setup):
    _, batch = setup
    in_span = batch.span_ids >= 0
    assert (batch.targets[in_span] == IGNORE).all()


def test_text_loss_ignores_images_and_image_loss_ignores_text(setup, debug_cfg):
    """Gradients are isolated: the text loss never reaches the image head, the image loss never
    reaches the LM head; and the text loss is unchanged when the image head changes."""
    model, batch = setup
    sched = get_scheduler("flow")
    kw = dict(scheduler=sched, codec=PixelCodec(), patch_size=debug_cfg.patch_size)
    loss = hybrid_loss(model, batch, generator=torch.Generator().manual_seed(1), **kw)
    g_img_out = torch.autograd.grad(loss.text, model.image_out.weight, retain_graph=True, allow_unused=True)[0]
    assert g_img_out is None or g_img_out.abs().max() == 0
    g_lm = torch.autograd.grad(loss.image, model.lm_head.weight, allow_unused=True)[0]
    assert g_lm is None or g_lm.abs().max() == 0
    with torch.no_grad():
        model.image_out.weight.add_(1.0)
        model.lm_head.weight.mul_(1.0)
    again = hybrid_loss(model, batch, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(again.text, loss.text)
    assert not torch.allclose(again.image, loss.image)


def test_text_only_and_image_only_batches(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg)
    sb = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)
    kw = dict(scheduler=get_scheduler("flow"), codec=PixelCodec(), patch_size=debug_cfg.patch_size)
    text_only = hybrid_loss(model, sb([["a photo of a red circle"]]), **kw)
    assert text_only.image == 0 and text_only.text > 0 and text_only.image_tokens == 0
    text_only.total.backward()


@pytest.mark.parametrize("sched", ["ddpm", "flow"])
def test_debug_model_overfits_one_batch(debug_cfg, tokenizer, sched):
    torch.manual_seed(0)
    model = HybridModel(debug_cfg)
    batch = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)(SAMPLES)
    scheduler = get_scheduler(sched)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kw = dict(scheduler=scheduler, codec=PixelCodec(), patch_size=debug_cfg.patch_size)
    history = []
    for _ in range(40):
        # Same timesteps and noise every step: a fixed regression problem to overfit.
        loss = hybrid_loss(model, batch, generator=torch.Generator().manual_seed(0), **kw)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        history.append((loss.text.item(), loss.image.item()))
    (t0, i0), (t1, i1) = history[0], history[-1]
    assert t1 < 0.2 * t0, f"text loss {t0:.3f} -> {t1:.3f}"
    assert i1 < 0.5 * i0, f"image loss {i0:.4f} -> {i1:.4f}"


@pytest.mark.parametrize("sched", ["ddpm", "flow"])
def test_a_model_cast_to_bf16_takes_fp32_inputs(setup, debug_cfg, tokenizer, sched):
    """DeepSpeed's bf16 casts the whole module to bf16 and does not autocast: the fp32 latents,
    timesteps and understanding features must meet bf16 weights (this crashed the shipped bf16
    DeepSpeed configs with 'mat1 and mat2 must have the same dtype'). The loss stays close to
    fp32's (bf16 rounding)."""
    model, batch = setup
    scheduler = get_scheduler(sched)
    und = torch.randn(2, debug_cfg.und_tokens, debug_cfg.und_feature_dim)  # fp32, as an fp32 encoder gives
    und_batch = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)(
        [[ImageSegment(RED, "und"), "what is it? a red square"]])
    for b, feats in ((batch, None), (und_batch, und[:1])):
        losses = []
        for m in (model, HybridModel(debug_cfg).to(torch.bfloat16)):
            if m is not model:
                m.load_state_dict(model.state_dict())
            losses.append(hybrid_loss(m, b, scheduler, PixelCodec(), debug_cfg.patch_size, 5.0, und_features=feats,
                                      generator=torch.Generator().manual_seed(0)))
        fp32, bf16 = losses
        assert bf16.total.dtype == torch.float32 and torch.isfinite(bf16.total)
        torch.testing.assert_close(bf16.total, fp32.total, rtol=5e-2, atol=0)


@pytest.mark.parametrize("head", ["diffusion", "ar"])
def test_a_text_only_batch_still_runs_every_head_on_nothing(debug_cfg, tokenizer, head):
    """A text-only batch uses neither the image head nor the understanding aligner. hybrid_loss
    runs them on nothing (0 images, empty understanding features), in their usual place, so every
    parameter gets a gradient (exactly 0 there): data-parallel ranks whose batches differ in
    modalities reduce the same gradients. The text loss is the plain forward's."""
    from hybrid.config import HybridConfig

    cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "image_head": head, "codebook_size": 16,
                                  **({} if head == "diffusion" else {"image_codec": "vq", "patch_size": 1})})
    model = HybridModel(cfg)
    batch = SampleBuilder(tokenizer, cfg, caption_dropout=0.0)([["a photo of a red circle"]])
    codec = PixelCodec() if head == "diffusion" else None
    empty_und = torch.zeros(0, cfg.und_tokens, cfg.und_feature_dim)
    loss = hybrid_loss(model, batch, get_scheduler("flow"), codec, cfg.patch_size, und_features=empty_und,
                       image_head=head)
    plain = model(batch.input_ids, batch.position_ids, batch.attention_mask())
    ce = F.cross_entropy(plain.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss.text, ce)
    assert loss.image.item() == 0.0
    loss.total.backward()
    missing = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert missing == [], missing
    heads = {n: p.grad for n, p in model.named_parameters() if n.startswith(("aligner", "image_", "gen_"))}
    assert heads and all(not g.any() for g in heads.values())  # their gradient is exactly 0
    # the control: the plain forward leaves them out of the graph
    model.zero_grad(set_to_none=True)
    ce.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in heads)
