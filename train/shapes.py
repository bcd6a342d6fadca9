"""The shapes world: the project's embedded, procedurally generated default dataset.

The main job must run end to end with no network, so instead of downloading data we render a
small synthetic world of coloured geometric shapes on a neutral grey canvas. Every example is a
pure function of ``(seed, split, index)``, which makes it reproducible and directly indexable by
a dataloader. Three kinds of examples are produced:

* captions in GenEval's six prompt families, each with a metadata dict shaped exactly like a row
  of GenEval's ``evaluation_metadata.jsonl`` (so :func:`train.detect.evaluate` can score an
  image generated from the prompt);
* MMBench-style four-option multiple-choice questions about an image;
* short interleaved text/image documents ("Here is a red circle." <img> "Now ... moves" <img>).

A fixed set of colour-shape pairs is held out: it never appears in the ``"train"`` split (in no
image and in no "<colour> <shape>" phrase) and every ``"heldout"`` example contains one, so
compositional generalisation can be measured.

Shapes are rasterised with :func:`shape_mask` (no anti-aliasing) so clean renders contain exact
palette colours and the detector can use the very same masks as templates.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# GenEval's colour vocabulary; values chosen so every pair (and the background) is >= 105 apart
# in RGB, which keeps nearest-colour classification reliable under noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (255, 130, 0), "yellow": (245, 230, 30), "green": (30, 160, 50),
    "blue": (30, 70, 220), "purple": (150, 40, 200), "pink": (255, 140, 200), "brown": (110, 60, 20),
    "black": (0, 0, 0), "white": (255, 255, 255)}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
SPLITS: tuple[str, ...] = ("train", "heldout")
QUESTION_CATEGORIES: tuple[str, ...] = ("color", "count", "shape", "position", "existence")
# One held-out colour per shape, all colours distinct: every colour and every shape is still
# seen in training, only these combinations are not.
DEFAULT_HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("yellow", "circle"), ("red", "square"), ("blue", "triangle"), ("green", "diamond"))
MIN_SHAPE_SIZE = 6  # below this the four shape masks stop being clearly distinct
MAX_OBJECTS = 4
# Names offered as wrong answers to "what shape" questions when fewer than 4 shapes are in use.
_EXTRA_SHAPE_NAMES = ("star", "hexagon", "heart")
_MOVES = {"to the left": "left of", "to the right": "right of", "up": "above", "down": "below"}


@lru_cache(maxsize=4096)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of ``shape`` filling a ``width`` x ``height`` box.

    Pixels are tested at their centres; every mask touches all four sides of its box when
    width == height, so the detected bounding box equals the rendered one exactly.
    """
    if shape not in SHAPES or width < 1 or height < 1:
        raise ValueError(f"need a shape in {SHAPES} and a positive size, got {shape!r} {width}x{height}")
    ys, xs = np.mgrid[0:height, 0:width]  # (h, w) each
    dx = np.abs(xs + 0.5 - width / 2) / (width / 2)  # normalised |offset| of pixel centres
    dy = np.abs(ys + 0.5 - height / 2) / (height / 2)
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = dx * dx + dy * dy <= 1.0
    elif shape == "triangle":  # apex up; row y spans the width the edges reach at its bottom
        mask = dx <= (ys + 1) / height
    else:  # diamond
        mask = dx + dy <= 1.0
    mask.flags.writeable = False
    return mask


