"""ZeRO-3 checkpoint export: peak memory and time of train/export_zero.py against DeepSpeed's zero_to_fp32.py.

    .venv/bin/python -m bench.zero_export                       # ~3 min on 2 CPU cores
    .venv/bin/python -m bench.zero_export --keep /tmp/zbench    # keep (or reuse) the checkpoint there

1. Builds a ZeRO-3 checkpoint of a ~155M-parameter model (train/configs/debug.yaml widened to
   dim 1024, 12 layers, 16 heads; 1 training step, batch 1, 2 CPU processes, fp32):

       accelerate launch --config_file train/accelerate/deepspeed_zero3.yaml --num_processes 2 \\
           --mixed_precision no -m train train/configs/debug.yaml steps=1 save_every=1 batch_size=1 \\
           model.dim=1024 model.n_layers=12 model.n_heads=16 model.n_kv_heads=16 ...

   (~0.6 GB of fp32 master weights, ~1.9 GB of optimizer files with the Adam moments; the
   trainer's final/model.safetensors is the same weights gathered at the end of training).
2. Runs, `--repeats` times, interleaved (the order reversed every other repeat), each in its own
   fresh subprocess, and measures that child's peak resident memory (ru_maxrss of the rusage
   os.wait4 returns for it, i.e. what getrusage(RUSAGE_CHILDREN) reports for a parent with that
   one child) and wall time:
     * ours:          python -m train.export_zero <ckpt> <out>   (the whole pipeline folder, fp32)
     * ours_weights:  python -m train.export_zero <ckpt> <out> --only weights
     * deepspeed:     python <ckpt>/zero_to_fp32.py <ckpt> <out> --safe_serialization
                      (the script DeepSpeed ships in every checkpoint: one model.safetensors here)
     * floor_*:       python doing only the imports of each (torch, DeepSpeed, the model code for
                      the pipeline folder): the memory no exporter can go below, so that
                      "above floor" is what the export itself holds.
3. Checks the outputs: ours and DeepSpeed's are compared tensor by tensor (bitwise), and both
   against the trainer's final/model.safetensors.

Writes bench/results/zero_export.json (every measurement, medians, versions, machine) and
bench/results/zero_export.md. Page cache is not dropped between runs (it is not process memory,
and every variant reads the same files); the first run of the first repeat may read from disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MODEL = {"dim": 1024, "n_layers": 12, "n_heads": 16, "n_kv_heads": 16}
TRAIN_ARGS = ["train/configs/debug.yaml", "steps=1", "save_every=1", "log_every=1", "batch_size=1",
              "sample_every=1000", "num_samples=1", "sample_steps=1", *(f"model.{k}={v}" for k, v in MODEL.items())]
FLOORS = {
    # what each exporter imports before it reads anything
    "floor_ours_weights": "import train.export_zero as e; e._allowed_globals()",
    "floor_ours": "import train.export_zero as e; e._allowed_globals(); import hybrid.model, hybrid.sampling",
    "floor_deepspeed": "import deepspeed.utils.zero_to_fp32, safetensors.torch, huggingface_hub",
}
CHUNK_MIB = 4 * 2**24 // 2**20  # train.export_zero.CHUNK_ELEMENTS of fp32
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(run: Path) -> float:
    """Train 1 step under ZeRO-3 on 2 CPU processes into ``run``; returns the seconds it took."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "train/accelerate/deepspeed_zero3.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "train", *TRAIN_ARGS,
           f"output_dir={run}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return time.perf_counter() - t0


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` as a fresh child; its peak RSS (MiB) and wall time (s)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-4000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}


def commands(ckpt: Path, scratch: Path) -> dict[str, list[str]]:
    py = sys.executable
    out = {
        "ours": [py, "-m", "train.export_zero", str(ckpt), str(scratch / "ours")],
        "ours_weights": [py, "-m", "train.export_zero", str(ckpt), str(scratch / "ours_weights"), "--only", "weights"],
        "deepspeed": [py, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(scratch / "deepspeed"), "--safe_serialization"],
    }
    out.update({name: [py, "-c", code] for name, code in FLOORS.items()})
    return out


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor (one in memory at a time): same names, dtypes, shapes, bits?"""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        different = [k for k in sorted(ka & kb) if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    return {"same_names": ka == kb, "tensors": len(ka), "bitwise_equal": ka == kb and not different,
            "different": different[:10]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--keep", type=Path, default=None,
                   help="build the run here (reused if it has a checkpoint) and keep it")
    args = p.parse_args(argv)

    run = args.keep or Path(tempfile.mkdtemp(prefix="zero_export_bench_"))
    ckpt = run / "checkpoints" / "step_0000001"
    build_file = run / "bench_build_s.txt"  # so a reused (--keep) checkpoint still reports its build time
    if not (ckpt / "trainer_state.json").is_file():
        print(f"building the ZeRO-3 checkpoint in {run} ...", flush=True)
        build_file.write_text(f"{build_checkpoint(run):.1f}\n")
    build_s = float(build_file.read_text()) if build_file.is_file() else None
    scratch = Path(tempfile.mkdtemp(prefix="zero_export_out_"))
    try:
        cmds = commands(ckpt, scratch)
        names = list(cmds)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for i in range(args.repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                r = measure(cmds[name])
                runs[name].append(r)
                print(f"repeat {i + 1}: {name:18s} peak {r['peak_rss_mib']:7.0f} MiB  {r['wall_s']:6.1f} s", flush=True)
        final = run / "final" / "model.safetensors"
        ours_file, ds_file = scratch / "ours" / "model.safetensors", scratch / "deepspeed" / "model.safetensors"
        checks = {"ours_vs_deepspeed": compare(ours_file, ds_file), "ours_vs_final": compare(ours_file, final),
                  "deepspeed_vs_final": compare(ds_file, final),
                  "ours_vs_ours_weights": compare(ours_file, scratch / "ours_weights" / "model.safetensors")}
        sizes = {"output_bytes": ours_file.stat().st_size, "deepspeed_output_bytes": ds_file.stat().st_size}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    state = json.loads((ckpt / "trainer_state.json").read_text())
    with safe_open(str(final), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    ckpt_bytes = sum(q.stat().st_size for q in (ckpt / "pytorch_model").iterdir())
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("peak_rss_mib", "wall_s")} for n, rs in runs.items()}
    peak = {n: v["peak_rss_mib"] for n, v in med.items()}
    above = {n: peak[n] - peak[f"floor_{n}"] for n in ("ours", "ours_weights", "deepspeed")}
    summary = {
        "peak_ratio_deepspeed_over_ours": peak["deepspeed"] / peak["ours"],
        "peak_ratio_deepspeed_over_ours_weights": peak["deepspeed"] / peak["ours_weights"],
        "above_floor_mib": above,
        "above_floor_ratio_deepspeed_over_ours_weights": above["deepspeed"] / max(above["ours_weights"], 1.0),
    }
    result = {
        "model": {"overrides": MODEL, "config": state["model_config"], "parameters": n_params,
                  "fp32_bytes": 4 * n_params},
        "checkpoint": {"stage": 3, "ranks": 2, "files_bytes": ckpt_bytes, "build_s": build_s, "train_args": TRAIN_ARGS},
        "commands": {n: " ".join(c) for n, c in commands(Path("<ckpt>"), Path("<out>")).items()},
        "repeats": args.repeats,
        "runs": runs,
        "median": med,
        "summary": summary,
        "outputs": {**sizes, **checks},
        "versions": {k: version(k) for k in ("torch", "deepspeed", "safetensors", "accelerate")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zero_export.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "zero_export.md").write_text(report(result))
    print(report(result))
    if args.keep is None:
        shutil.rmtree(run, ignore_errors=True)
    return 0


def report(r: dict) -> str:
    m, s, o, gib = r["median"], r["summary"], r["outputs"], 2**30
    overrides = ", ".join(f"{k}={v}" for k, v in r["model"]["overrides"].items())
    setup = (f"Model: {r['model']['parameters'] / 1e6:.1f}M parameters ({r['model']['fp32_bytes'] / gib:.2f} GiB "
             f"in fp32; `debug` config with {overrides}). Checkpoint: ZeRO-3, {r['checkpoint']['ranks']} ranks, "
             f"{r['checkpoint']['files_bytes'] / gib:.2f} GiB of DeepSpeed files (fp32 master weights + Adam "
             f"moments). Output: one fp32 model.safetensors of {o['output_bytes'] / gib:.2f} GiB.")
    method = (f"Each exporter in a fresh subprocess: peak resident memory (ru_maxrss) and wall time, median of "
              f"{r['repeats']} interleaved repeats ({r['machine']['cpus']} CPU cores; torch "
              f"{r['versions']['torch']}, deepspeed {r['versions']['deepspeed']}). The floor is the same "
              f"interpreter doing only that exporter's imports; \"above floor\" is what the export itself holds.")
    label = {"ours": "`python -m train.export_zero` (pipeline folder)",
             "ours_weights": "`python -m train.export_zero --only weights`",
             "deepspeed": "DeepSpeed `zero_to_fp32.py --safe_serialization`"}
    rows = [f"| {label[n]} | {m[n]['peak_rss_mib']:.0f} | {m['floor_' + n]['peak_rss_mib']:.0f} | "
            f"{s['above_floor_mib'][n]:.0f} | {m[n]['wall_s']:.1f} |" for n in label]
    above = s["above_floor_mib"]
    verdict = (f"Peak ratio DeepSpeed / ours: {s['peak_ratio_deepspeed_over_ours']:.2f}x (pipeline folder), "
               f"{s['peak_ratio_deepspeed_over_ours_weights']:.2f}x (weights only); above the import floor: "
               f"{above['deepspeed']:.0f} MiB against {above['ours_weights']:.0f} MiB. DeepSpeed's grows with the "
               f"model (the whole state dict, up to its 5 GB shard size, plus the mapped pages of the master "
               f"weights it read); ours holds one chunk of one parameter at most ({CHUNK_MIB} MiB), whatever the "
               f"model size (DeepSpeed's can only be bounded by a smaller max_shard_size, i.e. by writing several "
               f"files). The pipeline folder's higher floor is the model code it imports (to check every shape "
               f"against the config, and for scheduler.json): a fixed cost.")

    def equal(key: str) -> str:
        return "bitwise equal" if o[key]["bitwise_equal"] else "DIFFERENT"

    outputs = (f"Outputs: ours and DeepSpeed's are {equal('ours_vs_deepspeed')} "
               f"({o['ours_vs_deepspeed']['tensors']} tensors); against the trainer's gathered "
               f"final/model.safetensors: ours {equal('ours_vs_final')}, DeepSpeed's {equal('deepspeed_vs_final')}.")
    return "\n".join([
        "# ZeRO-3 checkpoint -> one safetensors file: peak memory and time", "", setup, "", method, "",
        "| exporter | peak RSS (MiB) | import floor (MiB) | above floor (MiB) | wall (s) |",
        "|---|---:|---:|---:|---:|", *rows, "", verdict, "", outputs, "",
        "Reproduce: `.venv/bin/python -m bench.zero_export` (every figure in bench/results/zero_export.json).", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
