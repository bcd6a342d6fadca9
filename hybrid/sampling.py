"""Sampling images from the hybrid model: the denoising loop and the code-by-code loop, each
written out once.

These are the straightforward, full-recompute loops: every denoising step (``image_head=
"diffusion"``) or every code (``"ar"``) runs the whole ``<bos> prompt <boi> [N image tokens]``
sequence. Conditional and unconditional (caption dropped, exactly as trained by caption dropout)
rows are batched together for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from encoders.latents import unpatchify
from hybrid.config import HybridConfig
from hybrid.sequence import GEN, IGNORE, SpecialIds, TokenizedSample, bidirectional_kinds, pack
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
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """Generate one image per prompt (token ids, no specials). Returns pixels (n, 3, H, W) in [0, 1].

    ``num_steps`` and ``scheduler`` drive the "diffusion" head; ``temperature`` and ``top_k``
    the "ar" head's code sampling (which takes one step per image token)."""
    cfg: HybridConfig = model.config
    device = next(model.parameters()).device
    n = len(prompt_ids)
    use_cfg = guidance_scale != 1.0
    rows = image_prompt_rows(prompt_ids, cfg, with_uncond=use_cfg)
    seq_len = max(len(r) for r in rows)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"prompt + image need {seq_len} tokens, more than max_seq_len={cfg.max_seq_len}")
    # one right-padded row each
    batch = pack(rows, seq_len, cfg.pad_id, packing=False, bidirectional=bidirectional_kinds(cfg)).to(device)
    mask = batch.attention_mask(attn_impl)
    no_text = torch.zeros(0, dtype=torch.long, device=device)
    if cfg.image_head == "ar":
        return _sample_codes(model, batch, mask, n, codec, guidance_scale, temperature, top_k, generator)

    shape = (n, cfg.image_tokens, cfg.patch_dim)
    x = scheduler.init_noise(shape, generator=generator, device=device, dtype=torch.float32)  # (n, N, P)
    for t in scheduler.set_timesteps(num_steps, device=device):
        xin = torch.cat([x, x]) if use_cfg else x
        tt = torch.full((xin.shape[0],), float(t), device=device)
        pred = model(batch.input_ids, batch.position_ids, mask, gen_tokens=xin, gen_index=batch.gen_index,
                     gen_timesteps=tt, logits_index=no_text).image_pred
        if use_cfg:
            cond, uncond = pred.float().chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred.float(), t, x, generator=generator)
    latents = unpatchify(x, cfg.patch_size, cfg.latent_channels)  # (n, C, h, w)
    return codec.decode(latents)


def _sample_codes(model: nn.Module, batch, mask, n: int, codec: nn.Module, guidance_scale: float,
                  temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Janus-style generation: VQ codes one at a time in raster order, CFG on the logits."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, N = batch.gen_index.shape
    device = batch.input_ids.device
    codes = torch.zeros(rows, N, dtype=torch.long, device=device)  # unsampled codes are never seen
    no_text = torch.zeros(0, dtype=torch.long, device=device)
    for i in range(N):
        logits = model(batch.input_ids, batch.position_ids, mask, gen_index=batch.gen_index,
                       gen_codes=codes, logits_index=no_text).code_logits[:, i].float()  # (rows, K)
        if rows > n:  # cond rows first, then uncond
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (n,)
        codes[:, i] = nxt.repeat(rows // n)
    side = int(round(N**0.5))
    return codec.decode(codes[:n].view(n, side, side))  # (n, 3, H, W)
