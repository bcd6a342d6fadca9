"""GenEval on the shapes world: prompt files in GenEval's schema, and scoring with our detector.

``write_metadata`` writes two ``evaluation_metadata.jsonl``-style files from :class:`ShapesWorld`:

* ``shapes_geneval.jsonl``: the six tasks (single_object, two_object, counting, colors,
  position, color_attr) on training compositions (prompts de-duplicated, as GenEval does);
* ``shapes_geneval_heldout.jsonl``: the tasks whose prompts name a colour-shape pair (colors,
  color_attr), each row naming at least one held-out pair. The other four tasks name no colour,
  so their prompts cannot be held out: their held-out rows would be training prompts again.

``score_sample`` applies :func:`train.detect.detect` and :func:`train.detect.evaluate` (GenEval's
rules) to one image and returns the row GenEval's ``evaluate_images.py`` writes for it.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from train.detect import clutter, detect, evaluate
from train.shapes import COLORS, SHAPES, TAGS, ShapesWorld

HELDOUT_TAGS: tuple[str, ...] = ("colors", "color_attr")
TRAIN_FILE, HELDOUT_FILE = "shapes_geneval.jsonl", "shapes_geneval_heldout.jsonl"
THRESHOLD = 0.3  # GenEval's detector threshold
MAX_OBJECTS = 16  # GenEval keeps at most this many detections per class


def write_metadata(out: str | Path, per_tag: int = 100, resolution: int = 32, seed: int = 0) -> list[Path]:
    """Write both prompt files into ``out``; returns their paths. ``per_tag`` caps each task (a task
    with fewer distinct prompts, e.g. single_object with 4 shapes, keeps all of them). The prompts do
    not depend on ``resolution`` (it only has to be a valid ShapesWorld resolution)."""
    world = ShapesWorld(resolution=resolution, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, split, tags in ((TRAIN_FILE, "train", TAGS), (HELDOUT_FILE, "heldout", HELDOUT_TAGS)):
        rows = world.prompts(split, per_tag, tags, unique=True)
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def unknown_names(metadata: dict) -> list[str]:
    """Classes / colours in a metadata row that the shapes detector cannot see (e.g. COCO's)."""
    bad = []
    for req in metadata.get("include", []) + metadata.get("exclude", []):
        if req["class"] not in SHAPES:
            bad.append(req["class"])
        if "color" in req and req["color"] not in COLORS:
            bad.append(req["color"])
    return bad


def score_sample(path: str | Path, metadata: dict, threshold: float = THRESHOLD,
                 counting_threshold: float = THRESHOLD) -> dict:
    """One results row, fields as GenEval's evaluator writes them: ``metadata`` and ``details``
    are JSON strings; details maps each detected class to its [x0, y0, x1, y1, confidence] boxes."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    thr = counting_threshold if metadata["tag"] == "counting" else threshold
    found = detect(image, min_confidence=thr)  # most confident first
    kept, per_class = [], {}
    for d in found:
        if per_class.get(d.shape, 0) < MAX_OBJECTS:
            per_class[d.shape] = per_class.get(d.shape, 0) + 1
            kept.append(d)
    correct, reason = evaluate(kept, metadata)
    details = {s: [[*d.bbox, d.confidence] for d in kept if d.shape == s] for s in SHAPES}
    flags = clutter(image, kept, metadata)  # beyond GenEval's fields: the clutter guard (train.detect)
    return {"filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": reason, "metadata": json.dumps(metadata),
            "details": json.dumps({k: v for k, v in details.items() if v}),
            "strict": bool(correct) and flags["clean"], **{k: flags[k] for k in ("extra", "empty", "noisy")}}
