"""A deterministic detector for the shapes world, and GenEval's scoring rules.

GenEval scores a generated image with an object detector plus a CLIP colour classifier and a
few rules (counts, colours, relative positions). In the shapes world the objects are known
exactly, so a small hand-written detector replaces both models: foreground pixels are those
nearest to a palette colour rather than the background, connected components become objects,
each object's colour is the palette colour nearest its median RGB, and its shape is the
:func:`train.shapes.shape_mask` template with the best IoU around the component's bounding box
(a small search over sizes and offsets absorbs noise specks and eroded corners). On clean
renders this is exact; at 32x32 it keeps >= 98.7% of (shape, colour) sets under Gaussian noise
up to sigma 0.1 plus a 0.5 px blur, but heavier blur (1 px: ~76%) blurs small diamonds into
circles, so scores of very blurry samples are pessimistic.

:func:`relative_position` and :func:`evaluate` follow GenEval's ``evaluate_images.py``, so the
same numbers mean the same thing as GenEval's, only with our detector in the loop.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from train.shapes import BACKGROUND, PALETTE, SHAPES, shape_mask

POSITION_THRESHOLD = 0.1  # GenEval's default ``position_threshold``


@dataclass(frozen=True)
class Detection:
    """One detected object; bbox is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    area: int
    confidence: float


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Return an (H, W, 3) uint8 array.

    PIL images of any mode are converted to RGB (grayscale becomes grey, so only black, white
    and the background survive). Arrays must already be (H, W, 3): uint8, or float in [0, 1]
    (tiny overshoot is clipped). Anything else, e.g. (H, W) or channels-first (3, H, W), is
    rejected because guessing its layout would silently give wrong detections.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        hint = " (channels-first? transpose to HxWx3)" if arr.ndim == 3 and arr.shape[0] == 3 else ""
        raise ValueError(f"expected an HxWx3 image array, got shape {arr.shape}{hint}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            raise ValueError("float image arrays must hold values in [0, 1]")
        return np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    raise ValueError(f"expected uint8 or float image array, got dtype {arr.dtype}")


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask.

    Returns (labels, n): labels is (H, W) int with -1 for background and 0..n-1 for components,
    numbered in row-major order of their first pixel. Implemented as min-label propagation
    with pointer jumping (a vectorised union-find), since scipy is not a dependency.
    """
    h, w = mask.shape
    big = h * w
    idx = np.arange(big).reshape(h, w)
    labels = np.where(mask, idx, big)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[flat[new]], big)  # jump: adopt the label of my label's pixel
        if np.array_equal(new, labels):
            break
        labels = new
    roots, inverse = np.unique(labels[mask], return_inverse=True)  # roots sorted = row-major
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = inverse
    return out, len(roots)


def _best_template(comp: np.ndarray, bbox: tuple[int, int, int, int],
                   shapes: Sequence[str]) -> tuple[int, float]:
    """Index of the shape whose template best explains the component, and its IoU.

    Square templates of sizes max(w, h) - 2 .. max(w, h) + 1 are slid over a window of the
    component padded by 2 pixels, so a noise speck stuck to the border (box 1 px too big) or an
    eroded corner (box 1 px too small) does not misalign the template. On a clean render the
    true shape at the true box gives IoU exactly 1 and no other placement can.
    """
    x0, y0, x1, y1 = bbox
    area = comp.sum()
    pad = np.pad(comp, 3)[y0 + 1:y1 + 5, x0 + 1:x1 + 5]  # bbox plus 2 px each side, (h+4, w+4)
    top = max(x1 - x0, y1 - y0)
    best, best_iou = 0, -1.0
    for k in range(max(1, top - 2), top + 2):
        if k > min(pad.shape):
            break
        windows = np.lib.stride_tricks.sliding_window_view(pad, (k, k))  # (ny, nx, k, k)
        for i, s in enumerate(shapes):
            t = shape_mask(s, k, k)
            inter = np.einsum("yxij,ij->yx", windows.astype(np.int32), t.astype(np.int32))
            iou = float((inter / (area + t.sum() - inter)).max())
            if iou > best_iou + 1e-9:  # strict: ties keep the earlier (shape, smaller size)
                best, best_iou = i, iou
    return best, best_iou


def detect(image: Image.Image | np.ndarray, *, palette: dict[str, tuple[int, int, int]] = PALETTE,
           background: tuple[int, int, int] = BACKGROUND, shapes: Sequence[str] = SHAPES,
           min_area: int | None = None, max_color_distance: float = 120.0,
           min_confidence: float = 0.3) -> list[Detection]:
    """Detect the shapes in ``image``; most confident first (GenEval's ordering assumption).

    ``min_area`` (default H*W/128, at least 6) drops noise specks. Confidence = template IoU x
    colour closeness (1 - distance of the component's median colour / ``max_color_distance``);
    detections below ``min_confidence`` are dropped. Boxes are the components' pixel extents.
    """
    arr = to_rgb_array(image)
    h, w = arr.shape[:2]
    names = list(palette)
    refs = np.array([background] + [palette[n] for n in names], dtype=np.float32)  # (1+K, 3)

    def nearest(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.linalg.norm(pixels[..., None, :] - refs, axis=-1)  # (..., 1+K)
        return d.argmin(-1), d.min(-1)

    work = arr.astype(np.float32)
    fg = nearest(work)[0] != 0  # (H, W): nearer to some palette colour than to the background
    comps, n = connected_components(fg)
    min_area = min_area if min_area is not None else max(6, h * w // 128)
    out = []
    for k in range(n):
        comp = comps == k  # (H, W)
        ys, xs = np.nonzero(comp)
        if len(ys) < min_area:
            continue
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        ci, cd = nearest(np.median(work[ys, xs], axis=0))
        if ci == 0:  # median is background-like (e.g. a ring of edge pixels): not an object
            continue
        best, iou = _best_template(comp, bbox, shapes)
        conf = iou * max(0.0, 1.0 - float(cd) / max_color_distance)
        if conf >= min_confidence:
            out.append(Detection(shapes[best], names[int(ci) - 1], bbox, len(ys), round(conf, 6)))
    return sorted(out, key=lambda d: (-d.confidence, d.bbox[1], d.bbox[0]))


def _box(obj: Any) -> np.ndarray:
    box = getattr(obj, "bbox", obj)
    return np.asarray(box[:4], dtype=np.float64)


def relative_position(a: Any, b: Any, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of ``a`` relative to ``b`` ("left of", "right of", "above", "below").

    ``a``/``b`` are (x0, y0, x1, y1) boxes or objects with ``.bbox``. GenEval's rule: take the
    offset between box centres, shrink each axis towards 0 by ``threshold`` x (sum of the two
    boxes' extents on that axis), and normalise by the length of the original offset. "left of"
    if the x part < -0.5, "right of" if > 0.5, "above" if the y part < -0.5, "below" if > 0.5
    (image y grows downwards). If both shrunk parts are ~0 (heavy overlap) nothing holds.
    """
    ba, bb = _box(a), _box(b)
    offset = (ba[:2] + ba[2:]) / 2 - (bb[:2] + bb[2:]) / 2  # centre_a - centre_b, (2,)
    extent = (ba[2:] - ba[:2]) + (bb[2:] - bb[:2])  # (2,)
    shrunk = np.maximum(np.abs(offset) - threshold * extent, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def evaluate(detections: Sequence[Any], metadata: dict) -> tuple[bool, str]:
    """Score detections against a GenEval metadata row; returns (correct, reason).

    Mirrors GenEval: ``include`` clauses are ANDed: class ``c`` needs >= ``count`` detections;
    only the ``count`` most confident ones are then checked for ``color`` (all must have it)
    and ``position`` ([relation, i]: each must stand in that relation to every object matched
    by include clause ``i``). ``exclude`` clauses are ORed: >= ``count`` detections of the
    class fails. Detections are anything with shape/color/bbox (confidence optional, default 1).
    """
    if "include" not in metadata:
        raise ValueError("metadata needs an 'include' list (GenEval format)")
    groups: dict[str, list] = defaultdict(list)
    for det in sorted(detections, key=lambda d: -getattr(d, "confidence", 1.0)):
        groups[det.shape].append(det)
    correct, reasons, matched_groups = True, [], []
    for req in metadata["include"]:
        cls, count = req["class"], req["count"]
        found = groups[cls][:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                n_ok = sum(d.color == req["color"] for d in found)
                if n_ok < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {n_ok} "
                                   f"{req['color']}; colours: {sorted(d.color for d in found)}")
            if "position" in req and matched:
                rel, target = req["position"]
                targets = matched_groups[target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        bad = [t for t in targets if rel not in relative_position(obj, t)]
                        if bad:
                            matched = False
                            got = " and ".join(sorted(relative_position(obj, bad[0]))) or "no relation to"
                            reasons.append(f"expected {cls} {rel} target, found {got} target")
                            break
        correct &= matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], req["count"]
        if len(groups[cls]) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(groups[cls])}")
    return correct, "\n".join(reasons)


# --------------------------------------------------------------------------- the clutter guard
STRAY_LIMIT = 0.02  # share of the canvas that may be foreground outside every detected object


def expected_objects(metadata: dict) -> int:
    """How many objects a clean image for this prompt shows: the include clauses' counts (the
    shapes world's caption scenes hold exactly the named objects)."""
    return sum(int(req["count"]) for req in metadata["include"])


def clutter(image: Image.Image | np.ndarray, detections: Sequence[Detection], metadata: dict,
            stray_limit: float = STRAY_LIMIT) -> dict[str, bool]:
    """What GenEval's rules let pass but a person would not call a clean answer to the prompt.

    ``extra``: more objects detected than the prompt asks for (GenEval's include clauses only need
    "at least", so a canvas full of shapes satisfies most prompts). ``empty``: nothing detected.
    ``noisy``: more than ``stray_limit`` of the canvas is foreground (nearer a palette colour than
    the background) outside every detected object's box: specks, smears, coloured noise. ``clean``:
    none of the three. Clean renders of the world are always clean."""
    arr = to_rgb_array(image)
    h, w = arr.shape[:2]
    refs = np.array([BACKGROUND] + list(PALETTE.values()), dtype=np.float32)
    fg = np.linalg.norm(arr.astype(np.float32)[..., None, :] - refs, axis=-1).argmin(-1) != 0  # (H, W)
    for d in detections:
        x0, y0, x1, y1 = d.bbox
        fg[y0:y1, x0:x1] = False
    out = {"extra": len(detections) > expected_objects(metadata), "empty": not detections,
           "noisy": bool(fg.sum() > stray_limit * h * w)}
    out["clean"] = not any(out.values())
    return out


def judge(image: Image.Image | np.ndarray, metadata: dict, min_confidence: float = 0.3) -> dict[str, bool]:
    """One generated image: ``correct`` by GenEval's rules, the clutter flags, and ``strict`` =
    correct and clean (the score that noise or clutter cannot raise)."""
    found = detect(image, min_confidence=min_confidence)
    meta = {k: v for k, v in metadata.items() if k != "split"}
    ok = evaluate(found, meta)[0]
    flags = clutter(image, found, meta)
    return {"correct": ok, **flags, "strict": ok and flags["clean"]}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default): the accuracy interval
    that stays inside [0, 1] and is honest at small n and at 0 / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def summarize_judgements(records: Sequence[dict], group: str = "tag") -> dict:
    """Records (dicts with ``judge``'s fields and a ``group`` key) -> per group and overall:
    accuracy with its Wilson 95% interval, strict accuracy, and the extra / empty / noisy shares."""
    def stats(rs: Sequence[dict]) -> dict:
        n = len(rs)
        k = sum(r["correct"] for r in rs)
        lo, hi = wilson(k, n)
        out = {"n": n, "accuracy": k / n if n else float("nan"), "ci95": [round(lo, 4), round(hi, 4)],
               "strict": sum(r["strict"] for r in rs) / n if n else float("nan")}
        out.update({f"{f}_share": sum(r[f] for r in rs) / n if n else float("nan") for f in ("extra", "empty", "noisy")})
        return out
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r[group]].append(r)
    return {"all": stats(records), **{g: stats(rs) for g, rs in groups.items()}}
