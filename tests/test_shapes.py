"""Tests for the shapes world generator (train/shapes.py).

The GenEval templates are written out here by hand on purpose: the tests must not depend on the
reference metadata file, and spelling the grammar out twice catches drift in either place.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from train.detect import detect, evaluate, relative_position
from train.shapes import (COLORS, DEFAULT_HELDOUT_PAIRS, QUESTION_CATEGORIES, RELATIONS, SHAPES, TAGS,
                          Scene, ShapeObject, ShapesWorld, render, shape_mask)

WORLD = ShapesWorld()
NUM = {"two": 2, "three": 3, "four": 4}
SHAPE_RE = "(circle|square|triangle|diamond)"
COLOR_RE = "(" + "|".join(COLORS) + ")"
ART = "(a|an)"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def expected_metadata(prompt: str, tag: str) -> dict:
    """Parse ``prompt`` with GenEval's templates and rebuild the metadata row it implies."""
    if tag == "single_object":
        m = re.fullmatch(f"a photo of {ART} {SHAPE_RE}", prompt)
        assert m and m[1] == article(m[2]), prompt
        return {"tag": tag, "include": [{"class": m[2], "count": 1}], "prompt": prompt}
    if tag == "two_object":
        m = re.fullmatch(f"a photo of {ART} {SHAPE_RE} and {ART} {SHAPE_RE}", prompt)
        assert m and m[1] == article(m[2]) and m[3] == article(m[4]) and m[2] != m[4], prompt
        return {"tag": tag, "include": [{"class": m[2], "count": 1}, {"class": m[4], "count": 1}],
                "prompt": prompt}
    if tag == "counting":
        m = re.fullmatch(f"a photo of (two|three|four) {SHAPE_RE}s", prompt)
        assert m, prompt
        n = NUM[m[1]]
        return {"tag": tag, "include": [{"class": m[2], "count": n}],
                "exclude": [{"class": m[2], "count": n + 1}], "prompt": prompt}
    if tag == "colors":
        m = re.fullmatch(f"a photo of {ART} {COLOR_RE} {SHAPE_RE}", prompt)
        assert m and m[1] == article(m[2]), prompt
        return {"tag": tag, "include": [{"class": m[3], "count": 1, "color": m[2]}], "prompt": prompt}
    if tag == "position":
        m = re.fullmatch(f"a photo of {ART} {SHAPE_RE} (left of|right of|above|below) {ART} {SHAPE_RE}", prompt)
        assert m and m[1] == article(m[2]) and m[4] == article(m[5]) and m[2] != m[5], prompt
        return {"tag": tag, "include": [{"class": m[5], "count": 1},
                                        {"class": m[2], "count": 1, "position": [m[3], 0]}], "prompt": prompt}
    m = re.fullmatch(f"a photo of {ART} {COLOR_RE} {SHAPE_RE} and {ART} {COLOR_RE} {SHAPE_RE}", prompt)
    assert m and m[1] == article(m[2]) and m[4] == article(m[5]), prompt
    assert m[2] != m[5] and m[3] != m[6], prompt  # distinct colours and classes, as in GenEval
    return {"tag": tag, "include": [{"class": m[3], "count": 1, "color": m[2]},
                                    {"class": m[6], "count": 1, "color": m[5]}], "prompt": prompt}


def digest(ex) -> str:
    return hashlib.sha256(ex.image.tobytes() + ex.prompt.encode()).hexdigest()


def test_determinism_and_indexing() -> None:
    other = ShapesWorld(seed=0)
    for i in range(12):
        a, b = WORLD.caption_example(i), other.caption_example(i)
        assert a.prompt == b.prompt and a.image.tobytes() == b.image.tobytes() and a.scene == b.scene
        qa, qb = WORLD.question_example(i), other.question_example(i)
        assert (qa.question, qa.options, qa.answer) == (qb.question, qb.options, qb.answer)
        da, db = WORLD.interleaved_example(i), other.interleaved_example(i)
        assert [x if isinstance(x, str) else x.tobytes() for x in da] == \
               [x if isinstance(x, str) else x.tobytes() for x in db]
    assert len({digest(WORLD.caption_example(i)) for i in range(50)}) == 50
    assert digest(ShapesWorld(seed=1).caption_example(0)) != digest(WORLD.caption_example(0))
    assert digest(WORLD.caption_example(3, "heldout")) != digest(WORLD.caption_example(3, "train"))
    # tag=None picks TAGS[index % 6] and is then identical to asking for that tag explicitly
    assert digest(WORLD.caption_example(9)) == digest(WORLD.caption_example(9, tag=TAGS[9 % 6]))


