"""Distributed training on the CPU: 2 processes, DeepSpeed ZeRO-2, through `accelerate launch` with
the shipped config (train/accelerate/deepspeed_zero2.yaml, overridden to 2 CPU processes in fp32).

One 2-process run of the `debug` model (global batch 2 x 4) saves a checkpoint at step 3 and
finishes at step 6; step 2's loss is made NaN on purpose (fault_nan_steps), so the non-finite
guard is exercised under DeepSpeed, whose engine steps inside `backward` (it must skip that
update itself, and the trainer checks that it did). It is checked against
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
ZERO3 = "train/accelerate/deepspeed_zero3.yaml"
COMMON = ["steps=6", "save_every=3", "log_every=1", "batch_size=4", "sample_every=1000", "fault_nan_steps=[2]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *extra: str, config: str = ZERO2) -> str:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", config, "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "train", DEBUG, f"output_dir={out}", *COMMON, *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def losses(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "text_loss" in r or "skipped" in r}


def assert_same_losses(got: dict, ref: dict, steps, rel: float) -> None:
    """Logged steps agree; the faulted step is skipped in both (its loss is not finite)."""
    for s in steps:
        assert ("skipped" in got[s]) == ("skipped" in ref[s]), (s, got[s], ref[s])
        if "skipped" in ref[s]:
            assert got[s]["skipped"] == ref[s]["skipped"] == "non-finite loss", s
            continue
        for k in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=rel), (s, k)


def weights(out: Path, folder: str = "final") -> dict[str, torch.Tensor]:
    return load_file(out / folder / "model.safetensors")


def assert_same_weights(got: dict, ref: dict, atol: float) -> None:
    """The same tensor names, and every tensor within ``atol``."""
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=atol, msg=k)


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
    assert "skipped" in b[2]
    assert_same_losses(b, a, a, rel=1e-5)
    wa, wb = weights(single), weights(ds)
    assert_same_weights(wb, wa, atol=1e-3)

    # resume: the run as it was when killed after its step-3 checkpoint, relaunched unchanged
    resumed = tmp_path / "resumed"
    shutil.copytree(ds, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    shutil.rmtree(resumed / "final")
    assert "at step 3" in launch(resumed)  # "resumed from .../step_0000003 at step 3"
    c = losses(resumed)
    assert sorted(c) == [1, 2, 3, 4, 5, 6]
    assert_same_losses(c, b, (4, 5, 6), rel=1e-6)
    assert_same_weights(weights(resumed), wb, atol=1e-6)


def test_deepspeed_zero3_two_cpu_processes_resume_and_export_the_full_model(tmp_path):
    """ZeRO-3 shards the parameters themselves: sampling must run on every process and the export
    must gather them (get_state_dict, zero3_save_16bit_model). A 4-step run (checkpoint at 2; step
    3 NaN on purpose, skipped) equals a single-process run with the same global batch (tolerances
    as above; measured 5e-5), its exported folder is complete, and the run killed after its
    step-2 checkpoint and relaunched finishes with the same losses and weights. The EMA is kept
    per rank on its partition (no gather per step) and checkpointed per rank; its export
    (final_ema/) equals the single process's EMA too. The final validation (3 batches on 2
    processes: one forward on rank 1 is not counted) and the token count equal the single
    process's (measured: text loss to 4e-8 relative, image loss and tokens exactly)."""
    extra = ["steps=4", "save_every=2", "fault_nan_steps=[3]", "ema_decay=0.5", "val_batches=3"]
    ds = tmp_path / "zero3"
    launch(ds, *extra, config=ZERO3)
    single = tmp_path / "single"
    assert main([DEBUG, f"output_dir={single}", *COMMON, *extra, "grad_accum=2"]) == 0
    a, b = losses(single), losses(ds)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert "skipped" in b[3]
    assert_same_losses(b, a, a, rel=1e-5)
    wa, wb = weights(single), weights(ds)
    for k in wa:
        assert wb[k].shape == wa[k].shape and wb[k].numel() > 0, k  # gathered, not the local shard
    assert_same_weights(wb, wa, atol=1e-3)
    va, vb = (json.loads((out / "val.json").read_text()) for out in (single, ds))
    assert va["tokens_trained"] == vb["tokens_trained"] > 0 and va["image_tokens"] == vb["image_tokens"] > 0
    for k in ("text_loss", "image_loss"):
        assert vb[k] == pytest.approx(va[k], rel=1e-4), k
    from hybrid.checkpoint import load_pretrained_model

    load_pretrained_model(ds / "final")  # loads strictly: nothing missing
    assert sorted(p.name for p in (ds / "checkpoints" / "step_0000002").glob("run_objects*")) == [
        "run_objects.safetensors", "run_objects_rank0.safetensors", "run_objects_rank1.safetensors"]
    ea, eb = weights(single, "final_ema"), weights(ds, "final_ema")
    assert any(not torch.equal(ea[k], wa[k]) for k in ea)  # the EMA is not the weights
    assert_same_weights(eb, ea, atol=1e-3)

    resumed = tmp_path / "resumed"
    shutil.copytree(ds, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    shutil.rmtree(resumed / "final")
    assert "at step 2" in launch(resumed, *extra, config=ZERO3)
    c = losses(resumed)
    assert sorted(c) == [1, 2, 3, 4]
    assert_same_losses(c, b, (3, 4), rel=1e-6)
    assert_same_weights(weights(resumed), wb, atol=1e-6)
    assert_same_weights(weights(resumed, "final_ema"), eb, atol=1e-6)


@pytest.mark.parametrize("config", [ZERO2, ZERO3])
def test_deepspeed_fine_tunes_siglip_in_the_same_engine(tmp_path, config):
    """siglip_trainable: the model and the encoder are trained as one module (ModelWithEncoder),
    since accelerate gives DeepSpeed one model per engine. With mix_understand=0.25, steps 1 and 3
    have understanding images on one rank only (2 vs 0, then 0 vs 1): the encoder is unused on
    the other rank (which runs it on a blank image and uses none of it, as hybrid_loss runs an
    absent modality's head on nothing): both ranks must reduce the same gradients and, under
    ZeRO-3, gather the same parameters in the same order. Two processes equal one process with the same global batch:
    losses (rel 1e-5), the model and the fine-tuned encoder in final/ (atol 1e-3), which did move."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from encoders.siglip import SiglipEncoder

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2))
    SiglipEncoder.from_transformers_model(tower, SiglipImageProcessor(size={"height": 32, "width": 32})
                                          ).save_pretrained(tmp_path / "siglip")
    extra = ["steps=3", "save_every=3", "fault_nan_steps=[]", f"siglip_path={tmp_path / 'siglip'}",
             "siglip_trainable=true", "siglip_lr_scale=1.0", "mix_understand=0.25", "und_eval=4", "num_samples=2"]
    ds = tmp_path / "ds"
    launch(ds, *extra, config=config)
    single = tmp_path / "single"
    assert main([DEBUG, f"output_dir={single}", *COMMON, *extra, "grad_accum=2"]) == 0
    a, b = losses(single), losses(ds)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert_same_losses(b, a, a, rel=1e-5)
    for folder in ("final", "final/siglip"):
        wa, wb = weights(single, folder), weights(ds, folder)
        assert_same_weights(wb, wa, atol=1e-3)
    before = load_file(tmp_path / "siglip" / "model.safetensors")
    assert any(not torch.equal(before[k], wb[k]) for k in before)  # fine-tuned, not the frozen copy
    # the offline export finds the model inside ModelWithEncoder's names (model.*, encoder.*)
    from train.export_zero import main as export_main

    assert export_main([str(ds), str(tmp_path / "export"), "--only", "model"]) == 0
    exported, final = load_file(tmp_path / "export" / "model.safetensors"), weights(ds)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
