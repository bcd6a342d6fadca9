"""Instruments that show whether a run learns to *see*: image reliance and linear probes.

    python -m train.probes runs/recipe/hybrid/final                  # encoder + hybrid probes, reliance
    python -m train.probes runs/recipe/siglip/final --encoder-only   # a SigLIP stage's encoder alone
    python -m train.probes RUN/final --n-fit 500 --n-score 250       # CPU-quick

*Image reliance*: the caption text loss with each image's own understanding features against the
same captions read with another image's features (a fixed derangement). A model that uses the
image has a large gap; a model whose encoder collapsed, or whose aligner outputs nothing useful,
has a gap of ~0. The trainer logs it at every sampling step, so a collapse shows the step it happens.

*Caption reliance* (the generation side): the image loss at a few noise levels with each image's
own caption, another's and none; a small gap at high noise means the model ignores its prompt.

*Probes*: linear classifiers (multinomial logistic regression, L2, full-batch L-BFGS on standardised
features) for colour, shape, count and position, fitted on features of shapes-world renders with
known truth and scored on fresh renders of the training compositions and of the held-out ones
(colour-shape pairs never trained on). Features: the understanding encoder's tokens, and the
hybrid model's hidden states over the image span (middle and last block). Chance: 1/classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from train.shapes import ShapesWorld, render

PROBE_TASKS = ("color", "shape", "count", "x_position", "y_position")
RELIANCE_SEED = 1234  # the captions / questions the reliance check reads: fixed, so runs compare


# --------------------------------------------------------------------------- data with known truth
@dataclass
class ProbeSet:
    images: list  # PIL renders
    labels: dict[str, np.ndarray]  # task -> (n,) class ids; -1 where the task does not apply
    classes: dict[str, list[str]]


def probe_set(world: ShapesWorld, split: str, n: int, seed: int) -> ProbeSet:
    """``n`` renders: even indices one object (colour, shape and position probes), odd ones 1-4
    objects (count). In ``split="heldout"`` the single object is always a held-out colour-shape
    pair, and count scenes hold one; training-split scenes never contain one."""
    rng = random.Random(f"probes:{seed}:{split}")
    pairs_all = world._pairs(split)
    first = world._pairs(split, heldout_only=split == "heldout")
    colors, shapes = list(world.colors), list(world.shapes)
    thirds = ["left", "centre", "right"]
    labels = {t: np.full(n, -1, dtype=np.int64) for t in PROBE_TASKS}
    images = []
    for i in range(n):
        if i % 2 == 0:
            c, s = rng.choice(first)
            scene = world._place(rng, [(c, s)])
            o = scene.objects[0]
            labels["color"][i], labels["shape"][i] = colors.index(c), shapes.index(s)
            r = world.resolution
            labels["x_position"][i] = min(2, int(3 * o.cx / r))
            labels["y_position"][i] = min(2, int(3 * o.cy / r))
        else:
            k = rng.randint(1, 4)
            specs = [rng.choice(first)] + [rng.choice(pairs_all) for _ in range(k - 1)]
            scene = world._place(rng, specs)
            labels["count"][i] = k - 1
        images.append(render(scene))
    classes = {"color": colors, "shape": shapes, "count": ["1", "2", "3", "4"], "x_position": thirds,
               "y_position": ["top", "middle", "bottom"]}
    return ProbeSet(images, labels, classes)


# --------------------------------------------------------------------------- the probe itself
def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, iters: int = 100) -> Callable:
    """Multinomial logistic regression on (n, F) features: standardised with the fit set's
    statistics, L2-regularised, full-batch L-BFGS. Returns a predict(features) -> classes function."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda feats: (((feats.double() - mean) / std) @ w + b).argmax(-1)


def probe_scores(features: Callable[[list], torch.Tensor], world: ShapesWorld, n_fit: int = 2000,
                 n_score: int = 1000, seed: int = 0) -> dict[str, float]:
    """Fit a probe per task on ``features(images) -> (n, F)`` of training-composition renders and
    score it on fresh training-composition renders ("train/<task>") and held-out ones
    ("heldout/<task>"); also each task's chance level ("chance/<task>")."""
    fit = probe_set(world, "train", n_fit, seed)
    x_fit = features(fit.images)
    scored = {split: probe_set(world, split, n_score, seed + 1) for split in ("train", "heldout")}
    x_score = {split: features(s.images) for split, s in scored.items()}
    out: dict[str, float] = {}
    for task in PROBE_TASKS:
        keep = fit.labels[task] >= 0
        predict = fit_probe(x_fit[torch.from_numpy(keep)], torch.from_numpy(fit.labels[task][keep]),
                            len(fit.classes[task]))
        for split, s in scored.items():
            k = s.labels[task] >= 0
            pred = predict(x_score[split][torch.from_numpy(k)]).numpy()
            out[f"{split}/{task}"] = round(float((pred == s.labels[task][k]).mean()), 4)
        out[f"chance/{task}"] = round(1 / len(fit.classes[task]), 4)
    return out


