"""The siglip stage: a small SigLIP trained from scratch on the shapes world's image-caption pairs.

    python -m train train/configs/siglip.yaml                          # ~5 min on 2 CPU cores
    python -m train train/configs/siglip.yaml steps=20 output_dir=runs/sig_dbg   # seconds
    accelerate launch -m train train/configs/siglip.yaml               # GPUs / several processes

The model and the loss are open_clip's: ``open_clip.CustomTextCLIP`` built from a small config
dict (vision: open_clip's ViT on 32x32 images; text: a bidirectional transformer pooled at the
last position, as open_clip's SigLIP configs are) and ``open_clip.loss.SigLipLoss`` with SigLIP's
initial logit scale log(10) and bias -10. Captions are tokenised with the project's byte-level
BPE trained on the world's text (``hybrid.tokenizer``): open_clip's bundled CLIP tokenizer needs
no download either, but its 49,408-word vocabulary would make the token embedding ~6M of a ~1.5M
parameter model and dominate CPU time, and SigLIP's own tokenizer would need the hub.

Each batch holds distinct captions: the sigmoid loss treats every off-diagonal pair as a
negative, and the world has few captions of some kinds (4 single-object ones), so repeats would
be false negatives. Run state is checkpointed like the hybrid stage (``accelerator.save_state``;
``trainer_state.json`` written last marks a checkpoint complete) and a rerun resumes.

Zero-shot retrieval is evaluated on held-out renders (unseen colour-shape pairs) and, for
comparison, on fresh train-split renders: image->text picks the right caption among the distinct
captions of that GenEval tag in the eval set; text->image picks an image with that caption among
the tag's images. Chance levels are computed for the same candidate sets and reported beside.

``final/`` holds the vision tower as a ``SiglipEncoder`` (config.json + model.safetensors), the
whole model in open_clip's folder format (open_clip_config.json + open_clip_model.safetensors,
loadable with ``open_clip.create_model("local-dir:...")``), the tokenizer and metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from encoders.siglip import SiglipEncoder, open_clip_preprocess
from hybrid.tokenizer import load_tokenizer, train_tokenizer
from train.config import build_config, read_raw
from train.shapes import Scene, ShapeObject, ShapesWorld, describe, render
from train.trainer import lr_lambda, resume_run, save_run

# SigLIP's preprocessing (open_clip's tags for SigLIP): mean/std 0.5, bicubic, squash.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Train-split eval renders are drawn from indices the training stream does not reach.
EVAL_TRAIN_OFFSET = 1_000_000_000


@dataclass
class SiglipTrainConfig:
    stage: str = "siglip"
    output_dir: str = "runs/siglip"
    seed: int = 0
    image_size: int = 32

    # architecture (open_clip CustomTextCLIP)
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    embed_dim: int = 128
    context_length: int = 12  # prompts are <= 10 BPE tokens + <eos>; scene captions need ~24
    # What an image is paired with: "prompt", its GenEval prompt ("a photo of a red circle", which
    # names one object of a crowded scene, or none of the colours), or "scene", every object's
    # colour and shape left to right (``shapes.describe``): captions that differ only in a shape are
    # then negatives of each other, so the encoder has to see shape (with prompts, colour alone tells
    # most pairs apart and a linear probe reads shape at 0.40 from its features).
    captions: str = "prompt"
    # "scene" captions only: each image comes with a twin in its batch, the same scene with one
    # object's shape changed (same colour, place and size), captioned accordingly. The pair differs
    # only in one shape word, so the sigmoid loss can only separate them by seeing that shape. Even
    # scene captions rarely give such pairs at random (a probe read shape at 0.39 without them).
    shape_twins: bool = False
    tokenizer_vocab: int = 512
    init_logit_scale: float = math.log(10)  # SigLIP's initialisation
    init_logit_bias: float = -10.0

    # optimisation
    steps: int = 500
    batch_size: int = 128  # distinct captions per batch and process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # "no" (fp32: the CPU path), "bf16", "fp16" (GPUs)
    num_workers: int = 0
    # CPU threads for torch; None keeps torch's default (all cores). On a shared 2-core machine
    # 1 thread can be several times faster than 2 (2 threads stall when a core is taken).
    num_threads: int | None = None

    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 100
    eval_per_split: int = 600  # renders per split for zero-shot retrieval (spread over the 6 tags)
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto": newest checkpoint in output_dir if any; "none"; or a path
    stop_at: int | None = None  # end this invocation after this step (checkpointing there)

    def __post_init__(self) -> None:
        problems = []
        if self.stage != "siglip":
            problems.append(f"stage must be 'siglip', got {self.stage!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be no/bf16/fp16, got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "save_every", "keep_checkpoints",
                     "eval_per_split", "context_length", "patch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.captions not in ("prompt", "scene"):
            problems.append(f"captions must be 'prompt' or 'scene', got {self.captions!r}")
        if self.shape_twins and self.captions != "scene":
            problems.append("shape_twins needs captions='scene' (a prompt does not say which shape changed)")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.vision_width % self.vision_head_width or self.text_width % self.text_heads:
            problems.append("vision_width / text_width must be divisible by vision_head_width / text_heads")
        if problems:
            raise ValueError("invalid siglip config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_cfg(self, vocab_size: int, pad_id: int) -> dict[str, Any]:
        """The open_clip model config (the dict ``open_clip.create_model`` reads from JSON)."""
        return {
            "embed_dim": self.embed_dim,
            "init_logit_bias": self.init_logit_bias,
            "custom_text": True,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.vision_head_width, "pool_type": "avg"},
            # SigLIP's text tower: no causal mask, pooled at the last position (padding included)
            "text_cfg": {"context_length": self.context_length, "vocab_size": vocab_size, "pad_id": pad_id,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
                         "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
        }

    def preprocess_cfg(self) -> dict[str, Any]:
        return {"size": self.image_size, "mode": "RGB", "mean": list(SIGLIP_MEAN), "std": list(SIGLIP_STD),
                "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SiglipTrainConfig:
    """Read a siglip-stage YAML file (or defaults if ``path`` is None) and apply overrides."""
    return build_config(SiglipTrainConfig, read_raw(path, overrides))


def build_model(model_cfg: dict[str, Any], init_logit_scale: float) -> torch.nn.Module:
    import open_clip

    kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    return open_clip.CustomTextCLIP(**kwargs, init_logit_scale=init_logit_scale)


# --------------------------------------------------------------------------- data
def tokenize(tokenizer: Any, texts: list[str], context_length: int) -> torch.Tensor:
    """Captions -> (n, context_length) ids: BPE tokens, <eos>, then <pad> (SigLIP pads to a fixed
    length and the text tower pools the last position). Too-long captions are an error."""
    out = torch.full((len(texts), context_length), tokenizer.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        ids = ids + [tokenizer.eos_token_id]
        if len(ids) > context_length:
            raise ValueError(f"caption {texts[i]!r} has {len(ids)} tokens with <eos>, more than "
                             f"context_length={context_length}")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def to_pixels(images: list) -> torch.Tensor:
    """PIL images -> (n, 3, H, W) float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (n, H, W, 3) uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


