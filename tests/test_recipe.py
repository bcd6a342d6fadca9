"""The default recipe (python -m train.recipe) end to end at toy sizes, and its report pieces.

The quick chain runs every stage for real (accelerate launch of the VQ, SigLIP and hybrid stages,
GenEval and MMBench generation and scoring, the report); quality is not checked here (toy sizes),
the plumbing is: files, scores read back equal to the evaluators' own, resuming, reuse of another
run's components, and a failing stage's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from eval.report import plot_curves, read_log
from train.recipe import read_scores, stage_overrides

ROOT = Path(__file__).resolve().parents[1]


def recipe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train.recipe", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("recipe") / "run"
    return out, recipe("--quick", "--out", str(out))


def test_quick_recipe_runs_every_stage_and_writes_the_report(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("vq", "siglip", "hybrid"):
        assert (out / stage / "final").is_dir() and (out / "logs" / f"{stage}.log").is_file()
    assert (out / "hybrid" / "final" / "vq").is_dir() and (out / "hybrid" / "final" / "siglip").is_dir()
    # every training stage went through accelerate launch with the recipe's launcher config
    commands = (out / "commands.sh").read_text()
    assert commands.count("accelerate.commands.launch --config_file train/accelerate/recipe.yaml") == 3
    # the scores it prints and stores are the evaluators' own summaries
    record = json.loads((out / "recipe.json").read_text())
    assert record["scores"] == read_scores(out)
    for split in ("train", "heldout"):
        g = json.loads((out / "eval" / f"geneval_{split}" / "summary.json").read_text())
        m = json.loads((out / "eval" / f"mmbench_{split}" / "summary.json").read_text())
        assert record["scores"][f"geneval_overall_{split}"] == g["overall"]
        assert record["scores"][f"mmbench_circular_{split}"] == m["overall"]["circular"]
    assert "GenEval overall" in proc.stdout and "report: " in proc.stdout
    report = (out / "report" / "report.md").read_text()
    for heading in ("## Summary", "## Learning instruments", "## Training curves", "## GenEval", "## MMBench",
                    "## Commands"):
        assert heading in report
    probes = json.loads((out / "eval" / "probes.json").read_text())  # the instruments ran on the final model
    assert {"encoder", "hybrid_last", "pixels", "reliance_train", "caption_reliance"} <= set(probes)
    assert record["scores"]["reliance_gap_train"] == probes["reliance_train"]["gap"]
    assert "strict overall" in report and "Linear probes" in report
    for stage in ("vq", "siglip", "hybrid"):  # a real PNG per stage's curves
        with Image.open(out / "report" / "curves" / f"{stage}.png") as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert (out / "report" / "report.html").is_file()
    assert list((out / "report" / "grids").glob("geneval_train_*.png"))


def test_rerun_skips_finished_stages(quick_run):
    out, first = quick_run
    assert first.returncode == 0
    mtime = (out / "hybrid" / "final" / "model.safetensors").stat().st_mtime
    proc = recipe("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job in ("vq", "siglip", "hybrid", "geneval_train", "geneval_heldout", "mmbench_train", "mmbench_heldout"):
        assert f"{job}: already done" in proc.stdout
    assert (out / "hybrid" / "final" / "model.safetensors").stat().st_mtime == mtime


def test_components_are_reused_and_a_failing_stage_is_reported(quick_run, tmp_path):
    src, first = quick_run
    assert first.returncode == 0
    # an ablation on the same components: only the hybrid stage and the evaluations run
    out = tmp_path / "ddpm"
    proc = recipe("--quick", "--out", str(out), "--components", str(src), "--set", "hybrid.model.scheduler=ddpm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "vq").exists() and not (out / "siglip").exists()
    assert f"vq_path={src / 'vq' / 'final'}" in (out / "commands.sh").read_text()
    assert json.loads((out / "hybrid" / "final" / "scheduler.json").read_text())["name"] == "ddpm"
    assert json.loads((src / "hybrid" / "final" / "scheduler.json").read_text())["name"] == "flow"
    # a config error is caught before anything trains
    bad = recipe("--quick", "--out", str(tmp_path / "bad"), "--components", str(src), "--set", "hybrid.steps=0")
    assert bad.returncode == 2 and "recipe: error: invalid training config: steps must be >= 1" in bad.stderr
    assert not (tmp_path / "bad" / "hybrid").exists()
    # a stage that fails while running: named, with the end of its log and its command
    missing = tmp_path / "no_such_tokenizer"
    bad = recipe("--quick", "--out", str(tmp_path / "bad2"), "--components", str(src),
                 "--set", f"hybrid.tokenizer={missing}")
    assert bad.returncode == 2 and "stage hybrid failed (exit" in bad.stderr
    assert str(missing) in bad.stderr.split("stage hybrid failed")[1] and "command: " in bad.stderr
    assert "rerun the recipe to resume" in bad.stderr


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="expected <stage>.<key>=<value>"):
        stage_overrides(["hybird.steps=3"], quick=False)
    with pytest.raises(ValueError, match="expected <stage>.<key>=<value>"):
        stage_overrides(["hybrid.steps"], quick=False)
    assert stage_overrides(["hybrid.model.scheduler=ddpm"], quick=False)["hybrid"] == ["model.scheduler=ddpm"]
    proc = recipe("--configs", str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and f"{tmp_path} has no vq.yaml" in proc.stderr
    proc = recipe("--components", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "--components" in proc.stderr and "no " in proc.stderr


def test_plot_curves_draws_what_the_log_has(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 30)] + [{"step": 10, "skipped": "x"}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 31, "lo')  # a torn last line
    assert len(read_log(log)) == len(rows)
    png = plot_curves(log, [("loss", ["loss"]), ("absent", ["nothing"])], tmp_path / "c.png", "t")
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert plot_curves(log, [("absent", ["nothing"])], tmp_path / "d.png", "t") is None
    assert not (tmp_path / "d.png").exists()


@pytest.mark.parametrize("folder", ["train/configs/recipe", "train/configs/recipe_gpu"])
def test_recipe_configs_are_valid(folder):
    """Both recipes' stage files pass their stages' config checks (the GPU one has not run here)."""
    import yaml

    from train import siglip_stage, trainer, vq_stage
    from train.recipe import EvalSettings

    d = ROOT / folder
    assert vq_stage.load_config(d / "vq.yaml", []).stage == "vq"
    assert siglip_stage.load_config(d / "siglip.yaml", []).stage == "siglip"
    cfg = trainer.load_config(d / "hybrid.yaml", [])
    assert cfg.vq_path and cfg.siglip_path and cfg.mix_understand > 0 and cfg.model_config().image_codec == "vq"
    EvalSettings(**yaml.safe_load((d / "eval.yaml").read_text()))
