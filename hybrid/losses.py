"""The hybrid objective: next-token cross-entropy on text + lambda * an image loss.

The image loss depends on the generation head: for "diffusion" it is Transfusion's MSE on the
scheduler's target for noised latent patches; for "ar" it is Janus' cross-entropy on the VQ code
ids of the image in raster order. For "tokens" (Chameleon) there is one next-token cross-entropy
over the shared vocabulary for text and code targets together (plus a z-loss), and input images
are VQ codes too. Kept apart from the model (DiT / MAR style):
``HybridModel.forward`` only predicts; this file prepares the image inputs, runs the model once
on the whole packed batch, and scores each modality on its own positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.latents import patchify
from hybrid.moe import router_losses
from hybrid.sequence import IGNORE, MultimodalBatch


def model_config(model: nn.Module):
    """The HybridConfig of a model that may be wrapped (DDP / DeepSpeed ``.module``, the trainer's
    ``ModelWithEncoder`` ``.model``)."""
    while not hasattr(model, "config") or not hasattr(model.config, "image_token_offset"):
        model = getattr(model, "module", None) or model.model
    return model.config


@dataclass
class LossBreakdown:
    total: Tensor  # scalar, what backward() is called on
    text: Tensor  # scalar, mean CE over text targets (0 if none)
    image: Tensor  # scalar: mean MSE over patch values ("diffusion") or mean CE over codes ("ar"); 0 if none
    text_tokens: int
    image_tokens: int
    moe_balance: Tensor | None = None  # scalar: load-balancing loss, mean over MoE layers (1.0 = balanced)
    moe_z: Tensor | None = None  # scalar: router z-loss, mean over MoE layers


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
    moe_aux_weight: float = 0.0,
    moe_z_weight: float = 0.0,
    z_loss_weight: float = 0.0,
) -> LossBreakdown:
    """One forward pass of ``model`` on ``batch`` and its loss.

    ``codec`` (frozen, outside the trained module) maps ``batch.gen_images`` to latents (or, for
    ``image_head="ar"``, to VQ code ids); ``scheduler`` draws one timestep per generated image,
    noises its patches and names the regression target (epsilon for DDPM, velocity for rectified
    flow). ``und_features`` (n_und, M, F) are the understanding encoder's outputs for
    ``batch.und_images``. A model with MoE layers adds ``moe_aux_weight`` x its load-balancing
    loss and ``moe_z_weight`` x its router z-loss (``hybrid.moe.router_losses``) to the total;
    ``z_loss_weight`` x mean logsumexp^2 of the LM head's logits at the trained positions is added
    too (Chameleon). With ``image_head="tokens"`` the codec also turns ``batch.und_images`` into
    codes (``und_features`` is not used), and ``total`` is one cross-entropy over text and code
    targets (``text`` and ``image`` report its two parts).
    """
    tokens = image_head == "tokens"
    gen_tokens = gen_t = target = codes = None
    n_gen = batch.gen_images.shape[0]
    # A batch without generated images still runs the image head, on nothing (n = 0 images): every
    # parameter is then used, in the same place, in every batch. Data-parallel ranks whose batches
    # differ in modalities must reduce the same gradients (DeepSpeed's buckets) and gather the
    # same parameters in the same order (ZeRO-3); the values are unaffected.
    gen_index = batch.gen_index
    if not n_gen and image_head in ("ar", "tokens"):
        codes = gen_index = batch.input_ids.new_zeros(0, 0)
    elif not n_gen:
        P = codec.latent_channels * patch_size**2
        gen_tokens, gen_t, gen_index = batch.gen_images.new_zeros(0, 0, P), batch.gen_images.new_zeros(0), \
            batch.input_ids.new_zeros(0, 0)
    elif image_head in ("ar", "tokens"):
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
    if tokens:
        with torch.no_grad():  # input images as codes, (n_und, M); none: (0, M) so the path stays in the graph
            und_features = (codec.encode_codes(batch.und_images).flatten(1) if batch.und_images.shape[0]
                             else batch.input_ids.new_zeros(0, batch.und_index.shape[1]))
    if batch.und_images.shape[0] and und_features is None:
        raise ValueError("batch has understanding images but no und_features were given")
    und_index = None  # und_features of no image (0, M, F): the aligner runs on nothing, as above
    if und_features is not None:
        und_index = batch.und_index if und_features.shape[0] else batch.und_index.new_zeros(0, und_features.shape[1])

    # Text logits only where a text target exists: avoids the (B, T, V) projection elsewhere.
    flat_targets = batch.targets.reshape(-1)
    text_pos = (flat_targets != IGNORE).nonzero(as_tuple=True)[0]  # (K,)
    logits_pos, logit_targets = text_pos, flat_targets[text_pos]
    if tokens and codes.numel():  # code i is the next token after position i - 1 (<boi> for the first)
        logits_pos = torch.cat([text_pos, gen_index.reshape(-1) - 1])
        logit_targets = torch.cat([logit_targets, codes.reshape(-1) + model_config(model).image_token_offset])
    out = model(
        batch.input_ids,
        batch.position_ids,
        batch.attention_mask(attn_impl),
        gen_tokens=gen_tokens,
        gen_index=gen_index,  # (n_gen, N)
        gen_timesteps=gen_t,
        und_features=und_features,
        und_index=und_index,
        logits_index=logits_pos,
        gen_codes=codes,
        want_code_logits=not tokens,
    )
    zero = out.hidden.sum() * 0.0  # keeps the graph connected when a modality is absent
    logits = out.logits.float()  # (K_text [+ K_codes], V)
    n_text = text_pos.numel()
    if tokens:  # one cross-entropy for everything; its text and code parts reported apart
        ce = F.cross_entropy(logits, logit_targets, reduction="none") if logit_targets.numel() else zero[None]
        text = ce[:n_text].mean() if n_text else zero
        image = ce[n_text:].mean() if ce.shape[0] > n_text else zero
        total = ce.mean()
    else:
        text = F.cross_entropy(logits, logit_targets) if n_text else zero
        if not n_gen:  # the head's output on nothing, times 0: in the graph, no value
            image = (out.code_logits if codes is not None else out.image_pred).float().sum() * 0.0
        elif codes is not None:
            image = F.cross_entropy(out.code_logits.flatten(0, 1).float(), codes.reshape(-1))
        else:
            image = F.mse_loss(out.image_pred.float(), target.float())
        total = text + image_loss_weight * image
    if z_loss_weight and logits.shape[0]:
        total = total + z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
    balance = zloss = None
    if out.routers:
        balance, zloss = router_losses(out.routers)
        total = total + moe_aux_weight * balance + moe_z_weight * zloss
    return LossBreakdown(
        total=total,
        text=text,
        image=image,
        text_tokens=int(text_pos.numel()),
        image_tokens=int(batch.gen_index.numel()) if n_gen else 0,
        moe_balance=balance,
        moe_z=zloss,
    )
