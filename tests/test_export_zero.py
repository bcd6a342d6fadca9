"""train/export_zero.py: DeepSpeed ZeRO checkpoints -> one safetensors file (+ the pipeline folder).

Two real 2-process CPU runs of the `debug` model, launched once for the module (both at once,
~80 s on 2 busy cores; ~90 s for the whole module), each ending with a checkpoint at step 2 and the full model gathered by the
trainer into final/ (= the step-2 weights):
  * ZeRO-3 (deepspeed_zero3.yaml): every parameter split over the ranks;
  * ZeRO-2 (deepspeed_zero2.yaml) with tied embeddings: groups cut into rank slices, and
    lm_head.weight stored once (DeepSpeed's shared_params).
Training is fp32 on the CPU, so DeepSpeed's fp32 master weights ARE the module's weights (the
optimizer updates the master copy and copies it into the module): the export must equal final/
bitwise, and does (measured: max difference 0). Padding (parameter sizes not divisible by the
rank count, ZeRO-2 alignment paddings), frozen parameters and buffers do not occur in the
`debug` model on 2 ranks: a synthetic 3-rank checkpoint checks them against DeepSpeed's own
reader (zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybrid.checkpoint import load_pretrained_model
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from train.export_zero import (
    CHUNK_ELEMENTS,
    TensorSpec,
    ZeroCheckpoint,
    _Concat,
    export_zero_checkpoint,
    load_ds_file,
    main,
    save_tensors,
    write_safetensors,
)

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train/configs/debug.yaml", "steps=2", "save_every=2", "log_every=1", "batch_size=4", "sample_every=1000",
        "ema_decay=0.5",  # EMA weights beside the ZeRO state: per rank under ZeRO-3, whole under ZeRO-2
        "num_samples=1", "sample_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """{"zero3": run folder, "zero2": run folder}, trained at the same time."""
    base = tmp_path_factory.mktemp("zero_runs")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    jobs = {}
    for name, extra in (("zero3", []), ("zero2", ["model.tie_embeddings=true"])):
        cmd = [str(accelerate), "launch", "--config_file", f"train/accelerate/deepspeed_{name}.yaml",
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               "-m", "train", *ARGS, f"output_dir={base / name}", *extra]
        log = (base / f"{name}.log").open("w")
        jobs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in jobs.items():
        rc = proc.wait(timeout=600)
        log.close()
        assert rc == 0, f"{name} training failed:\n{(base / f'{name}.log').read_text()[-6000:]}"
    return {name: base / name for name in jobs}


def step_dir(run: Path) -> Path:
    return run / "checkpoints" / "step_0000002"


def assert_equal_files(got: Path, want: Path) -> dict[str, torch.Tensor]:
    a, b = load_file(got), load_file(want)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    return a


def check_pipeline_folder(out: Path, run: Path) -> None:
    """The folder loads as a pipeline and equals the trainer's final/ but for the weights' provenance."""
    from hybrid.pipeline import HybridPipeline

    final = run / "final"
    assert json.loads((out / "config.json").read_text()) == json.loads((final / "config.json").read_text())
    assert json.loads((out / "scheduler.json").read_text()) == json.loads((final / "scheduler.json").read_text())
    names = [sorted(p.name for p in (d / "tokenizer").iterdir()) for d in (out, final)]
    assert names[0] == names[1]
    pipe = HybridPipeline.from_pretrained(out)
    ref = HybridPipeline.from_pretrained(final)
    assert pipe.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert pipe.scheduler.to_dict() == ref.scheduler.to_dict()


def test_zero3_export_equals_the_gathered_model_and_loads_as_a_pipeline(runs, tmp_path, capsys):
    run = runs["zero3"]
    out = tmp_path / "export"
    # the run folder: its newest complete checkpoint; through the command line
    assert main([str(run), str(out)]) == 0
    line = capsys.readouterr().out
    assert "(ZeRO-3, 2 ranks, step 2)" in line and "float32" in line, line
    got = assert_equal_files(out / "model.safetensors", run / "final" / "model.safetensors")
    cfg = HybridConfig.load(out / "config.json")
    with torch.device("meta"):
        want = {k: v.shape for k, v in HybridModel(cfg).state_dict().items()}
    assert {k: v.shape for k, v in got.items()} == want  # no tied weights here: every state-dict entry
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    load_pretrained_model(out)  # strict
    check_pipeline_folder(out, run)


def test_zero2_tied_export_equals_the_gathered_model_and_loads_as_a_pipeline(runs, tmp_path):
    run = runs["zero2"]
    out = tmp_path / "export"
    s = export_zero_checkpoint(step_dir(run), out)
    assert (s.stage, s.world, s.step, s.dtype) == (2, 2, 2, torch.float32)
    got = assert_equal_files(out / "model.safetensors", run / "final" / "model.safetensors")
    assert "embed_tokens.weight" in got and "lm_head.weight" not in got  # stored once, as save_model does
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "lm_head.weight": "embed_tokens.weight"}
    assert s.parameters == sum(t.numel() for t in got.values())
    model = load_pretrained_model(out)  # strict: lm_head.weight is filled through the tie
    assert model.lm_head.weight is model.embed_tokens.weight
    check_pipeline_folder(out, run)


@pytest.mark.parametrize("name", ["zero3", "zero2"])
def test_ema_export_equals_the_trainers_final_ema(runs, tmp_path, name):
    """--ema assembles the EMA from run_objects_rank{r}.safetensors (ZeRO-3: partitions split like
    the master weights) or run_objects.safetensors (ZeRO-2: the whole shadow): bitwise the
    trainer's final_ema/, which is not the trained weights."""
    run, out = runs[name], tmp_path / "ema"
    assert main([str(run), str(out), "--ema", "--only", "model"]) == 0
    got = assert_equal_files(out / "model.safetensors", run / "final_ema" / "model.safetensors")
    trained = load_file(run / "final" / "model.safetensors")
    assert any(not torch.equal(got[k], trained[k]) for k in got)
    (step_dir(run) / ("run_objects_rank1.safetensors" if name == "zero3" else "run_objects.safetensors")).unlink()
    assert main([str(run), str(tmp_path / "x"), "--ema", "--only", "model"]) == 1


