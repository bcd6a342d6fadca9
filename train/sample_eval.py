"""Score a trained run's image generation on more prompts than the trainer's sample grid.

    python -m train.sample_eval runs/tiny_vq/final --n 96
    python -m train.sample_eval runs/tiny_ar/final --n 96 --seeds 0 1

Generates one image per prompt for ``n`` GenEval-format prompts (half from the training
compositions, half held out; spread over the six tags) and applies the shapes detector with
GenEval's rules, per split and per tag. A quick comparison tool for runs on the shapes world;
the GenEval-compatible evaluation is ``eval/``'s job.

Caveat: the detector assigns a shape to every blob it finds, so cluttered, meaningless images
score above zero (a model with an untrained generation head reached 1/3 on a 6-prompt grid);
compare runs against such a floor, not against zero.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from encoders.latents import build_codec
from hybrid.checkpoint import load_pretrained_model
from hybrid.sampling import generate_images
from hybrid.tokenizer import load_tokenizer
from schedulers import scheduler_from_dict
from train.detect import detect, evaluate
from train.shapes import ShapesWorld
from train.trainer import sample_prompts, to_uint8


@torch.no_grad()
def score_run(final: Path, n: int, seeds: list[int], guidance_scale: float = 3.0, num_steps: int = 25,
              batch_size: int = 48) -> dict:
    model = load_pretrained_model(final).eval()
    cfg = model.config
    tokenizer = load_tokenizer(final / "tokenizer", add_markers=False)
    codec = build_codec(cfg.image_codec, str(final / "vq") if cfg.image_codec == "vq" else None)
    scheduler = scheduler_from_dict(json.loads((final / "scheduler.json").read_text()))
    rows = sample_prompts(ShapesWorld(resolution=cfg.image_size, seed=0), n, heldout=True)
    hits: dict[str, list[bool]] = {}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            ids = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in chunk]
            pixels = generate_images(model, ids, scheduler, codec, num_steps, guidance_scale, generator=g)
            for img, row in zip(to_uint8(pixels), chunk):
                ok = evaluate(detect(img), {k: v for k, v in row.items() if k != "split"})[0]
                for key in (row["split"], f"{row['split']}/{row['tag']}"):
                    hits.setdefault(key, []).append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())} | {"images": len(rows) * len(seeds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sample_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("final", type=Path, help="a run's final/ folder")
    parser.add_argument("--n", type=int, default=96, help="prompts (half held out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not (args.final / "config.json").is_file():
        parser.error(f"{args.final} is not a run's final/ folder (no config.json)")
    print(json.dumps(score_run(args.final, args.n, args.seeds, args.guidance_scale), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
