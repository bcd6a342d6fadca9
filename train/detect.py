"""A deterministic detector for the shapes world, and GenEval's scoring rules.

GenEval scores a generated image with an object detector plus a CLIP colour classifier and a
few rules (counts, colours, relative positions). In the shapes world the objects are known
exactly, so a small hand-written detector replaces both models: foreground pixels are those
nearest to a palette colour rather than the background, connected components become objects,
each object's colour is the palette colour nearest its median RGB, and its shape is the
:func:`train.shapes.shape_mask` template with the best IoU over the component's bounding box.
On clean renders this is exact; on noisy ones a 3x3 median filter is applied first.

:func:`relative_position` and :func:`evaluate` follow GenEval's ``evaluate_images.py``, so the
same numbers mean the same thing as GenEval's, only with our detector in the loop.
"""
from __future__ import annotations

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


def _median3(arr: np.ndarray) -> np.ndarray:
    """3x3 median filter per channel with edge padding: (H, W, 3) -> (H, W, 3) float."""
    h, w = arr.shape[:2]
    pad = np.pad(arr.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    stack = np.stack([pad[i:i + h, j:j + w] for i in range(3) for j in range(3)])  # (9, H, W, 3)
    return np.median(stack, axis=0)


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


def detect(image: Image.Image | np.ndarray, *, palette: dict[str, tuple[int, int, int]] = PALETTE,
           background: tuple[int, int, int] = BACKGROUND, shapes: Sequence[str] = SHAPES,
           min_area: int | None = None, denoise: bool | None = None, max_color_distance: float = 120.0,
           min_confidence: float = 0.3) -> list[Detection]:
    """Detect the shapes in ``image``; most confident first (GenEval's ordering assumption).

    ``denoise=None`` filters only when some pixel is not an exact palette/background colour,
    so clean renders keep pixel-exact boxes. ``min_area`` (default H*W/128, at least 6) drops
    noise specks. Confidence = template IoU x colour closeness (1 - distance /
    ``max_color_distance``); detections below ``min_confidence`` are dropped.
    """
    arr = to_rgb_array(image)
    h, w = arr.shape[:2]
    names = list(palette)
    refs = np.array([background] + [palette[n] for n in names], dtype=np.float32)  # (1+K, 3)

    def nearest(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.linalg.norm(pixels[..., None, :] - refs, axis=-1)  # (..., 1+K)
        return d.argmin(-1), d.min(-1)

    work = arr.astype(np.float32)
    label, dist = nearest(work)
    if denoise or (denoise is None and dist.max() > 0):
        work = _median3(arr)
        label, dist = nearest(work)
    fg = label != 0  # (H, W): nearer to some palette colour than to the background
    comps, n = connected_components(fg)
    min_area = min_area if min_area is not None else max(6, h * w // 128)
    out = []
    for k in range(n):
        ys, xs = np.nonzero(comps == k)
        if len(ys) < min_area:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        crop = comps[y0:y1, x0:x1] == k  # (bh, bw)
        ious = []
        for s in shapes:
            t = shape_mask(s, x1 - x0, y1 - y0)
            ious.append(np.logical_and(crop, t).sum() / np.logical_or(crop, t).sum())
        best = int(np.argmax(ious))  # ties go to the earlier shape: deterministic
        ci, cd = nearest(np.median(work[ys, xs], axis=0))
        if ci == 0:  # median is background-like (e.g. a ring of edge pixels): not an object
            continue
        conf = float(ious[best]) * max(0.0, 1.0 - float(cd) / max_color_distance)
        if conf >= min_confidence:
            out.append(Detection(shapes[best], names[int(ci) - 1], (x0, y0, x1, y1), len(ys), round(conf, 6)))
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