def test_dtype_bf16_is_the_fp32_export_cast_and_only_model_writes_model_and_config(runs, tmp_path):
    ckpt = step_dir(runs["zero3"])
    export_zero_checkpoint(ckpt, tmp_path / "fp32", only="weights")
    assert main([str(ckpt), str(tmp_path / "bf16"), "--dtype", "bf16", "--only", "model"]) == 0
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "bf16").iterdir()) == ["config.json", "model.safetensors"]
    a, b = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)), k
    model = load_pretrained_model(tmp_path / "bf16")  # bf16 weights copied into the fp32 model
    torch.testing.assert_close(model.state_dict()["norm.weight"], a["norm.weight"], rtol=1e-2, atol=0)


def test_errors_not_a_checkpoint_missing_rank_files_and_shape_mismatch(runs, tmp_path, capsys):
    # into the run folder itself: its tokenizer/ would be deleted before being copied
    run = runs["zero3"]
    tokenizer_files = sorted(p.name for p in (run / "tokenizer").iterdir())
    assert main([str(run), str(run)]) == 1
    assert "would overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "tokenizer").iterdir()) == tokenizer_files
    assert not (run / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is not a DeepSpeed checkpoint: it has no 'latest' file"):
        ZeroCheckpoint(empty)
    assert main([str(empty), str(tmp_path / "o")]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ZeroCheckpoint(tmp_path / "nowhere")
    (empty / "latest").write_text("global_step9")
    with pytest.raises(FileNotFoundError, match="names the tag folder 'global_step9'"):
        ZeroCheckpoint(empty)
    (empty / "global_step9").mkdir()
    with pytest.raises(FileNotFoundError, match="has no zero_pp_rank_.*optim_states.pt"):
        ZeroCheckpoint(empty)
    (tmp_path / "run" / "checkpoints" / "step_0000005").mkdir(parents=True)  # no trainer_state.json: incomplete
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ZeroCheckpoint(tmp_path / "run")

    # no 'latest', but one tag folder; or the tag folder itself
    ckpt = shutil.copytree(step_dir(runs["zero3"]), tmp_path / "no_latest")
    (ckpt / "latest").unlink()
    assert ZeroCheckpoint(ckpt).tag_dir == ckpt / "pytorch_model"
    assert ZeroCheckpoint(ckpt / "pytorch_model").step == 2  # trainer_state.json found beside it

    # a rank's files missing: the rank count comes from partition_count in the files that are there
    for missing in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"):
        ckpt = tmp_path / f"lacks_{missing}"
        shutil.copytree(step_dir(runs["zero3"]), ckpt)
        (ckpt / "pytorch_model" / missing).unlink()
        with pytest.raises(FileNotFoundError, match=f"written by 2 ranks .* lacks {missing}"):
            export_zero_checkpoint(ckpt, tmp_path / "o")
    ckpt = tmp_path / "z2_lacks_rank1"
    shutil.copytree(step_dir(runs["zero2"]), ckpt)
    (ckpt / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        ZeroCheckpoint(ckpt)

    # the trainer_state's model config disagrees with the stored shapes: refused before writing
    ckpt = tmp_path / "other_config"
    shutil.copytree(step_dir(runs["zero3"]), ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["model_config"]["ffn_dim"] = 128
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    out = tmp_path / "not_written"
    with pytest.raises(ValueError, match=r"shape mismatch for layers.0.ffn.gate_proj.weight: checkpoint \(192, 64\), "
                                         r"model config \(128, 64\)"):
        export_zero_checkpoint(ckpt, out)
    assert not out.exists()
    export_zero_checkpoint(ckpt, out, only="weights")  # no config involved: exported as stored
    # a checkpoint outside a run folder: no tokenizer to build the pipeline from
    ckpt = shutil.copytree(step_dir(runs["zero3"]), tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        export_zero_checkpoint(ckpt, tmp_path / "o2")


# --- the streaming safetensors writer -------------------------------------------------------


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i64": torch.arange(-5, 6),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),  # 0-d
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "odd": torch.randn(1, generator=g).to(torch.float16),  # 2 bytes: what follows is unaligned
    }


def test_streamed_writer_matches_save_file(tmp_path):
    tensors = mixed_tensors()
    meta = {"format": "pt", "note": "ünïcode ok"}
    save_tensors(tensors, tmp_path / "ours.safetensors", meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata=meta)
    ours, ref = str(tmp_path / "ours.safetensors"), str(tmp_path / "ref.safetensors")
    with safe_open(ours, "pt") as f, safe_open(ref, "pt") as r:
        assert f.metadata() == r.metadata() == meta
        assert sorted(f.keys()) == sorted(r.keys()) == sorted(tensors)
        for k in tensors:
            a, b = f.get_tensor(k), r.get_tensor(k)
            assert a.dtype == b.dtype == tensors[k].dtype and a.shape == b.shape == tensors[k].shape, k
            assert torch.equal(a, b), k
    raw = (tmp_path / "ours.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and len(raw) == 8 + n + sum(t.numel() * t.element_size() for t in tensors.values())


def test_streamed_writer_chunks_and_refuses_short_or_mistyped_data(tmp_path):
    x = torch.randn(10, 3)
    flat = x.view(-1)
    spec = TensorSpec("x", torch.float32, (10, 3), lambda: (flat[:7], flat[7:20].view(13, 1), flat[20:]))
    write_safetensors(tmp_path / "a.safetensors", [spec])
    assert torch.equal(load_file(tmp_path / "a.safetensors")["x"], x)
    short = TensorSpec("x", torch.float32, (10, 3), lambda: (x.view(-1)[:29],))
    with pytest.raises(ValueError, match="wrote 116 bytes, the header promised 120"):
        write_safetensors(tmp_path / "b.safetensors", [short])
    wrong = TensorSpec("x", torch.float32, (10, 3), lambda: (x.double(),))
    with pytest.raises(TypeError, match="dtype"):
        write_safetensors(tmp_path / "b.safetensors", [wrong])
    assert not list(tmp_path.glob("b.safetensors*"))  # no partial file left behind
    with pytest.raises(ValueError, match="appears twice"):
        write_safetensors(tmp_path / "c.safetensors", [spec, spec])


# --- layouts the debug runs do not exercise, against DeepSpeed's own reader -----------------


def fake_checkpoint(folder: Path, stage: int, world: int) -> dict[str, torch.Tensor]:
    """A ZeRO checkpoint written as DeepSpeed lays it out (see train/export_zero.py), with 3 ranks,
    sizes not divisible by 3, two groups, alignment paddings (ZeRO-2), a frozen parameter and two
    buffers. Returns the tensors it holds."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    g = torch.Generator().manual_seed(stage)
    groups = [{"a.weight": torch.randn(5, 7, generator=g), "b.bias": torch.randn(1, generator=g),
               "c.weight": torch.randn(4, 4, generator=g)},
              {"d.weight": torch.randn(11, generator=g), "e.weight": torch.randn(2, 3, generator=g)}]
    frozen = {"f.weight": torch.randn(2, 5, generator=g)}
    buffers = {"buf.float": torch.randn(3, generator=g), "buf.index": torch.tensor([4, 1, 2])}
    shapes = [{k: v.shape for k, v in grp.items()} for grp in groups]
    tag = folder / "global_step7"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step7")
    model_states = {"buffer_names": list(buffers), "param_shapes": shapes, "shared_params": {},
                    "frozen_param_shapes": {k: v.shape for k, v in frozen.items()}, "ds_version": "0.19.8"}

    def share(t: torch.Tensor, r: int) -> torch.Tensor:  # ZeRO-3: ceil(n / world) elements per rank, zero-padded
        p = -(-t.numel() // world)
        return torch.cat([t.reshape(-1), torch.zeros(p * world - t.numel())])[r * p:(r + 1) * p]

    if stage == 3:
        for r in range(world):
            flat = [torch.cat([share(t, r) for t in grp.values()]) for grp in groups]
            torch.save({"module": dict(buffers), **model_states,
                        "frozen_param_fragments": {k: share(v, r) for k, v in frozen.items()}},
                       tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            osd = {"zero_stage": ZeroStageEnum.weights, "partition_count": world, "fp32_flat_groups": flat,
                   "loss_scaler": LossScaler(1.0)}
            torch.save({"optimizer_state_dict": osd}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    else:
        pads = [[3, 1, 0], [2, 0]]  # after each parameter; none after a group's last
        slices = [[] for _ in range(world)]
        for grp, pad in zip(groups, pads, strict=True):
            padded = [torch.cat([t.reshape(-1), torch.full((p,), 99.0)])
                      for t, p in zip(grp.values(), pad, strict=True)]
            flat = torch.cat(padded)
            per = -(-flat.numel() // (2 * world)) * 2  # equal slices of the buffer aligned to 2 x world ...
            for r in range(world):
                slices[r].append(flat[r * per:(r + 1) * per])  # ... saved without the trailing padding
        torch.save({"module": {**buffers, **frozen}, **model_states, "frozen_param_fragments": dict(frozen)},
                   tag / "mp_rank_00_model_states.pt")
        for r in range(world):
            osd = {"zero_stage": ZeroStageEnum.gradients, "partition_count": [world, world],
                   "single_partition_of_fp32_groups": slices[r], "param_alignment_paddings": pads,
                   "loss_scaler": LossScaler(1.0)}
            torch.save({"optimizer_state_dict": osd}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return {k: v for grp in groups for k, v in grp.items()} | frozen | buffers


@pytest.mark.parametrize("stage", [2, 3])
def test_padded_layouts_frozen_params_and_buffers_agree_with_deepspeeds_reader(tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    want = fake_checkpoint(tmp_path / "ckpt", stage, world=3)
    ours = dict(ZeroCheckpoint(tmp_path / "ckpt").iter_tensors())
    ds = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"))
    assert sorted(ours) == sorted(ds) == sorted(want)
    for k in want:
        assert torch.equal(ours[k], want[k]), k
        assert torch.equal(ours[k], ds[k].to(ours[k].dtype)), k  # DeepSpeed makes float buffers fp32
    assert ours["buf.index"].dtype == torch.int64
    # and through the file, bf16: integer buffers keep their dtype
    ZeroCheckpoint(tmp_path / "ckpt").write(tmp_path / "x.safetensors", torch.bfloat16)
    got = load_file(tmp_path / "x.safetensors")
    assert got["buf.index"].dtype == torch.int64 and got["a.weight"].dtype == torch.bfloat16
    assert torch.equal(got["a.weight"], want["a.weight"].to(torch.bfloat16))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; pages are only given back on Linux")
def test_reading_a_mapped_file_gives_its_pages_back(tmp_path):
    """Reading 128 MiB through the memory map, chunk by chunk, leaves the process's resident size
    about where it was: each chunk's pages are dropped once written (without that, all 128 MiB
    would stay resident: the mapped file's pages count in RSS)."""
    torch.save({"w": torch.randn(32 * 2**20)}, tmp_path / "big.pt")

    def rss_kb() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

    t = load_ds_file(tmp_path / "big.pt")["w"]
    piece = _Concat([t]).pieces(0, t.numel())
    from train.export_zero import Entry

    entry = Entry("w", tuple(t.shape), t.dtype, tuple(piece))
    ckpt = ZeroCheckpoint.__new__(ZeroCheckpoint)  # only its chunk reader is used
    before = rss_kb()
    total = 0.0
    for chunk in ckpt.chunks(entry, torch.float32):
        assert chunk.numel() <= CHUNK_ELEMENTS
        total += float(chunk.sum())
    grew = rss_kb() - before
    assert grew < 80 * 1024, f"resident size grew by {grew} KiB reading 131072 KiB"
    assert total == pytest.approx(float(t.sum()), rel=1e-4)  # the dropped pages read back the same