def test_determinism_across_processes() -> None:
    """Seeds come from SHA-256, not hash(): a different PYTHONHASHSEED gives the same data."""
    code = ("import hashlib; from train.shapes import ShapesWorld; e = ShapesWorld().caption_example(7); "
            "print(hashlib.sha256(e.image.tobytes() + e.prompt.encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(WORLD.caption_example(7))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_prompts_follow_geneval_templates(split: str) -> None:
    for tag in TAGS:
        for i in range(60):
            ex = WORLD.caption_example(i, split, tag)
            assert ex.tag == tag and ex.prompt == ex.metadata["prompt"]
            want = expected_metadata(ex.prompt, tag)
            assert ex.metadata == want
            assert list(ex.metadata) == list(want)  # GenEval's key order: tag, include, [exclude], prompt


def test_an_before_vowels() -> None:
    prompts = {WORLD.caption_example(i, tag=t).prompt for i in range(200) for t in ("colors", "color_attr")}
    assert any(p.startswith("a photo of an orange ") for p in prompts)
    assert any(" and an orange " in p for p in prompts)
    assert not any(" a orange" in p for p in prompts)


@pytest.mark.parametrize("world,split,n", [
    (WORLD, "train", 300), (WORLD, "heldout", 100), (ShapesWorld(distractor_prob=0.6), "train", 100)])
def test_scenes_satisfy_their_prompts(world: ShapesWorld, split: str, n: int) -> None:
    for tag in TAGS:
        for i in range(n):
            ex = world.caption_example(i, split, tag)
            ok, reason = evaluate(detect(ex.image), ex.metadata)
            assert ok, (ex.prompt, reason, ex.scene)
            objs = ex.scene.objects
            assert 1 <= len(objs) <= 4
            for req in ex.metadata["include"]:  # named shapes appear exactly as often as stated
                same = [o for o in objs if o.shape == req["class"]]
                assert len(same) == req["count"]
                if "color" in req:
                    assert same[0].color == req["color"]
            if tag == "position":  # generator demands the single stated relation
                a, b = (next(o for o in objs if o.shape == r["class"]) for r in ex.metadata["include"][::-1])
                assert relative_position(a, b) == {ex.metadata["include"][1]["position"][0]}


def test_distractors_are_unnamed_shapes() -> None:
    world = ShapesWorld(distractor_prob=1.0)
    extra = 0
    for i in range(120):
        ex = world.caption_example(i)
        named = {r["class"] for r in ex.metadata["include"]}
        n_named = sum(r["count"] for r in ex.metadata["include"])
        assert all(o.shape in named for o in ex.scene.objects[:n_named])
        assert all(o.shape not in named for o in ex.scene.objects[n_named:])
        extra += len(ex.scene.objects) - n_named
    assert extra > 50


def test_objects_never_overlap_and_sizes_vary() -> None:
    sizes = set()
    for i in range(300):
        objs = WORLD.caption_example(i).scene.objects
        sizes.update(o.size for o in objs)
        for a, b in itertools.combinations(objs, 2):
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            assert ax1 + 2 <= bx0 or bx1 + 2 <= ax0 or ay1 + 2 <= by0 or by1 + 2 <= ay0
    assert sizes == set(range(WORLD.min_size, WORLD.max_size + 1))


def _heldout_phrase(text: str, pairs) -> bool:
    return any(re.search(rf"\b{c} {s}(s|es)?\b", text) for c, s in pairs)


def test_heldout_pairs_never_in_train() -> None:
    pairs = WORLD.heldout_pairs
    assert pairs == frozenset(DEFAULT_HELDOUT_PAIRS) and {s for _, s in pairs} == set(SHAPES)
    for i in range(1200):
        ex = WORLD.caption_example(i)
        assert not any((o.color, o.shape) in pairs for o in ex.scene.objects)
        assert not _heldout_phrase(ex.prompt, pairs)
    for i in range(300):
        q = WORLD.question_example(i)
        assert not any((o.color, o.shape) in pairs for o in q.scene.objects)
        assert not _heldout_phrase(q.format(), pairs)
        doc = WORLD.interleaved_example(i)
        assert not _heldout_phrase(" ".join(x for x in doc if isinstance(x, str)), pairs)
        for img in doc[1::2]:
            assert not any((d.color, d.shape) in pairs for d in detect(img))
    assert not any(_heldout_phrase(t, pairs) for t in WORLD.corpus_texts(300)[1:])


def test_heldout_split_contains_heldout_pairs() -> None:
    pairs = WORLD.heldout_pairs
    seen = set()
    for i in range(300):
        ex = WORLD.caption_example(i, "heldout")
        present = {(o.color, o.shape) for o in ex.scene.objects}
        assert present & pairs
        seen |= present & pairs
        if ex.tag in ("colors", "color_attr"):
            assert _heldout_phrase(ex.prompt, pairs)
        q = WORLD.question_example(i, "heldout")
        assert {(o.color, o.shape) for o in q.scene.objects} & pairs
        doc = WORLD.interleaved_example(i, "heldout")
        assert _heldout_phrase(doc[0], pairs)
    assert seen == pairs


def test_questions_are_well_formed_and_correct() -> None:
    cats = set()
    for split in ("train", "heldout"):
        for i in range(250):
            q = WORLD.question_example(i, split)
            cats.add(q.category)
            assert list(q.options) == ["A", "B", "C", "D"] and q.answer in q.options
            assert len(set(q.options.values())) == 4
            objs, right = q.scene.objects, q.options[q.answer]
            if q.category == "color":
                shape = re.fullmatch(r"What color is the (\w+)\?", q.question)[1]
                (obj,) = [o for o in objs if o.shape == shape]
                assert right == obj.color
            elif q.category == "count":
                shape = re.fullmatch(r"How many (\w+)s are in the image\?", q.question)[1]
                assert int(right) == sum(o.shape == shape for o in objs)
            elif q.category == "shape":
                color = re.fullmatch(r"What shape is the (\w+) object\?", q.question)[1]
                (obj,) = [o for o in objs if o.color == color]
                assert right == obj.shape and set(q.options.values()) <= set(SHAPES)
            elif q.category == "position":
                m = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q.question)
                (a,) = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
                (b,) = [o for o in objs if (o.color, o.shape) == (m[3], m[4])]
                assert relative_position(a, b) == {right} and set(q.options.values()) == set(RELATIONS)
            else:
                present = {f"{article(o.color)} {o.color} {o.shape}" for o in objs}
                assert right in present and not (set(q.options.values()) - {right}) & present
            assert q.format().endswith("\nAnswer:") and "\nC. " in q.format()
    assert cats == set(QUESTION_CATEGORIES)