def pixel_features(images: list) -> torch.Tensor:
    """Raw renders as features (n, H*W*3): what any encoder's probe is compared against."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).flatten(1).float() / 255


def to_pixels(images: list) -> torch.Tensor:
    """PIL images -> (n, 3, H, W) in [0, 1]."""
    return pixel_features(images).view(len(images), *np.asarray(images[0]).shape).permute(0, 3, 1, 2)


def encoder_features(encoder: torch.nn.Module, batch_size: int = 256) -> Callable[[list], torch.Tensor]:
    """The understanding encoder's tokens, flattened: (n, M * F)."""
    @torch.no_grad()
    def run(images: list) -> torch.Tensor:
        px = to_pixels(images)
        return torch.cat([encoder(p).flatten(1).float() for p in px.split(batch_size)])
    return run


def hybrid_features(model: torch.nn.Module, encoder: torch.nn.Module, builder, layer: int,
                    batch_size: int = 64) -> Callable[[list], torch.Tensor]:
    """The hybrid model's hidden states over an understanding image span after block ``layer``
    (the image read with the caption instruction after it, as in training), flattened: (n, M * D)."""
    from hybrid.sequence import ImageSegment, TextSegment, pack
    from train.data import CAPTION_INSTRUCTION

    @torch.no_grad()
    def run(images: list) -> torch.Tensor:
        feats = []
        grab: dict[str, torch.Tensor] = {}
        hook = model.layers[layer].register_forward_hook(lambda m, a, o: grab.__setitem__("h", o[0]))
        try:
            for lo in range(0, len(images), batch_size):
                samples = [builder.tokenize([ImageSegment(im, "und"), TextSegment(CAPTION_INSTRUCTION, loss=False)])
                           for im in images[lo:lo + batch_size]]
                batch = pack(samples, max(len(s) for s in samples), builder.ids.pad, packing=False,
                             bidirectional=builder.bidirectional)
                model(batch.input_ids, batch.position_ids, batch.attention_mask(model.config.attn_impl),
                      und_features=encoder(batch.und_images), und_index=batch.und_index,
                      logits_index=batch.und_index[:, :1].reshape(-1))
                h = grab["h"].reshape(-1, grab["h"].shape[-1])  # (B*T, D)
                feats.append(h[batch.und_index.reshape(-1)].view(len(samples), -1).float())  # (b, M*D)
        finally:
            hook.remove()
        return torch.cat(feats)
    return run


# --------------------------------------------------------------------------- image reliance
@torch.no_grad()
def image_reliance(model: torch.nn.Module, encoder: Callable, codec: torch.nn.Module, builder, world: ShapesWorld,
                   split: str = "train", n: int = 64, kind: str = "caption", style: str = "letter") -> dict[str, float]:
    """Mean text loss of ``n`` understanding samples (``kind``: "caption" or "answer") read with
    their own image and with another sample's image (sample i gets image i+1's features: a
    derangement, so no text keeps its own image). Returns own, shuffled and gap = shuffled - own."""
    from hybrid.losses import hybrid_loss
    from hybrid.sequence import pack
    from train.data import understanding_caption, understanding_question

    rng = random.Random(f"{RELIANCE_SEED}:{split}:{kind}")
    idx = [rng.randrange(10**8) for _ in range(n)]
    items = [understanding_caption(*(lambda e: (e.image, e.prompt))(world.caption_example(i, split)))
             if kind == "caption" else understanding_question(world.question_example(i, split), style=style)
             for i in idx]
    samples = [builder.tokenize(it) for it in items]
    batch = pack(samples, max(len(s) for s in samples), builder.ids.pad, packing=False,
                 bidirectional=builder.bidirectional)
    batch = batch.to(next(model.parameters()).device)
    perm = torch.roll(torch.arange(n, device=batch.und_images.device), -1)
    tokens = model.config.image_head == "tokens"  # Chameleon: hybrid_loss reads the images as codes itself
    out = {}
    for name, imgs in (("own", batch.und_images), ("shuffled", batch.und_images[perm])):
        b = dataclasses.replace(batch, und_images=imgs)
        loss = hybrid_loss(model, b, None, codec, model.config.patch_size,
                           und_features=None if tokens else encoder(imgs), image_head=model.config.image_head)
        out[name] = round(loss.text.item(), 4)
    out["gap"] = round(out["shuffled"] - out["own"], 4)
    return out


