"""Benchmark harness for the peer implementation: lucidrains' ``transfusion-pytorch``.

Install (pins the version this harness was written and checked against; it adds only new
packages and upgrades none of ours -- torch/torchvision stay capped by /etc/xdg/pip):

    .venv/bin/pip install transfusion-pytorch==0.20.0

(pulls in axial_positional_embedding 0.3.12, beartype 0.23.1, einx 0.4.3, ema-pytorch 0.8.3,
frozendict 2.5.1, jaxtyping 0.3.11, loguru 0.7.3, rotary-embedding-torch 0.9.1, scipy 1.17.1,
torch-einops-utils 0.2.0, torchdiffeq 0.2.5, wadler_lindig 0.1.8).

Configuration built by ``build_peer`` (defaults):

    Transfusion(num_text_tokens=256, dim_latent=16, channel_first_latent=True,
                modality_default_shape=(8, 8), add_pos_emb=False,
                odeint_kwargs=dict(method="euler"),
                transformer=dict(dim=384, depth=6, heads=6, dim_head=64))

i.e. one decoder of width 384, 6 layers, 6 heads x 64, GEGLU FFN of 1024 (the same width as our
8/3*dim SwiGLU), plus the peer's own extras (adaLN time conditioning, U-Net skips, gated
attention, attention-residual mixing). One image = 8x8 = 64 tokens of 16 latent channels.

Sequence the peer builds for text->image (the same layout as ours, ``<bos> prompt <boi> img*N``):

    [sos] [prompt: L text ids] [som] [64 image tokens]          (then [eom], never run here)

Image sampling goes through ``Transfusion.sample_many`` (the peer's batched, always-KV-cached
sampler): one forward builds the KV cache of ``[sos] prompt [som]``, then every ODE step runs only
the 64 image tokens against that cache. Classifier-free guidance is on by default in the peer
(``cfg_scale=3``): the unconditional branch is the same prefix with every text id (sos and som
included) replaced by the peer's ``null_text_id``, with its own KV cache, run as a second
batch-1 forward per step (not batched with the conditional one). ``api="sample_one"`` selects the
serial sampler instead (what ``model.sample()`` is); it gives the same latents (checked, max
abs diff ~1e-6) but recomputes the full ``[sos] prompt [som] image`` sequence for the conditional
branch at every step, because its cache is only filled by text decoding steps, which a forced
image skips.
"""

from __future__ import annotations

from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import torch
from torch import Tensor, nn

try:
    PEER_VERSION: str | None = version("transfusion-pytorch")
except PackageNotFoundError:  # the harness stays importable without the peer installed
    PEER_VERSION = None

_INSTALL_HINT = "pip install transfusion-pytorch==0.20.0"


def _import_peer():
    """Import the peer lazily and silence its per-call progress bar and log lines, which would
    otherwise flood the benchmark's output (they do not change what is computed)."""
    if PEER_VERSION is None:
        raise ImportError(f"transfusion-pytorch is not installed; run `{_INSTALL_HINT}`")
    import transfusion_pytorch.transfusion as peer
    from loguru import logger

    logger.disable("transfusion_pytorch")
    if not isinstance(peer.tqdm, partial):  # patch the name the peer's module looked up, once
        peer.tqdm = partial(peer.tqdm, disable=True)
    return peer


def build_peer(dim: int = 384, depth: int = 6, heads: int = 6, dim_head: int = 64,
               text_vocab: int = 256, latent_channels: int = 16, grid: int = 8) -> nn.Module:
    """The peer's ``Transfusion`` at our decoder's size, fp32, CPU, eval mode, random weights."""
    peer = _import_peer()
    model = peer.Transfusion(
        num_text_tokens=text_vocab,  # the peer appends its own sos/eos/null/som/eom/meta ids
        dim_latent=latent_channels,  # a Linear maps each 16-channel latent cell to one token
        channel_first_latent=True,  # latents come back as (C, grid, grid), like ours
        modality_default_shape=(grid, grid),  # shape used when the image is forced without a shape
        # False is the peer's default, and sample_many ignores the axial embedding while decoding
        # (with it on, sample_one and sample_many disagree), so image tokens carry no 2D position
        add_pos_emb=False,
        # Euler: one model evaluation (x2 with CFG) per ODE step, as our sampler; the peer's
        # default midpoint solver costs two evaluations per step
        odeint_kwargs=dict(method="euler"),
        transformer=dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head),
    )
    return model.float().eval().requires_grad_(False)


@torch.no_grad()
def peer_sample_image(model: nn.Module, prompt_ids: Tensor, num_steps: int, *,
                      cfg_scale: float = 3.0,
                      api: Literal["sample_many", "sample_one"] = "sample_many") -> Tensor:
    """One image's latents (1, C, grid, grid) for a (1, L) text prompt, with exactly ``num_steps``
    Euler ODE steps through the peer's own sampler. ``prompt_ids`` must not hold a BOS: the peer
    prepends its ``sos``. The initial noise comes from torch's global RNG (seed with
    ``torch.manual_seed``)."""
    assert prompt_ids.ndim == 2 and prompt_ids.shape[0] == 1, "one prompt, shape (1, L)"
    kwargs = dict(
        force_modality_at_start=0,  # appends [som] to the prompt: decode image type 0 right away
        modality_steps=num_steps + 1,  # the peer integrates over linspace(0, 1, modality_steps)
        max_length=0,  # stop once the image is done instead of decoding text after its [eom]
        cfg_scale=cfg_scale,
        return_without_prompt=True,  # only the decoded modalities come back
        return_unprocessed_modalities=True,  # no modality decoder is attached anyway
    )
    prompt = prompt_ids[0].long()
    if api == "sample_many":
        (image,) = model.sample_many([prompt], **kwargs)[0]
    else:
        (image,) = model.sample_one(prompt, cache_kv=True, **kwargs)
    return image.tensor.unsqueeze(0)


@torch.no_grad()
def peer_generate_text(model: nn.Module, prompt_ids: Tensor, max_new_tokens: int, *,
                       temperature: float = 1.0) -> Tensor:
    """Exactly ``max_new_tokens`` new ids (1, max_new_tokens) after a (1, L) prompt, through
    ``Transfusion.generate_text_only`` with its KV cache (one prefill forward over the prompt,
    then one single-token forward per new token). That API has no EOS stop, and with
    temperature > 0 it masks the logits to the ``text_vocab`` ids so no special id is sampled.
    It adds no ``sos``: the prompt is used as given (prepend ``model.sos_id`` to mimic a BOS)."""
    assert prompt_ids.ndim == 2 and prompt_ids.shape[0] == 1, "one prompt, shape (1, L)"
    total_len = prompt_ids.shape[1] + max_new_tokens  # the peer's seq_len counts the prompt too
    return model.generate_text_only(prompt_ids.long(), total_len, temperature=temperature,
                                    cache_kv=True)
