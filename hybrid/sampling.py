"""Sampling with a KV cache: the token-decoding step, the denoising loop and the code-by-code
loop, each written out once. ``HybridPipeline`` (prompts, images, outputs) and the trainer's
sample previews both run these.

The prompt prefix runs once (``prefill``) into a ``KVCache``. Then

* text: one token per step, each committed to the cache;
* "diffusion" images: every denoising step runs only the N image tokens against the cached
  prefix and keeps nothing (``run_chunk(..., keep=False)``), so a step costs the same whatever
  the prompt length;
* "ar" images: one VQ code per step, committed, CFG on the logits.

Classifier-free guidance batches the conditional rows and the unconditional ones (caption
dropped: ``<bos><boi>``, exactly as caption dropout trained them) in one cache: rows
``[0, n)`` conditional, ``[n, 2n)`` unconditional, left-padded to a common length.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from encoders.latents import unpatchify
from hybrid.cache import CacheGroups, KVCache
from hybrid.config import HybridConfig
from hybrid.masks import cached_mask
from hybrid.model import HybridOutput
from hybrid.sequence import GEN, IGNORE, MultimodalBatch, SpecialIds, TokenizedSample, bidirectional_kinds, pack
from schedulers import Scheduler, get_scheduler

Generators = torch.Generator | list[torch.Generator] | None


def scheduler_for(cfg: HybridConfig) -> Scheduler:
    """The model's configured scheduler. DDPM clips its x0 estimate to [-1, 1] when the latents
    are bounded pixels: at the noisiest steps the cosine schedule divides by a small
    sqrt(alpha_bar) (0.06 at the default first step t=960), and bounded pixels make clipping an
    exact guard against an imperfect model's overshoot."""
    options = dict(cfg.scheduler_options or {})
    if cfg.scheduler == "ddpm":
        options.setdefault("clip_sample", cfg.image_codec == "pixel")
    return get_scheduler(cfg.scheduler, **options)


def image_prompt_rows(prompt_ids: list[list[int]], cfg: HybridConfig, with_uncond: bool) -> list[TokenizedSample]:
    """``<bos> prompt <boi> <img> x N`` per prompt, then the caption-free rows for CFG: the whole
    sequence a full-recompute sampler runs (the reference the cached loops are tested against)."""
    ids = SpecialIds.from_config(cfg)
    N = cfg.image_tokens
    rows = []
    prompts = prompt_ids + ([[]] * len(prompt_ids) if with_uncond else [])
    for p in prompts:
        toks = [ids.bos, *p, ids.boi] + [ids.img] * N
        start = len(toks) - N
        rows.append(TokenizedSample(toks, [IGNORE] * len(toks), [(start, N, GEN)], [torch.zeros(3, 1, 1)]))
    return rows


# --- token sampling -------------------------------------------------------------------------

