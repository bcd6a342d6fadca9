"""HybridConfig: one flat dataclass describing the shared transformer and its image spans.

Flat on purpose (torchtitan / nanoGPT style): every knob is one attribute, presets are named
dictionaries of overrides, and the config round-trips through ``config.json`` unchanged.
Leaf modules never see this object; ``HybridModel`` unpacks the numbers they need.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


IMAGE_HEADS = ("diffusion", "ar", "tokens")
# Scaled RoPE variants whose frequencies are fixed at load time (no per-length recomputation, no
# attention factor), computed by transformers' own ``ROPE_INIT_FUNCTIONS``.
ROPE_SCALINGS = ("linear", "llama3")


@dataclass
class HybridConfig:
    # --- text / transformer -------------------------------------------------------------
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA); fewer -> grouped-query attention
    ffn_dim: int | None = None  # None -> Llama's 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face's rope_parameters without rope_theta, for scaled RoPE: {"rope_type": "llama3",
    # "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # "original_max_position_embeddings": 8192} (Llama 3.1+) or {"rope_type": "linear", "factor": 2.0}.
    rope_scaling: dict[str, Any] | None = None
    qk_norm: bool = False  # Chameleon's fix for logit drift in mixed-modal training
    attn_bias: bool = False  # Qwen2-style q/k/v bias
    tie_embeddings: bool = False
    max_seq_len: int = 256
    attn_impl: str = "sdpa"  # "sdpa" (dense bool mask, CPU/training) | "flex" (BlockMask, GPU)
    init_std: float = 0.02
    # iRoPE (Llama 4): every nope_every-th layer (layers nope_every-1, 2*nope_every-1, ...) attends
    # without rotary embeddings; 0 = RoPE in every layer. With attn_temperature_tuning those NoPE
    # layers scale their queries by 1 + attn_scale * log(1 + floor((pos + 1) / attn_floor_scale)),
    # which is 1 below attn_floor_scale: it sharpens attention only on contexts longer than that.
    nope_every: int = 0
    attn_temperature_tuning: bool = False
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    # Recompute each block in backward instead of storing its activations (training memory for ~1/3
    # more compute); no effect on evaluation or cached generation.
    activation_checkpointing: bool = False

    # --- sparse mixture of experts (hybrid/moe.py); moe_experts = 0: dense SwiGLU everywhere --------
    moe_experts: int = 0
    moe_top_k: int = 1
    moe_layers: list[int] | None = None  # which layers are MoE; None: all of them
    moe_ffn_dim: int | None = None  # each expert's hidden width; None -> ffn_dim (same active compute at k=1)
    # Expert capacity = ceil(factor * tokens * k / experts); assignments beyond it are dropped (the
    # token keeps its residual). None: dropless, every assignment is computed.
    moe_capacity_factor: float | None = None
    # "agnostic": one router over all experts for every token (the default the Apple study found
    # better); "aware": text tokens choose among the text experts, image tokens among the image ones.
    moe_routing: str = "agnostic"
    moe_image_experts: int | None = None  # "aware": how many experts (the last ones) are image experts; None -> half
    moe_aux_weight: float = 0.01  # Switch Transformer load-balancing loss
    moe_z_weight: float = 1e-3  # ST-MoE router z-loss

    # --- late fusion: the first late_fusion_layers of the n_layers blocks become a separate vision
    # transformer that reads each image span on its own before the shared decoder (the remaining
    # blocks) sees it; 0 = early fusion. Total parameters stay those of the early-fusion model.
    late_fusion_layers: int = 0

    # --- special token ids (filled from the tokenizer when a model is built for it) ---------
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    boi_id: int = 3
    eoi_id: int = 4
    img_id: int = 5  # placeholder id inside image spans; its embedding is overwritten

    # --- generation path: a latent grid of the image codec, one span per image ------------
    image_size: int = 32  # pixels
    image_codec: str = "pixel"  # "pixel" (identity codec) | "vq" (a VQ tokenizer's latents / codes)
    latent_channels: int = 3
    latent_downsample: int = 1  # pixels per latent cell along one side
    patch_size: int = 4  # latent cells per patch along one side (1 for the "ar" head)
    # "diffusion": continuous patches, bidirectional span, diffusion loss (Transfusion);
    # "ar": VQ code ids in raster order, causal span, cross-entropy with its own embedding and head (Janus);
    # "tokens": Chameleon: the codes are the last codebook_size ids of the shared vocabulary, input
    # images are codes too (no SigLIP), and one next-token cross-entropy trains text and images.
    image_head: str = "diffusion"
    timestep_freq_dim: int = 256  # sinusoidal features fed to the timestep MLP (DiT)
    # How the diffusion timestep reaches the transformer. "add": its embedding is added to every
    # image token's input once (Transfusion / U-ViT). "adaln": also DiT's adaptive norm in every
    # block and before image_out: the timestep shifts and scales each normalised image token and
    # gates its residual branches (zero-initialised, so training starts from "add"); text tokens
    # are never modulated, so the text path is exactly a Llama.
    time_conditioning: str = "add"
    # With "adaln": the adaptive norms also read the text an image is generated from, pooled (the
    # mean embedding of the text tokens between the previous image or the document start and the
    # image's <boi>), as SD3 / Flux add a pooled text embedding to the timestep's. Attention to the
    # text tokens stays the main path (word order, bindings); this one gives the image tokens of
    # every block a direct view of what was asked for. An empty text (caption dropout, CFG's
    # unconditional row) pools to zeros.
    pooled_text_conditioning: bool = False
    codebook_size: int = 256  # "ar": VQ codes the generation head predicts
    code_embed_dim: int = 8  # "ar": width of the code embedding before the generation aligner
    gen_head_dim: int | None = None  # "ar": hidden width of the generation head; None -> dim

    # --- understanding path: features from an image encoder through an aligner MLP --------
    und_feature_dim: int = 64
    und_tokens: int = 16
    aligner_depth: int = 2  # Linear layers in the aligner MLPs (GELU between), as Janus' `depth`
    # Transfusion reads an input image bidirectionally; Janus / LLaVA feed it causally like text.
    # Converted Janus checkpoints set False, so they compute what they were trained to compute.
    und_bidirectional: bool = True

    # --- objective -------------------------------------------------------------------
    scheduler: str = "flow"  # "ddpm" (epsilon, Transfusion) | "flow" (velocity, JanusFlow)
    # Options of that scheduler (schedulers/), e.g. {"shift": 3.0} for rectified flow: SD3's timestep
    # shift, which spends more training steps (and sampling steps) at high noise, where an image's
    # layout, objects and colours are decided. None: the scheduler's defaults.
    scheduler_options: dict[str, Any] | None = None
    image_loss_weight: float = 5.0  # Transfusion's lambda ("tokens": unused, one cross-entropy)
    # z-loss on the LM head's log-normaliser (Chameleon, PaLM): weight x mean logsumexp(logits)^2 over
    # the trained positions. None: 1e-5 for image_head="tokens" (Chameleon's setting), else 0.
    z_loss_weight: float | None = None
    caption_dropout: float = 0.1  # probability of dropping the caption of a generated image (CFG)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.gen_head_dim is None:
            self.gen_head_dim = self.dim
        if self.ffn_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            m = self.ffn_multiple_of
            self.ffn_dim = m * math.ceil(hidden / m)
        if self.z_loss_weight is None:
            self.z_loss_weight = 1e-5 if self.image_head == "tokens" else 0.0
        if self.image_head == "tokens" and self.image_size % self.latent_downsample == 0:
            self.und_tokens = self.image_tokens  # an input image is its VQ codes, like a generated one
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        if self.moe_experts and self.moe_routing == "aware" and self.moe_image_experts is None:
            self.moe_image_experts = self.moe_experts // 2
        self.validate()

    # ---------------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.image_size % self.latent_downsample:
            problems.append(
                f"image_size={self.image_size} not divisible by latent_downsample={self.latent_downsample}"
            )
        elif self.latent_size % self.patch_size:
            problems.append(f"latent grid {self.latent_size} not divisible by patch_size={self.patch_size}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_SCALINGS:
            problems.append(f"rope_scaling.rope_type must be one of {ROPE_SCALINGS}, got "
                            f"{self.rope_scaling.get('rope_type')!r}")
        if not isinstance(self.activation_checkpointing, bool):
            problems.append(f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}")
        if self.attn_impl not in ("sdpa", "flex"):
            problems.append(f"attn_impl must be 'sdpa' or 'flex', got {self.attn_impl!r}")
        if self.image_codec not in ("pixel", "vq"):
            problems.append(f"image_codec must be 'pixel' or 'vq', got {self.image_codec!r}")
        if self.image_head not in IMAGE_HEADS:
            problems.append(f"image_head must be one of {IMAGE_HEADS}, got {self.image_head!r}")
        elif self.image_head != "diffusion" and (self.image_codec != "vq" or self.patch_size != 1):
            problems.append(f"image_head={self.image_head!r} predicts one VQ code per token: it needs image_codec='vq' "
                            f"and patch_size=1 (got {self.image_codec!r}, {self.patch_size})")
        elif self.image_head == "tokens" and self.codebook_size + 6 > self.vocab_size:
            problems.append(f"image_head='tokens' keeps the codes in the vocabulary: vocab_size={self.vocab_size} "
                            f"must hold the text tokens and codebook_size={self.codebook_size} codes")
        if self.nope_every < 0:
            problems.append(f"nope_every must be >= 0, got {self.nope_every}")
        elif self.nope_every > self.n_layers - self.late_fusion_layers:
            problems.append(f"nope_every={self.nope_every} leaves no layer without RoPE among the "
                            f"{self.n_layers - self.late_fusion_layers} decoder layers")
        if self.attn_temperature_tuning and not self.nope_every:
            problems.append("attn_temperature_tuning scales the queries of layers without RoPE: set nope_every")
        if self.attn_floor_scale <= 0:
            problems.append(f"attn_floor_scale must be > 0, got {self.attn_floor_scale}")
        if self.moe_experts < 0:
            problems.append(f"moe_experts must be >= 0, got {self.moe_experts}")
        elif self.moe_experts:
            if self.pad_id in (self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.img_id):
                problems.append(f"MoE routing reads padding from pad_id={self.pad_id}, which is also a real token "
                                "here (pad = eos in converted checkpoints): give padding its own id")
            if not 1 <= self.moe_top_k <= self.moe_experts:
                problems.append(f"moe_top_k must be in [1, moe_experts={self.moe_experts}], got {self.moe_top_k}")
            if self.moe_layers is not None and (not self.moe_layers or any(
                    not 0 <= i < self.n_layers - self.late_fusion_layers for i in self.moe_layers)):
                problems.append(f"moe_layers {self.moe_layers} must be decoder layer indices in "
                                f"[0, {self.n_layers - self.late_fusion_layers})")
            if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
                problems.append(f"moe_capacity_factor must be > 0 or None (dropless), got {self.moe_capacity_factor}")
            if self.moe_routing not in ("agnostic", "aware"):
                problems.append(f"moe_routing must be 'agnostic' or 'aware', got {self.moe_routing!r}")
            elif self.moe_routing == "aware":
                n_img = self.moe_image_experts
                if not 1 <= n_img < self.moe_experts:
                    problems.append(f"moe_routing='aware' needs 1 <= moe_image_experts < moe_experts={self.moe_experts}, "
                                    f"got {n_img}")
                elif self.moe_top_k > min(n_img, self.moe_experts - n_img):
                    problems.append(f"moe_top_k={self.moe_top_k} exceeds the experts of one modality "
                                    f"({self.moe_experts - n_img} text, {n_img} image)")
        if not 0 <= self.late_fusion_layers < self.n_layers:
            problems.append(f"late_fusion_layers must be in [0, n_layers={self.n_layers}), got {self.late_fusion_layers}")
        elif self.late_fusion_layers and self.image_head != "diffusion":
            problems.append("late_fusion_layers needs image_head='diffusion': a vision encoder reads a whole image "
                            "span at once, which code-by-code generation never has")
        if self.time_conditioning not in ("add", "adaln"):
            problems.append(f"time_conditioning must be 'add' or 'adaln', got {self.time_conditioning!r}")
        elif self.time_conditioning == "adaln" and (self.image_head != "diffusion" or self.late_fusion_layers):
            problems.append("time_conditioning='adaln' modulates the diffusion head's image tokens in the decoder "
                            "blocks: it needs image_head='diffusion' and late_fusion_layers=0")
        if self.scheduler_options is not None and not isinstance(self.scheduler_options, dict):
            problems.append(f"scheduler_options must be a mapping of the scheduler's options, got {self.scheduler_options!r}")
        if self.pooled_text_conditioning and self.time_conditioning != "adaln":
            problems.append("pooled_text_conditioning feeds the adaptive norms: it needs time_conditioning='adaln'")
        if self.aligner_depth < 1:
            problems.append(f"aligner_depth must be >= 1, got {self.aligner_depth}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        ids = [self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.img_id]
        if any(not 0 <= i < self.vocab_size for i in ids):
            problems.append(f"special token ids {ids} must lie in [0, vocab_size={self.vocab_size})")
        elif self.image_head == "tokens" and max(ids) >= self.image_token_offset:
            problems.append(f"special token ids {ids} collide with the VQ codes at ids >= {self.image_token_offset}")
        if problems:
            raise ValueError("invalid HybridConfig: " + "; ".join(problems))

    # --- derived sizes -----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_downsample

    @property
    def image_tokens(self) -> int:
        """Tokens in one generated-image span (patches of the latent grid)."""
        return (self.latent_size // self.patch_size) ** 2

    @property
    def image_token_offset(self) -> int:
        """"tokens" mode: vocabulary id of VQ code 0 (codes take the last codebook_size ids)."""
        return self.vocab_size - self.codebook_size

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HybridConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig keys: {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HybridConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "HybridConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Named presets: overrides on top of the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward pass in milliseconds.
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, patch_size=8, timestep_freq_dim=64,
                  und_feature_dim=32, und_tokens=4, qk_norm=True),
    # The CPU demo: trains on the 32x32 shapes world in minutes on 2 cores.
    "tiny": dict(dim=256, n_layers=6, n_heads=4, max_seq_len=256, qk_norm=True),
    # A small GPU model for real experiments.
    "small": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=2048, image_size=256,
                  image_codec="vq", latent_channels=8, latent_downsample=16, patch_size=1,
                  und_feature_dim=768, und_tokens=256, qk_norm=True),
    # ~1.5B, shaped like Janus-Pro-1B (DeepSeek-LLM 1.5B backbone, 384px images through a
    # 16x-downsampling VQ tokenizer with 8-channel latents -> 576 image tokens, SigLIP-L features).
    "base": dict(dim=2048, n_layers=24, n_heads=16, ffn_dim=5632, vocab_size=102400, max_seq_len=4096,
                 rope_theta=10000.0, norm_eps=1e-6, image_size=384, image_codec="vq", latent_channels=8,
                 latent_downsample=16, patch_size=1, und_feature_dim=1024, und_tokens=576, qk_norm=False),
}
