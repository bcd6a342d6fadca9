"""eval.geneval: GenEval's folder layout, resume, sharding, the run record, and the shapes scorer.

Generation uses a tiny random pixel-space pipeline saved to disk (2 denoising steps); the scorer is
checked on ground truth: ShapesWorld's own scenes for each prompt must score correct, and the same
scenes edited to break the prompt (colour, count, position, a missing object) must not.
"""
import json
import os
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.geneval import (
    NeedsOfficialEvaluator, format_summary, generate_shard, main, read_metadata, score_folder, sha256_file,
    summarize,
)
from eval.shapes_geneval import HELDOUT_TAGS
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.pipeline import HybridPipeline
from hybrid.tokenizer import special_token_ids
from train.shapes import TAGS, Scene, ShapesWorld, render

ROWS = [  # COCO-style rows as in GenEval's file, and shapes rows
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}],
     "prompt": "a photo of three clocks"},
    {"tag": "position", "include": [{"class": "cow", "count": 1}, {"class": "dog", "count": 1, "position":
                                                                    ["left of", 0]}],
     "prompt": "a photo of a dog left of a cow"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "bird", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red car and a blue bird"},
    {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"},
]


@pytest.fixture(scope="module")
def pipe_dir(tokenizer, tmp_path_factory) -> Path:
    cfg = HybridConfig.from_preset("debug", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
    torch.manual_seed(0)
    model = HybridModel(cfg)
    torch.nn.init.normal_(model.image_out.weight, std=0.05)  # the diffusion head starts at 0
    return HybridPipeline(model, tokenizer).save_pretrained(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def pipe(pipe_dir) -> HybridPipeline:
    return HybridPipeline.from_pretrained(pipe_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def gen_args(meta: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(meta), "--model", str(model), "--out", str(out), "--n-samples", "2", "--steps", "2",
            *extra]


def test_layout_run_record_and_seeds_as_the_official_evaluator_reads_them(pipe_dir, pipe, tmp_path):
    meta = write_jsonl(tmp_path / "meta.jsonl", ROWS)
    out = tmp_path / "out"
    assert main(gen_args(meta, pipe_dir, out, "--grid", "--seed", "7")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002", "00003", "00004", "run.json"]
    for i, row in enumerate(ROWS):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == json.dumps(row)  # json.dump: one line
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(folder / "grid.png").size == (2 * 34 + 2, 36)
        assert not list(folder.glob("*.tmp"))
    # read back the way evaluate_images.py does
    seen = []
    for sub in os.listdir(out):
        if not os.path.isdir(out / sub) or not sub.isdigit():
            continue
        with open(out / sub / "metadata.jsonl") as fp:
            row = json.load(fp)
        for name in os.listdir(out / sub / "samples"):
            if re.match(r"\d+\.png", name):
                im = Image.open(out / sub / "samples" / name)
                assert im.size == (32, 32) and im.mode == "RGB"
                seen.append((int(sub), name, row))
    assert len(seen) == 10 and all(row == ROWS[i] for i, _, row in seen)
    # seed policy: sample j of prompt i is seed + i * n + j
    for i, j in ((0, 0), (3, 1)):
        ref = pipe.generate_image(ROWS[i]["prompt"], num_steps=2, guidance_scale=3.0, seed=[7 + i * 2 + j]).images[0]
        assert np.array_equal(np.asarray(ref), np.asarray(Image.open(out / f"{i:05d}/samples/{j:04d}.png")))
    run = json.loads((out / "run.json").read_text())
    s = run["settings"]
    assert s["n_samples"] == 2 and s["steps"] == 2 and s["guidance_scale"] == 3.0 and s["seed"] == 7
    assert s["scheduler"] == pipe.scheduler.to_dict() and s["resolution"] == 32 and s["dtype"] == "float32"
    assert s["model_sha256"] == {"model.safetensors": sha256_file(pipe_dir / "model.safetensors")}
    assert s["metadata_sha256"] == sha256_file(meta) and "i * n_samples + j" in s["seed_policy"]
    assert run["info"]["model_path"] == str(pipe_dir.resolve()) and run["info"]["versions"]["torch"]
    # COCO classes: the shapes scorer refuses and names the official evaluator
    with pytest.raises(NeedsOfficialEvaluator, match=r"(?s)evaluate_images\.py .*summary_scores\.py"):
        score_folder(out)
    assert main(["score", str(out)]) == 2


def test_resume_redoes_only_incomplete_folders_and_equals_a_fresh_run(pipe, tmp_path):
    rows = ROWS * 2
    kw = dict(n_samples=2, steps=2, seed=0)
    assert generate_shard(pipe, rows, tmp_path / "a", **kw) == list(range(10))
    (tmp_path / "a/00001/samples/0001.png").unlink()
    (tmp_path / "a/00003/metadata.jsonl").unlink()
    (tmp_path / "a/00005/samples/0002.png").write_bytes(b"stale")  # an extra sample: incomplete too
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert generate_shard(pipe, rows, tmp_path / "a", **kw) == [1, 3, 5]
    for p, t in stamps.items():
        folder = p.relative_to(tmp_path / "a").parts[0]
        if folder not in ("00001", "00003", "00005"):
            assert p.stat().st_mtime_ns == t, p
    assert (tmp_path / "a/00003/samples/0000.png").stat().st_mtime_ns != stamps[tmp_path / "a/00003/samples/0000.png"]
    assert generate_shard(pipe, rows, tmp_path / "a", **kw) == []
    generate_shard(pipe, rows, tmp_path / "b", **kw)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_two_shards_write_the_files_one_process_writes(pipe, tmp_path):
    rows = ROWS + ROWS[:2]
    kw = dict(n_samples=3, steps=2, seed=3, batch_size=2)  # batch < n: a prompt spans two calls
    one = generate_shard(pipe, rows, tmp_path / "one", **kw)
    a = generate_shard(pipe, rows, tmp_path / "two", process_index=0, num_processes=2, **kw)
    b = generate_shard(pipe, rows, tmp_path / "two", process_index=1, num_processes=2, **kw)
    assert a == [0, 2, 4, 6] and b == [1, 3, 5] and one == list(range(7))
    assert tree(tmp_path / "one") == tree(tmp_path / "two") and len(tree(tmp_path / "one")) == 7 * 4


def test_other_settings_on_resume_are_refused_unless_overwrite(pipe_dir, tmp_path, capsys):
    meta = write_jsonl(tmp_path / "meta.jsonl", ROWS[:2])
    out = tmp_path / "out"
    assert main(gen_args(meta, pipe_dir, out, "--limit", "1")) == 0
    assert main(gen_args(meta, pipe_dir, out)) == 0  # a larger --limit resumes the same run
    assert (out / "00001/metadata.jsonl").is_file()
    capsys.readouterr()
    assert main(gen_args(meta, pipe_dir, out, "--cfg", "2.0")) == 2
    err = capsys.readouterr().err
    assert "guidance_scale: 3.0 in run.json, 2.0 now" in err and "--overwrite" in err
    write_jsonl(meta, ROWS[1:3])
    assert main(gen_args(meta, pipe_dir, out)) == 2 and "metadata_sha256" in capsys.readouterr().err
    assert main(gen_args(meta, pipe_dir, out, "--limit", "1", "--overwrite")) == 0
    assert json.loads((out / "00000/metadata.jsonl").read_text()) == ROWS[1] and not (out / "00001").exists()


def _wrong_scenes(world: ShapesWorld, meta: dict, scene: Scene) -> dict[str, Scene]:
    """Edits of a scene satisfying ``meta`` that each break it."""
    objs, tag = list(scene.objects), meta["tag"]
    named = [o for o in objs if o.shape in {r["class"] for r in meta["include"]}]
    other = lambda c: next(x for x in world.colors if x != c)  # noqa: E731
    wrong = {"missing object": Scene(tuple(o for o in objs if o is not named[-1]), scene.resolution)}
    if tag == "counting":  # one too many: a further copy wherever it fits
        r, size = scene.resolution, world.min_size
        for x0 in range(1, r - size):
            for y0 in range(1, r - size):
                extra = replace(named[0], cx=x0 + size / 2, cy=y0 + size / 2, size=size)
                if world._fits(extra, objs):
                    wrong["count + 1"] = Scene((*objs, extra), r)
                    break
            if "count + 1" in wrong:
                break
        assert "count + 1" in wrong
    if tag in ("colors", "color_attr"):
        wrong["wrong colour"] = Scene(tuple(replace(o, color=other(o.color)) if o is named[0] else o for o in objs),
                                      scene.resolution)
    if tag == "color_attr":  # both present, colours bound to the wrong shapes
        a, b = named
        wrong["colours swapped"] = Scene((replace(a, color=b.color), replace(b, color=a.color)), scene.resolution)
    if tag == "position":  # the two objects trade places
        a, b = named
        wrong["positions swapped"] = Scene((replace(a, cx=b.cx, cy=b.cy, size=b.size),
                                            replace(b, cx=a.cx, cy=a.cy, size=a.size)), scene.resolution)
    return wrong


def test_scorer_on_ground_truth_renders_right_and_deliberately_wrong(tmp_path):
    assert main(["make-metadata", "--out", str(tmp_path / "meta"), "--per-tag", "3"]) == 0
    train = read_metadata(tmp_path / "meta/shapes_geneval.jsonl")
    held = read_metadata(tmp_path / "meta/shapes_geneval_heldout.jsonl")
    world = ShapesWorld(resolution=32, seed=0)
    assert {r["tag"] for r in train} == set(TAGS) and {r["tag"] for r in held} == set(HELDOUT_TAGS)
    pairs = lambda r: {(q.get("color"), q["class"]) for q in r["include"]}  # noqa: E731
    assert all(pairs(r) & world.heldout_pairs for r in held) and not any(pairs(r) & world.heldout_pairs for r in train)
    out, expect, kinds = tmp_path / "gen", {}, set()
    for i, (split, meta) in enumerate([("train", r) for r in train] + [("heldout", r) for r in held]):
        scene = world._scene_for(random.Random(i), meta, split)
        variants = {"right": scene} | _wrong_scenes(world, meta, scene)
        (out / f"{i:05d}/samples").mkdir(parents=True)
        (out / f"{i:05d}/metadata.jsonl").write_text(json.dumps(meta))
        for j, (kind, sc) in enumerate(variants.items()):
            render(sc).save(out / f"{i:05d}/samples/{j:04d}.png")
            expect[str(out / f"{i:05d}/samples/{j:04d}.png")] = (kind, meta["tag"])
            kinds.add((meta["tag"], kind))
    assert {"wrong colour", "colours swapped", "positions swapped", "count + 1"} < {k for _, k in kinds}
    assert {t for t, k in kinds if k == "missing object"} == set(TAGS)
    summary = score_folder(out)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(expect) == summary["total_images"]
    for r in results:
        kind, tag = expect[r["filename"]]
        assert r["correct"] == (kind == "right"), (kind, r)
        # GenEval's fields, then the clutter guard's
        assert set(r) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details",
                          "strict", "extra", "empty", "noisy"}
        assert r["strict"] <= r["correct"]
        assert isinstance(r["metadata"], str) and json.loads(r["metadata"])["tag"] == tag == r["tag"]
        assert isinstance(r["details"], str) and (r["reason"] == "") == r["correct"]
    assert json.loads((out / "summary.json").read_text())["total_images"] == len(results)


def test_summary_overall_is_the_unweighted_mean_of_the_tasks(capsys):
    def res(tag, meta, ok):
        return {"tag": tag, "metadata": meta, "correct": ok}
    results = ([res("single_object", "m1", True), res("single_object", "m1", False), res("single_object", "m2", True),
                res("single_object", "m2", True)] + [res("counting", "m3", False), res("counting", "m3", True)]
               + [res("position", "m4", False)] * 3)
    s = summarize(results)
    assert s["tasks"]["single_object"] == {"accuracy": 0.75, "correct": 3, "total": 4, "ci95": [0.3006, 0.9544]}
    assert s["overall"] == pytest.approx((0.75 + 0.5 + 0.0) / 3) and s["correct_images"] == pytest.approx(4 / 9)
    assert s["total_prompts"] == 4 and s["correct_prompts"] == 0.75
    text = format_summary(s).splitlines()
    assert text[:6] == ["Summary", "=======", "Total images: 9", "Total prompts: 4", "% correct images: 44.44%",
                        "% correct prompts: 75.00%"]
    assert text[9:12] == ["single_object    = 75.00% (3 / 4)", "counting         = 50.00% (1 / 2)",
                          "position         = 0.00% (0 / 3)"]
    assert text[-1] == "Overall score (avg. over tasks): 0.41667"
