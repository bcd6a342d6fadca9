"""Train several variants of one hybrid config on the same data and steps, then compare them.

    python -m train.compare train/configs/research/compare.yaml --out runs/compare
    python -m train.compare train/configs/research/compare.yaml --out runs/compare \\
        --set vq_path=runs/recipe/vq/final --set siglip_path=runs/recipe/siglip/final --only dense,moe

A plan file names a hybrid-stage config, overrides shared by every variant, and the variants
(each a list of ``key=value`` overrides, e.g. ``model.late_fusion_layers=1``). Each variant is one
``accelerate launch --config_file train/accelerate/recipe.yaml -m train <config> ...`` run into
``OUT/<variant>`` (one at a time, so the tokens/s are comparable), with ``val_batches`` held-out
batches scored at the end (``OUT/<variant>/val.json``); MoE variants also get
``python -m eval.moe_routing`` (``OUT/<variant>/routing``). Finished variants are skipped on a
rerun and an interrupted one resumes from its checkpoint. Then ``OUT/results.md`` /
``results.json``: per variant the parameters (total; active per text token and per image token,
which differ for MoE and late fusion), training FLOPs from those and the trained tokens of each
modality, wall time and tokens/s, held-out text and image losses, the shapes-world sample and
multiple-choice accuracies at the last step, the largest gradient norm and the non-finite steps
skipped, and for MoE the routing specialisation; ``OUT/curves.png`` overlays the variants'
training losses and gradient norms.

On a GPU pass ``--config-file train/accelerate/single_gpu.yaml`` (or multi_gpu.yaml) and a GPU
plan; everything else is the same.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from train.recipe import ACCELERATE_CONFIG, Job, _fmt, run_cli, run_jobs


def load_plan(path: Path, sets: list[str]) -> dict:
    plan = yaml.safe_load(path.read_text()) or {}
    unknown = set(plan) - {"config", "overrides", "variants", "val_batches", "routing_samples"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    if not plan.get("config") or not plan.get("variants"):
        raise ValueError(f"{path}: needs config (a hybrid stage YAML) and variants (name: [key=value, ...])")
    for name, over in plan["variants"].items():
        if not isinstance(over, list) or not all(isinstance(o, str) and "=" in o for o in over):
            raise ValueError(f"{path}: variant {name!r} must be a list of key=value strings, got {over!r}")
    plan["overrides"] = list(plan.get("overrides") or []) + list(sets)
    plan.setdefault("val_batches", 8)
    plan.setdefault("routing_samples", 128)
    return plan


def active_parameters(model_cfg) -> dict[str, int]:
    """Weight parameters a token passes through: every decoder block's attention and norms, its FFN
    or its top-k experts (and router), the final norm; for a text token the LM head too, for an
    image token the vision blocks in late fusion. The input embeddings and the image in / out
    layers are left out (small, and not per-block compute); with image_head="tokens" an image
    token is counted like a text token, since the LM head writes codes too."""
    import torch

    from hybrid.model import HybridModel
    from hybrid.moe import MoEFeedForward

    with torch.device("meta"):
        model = HybridModel(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    dec = 0
    for block in model.layers:
        for name, p in block.named_parameters():
            if isinstance(block.ffn, MoEFeedForward) and name.startswith("ffn.experts."):
                continue
            dec += p.numel()
        if isinstance(block.ffn, MoEFeedForward):
            dec += block.ffn.top_k * sum(p.numel() for p in block.ffn.experts[0].parameters())
    dec += sum(p.numel() for p in model.norm.parameters())
    head = model.lm_head.weight.numel()
    vision = sum(p.numel() for p in model.vision_layers.parameters())
    image = dec + vision + (head if model_cfg.image_head == "tokens" else 0)
    return {"total": total, "active_text": dec + head, "active_image": image}


def token_mix(cfg, samples: int = 256) -> float:
    """The image share of the (non-padding) tokens the training data holds: a variant's FLOPs
    count vision blocks on image tokens only."""
    from hybrid.tokenizer import load_tokenizer
    from hybrid.sequence import SampleBuilder
    from train.data import ShapesTrainSet
    from train.shapes import ShapesWorld

    mcfg = cfg["model_cfg"]
    world = ShapesWorld(resolution=mcfg.image_size, seed=0)
    data = ShapesTrainSet(world, mix_caption=cfg["mix_caption"], mix_interleaved=cfg["mix_interleaved"],
                          mix_understand=cfg["mix_understand"], caption_dropout=mcfg.caption_dropout, seed=0,
                          mc_answer=cfg.get("mc_answer", "letter"))
    builder = SampleBuilder(load_tokenizer(cfg["tokenizer"]), mcfg)
    img = txt = 0
    for i in range(samples):
        s = builder.tokenize(data[i]["segments"], data[i]["drop_caption"])
        n_img = sum(length for _, length, _ in s.spans)
        img, txt = img + n_img, txt + len(s) - n_img
    return img / (img + txt)


def summarise(out: Path, name: str) -> dict:
    """One variant's row from its run folder."""
    from hybrid.config import HybridConfig
    from train.config import read_raw

    run = out / name
    mcfg = HybridConfig.load(run / "final" / "config.json")
    raw = read_raw(run / "config.yaml")
    params = active_parameters(mcfg)
    val = json.loads((run / "val.json").read_text())
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    train_recs = [r for r in recs if "tokens_per_s" in r]
    last_eval = [r for r in recs if "sample_accuracy_train" in r or "answer_accuracy_train" in r][-1:]
    tps = sorted(r["tokens_per_s"] for r in train_recs[1:]) or [float("nan")]  # the first includes startup
    # stability (QK-norm / z-loss / LR comparisons): the largest pre-clip gradient norm logged and
    # the steps skipped for a non-finite loss or gradient
    norms = [r["grad_norm"] for r in train_recs if isinstance(r.get("grad_norm"), (int, float))]
    skipped = sum(1 for r in recs if "skipped" in r)
    share = token_mix({**raw, "model_cfg": mcfg, "tokenizer": str(run / "final" / "tokenizer")})
    tokens = val.get("tokens_trained")
    flops = None
    if tokens:  # 6 x active parameters x tokens, each modality with its own active count
        flops = 6 * tokens * ((1 - share) * params["active_text"] + share * params["active_image"])
    row = {"variant": name, **params, "image_token_share": share, "tokens_trained": tokens, "train_flops": flops,
           "tokens_per_s": tps[len(tps) // 2], "val_text_loss": val.get("text_loss"), "val_image_loss": val.get("image_loss"),
           "grad_norm_max": max(norms, default=None), "non_finite_steps": skipped}
    if last_eval:
        row.update({k: v for k, v in last_eval[0].items() if k.startswith(("sample_accuracy", "answer_accuracy"))
                    and "/" not in k})
    routing = run / "routing" / "routing.json"
    if routing.is_file():
        r = json.loads(routing.read_text())
        row["routing_specialisation"] = [round(layer["specialisation"], 3) for layer in r["layers"]]
        if "control_specialisation" in r:
            row["routing_specialisation_at_init"] = [round(v, 3) for v in r["control_specialisation"]]
    return row


def plot_variants(out: Path, names: list[str]) -> Path | None:
    """``out/curves.png``: training text loss, image loss and gradient norm against the step, one
    line per variant (the loss spikes and norm growth a stability comparison looks for)."""
    from eval.report import log_points, plot_panels, read_log

    logs = {n: [r for r in read_log(out / n / "log.jsonl") if "tokens_per_s" in r] for n in names}
    panels = [(key, [(n, log_points(rows, key)) for n, rows in logs.items()])
              for key in ("text_loss", "image_loss", "grad_norm")]
    return plot_panels(panels, out / "curves.png", log_y=True)


def routing(r: dict) -> str:
    """Per-layer specialisation, with the freshly initialised baseline in parentheses."""
    if "routing_specialisation" not in r:
        return "-"
    base = r.get("routing_specialisation_at_init") or [None] * len(r["routing_specialisation"])
    return ", ".join(f"{v:.2f}" + (f" ({b:.2f})" if b is not None else "") for v, b in zip(r["routing_specialisation"], base))


def to_markdown(rows: list[dict], plan_path: Path, commands: list[str]) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"# Variant comparison: {plan_path}", "",
             "| variant | params (M) | active / text token (M) | active / image token (M) | train TFLOP | tokens/s | "
             "val text loss | val image loss | max grad norm | non-finite steps | sample acc. (train / held-out) | "
             "MC acc. (train / held-out) | routing specialisation per MoE layer (at init) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['total'] / 1e6:.2f} | {r['active_text'] / 1e6:.2f} | {r['active_image'] / 1e6:.2f} | "
            f"{f(r['train_flops'] and r['train_flops'] / 1e12, '{:.2f}')} | {f(r['tokens_per_s'], '{:.0f}')} | "
            f"{f(r['val_text_loss'])} | {f(r['val_image_loss'], '{:.4f}')} | "
            f"{f(r.get('grad_norm_max'), '{:.2f}')} | {r.get('non_finite_steps', '-')} | "
            f"{f(r.get('sample_accuracy_train'), '{:.2f}')} / {f(r.get('sample_accuracy_heldout'), '{:.2f}')} | "
            f"{f(r.get('answer_accuracy_train'), '{:.2f}')} / {f(r.get('answer_accuracy_heldout'), '{:.2f}')} | "
            f"{routing(r)} |")
    lines += ["", "Training curves per variant: `curves.png`.", "",
              "Commands (in order):", "", "```", *commands, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path, help="a plan YAML (config, overrides, variants)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--config-file", default=ACCELERATE_CONFIG, help="accelerate config for every run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    a = ap.parse_args(argv)
    return run_cli("compare", lambda: compare(a))


def compare(a: argparse.Namespace) -> int:
    import os

    from train.config import read_raw
    from train.trainer import load_config as load_hybrid_config

    plan = load_plan(a.plan, a.set)
    names = list(plan["variants"])
    if a.only:
        wanted = [n.strip() for n in a.only.split(",")]
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise ValueError(f"--only: no variants {missing} in {a.plan} (it has {names})")
        names = [n for n in names if n in wanted]
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()
    commands, rows = [], []
    for name in names:
        args = [f"output_dir={out / name}", f"val_batches={plan['val_batches']}", *plan["overrides"],
                *plan["variants"][name]]
        steps = int(read_raw(plan["config"], args).get("steps", 0)) or None
        cmd = [py, "-m", "accelerate.commands.launch", "--config_file", a.config_file, "-m", "train", plan["config"], *args]
        job_cmds = [cmd]
        moe = load_hybrid_config(plan["config"], args).model_config().moe_experts > 0
        if moe:
            job_cmds.append([py, "-m", "eval.moe_routing", str(out / name / "final"), "--out", str(out / name / "routing"),
                             "--samples", str(plan["routing_samples"])])
        done = out / name / ("routing/routing.json" if moe else "val.json")
        commands += [shlex.join(c) for c in job_cmds]
        run_jobs([Job(name, job_cmds, done, out / "logs" / f"{name}.log", steps, out / name / "log.jsonl")],
                 a.threads or os.cpu_count() or 1, t0)
        rows.append(summarise(out, name))
    (out / "results.json").write_text(json.dumps({"plan": str(a.plan), "rows": rows, "commands": commands}, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(rows, a.plan, commands))
    plot_variants(out, names)
    print(f"\ncompared {len(rows)} variants in {_fmt(time.time() - t0)}: {out / 'results.md'}")
    for r in rows:
        print(f"  {r['variant']:<16} val text {r['val_text_loss']:.3f}  image {r['val_image_loss']:.4f}  "
              f"{r['tokens_per_s']:.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
