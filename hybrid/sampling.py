"""Sampling images from the hybrid model: the denoising loop, written out once.

This is the straightforward, full-recompute loop: every denoising step runs the whole
``<bos> prompt <boi> [N noisy patches]`` sequence. Conditional and unconditional (caption
dropped, exactly as trained by caption dropout) rows are batched together for
classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from encoders.latents import unpatchify
from hybrid.config import HybridConfig
from hybrid.sequence import GEN, IGNORE, SpecialIds, TokenizedSample, pack
from schedulers import Scheduler, get_scheduler


def scheduler_for(cfg: HybridConfig) -> Scheduler:
    """The model's configured scheduler. DDPM clips its x0 estimate to [-1, 1] when the latents
    are bounded pixels: at t=999 the cosine schedule divides by sqrt(alpha_bar) ~ 0.007, and an
    unclipped estimate from an imperfect model blows the sampling chain up to saturated noise."""
    if cfg.scheduler == "ddpm":
        return get_scheduler("ddpm", clip_sample=cfg.image_codec == "pixel")
    return get_scheduler(cfg.scheduler)


def image_prompt_rows(prompt_ids: list[list[int]], cfg: HybridConfig, with_uncond: bool) -> list[TokenizedSample]:
    """``<bos> prompt <boi> <img> x N`` per prompt, then the caption-free rows for CFG."""
    ids = SpecialIds.from_config(cfg)
    N = cfg.image_tokens
    rows = []
    prompts = prompt_ids + ([[]] * len(prompt_ids) if with_uncond else [])
    for p in prompts:
        toks = [ids.bos, *p, ids.boi] + [ids.img] * N
        start = len(toks) - N
        rows.append(TokenizedSample(toks, [IGNORE] * len(toks), [(start, N, GEN)], [torch.zeros(3, 1, 1)]))
    return rows


@torch.no_grad()
def generate_images(
    model: nn.Module,
    prompt_ids: list[list[int]],
    scheduler,
    codec: nn.Module,
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    generator: torch.Generator | None = None,
    attn_impl: str = "sdpa",
) -> Tensor:
    """Generate one image per prompt (token ids, no specials). Returns pixels (n, 3, H, W) in [0, 1]."""
    cfg: HybridConfig = model.config
    device = next(model.parameters()).device
    n = len(prompt_ids)
    use_cfg = guidance_scale != 1.0
    rows = image_prompt_rows(prompt_ids, cfg, with_uncond=use_cfg)
    seq_len = max(len(r) for r in rows)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"prompt + image need {seq_len} tokens, more than max_seq_len={cfg.max_seq_len}")
    batch = pack(rows, seq_len, cfg.pad_id, packing=False).to(device)  # one right-padded row each
    mask = batch.attention_mask(attn_impl)

    shape = (n, cfg.image_tokens, cfg.patch_dim)
    x = scheduler.init_noise(shape, generator=generator, device=device, dtype=torch.float32)  # (n, N, P)
    for t in scheduler.set_timesteps(num_steps, device=device):
        xin = torch.cat([x, x]) if use_cfg else x
        tt = torch.full((xin.shape[0],), float(t), device=device)
        pred = model(batch.input_ids, batch.position_ids, mask, gen_tokens=xin, gen_index=batch.gen_index,
                     gen_timesteps=tt, logits_index=torch.zeros(0, dtype=torch.long, device=device)).image_pred
        if use_cfg:
            cond, uncond = pred.float().chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred.float(), t, x, generator=generator)
    latents = unpatchify(x, cfg.patch_size, cfg.latent_channels)  # (n, C, h, w)
    return codec.decode(latents)
