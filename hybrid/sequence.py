"""From samples (text and image segments) to packed rows the model reads.

A sample is an ordered list of segments: ``str`` (text), ``TextSegment`` (text with a loss
switch: a question the model reads but is not trained to write), ``ImageSegment`` (an image with
a role) or a bare PIL image (a generated image). ``tokenize_sample`` turns it into

    <bos> text ... <boi> <img> x N <eoi> text ... <eos>

with pre-shifted text targets (``targets[i]`` is the token that should follow position ``i``,
-100 where no text loss applies) and a list of image spans. ``pack`` places tokenized samples
into rows of a fixed length (first fit, in order), with position ids restarting at 0 for every
sample and per-row document / span maps for the attention mask.

Text-loss rule: every position whose next token is text (except a ``TextSegment(loss=False)``), ``<eos>`` or the ``<boi>`` of a generated
image is trained (so the model learns *when* to start an image; the ``<boi>`` of an input image
for understanding is not a prediction target). Positions inside an image span and the one predicting
``<eoi>`` are not: the pipeline inserts ``<eoi>`` itself after N image tokens.

Length rule: a sample longer than ``seq_len`` raises ``SequenceTooLongError`` unless
``truncate=True``; truncation cuts at ``seq_len`` tokens and, if that cut falls inside an image
span (its ``<boi>`` .. ``<eoi>``), cuts before that span's ``<boi>`` instead, so an image is
never split. The last kept position then gets no text target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from encoders.latents import pil_to_tensor
from hybrid.masks import AttentionMask, build_attention_mask

IGNORE = -100
GEN, UND = "gen_image", "und_image"


class SequenceTooLongError(ValueError):
    pass


def bidirectional_kinds(cfg) -> tuple[str, ...]:
    """The span kinds a model attends to bidirectionally: a diffused image (its patches are
    denoised jointly) and, unless the config says otherwise, an input image. An "ar" image is
    generated code by code, so its span stays causal like text."""
    kinds = (GEN,) if cfg.image_head == "diffusion" else ()
    return kinds + ((UND,) if cfg.und_bidirectional else ())


@dataclass
class ImageSegment:
    image: Image.Image | Tensor  # PIL image, or a (3, H, W) float tensor in [0, 1]
    role: str = "gen"  # "gen": the model generates it (diffusion loss); "und": the model reads it


@dataclass
class TextSegment:
    text: str
    loss: bool = True  # False: context only (an instruction or question), no text loss on it


@dataclass
class SpecialIds:
    bos: int
    eos: int
    boi: int
    eoi: int
    img: int
    pad: int

    @classmethod
    def from_config(cls, cfg) -> "SpecialIds":
        return cls(cfg.bos_id, cfg.eos_id, cfg.boi_id, cfg.eoi_id, cfg.img_id, cfg.pad_id)


@dataclass
class TokenizedSample:
    input_ids: list[int]
    targets: list[int]
    spans: list[tuple[int, int, str]]  # (start, length, kind); start is the first image token
    images: list[Tensor]  # one (3, H, W) tensor per span, in span order

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_sample(
    segments: Sequence[str | TextSegment | ImageSegment | Image.Image],
    tokenizer,
    ids: SpecialIds,
    image_size: int,
    gen_tokens: int,
    und_tokens: int,
    drop_caption: bool = False,
) -> TokenizedSample:
    """Tokenize one sample. ``drop_caption`` removes all text of a caption->image sample (exactly
    one text segment then one generated image): the unconditional branch of classifier-free
    guidance is trained on ``<bos><boi>image<eoi><eos>``, the same prefix sampling uses."""
    if len(segments) == 0:
        raise ValueError("empty sample: a sample needs at least one text or image segment")
    segs = [ImageSegment(s) if isinstance(s, Image.Image) else s for s in segments]
    if drop_caption and len(segs) == 2 and isinstance(segs[0], str) and _is_gen(segs[1]):
        segs = segs[1:]

    tokens: list[int] = [ids.bos]
    trained: list[bool] = [False]  # trained[i]: is tokens[i] a text-loss target?
    spans: list[tuple[int, int, str]] = []
    images: list[Tensor] = []
    for seg in segs:
        if isinstance(seg, (str, TextSegment)):
            text, loss = (seg, True) if isinstance(seg, str) else (seg.text, seg.loss)
            if not text:
                raise ValueError("empty text segment in sample")
            t = tokenizer.encode(text, add_special_tokens=False)
            tokens += t
            trained += [loss] * len(t)
        elif isinstance(seg, ImageSegment):
            if seg.role not in ("gen", "und"):
                raise ValueError(f"image role must be 'gen' or 'und', got {seg.role!r}")
            n = gen_tokens if seg.role == "gen" else und_tokens
            img = seg.image if isinstance(seg.image, Tensor) else pil_to_tensor(seg.image, image_size)
            if img.shape != (3, image_size, image_size):
                raise ValueError(f"image tensor must be (3, {image_size}, {image_size}), got {tuple(img.shape)}")
            tokens.append(ids.boi)
            trained.append(seg.role == "gen")  # the model learns when to *draw*; inputs just arrive
            spans.append((len(tokens), n, GEN if seg.role == "gen" else UND))
            images.append(img)
            tokens += [ids.img] * n + [ids.eoi]
            trained += [False] * (n + 1)
        else:
            raise TypeError(f"segment of type {type(seg).__name__}; expected str, TextSegment, ImageSegment or PIL image")
    tokens.append(ids.eos)
    trained.append(True)
    targets = [tokens[i + 1] if trained[i + 1] else IGNORE for i in range(len(tokens) - 1)] + [IGNORE]
    return TokenizedSample(tokens, targets, spans, images)


def _is_gen(seg) -> bool:
    return isinstance(seg, ImageSegment) and seg.role == "gen"


def truncate(sample: TokenizedSample, seq_len: int) -> TokenizedSample:
    """Cut to at most ``seq_len`` tokens without splitting an image span (see module doc)."""
    if len(sample) <= seq_len:
        return sample
    cut = seq_len
    keep_spans = []
    for start, n, kind in sample.spans:
        boi, eoi = start - 1, start + n
        if eoi < cut:
            keep_spans.append((start, n, kind))
        elif boi < cut:
            cut = boi  # the cut lands inside this span: drop the whole image
    if cut < 1:
        raise SequenceTooLongError(f"nothing of the sample fits in seq_len={seq_len}")
    targets = sample.targets[:cut]
    targets[-1] = IGNORE  # its next token was cut away
    return TokenizedSample(sample.input_ids[:cut], targets, keep_spans, sample.images[: len(keep_spans)])


@dataclass
class MultimodalBatch:
    input_ids: Tensor  # (B, T) long
    position_ids: Tensor  # (B, T) long, restart at 0 per document
    targets: Tensor  # (B, T) long, pre-shifted, -100 = no text loss
    document_ids: Tensor  # (B, T) long, -1 = padding
    span_ids: Tensor  # (B, T) long, -1 = not inside a bidirectional image span
    gen_images: Tensor  # (n_gen, 3, H, W) float in [0, 1]
    gen_index: Tensor  # (n_gen, N) long: flat positions into B*T
    und_images: Tensor  # (n_und, 3, H, W)
    und_index: Tensor  # (n_und, M) long
    caption_dropped: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # (n_samples,)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MultimodalBatch":
        return MultimodalBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def attention_mask(self, impl: str = "sdpa") -> AttentionMask:
        return build_attention_mask(self.document_ids, self.span_ids, impl)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (for throughput)."""
        return int((self.document_ids >= 0).sum())


