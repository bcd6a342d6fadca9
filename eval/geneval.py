"""GenEval for hybrid models: generate images in GenEval's folder layout, and score shapes-world runs.

    # shapes-world prompt files (training compositions, held-out compositions)
    python -m eval.geneval make-metadata --out runs/geneval --per-tag 100
    # CPU-sized run (2 cores, the tiny model: about a minute)
    python -m eval.geneval generate runs/geneval/shapes_geneval_heldout.jsonl --model runs/tiny_vq/final \\
        --out runs/geneval/tiny_vq_heldout --n-samples 2 --steps 10 --limit 24
    python -m eval.geneval score runs/geneval/tiny_vq_heldout
    # full run, one process per GPU (accelerate shards the prompts), official prompts
    accelerate launch --num_processes 8 -m eval.geneval generate geneval/prompts/evaluation_metadata.jsonl \\
        --model DIR --out OUT --n-samples 4 --steps 25 --cfg 3.0 --dtype bfloat16 --batch-size 16
    # several CPU processes: torchrun (accelerate launch --cpu starts only one process)
    torchrun --nproc_per_node 2 -m eval.geneval generate FILE --model DIR --out OUT

``generate`` writes exactly what GenEval's ``generation/diffusers_generate.py`` writes::

    OUT/00000/metadata.jsonl     # the prompt's metadata row: one JSON object, one line
    OUT/00000/samples/0000.png   # n_samples images at the model's resolution
    OUT/00000/grid.png           # with --grid
    OUT/run.json                 # ours: every setting, hashes and versions

Seeds: sample j of prompt i (0-based line of the metadata file) is drawn with seed
``seed + i * n_samples + j``, so images do not depend on sharding, ``--limit`` or resuming.
With ``--batch-size`` <= n_samples a forward pass holds one prompt's images and files are
bit-identical however the run is split; a larger batch packs several prompts (left-padded), which
changes images only by float rounding. Resuming: a prompt folder is complete iff its
``metadata.jsonl`` (written last, atomically) holds the row and all samples exist; complete folders
are skipped, the rest are redone. A run.json with other settings is refused unless ``--overwrite``
(which deletes the prompt folders first).

``score`` scores shapes-world metadata with ``train.detect`` under GenEval's rules, writes
``results.jsonl`` (the official evaluator's fields) and ``summary.json``, and prints the summary as
GenEval's ``summary_scores.py`` does (overall = unweighted mean over the tasks present). COCO
metadata (the official 553 prompts) needs the official evaluator (Mask2Former + CLIP, CUDA)::

    git clone https://github.com/djghosh13/geneval && cd geneval   # setup: its README (mmdet 2.27)
    ./evaluation/download_models.sh MODELS/
    python evaluation/evaluate_images.py OUT --outfile OUT/results.jsonl --model-path MODELS/
    cd evaluation && python summary_scores.py OUT/results.jsonl   # it reads ./object_names.txt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

RUN_FILE, META_FILE = "run.json", "metadata.jsonl"
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # --dtype choices (hybrid.pipeline.DTYPES maps them)
SEED_POLICY = "sample j of prompt i (0-based metadata line) uses torch.Generator(device).manual_seed(seed + i * n_samples + j)"
SAMPLE_RE = re.compile(r"^\d+\.png$")
FOLDER_RE = re.compile(r"^\d{5}$")


class SettingsMismatch(ValueError):
    """OUT/run.json was written with other settings."""


class NeedsOfficialEvaluator(ValueError):
    """The metadata names classes the shapes detector does not know (COCO's)."""


# ---------------------------------------------------------------- files

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if "prompt" not in r or "tag" not in r:
            raise ValueError(f"{path} line {i + 1} is not a GenEval metadata row (needs 'tag' and 'prompt')")
    return rows


def sample_name(j: int) -> str:
    return f"{j:04d}.png"


def folder_complete(folder: Path, row: dict, n_samples: int) -> bool:
    """Complete iff metadata.jsonl holds ``row`` and samples/ holds exactly 0000..n-1 .png."""
    meta = folder / META_FILE
    try:
        if json.loads(meta.read_text()) != row:
            return False
    except (OSError, ValueError):
        return False
    have = {p.name for p in (folder / "samples").glob("*.png") if SAMPLE_RE.match(p.name)}
    return have == {sample_name(j) for j in range(n_samples)}


def clear_folder(folder: Path) -> None:
    """Make a prompt folder incomplete and empty of samples before it is regenerated."""
    (folder / META_FILE).unlink(missing_ok=True)
    for p in (folder / "samples").glob("*.png"):
        if SAMPLE_RE.match(p.name):
            p.unlink()
    (folder / "grid.png").unlink(missing_ok=True)


def write_folder_metadata(folder: Path, row: dict) -> None:
    """As GenEval's generator writes it (``json.dump``: one line, no newline), atomically."""
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, folder / META_FILE)


