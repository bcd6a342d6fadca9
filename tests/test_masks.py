"""The per-modality mask: semantics on hand-written layouts, and flex == dense on random ones."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

from hybrid.masks import dense_mask, flex_block_mask, transfusion_mask_mod


def layout(rows: list[list[tuple[str, int]]], T: int):
    """rows: per row, a list of (kind, length) with kind in text/image/doc/pad; 'doc' starts a
    new document (length 0). Returns document_ids, span_ids (1 row each)."""
    B = len(rows)
    doc = torch.full((B, T), -1)
    span = torch.full((B, T), -1)
    for b, row in enumerate(rows):
        pos, d, s = 0, 0, 0
        for kind, n in row:
            if kind == "doc":
                d += 1
                continue
            if kind == "pad":
                pos += n
                continue
            doc[b, pos : pos + n] = d
            if kind == "image":
                span[b, pos : pos + n] = s
                s += 1
            pos += n
    return doc, span


def random_layout(B: int, T: int, rng: random.Random):
    rows = []
    for _ in range(B):
        row, used = [], 0
        while used < T:
            kind = rng.choice(["text", "text", "image", "doc", "pad"]) if used else "text"
            n = 0 if kind == "doc" else rng.randint(1, max(1, min(12, T - used)))
            if kind == "pad":
                n = T - used  # padding only at the end
            row.append((kind, n))
            used += n
        rows.append(row)
    return layout(rows, T)


def test_text_is_causal():
    doc, span = layout([[("text", 6)]], 6)
    m = dense_mask(doc, span)[0, 0]
    assert torch.equal(m, torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def test_image_span_is_bidirectional_and_text_after_sees_whole_image():
    # text(3) image(4) text(3)
    doc, span = layout([[("text", 3), ("image", 4), ("text", 3)]], 10)
    m = dense_mask(doc, span)[0, 0]
    img = range(3, 7)
    for q in img:
        for k in img:
            assert m[q, k], "an image token must see all of its own image"
        for k in range(3):
            assert m[q, k], "an image token sees the text before it"
        for k in range(7, 10):
            assert not m[q, k], "an image token never sees later text"
    for q in range(7, 10):
        assert all(m[q, k] for k in img), "text after an image sees the whole image"
    for q in range(3):
        assert not any(m[q, k] for k in img), "text before an image never sees it"


def test_no_token_sees_a_later_image():
    doc, span = layout([[("text", 2), ("image", 3), ("text", 1), ("image", 3)]], 9)
    m = dense_mask(doc, span)[0, 0]
    first, second = range(2, 5), range(6, 9)
    for q in first:
        assert not any(m[q, k] for k in second)
    for q in second:
        assert all(m[q, k] for k in first)


def test_documents_never_see_each_other():
    doc, span = layout([[("text", 3), ("image", 2), ("doc", 0), ("image", 2), ("text", 3), ("pad", 2)]], 12)
    m = dense_mask(doc, span)[0, 0]
    a, b = range(0, 5), range(5, 10)
    assert not any(m[q, k] for q in b for k in a)
    assert not any(m[q, k] for q in a for k in b)
    # padding sees only padding, and nobody real sees padding
    assert not any(m[q, k] for q in range(10) for k in range(10, 12))
    # every row attends to something (no NaN from an empty softmax row)
    assert m.any(-1).all()


def test_two_images_in_one_document_are_separate_spans():
    doc, span = layout([[("image", 3), ("image", 3)]], 6)
    m = dense_mask(doc, span)[0, 0]
    assert not m[0, 3] and m[3, 0]


@pytest.mark.parametrize("seed", range(5))
def test_flex_mask_mod_equals_dense(seed):
    rng = random.Random(seed)
    B, T = 3, rng.choice([37, 64, 150])
    doc, span = random_layout(B, T, rng)
    dense = dense_mask(doc, span)
    from_mod = create_mask(transfusion_mask_mod(doc, span), B, 1, T, T, device="cpu")
    assert torch.equal(dense, from_mod)


@pytest.mark.parametrize("seed", range(3))
def test_flex_attention_equals_sdpa_forward(seed):
    rng = random.Random(seed)
    B, H, T, hd = 2, 2, 160, 16
    doc, span = random_layout(B, T, rng)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, hd, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, span))
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=flex_block_mask(doc, span, block_size=32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_layout_shape_errors():
    with pytest.raises(ValueError, match="both be"):
        dense_mask(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long))