def pack(
    samples: Sequence[TokenizedSample],
    seq_len: int,
    pad_id: int,
    truncate_long: bool = False,
    packing: bool = True,
    bidirectional: Sequence[str] = (GEN, UND),
    pad_left: bool = False,
) -> MultimodalBatch:
    """Pack samples into rows of exactly ``seq_len`` tokens, first fit in the given order.
    ``packing=False`` puts every sample in its own (right-padded) row; with ``pad_left`` the
    padding goes first, so every row ends at the same index (a batched prompt for a KV cache).
    Spans of the kinds in ``bidirectional`` get span ids (bidirectional attention inside them);
    the others stay causal (see ``bidirectional_kinds``)."""
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    if pad_left and packing:
        raise ValueError("pad_left=True needs packing=False (one sample per row)")
    checked = []
    for i, s in enumerate(samples):
        if len(s) > seq_len:
            if not truncate_long:
                raise SequenceTooLongError(
                    f"sample {i} has {len(s)} tokens but seq_len is {seq_len}; raise seq_len, "
                    f"shorten the sample, or pack with truncate_long=True"
                )
            s = truncate(s, seq_len)
        checked.append(s)
    rows: list[list[TokenizedSample]] = []
    room: list[int] = []
    for s in checked:
        for r, free in enumerate(room):
            if packing and len(s) <= free:
                rows[r].append(s)
                room[r] -= len(s)
                break
        else:
            rows.append([s])
            room.append(seq_len - len(s))

    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    document_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    span_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    gen_imgs, gen_idx, und_imgs, und_idx = [], [], [], []
    for b, row in enumerate(rows):
        off, n_span = (seq_len - len(row[0])) if pad_left else 0, 0
        lead = off
        for d, s in enumerate(row):
            L = len(s)
            input_ids[b, off : off + L] = torch.tensor(s.input_ids)
            targets[b, off : off + L] = torch.tensor(s.targets)
            position_ids[b, off : off + L] = torch.arange(L)
            document_ids[b, off : off + L] = d
            for (start, n, kind), img in zip(s.spans, s.images):
                if kind in bidirectional:
                    span_ids[b, off + start : off + start + n] = n_span
                    n_span += 1
                flat = torch.arange(n) + b * seq_len + off + start
                (gen_imgs if kind == GEN else und_imgs).append(img)
                (gen_idx if kind == GEN else und_idx).append(flat)
            off += L
        # Padding: position ids keep counting so RoPE stays well defined; pads never affect tokens.
        position_ids[b, off:] = torch.arange(seq_len - off)
        position_ids[b, :lead] = torch.arange(lead)

    def stack(imgs, idx):
        if not imgs:
            return torch.zeros(0, 3, 1, 1), torch.zeros(0, 0, dtype=torch.long)
        return torch.stack(imgs), torch.stack(idx)

    gi, gx = stack(gen_imgs, gen_idx)
    ui, ux = stack(und_imgs, und_idx)
    return MultimodalBatch(input_ids, position_ids, targets, document_ids, span_ids, gi, gx, ui, ux)


