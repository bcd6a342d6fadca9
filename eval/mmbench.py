"""MMBench-style multiple choice: the official TSV format, CircularEval and exact-matching answers.

    # shapes-world questions in the official format (deterministic): DIR/shapes_mmbench.tsv (train
    # split: questions of the kind the model trained on) and DIR/shapes_mmbench_heldout.tsv
    python -m eval.mmbench make-tsv --out data/mmbench --n 200 --seed 0
    # CPU-sized (2 cores, ~30 s): 20 held-out questions x 4 rotations on the tiny model
    python -m eval.mmbench make-tsv --out /tmp/mmb --n 20
    python -m eval.mmbench run /tmp/mmb/shapes_mmbench_heldout.tsv --model runs/tiny_und/final --out /tmp/mmb/heldout
    # the real benchmark (VLMEvalKit's MMBench_DEV_EN.tsv, rotated copies included) on a GPU
    python -m eval.mmbench run MMBench_DEV_EN.tsv --model DIR --out OUT --template vlmevalkit --device cuda --dtype bf16
    python -m eval.mmbench score OUT      # recompute OUT/summary.json from OUT/predictions.jsonl

TSV (as VLMEvalKit reads it): columns index, question, hint, A, B, [C, D, ...], answer, category,
l2-category (any case, e.g. L2-category), image. ``image`` is a base64 PNG/JPEG, or, when at most
64 characters long, the index of the row whose image it shares. Empty cells and pandas' NA
spellings ("nan", "NaN", "None", "NA", ...) count as missing: no hint, or no such option.

CircularEval: rows are grouped by ``index % 1_000_000``; a file without rotated copies (no index
>= 1e6) gets them here: for k options, rotation r puts option (i + r) % k at letter i (the answer
letter moves with it) and has index ``original + r * 1_000_000``. A question counts as right
circularly only if every rotation is right; "vanilla" scores rotation 0 alone. ``--limit N``
takes the first N questions with all their rotations; a group with missing rotations (a killed
run) is left out of the scores and listed as incomplete.

Prompt templates (the image always comes first, as one understanding-path input image):
``train`` (default): what the project trains on (train.shapes.QuestionExample.format), i.e. the
question, one "X. option" line per option, then "Answer:" (a hint, if any, as a first line
"Hint: ..."); ``vlmevalkit``: VLMEvalKit's MMBench prompt ("Hint: ...\\nQuestion: ...\\nOptions:\\n
A. ...\\nPlease select the correct answer from the options above. \\n").

Answers are extracted as VLMEvalKit's exact-matching path does (``extract_answer``); anything
unparsed counts as wrong and is listed in the summary. Outputs: OUT/predictions.jsonl (a line per
row, written as produced; a rerun skips rows already there), OUT/run.json (settings; a rerun with
different ones is refused), OUT/summary.json and a printed table.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

ROTATION = 1_000_000
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEMPLATES = ("train", "vlmevalkit")
REQUIRED = ("index", "question", "answer", "image", "A", "B")
# pandas' default NA strings: VLMEvalKit reads TSVs with pd.read_csv, so these are missing values there
NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
      "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
L2_OF = {"color": "finegrained_perception (instance-level)", "shape": "finegrained_perception (instance-level)",
         "count": "finegrained_perception (instance-level)", "position": "finegrained_perception (cross-instance)",
         "existence": "coarse_perception"}  # shapes-world categories -> MMBench's l2 names
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


@dataclass(frozen=True)
class Item:
    """One TSV row (or a synthesized rotation): ``options`` are letters A.. in order, ``image`` base64."""
    index: int
    question: str
    options: dict[str, str]
    answer: str
    image: str
    hint: str = ""
    category: str = ""
    l2_category: str = ""

    @property
    def group(self) -> int:
        return self.index % ROTATION

    @property
    def rotation(self) -> int:
        return self.index // ROTATION


# ------------------------------------------------------------------------------------ reading
def read_tsv(path: str | Path) -> list[Item]:
    """Rows of an MMBench TSV with image references resolved; errors name the file and row."""
    path = Path(path)
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default limit
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty")
        cols = [h if h in LETTERS else h.strip().lower() for h in header]  # as VLMEvalKit: L2-category -> l2-category
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(map(repr, missing))} (columns: {header})")
        raw: list[tuple[int, dict[str, str]]] = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(cols):
                raise ValueError(f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(cols)}")
            raw.append((reader.line_num, dict(zip(cols, row))))
    letters = [c for c in cols if len(c) == 1 and c in LETTERS]
    items: list[Item] = []
    images: dict[int, str] = {}
    for line, r in raw:
        try:
            index = int(r["index"])
        except ValueError:
            raise ValueError(f"{path} line {line}: index {r['index']!r} is not an integer") from None
        where = f"{path} row index={index} (line {line})"
        if index in images:
            raise ValueError(f"{where}: duplicate index")
        options = {k: r[k] for k in sorted(letters) if r[k].strip() not in NA}
        if list(options) != list(LETTERS[:len(options)]) or len(options) < 2:
            raise ValueError(f"{where}: options {list(options)} are not at least A, B and without gaps")
        if r["answer"].strip() not in options:
            raise ValueError(f"{where}: answer {r['answer']!r} is not one of the options {list(options)}")
        hint = r.get("hint", "")
        images[index] = r["image"]
        items.append(Item(index, r["question"], options, r["answer"].strip(), r["image"],
                          "" if hint.strip() in NA else hint, r.get("category", ""), r.get("l2-category", "")))
    checked: set[int] = set()
    for n, it in enumerate(items):
        where = f"{path} row index={it.index}"
        target = it.index
        if len(it.image) <= 64:  # VLMEvalKit: a short image field is the index of another row
            ref = it.image.strip()
            target = int(ref) if ref.lstrip("-").isdigit() else None
            if target not in images or len(images[target]) <= 64:
                raise ValueError(f"{where}: image {it.image!r} refers to no row with an image (dangling reference)")
            items[n] = replace(it, image=images[target])
        if target not in checked:
            try:
                with Image.open(io.BytesIO(base64.b64decode(images[target]))) as im:
                    im.verify()
            except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{where}: the image is not a base64 PNG/JPEG ({e})") from None
            checked.add(target)
    return items


def decode_image(item: Item) -> Image.Image:
    """The row's image, converted as VLMEvalKit's decode_base64_to_image converts it."""
    image = Image.open(io.BytesIO(base64.b64decode(item.image)))
    image.load()
    return image.convert("RGB") if image.mode in ("RGBA", "P", "LA", "CMYK") else image


def with_rotations(items: Sequence[Item]) -> tuple[list[Item], bool]:
    """The file's rows if it has rotated copies, else every item in its k rotations (and True)."""
    if any(it.index >= ROTATION for it in items):
        firsts = {it.index for it in items if it.rotation == 0}
        orphan = next((it for it in items if it.group not in firsts), None)
        if orphan is not None:
            raise ValueError(f"row index={orphan.index} is a rotated copy of {orphan.group}, which has no row")
        return list(items), False
    out = []
    for it in items:
        keys, vals = list(it.options), list(it.options.values())
        k, a = len(keys), keys.index(it.answer)
        out += [replace(it, index=it.index + r * ROTATION, options=dict(zip(keys, vals[r:] + vals[:r])),
                        answer=keys[(a - r) % k]) for r in range(k)]
    return out, True


