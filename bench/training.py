"""Training-throughput benchmark: our HybridModel + hybrid_loss against lucidrains' transfusion-pytorch.

    .venv/bin/pip install transfusion-pytorch==0.20.0       # the peer (bench only)
    .venv/bin/python -m bench.training                       # ~15-22 min on 2 CPU cores, all parts
    .venv/bin/python -m bench.training --no-scaling          # reference table + sampling, ~4-5 min
    .venv/bin/python -m bench.training --quick --out /tmp/b  # smoke run of every part (a few minutes)

Writes ``bench/results/training.json`` (every figure, the configurations, versions, machine) and
``bench/results/training.md`` (the tables); ``--out DIR`` writes them elsewhere.

Reference workload (fixed; issue 7's reference decoder): 6 layers, width 384, 6 heads of 64, FFN
1024, batch 8, each sample = 128 random text ids (vocabulary 256) followed by one generated image
given as an 8x8 grid of 16-channel latents (64 image tokens), AdamW (lr 1e-4), fp32 on the CPU,
torch threads = 2 (``--threads``). One step = forward + loss + backward + ``optimizer.step()`` +
``zero_grad``.

- Ours: ``HybridModel`` (built like ``bench.generation.build_ours``: byte vocabulary 256 + 6
  specials, patch_size 1 on 16-channel latents, rectified-flow scheduler), batches from
  ``hybrid.sequence.tokenize_sample`` + ``pack`` (one sample per row: ``<bos> 128 text <boi>
  64 img <eoi> <eos>`` = 196 positions), loss ``hybrid.losses.hybrid_loss`` (text CE + 5 x flow
  MSE). The codec is bypassed by a stub whose ``encode_latents`` returns the precomputed random
  latents (the VQ encoder is frozen and outside the trained model, so it is not timed).
- Peer: ``Transfusion`` from ``bench.peer_transfusion.build_peer`` (same width/depth/heads),
  switched to train mode with gradients on, trained as its README does: ``loss =
  model(samples)`` with ``samples = [[text (128,), latents (16, 8, 8)], ...]`` and its defaults
  (flow-matching MSE + text CE, ``prob_uncond`` 0.1). The peer adds ``[sos] .. [som] .. [eom]
  [eos]`` itself (196 positions too).

Throughput counts the workload's tokens, 8 x (128 + 64) = 1536 per step, for both sides (the
special tokens each side adds are not counted). Timing: warm-up steps, then ``--rounds``
interleaved A/B rounds of ``--steps`` steps a side; the figure is the median over rounds of the
mean seconds per step of a round.

MFU = model FLOPs per step / seconds per step / measured peak, where model FLOPs per step =
6 x N x tokens + 12 x layers x T^2 x width x batch (N: the parameters that get a gradient,
token-embedding tables excluded, each side its own count -- ours leaves out its unused
understanding aligner, the peer's count includes its per-token adaLN/FiLM projections, which run
on every token; tokens = 1536; T = 192 workload tokens per sample; the second term is forward +
backward of QK^T and AV over the full T x T score matrix, not halved for causality). The peak is
the median fp32 ``torch.mm`` throughput on 2048 x 2048 matrices at the same thread count
(2 x 2048^3 FLOPs per call), sampled by this script before and after every round (the machine's
speed drifts).

Peak memory: each side runs in a fresh subprocess (``--child-memory SIDE``; build model +
optimizer + batch, train ``--mem-steps`` steps), before the timed part; reported are the peak
resident set (``VmHWM`` of /proc/self/status: all Python/torch overhead included; ``ru_maxrss``
is recorded too) and its rise over the resident set just before the first step (the training
steps' own high-water mark: activations, gradients, AdamW state).

Scaling tables (skipped with ``--no-scaling``; same model dims, optimizer, threads and step as
above; a sample is always ``k x (L text ids + one 64-token image)``, written batch x k x L):

(a) sequence length: T = 256, 512, 1024, 2048 workload tokens per sample (``--seq-lengths``) =
    (T - 64) text ids + one image, at a fixed budget of 2048 tokens per step: batch 2048 // T
    (8, 4, 2, 1). Positions per sample with the special tokens: T + 4 on both sides (ours
    ``<bos> .. <boi> img <eoi> <eos>``, the peer ``[sos] .. [som] img [eom] [eos]``); our
    ``max_seq_len`` is raised to cover them.
(b) images per sample: k = 1, 2, 4 (``--images-per-sample``) of (64 text ids + one image),
    interleaved text, image, text, image, ..., batch 4 (``--images-batch``): 128 k workload tokens
    per sample, 512 k per step; 2 + 130 k positions per sample on both sides. Ours: one sample
    with k ``gen`` image segments (all n = 4k images of the batch go through one
    ``encode_latents`` call, sample-major, image order within a sample, as ``pack`` lists them;
    the codec stub returns the latents in that order); the peer: ``[text, latents, text,
    latents, ...]`` per sample.

Per configuration: peak memory of each side in a fresh subprocess (``--child-memory SIDE --shape
B,L,k``, as above), then both sides built in this process, ``--scale-warmup`` warm-up steps a side,
``--scale-rounds`` interleaved A/B rounds of ``--scale-steps`` steps a side, medians. Tokens are
counted as above (workload tokens only: batch x k x (L + 64)) and FLOPs with the same formula,
T = k x (L + 64) per sample and each side's N from that configuration's step; the MFU peak is the
median of the matmul samples taken during the scaling part (before every configuration and after
every round).

Sampling (skipped with ``--no-sampling``): one image per call at the reference dims with
``bench.generation``'s builders and workload: a 16-token prompt, 25 rectified-flow Euler steps, classifier-free guidance
3.0 (ours: ``HybridPipeline.generate_image`` end to end, VQ decode and PIL included; the peer:
``peer_sample_image``, i.e. ``sample_many``, latents only). Warm-up one call a side, then
``--sample-rounds`` interleaved A/B rounds of one call a side, medians; speed-up = peer seconds /
our seconds. Peak memory: a fresh subprocess per side (``--child-sample-memory SIDE``) builds the
model and generates one image; VmHWM and its rise over VmRSS after the build.

``--no-memory`` skips every memory subprocess. ``--quick``: 1 round of 2 steps (1 warm-up) for the
reference table, T = 256 and k = 1 only for the scaling (1 round of 1 step, 1 warm-up), 1 sampling
round, 2 steps in each memory subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"
WORKLOAD = dict(dim=384, n_layers=6, n_heads=6, head_dim=64, ffn_dim=1024, text_vocab=256, latent_channels=16,
                grid=8, image_tokens=64, text_tokens=128, batch=8, optimizer="AdamW", lr=1e-4, dtype="float32",
                device="cpu", scheduler="flow")
SIDES = ("ours", "peer")
Built = tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], float], dict]  # model, optimizer, step, info


@dataclass(frozen=True)
class Shape:
    """One training batch layout: ``batch`` samples, each ``images`` x (``text_tokens`` text ids +
    one image of ``WORKLOAD["image_tokens"]`` tokens)."""

    batch: int
    text_tokens: int  # text ids before each image
    images: int = 1

    @property
    def sample_tokens(self) -> int:
        """Workload tokens per sample (special tokens not counted)."""
        return self.images * (self.text_tokens + WORKLOAD["image_tokens"])

    @property
    def step_tokens(self) -> int:
        return self.batch * self.sample_tokens

    @property
    def positions(self) -> int:
        """Positions per sample on either side: bos/eos + boi/eoi (som/eom) around every image."""
        return 2 + self.images * (self.text_tokens + WORKLOAD["image_tokens"] + 2)

    @property
    def arg(self) -> str:
        return f"{self.batch},{self.text_tokens},{self.images}"

    @classmethod
    def parse(cls, s: str) -> "Shape":
        return cls(*(int(x) for x in s.split(",")))

    def __str__(self) -> str:
        return f"{self.batch} x {self.images} x ({self.text_tokens} text + {WORKLOAD['image_tokens']} image)"


REFERENCE = Shape(WORKLOAD["batch"], WORKLOAD["text_tokens"], 1)
TOKENS_PER_SAMPLE = REFERENCE.sample_tokens  # 192
TOKENS_PER_STEP = REFERENCE.step_tokens  # 1536
SCALE_BUDGET = 2048  # workload tokens per step for the sequence-length table


def seq_shape(T: int) -> Shape:
    """(T - 64) text ids + one image per sample, batch 2048 // T."""
    assert T % WORKLOAD["image_tokens"] == 0 and WORKLOAD["image_tokens"] < T <= SCALE_BUDGET, T
    return Shape(SCALE_BUDGET // T, T - WORKLOAD["image_tokens"], 1)


def images_shape(k: int, batch: int = 4) -> Shape:
    """k x (64 text ids + one image) per sample."""
    return Shape(batch, 64, k)


# --------------------------------------------------------------------------------------------
# data


def make_data(shape: Shape = REFERENCE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, k, L) random text ids in [0, 256) and (batch, k, 16, 8, 8) random latents (for the
    reference shape the same values as the earlier (batch, 128) / (batch, 16, 8, 8) draw)."""
    w = WORKLOAD
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, w["text_vocab"], (shape.batch, shape.images, shape.text_tokens), generator=g)
    latents = torch.randn(shape.batch, shape.images, w["latent_channels"], w["grid"], w["grid"], generator=g)
    return text, latents


# --------------------------------------------------------------------------------------------
# ours


class _IdTokenizer:
    """``encode`` returns precomputed ids: the sample's text "segment" is a key into them."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.table[text]


class _LatentCodec(torch.nn.Module):
    """Frozen-codec stub: ``encode_latents`` ignores the pixels and returns the batch's latents,
    (n_gen, C, g, g) in ``pack``'s order of generated images (sample-major, then image order)."""

    def __init__(self, latents: torch.Tensor):
        super().__init__()
        self.latents = latents
        self.latent_channels = latents.shape[1]

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.shape[0] == self.latents.shape[0]
        return self.latents


def build_ours_training(text: torch.Tensor, latents: torch.Tensor) -> Built:
    """(model, optimizer, step_fn, info) for our side; text (B, k, L), latents (B, k, C, g, g)."""
    from hybrid.config import HybridConfig
    from hybrid.losses import hybrid_loss
    from hybrid.model import HybridModel
    from hybrid.sequence import (
        ImageSegment,
        SpecialIds,
        bidirectional_kinds,
        pack,
        tokenize_sample,
    )
    from schedulers import get_scheduler

    w = WORKLOAD
    V = w["text_vocab"]
    B, k, L = text.shape
    shape = Shape(B, L, k)
    # byte-level ids 0..255 + 6 specials, as bench.generation.build_ours' tokenizer gives
    specials = dict(pad_id=V, bos_id=V + 1, eos_id=V + 2, boi_id=V + 3, eoi_id=V + 4, img_id=V + 5)
    image_size = w["grid"] * 8
    # 256 (the reference's) unless the samples are longer: max_seq_len is only a bound here
    cfg = HybridConfig(vocab_size=V + 6, dim=w["dim"], n_layers=w["n_layers"], n_heads=w["n_heads"],
                       ffn_dim=w["ffn_dim"], max_seq_len=max(256, shape.positions), image_size=image_size,
                       image_codec="vq", latent_channels=w["latent_channels"], latent_downsample=8, patch_size=1,
                       scheduler=w["scheduler"], caption_dropout=0.0, **specials)
    assert cfg.image_tokens == w["image_tokens"] and cfg.patch_dim == w["latent_channels"]
    torch.manual_seed(0)
    model = HybridModel(cfg)
    torch.nn.init.normal_(model.image_out.weight, std=0.02)  # zero-init head would give no gradient upstream
    model.train()

    ids = SpecialIds.from_config(cfg)
    tok = _IdTokenizer({f"t{i}.{j}": text[i, j].tolist() for i in range(B) for j in range(k)})
    dummy = torch.zeros(3, image_size, image_size)  # never read: the codec stub returns `latents`
    samples = [tokenize_sample([seg for j in range(k) for seg in (f"t{i}.{j}", ImageSegment(dummy, "gen"))],
                               tok, ids, image_size, cfg.image_tokens, cfg.und_tokens) for i in range(B)]
    seq_len = max(len(s) for s in samples)
    assert seq_len == shape.positions
    batch = pack(samples, seq_len, cfg.pad_id, packing=False, bidirectional=bidirectional_kinds(cfg))
    assert batch.gen_index.shape == (B * k, cfg.image_tokens)
    codec = _LatentCodec(latents.flatten(0, 1))  # (B, k, C, g, g) -> (B*k, C, g, g), pack's image order
    scheduler = get_scheduler(w["scheduler"])
    opt = torch.optim.AdamW(model.parameters(), lr=w["lr"])
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)  # first, so the gradients of the last step stay readable
        loss = hybrid_loss(model, batch, scheduler, codec, cfg.patch_size, cfg.image_loss_weight,
                           attn_impl=cfg.attn_impl, generator=gen)
        loss.total.backward()
        opt.step()
        return float(loss.total.detach())

    n_all = sum(p.numel() for p in model.parameters())
    n_emb = model.embed_tokens.weight.numel()
    info = dict(params=n_all, params_non_embedding=n_all - n_emb, seq_len_per_sample=seq_len,
                rows=int(batch.input_ids.shape[0]), text_loss_tokens=int((batch.targets != -100).sum()),
                image_tokens=int(batch.gen_index.numel()), attn_impl=cfg.attn_impl,
                config=dict(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim, patch_size=cfg.patch_size,
                            max_seq_len=cfg.max_seq_len, scheduler=cfg.scheduler,
                            image_loss_weight=cfg.image_loss_weight))
    return model, opt, step, info