@torch.no_grad()
def caption_reliance(model: torch.nn.Module, codec: torch.nn.Module, scheduler, builder, world: ShapesWorld,
                     n: int = 64, sigmas: tuple[float, ...] = (0.3, 0.6, 0.9)) -> dict[str, dict[str, float]]:
    """The generation side's reliance: the image loss (the scheduler's target, fixed noise) of ``n``
    training-composition images at noise levels ``sigmas`` (fractions of the training timesteps)
    with their own caption, another image's caption, and none. Own < shuffled by a wide margin at
    high noise means the model draws what it is asked; level means it draws whatever it likes."""
    from encoders.latents import patchify
    from hybrid.sequence import pack

    rng = random.Random(f"{RELIANCE_SEED}:captions")
    examples = [world.caption_example(rng.randrange(10**8), "train") for _ in range(n)]
    prompts = [e.prompt for e in examples]
    cases = {"own": prompts, "shuffled": prompts[1:] + prompts[:1], "none": [None] * n}
    cfg = model.config
    out: dict[str, dict[str, float]] = {}
    for sigma in sigmas:
        row: dict[str, float] = {}
        for name, caps in cases.items():
            samples = [builder.tokenize([c or "-", e.image], drop_caption=c is None) for c, e in zip(caps, examples)]
            batch = pack(samples, max(len(s) for s in samples), builder.ids.pad, packing=False,
                         bidirectional=builder.bidirectional)
            x0 = patchify(codec.encode_latents(batch.gen_images), cfg.patch_size)  # (n, N, P)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(RELIANCE_SEED))
            t = torch.full((n,), sigma * scheduler.num_train_timesteps)
            pred = model(batch.input_ids, batch.position_ids, batch.attention_mask(cfg.attn_impl),
                         gen_tokens=scheduler.add_noise(x0, noise, t), gen_index=batch.gen_index,
                         gen_timesteps=t, logits_index=batch.gen_index[:, :1].reshape(-1)).image_pred
            row[name] = round(F.mse_loss(pred, scheduler.training_target(x0, noise, t)).item(), 4)
        row["gap"] = round(row["shuffled"] - row["own"], 4)
        out[f"sigma_{sigma}"] = row
    return out


# --------------------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.probes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a pipeline folder (a run's final/) or, with --encoder-only, "
                                              "a SiglipEncoder folder")
    ap.add_argument("--encoder-only", action="store_true", help="probe a SiglipEncoder folder alone")
    ap.add_argument("--n-fit", type=int, default=2000)
    ap.add_argument("--n-score", type=int, default=1000)
    ap.add_argument("--reliance-n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    a = ap.parse_args(argv)
    from encoders.siglip import SiglipEncoder

    report: dict = {}
    if a.encoder_only:
        if not (a.folder / "config.json").is_file():
            ap.error(f"{a.folder} is not a SiglipEncoder folder (no config.json)")
        encoder = SiglipEncoder.from_pretrained(a.folder).eval()
        world = ShapesWorld(resolution=encoder.image_size, seed=0)
        report["encoder"] = probe_scores(encoder_features(encoder), world, a.n_fit, a.n_score, a.seed)
    else:
        from hybrid.pipeline import HybridPipeline
        from hybrid.sequence import SampleBuilder

        if not (a.folder / "config.json").is_file():
            ap.error(f"{a.folder} is not a pipeline folder (no config.json)")
        pipe = HybridPipeline.from_pretrained(a.folder)
        if pipe.siglip is None:
            ap.error(f"{a.folder} has no siglip/: probes read the understanding path")
        model, cfg = pipe.model.eval(), pipe.config
        encoder = pipe.siglip.eval()
        world = ShapesWorld(resolution=cfg.image_size, seed=0)
        builder = SampleBuilder(pipe.tokenizer, cfg, caption_dropout=0.0)
        report["encoder"] = probe_scores(encoder_features(encoder), world, a.n_fit, a.n_score, a.seed)
        for name, layer in (("hybrid_middle", (len(model.layers) - 1) // 2), ("hybrid_last", len(model.layers) - 1)):
            report[name] = probe_scores(hybrid_features(model, encoder, builder, layer), world, a.n_fit, a.n_score,
                                        a.seed)
        if cfg.image_head == "diffusion":
            report["caption_reliance"] = caption_reliance(model, pipe.codec, pipe.scheduler, builder, world)
        for split in ("train", "heldout"):
            report[f"reliance_{split}"] = image_reliance(model, encoder, pipe.codec, builder, world, split,
                                                         a.reliance_n)
    report["pixels"] = probe_scores(pixel_features, world, a.n_fit, a.n_score, a.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
