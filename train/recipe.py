"""The default recipe, end to end: VQ tokenizer -> SigLIP encoder -> hybrid model -> GenEval and
MMBench on the shapes world (training and held-out compositions) -> one report.

    python -m train.recipe                          # CPU default: ~25 min on 2 cores -> runs/recipe/
    python -m train.recipe --quick --out runs/rq    # the whole chain in ~2 minutes (tiny sizes)
    python -m train.recipe --configs train/configs/recipe_gpu --out runs/recipe_gpu   # the GPU recipe
    python -m train.recipe --set hybrid.steps=4000 --out runs/recipe_long             # any stage field

Every training stage is its own ``accelerate launch`` of ``python -m train <stage yaml>`` with the
accelerate config ``train/accelerate/recipe.yaml`` (the same file on a CPU and on a GPU; on a GPU
with bf16 the hybrid stage is launched with ``--mixed_precision bf16``); the exact commands are
printed and written to ``OUT/commands.sh``, so any stage can be rerun by hand. On a CPU the VQ and
SigLIP stages (independent of each other) run side by side on half the cores each, and so do the
evaluations. A rerun skips finished stages; an interrupted stage resumes from its checkpoint.

Writes::

    OUT/vq/ OUT/siglip/ OUT/hybrid/         the three runs (final/ = the trained components)
    OUT/eval/geneval_{train,heldout}/       GenEval layout, scored (summary.json)
    OUT/eval/mmbench_{train,heldout}/       predictions and CircularEval scores (summary.json)
    OUT/report/report.{md,html}             scores against the targets, loss curves, image grids
    OUT/logs/<stage>.log                    each stage's own output
    OUT/recipe.json                         stage times and the headline scores (earlier invocations in "history")
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ACCELERATE_CONFIG = "train/accelerate/recipe.yaml"
STAGES = ("vq", "siglip", "hybrid")
# The quality targets (shapes world), shown beside what the run reached.
TARGETS = {"geneval_overall": 0.60, "geneval_single_object": 0.90, "mmbench_circular": 0.70}
# --quick: the same chain at toy sizes, for a smoke test of the plumbing (not of quality).
QUICK = {
    "vq": ["steps=30", "eval_every=30", "save_every=30", "eval_images=32", "stats_images=64", "log_every=10"],
    "siglip": ["steps=10", "eval_every=10", "save_every=10", "eval_per_split=20", "log_every=5", "batch_size=32"],
    "hybrid": ["steps=12", "save_every=12", "sample_every=12", "log_every=4", "num_samples=4", "sample_steps=2",
               "und_eval=8", "model.dim=64", "model.n_layers=2", "batch_size=8"],
}
QUICK_EVAL = {"geneval_per_tag": 1, "geneval_samples": 2, "geneval_steps": 2, "mmbench_n": 4, "probes_fit": 40,
              "probes_score": 20}


@dataclass
class EvalSettings:
    """How the recipe evaluates (``<configs>/eval.yaml``)."""

    geneval_per_tag: int = 25  # prompts per task and split (GenEval's official file has ~90 per task)
    geneval_samples: int = 4  # images per prompt (GenEval: 4)
    geneval_steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 32
    mmbench_n: int = 200  # questions per split (x 4 circular rotations)
    probes_fit: int = 1000  # renders the linear probes are fitted on (train.probes), per feature set
    probes_score: int = 500  # renders they are scored on, per split


@dataclass
class Job:
    """One or more commands run in order, with their output in one log file."""

    name: str
    commands: list[list[str]]
    done: Path  # exists once the job has finished
    log: Path
    total_steps: int | None = None  # training stages: progress from their log.jsonl
    step_log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:d}:{s:02d}"


def _progress(job: Job) -> str:
    """A short progress note: training steps from log.jsonl, else the last "N/M" in the output."""
    if job.step_log is not None and job.total_steps:
        step = 0
        if job.step_log.is_file():
            for line in job.step_log.read_text().splitlines()[-20:]:
                try:
                    step = max(step, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError):
                    pass
        return f"{job.name} {step}/{job.total_steps}"
    if job.log.is_file():
        with job.log.open("rb") as f:
            f.seek(max(0, job.log.stat().st_size - 4096))
            tail = f.read().decode("utf-8", "replace")
        hits = re.findall(r"(\d+)/(\d+)", tail)
        if hits:
            return f"{job.name} {hits[-1][0]}/{hits[-1][1]}"
    return f"{job.name} ..."


def run_jobs(jobs: list[Job], threads: int, t0: float, every: float = 20.0) -> None:
    """Run ``jobs`` side by side (each its commands in order), printing progress every ``every``
    seconds. A failing command stops everything with its log's tail and the command."""
    todo = [j for j in jobs if not j.done.exists()]
    for j in jobs:
        if j.done.exists():
            print(f"[{_fmt(time.time() - t0)}] {j.name}: already done ({j.done})", flush=True)
    if not todo:
        return
    running: dict[str, tuple[Job, subprocess.Popen, int, object]] = {}

    def start(job: Job, k: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **job.env}
        cmd = job.commands[k]
        log = job.log.open("a")
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        print(f"[{_fmt(time.time() - t0)}] {job.name}: {shlex.join(cmd)}", flush=True)
        running[job.name] = (job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), k, log)

    for job in todo:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        start(job, 0)
    last = time.time()
    try:
        while running:
            time.sleep(1.0)
            for name, (job, proc, k, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[name]
                if rc != 0:
                    tail = job.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"stage {job.name} failed (exit {rc}); the end of {job.log}:\n{tail}\n"
                                       f"command: {shlex.join(job.commands[k])}\nrerun the recipe to resume")
                if k + 1 < len(job.commands):
                    start(job, k + 1)
                else:
                    print(f"[{_fmt(time.time() - t0)}] {job.name}: done", flush=True)
            if running and time.time() - last >= every:
                last = time.time()
                print(f"[{_fmt(last - t0)}] " + " | ".join(_progress(j) for j, *_ in running.values()), flush=True)
    finally:
        for _, proc, _, log in running.values():  # an error elsewhere, or Ctrl-C: no orphans
            proc.terminate()
            proc.wait()
            log.close()