def sample_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: Generators = None) -> Tensor:
    """(B, V) logits -> (B,) ids. temperature 0 is greedy. A list of generators draws row i
    from generator i, so a batch samples exactly what its rows would sample one by one."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # nucleus: keep the most likely tokens until their mass reaches top_p (at least one)
        sorted_logits, order = logits.sort(-1, descending=True)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = mass - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, list):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def guide(out: Tensor, n: int, guidance_scale: float) -> Tensor:
    """Classifier-free guidance over rows [cond (n); uncond (n)]; no-op when there is no uncond half."""
    if out.shape[0] == n:
        return out
    cond, uncond = out.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


# --- running chunks against the cache ---------------------------------------------------------

def run_chunk(model: nn.Module, cache: KVCache | CacheGroups, input_ids: Tensor, keep: bool,
              valid: Tensor | None = None, span_ids: Tensor | None = None, logits_last: bool = True,
              one_span: bool = False, **inputs) -> HybridOutput:
    """Run (B, n) new tokens after the cached ones. ``valid`` (B, n) False marks left padding;
    ``span_ids`` (B, n) >= 0 marks a bidirectional span inside the chunk; ``one_span`` says the
    whole chunk is one such span (a denoising step), which the caller knows: checking
    ``span_ids`` here would cost a device sync per step. ``inputs`` are the model's image
    arguments with indices relative to the chunk. ``keep`` commits the chunk. Text logits are
    computed at the chunk's last position only (``logits_last``), (B, V)."""
    B, n = input_ids.shape
    device = input_ids.device
    # Nothing to hide (no padding anywhere, and one token or one bidirectional span): no mask,
    # which lets SDPA take its unmasked kernel and spares building one per decoded token.
    open_chunk = valid is None and (n == 1 or one_span)
    masks = []
    if not open_chunk:
        valid = torch.ones(B, n, dtype=torch.bool, device=device) if valid is None else valid
        span_ids = torch.full((B, n), -1, dtype=torch.long, device=device) if span_ids is None else span_ids
        document_ids = torch.where(valid, 0, -1)
    for part, r in zip(cache.parts, cache.rows):
        if open_chunk and not part.padded:
            masks.append(None)
        elif open_chunk:  # a padded cache: hide its padding from every query of the chunk
            past = part.valid[:, None, None, :part.length].expand(-1, 1, n, -1)  # (b, 1, n, L)
            masks.append(torch.cat([past, past.new_ones(part.batch, 1, n, n)], -1))
        else:
            masks.append(cached_mask(part.valid[:, :part.length], document_ids[r], span_ids[r]))
    if valid is None:
        positions = cache.next_pos[:, None] + torch.arange(n, device=device)
        valid = torch.ones(B, n, dtype=torch.bool, device=device) if keep else None
    else:  # real tokens continue each row's positions; padding gets any position (it is masked)
        positions = cache.next_pos[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
    last = torch.arange(B, device=device) * n + n - 1
    out = model(input_ids, positions, masks if len(masks) > 1 else masks[0], cache=cache,
                logits_index=last if logits_last else last[:0], **inputs)
    if keep:
        cache.commit(valid)
    return out


def prefill(model: nn.Module, rows: Sequence[TokenizedSample], und_encoder: Callable[[Tensor], Tensor] | None = None,
            capacity: int = 0) -> tuple[KVCache, HybridOutput]:
    """Run prompts (one row each, left-padded to a common length) into a new cache. Input images
    (understanding spans) go through ``und_encoder``. Returns the cache and the output whose last
    position is every row's last prompt token."""
    cfg: HybridConfig = model.config
    device = next(model.parameters()).device
    T = max(len(r) for r in rows)
    if T > cfg.max_seq_len:
        raise ValueError(f"the prompt needs {T} tokens, more than max_seq_len={cfg.max_seq_len}")
    batch: MultimodalBatch = pack(list(rows), T, cfg.pad_id, packing=False, pad_left=True,
                                  bidirectional=bidirectional_kinds(cfg)).to(device)
    if batch.gen_index.numel():
        raise ValueError("a prompt cannot hold an image to be generated; pass input images as understanding images")
    inputs = {}
    if batch.und_index.numel():
        if und_encoder is None:
            raise ValueError("the prompt holds input images but no understanding encoder was given")
        # the chunk is the whole padded batch, so pack's flat indices are already chunk-relative
        inputs = dict(und_features=und_encoder(batch.und_images), und_index=batch.und_index)
    cache = KVCache.for_model(model, len(rows), capacity or T)
    out = run_chunk(model, cache, batch.input_ids, keep=True, valid=batch.document_ids >= 0,
                    span_ids=batch.span_ids, **inputs)
    return cache, out


# --- images -----------------------------------------------------------------------------------

def with_uncond_rows(model: nn.Module, cache: KVCache, last_hidden: Tensor, room: int) -> tuple[CacheGroups, Tensor]:
    """Add the unconditional branch to a cache of n conditional rows that end with ``<boi>``:
    n ``<bos><boi>`` rows, computed once (two tokens) and repeated, in a part of their own so
    they attend to two cached tokens, not to the prompt's length of padding. Returns the 2n-row
    group (rows [cond; uncond]) and the (2n, D) hidden states at ``<boi>``."""
    cfg: HybridConfig = model.config
    n = cache.batch
    uncond, out = prefill(model, [TokenizedSample([cfg.bos_id, cfg.boi_id], [IGNORE] * 2, [], [])], capacity=2 + room)
    return CacheGroups([cache, uncond.select([0] * n)]), torch.cat([last_hidden, out.hidden[:, -1].expand(n, -1)])


def image_prefix(model: nn.Module, rows: Sequence[TokenizedSample], use_cfg: bool,
                 und_encoder: Callable[[Tensor], Tensor] | None = None) -> tuple[KVCache | CacheGroups, Tensor]:
    """The cache an image is generated against: ``rows`` (each ending with ``<boi>``), then for
    CFG the unconditional rows. Returns the cache and the hidden states at ``<boi>`` (B, D)."""
    room = model.config.image_tokens + 1
    cache, out = prefill(model, rows, und_encoder, capacity=max(len(r) for r in rows) + room)
    if not use_cfg:
        return cache, out.hidden[:, -1]
    return with_uncond_rows(model, cache, out.hidden[:, -1], room)


@torch.no_grad()
def denoise(model: nn.Module, cache: KVCache | CacheGroups, n: int, scheduler: Scheduler, num_steps: int,
            guidance_scale: float, generator: Generators = None,
            callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
            start_step: int = 0, init: Tensor | None = None) -> Tensor:
    """The denoising loop against a cache whose rows end with ``<boi>`` (n rows, or 2n with the
    unconditional half). Returns clean patch tokens (n, N, P). ``callback(i, t, x_t, model_output)``
    sees every step's input and the raw (B, N, P) prediction of all rows. ``start_step`` and
    ``init`` (n, N, P) start the loop part-way, from a given sample at that step's timestep
    (``train.sample_eval --restoration``); by default it starts from the scheduler's noise."""
    cfg: HybridConfig = model.config
    B, N = cache.batch, cfg.image_tokens
    device = cache.device
    ids = torch.full((B, N), cfg.img_id, dtype=torch.long, device=device)
    span = torch.zeros(B, N, dtype=torch.long, device=device) if GEN in bidirectional_kinds(cfg) else None
    index = torch.arange(B * N, device=device).view(B, N)
    dtype = next(model.parameters()).dtype
    x = scheduler.init_noise((n, N, cfg.patch_dim), generator=generator, device=device) if init is None else init
    for i, t in enumerate(scheduler.set_timesteps(num_steps, device=device)):
        if i < start_step:
            continue
        xin = x if B == n else torch.cat([x, x])  # (B, N, P)
        tt = torch.full((B,), float(t), device=device)
        pred = run_chunk(model, cache, ids, keep=False, span_ids=span, logits_last=False, one_span=span is not None,
                         gen_tokens=xin.to(dtype), gen_index=index, gen_timesteps=tt).image_pred
        if callback is not None:
            callback(i, t, xin, pred)
        x = scheduler.step(guide(pred, n, guidance_scale), t, x, generator=generator)
    return x


@torch.no_grad()
def sample_codes(model: nn.Module, cache: KVCache | CacheGroups, boi_hidden: Tensor, n: int, guidance_scale: float,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: Generators = None,
                 callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Janus-style generation against a cache whose rows end with ``<boi>``: VQ codes one at a
    time in raster order, CFG on the logits; both halves get the same code. Codes 0..N-2 are
    committed (each is needed for the next); the caller commits the last with the image.
    ``boi_hidden`` (B, D) is the final hidden state at ``<boi>``. Returns codes (n, N)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for code sampling, got {temperature}")
    cfg: HybridConfig = model.config
    B, N = cache.batch, cfg.image_tokens
    device = cache.device
    ids = torch.full((B, 1), cfg.img_id, dtype=torch.long, device=device)
    index = torch.arange(B, device=device)[:, None]
    codes = torch.zeros(n, N, dtype=torch.long, device=device)
    hidden = boi_hidden
    for i in range(N):
        logits = model.next_code_logits(hidden).float()  # (B, K)
        if callback is not None:
            callback(i, logits)
        codes[:, i] = sample_token(guide(logits, n, guidance_scale), temperature, top_k, top_p, generator)
        if i < N - 1:
            both = codes[:, i:i + 1].repeat(B // n, 1)  # (B, 1)
            hidden = run_chunk(model, cache, ids, keep=True, logits_last=False,
                               gen_codes=both, gen_index=index).hidden[:, -1]
    return codes


def commit_image(model: nn.Module, cache: KVCache, tokens: Tensor | None = None, codes: Tensor | None = None) -> HybridOutput:
    """Append a finished image and its ``<eoi>`` to the cache, so the text after it reads the
    image: clean patch tokens (B, N, P) at timestep 0 for the diffusion head, or the codes the
    cache does not hold yet (B, k) for the "ar" head (``sample_codes`` left the last one out).
    Returns the output whose logits (B, V) are at ``<eoi>``: the first token after the image."""
    cfg: HybridConfig = model.config
    device = cache.device
    B = cache.batch
    k = tokens.shape[1] if tokens is not None else codes.shape[1]
    ids = torch.full((B, k + 1), cfg.img_id, dtype=torch.long, device=device)
    ids[:, -1] = cfg.eoi_id
    index = torch.arange(B, device=device)[:, None] * (k + 1) + torch.arange(k, device=device)  # (B, k)
    if tokens is not None:
        span = torch.full((B, k + 1), -1, dtype=torch.long, device=device)
        if GEN in bidirectional_kinds(cfg):
            span[:, :k] = 0
        t0 = torch.zeros(B, device=device)
        return run_chunk(model, cache, ids, keep=True, span_ids=span, gen_tokens=tokens.to(next(model.parameters()).dtype),
                         gen_index=index, gen_timesteps=t0)
    return run_chunk(model, cache, ids, keep=True, gen_codes=codes, gen_index=index)


def decode_image(model: nn.Module, codec: nn.Module, tokens: Tensor | None = None, codes: Tensor | None = None) -> Tensor:
    """Patch tokens (n, N, P) or codes (n, N) -> pixels (n, 3, H, W) in [0, 1]."""
    cfg: HybridConfig = model.config
    if codes is not None:
        side = cfg.image_size // cfg.latent_downsample
        return codec.decode(codes.view(-1, side, side))
    return codec.decode(unpatchify(tokens.float(), cfg.patch_size, cfg.latent_channels))  # (n, C, h, w) -> pixels


def prompt_prefix_rows(prompt_ids: list[list[int]], cfg: HybridConfig, with_uncond: bool) -> list[TokenizedSample]:
    """``<bos> prompt <boi>`` per prompt (then ``<bos><boi>`` per prompt for CFG): what the
    cache holds before the image tokens."""
    N = cfg.image_tokens
    return [TokenizedSample(r.input_ids[:-N], r.targets[:-N], [], []) for r in image_prompt_rows(prompt_ids, cfg, with_uncond)]


@torch.no_grad()
def generate_images(
    model: nn.Module,
    prompt_ids: list[list[int]],
    scheduler,
    codec: nn.Module,
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    generator: Generators = None,
    attn_impl: str = "sdpa",
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """Generate one image per prompt (token ids, no specials). Returns pixels (n, 3, H, W) in [0, 1].

    ``num_steps`` and ``scheduler`` drive the "diffusion" head; ``temperature`` and ``top_k``
    the "ar" head's code sampling (which takes one step per image token). Cached steps run SDPA
    with a dense mask whatever ``attn_impl`` says: a chunk's queries are few and the mask small."""
    cfg: HybridConfig = model.config
    n = len(prompt_ids)
    use_cfg = guidance_scale != 1.0
    rows = prompt_prefix_rows(prompt_ids, cfg, with_uncond=False)
    need = max(len(r) for r in rows) + cfg.image_tokens
    if need > cfg.max_seq_len:
        raise ValueError(f"prompt + image need {need} tokens, more than max_seq_len={cfg.max_seq_len}")
    cache, boi_hidden = image_prefix(model, rows, use_cfg)
    if cfg.image_head != "diffusion":  # "ar" / "tokens": one code per image token
        codes = sample_codes(model, cache, boi_hidden, n, guidance_scale, temperature, top_k, None, generator)
        return decode_image(model, codec, codes=codes)
    x = denoise(model, cache, n, scheduler, num_steps, guidance_scale, generator)
    return decode_image(model, codec, tokens=x)
