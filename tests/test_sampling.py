"""The image sampling loop: shapes, seeding, CFG batching, and DDPM's x0 clipping."""

import pytest
import torch

from encoders.latents import PixelCodec
from hybrid.model import HybridModel
from hybrid.sampling import generate_images, scheduler_for
from schedulers import get_scheduler


def prompts(tokenizer):
    return [tokenizer.encode(p, add_special_tokens=False) for p in ["a photo of a red circle", "a photo of two blue squares"]]


@pytest.mark.parametrize("sched", ["ddpm", "flow"])
def test_shapes_and_seed_reproducibility(debug_cfg, tokenizer, sched):
    debug_cfg.scheduler = sched
    model = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    run = lambda seed: generate_images(model, prompts(tokenizer), scheduler_for(debug_cfg), PixelCodec(), 4, 3.0,
                                       generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, debug_cfg.image_size, debug_cfg.image_size)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_ddpm_clips_x0_for_pixel_latents(debug_cfg):
    """A model that under-predicts eps (what an MSE-trained, undertrained model does) makes the
    x0 estimate x_t / sqrt(abar) overshoot, ~140x at t=999. Clipped to the pixel range, the chain
    still lands near the data; unclipped from t=999, it ends far off and out of range (the
    control); from the default first step (t=960) it lands near the data unclipped too."""
    debug_cfg.scheduler = "ddpm"
    assert scheduler_for(debug_cfg).to_dict()["clip_sample"] is True
    debug_cfg.scheduler = "flow"
    assert "clip_sample" not in scheduler_for(debug_cfg).to_dict()

    def final_error(scheduler) -> tuple[float, float]:
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(4, 16, 48, generator=g) * 2 - 1  # pixel latents in [-1, 1]
        x = scheduler.init_noise(x0.shape, generator=g)
        for t in scheduler.set_timesteps(25):
            tt = torch.full((4,), float(t))
            mean = scheduler.add_noise(x0, torch.zeros_like(x0), tt)  # sqrt(abar) x0
            scale = scheduler.add_noise(x0, torch.ones_like(x0), tt) - mean  # sqrt(1 - abar)
            eps = 0.8 * (x - mean) / scale  # the true eps, shrunk by 20%
            x = scheduler.step(eps, t, x, generator=g)
        return (x - x0).abs().mean().item(), x.abs().max().item()

    err, peak = final_error(get_scheduler("ddpm", clip_sample=True))
    assert err < 0.05 and peak <= 1.0 + 1e-6
    # the control: unclipped from t=999 ("trailing"), where the overshoot is largest
    err, peak = final_error(get_scheduler("ddpm", clip_sample=False, timestep_spacing="trailing"))
    assert err > 0.1 and peak > 1.2
    # the default spacing starts at t=960, where even the unclipped chain lands near the data
    err, _ = final_error(get_scheduler("ddpm", clip_sample=False))
    assert err < 0.05


def test_guidance_scale_one_runs_only_conditional_rows(debug_cfg, tokenizer):
    """guidance 1 needs no unconditional branch; the result equals CFG's formula at scale 1."""
    model = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    g = lambda: torch.Generator().manual_seed(0)
    one = generate_images(model, prompts(tokenizer), scheduler_for(debug_cfg), PixelCodec(), 3, 1.0, generator=g())
    near_one = generate_images(model, prompts(tokenizer), scheduler_for(debug_cfg), PixelCodec(), 3, 1.0 + 1e-6, generator=g())
    torch.testing.assert_close(one, near_one, atol=1e-4, rtol=0)


def test_too_long_prompt_is_a_clear_error(debug_cfg, tokenizer):
    model = HybridModel(debug_cfg).eval()
    long = [[7] * debug_cfg.max_seq_len]
    with pytest.raises(ValueError, match="more than max_seq_len"):
        generate_images(model, long, scheduler_for(debug_cfg), PixelCodec(), 2)


@pytest.mark.parametrize("lengths", [(7, 7), (4, 9)])  # an unpadded cache, a left-padded one
def test_one_span_chunk_without_a_mask_equals_the_masked_chunk(debug_cfg, tokenizer, lengths):
    """A denoising step's chunk is one bidirectional span: run_chunk(one_span=True) skips the
    mask (SDPA's unmasked kernel, or only the cache's padding hidden) and must give what the
    explicit span mask gives."""
    from hybrid.sampling import prefill, prompt_prefix_rows, run_chunk

    torch.manual_seed(0)
    model = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(model.image_out.weight, std=0.1)  # zero-initialised: every prediction would be 0
    ids = [[5 + i for i in range(n)] for n in lengths]
    rows = prompt_prefix_rows(ids, debug_cfg, with_uncond=False)
    N, B = debug_cfg.image_tokens, len(rows)
    x = torch.randn(B, N, debug_cfg.patch_dim)
    preds = []
    with torch.no_grad():
        for one_span in (True, False):
            cache, _ = prefill(model, rows)
            assert cache.padded == (lengths[0] != lengths[1])
            preds.append(run_chunk(model, cache, torch.full((B, N), debug_cfg.img_id), keep=False,
                                   span_ids=torch.zeros(B, N, dtype=torch.long), logits_last=False,
                                   one_span=one_span, gen_tokens=x, gen_index=torch.arange(B * N).view(B, N),
                                   gen_timesteps=torch.full((B,), 500.0)).image_pred)
    assert preds[1].abs().max() > 0.1
    torch.testing.assert_close(preds[0], preds[1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_denoise_started_part_way_continues_the_full_loop(debug_cfg, tokenizer):
    """denoise(start_step=k, init=x_k) (sample_eval --restoration) gives what the full loop gives
    from its own step-k sample (rectified flow's Euler steps are deterministic); and a scheduler's
    options in the config (SD3's shift) reach the scheduler the model is sampled with."""
    from hybrid.config import HybridConfig
    from hybrid.sampling import denoise, image_prefix, prompt_prefix_rows

    cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "scheduler_options": {"shift": 3.0}})
    sched = scheduler_for(cfg)
    assert sched.to_dict()["shift"] == 3.0
    model = HybridModel(cfg).eval()
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    rows = prompt_prefix_rows(prompts(tokenizer), cfg, with_uncond=False)
    seen = {}
    cache, _ = image_prefix(model, rows, True)
    full = denoise(model, cache, 2, sched, 6, 2.0, torch.Generator().manual_seed(0),
                   callback=lambda i, t, x, pred: seen.setdefault(i, x[:2].clone()))
    cache, _ = image_prefix(model, rows, True)
    part = denoise(model, cache, 2, sched, 6, 2.0, None, start_step=3, init=seen[3])
    torch.testing.assert_close(part, full)
    with pytest.raises(ValueError, match="scheduler_options"):
        HybridConfig.from_dict({**debug_cfg.to_dict(), "scheduler_options": 3.0})