class SampleBuilder:
    """The DataLoader collate function: tokenizes samples with a model's special ids and span
    sizes and packs them. Caption dropout is decided by the dataset when items are dicts (exact
    across resumes); for raw segment lists it is drawn from this builder's seeded RNG."""

    def __init__(self, tokenizer, cfg, seq_len: int | None = None, caption_dropout: float | None = None,
                 truncate_long: bool = False, seed: int = 0):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.ids = SpecialIds.from_config(cfg)
        self.seq_len = seq_len or cfg.max_seq_len
        self.caption_dropout = cfg.caption_dropout if caption_dropout is None else caption_dropout
        self.truncate_long = truncate_long
        self.bidirectional = bidirectional_kinds(cfg)
        self.rng = random.Random(seed)

    def tokenize(self, segments, drop_caption: bool = False) -> TokenizedSample:
        c = self.cfg
        return tokenize_sample(segments, self.tokenizer, self.ids, c.image_size, c.image_tokens, c.und_tokens, drop_caption)

    def __call__(self, batch: Sequence) -> MultimodalBatch:
        """Collate a list of samples: raw segment lists (caption dropout drawn from this builder's
        RNG) or dicts ``{"segments": [...], "drop_caption": bool}`` (the dataset decided, which
        keeps the decision a pure function of the sample index and so exact across resumes)."""
        segs, drops = [], []
        for item in batch:
            if isinstance(item, dict):
                segs.append(item["segments"])
                drops.append(bool(item.get("drop_caption", False)))
            else:
                segs.append(item)
                drops.append(self.rng.random() < self.caption_dropout)
        samples = [self.tokenize(s, d) for s, d in zip(segs, drops)]
        out = pack(samples, self.seq_len, self.ids.pad, self.truncate_long,
                   bidirectional=self.bidirectional)
        out.caption_dropped = torch.tensor(drops, dtype=torch.bool)
        return out
