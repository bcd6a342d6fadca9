"""python -m train.compare end to end on the debug config: three variants (dense, late fusion,
MoE) trained under accelerate, scored on held-out batches, and summarised with parameter counts
whose relations follow from the architectures; a rerun skips the finished variants.

    /work/main/.venv/bin/python -m pytest -q tests/test_compare.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from hybrid.model import HybridModel
from hybrid.tokenizer import train_tokenizer
from train.compare import main
from train.shapes import ShapesWorld
from train.trainer import load_config


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tok = root / "tokenizer"
    train_tokenizer(ShapesWorld(seed=0).corpus_texts(5_000), 320).save_pretrained(str(tok))
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "config": "train/configs/debug.yaml",
        "overrides": [f"tokenizer={tok}", "steps=4", "log_every=1", "save_every=100", "num_samples=2"],
        "val_batches": 2, "routing_samples": 8,
        "variants": {"dense": [], "late": ["model.late_fusion_layers=1", "fault_nan_steps=[2]"],
                     "moe": ["model.moe_experts=2", "model.moe_top_k=1"]}}))
    return path


def test_compare_trains_every_variant_and_counts_active_parameters(plan, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(plan), "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "late", "moe"]
    for r in rows.values():
        assert math.isfinite(r["val_text_loss"]) and math.isfinite(r["val_image_loss"])
        assert r["tokens_trained"] > 0 and r["train_flops"] > 0 and 0 < r["image_token_share"] < 1
        assert r["grad_norm_max"] > 0
    assert [r["non_finite_steps"] for r in rows.values()] == [0, 1, 0]  # late's step 2 made NaN
    dense, late, moe = rows["dense"], rows["late"], rows["moe"]
    dense_cfg = load_config("train/configs/debug.yaml", []).model_config()
    dim, layers = dense_cfg.dim, dense_cfg.n_layers
    # late fusion moves a block, it adds none: same total; an image token still passes all of them,
    # a text token one block fewer
    assert late["total"] == dense["total"] and late["active_image"] == dense["active_image"]
    with torch.device("meta"):
        first = HybridModel(dense_cfg).layers[0]
    block, ffn = sum(p.numel() for p in first.parameters()), sum(p.numel() for p in first.ffn.parameters())
    assert dense["active_text"] - late["active_text"] == block
    # top-1 of 2 experts the dense FFN's size: a token passes the dense FFN's weights plus a router
    # (dim x experts) per layer; the second expert adds to the total only
    assert moe["active_text"] - dense["active_text"] == layers * dim * 2
    assert moe["active_image"] - dense["active_image"] == layers * dim * 2
    assert moe["total"] - dense["total"] == layers * (ffn + dim * 2)
    # the routing report for the MoE variant, with its at-init baseline
    assert len(moe["routing_specialisation"]) == layers == len(moe["routing_specialisation_at_init"])
    assert "routing_specialisation" not in dense
    md = (out / "results.md").read_text()
    assert all(f"| {name} |" in md for name in rows) and "-m eval.moe_routing" in md
    assert len(result["commands"]) == 4  # three trainings + one routing report
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG"

    # a rerun trains nothing again: the finished variants are skipped, the results are the same
    stamp = {n: (out / n / "final" / "model.safetensors").stat().st_mtime_ns for n in rows}
    assert main([str(plan), "--out", str(out), "--threads", "1", "--only", "dense,moe"]) == 0
    assert {n: (out / n / "final" / "model.safetensors").stat().st_mtime_ns for n in rows} == stamp
    again = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(again) == ["dense", "moe"] and again["moe"]["val_text_loss"] == moe["val_text_loss"]


def test_bad_plans_are_clear_errors(plan, tmp_path, capsys):
    assert main([str(plan), "--out", str(tmp_path / "a"), "--only", "dense,sparse"]) == 2
    assert "no variants ['sparse']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"config": "train/configs/debug.yaml", "variants": {"x": "moe_experts=2"}}))
    assert main([str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "variant 'x' must be a list of key=value strings" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"config": "train/configs/debug.yaml", "variants": {"x": []}, "seeds": 2}))
    assert main([str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "unknown keys ['seeds']" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path("train/configs/research").glob("*.yaml")))
def test_research_plans_are_valid(path):
    """Every variant of every shipped plan is a valid hybrid config (typos fail here, not after
    the first variants have trained)."""
    from train.compare import load_plan

    if "variants" not in yaml.safe_load(path.read_text()):
        load_config(str(path), []).model_config()  # a base config
        return
    plan = load_plan(path, [])
    for name, over in plan["variants"].items():
        cfg = load_config(plan["config"], [*plan["overrides"], *over])
        assert cfg.model_config() is not None, name
