"""The generation-path image tokenizer: a VQ autoencoder behind one small interface.

Generated images live in the latent space of a VQ autoencoder (Janus; latent diffusion's
VQ-regularised autoencoders). The hybrid model diffuses the continuous PRE-quantisation latents
(after ``quant_conv``), normalised to about unit variance; an autoregressive head can use the
discrete codes instead. Decoding quantises latents to their nearest code by default, as latent
diffusion's VQ decoders do, so a slightly-off diffusion sample still decodes to clean codes.

Two backends, both used as they are (no re-implementation of the networks):

* ``"diffusers"``: ``diffusers.VQModel``; trainable with ``python -m train train/configs/vq.yaml``.
* ``"janus"``: transformers' ``JanusVQVAE``, so a real Janus / Janus-Pro checkpoint's VQ can be
  used. Its codes follow the original Janus quantiser (l2-normalised latents and codebook, i.e.
  the nearest code by cosine); transformers' ``JanusVQVAE.encode`` skips that normalisation, so
  the two agree only when the codebook rows have unit norm (see ``_nearest``).

Pixels are (B, 3, H, W) in [0, 1] on both sides of the interface. ``VQTokenizer.from_pretrained``
reads a folder written by ``save_pretrained``, a plain diffusers ``VQModel`` folder, a saved
``JanusVQVAE`` folder, or a full HF Janus checkpoint (only its VQ weights are read).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

META_FILE = "hybrid_vq.json"  # our fields next to the backend's own config.json + safetensors
JANUS_PREFIX = "model.vqmodel."  # where a full Janus checkpoint keeps its VQ weights
EXPECTED = ("a folder written by VQTokenizer.save_pretrained, a diffusers VQModel folder, "
            "a saved JanusVQVAE folder, or a full HF Janus checkpoint folder")


@dataclass
class VQEncoding:
    latents: Tensor  # (B, C, h, w) float: pre-quantisation latents, (z - shift) * scale
    codes: Tensor  # (B, h, w) long: nearest codebook ids


class VQForward(NamedTuple):
    """What the training stage needs from one pass (diffusers backend). A NamedTuple, so that
    DDP wrappers can traverse it."""

    reconstruction: Tensor  # (B, 3, H, W), [0, 1] scale, not clamped (the loss sees the raw output)
    vq_loss: Tensor  # scalar: codebook + commitment loss from the quantiser
    pre_quant: Tensor  # (B, C, h, w) raw (un-normalised) pre-quantisation latents
    codes: Tensor  # (B, h, w) long


def make_vqmodel(
    image_size: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    num_vq_embeddings: int = 256,
    vq_embed_dim: int | None = None,
    norm_num_groups: int = 8,
) -> nn.Module:
    """A fresh ``diffusers.VQModel``: one down/up block per entry of ``block_out_channels``, so
    images are downsampled by ``2 ** (len(block_out_channels) - 1)``."""
    from diffusers import VQModel

    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels {tuple(block_out_channels)} must be multiples of "
                         f"norm_num_groups={norm_num_groups}")
    n = len(block_out_channels)
    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        num_vq_embeddings=num_vq_embeddings,
        vq_embed_dim=vq_embed_dim,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )


class VQTokenizer(nn.Module):
    """Pixels <-> normalised continuous latents / discrete codes. Frozen (eval, no grad) when
    built; the VQ training stage unfreezes it explicitly."""

    def __init__(self, model: nn.Module, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        self.backend = _backend_of(model)
        self.model = model
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        codebook = self.model.quantize.embedding.weight  # (K, C)
        self.codebook_size, self.latent_channels = (int(s) for s in codebook.shape)
        cfg = model.config
        levels = len(cfg.block_out_channels) if self.backend == "diffusers" else len(cfg.channel_multiplier)
        self.downsample = 2 ** (levels - 1)  # each level but the last halves the resolution
        self.requires_grad_(False)
        self.eval()

    # --- the interface -------------------------------------------------------------------
    def encode(self, pixels: Tensor) -> VQEncoding:
        """(B, 3, H, W) in [0, 1] -> latents (B, C, h, w) normalised, codes (B, h, w)."""
        z = self.pre_quant(pixels)  # (B, C, h, w)
        # latents leave in fp32 whatever the weights' dtype (a bf16 Janus checkpoint, say)
        return VQEncoding(latents=(z.float() - self.shift_factor) * self.scaling_factor, codes=self._nearest(z))

    def encode_latents(self, pixels: Tensor) -> Tensor:
        return self.encode(pixels).latents

    def encode_codes(self, pixels: Tensor) -> Tensor:
        return self._nearest(self.pre_quant(pixels))

    def decode(self, x: Tensor, quantize: bool = True) -> Tensor:
        """Normalised latents (B, C, h, w), or codes (B, h, w) / (B, h*w) in raster order on a
        square grid -> pixels (B, 3, H, W) in [0, 1]. Latents are snapped to their nearest code
        unless ``quantize=False``."""
        if not torch.is_floating_point(x):
            q = self._code_vectors(self._check_codes(x))
        else:
            if x.dim() != 4 or x.shape[1] != self.latent_channels:
                raise ValueError(f"expected latents of shape (B, {self.latent_channels}, h, w) "
                                 f"or integer codes, got {tuple(x.shape)} {x.dtype}")
            z = (x.float() / self.scaling_factor + self.shift_factor).to(self.codebook.dtype)
            if quantize:
                q = self._code_vectors(self._nearest(z))
            elif self.backend == "janus":  # its decoder only ever saw unit-norm code vectors
                q = F.normalize(z, dim=1)
            else:
                q = z
        return ((self._decode_vectors(q).float() + 1) / 2).clamp(0, 1)

    def forward(self, pixels: Tensor) -> VQForward:
        """One training pass: ``VQModel.forward`` with its intermediates exposed (the stage needs
        the pre-quantisation latents and codes for codebook statistics and dead-code restarts,
        which ``VQModel.forward`` does not return)."""
        if self.backend != "diffusers":
            raise NotImplementedError("only the diffusers backend is trainable; the Janus VQ is a "
                                      "frozen pretrained tokenizer")
        z = self.pre_quant(pixels)  # (B, C, h, w)
        q, vq_loss, (_, _, idx) = self.model.quantize(z)  # straight-through q
        out = self.model.decode(q, force_not_quantize=True).sample  # (B, 3, H, W) in ~[-1, 1]
        return VQForward((out + 1) / 2, vq_loss, z, idx.view(z.shape[0], *z.shape[2:]))

    @property
    def codebook(self) -> Tensor:
        """(K, C) raw codebook weights."""
        return self.model.quantize.embedding.weight

    def pre_quant(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> raw (un-normalised) pre-quantisation latents (B, C, h, w):
        what training and the latent statistics behind ``scaling_factor`` / ``shift_factor`` use."""
        x = self._check_pixels(pixels) * 2 - 1  # both backends were trained on [-1, 1]
        x = x.to(self.codebook.dtype)  # (B, 3, H, W) in the weights' dtype
        if self.backend == "diffusers":
            return self.model.encode(x).latents  # encoder + quant_conv: (B, C, h, w)
        return self.model.quant_conv(self.model.encoder(x))  # (B, C, h, w)

    # --- backend specifics ---------------------------------------------------------------
    def _nearest(self, z: Tensor) -> Tensor:
        """(B, C, h, w) raw latents -> (B, h, w) nearest code ids."""
        B, _, h, w = z.shape
        if self.backend == "diffusers":
            _, _, (_, _, idx) = self.model.quantize(z)  # the quantiser's own cdist argmin
            return idx.view(B, h, w)
        # Janus (LlamaGen's VQ): nearest by cosine, as the original quantiser normalises both the
        # latents and the codebook. For unit-norm rows this equals JanusVQVAE.encode's argmin.
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)  # (B*h*w, C)
        book = F.normalize(self.codebook, dim=-1)  # (K, C)
        return (flat @ book.T).argmax(dim=-1).view(B, h, w)

    def _code_vectors(self, codes: Tensor) -> Tensor:
        """(B, h, w) ids -> (B, C, h, w) the vectors the decoder takes."""
        q = self.model.quantize.embedding(codes)  # (B, h, w, C)
        if self.backend == "janus":  # = JanusVQVAEVectorQuantizer.get_codebook_entry, any grid
            q = F.normalize(q, dim=-1)
        return q.permute(0, 3, 1, 2).contiguous()

    def _decode_vectors(self, q: Tensor) -> Tensor:
        """(B, C, h, w) code vectors -> (B, 3, H, W) in ~[-1, 1]."""
        if self.backend == "diffusers":
            return self.model.decode(q, force_not_quantize=True).sample
        return self.model.decoder(self.model.post_quant_conv(q))

    # --- checks --------------------------------------------------------------------------
    def _check_pixels(self, pixels: Tensor) -> Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3 or not torch.is_floating_point(pixels):
            raise ValueError(f"expected float pixels of shape (B, 3, H, W) in [0, 1], got "
                             f"{tuple(pixels.shape)} {pixels.dtype}")
        if pixels.shape[2] % self.downsample or pixels.shape[3] % self.downsample:
            raise ValueError(f"image size {pixels.shape[2]}x{pixels.shape[3]} is not divisible by "
                             f"the tokenizer's downsampling factor {self.downsample}")
        return pixels

    def _check_codes(self, codes: Tensor) -> Tensor:
        if codes.dim() == 2:  # (B, h*w) raster order
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"cannot lay {codes.shape[1]} codes out on a square grid")
            codes = codes.view(codes.shape[0], side, side)  # (B, h, w)
        if codes.dim() != 3:
            raise ValueError(f"expected codes of shape (B, h, w) or (B, h*w), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes.long()

    # --- files ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """The backend's own folder (config.json + safetensors) plus ``hybrid_vq.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.backend == "diffusers":
            # Kept in VQModel's config too, for readers that only know diffusers (which has no shift).
            self.model.register_to_config(scaling_factor=self.scaling_factor)
            self.model.save_pretrained(str(path), safe_serialization=True)
        else:
            self.model.save_pretrained(str(path))
        meta = {"backend": self.backend, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VQTokenizer":
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"VQ tokenizer folder {path} does not exist; expected {EXPECTED}")
        if (path / META_FILE).is_file():
            meta = json.loads((path / META_FILE).read_text())
            loader = {"diffusers": _load_diffusers, "janus": _load_janus_vqvae}.get(meta.get("backend"))
            if loader is None:
                raise ValueError(f"{path / META_FILE}: unknown backend {meta.get('backend')!r}; "
                                 f"expected 'diffusers' or 'janus'")
            return cls(loader(path), meta.get("scaling_factor", 1.0), meta.get("shift_factor", 0.0))
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no {META_FILE} and no config.json; expected {EXPECTED}")
        config = json.loads((path / "config.json").read_text())
        if config.get("_class_name") == "VQModel":
            if config.get("lookup_from_codebook"):
                raise ValueError(f"{path}: VQModels with lookup_from_codebook=True decode code ids, not "
                                 f"vectors; they are not supported")
            scale = config.get("scaling_factor", 1.0)
            if scale == 0.18215:  # diffusers writes SD-VAE's default into every VQModel config
                warnings.warn(f"{path}: scaling_factor=0.18215 is diffusers' default, not a statistic of "
                              f"this VQ model's latents; using 1.0 (set it with save_pretrained after "
                              f"measuring the latents' std)")
                scale = 1.0
            return cls(_load_diffusers(path), scale, 0.0)
        if config.get("model_type") == "janus_vqgan":
            return cls(_load_janus_vqvae(path))
        if config.get("model_type") == "janus":
            return cls(_load_janus_full(path))
        raise ValueError(f"{path / 'config.json'} is not a recognised VQ model (_class_name="
                         f"{config.get('_class_name')!r}, model_type={config.get('model_type')!r}); "
                         f"expected {EXPECTED}")


def _backend_of(model: nn.Module) -> str:
    from diffusers import VQModel
    from transformers.models.janus import JanusVQVAE

    if isinstance(model, VQModel):
        return "diffusers"
    if isinstance(model, JanusVQVAE):
        return "janus"
    raise TypeError(f"expected a diffusers VQModel or a transformers JanusVQVAE, got {type(model).__name__}")


def _load_diffusers(path: Path) -> nn.Module:
    from diffusers import VQModel

    return VQModel.from_pretrained(str(path), local_files_only=True)


def _load_janus_vqvae(path: Path) -> nn.Module:
    from transformers.models.janus import JanusVQVAE

    return JanusVQVAE.from_pretrained(str(path), local_files_only=True)


def _load_janus_full(path: Path) -> nn.Module:
    """The VQ of a full ``JanusForConditionalGeneration`` folder: ``vq_config`` from its
    config.json and only the ``model.vqmodel.*`` tensors from its (possibly sharded) safetensors,
    so the language model is never instantiated or read."""
    from safetensors import safe_open
    from transformers.models.janus import JanusConfig, JanusVQVAE

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(JANUS_PREFIX)})
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path} is a Janus checkpoint without model.safetensors or "
                         f"model.safetensors.index.json (only safetensors weights are read)")
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(JANUS_PREFIX):
                    state[key[len(JANUS_PREFIX):]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{path}: no weights under {JANUS_PREFIX!r}; is this a JanusForConditionalGeneration checkpoint?")
    config = JanusConfig.from_pretrained(str(path), local_files_only=True).vq_config
    model = JanusVQVAE(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the {JANUS_PREFIX}* weights do not fit its vq_config "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