def test_interleaved_documents_alternate_and_are_grounded() -> None:
    for split in ("train", "heldout"):
        for i in range(60):
            doc = WORLD.interleaved_example(i, split)
            assert len(doc) in (4, 6)
            assert all(isinstance(x, str) for x in doc[0::2])
            assert all(isinstance(x, Image.Image) and x.size == (32, 32) for x in doc[1::2])
            dets = [{(d.color, d.shape): d for d in detect(img)} for img in doc[1::2]]
            m = re.fullmatch(r"Here is an? (\w+) (\w+)\.", doc[0])
            assert set(dets[0]) == {(m[1], m[2])}
            for text, before, after in zip(doc[2::2], dets, dets[1:]):
                if m := re.fullmatch(r"Now the (\w+) (\w+) moves (to the left|to the right|up|down)\.", text):
                    rel = {"to the left": "left of", "to the right": "right of", "up": "above", "down": "below"}[m[3]]
                    key = (m[1], m[2])
                    assert rel in relative_position(after[key], before[key])
                elif m := re.fullmatch(r"Then an? (\w+) (\w+) appears (left of|right of|above|below) "
                                       r"the (\w+) (\w+)\.", text):
                    new, anchor = (m[1], m[2]), (m[4], m[5])
                    assert new not in before and m[3] in relative_position(after[new], after[anchor])
                else:
                    m = re.fullmatch(r"Now the (\w+) (\w+) turns (\w+)\.", text)
                    assert m and (m[1], m[2]) not in after
                    assert after[(m[3], m[2])].bbox == before[(m[1], m[2])].bbox