# --------------------------------------------------------------------------------------------
# peer


def build_peer_training(text: torch.Tensor, latents: torch.Tensor) -> Built:
    """(model, optimizer, step_fn, info) for the peer; text (B, k, L), latents (B, k, C, g, g)."""
    from bench.peer_transfusion import PEER_VERSION, build_peer

    w = WORKLOAD
    B, k, L = text.shape
    torch.manual_seed(0)
    model = build_peer(dim=w["dim"], depth=w["n_layers"], heads=w["n_heads"], dim_head=w["head_dim"],
                       text_vocab=w["text_vocab"], latent_channels=w["latent_channels"], grid=w["grid"])
    model.train().requires_grad_(True)  # build_peer returns it frozen for sampling
    # README: one list per sample alternating text ids (L,) and image latents (C, g, g)
    samples = [[x for j in range(k) for x in (text[i, j], latents[i, j])] for i in range(B)]
    opt = torch.optim.AdamW(model.parameters(), lr=w["lr"])

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(samples)
        loss.backward()
        opt.step()
        return float(loss.detach())

    n_all = sum(p.numel() for p in model.parameters())
    n_emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    info = dict(params=n_all, params_non_embedding=n_all - n_emb, version=PEER_VERSION,
                seq_len_per_sample=Shape(B, L, k).positions,  # sos (text som img eom)*k eos
                config=dict(num_text_tokens=w["text_vocab"], dim_latent=w["latent_channels"],
                            modality_default_shape=(w["grid"], w["grid"]), add_pos_emb=False,
                            transformer=dict(dim=w["dim"], depth=w["n_layers"], heads=w["n_heads"],
                                             dim_head=w["head_dim"]),
                            prob_uncond=getattr(model, "prob_uncond", None),
                            flow_loss_weight=getattr(model, "flow_loss_weight", None),
                            text_loss_weight=getattr(model, "text_loss_weight", None)))
    return model, opt, step, info