class DistinctCaptionPairs(Dataset):
    """(pixels, ids) pairs from the shapes world, where every block of ``batch_size``
    consecutive indices holds distinct captions (so a batch of a sequential loader does).

    Block ``b`` takes ``world.caption_example(j)`` for j = b * stride, b * stride + 1, ...,
    skipping repeated captions: a pure function of the index, so resuming by skipping batches
    reproduces the data exactly."""

    def __init__(self, world: ShapesWorld, tokenizer: Any, batch_size: int, context_length: int,
                 length: int = 10_000_000, captions: str = "prompt", shape_twins: bool = False) -> None:
        self.world, self.tokenizer, self.batch_size = world, tokenizer, batch_size
        self.captions, self.shape_twins = captions, shape_twins
        self.context_length, self.length = context_length, length
        self.stride = 8 * batch_size
        self._last: tuple[int, Any] = (-1, None)  # the block being read (a loader reads in order)

    def __len__(self) -> int:
        return self.length

    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``b``: (batch_size, 3, H, W) pixels and (batch_size, context_length) ids."""
        if self._last[0] != b:
            self._last = (b, self._make_block(b))
        return self._last[1]

    def _make_block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, Any] = {}
        for j in range(b * self.stride, (b + 1) * self.stride):
            ex = self.world.caption_example(j, "train")
            pairs = [(caption_of(ex, self.captions), ex.image)]
            if self.shape_twins:
                twin = shape_twin(self.world, ex.scene, random.Random(f"twin:{j}"))
                if twin is not None and len(seen) + 2 <= self.batch_size:  # the pair shares a batch
                    pairs.append((describe(twin), render(twin)))
            if len(pairs) == 2 and any(c in seen for c, _ in pairs):
                continue  # keep twins together: both new, or neither
            for caption, image in pairs:
                seen.setdefault(caption, image)
            if len(seen) == self.batch_size:
                break
        else:
            raise ValueError(f"found only {len(seen)} distinct captions in {self.stride} examples; "
                             f"use a smaller batch_size than {self.batch_size}")
        return to_pixels(list(seen.values())), tokenize(self.tokenizer, list(seen), self.context_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        pixels, ids = self.block(index // self.batch_size)
        k = index % self.batch_size
        return pixels[k], ids[k]


def shape_twin(world: ShapesWorld, scene: Scene, rng: random.Random) -> Scene | None:
    """``scene`` with one object's shape changed: same colour, centre and size, a shape whose
    colour pairing the training split allows (never a held-out pair). None if no object can change."""
    options = [(i, s) for i, o in enumerate(scene.objects) for s in world.shapes
               if s != o.shape and (o.color, s) not in world.heldout_pairs]
    if not options:
        return None
    i, shape = rng.choice(options)
    o = scene.objects[i]
    objects = list(scene.objects)
    objects[i] = ShapeObject(shape, o.color, o.cx, o.cy, o.size)  # the same box: no new overlap
    return Scene(tuple(objects), scene.resolution)


def caption_of(example: Any, captions: str) -> str:
    """The text a SigLIP image is paired with (SiglipTrainConfig.captions)."""
    return describe(example.scene) if captions == "scene" else example.prompt


# --------------------------------------------------------------------------- evaluation
def eval_set(world: ShapesWorld, split: str, n: int) -> list:
    start = EVAL_TRAIN_OFFSET if split == "train" else 0  # held-out renders are never trained on
    return [world.caption_example(start + i, split) for i in range(n)]


@torch.no_grad()
def zero_shot_retrieval(model: torch.nn.Module, tokenizer: Any, examples: list, cfg: SiglipTrainConfig,
                        device: torch.device) -> dict[str, Any]:
    """Top-1 image->text and text->image retrieval within each GenEval tag, with chance levels.

    i2t: an image scores every distinct caption of its tag in ``examples``; right if its own
    caption wins (chance 1/K). t2i: a caption scores every image of its tag; right if the winner
    carries that caption (chance = its share of the tag's images)."""
    pixels = open_clip_preprocess(to_pixels([e.image for e in examples]), cfg.preprocess_cfg()).to(device)
    img = torch.cat([model.encode_image(p, normalize=True) for p in pixels.split(256)])  # (n, E)
    by_tag: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_tag[e.tag].append(i)
    hits = {"i2t": [], "t2i": []}
    chance = {"i2t": [], "t2i": []}
    per_tag = {}
    for tag, idx in by_tag.items():
        text = [caption_of(examples[i], getattr(cfg, "captions", "prompt")) for i in idx]  # as trained
        captions = sorted(set(text))
        txt = model.encode_text(tokenize(tokenizer, captions, cfg.context_length).to(device), normalize=True)
        sim = img[idx] @ txt.T  # (n_tag, K): the logit's order equals the cosine's
        own = torch.tensor([captions.index(c) for c in text], device=device)
        i2t = (sim.argmax(1) == own).float()
        t2i = (own[sim.argmax(0)] == torch.arange(len(captions), device=device)).float()
        share = torch.bincount(own, minlength=len(captions)).float() / len(idx)
        hits["i2t"] += i2t.tolist()
        hits["t2i"] += t2i.tolist()
        chance["i2t"] += [1 / len(captions)] * len(idx)
        chance["t2i"] += share.tolist()
        per_tag[tag] = {"i2t": i2t.mean().item(), "t2i": t2i.mean().item(), "candidates": len(captions)}
    return {"i2t_top1": fmean(hits["i2t"]), "i2t_chance": fmean(chance["i2t"]),
            "t2i_top1": fmean(hits["t2i"]), "t2i_chance": fmean(chance["t2i"]), "per_tag": per_tag}


# --------------------------------------------------------------------------- training
def build_optimizer(model: torch.nn.Module, cfg: SiglipTrainConfig) -> torch.optim.Optimizer:
    # open_clip's rule: no weight decay on gains, biases, embeddings' 1-D params, logit scale/bias
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.startswith("logit_") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def export(model: torch.nn.Module, model_cfg: dict, cfg: SiglipTrainConfig, tokenizer: Any, final: Path) -> None:
    """final/: the SiglipEncoder (vision tower), the whole open_clip model, the tokenizer."""
    final.mkdir(parents=True, exist_ok=True)
    SiglipEncoder.from_open_clip_model(model, model_cfg, cfg.preprocess_cfg()).save_pretrained(final)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(final / "open_clip_model.safetensors"), metadata={"format": "pt"})
    text = {"tokenizer": "tokenizer", "context_length": cfg.context_length, "append_eos": True,
            "pad_id": tokenizer.pad_token_id}
    (final / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": cfg.preprocess_cfg(), "text": text}, indent=2))
    tokenizer.save_pretrained(str(final / "tokenizer"))


def train(cfg: SiglipTrainConfig) -> Path:
    """Run (or resume) the siglip stage. Returns the exported folder (or the last checkpoint if
    stopped early by ``stop_at``)."""
    from open_clip.loss import SigLipLoss

    out = Path(cfg.output_dir)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    world = ShapesWorld(resolution=cfg.image_size, seed=cfg.seed)
    tok_dir = out / "tokenizer"
    if main and not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(world.corpus_texts(), cfg.tokenizer_vocab).save_pretrained(str(tok_dir))
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(tok_dir)

    model_cfg = cfg.model_cfg(vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)
    model = build_model(model_cfg, cfg.init_logit_scale)
    loss_fn = SigLipLoss(rank=accelerator.process_index, world_size=accelerator.num_processes)
    dataset = DistinctCaptionPairs(world, tokenizer, cfg.batch_size, cfg.context_length, captions=cfg.captions,
                                   shape_twins=cfg.shape_twins)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, drop_last=True,
                        num_workers=cfg.num_workers)
    optimizer = build_optimizer(model, cfg)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    run_objects = {"lr_schedule": lr_sched}  # not prepared: stepped once per step, not per process

    step = resume_run(accelerator, out, cfg.resume, "model_cfg", model_cfg, run_objects)

    unwrapped = accelerator.unwrap_model(model)
    log_file = (out / "log.jsonl").open("a") if main else None
    evals = {s: eval_set(world, s, cfg.eval_per_split) for s in ("heldout", "train")} if main else {}
    if main:
        n_params = sum(p.numel() for p in unwrapped.parameters())
        accelerator.print(f"siglip: {n_params / 1e6:.2f}M parameters, {len(tokenizer)} tokens, "
                          f"{(cfg.image_size // cfg.patch_size) ** 2} patches per image")

    def log(rec: dict) -> None:
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    def evaluate(at: int) -> dict[str, Any]:
        unwrapped.eval()
        res = {s: zero_shot_retrieval(unwrapped, tokenizer, ex, cfg, accelerator.device) for s, ex in evals.items()}
        unwrapped.train()
        flat = {f"{s}_{k}": v for s, r in res.items() for k, v in r.items() if k != "per_tag"}
        log({"step": at, **flat})
        accelerator.print(f"step {at}: zero-shot top-1 held-out i2t {flat['heldout_i2t_top1']:.3f} "
                          f"(chance {flat['heldout_i2t_chance']:.3f}), t2i {flat['heldout_t2i_top1']:.3f} "
                          f"(chance {flat['heldout_t2i_chance']:.3f}); train i2t {flat['train_i2t_top1']:.3f}")
        return res

    def checkpoint(at: int) -> None:
        save_run(accelerator, out, at, "model_cfg", model_cfg, cfg.keep_checkpoints, objects=run_objects)

    model.train()
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    batches = accelerator.skip_first_batches(loader, step) if step else loader
    bar = tqdm(total=cfg.steps, initial=step, disable=not main, desc="siglip", dynamic_ncols=True)
    t_last, seen = time.perf_counter(), 0
    for pixels, ids in batches:
        if step >= end:
            break
        with accelerator.autocast():
            image_f, text_f, scale, bias = model(open_clip_preprocess(pixels, cfg.preprocess_cfg()), ids)
            loss = loss_fn(image_f, text_f, scale, bias)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += pixels.shape[0] * accelerator.num_processes
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            rec = {"step": step, "loss": loss.item(), "lr": lr_sched.get_last_lr()[0],
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "logit_scale": scale.item(), "logit_bias": bias.item(), "pairs_per_s": seen / (now - t_last)}
            t_last, seen = now, 0
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", t=f"{rec['logit_scale']:.1f}", b=f"{rec['logit_bias']:.1f}",
                            pairs_s=f"{rec['pairs_per_s']:.0f}")
        bar.update(1)
        if step % cfg.save_every == 0 and step < end:
            checkpoint(step)
        if main and step % cfg.eval_every == 0 and step < cfg.steps:
            evaluate(step)
    bar.close()

    checkpoint(step)
    if step < cfg.steps:
        accelerator.print(f"stopped at step {step} of {cfg.steps}; rerun the same command to resume")
        if log_file:
            log_file.close()
        return out / "checkpoints" / f"step_{step:07d}"
    final = out / "final"
    if main:
        res = evaluate(step)
        export(unwrapped, model_cfg, cfg, tokenizer, final)
        metrics = {"step": step, "candidates": "distinct captions of the image's GenEval tag in the eval set",
                   "eval_per_split": cfg.eval_per_split, **res}
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log_file.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