def test_prompts_match_caption_examples() -> None:
    rows = WORLD.prompts("heldout", n_per_tag=5)
    assert len(rows) == 30 and [r["tag"] for r in rows] == [t for t in TAGS for _ in range(5)]
    for j, row in enumerate(rows):
        assert row == WORLD.caption_example(j % 5, "heldout", row["tag"]).metadata
    uniq = WORLD.prompts("train", n_per_tag=50, tags=["single_object"], unique=True)
    assert sorted(r["prompt"] for r in uniq) == sorted(f"a photo of a {s}" for s in SHAPES)
    assert all(r["include"][0]["color"] in COLORS for r in WORLD.prompts("train", 20, tags=["colors"]))


def test_corpus_texts_cover_vocabulary() -> None:
    texts = WORLD.corpus_texts(60)
    assert len(texts) == 61 and all(isinstance(t, str) and t for t in texts)
    vocab = set(" ".join(texts).replace("?", " ").replace(".", " ").split())
    for split in ("train", "heldout"):
        for row in WORLD.prompts(split, 20):
            assert set(row["prompt"].split()) <= vocab, row["prompt"]


@pytest.mark.parametrize("resolution", [24, 64, 128])
def test_other_resolutions(resolution: int) -> None:
    world = ShapesWorld(resolution=resolution, seed=3)
    for i in range(24):
        ex = world.caption_example(i)
        assert ex.image.size == (resolution, resolution)
        dets = detect(ex.image)
        assert sorted((d.shape, d.color, d.bbox) for d in dets) == \
               sorted((o.shape, o.color, o.bbox) for o in ex.scene.objects)
        assert evaluate(dets, ex.metadata)[0]


def test_render_is_exact_palette() -> None:
    scene = Scene((ShapeObject.from_corner("triangle", "red", 3, 4, 9),), 32)
    arr = np.asarray(render(scene))
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) == 2  # background + red, no blending
    assert scene.objects[0].bbox == (3, 4, 12, 13) and scene.objects[0].cx == 7.5


def test_shape_masks_distinct_and_tight() -> None:
    for s in range(6, 129):
        masks = [shape_mask(x, s, s) for x in SHAPES]
        assert all(not np.array_equal(a, b) for a, b in itertools.combinations(masks, 2)), s
        for m in masks:
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="split"):
        WORLD.caption_example(0, split="val")
    with pytest.raises(ValueError, match="tag"):
        WORLD.caption_example(0, tag="spatial")
    with pytest.raises(ValueError, match="split"):
        WORLD.question_example(0, split="test")
    with pytest.raises(ValueError, match="category"):
        WORLD.question_example(0, category="ocr")
    with pytest.raises(ValueError, match="tag"):
        WORLD.prompts("train", 3, tags=["nope"])
    with pytest.raises(ValueError, match="too small"):
        ShapesWorld(resolution=16)
    with pytest.raises(ValueError, match="colour"):
        ShapesWorld(colors=["red", "teal", "blue", "green"])
    with pytest.raises(ValueError, match="heldout_pairs"):
        ShapesWorld(heldout_pairs=[("red", "circle")])  # other shapes would have none
    with pytest.raises(ValueError):
        ShapeObject("hexagon", "red", 5, 5, 4)
    with pytest.raises(ValueError, match="fit"):
        render(Scene((ShapeObject.from_corner("square", "red", 28, 0, 8),), 32))
