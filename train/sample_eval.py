"""Score a trained run on more examples than the trainer's periodic checks.

    python -m train.sample_eval runs/tiny_vq/final --n 96
    python -m train.sample_eval runs/tiny_ar/final --n 96 --seeds 0 1
    python -m train.sample_eval runs/tiny_und/final --understanding --n 200
    python -m train.sample_eval runs/recipe/hybrid/final --understanding --mc-answer text
    python -m train.sample_eval runs/recipe/hybrid/final --restoration --guidance-scale 1.5

Generates one image per prompt for ``n`` GenEval-format prompts (half from the training
compositions, half held out; spread over the six tags) and applies the shapes detector with
GenEval's rules, per split and per tag, with a Wilson 95% interval (runs whose intervals overlap
are not ranked by it). The detector assigns a shape to every blob it finds, so cluttered,
meaningless images can satisfy GenEval's "at least" rules; the clutter guard reports the share of
images with more objects than prompted, empty ones and noisy ones, and ``strict`` counts an image
only if it is right *and* clean, so noise or clutter can never outscore clean images there.

``--understanding`` instead scores the understanding path (the run's final/ must hold siglip/):
multiple-choice accuracy per split and category, and an ablation that shows whether the model
reads the image at all: the text loss on captions / answers with each sample's own image
features vs with the features of another sample in the batch (shuffled).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hybrid.pipeline import HybridPipeline
from hybrid.sampling import generate_images
from train.config import MC_ANSWERS
from train.detect import judge, summarize_judgements
from train.probes import image_reliance
from train.shapes import ShapesWorld
from train.trainer import answer_accuracy, sample_prompts, to_uint8


@torch.no_grad()
def score_run(final: Path, n: int, seeds: list[int], guidance_scale: float = 3.0, num_steps: int = 25,
              batch_size: int = 48, min_confidence: float = 0.3) -> dict:
    """Per split and per split/tag: GenEval-rule accuracy with its Wilson 95% interval, the strict
    accuracy (right *and* on a clean canvas) and the clutter guard's shares (``train.detect.judge``)."""
    pipe = HybridPipeline.from_pretrained(final)
    model, tokenizer, codec, scheduler, cfg = pipe.model, pipe.tokenizer, pipe.codec, pipe.scheduler, pipe.config
    rows = sample_prompts(ShapesWorld(resolution=cfg.image_size, seed=0), n, heldout=True)
    records = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            ids = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in chunk]
            pixels = generate_images(model, ids, scheduler, codec, num_steps, guidance_scale, generator=g)
            for img, row in zip(to_uint8(pixels), chunk):
                v = judge(img, row, min_confidence=min_confidence)
                records += [{**v, "group": row["split"]}, {**v, "group": f"{row['split']}/{row['tag']}"}]
    summary = summarize_judgements(records, group="group")
    summary.pop("all")  # every image is in two groups
    return {k: {f: (round(x, 4) if isinstance(x, float) else x) for f, x in v.items()}
            for k, v in sorted(summary.items())} | {"images": len(rows) * len(seeds)}


