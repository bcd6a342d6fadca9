"""The Transfusion objective: next-token cross-entropy on text + lambda * diffusion MSE on images.

Kept apart from the model (DiT / MAR style): ``HybridModel.forward`` only predicts; this file
noises the generated-image latents with the scheduler, runs the model once on the whole packed
batch, and scores each modality on its own positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.latents import patchify
from hybrid.sequence import IGNORE, MultimodalBatch


@dataclass
class LossBreakdown:
    total: Tensor  # scalar, what backward() is called on
    text: Tensor  # scalar, mean CE over text targets (0 if none)
    image: Tensor  # scalar, mean MSE over generated-image patch values (0 if none)
    text_tokens: int
    image_tokens: int


def hybrid_loss(
    model: nn.Module,
    batch: MultimodalBatch,
    scheduler,
    codec: nn.Module,
    patch_size: int,
    image_loss_weight: float = 5.0,
    attn_impl: str = "sdpa",
    und_features: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossBreakdown:
    """One forward pass of ``model`` on ``batch`` and its loss.

    ``codec`` (frozen, outside the trained module) maps ``batch.gen_images`` to latents;
    ``scheduler`` draws one timestep per generated image, noises its patches and names the
    regression target (epsilon for DDPM, velocity for rectified flow).
    """
    gen_tokens = gen_t = target = None
    n_gen = batch.gen_images.shape[0]
    if n_gen:
        with torch.no_grad():
            x0 = patchify(codec.encode(batch.gen_images), patch_size)  # (n_gen, N, P)
        t = scheduler.sample_timesteps(n_gen, device=x0.device, generator=generator)  # (n_gen,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        gen_tokens = scheduler.add_noise(x0, noise, t)
        target = scheduler.training_target(x0, noise, t)
        gen_t = t
    if batch.und_images.shape[0] and und_features is None:
        raise ValueError("batch has understanding images but no und_features were given")

    # Text logits only where a text target exists: avoids the (B, T, V) projection elsewhere.
    flat_targets = batch.targets.reshape(-1)
    text_pos = (flat_targets != IGNORE).nonzero(as_tuple=True)[0]  # (K,)
    out = model(
        batch.input_ids,
        batch.position_ids,
        batch.attention_mask(attn_impl),
        gen_tokens=gen_tokens,
        gen_index=batch.gen_index if n_gen else None,
        gen_timesteps=gen_t,
        und_features=und_features,
        und_index=batch.und_index if und_features is not None else None,
        logits_index=text_pos,
    )
    zero = out.hidden.sum() * 0.0  # keeps the graph connected when a modality is absent
    text = F.cross_entropy(out.logits.float(), flat_targets[text_pos]) if text_pos.numel() else zero
    image = F.mse_loss(out.image_pred.float(), target.float()) if n_gen else zero
    return LossBreakdown(
        total=text + image_loss_weight * image,
        text=text,
        image=image,
        text_tokens=int(text_pos.numel()),
        image_tokens=int(batch.gen_index.numel()) if n_gen else 0,
    )
