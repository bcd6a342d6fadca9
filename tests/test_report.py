"""eval.report on a GenEval folder of known renders and an MMBench run of a tiny model."""

import json
import random

import pytest
from PIL import Image

from eval.mmbench import main as mmbench_main
from eval.report import build_report, main
from train.shapes import ShapesWorld, render

from test_mmbench import ROWS, write_tsv
from test_pipeline import make_pipe


def geneval_folder(root, world: ShapesWorld, right_per_tag: dict[str, int]):
    """A GenEval output folder: per tag, two prompts with two samples each; the first
    ``right_per_tag[tag]`` of the four samples render the prompt, the rest an empty canvas."""
    rows = {r["tag"]: [] for r in world.prompts("train", n_per_tag=2)}
    for r in world.prompts("train", n_per_tag=2):
        rows[r["tag"]].append(r)
    i = 0
    for tag, metas in rows.items():
        k = 0
        for meta in metas:
            (root / f"{i:05d}/samples").mkdir(parents=True)
            (root / f"{i:05d}/metadata.jsonl").write_text(json.dumps(meta))
            for j in range(2):
                good = k < right_per_tag[tag]
                img = render(world._scene_for(random.Random(i), meta, "train")) if good else \
                    Image.new("RGB", (32, 32), (128, 128, 128))
                img.save(root / f"{i:05d}/samples/{j:04d}.png")
                k += 1
            i += 1
    return rows


def test_report_tables_grids_and_html(tmp_path, tokenizer):
    world = ShapesWorld(resolution=32, seed=0)
    right = {"single_object": 4, "two_object": 3, "counting": 2, "colors": 1, "position": 0, "color_attr": 4}
    tags = geneval_folder(tmp_path / "gen", world, right)
    assert set(tags) == set(right)

    model = make_pipe(tokenizer).save_pretrained(tmp_path / "model")
    tsv = write_tsv(tmp_path / "q.tsv", ROWS)
    mmbench_main(["run", str(tsv), "--model", str(model), "--out", str(tmp_path / "mmb"), "--max-new-tokens", "2"])
    mmb = json.loads((tmp_path / "mmb/summary.json").read_text())

    md = build_report([tmp_path / "gen", tmp_path / "mmb"], tmp_path / "report", prompts_per_task=2).read_text()
    # GenEval: accuracy per task = right samples / 4, overall = their mean (the folder was scored here)
    for tag, n in right.items():
        assert f"| {tag} | {100 * n / 4:.1f} |" in md
    overall = 100 * sum(right.values()) / 4 / 6
    assert f"| **overall** | **{overall:.1f}** |" in md
    # a grid per task: 2 prompts x 2 samples, upscaled 3x with frames
    for tag in right:
        grid = Image.open(tmp_path / f"report/grids/gen_{tag}.png")
        assert grid.size == (2 * (32 * 3 + 4 + 2) + 2, 2 * (32 * 3 + 4 + 2) + 2)
        assert f"![{tag}](grids/gen_{tag}.png)" in md
    # MMBench: the run's own summary, vanilla / circular
    o = mmb["overall"]
    assert f"**{100 * o['vanilla']:.1f} / {100 * o['circular']:.1f}**" in md
    html = (tmp_path / "report/report.html").read_text()
    assert html.count("<img ") == len(right) and html.count("<table>") == 3  # 2 summaries + MMBench l2 table


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        build_report([tmp_path / "missing"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a GenEval"):
        build_report([tmp_path / "empty"], tmp_path / "r")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
