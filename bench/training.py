"""Training-throughput benchmark: our HybridModel + hybrid_loss against lucidrains' transfusion-pytorch.

    .venv/bin/pip install transfusion-pytorch==0.20.0       # the peer (bench only)
    .venv/bin/python -m bench.training                       # ~5-8 min on 2 CPU cores
    .venv/bin/python -m bench.training --quick               # smoke run: 1 round, 2 steps a side

Writes ``bench/results/training.json`` (every figure, the configurations, versions, machine) and
``bench/results/training.md`` (the table).

Workload (fixed; issue 7's reference decoder): 6 layers, width 384, 6 heads of 64, FFN 1024,
batch 8, each sample = 128 random text ids (vocabulary 256) followed by one generated image given
as an 8x8 grid of 16-channel latents (64 image tokens), AdamW (lr 1e-4), fp32 on the CPU, torch
threads = 2 (``--threads``). One step = forward + loss + backward + ``optimizer.step()`` +
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
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
WORKLOAD = dict(dim=384, n_layers=6, n_heads=6, head_dim=64, ffn_dim=1024, text_vocab=256, latent_channels=16,
                grid=8, image_tokens=64, text_tokens=128, batch=8, optimizer="AdamW", lr=1e-4, dtype="float32",
                device="cpu", scheduler="flow")
TOKENS_PER_SAMPLE = WORKLOAD["text_tokens"] + WORKLOAD["image_tokens"]  # 192
TOKENS_PER_STEP = WORKLOAD["batch"] * TOKENS_PER_SAMPLE  # 1536


# --------------------------------------------------------------------------------------------
# data


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, 128) random text ids in [0, 256) and (batch, 16, 8, 8) random latents."""
    w = WORKLOAD
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, w["text_vocab"], (w["batch"], w["text_tokens"]), generator=g)
    latents = torch.randn(w["batch"], w["latent_channels"], w["grid"], w["grid"], generator=g)
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
    """Frozen-codec stub: ``encode_latents`` ignores the pixels and returns the batch's latents."""

    def __init__(self, latents: torch.Tensor):
        super().__init__()
        self.latents = latents
        self.latent_channels = latents.shape[1]

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.shape[0] == self.latents.shape[0]
        return self.latents


def build_ours_training(text: torch.Tensor, latents: torch.Tensor):
    """(model, optimizer, step_fn, info) for our side."""
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
    # byte-level ids 0..255 + 6 specials, as bench.generation.build_ours' tokenizer gives
    specials = dict(pad_id=V, bos_id=V + 1, eos_id=V + 2, boi_id=V + 3, eoi_id=V + 4, img_id=V + 5)
    image_size = w["grid"] * 8
    cfg = HybridConfig(vocab_size=V + 6, dim=w["dim"], n_layers=w["n_layers"], n_heads=w["n_heads"],
                       ffn_dim=w["ffn_dim"], max_seq_len=256, image_size=image_size, image_codec="vq",
                       latent_channels=w["latent_channels"], latent_downsample=8, patch_size=1,
                       scheduler=w["scheduler"], caption_dropout=0.0, **specials)
    assert cfg.image_tokens == w["image_tokens"] and cfg.patch_dim == w["latent_channels"]
    torch.manual_seed(0)
    model = HybridModel(cfg)
    torch.nn.init.normal_(model.image_out.weight, std=0.02)  # zero-init head would give no gradient upstream
    model.train()

    ids = SpecialIds.from_config(cfg)
    tok = _IdTokenizer({f"t{i}": row.tolist() for i, row in enumerate(text)})
    dummy = torch.zeros(3, image_size, image_size)  # never read: the codec stub returns `latents`
    samples = [tokenize_sample([f"t{i}", ImageSegment(dummy, "gen")], tok, ids, image_size, cfg.image_tokens,
                               cfg.und_tokens) for i in range(len(text))]
    seq_len = max(len(s) for s in samples)
    batch = pack(samples, seq_len, cfg.pad_id, packing=False, bidirectional=bidirectional_kinds(cfg))
    codec = _LatentCodec(latents)
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
                            scheduler=cfg.scheduler, image_loss_weight=cfg.image_loss_weight))
    return model, opt, step, info


# --------------------------------------------------------------------------------------------
# peer


def build_peer_training(text: torch.Tensor, latents: torch.Tensor):
    from bench.peer_transfusion import PEER_VERSION, build_peer

    w = WORKLOAD
    torch.manual_seed(0)
    model = build_peer(dim=w["dim"], depth=w["n_layers"], heads=w["n_heads"], dim_head=w["head_dim"],
                       text_vocab=w["text_vocab"], latent_channels=w["latent_channels"], grid=w["grid"])
    model.train().requires_grad_(True)  # build_peer returns it frozen for sampling
    samples = [[text[i], latents[i]] for i in range(len(text))]  # README: [text ids, image latents]
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
                seq_len_per_sample=1 + w["text_tokens"] + 1 + w["image_tokens"] + 1 + 1,  # sos .. som img eom eos
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