# ------------------------------------------------------------------------------------ prompts, answers
def build_prompt(item: Item, template: str = "train") -> str:
    opts = [f"{k}. {v}" for k, v in item.options.items()]
    if template == "train":  # QuestionExample.format(), with an optional hint line first
        return "\n".join(([f"Hint: {item.hint}"] if item.hint else []) + [item.question] + opts + ["Answer:"])
    if template == "vlmevalkit":  # ImageMCQDataset.build_prompt
        hint = f"Hint: {item.hint}\n" if item.hint else ""
        return (f"{hint}Question: {item.question}\nOptions:\n" + "".join(o + "\n" for o in opts)
                + "Please select the correct answer from the options above. \n")
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def extract_answer(output: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer``: (1) with ``.()[],:;!*#{}`` turned into spaces, exactly one option
    letter among the whitespace-separated words ("B", "(B)", "The answer is C.", "Answer: D");
    else (2) exactly one option text inside the output (case-insensitive). None: unparsed."""
    words = output.translate(_PUNCT).split()
    hits = [k for k in options if k in words]
    if len(hits) == 1:
        return hits[0]
    low = output.lower()
    hits = [k for k, v in options.items() if v.lower() in low]
    return hits[0] if len(hits) == 1 else None


def make_record(item: Item, group_size: int, prompt: str, output: str, error: str | None = None) -> dict:
    pred = extract_answer(output, item.options)
    rec = {"index": item.index, "group": item.group, "rotation": item.rotation, "group_size": group_size,
           "category": item.category, "l2-category": item.l2_category, "options": item.options, "prompt": prompt,
           "output": output, "pred": pred, "answer": item.answer, "correct": pred == item.answer}
    return rec | ({"error": error} if error else {})


# ------------------------------------------------------------------------------------ scoring
def score(records: Iterable[dict]) -> dict:
    """Vanilla (rotation 0) and circular (all rotations) accuracy over the complete groups, overall
    and per category / l2-category; answers are re-extracted from the raw outputs."""
    groups: dict[int, dict[int, dict]] = defaultdict(dict)
    unparsed = []
    for r in records:
        r = r | {"pred": extract_answer(r["output"], r["options"])}
        groups[r["group"]][r["rotation"]] = r
        if r["pred"] is None:
            unparsed.append({"index": r["index"], "output": r["output"]})
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # n, vanilla hits, circular hits
    incomplete = []
    for g, rows in sorted(groups.items()):
        if 0 not in rows or len(rows) != rows[0]["group_size"]:
            incomplete.append(g)
            continue
        first = rows[0]
        hit = [first["pred"] == first["answer"], all(r["pred"] == r["answer"] for r in rows.values())]
        for key in [("overall", "")] + [(c, first[c]) for c in ("category", "l2-category") if first[c]]:
            t = tally[key]
            t[0], t[1], t[2] = t[0] + 1, t[1] + hit[0], t[2] + hit[1]

    def acc(t: list[int]) -> dict:
        return {"n": t[0], "vanilla": t[1] / t[0], "circular": t[2] / t[0]}
    summary: dict = {"overall": acc(tally[("overall", "")]) if ("overall", "") in tally else {"n": 0}}
    for c in ("category", "l2-category"):
        summary[c] = {name: acc(t) for (kind, name), t in sorted(tally.items()) if kind == c}
    return summary | {"rows": sum(len(v) for v in groups.values()), "incomplete_groups": incomplete,
                      "unparsed": unparsed}


def format_table(summary: dict) -> str:
    lines = [f"{'':48s} {'n':>5s} {'vanilla':>8s} {'circular':>8s}"]
    entries = [("overall", summary["overall"])] + [(f"{c}/{k}", v) for c in ("category", "l2-category")
                                                   for k, v in summary[c].items()]
    for name, v in entries:
        if v["n"]:
            lines.append(f"{name[:48]:48s} {v['n']:5d} {v['vanilla']:8.3f} {v['circular']:8.3f}")
    lines.append(f"unparsed outputs: {len(summary['unparsed'])} of {summary['rows']} rows; "
                 f"incomplete groups (not scored): {len(summary['incomplete_groups'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ running
def load_records(path: Path) -> list[dict]:
    """predictions.jsonl, first cutting a half-written last line (a killed run) off the file."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _model_fingerprint(model: Path) -> str:
    files = sorted(p for p in model.rglob("*") if p.is_file())
    listing = "\n".join(f"{p.relative_to(model)} {p.stat().st_size}" for p in files)
    return hashlib.sha256(listing.encode() + _sha256([model / "config.json"]).encode()).hexdigest()


def _generate(pipe, items: list[Item], prompts: list[str], max_new_tokens: int) -> list[tuple[str, str | None]]:
    """Greedy answers for one batch; a prompt too long for the context gets ("", the error)."""
    try:
        out = pipe.generate_text(prompts, images=[[decode_image(it)] for it in items],
                                 max_new_tokens=max_new_tokens, temperature=0.0)
        return [(t, None) for t in out.texts]
    except ValueError as e:
        if "context" not in str(e):
            raise
        if len(items) == 1:
            return [("", str(e))]
        return [r for it, p in zip(items, prompts) for r in _generate(pipe, [it], [p], max_new_tokens)]


def run(tsv: str | Path, model: str | Path, out: str | Path, template: str = "train", batch_size: int = 8,
        max_new_tokens: int = 8, limit: int | None = None, device: str | None = None,
        dtype: str = "fp32") -> dict:
    """Answer every row (all rotations of the first ``limit`` questions), appending to
    OUT/predictions.jsonl as it goes, then score; a rerun continues where a killed one stopped."""
    import torch

    from hybrid.pipeline import HybridPipeline

    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    tsv, model, out = Path(tsv), Path(model), Path(out)
    rows, synthesized = with_rotations(read_tsv(tsv))
    order = {g: n for n, g in enumerate(dict.fromkeys(it.group for it in rows))}
    keep = {g for g, n in order.items() if limit is None or n < limit}
    sizes = Counter(it.group for it in rows)
    rows = sorted((it for it in rows if it.group in keep), key=lambda it: (order[it.group], it.rotation))
    settings = {"tsv": str(tsv.resolve()), "tsv_sha256": _sha256([tsv]), "model": str(model.resolve()),
                "model_fingerprint": _model_fingerprint(model), "template": template,
                "max_new_tokens": max_new_tokens, "dtype": dtype, "rotations_synthesized": synthesized}
    out.mkdir(parents=True, exist_ok=True)
    run_file, pred_file = out / "run.json", out / "predictions.jsonl"
    if run_file.exists():
        old = json.loads(run_file.read_text())["settings"]
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds a run with other settings (was, now): {diff}; use another --out")
    run_file.write_text(json.dumps({"settings": settings, "batch_size": batch_size, "limit": limit}, indent=2) + "\n")
    done = {r["index"] for r in load_records(pred_file)}
    todo = [it for it in rows if it.index not in done]
    print(f"{len(rows)} rows ({len(keep)} questions); {len(rows) - len(todo)} already answered in {pred_file}")
    if todo:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = HybridPipeline.from_pretrained(model, device, {"fp32": None, "bf16": torch.bfloat16}[dtype])
        if pipe.siglip is None:
            raise ValueError(f"{model} has no siglip/ understanding encoder: it cannot read the images")
        with pred_file.open("a", encoding="utf-8") as f:
            for lo in range(0, len(todo), batch_size):
                batch = todo[lo:lo + batch_size]
                prompts = [build_prompt(it, template) for it in batch]
                for it, p, (text, err) in zip(batch, prompts, _generate(pipe, batch, prompts, max_new_tokens)):
                    f.write(json.dumps(make_record(it, sizes[it.group], p, text, err)) + "\n")
                f.flush()
                print(f"  {min(lo + batch_size, len(todo))}/{len(todo)}", end="\r", flush=True)
        print()
    return write_summary(out)


def write_summary(out: str | Path) -> dict:
    out = Path(out)
    records = load_records(out / "predictions.jsonl")
    if not records:
        raise FileNotFoundError(f"{out / 'predictions.jsonl'} has no predictions")
    summary = score(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    return summary


# ------------------------------------------------------------------------------------ shapes TSV
def image_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_tsv(out: str | Path, n: int = 200, seed: int = 0, resolution: int = 32) -> list[Path]:
    """``n`` shapes-world questions per split, in the official TSV format (no rotated copies:
    ``run`` makes them). ``seed`` / ``resolution`` must be the training run's (seed, image_size)."""
    from train.shapes import ShapesWorld

    world, out = ShapesWorld(resolution=resolution, seed=seed), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, name in (("train", "shapes_mmbench.tsv"), ("heldout", "shapes_mmbench_heldout.tsv")):
        with (out / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(COLUMNS)
            for i in range(n):
                q = world.question_example(i, split)
                w.writerow([i, q.question, "", *(q.options[k] for k in "ABCD"), q.answer, q.category,
                            L2_OF[q.category], image_b64(q.image)])
        paths.append(out / name)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.mmbench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="answer a TSV's questions with a model and score them")
    r.add_argument("tsv")
    r.add_argument("--model", required=True, help="a HybridPipeline folder (e.g. runs/tiny_und/final)")
    r.add_argument("--out", required=True)
    r.add_argument("--template", choices=TEMPLATES, default="train")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=8)
    r.add_argument("--limit", type=int, default=None, help="only the first N questions (all their rotations)")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    m = sub.add_parser("make-tsv", help="write shapes-world questions as MMBench TSVs")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=200)
    m.add_argument("--seed", type=int, default=0, help="the world seed (the training config's seed)")
    m.add_argument("--resolution", type=int, default=32, help="the model's image_size")
    s = sub.add_parser("score", help="recompute OUT/summary.json from OUT/predictions.jsonl")
    s.add_argument("out")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "run":
            run(a.tsv, a.model, a.out, a.template, a.batch_size, a.max_new_tokens, a.limit, a.device, a.dtype)
        elif a.cmd == "make-tsv":
            for p in make_tsv(a.out, a.n, a.seed, a.resolution):
                print(p)
        else:
            write_summary(a.out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
