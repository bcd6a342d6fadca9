"""Distributed training on the CPU: 2 processes, DeepSpeed ZeRO-2, through `accelerate launch` with
the shipped config (train/accelerate/deepspeed_zero2.yaml, overridden to 2 CPU processes in fp32).

One 2-process run of the `debug` model (global batch 2 x 4) saves a checkpoint at step 3 and
finishes at step 6. It is checked against
  * a single process without DeepSpeed with the same global batch (batch 4 x grad_accum 2): the
    same samples and the same diffusion noise per step (noise is seeded by global batch number),
    so the logged step losses (mean over micro-batches and processes) agree to rel 1e-5 and the
    final weights to atol 1e-3. Measured: the losses are equal to the last printed digit, grad
    norms to ~4e-7 relative, weights to ~5e-5 after 6 steps. The differences are float
    reduction order (gloo all-reduce of two halves vs. accumulation, DeepSpeed's flat-buffer
    clipping and AdamW), which Adam's normalisation amplifies on parameters with tiny gradients.
  * a resumed run: the step-3 DeepSpeed checkpoint restored in a fresh `accelerate launch`
    finishes with the uninterrupted run's losses and weights (measured: bitwise equal; asserted
    to rel 1e-6 / atol 1e-6).
About 90 s on 2 CPU cores (two launches of ~35 s, one in-process run).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.__main__ import main

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
DEBUG = "train/configs/debug.yaml"
ZERO2 = "train/accelerate/deepspeed_zero2.yaml"
COMMON = ["steps=6", "save_every=3", "log_every=1", "batch_size=4", "sample_every=1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *extra: str) -> str:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", ZERO2, "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "train", DEBUG, f"output_dir={out}", *COMMON, *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def losses(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_deepspeed_zero2_two_cpu_processes_match_one_and_resume_exactly(tmp_path):
    ds = tmp_path / "zero2"
    launch(ds)
    ckpt = ds / "checkpoints" / "step_0000003"
    assert (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "pytorch_model").is_dir()  # a DeepSpeed checkpoint (sharded optimizer states), not DDP's
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]

    # the same global batch on one process, no DeepSpeed
    single = tmp_path / "single"
    assert main([DEBUG, f"output_dir={single}", *COMMON, "grad_accum=2"]) == 0
    a, b = losses(single), losses(ds)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        for k in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-5), (s, k)
    wa, wb = weights(single), weights(ds)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-3, msg=k)

    # resume: the run as it was when killed after its step-3 checkpoint, relaunched unchanged
    resumed = tmp_path / "resumed"
    shutil.copytree(ds, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    shutil.rmtree(resumed / "final")
    assert "at step 3" in launch(resumed)  # "resumed from .../step_0000003 at step 3"
    c = losses(resumed)
    assert sorted(c) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        for k in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert c[s][k] == pytest.approx(b[s][k], rel=1e-6), (s, k)
    wc = weights(resumed)
    for k in wb:
        torch.testing.assert_close(wc[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_deepspeed_zero3_two_cpu_processes_export_the_full_model(tmp_path):
    """ZeRO-3 shards the parameters themselves: sampling must run on every process and the export
    must gather them (get_state_dict, zero3_save_16bit_model). The exported folder is complete and
    equals a single-process run with the same global batch (tolerances as above; measured 5e-5)."""
    cmd_extra = ["steps=3", "save_every=3"]
    ds = tmp_path / "zero3"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "train/accelerate/deepspeed_zero3.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "train", DEBUG,
           f"output_dir={ds}", *COMMON, *cmd_extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    single = tmp_path / "single"
    assert main([DEBUG, f"output_dir={single}", *COMMON, *cmd_extra, "grad_accum=2"]) == 0
    a, b = losses(single), losses(ds)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    wa, wb = weights(single), weights(ds)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wb[k].shape == wa[k].shape and wb[k].numel() > 0, k  # gathered, not the local shard
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-3, msg=k)
    from hybrid.checkpoint import load_pretrained_model

    load_pretrained_model(ds / "final")  # loads strictly: nothing missing