@dataclass(frozen=True)
class ShapeObject:
    """One object: a shape of a palette colour in a ``size`` x ``size`` box centred at (cx, cy).

    The centre is the exact box centre (integer or .5), so ``bbox`` is integral; bboxes are
    (x0, y0, x1, y1) in pixels with x1/y1 exclusive, the same convention as the detector's.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.color not in PALETTE:
            raise ValueError(f"unknown shape/colour {self.shape!r}/{self.color!r}; expected {SHAPES}/{COLORS}")
        if self.size < 1 or (self.cx - self.size / 2) % 1 or (self.cy - self.size / 2) % 1:
            raise ValueError("size must be >= 1 and cx/cy - size/2 must be integers")

    @classmethod
    def from_corner(cls, shape: str, color: str, x0: int, y0: int, size: int) -> "ShapeObject":
        """Build from the top-left corner, which is how the generator samples positions."""
        return cls(shape, color, x0 + size / 2, y0 + size / 2, size)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        x0, y0 = int(self.cx - self.size / 2), int(self.cy - self.size / 2)
        return (x0, y0, x0 + self.size, y0 + self.size)


@dataclass(frozen=True)
class Scene:
    """A set of non-overlapping objects on a square canvas of ``resolution`` pixels."""
    objects: tuple[ShapeObject, ...]
    resolution: int


@dataclass
class CaptionExample:
    """A GenEval-style prompt, its GenEval metadata row, and a scene/image satisfying it."""
    prompt: str
    tag: str
    metadata: dict
    scene: Scene
    image: Image.Image


@dataclass
class QuestionExample:
    """An MMBench-style question with options A-D, exactly one of which is correct."""
    question: str
    options: dict[str, str]
    answer: str
    category: str
    scene: Scene
    image: Image.Image

    def format(self) -> str:
        """MMBench-like text: the question, one line per option, then ``Answer:``."""
        lines = [self.question] + [f"{k}. {v}" for k, v in self.options.items()]
        return "\n".join(lines + ["Answer:"])


def render(scene: Scene, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Rasterise ``scene`` into an RGB image without anti-aliasing (exact palette colours)."""
    r = scene.resolution
    canvas = np.empty((r, r, 3), dtype=np.uint8)  # (H, W, 3)
    canvas[:] = background
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        if x0 < 0 or y0 < 0 or x1 > r or y1 > r:
            raise ValueError(f"{obj} does not fit in a {r}x{r} canvas")
        region = canvas[y0:y1, x0:x1]  # view, (size, size, 3)
        region[shape_mask(obj.shape, obj.size, obj.size)] = PALETTE[obj.color]
    return Image.fromarray(canvas, "RGB")