@torch.no_grad()
def restoration_report(final: Path, n: int = 48, num_steps: int = 25, guidance_scale: float = 1.5,
                       starts: tuple[float, ...] = (0.3, 0.6, 0.9, 1.0), seed: int = 0) -> dict:
    """Which phase of sampling fails: real latents of ``n`` training-composition renders (their
    prompts as captions) are noised to the schedule's timestep at fraction ``start`` of the way from
    clean (0) to pure noise (1), and denoised from there with the rest of the schedule; the detector
    scores the results. A model that restores images from 0.3 but not from 0.9 has learned details
    and not layout: the high-noise steps, where objects, places and colours are decided, are its limit."""
    from encoders.latents import patchify
    from hybrid.sampling import decode_image, denoise, image_prefix, prompt_prefix_rows
    from train.probes import to_pixels

    pipe = HybridPipeline.from_pretrained(final)
    model, cfg, codec, scheduler = pipe.model.eval(), pipe.config, pipe.codec, pipe.scheduler
    if cfg.image_head != "diffusion":
        raise ValueError("--restoration needs a diffusion head (the run generates codes)")
    world = ShapesWorld(resolution=cfg.image_size, seed=0)
    rows = sample_prompts(world, n, heldout=False)
    examples = [world.caption_example(10**7 + i, "train", tag=r["tag"]) for i, r in enumerate(rows)]
    ids = [pipe.tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples]
    x0 = patchify(codec.encode_latents(to_pixels([e.image for e in examples])), cfg.patch_size)  # (n, N, P)
    report = {}
    for start in starts:
        g = torch.Generator().manual_seed(seed)
        timesteps = scheduler.set_timesteps(num_steps)
        skip = min(len(timesteps) - 1, round((1.0 - start) * len(timesteps)))  # steps already "done"
        t0 = timesteps[skip]
        noise = torch.randn(x0.shape, generator=g)
        x = scheduler.add_noise(x0, noise, torch.full((len(x0),), float(t0))) if skip else noise

        cache, _ = image_prefix(model, prompt_prefix_rows(ids, cfg, with_uncond=False), guidance_scale != 1.0)
        x = denoise(model, cache, len(ids), scheduler, num_steps, guidance_scale, g, start_step=skip, init=x)
        verdicts = [judge(img, e.metadata) for img, e in zip(to_uint8(decode_image(model, codec, tokens=x)), examples)]
        report[f"from_{start:.1f}"] = {"timestep": round(float(t0), 1),
                                      "accuracy": round(sum(v["correct"] for v in verdicts) / len(verdicts), 4),
                                      "strict": round(sum(v["strict"] for v in verdicts) / len(verdicts), 4)}
    return report


@torch.no_grad()
def understanding_report(final: Path, n: int, seed: int = 0, style: str = "letter") -> dict:
    from hybrid.sequence import SampleBuilder

    pipe = HybridPipeline.from_pretrained(final)
    tokens = pipe.config.image_head == "tokens"  # Chameleon: input images are read as VQ codes
    if pipe.siglip is None and not tokens:
        raise FileNotFoundError(f"{final} has no siglip/ folder: the understanding report needs the encoder")
    model, tokenizer, codec, cfg = pipe.model, pipe.tokenizer, pipe.codec, pipe.config
    encoder = pipe._und_encoder()  # SigLIP features, or the codes
    world = ShapesWorld(resolution=cfg.image_size, seed=0)
    builder = SampleBuilder(tokenizer, cfg, caption_dropout=0.0)
    report: dict = {}
    for split in ("train", "heldout"):
        report |= {f"answer_accuracy_{split}/{k}": round(v, 4)
                   for k, v in answer_accuracy(model, encoder, builder, world, split, n, style=style).items()}
        for kind in ("caption", "answer"):  # the text loss with each sample's own image vs another's
            r = image_reliance(model, encoder, codec, builder, world, split, min(n, 128), kind=kind, style=style)
            report |= {f"{kind}_text_loss_{split}/own_image": r["own"],
                       f"{kind}_text_loss_{split}/shuffled_images": r["shuffled"],
                       f"{kind}_reliance_gap_{split}": r["gap"]}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sample_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("final", type=Path, help="a run's final/ folder")
    parser.add_argument("--n", type=int, default=96, help="prompts (half held out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--min-confidence", type=float, default=0.3,
                        help="detector threshold (0.3, GenEval's); higher rejects more clutter")
    parser.add_argument("--understanding", action="store_true", help="score the understanding path instead")
    parser.add_argument("--restoration", action="store_true",
                        help="denoise noised real latents from several noise levels instead (which phase fails)")
    parser.add_argument("--mc-answer", choices=MC_ANSWERS, default="letter",
                        help="how the run was trained to answer multiple choice (its mc_answer)")
    args = parser.parse_args(argv)
    if not (args.final / "config.json").is_file():
        parser.error(f"{args.final} is not a run's final/ folder (no config.json)")
    if args.restoration:
        print(json.dumps(restoration_report(args.final, args.n, guidance_scale=args.guidance_scale,
                                            seed=args.seeds[0]), indent=2))
    elif args.understanding:
        if not (args.final / "siglip").is_dir():
            parser.error(f"{args.final} has no siglip/: the run did not train the understanding path")
        print(json.dumps(understanding_report(args.final, args.n, args.seeds[0], args.mc_answer), indent=2))
    else:
        print(json.dumps(score_run(args.final, args.n, args.seeds, args.guidance_scale,
                                   min_confidence=args.min_confidence), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
