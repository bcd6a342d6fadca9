"""HybridModel: one Llama-style transformer that reads and writes text and image patches.

Inputs are a packed token row plus the image spans spliced into it:

* text positions are embedded from ``input_ids``;
* generated-image positions get, with ``image_head="diffusion"``, ``image_in(noisy patch) +
  timestep embedding`` (Transfusion), or with ``image_head="ar"``, ``gen_aligner(gen_embed(code))``
  for VQ code ids (Janus);
* understanding-image positions get ``aligner(encoder features)`` (Janus' decoupled path);
* with ``image_head="tokens"`` (Chameleon) images of both roles are VQ codes embedded as the last
  ``codebook_size`` rows of the shared vocabulary, and the LM head predicts them.

Research variants, each one config field: sparse MoE feed-forwards (``moe_*``, ``hybrid/moe.py``),
late fusion (``late_fusion_layers``: a vision transformer per image span before the decoder),
iRoPE (``nope_every``: layers without rotary embeddings, Llama 4's attention temperature).

Outputs are predictions only: text logits and, for generated-image positions, the diffusion
head's prediction (epsilon or velocity, as the scheduler defines) or the code head's logits for
each image token, read one position earlier (next-token prediction in raster order). Losses live
in ``losses.py``, sampling in ``sampling.py``; this file stays single-device and loss-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from hybrid.cache import CacheGroups, KVCache
from hybrid.config import HybridConfig
from hybrid.masks import AttentionMask
from hybrid.moe import IMAGE, PAD, TEXT, MoEFeedForward, RouterOutput

_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    # Eager flex attention is a slow reference; compile once on GPU where it is the fast path.
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


class RMSNorm(nn.Module):
    """Llama's RMSNorm as Hugging Face computes it (in fp32, then back to the input dtype), so
    converted bf16 checkpoints normalise as they were trained. Same parameter name as nn.RMSNorm;
    in fp32 it gives the same values, with fewer kernel calls on the CPU."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1). ``sin``
    comes sign-folded, (-sin, sin), so rotate_half is one roll (fewer kernels; the same values)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def scaled_inv_freq(head_dim: int, theta: float, scaling: dict) -> Tensor:
    """Inverse frequencies of a scaled RoPE (Llama 3.1's "llama3", "linear"), computed by
    transformers' own init function so converted checkpoints rotate exactly as they were trained."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                     rope_parameters={**scaling, "rope_theta": theta})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, device=torch.device("cpu"))
    if attention_factor != 1.0:
        raise ValueError(f"rope_type {scaling['rope_type']!r} scales attention by {attention_factor}; not supported")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """RoPE with the Llama / Hugging Face (rotate-half) layout, driven by explicit position ids
    so positions restart at 0 for every packed document."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        if scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        else:
            inv_freq = scaled_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # model.to(bfloat16) must not round the frequencies: bf16 angles drift by radians at long
        # positions (Hugging Face keeps them fp32 too). Follow device moves, keep fp32.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos and sign-folded sin (see ``apply_rope``), each (B, 1, T, hd)."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        sin = freqs.sin()
        cos = torch.cat((freqs, freqs), dim=-1).cos()  # (B, T, hd)
        return cos.to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def attn_temperature(position_ids: Tensor, floor_scale: float, scale: float) -> Tensor:
    """Llama 4's query scale for layers without RoPE: 1 + scale * log(1 + floor((pos + 1) /
    floor_scale)), (B, T). Exactly 1 below floor_scale; beyond it, logits sharpen slowly with
    position so attention does not flatten out over very long contexts."""
    return 1.0 + scale * torch.log1p(torch.floor((position_ids.float() + 1.0) / floor_scale))


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, bias: bool, eps: float,
                 use_rope: bool = True, temperature: tuple[float, float] | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        # iRoPE: a NoPE layer (use_rope=False) sees content only; ``temperature`` = (floor_scale,
        # scale) turns on Llama 4's position-dependent query scaling in such a layer.
        self.use_rope, self.temperature = use_rope, temperature
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # QK-norm (Chameleon, OLMo-2, Qwen3): normalise each head's queries and keys so attention
        # logits cannot drift upwards when text and image tokens compete in one softmax.
        self.q_norm = RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask | list,
                cache: KVCache | CacheGroups | None = None, layer: int = 0,
                position_ids: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        elif self.temperature is not None:
            q = q * attn_temperature(position_ids, *self.temperature)[:, None, :, None].to(q.dtype)
        if cache is None:
            out = self.attend(q, k, v, mask)
        else:  # each part of the cache: its rows attend to its cached prefix too, (b, Hkv, L + T, hd)
            masks = mask if isinstance(mask, list) else [mask]
            out = torch.cat([self.attend(q[r], *part.write(layer, k[r], v[r]), m)
                             for part, r, m in zip(cache.parts, cache.rows, masks)])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """(B, H, T, hd) queries against (B, Hkv, S, hd) keys / values -> (B, H, T, hd)."""
        if isinstance(mask, BlockMask):
            return _flex(q, k, v, mask)
        if self.n_kv_heads != self.n_heads:  # SDPA's fused CPU kernels want equal head counts
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FeedForward(nn.Module):
    """SwiGLU MLP (Llama)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: HybridConfig, use_rope: bool = True, moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        temperature = (cfg.attn_floor_scale, cfg.attn_scale) if cfg.attn_temperature_tuning else None
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, cfg.attn_bias, cfg.norm_eps,
                              use_rope=use_rope, temperature=temperature)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if moe:
            self.ffn = MoEFeedForward(cfg.dim, cfg.moe_experts, cfg.moe_top_k,
                                      lambda: FeedForward(cfg.dim, cfg.moe_ffn_dim), cfg.moe_capacity_factor,
                                      cfg.moe_routing, cfg.moe_image_experts or 0)
        else:
            self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        # DiT's adaLN: the timestep's shift / scale / gate for both sub-layers, image tokens only
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim, bias=False) if cfg.time_conditioning == "adaln" else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask | list,
                cache: KVCache | CacheGroups | None = None, layer: int = 0, position_ids: Tensor | None = None,
                modality: Tensor | None = None, cond: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, RouterOutput | None]:
        """``cond`` = (c, index): per-token timestep conditioning (n*N, D) for the image tokens at the
        flat positions ``index`` (n*N,) of x's (B*T) rows; None (or no ``ada``) leaves every token as is."""
        if self.ada is None or cond is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, position_ids)
            if isinstance(self.ffn, MoEFeedForward):
                y, router = self.ffn(self.ffn_norm(x), modality)
                return x + y, router
            return x + self.ffn(self.ffn_norm(x)), None
        c, index = cond
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (n*N, D)
        a = self.attn(modulate(self.attn_norm(x), index, shift1, scale1), cos, sin, mask, cache, layer, position_ids)
        x = x + modulate(a, index, None, gate1)
        y = modulate(self.ffn_norm(x), index, shift2, scale2)
        router = None
        if isinstance(self.ffn, MoEFeedForward):
            y, router = self.ffn(y, modality)
        else:
            y = self.ffn(y)
        return x + modulate(y, index, None, gate2), router