def describe(scene: Scene) -> str:
    """Every object of ``scene``, left to right: "a red circle, a blue square and a green triangle".

    A caption that names each object's colour *and* shape: two scenes that differ only in a shape
    get different captions, which a contrastive encoder must then tell apart (GenEval's prompts
    mostly do not: "a photo of a red circle" names one object of a crowded scene)."""
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    names = [f"{with_article(o.color)} {o.shape}" for o in objs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def with_article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel letter ("an orange circle"), else "a"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural rule: add "es" after a final "s", otherwise "s"."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _inc(cls: str, count: int = 1, **extra: object) -> dict:
    """One GenEval include/exclude clause, keys in GenEval's order (class, count, color|position)."""
    return {"class": cls, "count": count, **extra}


def _row(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    """One GenEval metadata row, keys in GenEval's order: tag, include, [exclude], prompt."""
    return {"tag": tag, "include": include, **({"exclude": exclude} if exclude else {}), "prompt": prompt}


def _rng(*parts: object) -> random.Random:
    """A Random seeded from a SHA-256 of ``parts``: stable across processes (unlike hash())."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _apart(a: ShapeObject, b: ShapeObject, margin: int) -> bool:
    """True if the boxes are separated by at least ``margin`` empty pixels on some axis."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0


def _relation_is(rel: str, subject_index: int, ref_index: int) -> Callable[[list], bool]:
    """Placement constraint: relative_position(subject, ref) == {rel} once both are placed.

    Demanding the single relation (not just membership, as GenEval scores) keeps the
    supervision unambiguous and makes position questions have exactly one right answer.
    """
    from train.detect import relative_position  # deferred: detect imports this module

    def check(placed: list) -> bool:
        if len(placed) <= max(subject_index, ref_index):
            return True
        return relative_position(placed[subject_index], placed[ref_index]) == {rel}
    return check


class ShapesWorld:
    """Deterministic, indexable generator of captions, questions and documents.

    Caption scene rule: every shape named in the prompt appears exactly as often as the prompt
    says (once, or N for counting) with the named colour if any; with probability
    ``distractor_prob`` extra objects are added, always of shapes the prompt does not name.
    Under GenEval's rules (include: at least ``count``; exclude: fewer than ``count``; colour
    and position checked on the included objects) every scene therefore satisfies its prompt.
    """

    def __init__(self, resolution: int = 32, seed: int = 0, min_size: int | None = None,
                 max_size: int | None = None, margin: int | None = None,
                 colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                 heldout_pairs: Sequence[tuple[str, str]] | None = None,
                 distractor_prob: float = 0.0) -> None:
        self.resolution, self.seed = int(resolution), int(seed)
        self.colors = tuple(colors) if colors is not None else COLORS
        self.shapes = tuple(shapes) if shapes is not None else SHAPES
        bad = [c for c in self.colors if c not in PALETTE] + [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"unknown colour/shape names {bad}; colours: {COLORS}, shapes: {SHAPES}")
        if len(set(self.colors)) < 4 or len(set(self.shapes)) < 2:
            raise ValueError("need at least 4 distinct colours and 2 distinct shapes")
        self.min_size = min_size if min_size is not None else max(MIN_SHAPE_SIZE, round(resolution * 3 / 16))
        self.max_size = max_size if max_size is not None else max(self.min_size, round(resolution * 3 / 8))
        self.margin = margin if margin is not None else max(2, resolution // 16)
        if self.min_size < MIN_SHAPE_SIZE or self.max_size < self.min_size:
            raise ValueError(f"need {MIN_SHAPE_SIZE} <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        # Four minimum-size objects (2x2) with margins must fit with slack for random placement.
        if 2 * (self.min_size + self.margin) + 4 > self.resolution or self.max_size > self.resolution - 2:
            raise ValueError(f"resolution {resolution} is too small for min_size={self.min_size}, "
                             f"max_size={self.max_size}, margin={self.margin}; use resolution >= 20")
        if not 0.0 <= distractor_prob <= 1.0:
            raise ValueError(f"distractor_prob must be in [0, 1], got {distractor_prob}")
        self.distractor_prob = distractor_prob
        pairs = heldout_pairs if heldout_pairs is not None else [
            p for p in DEFAULT_HELDOUT_PAIRS if p[0] in self.colors and p[1] in self.shapes]
        self.heldout_pairs: frozenset[tuple[str, str]] = frozenset((c, s) for c, s in pairs)
        n_held = [sum(s2 == s for _, s2 in self.heldout_pairs) for s in self.shapes]
        # every shape needs a held-out colour and >= 2 training colours; no foreign names
        if any(c not in self.colors or s not in self.shapes for c, s in self.heldout_pairs) or \
                not all(1 <= n <= len(self.colors) - 2 for n in n_held):
            raise ValueError(f"heldout_pairs {sorted(self.heldout_pairs)} must use this world's colours and "
                             f"give every shape 1..{len(self.colors) - 2} held-out colours")

    # ----------------------------------------------------------------- sampling helpers
    def _check(self, split: str, tag: str | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if tag is not None and tag not in TAGS:
            raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")

    def colors_for(self, shape: str, split: str, heldout_only: bool = False) -> list[str]:
        """Colours ``shape`` may take in ``split`` (train excludes held-out pairs)."""
        if split == "heldout" and not heldout_only:
            return list(self.colors)
        return [c for c in self.colors if ((c, shape) in self.heldout_pairs) == heldout_only]

    def _pairs(self, split: str, heldout_only: bool = False) -> list[tuple[str, str]]:
        return [(c, s) for s in self.shapes for c in self.colors_for(s, split, heldout_only)]

    def _place(self, rng: random.Random, specs: Sequence[tuple[str, str]],
               constraint: Callable[[list], bool] | None = None) -> Scene:
        """Place (colour, shape) specs by rejection sampling; shrink sizes if packing is hard."""
        r = self.resolution
        for attempt in range(400):
            hi = max(self.min_size, self.max_size - attempt // 10)
            placed: list[ShapeObject] = []
            for color, shape in specs:
                for _ in range(40):
                    size = rng.randint(self.min_size, hi)
                    x0, y0 = rng.randint(1, r - 1 - size), rng.randint(1, r - 1 - size)  # 1 px border
                    obj = ShapeObject.from_corner(shape, color, x0, y0, size)
                    if self._fits(obj, placed) and (constraint is None or constraint(placed + [obj])):
                        placed.append(obj)
                        break
                else:
                    break
            else:
                return Scene(tuple(placed), r)
        raise RuntimeError(f"could not place {list(specs)} in a {r}x{r} canvas")

    def _distractors(self, rng: random.Random, named: set[str], n_objects: int, split: str,
                     prob: float) -> list[tuple[str, str]]:
        """Extra objects of unnamed shapes (possibly none), keeping the total <= MAX_OBJECTS."""
        free = [s for s in self.shapes if s not in named]
        if not free or n_objects >= MAX_OBJECTS or rng.random() >= prob:
            return []
        shapes = [rng.choice(free) for _ in range(rng.randint(1, MAX_OBJECTS - n_objects))]
        return [(rng.choice(self.colors_for(s, split)), s) for s in shapes]

    # ----------------------------------------------------------------- captions
    def _sample_metadata(self, rng: random.Random, tag: str, split: str) -> dict:
        """One GenEval metadata row (keys in GenEval's order: tag, include, exclude, prompt)."""
        held = split == "heldout"
        if tag == "single_object":
            s = rng.choice(self.shapes)
            return _row(tag, [_inc(s)], f"a photo of {with_article(s)}")
        if tag == "two_object":
            a, b = rng.sample(self.shapes, 2)
            return _row(tag, [_inc(a), _inc(b)], f"a photo of {with_article(a)} and {with_article(b)}")
        if tag == "counting":
            s, n = rng.choice(self.shapes), rng.randint(2, 4)
            return _row(tag, [_inc(s, n)], f"a photo of {NUMBERS[n]} {plural(s)}", exclude=[_inc(s, n + 1)])
        if tag == "colors":
            c, s = rng.choice(self._pairs(split, heldout_only=held))
            return _row(tag, [_inc(s, color=c)], f"a photo of {with_article(c)} {s}")
        if tag == "position":
            a, b = rng.sample(self.shapes, 2)  # prompt: "<a> <rel> <b>"; b is the reference
            rel = rng.choice(RELATIONS)
            return _row(tag, [_inc(b), _inc(a, position=[rel, 0])],
                        f"a photo of {with_article(a)} {rel} {with_article(b)}")
        # color_attr: two different shapes with two different colours (as in GenEval)
        first = rng.choice(self._pairs(split, heldout_only=held))
        others = [p for p in self._pairs(split) if p[0] != first[0] and p[1] != first[1]]
        pair = [first, rng.choice(others)]
        if held and rng.random() < 0.5:
            pair.reverse()  # the held-out pair may be either the first or the second object
        (ca, sa), (cb, sb) = pair
        return _row(tag, [_inc(sa, color=ca), _inc(sb, color=cb)],
                    f"a photo of {with_article(ca)} {sa} and {with_article(cb)} {sb}")

    def _scene_for(self, rng: random.Random, meta: dict, split: str) -> Scene:
        """A scene satisfying ``meta`` (see the class docstring for the rule)."""
        specs: list[tuple[str, str | None]] = [
            (req.get("color"), req["class"]) for req in meta["include"] for _ in range(req["count"])]
        if split == "heldout" and not any(p in self.heldout_pairs for p in specs):
            c, s = specs[0]  # prompts without colours: make the first named object held-out
            specs[0] = (rng.choice(self.colors_for(s, split, heldout_only=True)), s)
        specs = [(c if c is not None else rng.choice(self.colors_for(s, split)), s) for c, s in specs]
        named = {s for _, s in specs}
        specs += self._distractors(rng, named, len(specs), split, self.distractor_prob)
        constraint = None
        if meta["tag"] == "position":
            constraint = _relation_is(meta["include"][1]["position"][0], 1, 0)
        return self._place(rng, specs, constraint)

    def caption_example(self, index: int, split: str = "train", tag: str | None = None) -> CaptionExample:
        """Caption ``index`` of ``split``; ``tag=None`` cycles through TAGS by index."""
        self._check(split, tag)
        tag = tag if tag is not None else TAGS[index % len(TAGS)]
        rng = _rng(self.seed, split, "caption", index, tag)
        meta = self._sample_metadata(rng, tag, split)
        scene = self._scene_for(rng, meta, split)
        return CaptionExample(meta["prompt"], tag, meta, scene, render(scene))

    def prompts(self, split: str = "heldout", n_per_tag: int = 10, tags: Sequence[str] | None = None,
                unique: bool = False) -> list[dict]:
        """GenEval-format metadata rows for evaluation, identical to ``caption_example(i, ...)``.

        With ``unique=True`` duplicates are dropped (GenEval de-duplicates too); a tag with
        fewer distinct prompts than ``n_per_tag`` (e.g. single_object) then returns all of them.
        """
        self._check(split)
        rows: list[dict] = []
        for tag in tags if tags is not None else TAGS:
            self._check(split, tag)
            kept: dict[str, dict] = {}  # first-seen order; keyed by prompt when unique
            for i in range(n_per_tag * 50 if unique else n_per_tag):
                meta = self._sample_metadata(_rng(self.seed, split, "caption", i, tag), tag, split)
                kept.setdefault(meta["prompt"] if unique else str(i), meta)
                if len(kept) == n_per_tag:
                    break
            rows += kept.values()
        return rows

    # ----------------------------------------------------------------- questions & documents
    def question_example(self, index: int, split: str = "train", category: str | None = None) -> QuestionExample:
        """MMBench-style question ``index``; ``category=None`` cycles QUESTION_CATEGORIES.

        The object asked about is unique in the scene (by shape for "color"/"count", by colour
        for "shape"); in the heldout split it is always a held-out pair.
        """
        self._check(split)
        category = category if category is not None else QUESTION_CATEGORIES[index % len(QUESTION_CATEGORIES)]
        if category not in QUESTION_CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {QUESTION_CATEGORIES}")
        rng = _rng(self.seed, split, "question", index, category)
        c, s = rng.choice(self._pairs(split, heldout_only=split == "heldout"))
        specs, constraint = [(c, s)], None
        if category == "color":
            specs += self._distractors(rng, {s}, 1, split, 0.7)
            question, right = f"What color is the {s}?", c
            wrong = rng.sample([x for x in self.colors if x != c], 3)
        elif category == "count":
            n = rng.randint(1, MAX_OBJECTS)
            specs += [(rng.choice(self.colors_for(s, split)), s) for _ in range(n - 1)]
            specs += self._distractors(rng, {s}, n, split, 0.7)
            question, right = f"How many {plural(s)} are in the image?", str(n)
            wrong = [str(v) for v in rng.sample([v for v in range(6) if v != n], 3)]
        elif category == "shape":
            pool = [p for p in self._pairs(split) if p[0] != c]
            specs += [rng.choice(pool) for _ in range(rng.randint(0, MAX_OBJECTS - 1))]
            question, right = f"What shape is the {c} object?", s
            names = [x for x in self.shapes if x != s] + list(_EXTRA_SHAPE_NAMES)
            wrong = rng.sample(names[:max(3, len(self.shapes) - 1)], 3)
        elif category == "position":
            rc, rs = rng.choice([p for p in self._pairs(split) if p[1] != s])
            specs += [(rc, rs)] + self._distractors(rng, {s, rs}, 2, split, 0.5)
            right = rng.choice(RELATIONS)
            constraint = _relation_is(right, 0, 1)
            question = f"Where is the {c} {s} relative to the {rc} {rs}?"
            wrong = [x for x in RELATIONS if x != right]
        else:  # existence: one present object, three plausible absent ones
            pool = [p for p in self._pairs(split) if p != (c, s)]
            specs += rng.sample(pool, rng.randint(0, 2))
            absent = [p for p in self._pairs(split) if p not in specs]
            near = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in specs)]
            question, right = "Which of these objects is in the image?", f"{with_article(c)} {s}"
            wrong = [f"{with_article(x)} {y}" for x, y in rng.sample(near if len(near) >= 3 else absent, 3)]
        scene = self._place(rng, specs, constraint)
        values = sorted([right] + wrong, key=int) if category == "count" else rng.sample([right] + wrong, 4)
        return QuestionExample(question, dict(zip("ABCD", values)), "ABCD"[values.index(right)], category,
                               scene, render(scene))

    def interleaved_example(self, index: int, split: str = "train") -> list[str | Image.Image]:
        """A short document [text, image, text, image, ...]; each text describes the next image.

        Starts from one object ("Here is a red circle.") and applies 1-2 grounded edits: move
        an object, add one at a stated relation to another, or recolour one.
        """
        self._check(split)
        rng = _rng(self.seed, split, "interleaved", index)
        c, s = rng.choice(self._pairs(split, heldout_only=split == "heldout"))
        scene = self._place(rng, [(c, s)])
        doc: list[str | Image.Image] = [f"Here is {with_article(c)} {s}.", render(scene)]
        for _ in range(rng.randint(1, 2)):
            for action in rng.sample(["move", "add", "recolor"], 3):
                step = self._doc_edit(rng, scene, split, action)
                if step is not None:
                    doc += [step[0], render(step[1])]
                    scene = step[1]
                    break
        return doc

    def _fits(self, obj: ShapeObject, others: Sequence[ShapeObject]) -> bool:
        """Inside the canvas with a 1 px border, and ``margin`` px away from every other object."""
        x0, y0, x1, y1 = obj.bbox
        inside = 1 <= min(x0, y0) and max(x1, y1) <= self.resolution - 1
        return inside and all(_apart(obj, o, self.margin) for o in others)

    def _doc_edit(self, rng: random.Random, scene: Scene, split: str, action: str) -> tuple[str, Scene] | None:
        """One edit of ``scene`` and the sentence describing it, or None if it cannot be done.

        Objects in a document have distinct (colour, shape) pairs, so "the red circle" is unique.
        """
        objs, r = list(scene.objects), scene.resolution
        present = {(o.color, o.shape) for o in objs}
        i = rng.randrange(len(objs))
        o = objs[i]
        if action == "recolor":
            choices = [x for x in self.colors_for(o.shape, split) if (x, o.shape) not in present]
            if not choices:
                return None
            objs[i] = ShapeObject(o.shape, rng.choice(choices), o.cx, o.cy, o.size)
            return f"Now the {o.color} {o.shape} turns {objs[i].color}.", Scene(tuple(objs), r)
        if action == "add" and len(objs) >= 3:
            return None
        c, s = rng.choice([p for p in self._pairs(split) if p not in present])  # for "add"
        phrase, rel = rng.choice(list(_MOVES.items()))  # new position relative to ``o``
        others = objs[:i] + objs[i + 1:] if action == "move" else objs
        for _ in range(100):
            if action == "move":  # a step of more than 0.4 x size makes the relation hold
                d = rng.randint(o.size // 2 + 1, o.size + 2)
                dx, dy = {"left of": (-d, 0), "right of": (d, 0), "above": (0, -d), "below": (0, d)}[rel]
                new = ShapeObject.from_corner(o.shape, o.color, o.bbox[0] + dx, o.bbox[1] + dy, o.size)
            else:
                size = rng.randint(self.min_size, self.max_size)
                new = ShapeObject.from_corner(s, c, rng.randint(1, r - 1 - size), rng.randint(1, r - 1 - size), size)
            if self._fits(new, others) and _relation_is(rel, 0, 1)([new, o]):
                break
        else:
            return None
        if action == "add":
            return f"Then {with_article(c)} {s} appears {rel} the {o.color} {o.shape}.", Scene((*objs, new), r)
        objs[i] = new
        return f"Now the {o.color} {o.shape} moves {phrase}.", Scene(tuple(objs), r)

    # ----------------------------------------------------------------- tokenizer corpus
    def corpus_texts(self, n: int = 1000) -> list[str]:
        """Texts for training a small tokenizer: a vocabulary line, then ``n`` train texts.

        The vocabulary line lists every word the world can emit (all splits), so a tokenizer
        trained on train texts alone still covers held-out prompts; the ``n`` texts cycle
        through caption prompts, formatted questions with answers, and document texts.
        """
        words = [*self.colors, *self.shapes, *map(plural, self.shapes), *_EXTRA_SHAPE_NAMES,
                 *NUMBERS, *RELATIONS, *_MOVES, *"ABCD", *map(str, range(6))]
        texts = [" ".join(words)]
        for i in range(n):
            kind, j = i % 3, i // 3
            if kind == 0:
                tag = TAGS[j % len(TAGS)]
                rng = _rng(self.seed, "train", "caption", j, tag)  # same prompt as caption_example(j)
                texts.append(self._sample_metadata(rng, tag, "train")["prompt"])
            elif kind == 1:
                q = self.question_example(j, "train")
                texts.append(f"{q.format()} {q.answer}")
            else:
                texts.append(" ".join(t for t in self.interleaved_example(j, "train") if isinstance(t, str)))
        return texts
