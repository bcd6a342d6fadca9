"""Per-modality attention masks for packed multimodal rows.

A row is described by two integer maps of shape (B, T):

* ``document_ids``: which packed sample a position belongs to (-1 for padding);
* ``span_ids``: which image span a position belongs to (-1 outside image spans), unique per row.

The rule (Transfusion): query ``q`` may attend key ``k`` iff they are in the same document and
either ``k <= q`` (causal) or both lie in the same image span (bidirectional inside an image).
Padding positions form their own causal "document", so no row of the mask is ever empty (an
all-False row makes SDPA return NaN).

Two implementations of the same rule: a dense boolean mask for
``scaled_dot_product_attention`` (the CPU / training path here) and a flex-attention
``BlockMask`` built from a ``mask_mod`` closure (the GPU path, which skips fully masked blocks).
Tests prove them equal.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

AttentionMask = Tensor | BlockMask


def _check_layout(document_ids: Tensor, span_ids: Tensor) -> None:
    if document_ids.shape != span_ids.shape or document_ids.dim() != 2:
        raise ValueError(
            f"document_ids and span_ids must both be (B, T); got {tuple(document_ids.shape)} "
            f"and {tuple(span_ids.shape)}"
        )


def dense_mask(document_ids: Tensor, span_ids: Tensor) -> Tensor:
    """Boolean mask (B, 1, T, T), True = may attend, for SDPA."""
    _check_layout(document_ids, span_ids)
    T = document_ids.shape[1]
    pos = torch.arange(T, device=document_ids.device)
    causal = pos[:, None] >= pos[None, :]  # (T, T)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    same_span = (span_ids[:, :, None] == span_ids[:, None, :]) & (span_ids[:, :, None] >= 0)
    return (same_doc & (causal | same_span))[:, None]  # (B, 1, T, T)


def transfusion_mask_mod(document_ids: Tensor, span_ids: Tensor):
    """The same rule as ``dense_mask`` written as a flex-attention ``mask_mod``."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_doc = document_ids[b, q_idx] == document_ids[b, kv_idx]
        q_span = span_ids[b, q_idx]
        same_span = (q_span >= 0) & (q_span == span_ids[b, kv_idx])
        return same_doc & ((q_idx >= kv_idx) | same_span)

    return mask_mod


def flex_block_mask(document_ids: Tensor, span_ids: Tensor, block_size: int = 128) -> BlockMask:
    """Flex-attention BlockMask (heads broadcast) for the same rule."""
    _check_layout(document_ids, span_ids)
    B, T = document_ids.shape
    mask_mod = transfusion_mask_mod(document_ids, span_ids)
    return create_block_mask(mask_mod, B, None, T, T, device=document_ids.device, BLOCK_SIZE=block_size)


def build_attention_mask(document_ids: Tensor, span_ids: Tensor, impl: str = "sdpa") -> AttentionMask:
    """The mask for ``HybridModel.forward`` in the form the attention implementation wants."""
    if impl == "sdpa":
        return dense_mask(document_ids, span_ids)
    if impl == "flex":
        return flex_block_mask(document_ids, span_ids)
    raise ValueError(f"unknown attention implementation {impl!r}; use 'sdpa' or 'flex'")


def cached_mask(past_valid: Tensor, document_ids: Tensor, span_ids: Tensor) -> Tensor:
    """Mask (B, 1, n, L + n) for a chunk of n new tokens run against L cached ones.

    The chunk's own part follows ``dense_mask`` (causal, bidirectional inside its image spans,
    padding on its own); a real new token sees every real cached token. A chunk never holds two
    documents: a cache is one document per row, left-padded (``document_ids`` -1 = padding)."""
    _check_layout(document_ids, span_ids)
    own = dense_mask(document_ids, span_ids)  # (B, 1, n, n)
    real = document_ids >= 0  # (B, n)
    past = past_valid[:, None, None, :] & real[:, None, :, None]  # (B, 1, n, L)
    return torch.cat([past, own], dim=-1)
