"""Sequence building: markers, spans, pre-shifted targets, packing, padding and truncation."""

import pytest
import torch
from PIL import Image

from hybrid.sequence import IGNORE, ImageSegment, SampleBuilder, SequenceTooLongError, SpecialIds, pack, tokenize_sample


def img(color=(255, 0, 0), size=32):
    return Image.new("RGB", (size, size), color)


def tok_sample(cfg, tokenizer, segs, **kw):
    return tokenize_sample(segs, tokenizer, SpecialIds.from_config(cfg), cfg.image_size, cfg.image_tokens, cfg.und_tokens, **kw)


def test_markers_spans_and_targets(debug_cfg, tokenizer):
    c = debug_cfg
    text = tokenizer.encode("a photo of a red circle", add_special_tokens=False)
    s = tok_sample(c, tokenizer, ["a photo of a red circle", img()])
    N = c.image_tokens
    expected = [c.bos_id, *text, c.boi_id] + [c.img_id] * N + [c.eoi_id, c.eos_id]
    assert s.input_ids == expected
    start = 1 + len(text) + 1
    assert s.spans == [(start, N, "gen_image")]
    # pre-shifted targets: text predicts the next text token and <boi>; image positions and the
    # position predicting <eoi> carry no text loss; <eoi> predicts <eos>.
    assert s.targets[: len(text) + 1] == [*text, c.boi_id]
    assert all(t == IGNORE for t in s.targets[start - 1 + 1 : start + N])
    assert s.targets[start + N] == c.eos_id and s.targets[-1] == IGNORE
    assert len(s.targets) == len(s.input_ids)


def test_caption_dropout_drops_only_caption_samples(debug_cfg, tokenizer):
    c = debug_cfg
    s = tok_sample(c, tokenizer, ["a photo of a red circle", img()], drop_caption=True)
    assert s.input_ids[:2] == [c.bos_id, c.boi_id]
    doc = ["Here is a picture.", img(), "And another one below it.", img()]
    assert tok_sample(c, tokenizer, doc, drop_caption=True).input_ids == tok_sample(c, tokenizer, doc).input_ids


def test_understanding_span_length_and_role(debug_cfg, tokenizer):
    s = tok_sample(debug_cfg, tokenizer, ["Look:", ImageSegment(img(), role="und"), "a photo of a red circle"])
    assert s.spans[0][1:] == (debug_cfg.und_tokens, "und_image")
    boi = s.spans[0][0] - 1
    assert s.input_ids[boi] == debug_cfg.boi_id and s.targets[boi - 1] == IGNORE, "an input image's <boi> is not a target"


def test_pack_documents_positions_and_index(debug_cfg, tokenizer):
    c = debug_cfg
    a = tok_sample(c, tokenizer, ["a photo of a red circle", img()])
    b = tok_sample(c, tokenizer, ["Here is a picture.", img((0, 0, 255)), "And another one below it.", img()])
    batch = pack([a, b, a], seq_len=c.max_seq_len, pad_id=c.pad_id)
    B, T = batch.input_ids.shape
    assert T == c.max_seq_len and batch.gen_images.shape[0] == 4
    assert batch.num_tokens == 2 * len(a) + len(b)
    for r in range(B):
        docs = batch.document_ids[r]
        for d in docs.unique().tolist():
            pos = batch.position_ids[r][docs == d]
            if d >= 0:
                assert torch.equal(pos, torch.arange(len(pos))), "positions restart at 0 per document"
    # gen_index points at the <img> placeholders, in sample order, spans never cross documents
    flat_ids = batch.input_ids.reshape(-1)
    assert (flat_ids[batch.gen_index.reshape(-1)] == c.img_id).all()
    flat_spans = batch.span_ids.reshape(-1)[batch.gen_index]
    assert all(len(row.unique()) == 1 for row in flat_spans)
    # the blue image is the second generated image
    assert batch.gen_images[1, 2].mean() == 1.0 and batch.gen_images[1, 0].mean() == 0.0
    # padding: pad ids, no targets, document -1
    pad = batch.document_ids == -1
    assert (batch.input_ids[pad] == c.pad_id).all() and (batch.targets[pad] == IGNORE).all()


def test_packing_off_gives_one_row_per_sample(debug_cfg, tokenizer):
    a = tok_sample(debug_cfg, tokenizer, ["a photo of a red circle"])
    assert pack([a, a, a], 64, 0, packing=False).input_ids.shape == (3, 64)
    assert pack([a, a, a], 64, 0).input_ids.shape == (1, 64)


def test_over_long_sample_is_an_error_or_a_documented_truncation(debug_cfg, tokenizer):
    c = debug_cfg
    s = tok_sample(c, tokenizer, ["Here is a picture.", img(), "And another one below it.", img()])
    assert len(s) > 40
    with pytest.raises(SequenceTooLongError, match="seq_len is 40"):
        pack([s], 40, c.pad_id)
    # cut inside the second image: that whole image (from its <boi>) is dropped
    second_boi = s.spans[1][0] - 1
    batch = pack([s], second_boi + 5, c.pad_id, truncate_long=True)
    assert batch.gen_images.shape[0] == 1
    kept = (batch.document_ids[0] >= 0).sum().item()
    assert kept == second_boi
    assert batch.targets[0, kept - 1] == IGNORE
    assert c.boi_id not in batch.input_ids[0, s.spans[0][0] :].tolist()


def test_bad_input_errors(debug_cfg, tokenizer):
    c = debug_cfg
    with pytest.raises(ValueError, match="empty sample"):
        tok_sample(c, tokenizer, [])
    with pytest.raises(ValueError, match="empty text"):
        tok_sample(c, tokenizer, ["", img()])
    with pytest.raises(ValueError, match="expects 32x32"):
        tok_sample(c, tokenizer, ["x", img(size=20)])
    with pytest.raises(ValueError, match="unsupported image mode"):
        tok_sample(c, tokenizer, ["x", Image.new("CMYK", (32, 32))])
    with pytest.raises(TypeError, match="segment of type int"):
        tok_sample(c, tokenizer, ["x", 3])
    # grayscale / RGBA convert safely
    tok_sample(c, tokenizer, ["x", Image.new("L", (32, 32)), "y", Image.new("RGBA", (32, 32))])


def test_builder_collates_dataset_items(debug_cfg, tokenizer):
    sb = SampleBuilder(tokenizer, debug_cfg)
    items = [{"segments": ["a photo of a red circle", img()], "drop_caption": True},
             {"segments": ["a photo of a red circle", img()], "drop_caption": False}]
    batch = sb(items)
    assert batch.caption_dropped.tolist() == [True, False]
    assert batch.input_ids[0, 1] == debug_cfg.boi_id
