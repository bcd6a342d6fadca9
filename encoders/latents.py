"""The latent space generated images are diffused in, and patchify / unpatchify.

An image codec maps pixels (B, 3, H, W) in [0, 1] to latents (B, C, h, w) and back. It is frozen
and lives outside the trained module. ``PixelCodec`` is the identity codec (latents are pixels
scaled to [-1, 1]); the VQ tokenizer (``encoders.vq.VQTokenizer``) plugs in behind the same
method names: ``encode_latents(pixels)`` and ``decode(latents)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PixelCodec(nn.Module):
    """Identity "encoder": diffusion runs directly on pixel patches."""

    latent_channels = 3
    downsample = 1

    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        return pixels * 2 - 1

    def encode_latents(self, pixels: Tensor) -> Tensor:
        """The VQTokenizer's name for the same thing: (B, 3, H, W) in [0, 1] -> latents."""
        return self.encode(pixels)

    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) latents -> pixels in [0, 1]."""
        return ((latents + 1) / 2).clamp(0, 1)


def build_codec(name: str, path: str | None = None) -> nn.Module:
    """The image codec called ``name``: "pixel" (the identity) or "vq", which is
    ``VQTokenizer.from_pretrained(path)`` (e.g. the VQ stage's ``runs/vq/final``, or a Janus
    checkpoint folder), returned frozen."""
    if name == "pixel":
        return PixelCodec()
    if name == "vq":
        if path is None:
            raise ValueError("image codec 'vq' needs a path to a VQ tokenizer folder "
                             "(e.g. runs/vq/final from `python -m train train/configs/vq.yaml`)")
        from encoders.vq import VQTokenizer

        return VQTokenizer.from_pretrained(path)
    raise ValueError(f"unknown image codec {name!r}; available: 'pixel', 'vq'")


def patchify(latents: Tensor, patch_size: int) -> Tensor:
    """(B, C, h, w) -> (B, N, C*p*p), patches in raster order."""
    B, C, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent grid {h}x{w} is not divisible by patch_size={p}")
    x = latents.reshape(B, C, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, C, p, p)
    return x.reshape(B, (h // p) * (w // p), C * p * p)


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, N, C*p*p) -> (B, C, h, w) for a square grid."""
    B, N, P = tokens.shape
    p, C = patch_size, channels
    side = int(round(N**0.5))
    if side * side != N or P != C * p * p:
        raise ValueError(f"cannot unpatchify {tuple(tokens.shape)} with patch_size={p}, channels={C}")
    x = tokens.reshape(B, side, side, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, side, p, side, p)
    return x.reshape(B, C, side * p, side * p)


def pil_to_tensor(image, size: int) -> Tensor:
    """A PIL image -> (3, size, size) float in [0, 1], with clear errors for unusable input.

    RGBA / L / P images are converted to RGB (safe, lossless for our use); an image of another
    size is an error rather than a silent resize, because a resize changes what the model learns.
    """
    from PIL import Image
    import numpy as np

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode not in ("RGB", "RGBA", "L", "P"):
        raise ValueError(f"unsupported image mode {image.mode!r}; expected RGB (or RGBA / L / P)")
    if image.size != (size, size):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, the model expects {size}x{size}")
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)