def stage_overrides(sets: list[str], quick: bool) -> dict[str, list[str]]:
    """``--set stage.key=value`` arguments per stage (after --quick's)."""
    out = {s: list(QUICK[s]) if quick else [] for s in STAGES}
    for item in sets:
        stage, dot, rest = item.partition(".")
        if stage not in STAGES or not dot or "=" not in rest:
            raise ValueError(f"--set {item!r}: expected <stage>.<key>=<value> with stage in {STAGES}")
        out[stage].append(rest)
    return out


def read_scores(out: Path) -> dict[str, float | None]:
    """The headline numbers from the scored evaluation folders."""
    scores: dict[str, float | None] = {}
    for split in ("train", "heldout"):
        g = out / "eval" / f"geneval_{split}" / "summary.json"
        if g.is_file():
            s = json.loads(g.read_text())
            scores[f"geneval_overall_{split}"] = s["overall"]
            for tag, v in s["tasks"].items():
                scores[f"geneval_{tag}_{split}"] = v["accuracy"]
            if "strict_overall" in s:  # the clutter guard: right and on a clean canvas; the clutter shares
                scores[f"geneval_strict_{split}"] = s["strict_overall"]
                scores[f"geneval_extra_share_{split}"] = s["extra_share"]
                scores[f"geneval_noisy_share_{split}"] = s["noisy_share"]
        m = out / "eval" / f"mmbench_{split}" / "summary.json"
        if m.is_file():
            s = json.loads(m.read_text())["overall"]
            scores[f"mmbench_circular_{split}"] = s.get("circular")
            scores[f"mmbench_vanilla_{split}"] = s.get("vanilla")
    p = out / "eval" / "probes.json"
    if p.is_file():
        probes = json.loads(p.read_text())
        for split in ("train", "heldout"):
            if f"reliance_{split}" in probes:
                scores[f"reliance_gap_{split}"] = probes[f"reliance_{split}"]["gap"]
        for feats in ("encoder", "hybrid_last"):
            for task in ("color", "shape", "count"):
                for split in ("train", "heldout"):
                    if f"{split}/{task}" in probes.get(feats, {}):
                        scores[f"probe_{feats}_{task}_{split}"] = probes[feats][f"{split}/{task}"]
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/recipe"))
    ap.add_argument("--configs", type=Path, default=Path("train/configs/recipe"),
                    help="folder with vq.yaml, siglip.yaml, hybrid.yaml and eval.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override a stage's config field, e.g. hybrid.steps=4000 (repeatable)")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the chain, not the quality")
    ap.add_argument("--components", type=Path, default=None, metavar="RUN",
                    help="reuse RUN/vq/final and RUN/siglip/final of another recipe run (skips those stages): "
                         "ablations of the hybrid stage on the same components")
    ap.add_argument("--jobs", type=int, default=None,
                    help="stages run side by side where they can (default: 2 on a CPU with >= 2 cores, 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per stage process (default: the cores shared among the jobs running); "
                         "1 when other work shares the machine: on a busy CPU a 2-thread step stalls")
    a = ap.parse_args(argv)
    return run_cli("recipe", lambda: run_recipe(a))


