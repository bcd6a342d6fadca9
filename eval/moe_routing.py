"""Where an MoE model routes text and image tokens: per layer and expert, as a table and a heatmap.

    python -m eval.moe_routing runs/moe/final --out runs/moe/routing            # shapes-world data
    python -m eval.moe_routing runs/moe/final --out runs/moe/routing --samples 256 --mix-understand 0.4

The model reads held-out shapes-world samples (caption -> image, and with ``--mix-understand``
image -> caption / answer, when the model has an understanding path) exactly as training feeds
them (``hybrid_loss``: noised latents at random timesteps, or codes), and every MoE layer's
top-k choices are counted, padding excluded. For each layer and expert the report gives:

* ``image_frac``: the share of the tokens routed to the expert that are image tokens. Beside the
  data's own image share, it shows specialisation: an expert near 1 (or 0) serves images (text)
  almost alone. This is the measurement behind the Apple study's observation that experts of a
  native multimodal MoE specialise by modality without being told to.
* ``load``: the share of all assignments the expert received (1 / experts when balanced).
* ``text_share`` / ``image_share``: the share of that modality's assignments routed there.

Writes ``OUT/routing.json``, ``OUT/routing.md`` and ``OUT/routing.png`` (heatmaps of
``image_frac`` and ``load``, layers x experts). A per-layer specialisation score is reported too: the mean over
experts, weighted by load, of how far image_frac moved from the data's image share towards 0 or 1
(the way it moved): 0 = every expert sees the data mix, 1 = every expert serves one modality.

The same counts for the same architecture freshly initialised (``--no-control`` skips it) give the
score's baseline: text and image tokens enter the decoder through different embeddings, so even a
random router separates them somewhat; specialisation learned in training is what exceeds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hybrid.losses import hybrid_loss
from hybrid.moe import IMAGE, TEXT, MoEFeedForward, RouterOutput
from hybrid.pipeline import HybridPipeline
from hybrid.sequence import SampleBuilder
from eval.report import save_figure


def shapes_batches(pipe: HybridPipeline, samples: int, batch_size: int, mix_understand: float, seed: int):
    """Held-out-seed shapes-world training samples, in batches the way the trainer builds them."""
    from train.data import ShapesTrainSet
    from train.shapes import ShapesWorld

    cfg = pipe.config
    world = ShapesWorld(resolution=cfg.image_size, seed=seed)
    data = ShapesTrainSet(world, mix_caption=1.0 - mix_understand, mix_interleaved=0.0, mix_understand=mix_understand,
                          caption_dropout=0.0, seed=seed, mc_answer="text")
    collate = SampleBuilder(pipe.tokenizer, cfg, caption_dropout=0.0)
    for start in range(0, samples, batch_size):
        yield collate([data[i] for i in range(start, min(samples, start + batch_size))])


@torch.no_grad()
def route_counts(pipe: HybridPipeline, batches, seed: int = 0) -> torch.Tensor:
    """(layers, experts, 2) counts of text / image assignments over ``batches``."""
    model = pipe.model.eval()
    cfg = model.config
    moe = [m for m in model.layers if isinstance(m.ffn, MoEFeedForward)]
    if not moe:
        raise ValueError("this model has no MoE layers (moe_experts = 0)")
    counts = torch.zeros(len(moe), cfg.moe_experts, 2, dtype=torch.long)
    seen: list[RouterOutput] = []
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out: seen.append(out[1])) for b in moe]
    g = torch.Generator(pipe.device).manual_seed(seed)
    try:
        for batch in batches:
            batch = batch.to(pipe.device)
            und = None
            if batch.und_images.shape[0] and cfg.image_head != "tokens":
                if pipe.siglip is None:
                    raise ValueError("the data has input images but the model has no understanding encoder")
                und = pipe.siglip(batch.und_images)
            seen.clear()
            hybrid_loss(model, batch, pipe.scheduler, pipe.codec, cfg.patch_size, und_features=und, generator=g,
                        image_head=cfg.image_head)
            for layer, r in enumerate(seen):
                for m, col in ((TEXT, 0), (IMAGE, 1)):
                    chosen = r.experts[r.modality == m].reshape(-1).cpu()
                    counts[layer, :, col] += torch.bincount(chosen, minlength=cfg.moe_experts)
    finally:
        for h in hooks:
            h.remove()
    return counts


def summarise(counts: torch.Tensor) -> dict:
    """Shares and specialisation from (layers, experts, 2) counts."""
    c = counts.double()
    per_expert = c.sum(-1)  # (L, E)
    data_image = float(c[..., 1].sum() / c.sum())
    image_frac = torch.where(per_expert > 0, c[..., 1] / per_expert.clamp(min=1), torch.nan)
    load = per_expert / per_expert.sum(-1, keepdim=True)
    shares = c / c.sum(1, keepdim=True).clamp(min=1)  # (L, E, 2): of each modality's assignments
    d = image_frac - data_image  # towards 1 (images only) or 0 (text only), as a share of the way there
    dev = torch.where(d > 0, d / max(1 - data_image, 1e-9), -d / max(data_image, 1e-9)).nan_to_num(0.0)
    special = (dev * load).sum(-1)  # (L,)
    layers = []
    for i in range(c.shape[0]):
        layers.append({"layer": i, "specialisation": float(special[i]), "experts": [
            {"expert": e, "tokens": int(per_expert[i, e]), "image_frac": None if per_expert[i, e] == 0 else float(image_frac[i, e]),
             "load": float(load[i, e]), "text_share": float(shares[i, e, 0]), "image_share": float(shares[i, e, 1])}
            for e in range(c.shape[1])]})
    return {"data_image_share": data_image, "tokens": {"text": int(c[..., 0].sum() / c.shape[0]),
                                                       "image": int(c[..., 1].sum() / c.shape[0])},
            "layers": layers}


def to_markdown(summary: dict, model: str) -> str:
    lines = [f"# MoE routing: {model}", "",
             f"Data image share (of routed assignments): {summary['data_image_share']:.3f}. "
             "image_frac: the image share of the expert's tokens; load: its share of all assignments.", ""]
    control = summary.get("control_specialisation")
    for layer in summary["layers"]:
        base = f"; at initialisation {control[layer['layer']]:.3f}" if control else ""
        lines += [f"## Layer {layer['layer']} (specialisation {layer['specialisation']:.3f}{base})", "",
                  "| expert | tokens | image_frac | load | text share | image share |", "|---:|---:|---:|---:|---:|---:|"]
        for e in layer["experts"]:
            frac = "-" if e["image_frac"] is None else f"{e['image_frac']:.3f}"
            lines.append(f"| {e['expert']} | {e['tokens']} | {frac} | {e['load']:.3f} | {e['text_share']:.3f} | "
                         f"{e['image_share']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, dest: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    frac = np.array([[np.nan if e["image_frac"] is None else e["image_frac"] for e in l["experts"]]
                     for l in summary["layers"]])
    load = np.array([[e["load"] for e in l["experts"]] for l in summary["layers"]])
    L, E = frac.shape
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.9 * E * 2, 1.2 + 0.45 * L), squeeze=False)
    mid = summary["data_image_share"]
    panels = ((frac, f"image share of the expert's tokens (data: {mid:.2f})", "coolwarm", 0.0, 1.0),
              (load, "load (share of assignments)", "viridis", 0.0, float(load.max())))
    for ax, (m, name, cmap, lo, hi) in zip(axes[0], panels):
        norm = matplotlib.colors.TwoSlopeNorm(vcenter=mid, vmin=0.0, vmax=1.0) if cmap == "coolwarm" and 0 < mid < 1 else None
        im = ax.imshow(m, cmap=cmap, norm=norm, vmin=None if norm else lo, vmax=None if norm else hi, aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("MoE layer", fontsize=8)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, dest)


def report(model_dir: str | Path, out: str | Path, samples: int = 128, batch_size: int = 32,
           mix_understand: float | None = None, seed: int = 1234, control: bool = True) -> dict:
    """Count, summarise and write routing.{json,md,png}; returns the summary. ``control`` adds
    the specialisation of the same architecture at initialisation (``control_specialisation``)."""
    from hybrid.model import HybridModel

    pipe = HybridPipeline.from_pretrained(model_dir)
    if mix_understand is None:  # images in both roles when the model reads images
        mix_understand = 0.4 if (pipe.siglip is not None or pipe.config.image_head == "tokens") else 0.0
    counts = route_counts(pipe, shapes_batches(pipe, samples, batch_size, mix_understand, seed), seed)
    summary = {"model": str(model_dir), "samples": samples, "mix_understand": mix_understand,
               "routing": pipe.config.moe_routing, "top_k": pipe.config.moe_top_k, **summarise(counts)}
    if control:
        torch.manual_seed(seed)
        pipe.model = HybridModel(pipe.config).to(pipe.device)  # the same architecture, untrained
        base = summarise(route_counts(pipe, shapes_batches(pipe, samples, batch_size, mix_understand, seed), seed))
        summary["control_specialisation"] = [layer["specialisation"] for layer in base["layers"]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "routing.md").write_text(to_markdown(summary, str(model_dir)) + "\n")
    plot(summary, out / "routing.png", f"{model_dir} ({summary['routing']} routing, top-{summary['top_k']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.moe_routing", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a pipeline folder (a run's final/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mix-understand", type=float, default=None,
                    help="share of image -> text samples (default 0.4 when the model reads images, else 0)")
    ap.add_argument("--seed", type=int, default=1234, help="data seed (not the training seed: held-out samples)")
    ap.add_argument("--no-control", action="store_true", help="skip the freshly initialised baseline")
    args = ap.parse_args(argv)
    try:
        s = report(args.model, args.out, args.samples, args.batch_size, args.mix_understand, args.seed,
                   control=not args.no_control)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for layer in s["layers"]:
        fr = " ".join("-" if e["image_frac"] is None else f"{e['image_frac']:.2f}" for e in layer["experts"])
        base = f" (at initialisation {s['control_specialisation'][layer['layer']]:.3f})" if "control_specialisation" in s else ""
        print(f"layer {layer['layer']}: image share per expert [{fr}] (data {s['data_image_share']:.2f}), "
              f"specialisation {layer['specialisation']:.3f}{base}")
    print(f"wrote {Path(args.out) / 'routing.md'} and routing.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