def trained_non_embedding(model: torch.nn.Module) -> int:
    """Parameters that got a gradient in the last step, token-embedding tables excluded (after a
    step: our unused understanding aligner is left out, the peer has none unused)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if p.grad is not None and id(p) not in emb)


def model_flops_per_step(params_non_embedding: int) -> float:
    w = WORKLOAD
    dense = 6 * params_non_embedding * TOKENS_PER_STEP
    attn = 12 * w["n_layers"] * TOKENS_PER_SAMPLE**2 * w["dim"] * w["batch"]
    return float(dense + attn)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_memory(side: str, steps: int, threads: int) -> dict:
    """Run in a fresh process: peak RSS of building + training ``steps`` steps on one side."""
    torch.set_num_threads(threads)
    text, latents = make_data()
    _, _, step, _ = BUILDERS[side](text, latents)
    before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")  # this process's own high-water mark (ru_maxrss can carry a parent's)
    return dict(side=side, steps=steps, rss_before_first_step_mib=before / 1024,
                hwm_before_first_step_mib=hwm_before / 1024, peak_rss_mib=peak / 1024,
                step_rise_mib=(peak - before) / 1024,
                ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure_memory(side: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.training", "--child-memory", side, "--mem-steps", str(steps),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds")
    ap.add_argument("--steps", type=int, default=6, help="training steps per side per round")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per side")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps in each memory subprocess")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 steps, 1 warm-up step")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child-memory", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        r = child_memory(args.child_memory, args.mem_steps, args.threads)
        print(json.dumps(r))
        return r
    if args.quick:
        args.rounds, args.steps, args.warmup, args.mem_steps = 1, 2, 1, 2
    t_start = time.perf_counter()

    # memory first: the subprocesses start while this process is still small
    memory = {}
    if not args.no_memory:
        for name in ("ours", "peer"):
            memory[name] = measure_memory(name, args.mem_steps, args.threads)
            print(f"{name}: peak RSS {memory[name]['peak_rss_mib']:.0f} MiB "
                  f"(rise during steps {memory[name]['step_rise_mib']:.0f} MiB)", flush=True)

    mm_ts = matmul_times(7)
    print(f"fp32 torch.mm {MM_N}^3 at {args.threads} threads: {matmul_summary(mm_ts)['gflops']:.1f} GFLOP/s",
          flush=True)

    text, latents = make_data()
    sides = {name: BUILDERS[name](text, latents) for name in ("ours", "peer")}
    losses = {}
    for name, (model, _, step, info) in sides.items():
        losses[name] = [step() for _ in range(args.warmup)]
        info["params_trained_non_embedding"] = trained_non_embedding(model)
        print(f"{name}: warm-up losses {[round(x, 3) for x in losses[name]]}", flush=True)

    per_round: dict[str, list[float]] = {"ours": [], "peer": []}
    for r in range(args.rounds):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")  # alternate who goes first
        for name in order:
            step = sides[name][2]
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            per_round[name].append((time.perf_counter() - t) / args.steps)
        mm_ts += matmul_times(3)  # the peak is sampled across the run too: this machine's speed drifts
        print(f"round {r + 1}/{args.rounds}: ours {per_round['ours'][-1]:.3f} s/step, "
              f"peer {per_round['peer'][-1]:.3f} s/step", flush=True)
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
        for name in ("ours", "peer"):
            result[name]["memory"] = memory[name]
        result["memory_method"] = ("fresh subprocess per side (python -m bench.training --child-memory SIDE), run "
                                   "before the timed part: peak resident set = VmHWM of /proc/self/status after "
                                   f"{args.mem_steps} training steps (ru_maxrss recorded too); rise = that peak "
                                   "minus VmRSS just before the first step (model, optimizer, batch built)")

    result["machine"] = dict(cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                             platform=platform.platform(), python=platform.python_version())
    result["versions"] = dict(torch=torch.__version__, transfusion_pytorch=result["peer"].get("version"))
    result["bench_wall_s"] = time.perf_counter() - t_start
    write(result, args.out)
    o, p = result["ours"], result["peer"]
    print(f"ours {o['tokens_per_s']:.0f} tok/s (MFU {o['mfu']:.1%}), peer {p['tokens_per_s']:.0f} tok/s "
          f"(MFU {p['mfu']:.1%}), ratio {result['ratio_ours_over_peer_tokens_per_s']:.2f}x; "
          f"wall {result['bench_wall_s']:.0f} s", flush=True)
    return result


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
        f"{result['steps_per_round']} steps a side after {result['warmup_steps']} warm-up steps.",
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
        "Rerun: `.venv/bin/python -m bench.training` (full, a few minutes) or `--quick` (smoke).",
        "",
    ]
    (out / "training.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