def run_cli(name: str, body: Callable[[], int]) -> int:
    """Run a launcher's body: a bad config, a missing file or a failed stage is one line naming
    the problem (exit 2), an interrupt says how to resume (exit 130) -- never a traceback."""
    try:
        return body()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def run_recipe(a: argparse.Namespace) -> int:
    import torch

    t0 = time.time()
    out, configs = a.out, a.configs
    for name in (*STAGES, "eval"):
        if not (configs / f"{name}.yaml").is_file():
            raise FileNotFoundError(f"{configs} has no {name}.yaml")
    overrides = stage_overrides(a.set, a.quick)
    raw_eval = yaml.safe_load((configs / "eval.yaml").read_text()) or {}
    ev = EvalSettings(**{**raw_eval, **(QUICK_EVAL if a.quick else {})})
    gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    jobs = a.jobs or (1 if gpu else min(2, cores))
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    py = sys.executable
    launch = [py, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG]
    precision = ["--mixed_precision", "bf16"] if gpu and torch.cuda.is_bf16_supported() else []
    print(f"recipe: {configs} -> {out} on {'GPU ' + torch.cuda.get_device_name() if gpu else f'CPU ({cores} cores)'}; "
          f"{jobs} job(s) at a time", flush=True)

    def stage_args(stage: str, extra: list[str]) -> list[str]:
        return [f"output_dir={out / stage}", *extra, *overrides[stage]]

    def train_job(stage: str, args: list[str], precision_args: list[str] = ()) -> Job:
        from train.config import read_raw

        steps = int(read_raw(configs / f"{stage}.yaml", args).get("steps", 0)) or None
        cmd = [*launch, *precision_args, "-m", "train", str(configs / f"{stage}.yaml"), *args]
        return Job(stage, [cmd], out / stage / "final", logs / f"{stage}.log", steps, out / stage / "log.jsonl")

    vq, siglip = train_job("vq", stage_args("vq", [])), train_job("siglip", stage_args("siglip", []))
    parts = out
    if a.components is not None:
        parts = a.components
        for job in (vq, siglip):
            job.done = parts / job.name / "final"
            if not job.done.is_dir():
                raise FileNotFoundError(f"--components {parts}: no {job.done}")
    hybrid_args = stage_args("hybrid", [f"vq_path={parts / 'vq' / 'final'}", f"siglip_path={parts / 'siglip' / 'final'}"])
    hybrid = train_job("hybrid", hybrid_args, precision)
    model = out / "hybrid" / "final"
    ev_dir = out / "eval"
    # the evaluation worlds are the training world: its seed and resolution
    from train.trainer import load_config as load_hybrid_config

    hcfg = load_hybrid_config(configs / "hybrid.yaml", hybrid_args)
    world = ["--resolution", str(hcfg.model_config().image_size), "--seed", str(hcfg.seed)]
    prep = [[py, "-m", "eval.geneval", "make-metadata", "--out", str(ev_dir), "--per-tag", str(ev.geneval_per_tag),
             *world],
            [py, "-m", "eval.mmbench", "make-tsv", "--out", str(ev_dir), "--n", str(ev.mmbench_n), *world]]
    geneval_files = {"train": ev_dir / "shapes_geneval.jsonl", "heldout": ev_dir / "shapes_geneval_heldout.jsonl"}
    mmbench_files = {"train": ev_dir / "shapes_mmbench.tsv", "heldout": ev_dir / "shapes_mmbench_heldout.tsv"}
    evals = []
    for split in ("train", "heldout"):
        g = ev_dir / f"geneval_{split}"
        evals.append(Job(f"geneval_{split}", [
            [py, "-m", "eval.geneval", "generate", str(geneval_files[split]), "--model", str(model), "--out", str(g),
             "--n-samples", str(ev.geneval_samples), "--steps", str(ev.geneval_steps),
             "--cfg", str(ev.guidance_scale), "--batch-size", str(ev.batch_size)],
            [py, "-m", "eval.geneval", "score", str(g)]], g / "summary.json", logs / f"geneval_{split}.log"))
        m = ev_dir / f"mmbench_{split}"
        evals.append(Job(f"mmbench_{split}", [
            [py, "-m", "eval.mmbench", "run", str(mmbench_files[split]), "--model", str(model), "--out", str(m),
             "--batch-size", str(ev.batch_size)]], m / "summary.json", logs / f"mmbench_{split}.log"))
    probes = ev_dir / "probes.json"  # what the encoder and the model's hidden states hold; image reliance
    evals.append(Job("probes", [[py, "-m", "train.probes", str(model), "--out", str(probes), "--n-fit",
                                 str(ev.probes_fit), "--n-score", str(ev.probes_score)]], probes, logs / "probes.log"))
    all_jobs = [vq, siglip, hybrid, *evals]
    (out / "commands.sh").write_text(
        "# the recipe's commands, in order (VQ and SigLIP are independent; so are the evaluations)\n" +
        "".join(shlex.join(c) + "\n" for c in [*vq.commands, *siglip.commands, *hybrid.commands, *prep] +
                [c for j in evals for c in j.commands]))

    times: dict[str, float] = {}

    def phase(name: str, group: list[Job]) -> None:  # side by side, ``jobs`` at a time
        t = time.time()
        for lo in range(0, len(group), jobs):
            chunk = group[lo:lo + jobs]
            run_jobs(chunk, a.threads or max(1, cores // len(chunk)), t0)
        times[name] = time.time() - t

    phase("vq + siglip", [vq, siglip])
    phase("hybrid", [hybrid])
    t = time.time()
    if not all(f.is_file() for f in [*geneval_files.values(), *mmbench_files.values()]):
        for cmd in prep:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    times["evaluation files"] = time.time() - t
    phase("evaluation", evals)

    t = time.time()
    from eval.report import build_recipe_report

    scores = read_scores(out)
    report = build_recipe_report(out, scores, TARGETS, times, [c for j in all_jobs for c in j.commands])
    times["report"] = time.time() - t
    total = time.time() - t0
    record = {"configs": str(configs), "quick": a.quick, "overrides": a.set, "device": "cuda" if gpu else "cpu",
              "seconds": times, "total_seconds": total, "scores": scores}
    prev = out / "recipe.json"  # earlier invocations (e.g. the one that trained, before a resume) stay on record
    history = []
    if prev.is_file():
        old = json.loads(prev.read_text())
        history = old.pop("history", []) + [old]
    prev.write_text(json.dumps({**record, "history": history}, indent=2) + "\n")
    print(f"\nrecipe finished in {_fmt(total)} (" + ", ".join(f"{k} {_fmt(v)}" for k, v in times.items()) + ")")
    for key, label in (("geneval_overall", "GenEval overall"), ("geneval_single_object", "GenEval single_object"),
                       ("mmbench_circular", "MMBench CircularEval")):
        got = [scores.get(f"{key}_{s}") for s in ("train", "heldout")]
        print(f"  {label:<22} train compositions {_pct(got[0])}, held-out {_pct(got[1])}  (target {TARGETS[key]:.2f})")
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return 0


def _pct(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
