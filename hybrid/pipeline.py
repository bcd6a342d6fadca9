"""HybridPipeline: a trained model and its components behind one generation API.

    pipe = HybridPipeline.from_pretrained("runs/recipe/hybrid/final")
    pipe.generate_text("Describe the image.", images=["x.png"])          # understanding
    pipe.generate_image("a photo of a red circle", num_images=4, seed=0)  # generation
    pipe.generate_interleaved("Here is a picture.")                     # text, <boi>, image, text

Components are plain attributes, swappable after loading (``check()`` runs before every call and
names any mismatch): ``model`` (HybridModel), ``tokenizer``, ``scheduler`` (the diffusion
head's noise scheduler), ``vq`` (VQTokenizer, or None for a pixel-space model) and ``siglip``
(SiglipEncoder for input images, or None).

Folder layout (``save_pretrained``; the trainer's ``final/`` and ``hybrid.convert`` write the
same): ``config.json`` + ``model.safetensors`` (the model), ``tokenizer/``, ``scheduler.json``,
``vq/`` and ``siglip/`` (each config.json + safetensors).

Every call runs on a KV cache (``hybrid.sampling``): the prompt once, then one token, one code
or one denoising step's image tokens at a time. Seeds make results reproducible row by row:
``seed=s`` gives output i the generator ``s + i`` (or pass one seed per output), so a batch
returns exactly what its prompts return one at a time with those seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from encoders.images import ImageError, check_size, fit_square, open_image, to_rgb
from encoders.latents import PixelCodec
from hybrid.checkpoint import CONFIG, load_pretrained_model, save_pretrained_model
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.sampling import (
    commit_image, decode_image, denoise, image_prefix, prefill, run_chunk, sample_codes, sample_token,
    scheduler_for, with_uncond_rows,
)
from hybrid.sequence import ImageSegment, SpecialIds, TokenizedSample, tokenize_sample
from schedulers import Scheduler, get_scheduler, scheduler_from_dict

SCHEDULER_FILE = "scheduler.json"
# dtype names the entry points accept (the CLI, the eval drivers, the toolkit adapters)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ImageLike = Image.Image | str | Path | Tensor
Seed = int | Sequence[int] | None
# load_image's messages for encoders.images' problems (training data counts them by reason instead)
_IMAGE_PROBLEM = {
    "zero_size": "{where} has zero size ({detail})",
    "corrupt_image": "{where} is not a readable image ({detail})",
    "too_large": "{where} is too large to decode ({detail})",
    "unsupported_mode": "{where}: {detail}; convert it to 8-bit RGB first",
}


@dataclass
class TextGeneration:
    texts: list[str]  # one per prompt, stop string and eos removed
    token_ids: list[list[int]]  # the generated ids, as sampled (eos / stop tokens included)
    finish_reasons: list[str]  # "eos", "stop" (a stop string), "length" (max_new_tokens or the context)
    scores: list[Tensor] | None = None  # per step (B, V) logits, if output_scores


@dataclass
class ImageGeneration:
    images: list[Image.Image]
    pixels: Tensor  # (n, 3, H, W) in [0, 1]
    latents: Tensor | None = None  # (n, C, h, w): the diffusion head's latents, if return_latents
    codes: Tensor | None = None  # (n, h, w) VQ codes ("ar" head)


@dataclass
class InterleavedGeneration:
    parts: list[str | Image.Image] = field(default_factory=list)  # in order
    finish_reason: str = "length"


class HybridPipeline:
    def __init__(self, model: HybridModel, tokenizer, scheduler: Scheduler | None = None, vq=None, siglip=None):
        self.model, self.tokenizer, self.scheduler, self.vq, self.siglip = model, tokenizer, scheduler, vq, siglip
        if self.scheduler is None and model.config.image_head == "diffusion":
            self.scheduler = scheduler_for(model.config)
        self.model.eval()
        self.check()

    # ---------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "HybridPipeline":
        """Load a folder written by ``save_pretrained`` (or a training run's ``final/``); local only."""
        from encoders.siglip import SiglipEncoder
        from encoders.vq import VQTokenizer
        from hybrid.tokenizer import load_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"pipeline folder {path} does not exist")
        for name in (CONFIG, "tokenizer"):
            if not (path / name).exists():
                raise FileNotFoundError(f"{path} has no {name}; expected a folder from HybridPipeline.save_pretrained "
                                        f"or a training run's final/")
        model = load_pretrained_model(path)
        cfg = model.config
        # as saved: the markers the config's ids point at are in it (ours, or a converted
        # checkpoint's own, e.g. Janus' <begin_of_image>); check() compares the two
        tok = load_tokenizer(path / "tokenizer", add_markers=False)
        sched = None
        if (path / SCHEDULER_FILE).is_file():
            sched = scheduler_from_dict(json.loads((path / SCHEDULER_FILE).read_text()))
        vq = VQTokenizer.from_pretrained(path / "vq") if (path / "vq").is_dir() else None
        if cfg.image_codec == "vq" and vq is None:
            raise FileNotFoundError(f"{path} has no vq/ folder but the model generates VQ latents (image_codec='vq')")
        siglip = SiglipEncoder.from_pretrained(path / "siglip") if (path / "siglip").is_dir() else None
        return cls(model, tok, sched, vq, siglip).to(device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        save_pretrained_model(self.model, path)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        if self.scheduler is not None:
            (path / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.to_dict(), indent=2) + "\n")
        if self.vq is not None:
            self.vq.save_pretrained(path / "vq")
        if self.siglip is not None:
            self.siglip.save_pretrained(path / "siglip")
        return path

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "HybridPipeline":
        """Move the model and encoders; ``dtype`` (e.g. torch.bfloat16 on a GPU) applies to all
        three. Sampling state (noise, scheduler arithmetic) stays fp32 whatever the dtype."""
        for m in (self.model, self.vq, self.siglip):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    def compile(self, **kwargs) -> "HybridPipeline":
        """``torch.compile`` the model in place, with dynamic shapes (the cache grows every step).
        The first call of each kind (prompt, decoding step, denoising step) compiles, about a
        minute on 2 CPU cores; after that, decoding runs ~1.4x faster on the CPU, where a
        one-token step is otherwise dominated by per-operator overhead (bench/results/generation.md).
        Outputs equal the eager ones up to float rounding. Weights and saving are unaffected."""
        self.model.compile(dynamic=True, **kwargs)
        return self

    @property
    def config(self) -> HybridConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def codec(self):
        return self.vq if self.vq is not None else PixelCodec()

    # ---------------------------------------------------------------- validation
    def check(self) -> None:
        """Raise a ValueError naming every way the components disagree with the model config."""
        c = self.config
        bad = []
        vocab = self.tokenizer.get_vocab()
        if len(self.tokenizer) > c.vocab_size:
            bad.append(f"tokenizer has {len(self.tokenizer)} tokens, the model's vocab_size is {c.vocab_size}")
        for role, want in (("<boi>", c.boi_id), ("<eoi>", c.eoi_id), ("<img>", c.img_id)):
            if role in vocab and vocab[role] != want:
                bad.append(f"tokenizer's {role} is id {vocab[role]}, the model config says {want}")
        if c.image_codec == "vq":
            if self.vq is None:
                bad.append("the model generates VQ latents (image_codec='vq') but no vq tokenizer is set")
            else:
                for name, have, want in (("latent_channels", self.vq.latent_channels, c.latent_channels),
                                         ("downsample", self.vq.downsample, c.latent_downsample)):
                    if have != want:
                        bad.append(f"vq {name}={have}, the model config says {want}")
                if c.image_head != "diffusion" and self.vq.codebook_size != c.codebook_size:
                    bad.append(f"vq codebook_size={self.vq.codebook_size}, the model config says {c.codebook_size}")
        elif self.vq is not None:
            bad.append("a vq tokenizer is set but the model works in pixel space (image_codec='pixel')")
        if self.siglip is not None and c.image_head != "tokens":  # "tokens" reads input images as VQ codes
            if self.siglip.feature_dim != c.und_feature_dim:
                bad.append(f"siglip feature_dim={self.siglip.feature_dim}, the model's und_feature_dim={c.und_feature_dim}")
            if self.siglip.num_tokens != c.und_tokens:
                bad.append(f"siglip gives {self.siglip.num_tokens} tokens, the model's und_tokens={c.und_tokens}")
        if c.image_head == "diffusion" and self.scheduler is not None:
            trained = get_scheduler(c.scheduler)
            if self.scheduler.prediction_type != trained.prediction_type:
                bad.append(f"scheduler {self.scheduler.name!r} predicts {self.scheduler.prediction_type}, the model "
                           f"was trained with {c.scheduler!r} ({trained.prediction_type})")
        if bad:
            raise ValueError("pipeline components do not match the model:\n  " + "\n  ".join(bad))

    # ---------------------------------------------------------------- inputs
    def load_image(self, image: ImageLike) -> Tensor:
        """A path, PIL image or (3, H, W) float tensor in [0, 1] -> (3, S, S) at the model's image
        size, decoded by ``encoders.images`` as training data is: a file is read upright (EXIF
        orientation), palette / grey / alpha (on white) / CMYK / ... become RGB, 16-bit grey is
        scaled to 8 bit; float and other modes are an error. Unlike training's centre crop, a
        non-square image is padded to a square with grey, as Janus does, then resized to S."""
        S = self.config.image_size
        where = "image"  # what error messages call it: the file, or just "image"
        try:
            if isinstance(image, (str, Path)):
                p = Path(image)
                if not p.is_file():
                    raise FileNotFoundError(f"image file {p} does not exist")
                try:
                    data = p.read_bytes()
                except OSError as e:
                    raise ValueError(f"{p} is not a readable image ({e})") from None
                where = str(p)
                # max_pixels=None: a prompt's photo may be large; only PIL's bomb limit applies
                image = open_image(data, where, max_pixels=None)
            if isinstance(image, Tensor):
                if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                    raise ValueError(f"an image tensor must be float (3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}")
                image = image.detach().float().cpu()
                if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                    raise ValueError("an image tensor must hold finite values in [0, 1]")
                image = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected an image path, PIL image or tensor, got {type(image).__name__}")
            check_size(image.size, where)
            image = fit_square(to_rgb(image, where), S, "pad")
        except ImageError as e:
            raise ValueError(_IMAGE_PROBLEM[e.reason].format(where=e.where, detail=e.detail)) from None
        arr = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, S, S)

    def prompt_row(self, prompt: str | Sequence, images: Sequence[ImageLike] = (), image_next: bool = False) -> TokenizedSample:
        """The tokenized prompt every generate call starts from: ``<bos> [input images] prompt``
        (+ ``<boi>`` when an image follows). ``prompt`` may also be a segment list (str /
        TextSegment / ImageSegment(role="und")) for full control of the order; the generate
        methods take such a list as one prompt only inside a batch list: ``[segments]``."""
        c = self.config
        if isinstance(prompt, str):
            segs = [ImageSegment(self.load_image(im), "und") for im in images] + ([prompt] if prompt else [])
        else:
            if images:
                raise ValueError("pass input images inside the segment list, not also as images=")
            segs = [ImageSegment(self.load_image(s.image), s.role) if isinstance(s, ImageSegment) else s for s in prompt]
            if any(isinstance(s, ImageSegment) and s.role != "und" for s in segs):
                raise ValueError("a prompt's images are inputs: use ImageSegment(image, role='und')")
        if not segs and not image_next:
            raise ValueError("empty prompt: give text or input images")
        if segs:
            s = tokenize_sample(segs, self.tokenizer, SpecialIds.from_config(c), c.image_size, c.image_tokens, c.und_tokens)
            ids, spans, imgs = s.input_ids[:-1], s.spans, s.images  # drop <eos>: the prompt goes on
        else:
            ids, spans, imgs = [c.bos_id], [], []
        if spans and c.image_head == "tokens" and self.vq is None:
            raise ValueError("input images are read as VQ codes (image_head='tokens'), but this pipeline has no vq")
        if spans and c.image_head != "tokens" and self.siglip is None:
            raise ValueError("input images need an understanding encoder, but this pipeline has no siglip")
        if image_next:
            ids = ids + [c.boi_id]
        return TokenizedSample(ids, [-100] * len(ids), spans, imgs)

    def _und_encoder(self) -> Callable[[Tensor], Tensor] | None:
        if self.config.image_head == "tokens":  # Chameleon: an input image is its codes, (n, N)
            return None if self.vq is None else lambda pixels: self.vq.encode_codes(pixels.to(self.device)).flatten(1)
        if self.siglip is None:
            return None
        return lambda pixels: self.siglip(pixels.to(self.device))

    def _check_fits(self, rows: Sequence[TokenizedSample], extra: int, what: str) -> None:
        longest = max(len(r) for r in rows)
        if longest + extra > self.config.max_seq_len:
            raise ValueError(f"the prompt is {longest} tokens; with {extra} more for {what} that exceeds the "
                             f"context of {self.config.max_seq_len} tokens (max_seq_len)")

    def _generators(self, seed: Seed, n: int) -> list[torch.Generator] | None:
        if seed is None:
            return None
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} outputs")
        return [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def stream_text(self, prompt: str | Sequence[str], images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] = (),
                    max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, stop: Sequence[str] = (), seed: Seed = None,
                    output_scores: bool = False, ignore_eos: bool = False) -> Iterator[list[str]]:
        """Yield, after every decoding step, the new text of each prompt (a list, one string per
        prompt; "" where nothing new is printable yet). The return value (``StopIteration.value``,
        or what ``generate_text`` returns) is the ``TextGeneration``. ``ignore_eos`` never samples
        ``<eos>`` (exactly ``max_new_tokens`` tokens: benchmarks)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        per_prompt = _images_per_prompt(images, len(prompts))
        rows = [self.prompt_row(p, im) for p, im in zip(prompts, per_prompt)]
        self.check()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_fits(rows, 0, "new tokens")  # a full context still yields one token
        c, B = self.config, len(rows)
        capacity = min(c.max_seq_len, max(len(r) for r in rows) + max_new_tokens)
        cache, out = prefill(self.model, rows, self._und_encoder(), capacity)
        logits = out.logits  # (B, V) at each prompt's last token
        gens = self._generators(seed, B)
        ids: list[list[int]] = [[] for _ in range(B)]
        shown = [""] * B
        reasons: list[str | None] = [None] * B
        scores = [] if output_scores else None
        # a stop string may be arriving: hold back as many characters as could start one, so
        # nothing yielded is later cut (the hold is released when the row ends)
        hold = max((len(s) for s in stop), default=1) - 1
        ends = self._end_ids()
        banned = self.non_text_ids() + [c.boi_id]  # text only: this API draws no images
        for step in range(max_new_tokens):
            last = step == max_new_tokens - 1 or cache.length + 1 > c.max_seq_len
            if scores is not None:
                scores.append(logits.float().cpu())
            logits = logits.clone()
            logits[:, banned + (ends if ignore_eos else [])] = float("-inf")
            tok = sample_token(logits, temperature, top_k, top_p, gens)  # (B,)
            deltas = [""] * B
            for b, t in enumerate(tok.tolist()):
                if reasons[b] is not None:
                    continue
                ids[b].append(t)
                if t in ends:
                    reasons[b], text = "eos", self._decode(ids[b][:-1])
                else:
                    text = self._decode(ids[b])
                    cut = _find_stop(text, stop)
                    if cut is not None:
                        text, reasons[b] = text[:cut], "stop"
                    elif not last:
                        if text.endswith("\ufffd"):
                            continue  # a multi-byte character is not complete yet
                        text = text[:max(0, len(text) - hold)]
                if len(text) > len(shown[b]):
                    deltas[b], shown[b] = text[len(shown[b]):], text
            yield deltas
            if all(r is not None for r in reasons) or last:
                break  # when the context is full, the rows still running end with "length"
            feed = torch.where(torch.tensor([r is None for r in reasons], device=tok.device), tok, c.pad_id)
            logits = run_chunk(self.model, cache, feed[:, None], keep=True).logits
        return TextGeneration(shown, ids, [r or "length" for r in reasons], scores)

    def generate_text(self, prompt: str | Sequence[str], images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] = (),
                      max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, stop: Sequence[str] = (), seed: Seed = None,
                      output_scores: bool = False, ignore_eos: bool = False) -> TextGeneration:
        """Continue each prompt (batched, left-padded, KV-cached). ``prompt``: a string, or a list
        of prompts, each a string or a segment list (see ``prompt_row``; a single segment list
        must be wrapped: ``[segments]``). ``images``: input images for a single string prompt, or
        one list per prompt. temperature 0 is greedy."""
        it = self.stream_text(prompt, images, max_new_tokens, temperature, top_k, top_p, stop, seed, output_scores,
                              ignore_eos)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def _end_ids(self) -> list[int]:
        """The config's eos and the tokenizer's, if they differ (Llama 3 Instruct ends turns with
        <|eot_id|>, while its config names <|end_of_text|>)."""
        tok_eos = self.tokenizer.eos_token_id
        return sorted({self.config.eos_id} | ({tok_eos} if tok_eos is not None else set()))

    def non_text_ids(self) -> list[int]:
        """Ids the model must not write as text: padding, the image placeholder, an image end, and
        in "tokens" mode the VQ codes (they are written only inside an image, after ``<boi>``)."""
        c = self.config
        codes = set(range(c.image_token_offset, c.vocab_size)) if c.image_head == "tokens" else set()
        return sorted(({c.pad_id, c.img_id, c.eoi_id} | codes) - set(self._end_ids()))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---------------------------------------------------------------- images
    @torch.no_grad()
    def generate_image(self, prompt: str | Sequence[str], num_images: int = 1, num_steps: int = 25,
                       guidance_scale: float = 3.0, scheduler: str | Scheduler | None = None, seed: Seed = None,
                       images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] = (), temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, return_latents: bool = False,
                       callback: Callable | None = None, progress: bool = False) -> ImageGeneration:
        """``num_images`` images per prompt, prompt-major. The diffusion head runs ``num_steps``
        steps of ``scheduler`` (default: the pipeline's; a name builds a fresh one); the "ar" head
        samples one code per image token with ``temperature`` / ``top_k`` / ``top_p``. Both guide
        with ``guidance_scale`` (1 = no unconditional branch). ``images`` puts input images in the
        prefix (text + image -> image). ``callback``: diffusion ``(step, t, x_t, model_output)``,
        "ar" ``(index, logits)``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        per_prompt = _images_per_prompt(images, len(prompts))
        rows = [self.prompt_row(p, im, image_next=True) for p, im in zip(prompts, per_prompt) for _ in range(num_images)]
        self.check()
        c, n = self.config, len(rows)
        self._check_fits(rows, c.image_tokens, "the image")
        sched = self.resolve_scheduler(scheduler)
        gens = self._generators(seed, n)
        use_cfg = guidance_scale != 1.0
        cache, boi_hidden = image_prefix(self.model, rows, use_cfg, self._und_encoder())
        latents = codes = None
        if c.image_head != "diffusion":  # "ar" / "tokens": codes
            bar = _progress(c.image_tokens, progress, "image tokens")
            codes = sample_codes(self.model, cache, boi_hidden, n, guidance_scale, temperature, top_k, top_p,
                                 gens, _tick(callback, bar))
            bar.close()
            pixels = decode_image(self.model, self.codec, codes=codes)
        else:
            bar = _progress(num_steps, progress, "denoising")
            x = denoise(self.model, cache, n, sched, num_steps, guidance_scale, gens, _tick(callback, bar))
            bar.close()
            pixels = decode_image(self.model, self.codec, tokens=x)
            if return_latents:
                from encoders.latents import unpatchify
                latents = unpatchify(x, c.patch_size, c.latent_channels)
        if codes is not None:
            side = c.image_size // c.latent_downsample
            codes = codes.view(n, side, side)
        return ImageGeneration(_to_pil(pixels), pixels.float().cpu(), latents, codes)

    def resolve_scheduler(self, scheduler: str | Scheduler | None = None) -> Scheduler | None:
        """The scheduler generate_image(scheduler=...) would run: the pipeline's own for None, a fresh
        one for a name; checked against the prediction type the model was trained with. None for
        the "ar" head, which samples codes."""
        if self.config.image_head != "diffusion":
            return None
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            sched = get_scheduler(scheduler)  # unknown names: a ValueError listing the valid ones
            if scheduler == "ddpm" and self.config.image_codec == "pixel":
                sched = get_scheduler("ddpm", clip_sample=True)  # as scheduler_for: bounded pixel latents
        else:
            sched = scheduler
        trained = get_scheduler(self.config.scheduler).prediction_type
        if sched.prediction_type != trained:
            raise ValueError(f"scheduler {sched.name!r} predicts {sched.prediction_type}, but the model was trained "
                             f"with {self.config.scheduler!r} ({trained})")
        return sched

    # ---------------------------------------------------------------- interleaved
    @torch.no_grad()
    def generate_interleaved(self, prompt: str | Sequence, images: Sequence[ImageLike] = (), max_new_tokens: int = 128,
                             max_images: int = 4, temperature: float = 0.0, top_k: int | None = None,
                             top_p: float | None = None, num_steps: int = 25, guidance_scale: float = 3.0,
                             image_temperature: float = 1.0, image_top_k: int | None = None, seed: int | None = None,
                             progress: bool = False) -> InterleavedGeneration:
        """Write text; when the model emits ``<boi>``, generate the image in place (with CFG
        against a ``<bos><boi>`` row), append the clean image and ``<eoi>`` to the cache, and go
        on writing. Returns the text pieces and images in order. ``max_new_tokens`` counts the
        tokens the model writes (text and each ``<boi>``); after ``max_images`` images a further ``<boi>`` is not allowed. ``seed`` seeds the
        text; image k is drawn with ``seed + 1 + k``. ``progress`` shows a bar per image."""
        c = self.config
        row = self.prompt_row(prompt, images)
        self.check()
        self._check_fits([row], 0, "new tokens")
        cache, out = prefill(self.model, [row], self._und_encoder(),
                             min(c.max_seq_len, len(row) + max_new_tokens + max_images * (c.image_tokens + 2)))
        ends, banned = self._end_ids(), self.non_text_ids()
        logits = out.logits
        gen = self._generators(seed, 1)
        result = InterleavedGeneration()
        text: list[int] = []
        n_images = 0
        for _ in range(max_new_tokens):
            logits = logits.clone()
            logits[:, banned + ([c.boi_id] if n_images >= max_images else [])] = float("-inf")
            tok = int(sample_token(logits, temperature, top_k, top_p, gen)[0])
            if tok in ends:
                result.finish_reason = "eos"
                break
            if tok != c.boi_id:
                text.append(tok)
                if cache.length + 1 > c.max_seq_len:
                    break
                logits = run_chunk(self.model, cache, torch.tensor([[tok]], device=self.device), keep=True).logits
                continue
            if cache.length + c.image_tokens + 2 > c.max_seq_len:
                break  # no room for an image: stop rather than cut it
            if text:
                result.parts.append(self._decode(text))
                text = []
            boi = run_chunk(self.model, cache, torch.tensor([[c.boi_id]], device=self.device), keep=True)
            # image k draws from seed + 1 + k: the image generate_image(prompt so far, seed=seed + 1 + k) draws
            img_gen = self._generators(None if seed is None else seed + 1 + n_images, 1)
            image, logits = self._image_in_place(cache, boi.hidden[:, -1], guidance_scale, num_steps,
                                                 image_temperature, image_top_k, img_gen, progress)
            result.parts.append(image)
            n_images += 1
        if text:
            result.parts.append(self._decode(text))
        return result

    def _image_in_place(self, cache, boi_hidden: Tensor, guidance_scale: float, num_steps: int,
                        temperature: float, top_k: int | None, gen, progress: bool) -> tuple[Image.Image, Tensor]:
        """Generate one image after the ``<boi>`` that ends ``cache`` (one row), then commit the
        clean image and ``<eoi>`` to it. Returns the image and the logits after ``<eoi>``."""
        c = self.config
        both, hidden = cache, boi_hidden
        if guidance_scale != 1.0:  # rows [cond, uncond]; the cond part is ``cache`` itself
            both, hidden = with_uncond_rows(self.model, cache, boi_hidden, c.image_tokens + 1)
        codes_head = c.image_head != "diffusion"  # "ar" / "tokens"
        bar = _progress(c.image_tokens if codes_head else num_steps, progress, "image")
        if codes_head:
            codes = sample_codes(self.model, both, hidden, 1, guidance_scale, temperature, top_k, None, gen,
                                 _tick(None, bar))
            out = commit_image(self.model, cache, codes=codes[:, -1:])
            pixels = decode_image(self.model, self.codec, codes=codes)
        else:
            x = denoise(self.model, both, 1, self.scheduler, num_steps, guidance_scale, gen, _tick(None, bar))
            out = commit_image(self.model, cache, tokens=x)
            pixels = decode_image(self.model, self.codec, tokens=x)
        bar.close()
        return _to_pil(pixels)[0], out.logits

    # ---------------------------------------------------------------- info
    def info(self) -> dict:
        c = self.config
        return {
            "parameters": self.model.num_parameters(),
            "image_head": c.image_head, "image_codec": c.image_codec, "image_size": c.image_size,
            "image_tokens": c.image_tokens, "max_seq_len": c.max_seq_len, "vocab_size": c.vocab_size,
            "scheduler": self.scheduler.to_dict() if self.scheduler is not None else None,
            "vq": None if self.vq is None else {"latent_channels": self.vq.latent_channels,
                                                 "downsample": self.vq.downsample, "codebook_size": self.vq.codebook_size},
            "siglip": None if self.siglip is None else {"feature_dim": self.siglip.feature_dim,
                                                         "num_tokens": self.siglip.num_tokens,
                                                         "image_size": self.siglip.image_size},
            "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype),
        }


# --- helpers ------------------------------------------------------------------------------------

def _images_per_prompt(images, n: int) -> list[list]:
    images = list(images)
    if not images:
        return [[] for _ in range(n)]
    if all(isinstance(i, (list, tuple)) for i in images):
        if len(images) != n:
            raise ValueError(f"{len(images)} image lists for {n} prompts")
        return [list(i) for i in images]
    if n != 1:
        raise ValueError("with several prompts, pass one list of input images per prompt")
    return [images]


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def to_uint8(pixels: Tensor) -> np.ndarray:
    """(n, 3, H, W) floats in [0, 1] -> (n, H, W, 3) uint8 numpy, as PIL and the detector want."""
    return (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _to_pil(pixels: Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(pixels)]


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, show: bool, desc: str):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def _tick(callback, bar):
    def f(*args):
        bar.update(1)
        if callback is not None:
            callback(*args)
    return f