BUILDERS = {"ours": build_ours_training, "peer": build_peer_training}


# --------------------------------------------------------------------------------------------
# sampling (bench.generation's builders and workload)


def build_sampler(side: str) -> Callable[[], object]:
    """A call that generates one image on ``side`` at the reference dims: 16-token prompt, 25
    rectified-flow Euler steps, CFG 3 (``bench.generation``'s workload)."""
    # imported here: bench.generation pulls in the VQ codec and pipeline, which the training
    # memory subprocesses must not carry in their resident set
    from bench.generation import WORKLOAD as GEN
    from bench.generation import build_ours, prompt_of

    w = WORKLOAD
    assert all(GEN[k] == w[k] for k in ("dim", "n_layers", "n_heads", "text_vocab", "latent_channels", "grid"))
    if side == "ours":
        pipe = build_ours()
        prompt = prompt_of(GEN["text_prompt_tokens"])
        assert len(pipe.tokenizer.encode(prompt, add_special_tokens=False)) == GEN["text_prompt_tokens"]
        return lambda: pipe.generate_image(prompt, num_steps=GEN["steps"], guidance_scale=GEN["guidance"], seed=0)
    from bench.peer_transfusion import build_peer, peer_sample_image

    peer = build_peer(dim=w["dim"], depth=w["n_layers"], heads=w["n_heads"], dim_head=w["head_dim"],
                      text_vocab=w["text_vocab"], latent_channels=w["latent_channels"], grid=w["grid"])
    ids = torch.randint(0, w["text_vocab"], (1, GEN["text_prompt_tokens"]), generator=torch.Generator().manual_seed(0))
    return lambda: peer_sample_image(peer, ids, GEN["steps"], cfg_scale=GEN["guidance"])


