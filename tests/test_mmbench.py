"""eval.mmbench: the TSV reader, CircularEval, answer extraction, resumable runs, the shapes TSVs."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_pipeline import make_pipe

from eval.mmbench import (
    ROTATION, build_prompt, decode_image, extract_answer, main, make_record, make_tsv, read_tsv, score,
    with_rotations,
)
from train.shapes import ShapesWorld


def b64(seed: int, fmt: str = "PNG") -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                  "l2-category", "image")):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


ROWS = [  # 2, 3 and 4 options; a NaN hint, an empty hint, a real hint; row 7 reuses row 3's image
    (3, "What colour?", "nan", "red", "blue", "", "nan", "B", "color", "fp", b64(0)),
    (5, "How many?", "", "one", "two", "three", "", "C", "count", "fp", b64(1, "JPEG")),
    (7, "Which shape?", "Look closely.", "circle", "square", "triangle", "diamond", "D", "shape", "cp", "3"),
]


def test_reader_handles_references_missing_options_hints_and_l2_spelling(tmp_path):
    header = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category", "image")
    items = read_tsv(write_tsv(tmp_path / "a.tsv", ROWS, header))
    assert [it.index for it in items] == [3, 5, 7]
    assert [list(it.options) for it in items] == [["A", "B"], ["A", "B", "C"], ["A", "B", "C", "D"]]
    assert [it.hint for it in items] == ["", "", "Look closely."]
    assert [it.l2_category for it in items] == ["fp", "fp", "cp"]
    assert items[2].image == items[0].image  # the reference resolved to row 3's image
    assert np.array_equal(np.asarray(decode_image(items[2])), np.asarray(decode_image(items[0])))
    assert decode_image(items[1]).size == (32, 32)  # JPEG
    assert build_prompt(items[2], "vlmevalkit") == (
        "Hint: Look closely.\nQuestion: Which shape?\nOptions:\nA. circle\nB. square\nC. triangle\nD. diamond\n"
        "Please select the correct answer from the options above. \n")
    assert build_prompt(items[0], "train") == "What colour?\nA. red\nB. blue\nAnswer:"


@pytest.mark.parametrize("change, message", [
    (lambda rows, header: (rows, header[:7] + header[8:]), "no column 'answer'"),
    (lambda rows, header: ([rows[0], rows[1][:-1] + ("bm90IGFuIGltYWdl" * 8,), rows[2]], header), "index=5"),
    (lambda rows, header: ([rows[0], rows[1], rows[2][:-1] + ("4",)], header), "dangling reference"),
])
def test_reader_errors_name_the_column_or_row(tmp_path, change, message):
    header = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image")
    rows, header = change(list(ROWS), header)
    if "answer" not in header:
        rows = [r[:7] + r[8:] for r in rows]
    with pytest.raises(ValueError, match=message):
        read_tsv(write_tsv(tmp_path / "bad.tsv", rows, header))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rotations_move_the_answer_with_its_option(tmp_path, k):
    texts = ["w", "x", "y", "z"][:k]
    row = (9, "q?", "", *texts, *[""] * (4 - k), "B", "c", "l2", b64(0))
    rot, synthesized = with_rotations(read_tsv(write_tsv(tmp_path / "r.tsv", [row])))
    assert synthesized and [it.index for it in rot] == [9 + r * ROTATION for r in range(k)]
    assert all(it.options[it.answer] == "x" for it in rot)  # the right option travels with its letter
    assert sorted(it.answer for it in rot) == list("ABCD"[:k])  # each letter is right once
    assert list(rot[1].options.values()) == texts[1:] + texts[:1] and rot[1].answer == "A"
    assert rot[k - 1].answer == "ABCD"[2 % k]
    # a file that already has rotated copies is taken as it is
    again, synthesized = with_rotations(rot)
    assert not synthesized and again == rot


def rows_for_scoring(tmp_path):
    return with_rotations(read_tsv(write_tsv(tmp_path / "s.tsv", ROWS)))[0]


def records(rows, outputs):
    sizes = {g: sum(it.group == g for it in rows) for g in {it.group for it in rows}}
    return [make_record(it, sizes[it.group], "", outputs(it)) for it in rows]


def test_oracle_scores_one_circular_and_vanilla(tmp_path):
    s = score(records(rows_for_scoring(tmp_path), lambda it: it.answer))
    assert s["overall"] == {"n": 3, "vanilla": 1.0, "circular": 1.0} and not s["unparsed"]
    assert set(s["category"]) == {"color", "count", "shape"} and set(s["l2-category"]) == {"fp", "cp"}
    assert all(v["circular"] == 1.0 for v in s["category"].values())


def test_one_wrong_rotation_fails_the_group_only_circularly(tmp_path):
    rows = rows_for_scoring(tmp_path)
    # question 7 (4 options): right in rotations 0-2, wrong in rotation 3; question 5 unparsed at rotation 0
    wrong = {7 + 3 * ROTATION: "A or B", 5: ""}
    s = score(records(rows, lambda it: wrong.get(it.index, f"The answer is {it.answer}.")))
    assert s["overall"] == {"n": 3, "vanilla": 2 / 3, "circular": 1 / 3}
    assert s["category"]["shape"] == {"n": 1, "vanilla": 1.0, "circular": 0.0}
    assert s["category"]["count"] == {"n": 1, "vanilla": 0.0, "circular": 0.0}
    assert s["l2-category"]["fp"] == {"n": 2, "vanilla": 0.5, "circular": 0.5}
    assert sorted(u["index"] for u in s["unparsed"]) == [5, 7 + 3 * ROTATION]
    # a group missing a rotation is not scored
    s = score([r for r in records(rows, lambda it: it.answer) if r["index"] != 5 + 2 * ROTATION])
    assert s["overall"]["n"] == 2 and s["incomplete_groups"] == [5]


OPTS = {"A": "red circle", "B": "blue square", "C": "green triangle", "D": "two"}


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is C.", "C"), ("Answer: D", "D"), ("**A**", "A"),
    ("it is a blue square", "B"), ("Green Triangle", "C"),  # unique option text (case-insensitive)
    ("A or B", None), ("", None), ("b", None), ("purple", None), ("BC", None),
    ("red circle or blue square", None),  # two option texts
])
def test_extract_answer(text, want):
    assert extract_answer(text, OPTS) == want


def test_extract_answer_only_counts_the_question_s_letters():
    assert extract_answer("C", {"A": "x", "B": "y"}) is None
    assert extract_answer("C or B", {"A": "x", "B": "y"}) == "B"


def test_run_writes_predictions_resumes_and_refuses_other_settings(tmp_path, tokenizer):
    model = make_pipe(tokenizer).save_pretrained(tmp_path / "model")
    tsv = write_tsv(tmp_path / "t.tsv", ROWS)
    out = tmp_path / "out"
    common = [str(tsv), "--model", str(model), "--out", str(out), "--max-new-tokens", "3", "--batch-size", "4"]
    main(["run", *common, "--limit", "1"])
    pred = out / "predictions.jsonl"
    first = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["index"] for r in first] == [3, 3 + ROTATION]  # question 3's two rotations only
    assert first[0]["prompt"] == "What colour?\nA. red\nB. blue\nAnswer:"
    assert {"output", "pred", "answer", "correct", "rotation"} <= set(first[0])
    # mark a finished row, and leave a half-written line as a killed run would
    first[0]["output"] = "B"
    pred.write_text("\n".join(json.dumps(r) for r in first) + "\n" + '{"index": 5, "outp')
    main(["run", *common])
    done = [json.loads(line) for line in pred.read_text().splitlines()]
    assert sorted(r["index"] for r in done) == sorted(it.index for it in with_rotations(read_tsv(tsv))[0])
    assert done[0]["output"] == "B"  # not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 3 and summary["rows"] == 9 and not summary["incomplete_groups"]
    (out / "summary.json").unlink()
    main(["score", str(out)])
    assert json.loads((out / "summary.json").read_text()) == summary
    with pytest.raises(SystemExit, match="other settings"):
        main(["run", *common, "--template", "vlmevalkit"])


def test_shapes_tsv_round_trips_to_the_world(tmp_path):
    paths = make_tsv(tmp_path / "a", n=10, seed=3)
    again = make_tsv(tmp_path / "b", n=10, seed=3)
    assert [p.name for p in paths] == ["shapes_mmbench.tsv", "shapes_mmbench_heldout.tsv"]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again))  # deterministic
    world = ShapesWorld(resolution=32, seed=3)
    for path, split in zip(paths, ("train", "heldout")):
        items = read_tsv(path)
        assert len(items) == 10
        for it in items:
            q = world.question_example(it.index, split)
            assert (it.question, it.options, it.answer, it.category, it.hint) == (
                q.question, q.options, q.answer, q.category, "")
            assert it.l2_category.startswith(("finegrained_perception", "coarse_perception"))
            assert build_prompt(it, "train") == q.format()  # the training prompt, exactly
            assert np.array_equal(np.asarray(decode_image(it)), np.asarray(q.image))
        assert {it.category for it in items} == {"color", "count", "shape", "position", "existence"}
