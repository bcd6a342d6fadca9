"""The VQ stage: train the generation-path image tokenizer (a diffusers VQModel) on the shapes world.

    python -m train train/configs/vq.yaml                       # CPU, a few minutes -> runs/vq/final
    python -m train train/configs/vq.yaml steps=20 output_dir=runs/vq_dbg    # seconds
    accelerate launch -m train train/configs/vq.yaml             # several processes / GPUs

Loss = reconstruction + the quantiser's codebook and commitment terms (VQ-VAE: ||sg[z] - e||^2 +
beta ||z - sg[e]||^2). The reconstruction term is MSE by default: it is what PSNR measures, and on
these mostly-background images L1 sat at its median solution (plain grey, ~19 dB) in trials.
The codebook starts on encoder outputs of the first batch; codes left unused for ``restart_every``
steps are restarted on random encoder outputs of the current batch, so the codebook stays in use.
At the end the pre-quantisation latents' mean / std over training renders become the tokenizer's
``shift_factor`` / ``scaling_factor`` (diffusion then sees ~unit variance), and ``final/`` holds
``VQTokenizer.save_pretrained`` output, ``metrics.json`` and ``recon.png`` (originals above
reconstructions). Checkpoints and resumption work as in the hybrid stage: a rerun with the same
``output_dir`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from encoders.latents import pil_to_tensor
from encoders.vq import VQTokenizer, make_vqmodel
from train.config import build_config, read_raw
from train.detect import detect
from train.detect import evaluate as evaluate_prompt
from train.shapes import ShapesWorld
from train.trainer import lr_lambda, resume_run, save_run, to_uint8

ARCH_FIELDS = ("image_size", "block_out_channels", "layers_per_block", "latent_channels",
               "num_vq_embeddings", "vq_embed_dim", "norm_num_groups")


@dataclass
class VQTrainConfig:
    stage: str = "vq"
    output_dir: str = "runs/vq"
    seed: int = 0
    image_size: int = 32

    # architecture (diffusers VQModel): 32x32 -> 8x8 latents of 4 channels, 256 codes
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one level per entry; downsample 2**(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4  # encoder output channels
    num_vq_embeddings: int = 256  # codebook size
    vq_embed_dim: int | None = None  # codebook dim = the diffused latent's channels (None: latent_channels)
    norm_num_groups: int = 8  # 4+ channels per group: per-channel GroupNorm slowed colour fidelity

    # optimisation (batch 16 learned more per image than 32 at the same wall time)
    steps: int = 1600
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    beta: float = 0.25  # commitment weight
    recon_loss: str = "mse"  # "mse" or "l1" (L1 stalled at the all-background median in trials)
    restart_every: int = 50  # window (steps) after which unused codes are restarted; 0: never
    mixed_precision: str = "no"

    # evaluation, logging, checkpoints
    eval_images: int = 256  # fixed held-out renders
    stats_images: int = 1024  # training renders for scaling_factor / shift_factor
    log_every: int = 10
    eval_every: int = 400
    save_every: int = 400
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto": newest checkpoint in output_dir if any; "none"; or a path
    stop_at: int | None = None  # end this invocation after this step (checkpointed)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        problems = []
        if self.stage != "vq":
            problems.append(f"stage must be 'vq', got {self.stage!r}")
        if self.recon_loss not in ("mse", "l1"):
            problems.append(f"recon_loss must be 'mse' or 'l1', got {self.recon_loss!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be no/bf16/fp16, got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "save_every", "eval_images",
                     "stats_images", "keep_checkpoints", "num_vq_embeddings", "latent_channels"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.restart_every < 0:
            problems.append(f"restart_every must be >= 0 (0: no restarts), got {self.restart_every}")
        if not self.block_out_channels or any(not isinstance(c, int) or c < 1 for c in self.block_out_channels):
            problems.append(f"block_out_channels must be a non-empty list of positive ints, got {self.block_out_channels}")
        elif self.image_size % 2 ** (len(self.block_out_channels) - 1):
            problems.append(f"image_size {self.image_size} is not divisible by the downsampling "
                            f"factor {2 ** (len(self.block_out_channels) - 1)}")
        if problems:
            raise ValueError("invalid vq config: " + "; ".join(problems))
        make_vqmodel(**self.arch())  # architecture errors (e.g. group counts) surface now

    def arch(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "block_out_channels": list(self.block_out_channels)}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> VQTrainConfig:
    raw = read_raw(path, overrides)
    # build_config checks scalars and mappings; the one list-valued field is checked here.
    channels = raw.pop("block_out_channels", None)
    cfg = build_config(VQTrainConfig, raw)
    if channels is None:
        return cfg
    if not isinstance(channels, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        raise ValueError(f"block_out_channels: expected a list of ints, got {channels!r}")
    return dataclasses.replace(cfg, block_out_channels=tuple(channels))


class ShapesRenders(Dataset):
    """Images only, ``(3, H, W)`` in [0, 1]: item ``i`` is the i-th caption render of ``split``
    (a pure function of (seed, split, i), so resuming = skipping batches)."""

    def __init__(self, world: ShapesWorld, split: str = "train", length: int = 10_000_000):
        self.world, self.split, self.length = world, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return pil_to_tensor(self.world.caption_example(index, self.split).image, self.world.resolution)


class CodeUsage:
    """Code counts over the current restart window (checkpointed with the run)."""

    def __init__(self, size: int):
        self.counts = torch.zeros(size, dtype=torch.long)
        self.restarts = 0

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.restarts = state["counts"].clone(), int(state["restarts"])


def code_stats(codes: Tensor, size: int) -> dict[str, float]:
    """Fraction of the codebook used by ``codes`` and the perplexity exp(H) of their histogram."""
    p = torch.bincount(codes.flatten().cpu(), minlength=size).double()
    p = p / p.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_used": float((p > 0).double().mean()), "perplexity": float(entropy.exp())}


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]: (B, 3, H, W) x2 -> (B,)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * mse.log10()


@torch.no_grad()
def evaluate(tok: VQTokenizer, images: Tensor, metadata: list[dict], batch: int = 128) -> dict[str, float]:
    """On the held-out renders: reconstruction PSNR (quantised decode, the tokenizer's default;
    and continuous, i.e. without snapping to codes), codebook utilisation, and the fraction of
    reconstructions the shapes detector still scores as matching their prompt (GenEval's rule;
    the originals score 1.0), i.e. the ceiling this tokenizer puts on generation scores."""
    was_training = tok.training
    tok.eval()
    q, c, codes, recons = [], [], [], []
    for x in images.split(batch):
        enc = tok.encode(x)
        recons.append(tok.decode(enc.latents))
        q.append(psnr(recons[-1], x))
        c.append(psnr(tok.decode(enc.latents, quantize=False), x))
        codes.append(enc.codes)
    tok.train(was_training)
    u8 = to_uint8(torch.cat(recons))  # (N, H, W, 3)
    hits = [evaluate_prompt(detect(im), meta)[0] for im, meta in zip(u8, metadata)]
    return {"heldout_psnr": float(torch.cat(q).mean()), "heldout_psnr_continuous": float(torch.cat(c).mean()),
            **{f"heldout_{k}": v for k, v in code_stats(torch.cat(codes), tok.codebook_size).items()},
            "heldout_detect_accuracy": sum(hits) / len(hits)}


@torch.no_grad()
def latent_stats(tok: VQTokenizer, images: Tensor, batch: int = 128) -> tuple[float, float]:
    """(mean, std) of the raw pre-quantisation latents over ``images``, all channels pooled."""
    z = torch.cat([tok.pre_quant(x) for x in images.split(batch)])  # (N, C, h, w)
    return float(z.mean()), float(z.std())


def save_recon_grid(originals: Tensor, recons: Tensor, path: Path, scale: int = 4) -> None:
    """Originals in the top row, their reconstructions below, upscaled (nearest)."""
    rows = [to_uint8(t) for t in (originals, recons)]  # 2 x (n, H, W, 3)
    n, H, W, _ = rows[0].shape
    grid = Image.new("RGB", (n * (W * scale + 2) + 2, 2 * (H * scale + 2) + 2), (40, 40, 40))
    for r, imgs in enumerate(rows):
        for i, im in enumerate(imgs):
            tile = Image.fromarray(im).resize((W * scale, H * scale), Image.NEAREST)
            grid.paste(tile, (2 + i * (W * scale + 2), 2 + r * (H * scale + 2)))
    grid.save(path)


def restart_dead_codes(tok: VQTokenizer, usage: CodeUsage, pre_quant: Tensor, accelerator: Accelerator,
                       generator: torch.Generator) -> int:
    """Codes unused over the window get random encoder outputs of the current batch (gathered
    from all processes, picked with a generator seeded identically everywhere, so every process
    makes the same change). Returns the number of restarted codes."""
    dead = (usage.counts == 0).nonzero(as_tuple=True)[0]  # (n_dead,): counts are global already
    usage.counts.zero_()
    if len(dead) == 0:
        return 0
    z = pre_quant.detach().permute(0, 2, 3, 1).reshape(-1, pre_quant.shape[1])  # (B*h*w, C)
    z = accelerator.gather(z)
    pick = torch.randint(len(z), (len(dead),), generator=generator).to(z.device)
    tok.codebook.data[dead] = z[pick].to(tok.codebook.dtype)
    return len(dead)


def train(cfg: VQTrainConfig) -> Path:
    """Run (or resume) the VQ stage. Returns the exported tokenizer folder (``final/``)."""
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    tok = VQTokenizer(make_vqmodel(**cfg.arch()))
    tok.requires_grad_(True).train()  # built frozen; this stage is where it learns
    # The VQ-VAE paper's weighting (codebook 1, commitment beta); diffusers' default ("legacy")
    # puts beta on the codebook term instead.
    tok.model.quantize.legacy, tok.model.quantize.beta = False, cfg.beta
    usage = CodeUsage(tok.codebook_size)

    world = ShapesWorld(resolution=cfg.image_size, seed=cfg.seed)
    loader = DataLoader(ShapesRenders(world), batch_size=cfg.batch_size, shuffle=False, drop_last=True)
    examples = [world.caption_example(i, "heldout") for i in range(cfg.eval_images)]
    heldout = torch.stack([pil_to_tensor(ex.image, cfg.image_size) for ex in examples]).to(accelerator.device)
    heldout_meta = [ex.metadata for ex in examples]
    optimizer = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer, loader = accelerator.prepare(tok, optimizer, loader)
    run_objects = {"lr_schedule": lr_sched, "code_usage": usage}  # checkpointed with the run

    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.arch().items()}  # as JSON stores it
    step = resume_run(accelerator, out, cfg.resume, "arch", arch, run_objects)
    log_file = (out / "log.jsonl").open("a") if main else None
    if main:
        n_params = sum(p.numel() for p in tok.parameters())
        accelerator.print(f"VQ tokenizer: {n_params / 1e6:.2f}M parameters, {cfg.image_size}px -> "
                          f"{cfg.image_size // tok.downsample}x{cfg.image_size // tok.downsample}x"
                          f"{tok.latent_channels} latents, {tok.codebook_size} codes")

    def log(rec: dict) -> None:
        if main:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    def checkpoint(at: int) -> None:
        save_run(accelerator, out, at, "arch", arch, cfg.keep_checkpoints, objects=run_objects)

    def run_eval(at: int) -> dict:
        metrics = evaluate(tok, heldout, heldout_meta) if main else {}
        log({"step": at, **metrics})
        return metrics

    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    batches = accelerator.skip_first_batches(loader, step) if step else loader
    restart_gen = torch.Generator()
    t_last, seen, restarted = time.perf_counter(), 0, 0
    model.train()
    for x in batches:
        if step >= end:
            break
        if step == 0:  # data-dependent init: every code starts on an encoder output (all are "dead")
            with torch.no_grad():
                restart_dead_codes(tok, usage, tok.pre_quant(x), accelerator, restart_gen.manual_seed(cfg.seed))
        fwd = model(x)
        recon = (F.mse_loss if cfg.recon_loss == "mse" else F.l1_loss)(fwd.reconstruction, x)
        loss = recon + fwd.vq_loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        lr_sched.step()
        # Summed over processes every step, so every process holds the global counts: the one
        # accelerate checkpoints (the main process's) is then right for every process on resume.
        counts = torch.bincount(fwd.codes.flatten(), minlength=tok.codebook_size)
        usage.counts += accelerator.reduce(counts, reduction="sum").cpu()
        step += 1
        seen += len(x) * accelerator.num_processes
        # Restarts stop one window before the end, so the decoder adapts to the last ones.
        if cfg.restart_every and step % cfg.restart_every == 0 and step + cfg.restart_every <= cfg.steps:
            restart_gen.manual_seed(cfg.seed * 1_000_003 + step)
            n = restart_dead_codes(tok, usage, fwd.pre_quant, accelerator, restart_gen)
            usage.restarts += n
            restarted += n
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            log({"step": step, "loss": loss.item(), f"recon_{cfg.recon_loss}": recon.item(), "vq_loss": fwd.vq_loss.item(),
                 "batch_psnr": float(psnr(fwd.reconstruction.detach().clamp(0, 1), x).mean()),
                 **{f"batch_{k}": v for k, v in code_stats(fwd.codes, tok.codebook_size).items()},
                 "restarted": restarted, "restarts_total": usage.restarts, "lr": lr_sched.get_last_lr()[0],
                 "grad_norm": float(grad_norm) if grad_norm is not None else None,
                 "images_per_s": seen / (now - t_last)})
            t_last, seen, restarted = now, 0, 0
        if step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
        if step % cfg.save_every == 0 and step < end:
            checkpoint(step)

    checkpoint(step)
    if step < cfg.steps:
        accelerator.print(f"stopped at step {step} of {cfg.steps}; rerun the same command to resume")
        if log_file:
            log_file.close()
        return out / "checkpoints" / f"step_{step:07d}"

    final = out / "final"
    if main:
        tok.eval()
        train_imgs = torch.stack([ShapesRenders(world)[i] for i in range(cfg.stats_images)]).to(accelerator.device)
        mean, std = latent_stats(tok, train_imgs)
        tok.shift_factor, tok.scaling_factor = mean, 1.0 / std
        metrics = run_eval(step)
        tok.save_pretrained(final)
        with torch.no_grad():
            save_recon_grid(heldout[:16], tok.decode(tok.encode_latents(heldout[:16])), final / "recon.png")
        metrics.update(step=step, scaling_factor=tok.scaling_factor, shift_factor=tok.shift_factor,
                       dead_code_restarts=usage.restarts, parameters=sum(p.numel() for p in tok.parameters()),
                       latent_shape=[tok.latent_channels, cfg.image_size // tok.downsample, cfg.image_size // tok.downsample],
                       codebook_size=tok.codebook_size, eval_images=cfg.eval_images,
                       wall_s_this_invocation=round(time.perf_counter() - t_start, 1))
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log_file.close()
    accelerator.wait_for_everyone()
    return final
