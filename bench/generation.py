"""Generation benchmark: our KV-cached sampling against lucidrains' transfusion-pytorch.

    .venv/bin/pip install transfusion-pytorch==0.20.0       # the peer (bench only)
    .venv/bin/python -m bench.generation                     # ~6 min on 2 CPU cores
    .venv/bin/python -m bench.generation --quick             # smoke run, 1 repeat, fewer lengths

Writes ``bench/results/generation.json`` (every figure, the exact configurations, versions and
machine) and ``bench/results/generation.md`` (the tables).

Workload (fixed, so results stay comparable; issue 7's reference decoder): 6 layers, width 384,
6 heads of 64, FFN 1024, text vocabulary 256 (+ our 6 special ids), one image = an 8x8 grid of
16-channel latents = 64 image tokens, 25 denoising steps (rectified flow, Euler; the peer's
``odeint`` set to Euler so a step is one model evaluation), classifier-free guidance 3.0,
fp32 on the CPU, random weights (only time is measured).

1. Prefix cache: our image generation time as the prompt grows from 16 to 512 tokens
   (target: t(512) / t(16) <= 1.3), beside a full-recompute loop over the same model.
2. Against the peer, in the same process, interleaved A/B, medians of ``--repeats`` runs:
   image sampling for a 16-token prompt (ours: ``HybridPipeline.generate_image`` end to end,
   VQ decode and PIL included; the peer: ``sample_many``, latents only) and 64-token text
   generation (ours: ``generate_text`` with detokenisation; the peer: ``generate_text_only``).
   Target: ours >= 2x faster in both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

from encoders.vq import VQTokenizer, make_vqmodel
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.pipeline import HybridPipeline
from hybrid.sequence import bidirectional_kinds, pack
from hybrid.sampling import image_prompt_rows
from hybrid.tokenizer import special_token_ids, train_tokenizer

RESULTS = Path(__file__).parent / "results"
WORKLOAD = dict(dim=384, n_layers=6, n_heads=6, ffn_dim=1024, text_vocab=256, image_size=64, latent_downsample=8,
                latent_channels=16, grid=8, image_tokens=64, steps=25, guidance=3.0, scheduler="flow",
                text_prompt_tokens=16, text_new_tokens=64)
PARAM_MATCHED_LAYERS = 19  # ours at 19 layers ~= the peer's parameter count at 6


def build_ours(max_seq_len: int = 1024, n_layers: int | None = None) -> HybridPipeline:
    """The workload as a HybridPipeline: byte-level tokenizer (256 bytes + 6 specials, no merges,
    so a prompt of k ASCII characters is k tokens) and a small random VQ for decoding."""
    tok = train_tokenizer(["the quick brown fox"], vocab_size=262)
    w = WORKLOAD
    cfg = HybridConfig(vocab_size=len(tok), dim=w["dim"], n_layers=n_layers or w["n_layers"], n_heads=w["n_heads"],
                       ffn_dim=w["ffn_dim"], max_seq_len=max_seq_len, image_size=w["image_size"], image_codec="vq",
                       latent_channels=w["latent_channels"], latent_downsample=w["latent_downsample"], patch_size=1,
                       scheduler=w["scheduler"], **special_token_ids(tok))
    assert cfg.image_tokens == w["image_tokens"]
    torch.manual_seed(0)
    model = HybridModel(cfg)
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    vq = VQTokenizer(make_vqmodel(w["image_size"], block_out_channels=(8, 8, 8, 8), latent_channels=16,
                                  num_vq_embeddings=64, norm_num_groups=8))
    return HybridPipeline(model, tok, vq=vq)


def prompt_of(n_tokens: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[i] for i in torch.randint(0, 26, (n_tokens,), generator=g).tolist())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def full_recompute_image(pipe: HybridPipeline, prompt: str) -> None:
    """The uncached reference loop: every step runs <bos> prompt <boi> + 64 image tokens, for
    the conditional and unconditional rows (what the cache saves)."""
    c, model, sched = pipe.config, pipe.model, pipe.scheduler
    ids = [pipe.tokenizer.encode(prompt, add_special_tokens=False)]
    rows = image_prompt_rows(ids, c, with_uncond=True)
    batch = pack(rows, max(len(r) for r in rows), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    mask = batch.attention_mask()
    x = sched.init_noise((1, c.image_tokens, c.patch_dim), generator=torch.Generator().manual_seed(0))
    for t in sched.set_timesteps(WORKLOAD["steps"]):
        pred = model(batch.input_ids, batch.position_ids, mask, gen_tokens=torch.cat([x, x]), gen_index=batch.gen_index,
                     gen_timesteps=torch.full((2,), float(t)), logits_index=batch.gen_index[:0, 0]).image_pred
        cond, uncond = pred.chunk(2)
        x = sched.step(uncond + WORKLOAD["guidance"] * (cond - uncond), t, x)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 repeat, prompt lengths 16 and 512 only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.repeats
    w = WORKLOAD
    pipe = build_ours()
    image = lambda p: pipe.generate_image(p, num_steps=w["steps"], guidance_scale=w["guidance"], seed=0)
    results: dict = {"workload": w, "threads": args.threads, "repeats": reps}

    # --- 1. prompt length scaling (ours, cached vs full recompute) ------------------------------
    lengths = [16, 512] if args.quick else [16, 64, 128, 256, 512]
    prompts = {n: prompt_of(n) for n in lengths}
    for n, p in prompts.items():
        assert len(pipe.tokenizer.encode(p, add_special_tokens=False)) == n
        image(p)  # warm-up: allocator, first-call overheads at every size
    # round-robin over the lengths, so drift in the machine's speed hits every length alike
    cached_t: dict[int, list[float]] = {n: [] for n in lengths}
    full_t: dict[int, list[float]] = {n: [] for n in lengths}
    for r in range(reps):
        for n in lengths:
            cached_t[n].append(timed(lambda: image(prompts[n])))
            if r < max(1, reps // 2):
                full_t[n].append(timed(lambda: full_recompute_image(pipe, prompts[n])))
    scaling = []
    for n in lengths:
        cached, full = median(cached_t[n]), median(full_t[n])
        scaling.append({"prompt_tokens": n, "cached_s": cached, "full_recompute_s": full, "cached_all_s": cached_t[n]})
        print(f"prompt {n:4d} tokens: cached {cached:.3f} s   full recompute {full:.3f} s", flush=True)
    results["prefix_scaling"] = scaling
    results["prefix_ratio_512_vs_16"] = scaling[-1]["cached_s"] / scaling[0]["cached_s"]
    results["full_recompute_ratio_512_vs_16"] = scaling[-1]["full_recompute_s"] / scaling[0]["full_recompute_s"]

    # --- 2. against transfusion-pytorch -------------------------------------------------------
    from bench.peer_transfusion import PEER_VERSION, build_peer, peer_generate_text, peer_sample_image

    peer = build_peer(dim=w["dim"], depth=w["n_layers"], heads=w["n_heads"], dim_head=w["dim"] // w["n_heads"],
                      text_vocab=w["text_vocab"], latent_channels=w["latent_channels"], grid=w["grid"])
    p16 = prompt_of(w["text_prompt_tokens"])
    peer_prompt = torch.randint(0, w["text_vocab"], (1, w["text_prompt_tokens"]), generator=torch.Generator().manual_seed(0))
    ours_text = lambda: pipe.generate_text(p16, max_new_tokens=w["text_new_tokens"], temperature=1.0, seed=0,
                                           ignore_eos=True)
    out = ours_text()
    assert len(out.token_ids[0]) == w["text_new_tokens"]
    peer_img = lambda: peer_sample_image(peer, peer_prompt, w["steps"], cfg_scale=w["guidance"])
    peer_txt = lambda: peer_generate_text(peer, peer_prompt, w["text_new_tokens"])
    peer_img(), peer_txt()  # warm-up
    # The peer's decoder core equals ours at these dims (attention 4 x 384^2, a 384 -> 2x1024 ->
    # 384 gated MLP), but every sublayer adds adaLN / FiLM time conditioning (~1.8M parameters
    # each, read in every forward, text decoding included), so it holds ~3x our parameters. The
    # "deep" rows run ours with as many layers as match that count, for a parameter-matched view.
    deep = build_ours(n_layers=PARAM_MATCHED_LAYERS)
    deep_image = lambda: deep.generate_image(p16, num_steps=w["steps"], guidance_scale=w["guidance"], seed=0)
    deep_text = lambda: deep.generate_text(p16, max_new_tokens=w["text_new_tokens"], temperature=1.0, seed=0,
                                           ignore_eos=True)
    deep_image(), deep_text()
    # pipe.compile(): the same weights under torch.compile (first call compiles, ~1 min; excluded)
    compiled = build_ours().compile()
    compiled_text = lambda: compiled.generate_text(p16, max_new_tokens=w["text_new_tokens"], temperature=1.0,
                                                   seed=0, ignore_eos=True)
    t_compile = timed(compiled_text)
    assert compiled_text().token_ids == out.token_ids  # same weights, same seed: same tokens
    times = {k: [] for k in ("ours_image", "peer_image", "ours_text", "peer_text", "deep_image", "deep_text",
                             "compiled_text")}
    for r in range(reps):  # interleaved A/B, alternating who goes first
        pairs = [("ours_image", lambda: image(p16)), ("peer_image", peer_img)]
        pairs += [("ours_text", ours_text), ("peer_text", peer_txt), ("compiled_text", compiled_text),
                  ("peer_text", peer_txt)] * 2  # text runs are short: more of them
        if r % 2:
            pairs = [p for i in range(0, len(pairs), 2) for p in (pairs[i + 1], pairs[i])]
        pairs += [("deep_image", deep_image), ("deep_text", deep_text)]
        for key, fn in pairs:
            times[key].append(timed(fn))
    med = {k: median(v) for k, v in times.items()}
    results["vs_peer"] = {
        "peer": f"transfusion-pytorch=={PEER_VERSION}",
        "peer_parameters": sum(p.numel() for p in peer.parameters()),
        "ours_parameters": pipe.model.num_parameters(),
        "deep_layers": PARAM_MATCHED_LAYERS, "deep_parameters": deep.model.num_parameters(),
        "median_s": med, "all_s": times,
        "image_speedup": med["peer_image"] / med["ours_image"],
        "text_speedup": med["peer_text"] / med["ours_text"],
        "pair_text_ratios": [p / o for p, o in zip(times["peer_text"][0::2], times["ours_text"])],
        "compiled_text_speedup": med["peer_text"] / med["compiled_text"],
        "compile_first_call_s": t_compile,
        "pair_image_ratios": [p / o for p, o in zip(times["peer_image"], times["ours_image"])],
        "deep_image_speedup": med["peer_image"] / med["deep_image"],
        "deep_text_speedup": med["peer_text"] / med["deep_text"],
    }
    print(f"image: ours {med['ours_image']:.3f} s, peer {med['peer_image']:.3f} s -> "
          f"{results['vs_peer']['image_speedup']:.2f}x", flush=True)
    print(f"text:  ours {med['ours_text']:.3f} s, peer {med['peer_text']:.3f} s -> "
          f"{results['vs_peer']['text_speedup']:.2f}x", flush=True)

    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "transformers": version("transformers"), "diffusers": version("diffusers")}
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "generation.md").write_text(report(results))
    print(f"wrote {args.out / 'generation.json'} and generation.md")
    return results


def report(r: dict) -> str:
    v = r["vs_peer"]
    lines = [
        f"# Generation benchmark ({r['date']}, {r['machine']['cpu_count']} CPU cores, {r['threads']} threads, fp32)",
        "",
        "Written by `python -m bench.generation`; workload and versions in generation.json.",
        "",
        "## Prefix cache: image generation time vs prompt length (ours)",
        "",
        "| prompt tokens | cached (s) | full recompute (s) |",
        "|---:|---:|---:|",
        *[f"| {s['prompt_tokens']} | {s['cached_s']:.3f} | {s['full_recompute_s']:.3f} |" for s in r["prefix_scaling"]],
        "",
        f"Cached t(512) / t(16) = **{r['prefix_ratio_512_vs_16']:.2f}** (target <= 1.3); "
        f"full recompute: {r['full_recompute_ratio_512_vs_16']:.2f}.",
        "",
        f"## Against {v['peer']} (same process, interleaved A/B, median of {r['repeats']})",
        "",
        f"Parameters at the same dims (6 layers, width 384, 6 heads of 64): ours "
        f"{v['ours_parameters'] / 1e6:.2f} M, the peer {v['peer_parameters'] / 1e6:.2f} M (the same decoder core "
        f"plus adaLN / FiLM time conditioning in every sublayer). Parameter-matched: ours at "
        f"{v['deep_layers']} layers, {v['deep_parameters'] / 1e6:.2f} M.",
        "",
        "| task | ours (s) | peer (s) | speed-up | ours, param-matched (s) | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
        f"| image, 16-token prompt, 25 steps, CFG 3 | {v['median_s']['ours_image']:.3f} | "
        f"{v['median_s']['peer_image']:.3f} | **{v['image_speedup']:.2f}x** | {v['median_s']['deep_image']:.3f} | "
        f"{v['deep_image_speedup']:.2f}x |",
        f"| text, 64 new tokens after 16 | {v['median_s']['ours_text']:.3f} | {v['median_s']['peer_text']:.3f} | "
        f"**{v['text_speedup']:.2f}x** | {v['median_s']['deep_text']:.3f} | {v['deep_text_speedup']:.2f}x |",
        f"| text, as above, `pipe.compile()` | {v['median_s']['compiled_text']:.3f} | {v['median_s']['peer_text']:.3f} | "
        f"**{v['compiled_text_speedup']:.2f}x** | | |",
        "",
        f"`pipe.compile()`'s first call compiled for {v['compile_first_call_s']:.0f} s (excluded above; "
        "every later call reuses it).",
        "",
        f"Per interleaved pair, peer / ours ranged {min(v['pair_text_ratios']):.2f}-{max(v['pair_text_ratios']):.2f}x "
        f"for text and {min(v['pair_image_ratios']):.2f}-{max(v['pair_image_ratios']):.2f}x for images.",
        "",
        "Targets (same dims): >= 2x for both. Read the param-matched column with care: the peer's "
        "text path never runs its time-conditioning layers (0 calls during text generation, counted "
        "with forward hooks), so in text decoding both sides read the same ~11M weights per token "
        "at the same dims, and the param-matched text row makes ours read 3x more. Text decoding "
        "at batch 1 is bound by memory bandwidth (every weight read once per token); the "
        "param-matched image row is the fair one for images, where the peer runs its conditioning "
        "at every step.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
