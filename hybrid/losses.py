"""The hybrid objective: next-token cross-entropy on text + lambda * an image loss.

The image loss depends on the generation head: for "diffusion" it is Transfusion's MSE on the
scheduler's target for noised latent patches; for "ar" it is Janus' cross-entropy on the VQ code
ids of the image in raster order. Kept apart from the model (DiT / MAR style):
``HybridModel.forward`` only predicts; this file prepares the image inputs, runs the model once
on the whole packed batch, and scores each modality on its own positions only.
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
    image: Tensor  # scalar: mean MSE over patch values ("diffusion") or mean CE over codes ("ar"); 0 if none
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
    image_head: str = "diffusion",
) -> LossBreakdown:
    """One forward pass of ``model`` on ``batch`` and its loss.

    ``codec`` (frozen, outside the trained module) maps ``batch.gen_images`` to latents (or, for
    ``image_head="ar"``, to VQ code ids); ``scheduler`` draws one timestep per generated image,
    noises its patches and names the regression target (epsilon for DDPM, velocity for rectified
    flow). ``und_features`` (n_und, M, F) are the understanding encoder's outputs for
    ``batch.und_images``.
    """
    gen_tokens = gen_t = target = codes = None
    n_gen = batch.gen_images.shape[0]
    # A batch without generated images still runs the image head, on nothing (n = 0 images): every
    # parameter is then used, in the same place, in every batch. Data-parallel ranks whose batches
    # differ in modalities must reduce the same gradients (DeepSpeed's buckets) and gather the
    # same parameters in the same order (ZeRO-3); the values are unaffected.
    gen_index = batch.gen_index
    if not n_gen and image_head == "ar":
        codes = gen_index = batch.input_ids.new_zeros(0, 0)
    elif not n_gen:
        P = codec.latent_channels * patch_size**2
        gen_tokens, gen_t, gen_index = batch.gen_images.new_zeros(0, 0, P), batch.gen_images.new_zeros(0), \
            batch.input_ids.new_zeros(0, 0)
    elif image_head == "ar":
        with torch.no_grad():
            codes = codec.encode_codes(batch.gen_images).flatten(1)  # (n_gen, N) raster order
    else:
        with torch.no_grad():
            x0 = patchify(codec.encode_latents(batch.gen_images), patch_size)  # (n_gen, N, P)
        t = scheduler.sample_timesteps(n_gen, device=x0.device, generator=generator)  # (n_gen,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        gen_tokens = scheduler.add_noise(x0, noise, t)
        target = scheduler.training_target(x0, noise, t)
        gen_t = t
    if batch.und_images.shape[0] and und_features is None:
        raise ValueError("batch has understanding images but no und_features were given")
    und_index = None  # und_features of no image (0, M, F): the aligner runs on nothing, as above
    if und_features is not None:
        und_index = batch.und_index if und_features.shape[0] else batch.und_index.new_zeros(0, und_features.shape[1])

    # Text logits only where a text target exists: avoids the (B, T, V) projection elsewhere.
    flat_targets = batch.targets.reshape(-1)
    text_pos = (flat_targets != IGNORE).nonzero(as_tuple=True)[0]  # (K,)
    out = model(
        batch.input_ids,
        batch.position_ids,
        batch.attention_mask(attn_impl),
        gen_tokens=gen_tokens,
        gen_index=gen_index,  # (n_gen, N)
        gen_timesteps=gen_t,
        und_features=und_features,
        und_index=und_index,
        logits_index=text_pos,
        gen_codes=codes,
    )
    zero = out.hidden.sum() * 0.0  # keeps the graph connected when a modality is absent
    text = F.cross_entropy(out.logits.float(), flat_targets[text_pos]) if text_pos.numel() else zero
    if not n_gen:  # the head's output on nothing, times 0: in the graph, no value
        image = (out.code_logits if codes is not None else out.image_pred).float().sum() * 0.0
    elif codes is not None:
        image = F.cross_entropy(out.code_logits.flatten(0, 1).float(), codes.reshape(-1))
    else:
        image = F.mse_loss(out.image_pred.float(), target.float())
    return LossBreakdown(
        total=text + image_loss_weight * image,
        text=text,
        image=image,
        text_tokens=int(text_pos.numel()),
        image_tokens=int(batch.gen_index.numel()) if n_gen else 0,
    )