def modulate(x: Tensor, index: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """x (B, T, D) with its rows at flat positions ``index`` (K,) replaced by row * (1 + scale) +
    shift (each (K, D)); other rows unchanged. Zero scale and shift give x back (identity init)."""
    flat = x.reshape(-1, x.shape[-1])  # (B*T, D)
    rows = flat[index] * (1 + scale)
    if shift is not None:
        rows = rows + shift
    return flat.index_copy(0, index, rows.to(flat.dtype)).view_as(x)


def mlp(in_dim: int, out_dim: int, depth: int, hidden: int | None = None) -> nn.Sequential:
    """Linear, then (GELU, Linear) x (depth - 1): Janus' aligner MLPs and generation head."""
    hidden = out_dim if hidden is None else hidden
    dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = [nn.Linear(dims[0], dims[1])]
    for a, b in zip(dims[1:-1], dims[2:]):
        layers += [nn.GELU(), nn.Linear(a, b)]
    return nn.Sequential(*layers)


@dataclass
class HybridOutput:
    logits: Tensor | None  # (B, T, V), or (K, V) at the requested text positions
    image_pred: Tensor | None  # (n_gen, N, P): the diffusion head's prediction per patch
    hidden: Tensor  # (B, T, D) final hidden states before the norm
    code_logits: Tensor | None = None  # (n_gen, N, K): "ar" head, logits for code i read at position i - 1
    routers: list[RouterOutput] | None = None  # one per MoE layer (router logits and choices); None if dense


class HybridModel(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.config = cfg
        D = cfg.dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # Late fusion: the first late_fusion_layers blocks are a vision transformer run on each image
        # span alone; the decoder gets the rest (same total parameters as early fusion).
        n_vision = cfg.late_fusion_layers
        self.vision_layers = nn.ModuleList(Block(cfg) for _ in range(n_vision))
        moe_layers = set(range(cfg.n_layers - n_vision) if cfg.moe_layers is None else cfg.moe_layers)
        self.layers = nn.ModuleList(
            Block(cfg, use_rope=not (cfg.nope_every and (i + 1) % cfg.nope_every == 0),
                  moe=bool(cfg.moe_experts) and i in moe_layers)
            for i in range(cfg.n_layers - n_vision))
        self.norm = RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Generation path. Only the configured paradigm's modules exist (a Janus checkpoint has
        # no diffusion head; a Transfusion one no code head; in "tokens" mode (Chameleon) codes are
        # vocabulary ids, read by embed_tokens and written by lm_head, with no modules of their own).
        if cfg.image_head == "diffusion":  # noisy latent patches in, the scheduler's target out
            self.image_in = nn.Linear(cfg.patch_dim, D)
            self.time_proj = Timesteps(cfg.timestep_freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embed = TimestepEmbedding(cfg.timestep_freq_dim, D)
            self.image_out = nn.Linear(D, cfg.patch_dim)
            # adaLN: the final norm's shift and scale for image tokens (DiT's final layer)
            self.final_ada = nn.Linear(D, 2 * D, bias=False) if cfg.time_conditioning == "adaln" else None
            # the pooled text an image is drawn from, into the adaLN condition (SD3's pooled embedding)
            self.text_pool = mlp(D, D, 2) if cfg.pooled_text_conditioning else None
        elif cfg.image_head == "ar":  # VQ code ids in, next-code logits out (Janus: generation embeddings/aligner/head)
            self.gen_embed = nn.Embedding(cfg.codebook_size, cfg.code_embed_dim)
            self.gen_aligner = mlp(cfg.code_embed_dim, D, cfg.aligner_depth)
            self.gen_head = mlp(D, cfg.codebook_size, 2, hidden=cfg.gen_head_dim)
        # Understanding path: encoder features -> LM width (Janus' MLP aligner); "tokens" reads codes.
        if cfg.image_head != "tokens":
            self.aligner = mlp(cfg.und_feature_dim, D, cfg.aligner_depth)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep ones, biases below
            # Residual-branch outputs shrink with depth (GPT-2) so the stream starts near identity.
            scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            nn.init.normal_(p, std=std * scale)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.config.image_head == "diffusion":
            # Zero-init the diffusion head (DiT): the first prediction is 0, a stable starting point.
            nn.init.zeros_(self.image_out.weight)
            # adaLN-Zero: every modulation starts at 0, i.e. exactly the "add" model at initialisation
            for m in [self.final_ada, *(b.ada for b in self.layers)]:
                if m is not None:
                    nn.init.zeros_(m.weight)

    def embed_images(self, patches: Tensor, t_emb: Tensor) -> Tensor:
        """(n, N, P) noisy patches and (n, D) timestep embeddings -> (n, N, D) span embeddings."""
        # the weights' dtype, not the inputs': fp32 latents meet bf16 weights when the whole model is
        # cast (DeepSpeed bf16 has no autocast); under autocast the weights stay fp32 and this is a no-op
        dtype = self.image_in.weight.dtype
        return self.image_in(patches.to(dtype)) + t_emb[:, None, :]

    def embed_timesteps(self, timesteps: Tensor) -> Tensor:
        """(n,) diffusion timesteps (model units) -> (n, D) timestep embeddings (DiT's embedder)."""
        dtype = self.image_in.weight.dtype
        return self.time_embed(self.time_proj(timesteps.float()).to(dtype))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attn_mask: AttentionMask,
        gen_tokens: Tensor | None = None,
        gen_index: Tensor | None = None,
        gen_timesteps: Tensor | None = None,
        und_features: Tensor | None = None,
        und_index: Tensor | None = None,
        logits_index: Tensor | None = None,
        gen_codes: Tensor | None = None,
        cache: KVCache | CacheGroups | None = None,
        want_code_logits: bool = True,
    ) -> HybridOutput:
        """
        input_ids, position_ids: (B, T); attn_mask: (B, 1, T, T) bool or a BlockMask.
        gen_tokens: (n_gen, N, P) noisy patches ("diffusion"); gen_index: (n_gen, N) flat positions
        in B*T; gen_timesteps: (n_gen,). gen_codes: (n_gen, N) VQ code ids ("ar"; codes not yet
        sampled may hold any id: the span is causal, so they cannot influence earlier logits).
        und_features: (n_und, M, F); und_index: (n_und, M).
        logits_index: optional flat positions (K,) where text logits are wanted (saves the
        (B, T, V) projection when only a few positions carry a text loss).
        cache: run these T tokens after the cached ones (generation). attn_mask is then
        (B, 1, T, cache.length + T) (``masks.cached_mask``; None = attend to everything; a list
        with one mask per part of ``CacheGroups``) and every index above is relative to this chunk; the chunk's keys/values are written to the cache, which keeps them only when
        the caller commits them (``KVCache``). ``want_code_logits=False`` skips ``code_logits``
        (the "tokens" loss reads the codes' logits among the text logits instead).
        """
        B, T = input_ids.shape
        total = T + (cache.length if cache is not None else 0)
        if total > self.config.max_seq_len:
            raise ValueError(f"sequence length {total} exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None:
            cache.reserve(T)
            cache.write_ids(input_ids)
        h = self.embed_tokens(input_ids).view(B * T, -1)  # (B*T, D)
        if gen_tokens is not None:
            if gen_index is None or gen_timesteps is None or gen_index.shape != gen_tokens.shape[:2]:
                raise ValueError("gen_tokens (n, N, P) needs gen_index (n, N) and gen_timesteps (n,)")
            t_emb = self.embed_timesteps(gen_timesteps)  # (n, D): the input's and adaLN's condition
            emb = self.embed_images(gen_tokens, t_emb).to(h.dtype)
            h = h.index_copy(0, gen_index.reshape(-1), emb.reshape(-1, emb.shape[-1]))
        if gen_codes is not None:
            if gen_index is None or gen_index.shape != gen_codes.shape:
                raise ValueError("gen_codes (n, N) needs gen_index (n, N)")
            emb = self.embed_codes(gen_codes, self.gen_aligner if self.config.image_head == "ar" else None)  # (n, N, D)
            h = h.index_copy(0, gen_index.reshape(-1), emb.reshape(-1, emb.shape[-1]).to(h.dtype))
        if und_features is not None:
            if und_index is None or und_index.shape != und_features.shape[:2]:
                raise ValueError("und_features (n, M, F) (codes (n, M) for image_head='tokens') needs und_index (n, M)")
            if self.config.image_head == "tokens":
                emb = self.embed_codes(und_features)
            else:  # an encoder loaded in another precision (bf16 Janus tower) still feeds an fp32 model
                emb = self.aligner(und_features.to(self.aligner[0].weight.dtype))
            h = h.index_copy(0, und_index.reshape(-1), emb.reshape(-1, emb.shape[-1]).to(h.dtype))
        cond = None  # adaLN: each image token's timestep conditioning, silu(t_emb) as DiT feeds its adaLN
        if gen_tokens is not None and self.config.time_conditioning == "adaln":
            n_gen, N = gen_index.shape
            c = t_emb
            if self.text_pool is not None:
                c = c + self.text_pool(self.pooled_text(input_ids, gen_index, cache).to(c.dtype))
            c = F.silu(c).to(h.dtype)
            cond = (c.repeat_interleave(N, dim=0), gen_index.reshape(-1))  # (n*N, D), (n*N,)
        if self.vision_layers:
            h = self.encode_spans(h, gen_index if gen_tokens is not None else None, und_index if und_features is not None else None)
        h = h.view(B, T, -1)  # (B, T, D)

        cos, sin = self.rope(position_ids, h.dtype)
        # what the MoE router reads: image positions carry the placeholder id, padding the pad id
        modality = torch.where(input_ids == self.config.img_id, IMAGE, TEXT)
        modality = modality.masked_fill(input_ids == self.config.pad_id, PAD)  # (B, T)
        routers = []
        # Activation checkpointing: keep only each block's input and recompute the block in backward
        # (same gradients, less memory). Training only; a cached (generation) pass never needs it.
        recompute = (self.config.activation_checkpointing and self.training and cache is None
                     and torch.is_grad_enabled())
        for i, layer in enumerate(self.layers):
            if recompute:
                h, router = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, None, i, position_ids,
                                                              modality, cond, use_reentrant=False)
            else:
                h, router = layer(h, cos, sin, attn_mask, cache, i, position_ids, modality, cond)
            if router is not None:
                routers.append(router)
        hn = self.norm(h)

        flat = hn.view(B * T, -1)
        logits = self.lm_head(flat[logits_index] if logits_index is not None else hn)
        image_pred = None
        if gen_tokens is not None:
            img = flat[gen_index.reshape(-1)]  # (n*N, D)
            if cond is not None:  # DiT's final layer: the normalised image tokens shifted and scaled by t
                shift, scale = self.final_ada(cond[0]).chunk(2, dim=-1)
                img = img * (1 + scale) + shift
            image_pred = self.image_out(img).view(*gen_index.shape, self.config.patch_dim)  # (n, N, P)
        code_logits = None
        if gen_codes is not None and cache is None and want_code_logits:  # code i is predicted from the position before
            # it (<boi> for i=0); with a cache that position may be cached: use next_code_logits
            code_logits = self.code_head(flat[gen_index.reshape(-1) - 1]).view(*gen_index.shape, self.config.codebook_size)  # (n, N, K)
        return HybridOutput(logits=logits, image_pred=image_pred, hidden=h, code_logits=code_logits,
                            routers=routers or None)

    def pooled_text(self, input_ids: Tensor, gen_index: Tensor, cache: KVCache | CacheGroups | None,
                    max_tokens: int = 64) -> Tensor:
        """(n_gen, D): for each generated-image span, the mean input embedding of the text tokens
        before its <boi> back to the previous <eoi>, <bos> or <eos> (the image's own caption or
        document text; zeros if there is none). Reads the cached ids too when the span follows a
        cached prefix, so training and cached generation pool the same tokens."""
        cfg = self.config
        B, T = input_ids.shape
        if not gen_index.numel():  # a batch without generated images: the head runs on nothing
            return self.embed_tokens.weight.new_zeros(gen_index.shape[0], cfg.dim)
        rows = input_ids.tolist()
        if cache is not None:  # each row's cached ids first (left padding holds ids < 0 or pad)
            for part, r in zip(cache.parts, cache.rows):
                past = part.ids[:, :part.length].tolist()
                for j, b in enumerate(range(r.start, r.stop)):
                    rows[b] = past[j] + rows[b]
        offset = [len(row) - T for row in rows]
        stop = {cfg.bos_id, cfg.eos_id, cfg.eoi_id, cfg.boi_id}
        skip = {cfg.pad_id, cfg.img_id}
        picked = []
        for flat in gen_index[:, 0].tolist():  # the span's first image token; <boi> just before it
            b, col = divmod(flat, T)
            row, i, got = rows[b], offset[b] + col - 2, []
            while i >= 0 and row[i] not in stop and len(got) < max_tokens:
                if row[i] >= 0 and row[i] not in skip:
                    got.append(row[i])
                i -= 1
            picked.append(got)
        n, L = len(picked), max([len(p) for p in picked] + [1])
        ids = torch.full((n, L), cfg.pad_id, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros(n, L, dtype=torch.bool, device=input_ids.device)
        for k, p in enumerate(picked):
            if p:
                ids[k, :len(p)] = torch.tensor(p)
                mask[k, :len(p)] = True
        emb = self.embed_tokens(ids) * mask[..., None]  # (n, L, D)
        return emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (n, D)

    def encode_spans(self, h: Tensor, gen_index: Tensor | None, und_index: Tensor | None) -> Tensor:
        """Late fusion: each image span's embeddings, (n, N, D) gathered from the flat (B*T, D)
        rows, pass through the vision blocks on their own (attention inside the span only, RoPE
        positions 0..N-1 in raster order), then go back to their places."""
        cfg = self.config
        for index, bidirectional in ((gen_index, True), (und_index, cfg.und_bidirectional)):
            if index is None or not index.numel():
                if not torch.is_grad_enabled():
                    continue
                # training: run the blocks on no image anyway, so that every step uses them the same
                # number of times on every rank (ZeRO-3 gathers a block's parameters collectively)
                index = h.new_zeros(0, 1, dtype=torch.long)
            n, N = index.shape
            x = h[index.reshape(-1)].view(n, N, h.shape[-1])  # (n, N, D)
            pos = torch.arange(N, device=h.device).expand(n, N)
            cos, sin = self.rope(pos, x.dtype)
            mask = None if bidirectional else torch.ones(N, N, dtype=torch.bool, device=h.device).tril()
            for layer in self.vision_layers:
                x, _ = layer(x, cos, sin, mask, None, 0, pos)
            h = h.index_copy(0, index.reshape(-1), x.reshape(n * N, h.shape[-1]))
        return h

    def embed_codes(self, codes: Tensor, aligner: nn.Module | None = None) -> Tensor:
        """(n, N) VQ code ids -> (n, N, D): Janus' generation embedding + aligner ("ar"), or the
        shared vocabulary's rows for the codes ("tokens", Chameleon)."""
        if aligner is not None:
            return aligner(self.gen_embed(codes))
        return self.embed_tokens(codes + self.config.image_token_offset)

    def code_head(self, hn: Tensor) -> Tensor:
        """(..., D) normed hidden states -> (..., K) next-code logits: the "ar" head, or for
        "tokens" the LM head's code rows (generation restricted to codes, as Chameleon samples)."""
        if self.config.image_head == "tokens":  # through lm_head itself (ZeRO-3 gathers it in its forward)
            return self.lm_head(hn)[..., self.config.image_token_offset:]
        return self.gen_head(hn)

    def next_code_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) final hidden states (``HybridOutput.hidden``) -> (..., K) logits of the code
        that follows each position: the "ar" / "tokens" head for decoding one code at a time."""
        return self.code_head(self.norm(hidden))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n
