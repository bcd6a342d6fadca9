"""Faults in the hybrid stage: a run killed at a random step (or during a checkpoint write) resumes
bit for bit; non-finite steps are skipped and a streak of them stops the run; a changed training
config is refused on resume; real files with bad records train and their skips are counted.

    /work/main/.venv/bin/python -m pytest -q tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybrid.tokenizer import train_tokenizer
from train.__main__ import main
from train.shapes import ShapesWorld
from train.sources import BadItemError
from train.trainer import STATE_FILE, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEBUG = "train/configs/debug.yaml"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    """The tokenizer the trainer would train (20k shapes texts, 320 tokens), trained once."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(ShapesWorld(seed=0).corpus_texts(20_000), 320).save_pretrained(str(path))
    return str(path)


def args(out: Path, tok: str, *extra: str) -> list[str]:
    return [DEBUG, f"output_dir={out}", f"tokenizer={tok}", "sample_every=1000", "num_samples=2", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> dict[int, tuple]:
    recs = [r for r in records(out) if "text_loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: (r["loss"], r["text_loss"], r["image_loss"], r["lr"], r["grad_norm"]) for r in recs}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------ kill + resume

KILL_STEPS, KILL_EXTRA = 60, ("steps=60", "save_every=3", "log_every=1", "keep_checkpoints=2")


def start(out: Path, tok: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train", *args(out, tok, *KILL_EXTRA)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logged_step(out: Path) -> int:
    try:
        text = (out / "log.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]
    return max(steps, default=0)


def test_sigkill_at_a_random_step_resumes_bitwise(tmp_path, tok, capsys):
    """Two runs SIGKILLed at random steps (a real process kill, at whatever point of the step or
    of a checkpoint write the signal lands); in the second the newest checkpoint's completion
    marker is then deleted too (a kill during its write). Rerunning the same command finishes both
    with the losses of every step and the final weights of an uninterrupted run, bit for bit."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kill_at = {"plain": rng.randint(3, 40), "marker": rng.randint(8, 40)}  # >= 8: two complete checkpoints
    runs = {name: tmp_path / name for name in kill_at}
    procs = {name: start(out, tok) for name, out in runs.items()}
    deadline = time.monotonic() + 120
    while procs:
        for name in list(procs):
            if logged_step(runs[name]) >= kill_at[name]:
                os.kill(procs[name].pid, signal.SIGKILL)
                assert procs.pop(name).wait() == -signal.SIGKILL, f"{name} finished before the kill (seed {seed})"
            else:
                assert procs[name].poll() is None, f"{name} exited early (seed {seed})"
        assert time.monotonic() < deadline, f"timed out waiting for {kill_at} (seed {seed})"
        time.sleep(0.005)
    for out in runs.values():
        assert not (out / "final").exists()
    # the uninterrupted run only now: run in this process meanwhile, it let the subprocesses race
    # past their kill step to the end of training on a loaded machine (a flaky CI failure)
    straight = tmp_path / "straight"
    assert main(args(straight, tok, *KILL_EXTRA)) == 0
    newest = latest_checkpoint(runs["marker"])
    complete = sorted(p.name for p in (runs["marker"] / "checkpoints").iterdir() if (p / STATE_FILE).is_file())
    assert len(complete) >= 2 and complete[-1] == newest.name, complete
    (newest / STATE_FILE).unlink()  # as if killed while writing it
    capsys.readouterr()
    reference = losses(straight)
    assert sorted(reference) == list(range(1, KILL_STEPS + 1))
    for name, out in runs.items():
        # killed at step 3 (logged, then killed while saving its checkpoint): nothing complete yet
        had_checkpoint = latest_checkpoint(out) is not None
        assert main(args(out, tok, *KILL_EXTRA)) == 0  # the same command again
        printed = capsys.readouterr().out
        if name == "marker":
            assert f"resumed from {out / 'checkpoints' / complete[-2]} at step" in printed, printed
        else:  # from its newest complete checkpoint, or from scratch when it had none
            assert ("resumed from" in printed) == had_checkpoint, (printed, kill_at, seed)
        got = losses(out)
        assert sorted(got) == list(range(1, KILL_STEPS + 1)), f"{name}: seed {seed}"
        for s in reference:
            assert got[s] == reference[s], f"{name}: step {s} differs (killed at {kill_at[name]}, seed {seed})"
        assert_same_weights(straight, out)


# ---------------------------------------------------------------------------- non-finite steps


def test_a_run_killed_before_its_first_checkpoint_restarts_with_one_record_per_step(tmp_path, tok):
    """A run that logged steps but left no complete checkpoint (killed before its first save)
    starts over from step 0 when rerun: the redone steps replace the earlier records, not follow
    them (the random-kill test above hits this only when its kill lands before step 3's save)."""
    out = tmp_path / "early"
    cmd = args(out, tok, "steps=3", "log_every=1", "save_every=100")
    assert main(cmd) == 0
    first = losses(out)
    assert sorted(first) == [1, 2, 3]
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # as if killed before any save
    assert main(cmd) == 0
    assert losses(out) == first  # each step once, with the same (deterministic) values


def test_non_finite_steps_are_skipped(tmp_path, tok):
    """fault_nan_steps makes the loss of steps 4 and 5 NaN (so are their gradients): the steps are
    logged as skipped, the weights do not move (step 5's checkpoint holds step 3's weights) and
    the run goes on with finite losses and the LR schedule of a clean run."""
    out = tmp_path / "nan"
    assert main(args(out, tok, "steps=8", "log_every=1", "save_every=1", "keep_checkpoints=10",
                     "fault_nan_steps=[4, 5]", "max_bad_steps=3")) == 0
    recs = {r["step"]: r for r in records(out) if "step" in r and ("skipped" in r or "text_loss" in r)}
    assert sorted(recs) == list(range(1, 9))
    assert [s for s, r in recs.items() if "skipped" in r] == [4, 5]
    assert recs[4]["skipped"] == "non-finite loss" and recs[4]["loss"] is None
    assert all(r["loss"] == r["loss"] and r["loss"] is not None for s, r in recs.items() if s not in (4, 5))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_0000004" not in ckpts and "step_0000005" not in ckpts  # not saved in a bad streak
    clean = tmp_path / "clean"
    assert main(args(clean, tok, "steps=8", "log_every=1", "save_every=100")) == 0
    lr_clean = {s: v[3] for s, v in losses(clean).items()}
    assert all(recs[s]["lr"] == lr_clean[s] for s in recs if s not in (4, 5))  # the schedule went on
    a = load_file(out / "checkpoints" / "step_0000003" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step_0000006" / "model.safetensors")
    c = load_file(clean / "final" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # step 6 did train ...
    # ... and the model at the end is not the clean run's: steps 4 and 5 made no update
    assert any(not torch.equal(b[k], c[k]) for k in b)


def test_a_streak_of_non_finite_steps_stops_the_run(tmp_path, tok, capsys):
    """max_bad_steps=3 consecutive NaN steps (7, 8, 9) stop the run with a message naming the step
    and the last good checkpoint (step 6; none is written for 8): it stays complete and the same
    command, once the fault is gone, resumes from it and finishes."""
    out = tmp_path / "streak"
    extra = ("steps=12", "log_every=1", "save_every=2", "max_bad_steps=3")
    assert main(args(out, tok, *extra, "fault_nan_steps=[7, 8, 9]")) == 3  # a NonFiniteError, reported
    assert re.search(r"error: stopping at step 9: 3 consecutive .*step_0000006", capsys.readouterr().err)
    assert latest_checkpoint(out).name == "step_0000006"
    assert not (out / "checkpoints" / "step_0000008").exists() and not (out / "final").exists()
    assert [r["step"] for r in records(out) if "skipped" in r] == [7, 8, 9]
    assert main(args(out, tok, *extra)) == 0  # resumes at 6 (fault_nan_steps may change on restart)
    recs = records(out)
    assert not any("skipped" in r for r in recs)
    assert sorted(r["step"] for r in recs if "text_loss" in r) == list(range(1, 13))
    # two isolated NaN steps never reach max_bad_steps=2
    assert main(args(tmp_path / "isolated", tok, "steps=6", "max_bad_steps=2", "fault_nan_steps=[2, 4]")) == 0


# ----------------------------------------------------------------------------- config changes


def test_resume_refuses_a_different_training_config(tmp_path, tok):
    out = tmp_path / "run"
    base = ("steps=8", "save_every=2", "log_every=2")
    assert main(args(out, tok, *base, "stop_at=2")) == 0
    with pytest.raises(ValueError, match=r"different training config .*'lr': \(0\.003, 0\.0001\)"):
        main(args(out, tok, *base, "lr=1e-4", "stop_at=4"))
    with pytest.raises(ValueError, match=r"different training config .*'steps'.*'warmup_steps'"):
        main(args(out, tok, "steps=9", "warmup_steps=2", "save_every=2", "log_every=2"))
    with pytest.raises(ValueError, match="different model config"):  # the model check still comes first
        main(args(out, tok, *base, "model.dim=32"))
    assert latest_checkpoint(out).name == "step_0000002"  # nothing was written by the refusals
    # cadence, stop_at, keep_checkpoints, max_bad_steps may change between restarts
    assert main(args(out, tok, "steps=8", "save_every=1", "log_every=1", "keep_checkpoints=3",
                     "max_bad_steps=7", "stop_at=4")) == 0
    assert latest_checkpoint(out).name == "step_0000004"
    # a math change, accepted when asked for
    assert main(args(out, tok, *base, "lr=1e-4", "allow_config_change=true")) == 0
    assert (out / "final" / "model.safetensors").is_file()
    lrs = {r["step"]: r["lr"] for r in records(out) if "text_loss" in r}
    assert lrs[4] > 1e-3 and lrs[6] < 1e-4  # the new lr applies after the resume


# --------------------------------------------------------------------------- files with bad items

# The bad records of tests/test_sources.py, at the trainer's default limits: big.png (300 x 300) is
# a good image there (only 256 x 256 was the limit), and a long_text must pass max_chars=100000.
sys.path.insert(0, str(Path(__file__).parent))
from test_sources import BAD, GOOD, make_files  # noqa: E402

TRAINER_BAD = [(r, why) for r, why, _ in BAD if r != BAD[4][0]]
TRAINER_BAD[[why for _, why in TRAINER_BAD].index("long_text")] = (
    {"type": "caption", "image": "rgb.png", "text": "long " * 25_000}, "long_text")
CAPTIONS = [r for r in GOOD if r["type"] == "caption"]


def write_manifest(root: Path) -> Path:
    """One good caption, every bad kind (indices 1..11: read by the first three steps of 4
    items), then 35 good captions: a run of 3 steps, with the loader's read-ahead, never wraps."""
    root.mkdir(parents=True)
    make_files(root)
    recs = [CAPTIONS[0], *(r for r, _ in TRAINER_BAD), *(CAPTIONS[i % len(CAPTIONS)] for i in range(35))]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return path


def test_manifest_with_bad_records_trains_and_counts_skips(tmp_path, tok, capsys):
    expected = dict(Counter(why for _, why in TRAINER_BAD))
    assert sum(expected.values()) == 11 and set(expected) == {
        "corrupt_image", "zero_size", "too_large", "unsupported_mode", "missing_file", "empty_text",
        "long_text", "bad_record"}
    manifest = write_manifest(tmp_path / "data")
    out = tmp_path / "run"
    assert main(args(out, tok, f"data={manifest}", "steps=3", "log_every=1", "save_every=100")) == 0
    recs = [r for r in records(out) if "text_loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in recs)
    # counted as trained on, not as read ahead: step 1 has indices 0..3 (3 bad), step 2 4..7, step 3 8..11
    per_step = [dict(Counter(why for _, why in TRAINER_BAD[:n])) for n in (3, 7, 11)]
    assert [r["skipped_items"] for r in recs] == per_step
    assert recs[-1]["skipped_items"] == expected  # all 11, none twice
    printed = capsys.readouterr().out
    line = "data: skipped 11 items: " + ", ".join(f"{k}={expected[k]}" for k in sorted(expected, key=[
        "missing_file", "zero_size", "corrupt_image", "unsupported_mode", "too_large", "empty_text",
        "long_text", "bad_record"].index))
    assert line in printed, printed
    assert (out / "final" / "model.safetensors").is_file()
    # stopped after step 2 and resumed (with 2 loader workers reading ahead): the same counts, the
    # resumed invocation adds to the checkpoint's instead of starting from 0 or recounting
    cut = tmp_path / "cut"
    assert main(args(cut, tok, f"data={manifest}", "steps=3", "log_every=1", "save_every=100", "stop_at=2")) == 0
    # the same stop_at again: nothing to train, and its complete checkpoint is not rewritten
    saved = {p.name: p.stat().st_mtime_ns for p in (cut / "checkpoints" / "step_0000002").iterdir()}
    assert main(args(cut, tok, f"data={manifest}", "steps=3", "log_every=1", "save_every=100", "stop_at=2")) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (cut / "checkpoints" / "step_0000002").iterdir()} == saved
    assert main(args(cut, tok, f"data={manifest}", "steps=3", "log_every=1", "save_every=100", "num_workers=2")) == 0
    assert [r["skipped_items"] for r in records(cut) if "text_loss" in r] == per_step
    assert line in capsys.readouterr().out
    # the loader's collate pickles (DataLoader workers under spawn / forkserver) and counts the same
    import pickle

    from hybrid.sequence import SampleBuilder
    from hybrid.tokenizer import load_tokenizer
    from train.sources import JsonlSource
    from train.trainer import CountedCollate

    cfg = json.loads((out / "final" / "config.json").read_text())
    from hybrid.config import HybridConfig

    counted = CountedCollate(SampleBuilder(load_tokenizer(tok), HybridConfig.from_dict(cfg), seq_len=256))
    items = [JsonlSource(manifest, 32)[i] for i in range(4)]
    (b1, s1), (b2, s2) = counted(items), pickle.loads(pickle.dumps(counted))(items)
    assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(s1, s2) and int(s1.sum()) == 3
    # data_on_error=raise: the first bad record stops the run, naming its file and reason
    with pytest.raises(BadItemError, match="corrupt.png: corrupt_image"):
        main(args(tmp_path / "strict", tok, f"data={manifest}", "steps=3", "data_on_error=raise"))