def make_grid(images: Sequence[Image.Image], pad: int = 2) -> Image.Image:
    """The samples side by side, ``pad`` px of black around each (torchvision make_grid's look)."""
    w, h = images[0].size
    grid = np.zeros((h + 2 * pad, len(images) * (w + pad) + pad, 3), dtype=np.uint8)
    for k, im in enumerate(images):
        x = pad + k * (w + pad)
        grid[pad:pad + h, x:x + w] = np.asarray(im.convert("RGB"))
    return Image.fromarray(grid)


# ---------------------------------------------------------------- settings

def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("hybrid", "torch", "accelerate", "transformers", "numpy", "pillow"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_settings(pipe, model_dir: Path, metadata_file: Path, n_samples: int, steps: int, cfg: float,
                 scheduler, seed: int, dtype: str, temperature: float, top_k: int | None) -> dict:
    """What determines the images: compared on resume."""
    from hybrid.checkpoint import safetensors_files
    c = pipe.config
    head = c.image_head
    return {
        "model_sha256": {p.name: sha256_file(p) for p in safetensors_files(model_dir)},
        "config_sha256": sha256_file(model_dir / "config.json"),
        "metadata_sha256": sha256_file(metadata_file),
        "n_samples": n_samples, "steps": steps if head == "diffusion" else None, "guidance_scale": cfg,
        "scheduler": scheduler.to_dict() if scheduler is not None else None,
        "temperature": temperature if head == "ar" else None, "top_k": top_k if head == "ar" else None,
        "seed": seed, "seed_policy": SEED_POLICY, "resolution": c.image_size, "image_head": head,
        "dtype": dtype, "device_type": pipe.device.type,
    }


def check_run_file(out: Path, settings: dict) -> None:
    """Raise SettingsMismatch naming every setting that differs from ``out/run.json``."""
    path = out / RUN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("settings", {})
    diff = [f"{k}: {old.get(k)!r} in run.json, {settings.get(k)!r} now"
            for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if diff:
        raise SettingsMismatch(f"{out} holds a run with other settings; resuming would mix images:\n  "
                               + "\n  ".join(diff) + "\nuse another --out, or --overwrite to delete and redo it")


def prepare_outdir(out: Path, record: dict, overwrite: bool) -> None:
    """Main process only: with ``overwrite`` delete the prompt folders; write run.json."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in out.iterdir():
            if p.is_dir() and FOLDER_RE.match(p.name):
                shutil.rmtree(p)
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / RUN_FILE)


# ---------------------------------------------------------------- generation

def batches(todo: Sequence[int], n: int, batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """Forward passes as [(prompt index, sample ids)]: whole prompts packed batch_size // n at a
    time, or one prompt's samples split into chunks when batch_size < n."""
    if batch_size >= n:
        k = batch_size // n
        return [[(i, list(range(n))) for i in todo[a:a + k]] for a in range(0, len(todo), k)]
    return [[(i, list(range(a, min(a + batch_size, n))))] for i in todo for a in range(0, n, batch_size)]


def generate_shard(pipe, rows: Sequence[dict], out: Path, n_samples: int = 4, steps: int = 25, cfg: float = 3.0,
                   scheduler=None, seed: int = 0, batch_size: int | None = None, grid: bool = False,
                   temperature: float = 1.0, top_k: int | None = None, process_index: int = 0,
                   num_processes: int = 1, progress: bool = False) -> list[int]:
    """Generate this process' share (prompts i with i % num_processes == process_index) of the
    incomplete prompt folders; returns the indices it generated."""
    todo = [i for i in range(process_index, len(rows), num_processes)
            if not folder_complete(out / f"{i:05d}", rows[i], n_samples)]
    for i in todo:
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        clear_folder(folder)
    done: dict[int, dict[int, Image.Image]] = {i: {} for i in todo}
    plan = batches(todo, n_samples, batch_size or n_samples)
    if progress:
        from tqdm.auto import tqdm
        plan = tqdm(plan, desc=f"geneval [{process_index}/{num_processes}]")
    for batch in plan:
        seeds = [seed + i * n_samples + j for i, js in batch for j in js]
        images = pipe.generate_image([rows[i]["prompt"] for i, _ in batch], num_images=len(batch[0][1]),
                                     num_steps=steps, guidance_scale=cfg, scheduler=scheduler, seed=seeds,
                                     temperature=temperature, top_k=top_k).images
        k = 0
        for i, js in batch:
            folder = out / f"{i:05d}"
            for j in js:
                images[k].save(folder / "samples" / sample_name(j))
                done[i][j] = images[k]
                k += 1
            if len(done[i]) == n_samples:  # the prompt's last chunk: grid, then metadata last
                if grid:
                    make_grid([done[i][j] for j in range(n_samples)]).save(folder / "grid.png")
                write_folder_metadata(folder, rows[i])
                del done[i]
    return todo


def run_generate(args: argparse.Namespace) -> list[int]:
    from accelerate import PartialState

    from hybrid.pipeline import DTYPES, HybridPipeline

    state = PartialState(cpu=not torch.cuda.is_available())  # multi-process CPU runs need cpu=True
    model_dir, metadata_file, out = Path(args.model).resolve(), Path(args.metadata), Path(args.out)
    rows = read_metadata(metadata_file)
    if args.limit is not None:
        rows = rows[:args.limit]
    pipe = HybridPipeline.from_pretrained(model_dir, device=state.device, dtype=DTYPES[args.dtype])
    scheduler = pipe.resolve_scheduler(args.scheduler)  # None for the "ar" head; checks the prediction type
    settings = run_settings(pipe, model_dir, metadata_file, args.n_samples, args.steps, args.cfg, scheduler,
                            args.seed, args.dtype, args.temperature, args.top_k)
    if not args.overwrite:
        check_run_file(out, settings)  # every process: a mismatch stops all of them
    if state.is_main_process:
        info = {"model_path": str(model_dir), "metadata_file": str(metadata_file.resolve()), "prompts": len(rows),
                "limit": args.limit, "batch_size": args.batch_size or args.n_samples, "grid": args.grid,
                "num_processes": state.num_processes, "device": str(pipe.device), "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv}
        prepare_outdir(out, {"settings": settings, "info": info}, args.overwrite)
    state.wait_for_everyone()
    t0 = time.time()
    made = generate_shard(pipe, rows, out, args.n_samples, args.steps, args.cfg, scheduler, args.seed,
                          args.batch_size, args.grid, args.temperature, args.top_k, state.process_index,
                          state.num_processes, progress=state.is_main_process)
    print(f"[process {state.process_index}/{state.num_processes}] generated {len(made)} prompt folders "
          f"({len(made) * args.n_samples} images) in {time.time() - t0:.1f}s into {out}", flush=True)
    state.wait_for_everyone()
    return made


# ---------------------------------------------------------------- scoring

def summarize(results: Sequence[dict]) -> dict:
    """GenEval's summary_scores.py: per-task accuracy (tasks in first-seen order), overall = their
    unweighted mean; a prompt (distinct metadata) is correct if any of its images is."""
    from train.detect import wilson

    tasks: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in results:
        tasks.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    n = len(results)
    per_task = {t: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v),
                    "ci95": [round(x, 4) for x in wilson(sum(v), len(v))]} for t, v in tasks.items()}
    guard = {}
    if results and all("strict" in r for r in results):  # the shapes detector's clutter guard
        for t in per_task:
            rs = [r for r in results if r["tag"] == t]
            per_task[t].update({k: sum(bool(r[f]) for r in rs) / len(rs) for k, f in (
                ("strict", "strict"), ("extra_share", "extra"), ("empty_share", "empty"), ("noisy_share", "noisy"))})
        guard = {"strict_overall": float(np.mean([t["strict"] for t in per_task.values()])),
                 **{f"{f}_share": sum(bool(r[f]) for r in results) / n for f in ("extra", "empty", "noisy")}}
    return {"total_images": n, "total_prompts": len(prompts), **guard,
            "correct_images": sum(bool(r["correct"]) for r in results) / n if n else float("nan"),
            "correct_prompts": sum(prompts.values()) / len(prompts) if prompts else float("nan"),
            "tasks": per_task,
            "overall": float(np.mean([t["accuracy"] for t in per_task.values()])) if per_task else float("nan")}


def format_summary(s: dict) -> str:
    """The text summary_scores.py prints."""
    lines = ["Summary", "=======", f"Total images: {s['total_images']}", f"Total prompts: {s['total_prompts']}",
             f"% correct images: {s['correct_images']:.2%}", f"% correct prompts: {s['correct_prompts']:.2%}", "",
             "Task breakdown", "=============="]
    lines += [f"{tag:<16} = {t['accuracy']:.2%} ({t['correct']} / {t['total']})" for tag, t in s["tasks"].items()]
    lines += ["", f"Overall score (avg. over tasks): {s['overall']:.5f}"]
    if "strict_overall" in s:  # ours, after GenEval's own lines: right *and* on a clean canvas
        lines += [f"Strict (right and clean, avg. over tasks): {s['strict_overall']:.5f}; images with more objects "
                  f"than prompted {s['extra_share']:.2%}, empty {s['empty_share']:.2%}, noisy {s['noisy_share']:.2%}"]
    return "\n".join(lines)


def official_command(out: Path) -> str:
    out = Path(out).resolve()  # the commands run inside the geneval checkout
    return ("score these images with GenEval's official evaluator (Mask2Former + CLIP, needs CUDA; setup in "
            "https://github.com/djghosh13/geneval README):\n"
            f"  python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl --model-path MODELS/\n"
            f"  cd evaluation && python summary_scores.py {out}/results.jsonl   # it reads ./object_names.txt")


def score_folder(out: str | Path, results_file: str | Path | None = None, threshold: float = 0.3,
                 counting_threshold: float = 0.3, log: Callable[[str], None] = print) -> dict:
    """Score every sample of a generated folder with the shapes detector; write results.jsonl and
    summary.json (next to it); return the summary. COCO-class metadata raises
    NeedsOfficialEvaluator, whose message holds the official evaluator's commands."""
    from eval.shapes_geneval import score_sample, unknown_names

    out = Path(out)
    folders = sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit())
    complete, unknown = [], set()
    for f in folders:
        if not (f / META_FILE).is_file():
            log(f"warning: {f} has no {META_FILE} (unfinished; GenEval's evaluator would fail on it): skipped")
            continue
        meta = json.loads((f / META_FILE).read_text())
        unknown.update(unknown_names(meta))
        complete.append((f, meta))
    if not complete:
        raise FileNotFoundError(f"{out} holds no finished prompt folders (NNNNN/{META_FILE})")
    if unknown:
        raise NeedsOfficialEvaluator(f"the metadata names classes/colours the shapes detector does not know "
                         f"({', '.join(sorted(unknown)[:8])}{', ...' if len(unknown) > 8 else ''}), e.g. COCO's; "
                         + official_command(out))
    results = [score_sample(p, meta, threshold, counting_threshold)
               for f, meta in complete
               for p in sorted((f / "samples").iterdir()) if p.is_file() and SAMPLE_RE.match(p.name)]
    results_file = Path(results_file) if results_file is not None else out / "results.jsonl"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text("".join(json.dumps(r) + "\n" for r in results))
    summary = summarize(results) | {"threshold": threshold, "counting_threshold": counting_threshold,
                                    "detector": "train.detect", "results": str(results_file)}
    (results_file.parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.geneval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="images for a GenEval metadata file, in GenEval's layout")
    g.add_argument("metadata", help="evaluation_metadata.jsonl (official) or a shapes file")
    g.add_argument("--model", required=True, help="a pipeline folder (save_pretrained / a run's final/)")
    g.add_argument("--out", required=True)
    g.add_argument("--n-samples", type=int, default=4)
    g.add_argument("--steps", type=int, default=25, help="denoising steps (diffusion head)")
    g.add_argument("--cfg", type=float, default=3.0, help="guidance scale (1 = no guidance)")
    g.add_argument("--scheduler", default=None, help="scheduler name (default: the model's scheduler.json)")
    g.add_argument("--temperature", type=float, default=1.0, help="ar head only")
    g.add_argument("--top-k", type=int, default=None, help="ar head only")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default n-samples)")
    g.add_argument("--grid", action="store_true", help="also write grid.png per prompt")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    g.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    g.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")
    m = sub.add_parser("make-metadata", help="shapes-world prompt files in GenEval's schema")
    m.add_argument("--out", required=True)
    m.add_argument("--per-tag", type=int, default=100)
    m.add_argument("--resolution", type=int, default=32)
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="score a generated folder of shapes-world prompts")
    s.add_argument("folder")
    s.add_argument("--out", default=None, help="results JSONL (default FOLDER/results.jsonl)")
    s.add_argument("--threshold", type=float, default=0.3, help="detector confidence threshold (GenEval: 0.3)")
    s.add_argument("--counting-threshold", type=float, default=0.3,
                   help="threshold for counting prompts (GenEval uses 0.9 on Mask2Former scores; our "
                        "confidence is template IoU x colour closeness, another scale)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.n_samples < 1 or (args.batch_size is not None and args.batch_size < 1):
            parser.error("--n-samples and --batch-size must be >= 1")
        try:
            run_generate(args)
        except SettingsMismatch as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.command == "make-metadata":
        from eval.shapes_geneval import write_metadata
        for p in write_metadata(args.out, args.per_tag, args.resolution, args.seed):
            print(f"wrote {p} ({len(read_metadata(p))} prompts)")
    else:
        try:
            summary = score_folder(args.folder, args.out, args.threshold, args.counting_threshold)
        except NeedsOfficialEvaluator as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_summary(summary))
        print(f"\nresults: {summary['results']}; summary.json beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
