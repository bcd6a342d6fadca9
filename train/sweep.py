"""Scaling-law sweeps: train a grid of model sizes x token budgets, record each run's validation
losses per modality, and fit ``L(N, D) = E + A/N^alpha + B/D^beta`` to them (train/scaling.py).

    python -m train.sweep --grid cpu --out runs/sweep_cpu      # 4 widths x 3 budgets, minutes on 2 cores
    python -m train.sweep --grid gpu --out runs/sweep_gpu      # 5 sizes x 4 budgets on one GPU (SCALING.md)
    python -m train.sweep --out runs/sweep --base train/configs/scaling/cpu.yaml \\
        --sizes 32x2,64x2x4,96x3x6 --steps 100,200,400 --set lr=2e-3 --budget 1e13
    python -m train.sweep --out runs/sweep_cpu --fit-only --budget 1e15   # refit OUT/sweep.jsonl

A size is ``DIMxLAYERS[xHEADS]`` (heads default to DIM/16; key-value heads = heads); a budget is a
number of steps at the base config's batch size. Each point is its own

    accelerate launch --config_file train/accelerate/recipe.yaml -m train <base.yaml> \\
        output_dir=OUT/points/<name> model.dim=.. model.n_layers=.. model.n_heads=.. model.n_kv_heads=.. \\
        steps=.. val_batches=.. tokenizer=OUT/tokenizer [--set key=value ...]

(``--accelerate-config`` picks another launcher file, e.g. train/accelerate/multi_gpu.yaml; on a GPU
with bf16 the launch gets ``--mixed_precision bf16``, as in train.recipe). ``--set`` passes any
training-config field to every point: ``--set data=shards-{000..009}.tar --set val_data=val.tar``
sweeps on files instead of the shapes world. The commands are printed and written to
``OUT/commands.sh``; progress is printed every 20 s. A rerun skips finished points (those with
``val.json``) and resumes an interrupted one from its checkpoint; a finished point whose config
differs from the requested one is an error (use another --out).

N is the non-embedding parameter count (``train.scaling.count_parameters``: all parameters but the
text embedding, the LM head and the VQ code embedding; ``--params total`` fits the total), D the
tokens trained (text and image, non-padding, over all processes), C = 6 N D. The fit is made per
modality: text loss, image loss, and the total ``text + image_loss_weight * image``.

Writes::

    OUT/points/<name>/          each run (its val.json: validation losses, N, D)
    OUT/logs/<name>.log         each run's output
    OUT/commands.sh             every point's command
    OUT/sweep.jsonl             one record per finished point
    OUT/fit.json, OUT/fit.md    per modality: E, A, B, alpha, beta with bootstrap intervals, and the
                                compute-optimal N and D for --budget FLOPs (with intervals)
    OUT/loss_vs_compute.png     every run at C = 6 N D, the fitted curves and the compute-optimal frontier
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.config import load_config
from train.recipe import ACCELERATE_CONFIG, Job, _fmt, run_cli, run_jobs
from train.state_io import STATE_FILE, latest_checkpoint

LOSSES = ("text_loss", "image_loss", "loss")  # fitted one by one; "loss" = text + lambda * image


@dataclass
class Grid:
    base: str  # the training config every point starts from
    sizes: list[str]  # DIMxLAYERS[xHEADS]
    steps: list[int]  # budgets, in steps of the base config's batch
    val_batches: int


# Named grids. The CPU one: debug-sized widths at 2 layers (head width 16), 120-480 steps of 8
# samples (51k-0.5M non-embedding parameters, 36k-144k tokens): twelve runs, about five minutes on
# 2 cores. The GPU one spans 0.94M-26M non-embedding parameters and 64k-512k samples.
GRIDS: dict[str, Grid] = {
    "cpu": Grid("train/configs/scaling/cpu.yaml", ["32x2x2", "64x2x4", "96x2x6", "128x2x8"], [120, 240, 480], 16),
    "gpu": Grid("train/configs/scaling/gpu.yaml", ["128x4x2", "192x4x3", "256x6x4", "384x6x6", "512x8x8"],
                [1000, 2000, 4000, 8000], 50),
}


def parse_size(text: str) -> tuple[int, int, int]:
    """``DIMxLAYERS[xHEADS]`` -> (dim, n_layers, n_heads); heads default to dim // 16."""
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or min(nums, default=0) < 1:
        raise ValueError(f"size {text!r}: expected DIMxLAYERS or DIMxLAYERSxHEADS, e.g. 64x2 or 64x2x4")
    dim, layers = nums[:2]
    heads = nums[2] if len(nums) == 3 else max(1, dim // 16)
    return dim, layers, heads


@dataclass
class Point:
    dim: int
    n_layers: int
    n_heads: int
    steps: int

    @property
    def name(self) -> str:
        return f"d{self.dim}_l{self.n_layers}_h{self.n_heads}_s{self.steps}"

    def overrides(self) -> list[str]:
        return [f"model.dim={self.dim}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
                f"model.n_kv_heads={self.n_heads}", f"steps={self.steps}"]


def read_points(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def point_record(point: Point, run: Path, params: str) -> dict:
    """One sweep.jsonl record from a finished run's val.json."""
    val = json.loads((run / "val.json").read_text())
    if val.get("tokens_trained") is None:
        raise ValueError(f"{run}/val.json has no tokens_trained (a run resumed from a checkpoint older than the "
                         f"token count): rerun that point in a fresh folder")
    N = val["non_embedding_params"] if params == "non_embedding" else val["params"]
    D = val["tokens_trained"]
    return {"name": point.name, "dim": point.dim, "n_layers": point.n_layers, "n_heads": point.n_heads,
            "steps": point.steps, "batch_size": val["batch_size"], "N": N, "D": D, "C": 6.0 * N * D,
            "params": val["params"], "non_embedding_params": val["non_embedding_params"],
            **{k: val[k] for k in LOSSES}, "text_tokens": val["text_tokens"], "image_tokens": val["image_tokens"],
            "val_batches": val["val_batches"], "output_dir": str(run)}


def fit_points(points: list[dict], budget: float | None, n_boot: int, level: float, seed: int = 0) -> dict:
    """Fit every loss in ``LOSSES`` (``train.scaling``); a loss that cannot be fitted gets
    ``{"error": ...}``. Also the compute-optimal N and D at ``budget`` (default: 10x the largest
    C of the sweep), with bootstrap intervals."""
    import numpy as np

    from train.scaling import bootstrap, compute_optimal, fit_scaling_law

    N = [p["N"] for p in points]
    D = [p["D"] for p in points]
    if budget is None and points:
        budget = 10 * max(p["C"] for p in points)
    out: dict = {"N": "non_embedding_params" if all(p["N"] == p["non_embedding_params"] for p in points)
                 else "params", "D": "tokens_trained", "budget": budget, "points": len(points), "fits": {}}
    for name in LOSSES:
        L = [p[name] for p in points]
        try:
            fit = fit_scaling_law(N, D, L)
        except ValueError as e:
            out["fits"][name] = {"error": str(e)}
            continue
        rec: dict = {**fit.to_dict()}
        boot = bootstrap(N, D, L, n_boot=n_boot, level=level, seed=seed, fit=fit) if n_boot else None
        if boot is not None:
            rec.update(level=level, bootstrap=len(boot.fits), bootstrap_skipped=boot.skipped,
                       intervals={k: list(v) for k, v in boot.intervals.items()})
        try:
            n_opt, d_opt = compute_optimal(fit, budget)
            opt: dict = {"C": budget, "N_opt": n_opt, "D_opt": d_opt, "loss": float(fit.predict(n_opt, d_opt)),
                         "tokens_per_parameter": d_opt / n_opt}
            if boot is not None:
                ok = [compute_optimal(f, budget) for f in boot.fits if f.alpha > 0 and f.beta > 0]
                if ok:
                    q = 100 * (1 - level) / 2
                    for i, key in enumerate(("N_opt", "D_opt")):
                        values = np.array([o[i] for o in ok])
                        opt.setdefault("intervals", {})[key] = [float(np.percentile(values, q)),
                                                                float(np.percentile(values, 100 - q))]
            rec["compute_optimal"] = opt
        except ValueError as e:
            rec["compute_optimal"] = {"error": str(e)}
        out["fits"][name] = rec
    return out


def _g(x: float) -> str:
    return f"{x:.3g}"


def fit_markdown(result: dict, points: list[dict], command: str) -> str:
    lines = ["# Scaling-law fit", "",
             f"`{command}`", "",
             f"L(N, D) = E + A / N^alpha + B / D^beta, fitted per loss (Chinchilla approach 3: Huber, delta 1e-3, "
             f"on log L; L-BFGS from a grid of starts). N = {result['N']}, D = {result['D']} (text + image), "
             f"C = 6 N D. {result['points']} points.", ""]
    for name, rec in result["fits"].items():
        lines.append(f"## {name}")
        lines.append("")
        if "error" in rec:
            lines += [f"Not fitted: {rec['error']}", ""]
            continue
        iv = rec.get("intervals", {})
        head = "| | E | A | B | alpha | beta |"
        lines += [head, "|---|---:|---:|---:|---:|---:|",
                  "| fit | " + " | ".join(_g(rec[k]) for k in ("E", "A", "B", "alpha", "beta")) + " |"]
        if iv:
            lines.append(f"| {100 * rec['level']:.0f}% bootstrap ({rec['bootstrap']} resamples) | " +
                         " | ".join(f"{_g(iv[k][0])} - {_g(iv[k][1])}" for k in ("E", "A", "B", "alpha", "beta")) +
                         " |")
        opt = rec.get("compute_optimal", {})
        lines.append("")
        if "error" in opt:
            lines.append(f"Compute-optimal size: {opt['error']}")
        elif opt:
            oi = opt.get("intervals", {})
            rng = (lambda k: f" ({_g(oi[k][0])} - {_g(oi[k][1])})" if k in oi else "")
            lines.append(f"At C = {opt['C']:.3g} FLOPs: N_opt = {_g(opt['N_opt'])}{rng('N_opt')}, "
                         f"D_opt = {_g(opt['D_opt'])}{rng('D_opt')} tokens ({_g(opt['tokens_per_parameter'])} "
                         f"tokens per parameter), predicted {name} {opt['loss']:.4f}.")
        lines.append("")
    lines += ["## Points", "", "| run | N | D | C | text loss | image loss | loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p["N"], p["D"])):
        lines.append(f"| {p['name']} | {p['N']:,} | {p['D']:,} | {p['C']:.3g} | {p['text_loss']:.4f} | "
                     f"{p['image_loss']:.4f} | {p['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def write_fit(out: Path, points: list[dict], budget: float | None, n_boot: int, level: float, command: str) -> dict:
    from train.scaling import ScalingFit, plot_loss_vs_compute

    result = fit_points(points, budget, n_boot, level)
    (out / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "fit.md").write_text(fit_markdown(result, points, command))
    fits = {k: ScalingFit(**{p: v[p] for p in ("E", "A", "B", "alpha", "beta")})
            for k, v in result["fits"].items() if "error" not in v}
    if fits:
        plot_loss_vs_compute(points, fits, out / "loss_vs_compute.png", result["budget"],
                             title=f"{len(points)} runs; N = {result['N']}, D = tokens trained")
    for name, rec in result["fits"].items():
        if "error" in rec:
            print(f"fit {name}: not fitted: {rec['error']}")
            continue
        iv = rec.get("intervals")
        show = ", ".join(f"{k}={_g(rec[k])}" + (f" [{_g(iv[k][0])}, {_g(iv[k][1])}]" if iv else "")
                         for k in ("E", "A", "B", "alpha", "beta"))
        opt = rec["compute_optimal"]
        tail = (f"; at C={opt['C']:.3g}: N_opt={_g(opt['N_opt'])}, D_opt={_g(opt['D_opt'])}"
                if "error" not in opt else f"; {opt['error']}")
        print(f"fit {name}: {show}{tail}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="cpu",
                    help="a named grid: its base config, sizes, steps and val_batches (each can be overridden)")
    ap.add_argument("--base", default=None, help="the base training config (default: the grid's)")
    ap.add_argument("--sizes", default=None, help="comma-separated DIMxLAYERS[xHEADS], e.g. 32x2,64x2x4")
    ap.add_argument("--steps", default=None, help="comma-separated step counts (token budgets at the base batch size)")
    ap.add_argument("--val-batches", type=int, default=None, help="validation batches per run (default: the grid's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training-config field for every point, e.g. lr=2e-3 or data=a.jsonl (repeatable)")
    ap.add_argument("--budget", type=float, default=None,
                    help="FLOPs for the compute-optimal N and D (default: 10x the largest C of the sweep)")
    ap.add_argument("--params", choices=("non_embedding", "total"), default="non_embedding", help="what N counts")
    ap.add_argument("--bootstrap", type=int, default=100,
                    help="bootstrap resamples for the intervals (0: none); each refits every loss (~0.1 s a fit)")
    ap.add_argument("--level", type=float, default=0.9, help="the intervals' coverage")
    ap.add_argument("--fit-only", action="store_true", help="refit OUT/sweep.jsonl; train nothing")
    ap.add_argument("--accelerate-config", default=ACCELERATE_CONFIG)
    ap.add_argument("--jobs", type=int, default=None,
                    help="points trained side by side (default: 2 on a CPU with >= 2 cores, 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per point (default: the cores shared among the jobs running)")
    a = ap.parse_args(argv)
    command = "python -m train.sweep " + shlex.join(argv if argv is not None else sys.argv[1:])
    return run_cli("sweep", lambda: run_sweep(a, command))


def run_sweep(a: argparse.Namespace, command: str) -> int:
    out: Path = a.out
    if not 0 < a.level < 1:
        raise ValueError(f"--level must be in (0, 1), got {a.level}")
    if a.fit_only:
        path = out / "sweep.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--fit-only: no {path}")
        points = read_points(path)
        for p in points:  # N as --params asks (a record has both counts)
            p["N"] = p["non_embedding_params" if a.params == "non_embedding" else "params"]
            p["C"] = 6.0 * p["N"] * p["D"]
        print(f"sweep: refitting {len(points)} points of {path} (N = {a.params} parameters)", flush=True)
        write_fit(out, points, a.budget, a.bootstrap, a.level, command)
        print(f"fit: {out / 'fit.md'}, {out / 'fit.json'}, {out / 'loss_vs_compute.png'}")
        return 0

    t0 = time.time()
    grid = GRIDS[a.grid]
    base = a.base or grid.base
    sizes = [parse_size(s) for s in (a.sizes.split(",") if a.sizes else grid.sizes)]
    steps = [int(s) for s in a.steps.split(",")] if a.steps else grid.steps
    val_batches = grid.val_batches if a.val_batches is None else a.val_batches
    if val_batches < 1 or min(steps) < 1:
        raise ValueError("--val-batches and every --steps value must be >= 1")
    points = [Point(d, l, h, s) for d, l, h in sizes for s in steps]
    if len({p.name for p in points}) != len(points):
        raise ValueError("the grid has repeated points")
    shared = list(a.set)
    for item in shared:  # the sweep owns these: one value per point
        key = item.partition("=")[0].strip()
        if key in ("output_dir", "steps", "val_batches", "model.dim", "model.n_layers", "model.n_heads",
                   "model.n_kv_heads", "stop_at"):
            raise ValueError(f"--set {item!r}: the sweep sets {key} itself (use --sizes / --steps / --val-batches)")
    cfg0 = load_config(base, shared)  # checks the base config and --set before anything runs
    out.mkdir(parents=True, exist_ok=True)
    if cfg0.tokenizer is None:  # one tokenizer for every point, trained once (as the trainer would)
        tok = out / "tokenizer"
        if not (tok / "tokenizer.json").is_file():
            from hybrid.tokenizer import train_tokenizer
            from train.shapes import ShapesWorld
            from train.trainer import TOKENIZER_TEXTS

            print(f"sweep: training the shared tokenizer -> {tok}", flush=True)
            world = ShapesWorld(resolution=cfg0.model_config().image_size, seed=cfg0.seed)
            train_tokenizer(world.corpus_texts(TOKENIZER_TEXTS), cfg0.tokenizer_vocab).save_pretrained(str(tok))
        shared = [*shared, f"tokenizer={tok}"]

    import torch

    gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    jobs = a.jobs or (1 if gpu else min(2, cores))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", a.accelerate_config]
    precision = ["--mixed_precision", "bf16"] if gpu and torch.cuda.is_bf16_supported() else []
    jobs_all: list[Job] = []
    cost: dict[str, float] = {}  # ~ training time, to pair runs of similar length side by side
    for p in points:
        run = out / "points" / p.name
        args = [f"output_dir={run}", *p.overrides(), f"val_batches={val_batches}", *shared]
        cfg = load_config(base, args)  # every point's config is checked before the first one runs
        val = run / "val.json"
        ckpt = latest_checkpoint(run) if val.is_file() else None
        if ckpt is not None:  # a finished point: was it trained as asked? (what resume_state checks)
            saved = json.loads((ckpt / STATE_FILE).read_text()).get("train_config") or {}
            diff = sorted(k for k in set(saved) | set(cfg.math_dict()) if saved.get(k) != cfg.math_dict().get(k))
            if diff:
                raise ValueError(f"{run} finished with another training config (differs in {diff}); "
                                 f"use another --out, or remove that folder")
            if json.loads(val.read_text()).get("val_batches") != val_batches:
                val.unlink()  # relaunched: a finished run only re-evaluates
        jobs_all.append(Job(p.name, [[*launch, *precision, "-m", "train", base, *args]], val,
                            out / "logs" / f"{p.name}.log", p.steps, run / "log.jsonl"))
        cost[p.name] = p.steps * p.dim**2 * p.n_layers
    (out / "commands.sh").write_text("# the sweep's points, one training run each\n" +
                                     "".join(shlex.join(j.commands[0]) + "\n" for j in jobs_all))
    print(f"sweep: {len(sizes)} sizes x {len(steps)} budgets = {len(points)} runs of {base} -> {out} on "
          f"{'GPU ' + torch.cuda.get_device_name() if gpu else f'CPU ({cores} cores)'}; {jobs} at a time",
          flush=True)
    threads = a.threads or max(1, cores // jobs)
    run_jobs([j for j in jobs_all if j.done.exists()], threads, t0)  # prints the finished ones
    todo = sorted((j for j in jobs_all if not j.done.exists()), key=lambda j: cost[j.name])
    for lo in range(0, len(todo), jobs):  # a chunk at a time (train.recipe's runner); similar lengths paired
        run_jobs(todo[lo:lo + jobs], threads, t0)
    records = [point_record(p, out / "points" / p.name, a.params) for p in points]
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"sweep: {len(records)} runs in {_fmt(time.time() - t0)} -> {out / 'sweep.jsonl'}", flush=True)
    for r in records:
        print(f"  {r['name']:<20} N={r['N']:>10,} D={r['D']:>12,} C={r['C']:.3g}  text {r['text_loss']:.4f}  "
              f"image {r['image_loss']:.4f}")
    write_fit(out, records, a.budget, a.bootstrap, a.level, command)
    print(f"fit: {out / 'fit.md'}, {out / 'fit.json'}, {out / 'loss_vs_compute.png'} "
          f"({_fmt(time.time() - t0)} in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