# --------------------------------------------------------------------------------------------
# measurement helpers


MM_N = 2048


def matmul_times(reps: int, n: int = MM_N) -> list[float]:
    """Seconds of ``reps`` fp32 ``torch.mm`` calls on (n, n) x (n, n), after one untimed call."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t)
    return ts


def matmul_summary(ts: list[float], n: int = MM_N) -> dict:
    flops = 2 * n**3
    return dict(n=n, calls=len(ts), median_s=statistics.median(ts), gflops=flops / statistics.median(ts) / 1e9,
                best_gflops=flops / min(ts) / 1e9, worst_gflops=flops / max(ts) / 1e9)


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int, calls: int,
                       mm_ts: list[float] | None = None, tag: str = "", unit: str = "s/step") -> dict[str, list[float]]:
    """Mean seconds per call of each side in each of ``rounds`` interleaved A/B rounds of ``calls``
    calls a side (who goes first alternates). With ``mm_ts``, 3 matmul-peak samples are appended
    after every round (the machine's speed drifts, so the peak is sampled across the run)."""
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            per_round[name].append((time.perf_counter() - t) / calls)
        if mm_ts is not None:
            mm_ts += matmul_times(3)
        print(f"{tag}round {r + 1}/{rounds}: "
              + ", ".join(f"{name} {per_round[name][-1]:.3f} {unit}" for name in names), flush=True)
    return per_round


def trained_non_embedding(model: torch.nn.Module) -> int:
    """Parameters that got a gradient in the last step, token-embedding tables excluded (after a
    step: our unused understanding aligner is left out, the peer has none unused)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if p.grad is not None and id(p) not in emb)


def model_flops_per_step(params_non_embedding: int, shape: Shape = REFERENCE) -> float:
    """6 N tokens (dense fwd + bwd) + full T x T attention fwd + bwd, T = workload tokens per sample."""
    w = WORKLOAD
    dense = 6 * params_non_embedding * shape.step_tokens
    attn = 12 * w["n_layers"] * shape.sample_tokens**2 * w["dim"] * shape.batch
    return float(dense + attn)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_memory(side: str, steps: int, threads: int, shape: Shape = REFERENCE) -> dict:
    """Run in a fresh process: peak RSS of building + training ``steps`` steps on one side."""
    torch.set_num_threads(threads)
    text, latents = make_data(shape)
    _, _, step, _ = BUILDERS[side](text, latents)
    before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")  # this process's own high-water mark (ru_maxrss can carry a parent's)
    return dict(side=side, steps=steps, shape=asdict(shape), rss_before_first_step_mib=before / 1024,
                hwm_before_first_step_mib=hwm_before / 1024, peak_rss_mib=peak / 1024,
                step_rise_mib=(peak - before) / 1024,
                ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def child_sample_memory(side: str, threads: int) -> dict:
    """Run in a fresh process: peak RSS of building one side's sampler and generating one image."""
    torch.set_num_threads(threads)
    sample = build_sampler(side)
    before = _status_kb("VmRSS")
    sample()
    peak = _status_kb("VmHWM")
    return dict(side=side, images=1, rss_after_build_mib=before / 1024, peak_rss_mib=peak / 1024,
                sample_rise_mib=(peak - before) / 1024,
                ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.training", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(side: str, steps: int, threads: int, shape: Shape = REFERENCE) -> dict:
    return _run_child(["--child-memory", side, "--mem-steps", str(steps), "--threads", str(threads),
                       "--shape", shape.arg])


def measure_sample_memory(side: str, threads: int) -> dict:
    return _run_child(["--child-sample-memory", side, "--threads", str(threads)])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------------------------
# scaling and sampling parts


def measure_config(shape: Shape, warmup: int, rounds: int, steps: int, mem_steps: int, threads: int,
                   memory: bool, mm_ts: list[float]) -> dict:
    """One scaling configuration: memory subprocesses, then warm-up and interleaved rounds in this
    process. MFU is filled in by the caller once the scaling part's matmul peak is known."""
    row: dict = dict(shape=asdict(shape), label=str(shape), tokens_per_sample=shape.sample_tokens,
                     tokens_per_step=shape.step_tokens, positions_per_sample=shape.positions)
    mem = {name: measure_memory(name, mem_steps, threads, shape) for name in SIDES} if memory else {}
    text, latents = make_data(shape)
    sides = {name: BUILDERS[name](text, latents) for name in SIDES}
    losses = {name: [s[2]() for _ in range(warmup)] for name, s in sides.items()}
    mm_ts += matmul_times(3)
    per_round = interleaved_rounds({name: s[2] for name, s in sides.items()}, rounds, steps, mm_ts,
                                   tag=f"  {shape}: ")
    for name, (model, _, _, info) in sides.items():
        s = statistics.median(per_round[name])
        n = trained_non_embedding(model)
        flops = model_flops_per_step(n, shape)
        row[name] = dict(params_trained_non_embedding=n, seq_len_per_sample=info["seq_len_per_sample"],
                         s_per_step_median=s, s_per_step_rounds=per_round[name],
                         tokens_per_s=shape.step_tokens / s, model_flops_per_step=flops,
                         achieved_gflops=flops / s / 1e9, warmup_losses=losses[name])
        if memory:
            row[name]["memory"] = mem[name]
    row["ratio_ours_over_peer_tokens_per_s"] = row["ours"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
    mem_txt = "".join(f", {name} peak {mem[name]['peak_rss_mib']:.0f} MiB" for name in mem)
    print(f"{shape}: ours {row['ours']['tokens_per_s']:.0f} tok/s, peer {row['peer']['tokens_per_s']:.0f} tok/s, "
          f"ratio {row['ratio_ours_over_peer_tokens_per_s']:.2f}x{mem_txt}", flush=True)
    return row


def run_scaling(seq_lengths: list[int], images: list[int], images_batch: int, warmup: int, rounds: int,
                steps: int, mem_steps: int, threads: int, memory: bool) -> dict:
    """Both scaling tables (see the module doc)."""
    mm_ts: list[float] = []
    seq_rows, img_rows = [], []
    for T in seq_lengths:
        seq_rows.append(dict(T=T, **measure_config(seq_shape(T), warmup, rounds, steps, mem_steps, threads,
                                                   memory, mm_ts)))
    for k in images:
        img_rows.append(dict(k=k, **measure_config(images_shape(k, images_batch), warmup, rounds, steps, mem_steps,
                                                   threads, memory, mm_ts)))
    peak = matmul_summary(mm_ts)
    for row in seq_rows + img_rows:
        for name in SIDES:
            row[name]["mfu"] = row[name]["achieved_gflops"] / peak["gflops"]
    return dict(rounds=rounds, steps_per_round=steps, warmup_steps=warmup, mem_steps=mem_steps if memory else None,
                token_budget_per_step=SCALE_BUDGET, images_batch=images_batch, matmul=peak,
                tokens_counted="workload tokens only: batch x k x (L text + 64 image); special tokens not counted",
                flops_formula="6 * params_trained_non_embedding * tokens_per_step + 12 * n_layers * T^2 * dim * "
                              "batch, T = k x (L + 64) workload tokens per sample (full T x T attention, fwd + bwd)",
                sequence=seq_rows, images=img_rows)


def run_sampling(rounds: int, threads: int, memory: bool) -> dict:
    """One-image generation on both sides: interleaved medians and, per side, a fresh subprocess's peak RSS."""
    from bench.generation import WORKLOAD as GEN

    mem = {name: measure_sample_memory(name, threads) for name in SIDES} if memory else {}
    fns = {name: build_sampler(name) for name in SIDES}
    for fn in fns.values():
        fn()  # warm-up: allocator, first-call overheads
    times = interleaved_rounds(fns, rounds, 1, tag="sampling ", unit="s")
    del fns
    out: dict = dict(prompt_tokens=GEN["text_prompt_tokens"], steps=GEN["steps"], guidance=GEN["guidance"],
                     scheduler=GEN["scheduler"], images_per_call=1, rounds=rounds, warmup_calls=1,
                     ours_scope="HybridPipeline.generate_image end to end (KV-cached prefix, VQ decode, PIL)",
                     peer_scope="peer_sample_image (Transfusion.sample_many, Euler, latents only)")
    for name in SIDES:
        out[name] = dict(s_median=statistics.median(times[name]), s_rounds=times[name])
        if memory:
            out[name]["memory"] = mem[name]
    out["speedup_ours_vs_peer"] = out["peer"]["s_median"] / out["ours"]["s_median"]
    if memory:
        out["memory_method"] = ("fresh subprocess per side (python -m bench.training --child-sample-memory SIDE): "
                                "peak resident set = VmHWM after building the model and generating one image; "
                                "rise = that peak minus VmRSS after the build")
    print(f"sampling: ours {out['ours']['s_median']:.3f} s, peer {out['peer']['s_median']:.3f} s -> "
          f"{out['speedup_ours_vs_peer']:.2f}x", flush=True)
    return out


# --------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds")
    ap.add_argument("--steps", type=int, default=6, help="training steps per side per round")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per side")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps in each memory subprocess")
    ap.add_argument("--quick", action="store_true", help="smoke run of every part (see the module doc)")
    ap.add_argument("--no-memory", action="store_true", help="skip all peak-memory subprocesses")
    ap.add_argument("--no-scaling", action="store_true", help="skip the sequence-length / images-per-sample tables")
    ap.add_argument("--no-sampling", action="store_true", help="skip the image-sampling comparison")
    ap.add_argument("--seq-lengths", type=_ints, default=[256, 512, 1024, 2048],
                    help="scaling (a): workload tokens per sample, comma-separated (batch = 2048 // T)")
    ap.add_argument("--images-per-sample", type=_ints, default=[1, 2, 4],
                    help="scaling (b): images per sample, comma-separated")
    ap.add_argument("--images-batch", type=int, default=4, help="scaling (b): batch size")
    ap.add_argument("--scale-rounds", type=int, default=3, help="interleaved A/B rounds per scaling configuration")
    ap.add_argument("--scale-steps", type=int, default=2, help="steps per side per round in the scaling part")
    ap.add_argument("--scale-warmup", type=int, default=2, help="warm-up steps per side per scaling configuration")
    ap.add_argument("--sample-rounds", type=int, default=5, help="interleaved A/B rounds of one image a side")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for training.json / training.md")
    ap.add_argument("--child-memory", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    ap.add_argument("--child-sample-memory", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=Shape.parse, default=REFERENCE, help=argparse.SUPPRESS)  # "batch,L,k"
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory or args.child_sample_memory:
        r = (child_memory(args.child_memory, args.mem_steps, args.threads, args.shape) if args.child_memory
             else child_sample_memory(args.child_sample_memory, args.threads))
        print(json.dumps(r))
        return r
    if args.quick:
        args.rounds, args.steps, args.warmup, args.mem_steps = 1, 2, 1, 2
        args.seq_lengths, args.images_per_sample = args.seq_lengths[:1], args.images_per_sample[:1]
        args.scale_rounds, args.scale_steps, args.scale_warmup, args.sample_rounds = 1, 1, 1, 1
    t_start = time.perf_counter()

    # memory first: the subprocesses start while this process is still small
    memory = {}
    if not args.no_memory:
        for name in SIDES:
            memory[name] = measure_memory(name, args.mem_steps, args.threads)
            print(f"{name}: peak RSS {memory[name]['peak_rss_mib']:.0f} MiB "
                  f"(rise during steps {memory[name]['step_rise_mib']:.0f} MiB)", flush=True)

    mm_ts = matmul_times(7)
    print(f"fp32 torch.mm {MM_N}^3 at {args.threads} threads: {matmul_summary(mm_ts)['gflops']:.1f} GFLOP/s",
          flush=True)

    text, latents = make_data()
    sides = {name: BUILDERS[name](text, latents) for name in SIDES}
    losses = {}
    for name, (model, _, step, info) in sides.items():
        losses[name] = [step() for _ in range(args.warmup)]
        info["params_trained_non_embedding"] = trained_non_embedding(model)
        print(f"{name}: warm-up losses {[round(x, 3) for x in losses[name]]}", flush=True)

    per_round = interleaved_rounds({name: s[2] for name, s in sides.items()}, args.rounds, args.steps, mm_ts)
    peak = matmul_summary(mm_ts)

    result: dict = {"workload": WORKLOAD, "tokens_per_step": TOKENS_PER_STEP, "threads": torch.get_num_threads(),
                    "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                    "matmul": peak,
                    "flops_formula": "6 * params_trained_non_embedding * tokens_per_step + 12 * n_layers * T^2 * dim * batch, "
                                     "T = 192 workload tokens per sample (full T x T attention, fwd + bwd)"}
    for name, (_, _, _, info) in sides.items():
        s = statistics.median(per_round[name])
        flops = model_flops_per_step(info["params_trained_non_embedding"])
        result[name] = dict(info, s_per_step_median=s, s_per_step_rounds=per_round[name],
                            tokens_per_s=TOKENS_PER_STEP / s, model_flops_per_step=flops,
                            achieved_gflops=flops / s / 1e9, mfu=flops / s / 1e9 / peak["gflops"],
                            warmup_losses=losses[name])
    result["ratio_ours_over_peer_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["peer"]["tokens_per_s"]
    result["target_ratio"] = 3.0
    del sides

    if memory:
        for name in SIDES:
            result[name]["memory"] = memory[name]
        result["memory_method"] = ("fresh subprocess per side (python -m bench.training --child-memory SIDE), run "
                                   "before the timed part: peak resident set = VmHWM of /proc/self/status after "
                                   f"{args.mem_steps} training steps (ru_maxrss recorded too); rise = that peak "
                                   "minus VmRSS just before the first step (model, optimizer, batch built)")
    o, p = result["ours"], result["peer"]
    print(f"reference: ours {o['tokens_per_s']:.0f} tok/s (MFU {o['mfu']:.1%}), peer {p['tokens_per_s']:.0f} tok/s "
          f"(MFU {p['mfu']:.1%}), ratio {result['ratio_ours_over_peer_tokens_per_s']:.2f}x", flush=True)

    if not args.no_scaling:
        result["scaling"] = run_scaling(args.seq_lengths, args.images_per_sample, args.images_batch,
                                        args.scale_warmup, args.scale_rounds, args.scale_steps, args.mem_steps,
                                        args.threads, not args.no_memory)
    if not args.no_sampling:
        result["sampling"] = run_sampling(args.sample_rounds, args.threads, not args.no_memory)

    result["machine"] = dict(cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                             platform=platform.platform(), python=platform.python_version())
    result["versions"] = dict(torch=torch.__version__, transfusion_pytorch=result["peer"].get("version"))
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["quick"] = args.quick
    result["bench_wall_s"] = time.perf_counter() - t_start
    write(result, args.out)
    print(f"wrote {args.out / 'training.json'} and training.md; wall {result['bench_wall_s']:.0f} s", flush=True)
    return result


def _mib(m: dict | None, rise: str) -> str:
    return f"{m['peak_rss_mib']:.0f} (+{m[rise]:.0f})" if m else "n/a"


def _scaling_table(rows: list[dict], key: str) -> list[str]:
    """One Markdown row per configuration; ``key`` ("T" or "k") names the first column."""
    lines = [f"| {key} | batch x k x (text + image) | tokens / step | positions / sample | ours tokens/s "
             "| peer tokens/s | ours / peer | MFU ours / peer | ours peak RSS, MiB (rise) "
             "| peer peak RSS, MiB (rise) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, p = r["ours"], r["peer"]
        lines.append(f"| {r[key]} | {r['label']} | {r['tokens_per_step']} | {r['positions_per_sample']} "
                     f"| {o['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} "
                     f"| **{r['ratio_ours_over_peer_tokens_per_s']:.2f}x** "
                     f"| {o['mfu']:.1%} / {p['mfu']:.1%} | {_mib(o.get('memory'), 'step_rise_mib')} "
                     f"| {_mib(p.get('memory'), 'step_rise_mib')} |")
    return lines


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    o, p, m = result["ours"], result["peer"], result["matmul"]
    mem = lambda s: (f"{s['memory']['peak_rss_mib']:.0f} MiB (+{s['memory']['step_rise_mib']:.0f})"
                     if "memory" in s else "n/a")
    lines = [
        "# Training throughput: ours vs transfusion-pytorch",
        "",
        f"Workload: {WORKLOAD['n_layers']} layers, width {WORKLOAD['dim']}, {WORKLOAD['n_heads']} heads x "
        f"{WORKLOAD['head_dim']}, batch {WORKLOAD['batch']} x ({WORKLOAD['text_tokens']} text + "
        f"{WORKLOAD['image_tokens']} image tokens) = {TOKENS_PER_STEP} tokens/step, AdamW, fp32, CPU, "
        f"{result['threads']} threads. Step = forward + loss + backward + AdamW step.",
        f"Machine: {result['machine']['cpu']}; torch {result['versions']['torch']}, transfusion-pytorch "
        f"{result['versions']['transfusion_pytorch']}. Median of {result['rounds']} interleaved rounds x "
        f"{result['steps_per_round']} steps a side after {result['warmup_steps']} warm-up steps."
        + (" **Quick (smoke) run: figures are not comparable.**" if result.get("quick") else ""),
        "",
        "| | ours | peer |",
        "|---|---|---|",
        f"| parameters (all / non-embedding) | {o['params']/1e6:.2f} M / {o['params_non_embedding']/1e6:.2f} M "
        f"| {p['params']/1e6:.2f} M / {p['params_non_embedding']/1e6:.2f} M |",
        f"| trained non-embedding parameters (N in FLOPs) | {o['params_trained_non_embedding']/1e6:.2f} M "
        f"| {p['params_trained_non_embedding']/1e6:.2f} M |",
        f"| positions per sample (with special tokens) | {o['seq_len_per_sample']} | {p['seq_len_per_sample']} |",
        f"| s / step (median) | {o['s_per_step_median']:.3f} | {p['s_per_step_median']:.3f} |",
        f"| tokens / s | {o['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} |",
        f"| model GFLOP / step | {o['model_flops_per_step']/1e9:.1f} | {p['model_flops_per_step']/1e9:.1f} |",
        f"| MFU (vs {m['gflops']:.1f} GFLOP/s fp32 mm) | {o['mfu']:.1%} | {p['mfu']:.1%} |",
        f"| peak RSS (rise during steps) | {mem(o)} | {mem(p)} |",
        "",
        f"Ratio ours / peer tokens/s: **{result['ratio_ours_over_peer_tokens_per_s']:.2f}x** "
        f"(target >= {result['target_ratio']:.0f}x).",
        "",
        f"FLOPs: {result['flops_formula']}; each side with its own non-embedding parameter count. "
        f"Peak: median fp32 torch.mm {m['n']}x{m['n']} at the same thread count.",
        f"Memory: {result.get('memory_method', 'not measured')}.",
        "",
        "Caveats: the peer is ~3x our parameter count at the same width/depth/heads (per-token adaLN/FiLM "
        "time-conditioning projections in every attention and FFN block, gated attention, attention-residual "
        "mixing, U-Net skips); its MFU counts those FLOPs. Both sides see the same random text ids and latents; "
        "noise/timesteps are each side's own (flow matching on both). The peer trains with its default "
        "prob_uncond 0.1 (nulls the text of some samples, same length); ours with caption dropout 0.",
        "",
    ]
    sc = result.get("scaling")
    if sc:
        mem_txt = (f"peak RSS = VmHWM of a fresh subprocess per side and configuration after {sc['mem_steps']} "
                   "steps; rise = over VmRSS just before the first step" if sc["mem_steps"] else "memory not measured")
        lines += [
            "## Scaling",
            "",
            f"Same model, optimizer, step and threads as above. Median of {sc['rounds']} interleaved rounds x "
            f"{sc['steps_per_round']} steps a side after {sc['warmup_steps']} warm-up steps, per configuration. "
            f"Tokens: {sc['tokens_counted']}. MFU vs {sc['matmul']['gflops']:.1f} GFLOP/s (median fp32 torch.mm "
            f"sampled during the scaling part); FLOPs: {sc['flops_formula']}. Memory: {mem_txt}.",
            "",
        ]
        if sc["sequence"]:
            lines += [f"### Sequence length (T workload tokens per sample = T - 64 text + one 64-token image, "
                      f"{sc['token_budget_per_step']} tokens / step)", "",
                      *_scaling_table(sc["sequence"], "T"), ""]
        if sc["images"]:
            lines += [f"### Images per sample (k x (64 text + one 64-token image), interleaved, batch "
                      f"{sc['images_batch']})", "",
                      *_scaling_table(sc["images"], "k"), ""]
    sa = result.get("sampling")
    if sa:
        om, pm = sa["ours"].get("memory"), sa["peer"].get("memory")
        lines += [
            f"## Sampling: one image, {sa['prompt_tokens']}-token prompt, {sa['steps']} rectified-flow steps, "
            f"CFG {sa['guidance']:g}",
            "",
            f"Median of {sa['rounds']} interleaved rounds of one image a side after {sa['warmup_calls']} warm-up "
            f"call; same dims as above, eval mode, no gradients. Ours: {sa['ours_scope']}; peer: {sa['peer_scope']}.",
            "",
            "| | ours | peer |",
            "|---|---|---|",
            f"| s / image (median) | {sa['ours']['s_median']:.3f} | {sa['peer']['s_median']:.3f} |",
            f"| speed-up (peer s / ours s) | **{sa['speedup_ours_vs_peer']:.2f}x** | |",
            f"| peak RSS, MiB (rise over the built model) | {_mib(om, 'sample_rise_mib')} "
            f"| {_mib(pm, 'sample_rise_mib')} |",
            "",
            f"Memory: {sa.get('memory_method', 'not measured')}.",
            "",
        ]
    lines += [
        "Rerun: `.venv/bin/python -m bench.training` (full, all parts) or `--quick` (smoke); "
        "`--no-scaling` / `--no-sampling` / `--no-memory` skip parts.",
        "",
    ]
    (out / "training.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
