"""Training data from files: a JSONL manifest, webdataset tar shards, a Hugging Face ``datasets``
folder, and a weighted mix of them. Items are the dicts ``ShapesTrainSet`` yields
(``{"segments": [...], "drop_caption": bool}``), so ``hybrid.sequence.SampleBuilder`` collates
and packs them unchanged.

Manifest schema (one JSON object per line; blank lines and lines starting with ``#`` ignored;
image paths are relative to the manifest's folder, absolute paths are allowed; unknown keys and
wrong types make the line a ``bad_record``)::

    {"type": "caption", "image": "img/0.png", "text": "a red circle"}
        -> ["a red circle", <generated image>]            (caption dropout: pure f(seed, index))
    {"type": "vqa", "image": "img/1.png", "question": "What colour?", "answer": "red"}
        -> [ImageSegment(img, "und"), TextSegment(question, loss=False), " " + answer]
    {"type": "interleaved", "segments": [{"text": "Here:"}, {"image": "img/2.png"}, ...]}
        -> ["Here:", <generated image>, ...]              (an image may carry "role": "und")

Webdataset shards: tar members grouped by key (``dir/key.ext``, the extension is everything after
the first dot of the file name). ``key.txt`` + ``key.png|jpg|jpeg|webp`` is a caption pair;
``key.json`` holds a manifest record whose "image" fields name members of the same key by
extension (``{"type": "vqa", "image": "png", ...}``, ``{"image": "1.png"}`` for ``key.1.png``).
Members are read in place, never extracted; non-regular members (links, devices) are ignored.

A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``): one row per caption (or vqa)
record, its fields read from the columns ``columns=`` names (``HFDatasetSource``).

Image policy (``decode_image``): ``encoders.images``, the decoder the pipeline uses too. EXIF
orientation is applied; 1, L, LA, P, PA, RGBA, RGBX, CMYK, YCbCr, LAB, HSV are converted to RGB
(alpha composited on white); 16-bit / 32-bit integer grey ("I;16*", "I") is scaled to 8 bit
(value * 255 // 65535, "I" clipped to 0..65535 first); float ("F") and any other mode is refused
as ``unsupported_mode``. With ``convert_modes=False`` every non-RGB image is refused instead. The
image is resized (bicubic) so its shorter side is ``image_size`` and center-cropped to a square
(the pipeline pads instead); an image already at ``image_size`` is untouched. An image is refused
before decoding if its header says width*height > ``max_pixels`` (and PIL's own
decompression-bomb check is turned into the same reason).

Problems and their reasons: ``missing_file``, ``zero_size`` (empty file or a 0-pixel side),
``corrupt_image`` (unidentifiable, truncated, or failing to decode), ``unsupported_mode``,
``too_large``, ``empty_text``, ``long_text`` (more than ``max_chars`` characters, or, with a
``SampleLimit``, a tokenized sample longer than ``seq_len``), ``bad_record`` (malformed JSON,
schema violation, a webdataset key without usable members).

``on_error="raise"`` raises ``BadItemError`` naming the file and reason. ``on_error="skip"``:
``source[i]`` is the first good record at or after ``i`` (wrapping around), a pure function of
``i``, so sequential order and exact resume hold. A bad record is counted only when it is asked
for at its own index (so one pass counts each bad record exactly once, however many indices
skip over it), two ways: the item returned for ``i`` says so (``item["skipped"]`` = the reason,
else None), so a consumer counts exactly what it trained on, across resumes and read-ahead (the
trainer does); and a ``SkipCounter`` in shared memory counts what was read, DataLoader workers
(fork or spawn) included (``counter.summary()``).

Commands::

    python -m train.validate data/manifest.jsonl --image-size 32
    python -m train.validate 'data/shards-{000..003}.tar' --max-pixels 16777216
    /work/main/.venv/bin/python -m pytest -q tests/test_sources.py
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from encoders.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    fit_square,
    open_image,
    to_rgb,
)
from hybrid.sequence import ImageSegment, TextSegment

log = logging.getLogger("train.sources")

REASONS = ("missing_file", "zero_size", "corrupt_image", "unsupported_mode", "too_large",
           "empty_text", "long_text", "bad_record")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
DEFAULT_MAX_CHARS = 100_000


@dataclass(frozen=True)
class BadItem:
    reason: str  # one of REASONS
    path: str  # the file (or "shard.tar:member", or "manifest.jsonl:line")
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class BadItemError(ValueError):
    """A record that cannot become a training item; ``.bad`` says which file and why."""

    def __init__(self, bad: BadItem):
        super().__init__(str(bad))
        self.bad = bad


def _bad(reason: str, path: str, detail: str = "") -> BadItemError:
    assert reason in REASONS, reason
    return BadItemError(BadItem(reason, str(path), detail))


class SkipCounter:
    """Counts of skipped items by reason, in a shared-memory tensor guarded by a process lock:
    a copy pickled into a DataLoader worker (fork or spawn) adds to the same counts."""

    def __init__(self) -> None:
        self.counts = torch.zeros(len(REASONS), dtype=torch.int64).share_memory_()
        self.lock = multiprocessing.get_context().Lock()

    def add(self, reason: str) -> None:
        with self.lock:
            self.counts[REASONS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {r: int(c) for r, c in zip(REASONS, self.counts.tolist()) if c}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def summary(self) -> str:
        d = self.as_dict()
        return f"skipped {sum(d.values())} items" + (": " + ", ".join(f"{k}={v}" for k, v in d.items()) if d else "")


@dataclass
class SampleLimit:
    """Refuse samples whose tokenized length exceeds ``seq_len`` (what ``pack`` would reject):
    ``<bos>`` + text tokens + (``<boi>`` + N + ``<eoi>``) per image + ``<eos>``."""

    tokenizer: Any
    seq_len: int
    gen_tokens: int
    und_tokens: int

    @classmethod
    def from_builder(cls, builder) -> "SampleLimit":
        return cls(builder.tokenizer, builder.seq_len, builder.cfg.image_tokens, builder.cfg.und_tokens)

    def length(self, segments: Sequence, drop_caption: bool = False) -> int:
        n = 2
        texts = [s for s in segments if isinstance(s, (str, TextSegment))]
        if drop_caption and len(segments) == 2 and len(texts) == 1:
            texts = []
        for s in texts:
            n += len(self.tokenizer.encode(s if isinstance(s, str) else s.text, add_special_tokens=False))
        for s in segments:
            if isinstance(s, (Image.Image, ImageSegment)):
                role = s.role if isinstance(s, ImageSegment) else "gen"
                n += 2 + (self.gen_tokens if role == "gen" else self.und_tokens)
        return n


# ----------------------------------------------------------------------------------- images


def decode_image(data: bytes, where: str, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 convert_modes: bool = True) -> Image.Image:
    """Image file bytes -> an RGB ``image_size`` x ``image_size`` PIL image, or ``BadItemError``
    (see the module doc for the policy). The decoding is ``encoders.images``', shared with the
    pipeline; the geometry here is the training crop."""
    try:
        im = open_image(data, where, max_pixels)
        if im.mode != "RGB" and not convert_modes:
            raise _bad("unsupported_mode", where, f"mode {im.mode!r} (convert_modes=False)")
        return fit_square(to_rgb(im, where), image_size, "crop")
    except ImageError as e:  # its reasons are REASONS' own names
        raise _bad(e.reason, e.where, e.detail) from None


# ---------------------------------------------------------------------------------- records

_SCHEMA: dict[str, dict[str, type]] = {
    "caption": {"image": str, "text": str},
    "vqa": {"image": str, "question": str, "answer": str},
    "interleaved": {"segments": list},
}


def check_record(rec: Any, where: str) -> dict:
    """Validate one manifest record against the schema (exact keys and types)."""
    if not isinstance(rec, dict):
        raise _bad("bad_record", where, f"a record must be a JSON object, got {type(rec).__name__}")
    kind = rec.get("type")
    if kind not in _SCHEMA:
        raise _bad("bad_record", where, f"type must be one of {sorted(_SCHEMA)}, got {kind!r}")
    want = _SCHEMA[kind]
    keys = set(rec) - {"type"}
    if keys != set(want):
        extra, missing = sorted(keys - set(want)), sorted(set(want) - keys)
        raise _bad("bad_record", where, f"{kind} record: unknown keys {extra}, missing keys {missing}")
    for k, tp in want.items():
        if not isinstance(rec[k], tp):
            raise _bad("bad_record", where, f"{k!r} must be {tp.__name__}, got {type(rec[k]).__name__}")
    if kind == "interleaved":
        if not rec["segments"]:
            raise _bad("bad_record", where, "interleaved record with no segments")
        for s in rec["segments"]:
            ok = isinstance(s, dict) and (
                (set(s) == {"text"} and isinstance(s["text"], str))
                or (set(s) in ({"image"}, {"image", "role"}) and isinstance(s["image"], str)
                    and s.get("role", "gen") in ("gen", "und")))
            if not ok:
                raise _bad("bad_record", where, f"bad interleaved segment {s!r:.80}: expected "
                           "{'text': str} or {'image': str[, 'role': 'gen'|'und']}")
    return rec


class RecordSource(Dataset):
    """Base: ``n_records`` raw records, ``load_record(j, drop_rng)`` -> segments (or raises
    ``BadItemError``); indexing with skip-or-raise and counting (see the module doc)."""

    name = "source"

    def __init__(self, image_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_chars: int = DEFAULT_MAX_CHARS,
                 limit: SampleLimit | None = None, convert_modes: bool = True, caption_dropout: float = 0.0,
                 on_error: str = "skip", seed: int = 0, length: int | None = None,
                 counter: SkipCounter | None = None):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size, self.max_pixels, self.max_chars = image_size, max_pixels, max_chars
        self.limit, self.convert_modes, self.caption_dropout = limit, convert_modes, caption_dropout
        self.on_error, self.seed, self.length = on_error, seed, length
        self.tag = "0"  # MixedSource numbers its sources, so their dropout draws differ
        self.counter = counter if counter is not None else SkipCounter()

    # subclasses: n_records, record_path(j), read_record(j) -> (record, fetch(name) -> (bytes, where))
    n_records: int

    def record_path(self, j: int) -> str:
        raise NotImplementedError

    def read_record(self, j: int) -> tuple[Any, Callable[[str], tuple[bytes, str]]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.length if self.length is not None else self.n_records

    def _text(self, text: str, where: str) -> str:
        if not text.strip():
            raise _bad("empty_text", where)
        if len(text) > self.max_chars:
            raise _bad("long_text", where, f"{len(text)} characters > max_chars={self.max_chars}")
        return text

    def _image(self, fetch: Callable[[str], tuple[bytes, str]], name: str) -> Image.Image:
        data, where = fetch(name)
        return decode_image(data, where, self.image_size, self.max_pixels, self.convert_modes)

    def load(self, j: int) -> dict:
        """Record ``j`` as an item dict, or ``BadItemError``."""
        rec, fetch = self.read_record(j)
        where = self.record_path(j)
        rec = check_record(rec, where)
        kind = rec["type"]
        drop = False
        if kind == "caption":
            segs: list = [self._text(rec["text"], where), self._image(fetch, rec["image"])]
            rng = random.Random(f"{self.seed}:{self.tag}:{j}")  # not the path: data may move
            drop = rng.random() < self.caption_dropout
        elif kind == "vqa":
            segs = [ImageSegment(self._image(fetch, rec["image"]), "und"),
                    TextSegment(self._text(rec["question"], where), loss=False),
                    " " + self._text(rec["answer"], where)]
        else:
            segs = []
            for s in rec["segments"]:
                if "text" in s:
                    segs.append(self._text(s["text"], where))
                else:
                    img = self._image(fetch, s["image"])
                    segs.append(img if s.get("role", "gen") == "gen" else ImageSegment(img, "und"))
        if self.limit is not None:
            n = self.limit.length(segs, drop)
            if n > self.limit.seq_len:
                raise _bad("long_text", where, f"{n} tokens > seq_len={self.limit.seq_len}")
        return {"segments": segs, "drop_caption": drop}

    def check(self, j: int) -> BadItem | None:
        """The problem with record ``j``, if any (what ``validate`` reports)."""
        try:
            self.load(j)
        except BadItemError as e:
            return e.bad
        return None

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        n = self.n_records
        if n == 0:
            raise ValueError(f"{self.name} has no records")
        start = index % n
        skipped = None  # the reason record `start` was skipped, carried by the item standing in for it
        for step in range(n):
            j = (start + step) % n
            try:
                return {**self.load(j), "skipped": skipped}
            except BadItemError as e:
                if self.on_error == "raise":
                    raise
                if step == 0:  # counted only at its own index: one pass counts it once
                    self.counter.add(e.bad.reason)
                    skipped = e.bad.reason
                    log.warning("skipping %s", e.bad)
        raise ValueError(f"{self.name}: every one of its {n} records is bad; run `python -m train.validate`")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _bad("missing_file", str(path)) from None
    except IsADirectoryError:
        raise _bad("missing_file", str(path), "is a directory") from None
    except OSError as e:
        raise _bad("missing_file", str(path), f"unreadable: {e}") from None


class JsonlSource(RecordSource):
    """A JSONL manifest (schema in the module doc); image paths relative to its folder."""

    def __init__(self, manifest: str | Path, image_size: int, **kw: Any):
        super().__init__(image_size, **kw)
        self.manifest = Path(manifest)
        self.name = str(self.manifest)
        self.root = self.manifest.parent
        self.lines: list[tuple[int, str]] = []
        with self.manifest.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    self.lines.append((lineno, line))
        self.n_records = len(self.lines)

    def record_path(self, j: int) -> str:
        return f"{self.manifest}:{self.lines[j][0]}"

    def read_record(self, j: int) -> tuple[Any, Callable[[str], tuple[bytes, str]]]:
        try:
            rec = json.loads(self.lines[j][1])
        except json.JSONDecodeError as e:
            raise _bad("bad_record", self.record_path(j), f"invalid JSON: {e}") from None
        return rec, lambda name: (_read_file(self.root / name), str(self.root / name))


def expand_braces(pattern: str) -> list[str]:
    """``shards-{000..003}.tar`` -> the four names (zero padding kept); then shell globbing."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a) if a.startswith("0") else 0
        out = []
        for k in range(int(a), int(b) + 1):
            out += expand_braces(pattern[: m.start()] + str(k).zfill(width) + pattern[m.end():])
        return out
    hits = sorted(glob.glob(pattern))
    return hits if any(c in pattern for c in "*?[") else [pattern]


class WebDatasetSource(RecordSource):
    """Webdataset tar shards (layout in the module doc); members are read in place."""

    def __init__(self, shards: str | Sequence[str], image_size: int, **kw: Any):
        super().__init__(image_size, **kw)
        self.shards = expand_braces(shards) if isinstance(shards, str) else list(shards)
        self.name = shards if isinstance(shards, str) else ",".join(self.shards)
        self.samples: list[tuple[int, str, dict[str, tarfile.TarInfo]]] = []  # (shard, key, ext -> member)
        self.shard_errors: list[BadItem] = []
        for s, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard, "r:*") as tf:
                    members = tf.getmembers()
            except FileNotFoundError:
                self.shard_errors.append(BadItem("missing_file", shard))
                continue
            except (tarfile.TarError, OSError, EOFError) as e:
                self.shard_errors.append(BadItem("bad_record", shard, f"unreadable tar: {e}"))
                continue
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            for m in members:
                if not m.isreg():
                    continue
                d, base = os.path.split(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{d}/{stem}" if d else stem
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = m
            self.samples += [(s, k, groups[k]) for k in order]
        self.n_records = len(self.samples)
        self._handles: dict[int, tarfile.TarFile] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross into worker processes
        return state

    def _tar(self, s: int) -> tarfile.TarFile:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = tarfile.open(self.shards[s], "r:*")
        return self._handles[s]

    def record_path(self, j: int) -> str:
        s, key, _ = self.samples[j]
        return f"{self.shards[s]}:{key}"

    def read_record(self, j: int) -> tuple[Any, Callable[[str], tuple[bytes, str]]]:
        s, key, members = self.samples[j]
        where = self.record_path(j)

        def member_bytes(ext: str) -> bytes:
            m = members.get(ext)
            if m is None:
                raise _bad("missing_file", f"{where}.{ext}", "no such member")
            f = self._tar(s).extractfile(m)
            if f is None:
                raise _bad("missing_file", f"{where}.{ext}", "not a regular file")
            try:
                return f.read()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise _bad("corrupt_image", f"{where}.{ext}", f"tar read failed: {e}") from None

        def fetch(ext: str) -> tuple[bytes, str]:
            return member_bytes(ext.lower()), f"{where}.{ext}"

        if "json" in members:
            try:
                rec = json.loads(member_bytes("json").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _bad("bad_record", f"{where}.json", f"invalid JSON: {e}") from None
            return rec, fetch
        imgs = [e for e in IMAGE_EXTS if e in members]
        if "txt" not in members or not imgs:
            raise _bad("bad_record", where, f"needs key.txt + key.<image> or key.json, has {sorted(members)}")
        try:
            text = member_bytes("txt").decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad("bad_record", f"{where}.txt", f"not UTF-8: {e}") from None
        return {"type": "caption", "image": imgs[0], "text": text}, fetch


class HFDatasetSource(RecordSource):
    """A folder written by ``datasets.Dataset.save_to_disk`` (one split: a ``DatasetDict``
    folder is refused with its split names; pass ``folder/<split>``). ``columns`` maps record
    fields to column names, e.g. ``{"image": "img", "text": "caption"}`` (type "caption") or
    ``{"image": ..., "question": ..., "answer": ...}`` (type "vqa"); the default is
    ``{"image": "image", "text": "text"}``. The image column is a ``datasets.Image`` (read as its
    stored bytes, whether the folder was written from file bytes or PIL images), raw bytes, or a
    file path; its pixels go through ``decode_image`` like every other source's. A row's problems
    are counted by the same reasons (a null text is a ``bad_record``, as JSON null would be)."""

    def __init__(self, folder: str | Path, image_size: int, columns: dict[str, str] | None = None, **kw: Any):
        super().__init__(image_size, **kw)
        # imported here: `datasets` (with pandas / pyarrow) takes a second to import, and only
        # this source needs it
        try:
            from datasets import DatasetDict, load_from_disk
            from datasets import Image as HFImage
        except ImportError:
            raise ImportError("reading a Hugging Face datasets folder needs the `datasets` package, a "
                              "dependency of this project (pip install -e .); or convert it to a JSONL "
                              "manifest") from None

        columns = dict(columns or {"image": "image", "text": "text"})
        self.kind = "vqa" if "question" in columns else "caption"
        if set(columns) != set(_SCHEMA[self.kind]) or not all(isinstance(v, str) for v in columns.values()):
            raise ValueError(f"columns must map exactly {sorted(_SCHEMA[self.kind])} to column names, got {columns}")
        self.columns, self.folder, self.name = columns, Path(folder), str(folder)
        ds = load_from_disk(str(folder))
        if isinstance(ds, DatasetDict):  # which split is meant is not ours to guess
            splits = sorted(ds)
            raise ValueError(f"{folder} holds the splits {splits}; pass one of their folders, e.g. "  # noqa: TRY004
                             f"{Path(folder) / (splits[0] if splits else 'train')}")
        missing = [c for c in columns.values() if c not in ds.column_names]
        if missing:
            raise ValueError(f"{folder}: no column {missing} (columns: {ds.column_names}); name the columns "
                             f"for {sorted(columns)} with columns= (train.validate: --columns field=column,...)")
        # only the mapped columns: another image column would otherwise be decoded on every row
        ds = ds.select_columns(list(dict.fromkeys(columns.values())))
        img_col = columns["image"]
        if isinstance(ds.features[img_col], HFImage):
            ds = ds.cast_column(img_col, HFImage(decode=False))  # bytes, decoded by our policy
        self.ds = ds
        self.n_records = len(ds)

    def record_path(self, j: int) -> str:
        return f"{self.folder}[{j}]"

    def read_record(self, j: int) -> tuple[Any, Callable[[str], tuple[bytes, str]]]:
        row = self.ds[j]
        where = self.record_path(j)
        rec = {"type": self.kind, **{k: ("image" if k == "image" else row[c]) for k, c in self.columns.items()}}
        img = row[self.columns["image"]]

        def fetch(_: str) -> tuple[bytes, str]:
            if isinstance(img, dict) and img.get("bytes") is not None:
                return img["bytes"], where
            if isinstance(img, dict) and img.get("path"):
                return _read_file(Path(img["path"])), img["path"]
            if isinstance(img, (bytes, bytearray)):
                return bytes(img), where
            if isinstance(img, str):
                return _read_file(Path(img)), img
            raise _bad("missing_file", where, "no image in the row")

        return rec, fetch


class MixedSource(Dataset):
    """Several sources with weights: index ``i`` draws the source (by weight) and a record of it
    (uniformly, with replacement) from ``random.Random(f"{seed}:mix:{i}")``: a pure function of
    ``(seed, i)``. Every source keeps its own skip policy; they share ``counter``."""

    def __init__(self, sources: Sequence[tuple[RecordSource, float]], length: int, seed: int = 0):
        if not sources:
            raise ValueError("MixedSource needs at least one (source, weight)")
        for src, w in sources:
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
                raise ValueError(f"weights must be positive numbers, got {w!r} for {src.name}")
            if len(src) == 0:
                raise ValueError(f"source {src.name} is empty")
        self.sources = [s for s, _ in sources]
        total = float(sum(w for _, w in sources))
        self.cum = np.cumsum([w / total for _, w in sources]).tolist()
        self.length, self.seed = length, seed
        self.counter = self.sources[0].counter
        for k, s in enumerate(self.sources):
            s.counter, s.tag = self.counter, str(k)

    def __len__(self) -> int:
        return self.length

    def pick(self, index: int) -> tuple[int, int]:
        rng = random.Random(f"{self.seed}:mix:{index}")
        u = rng.random()
        k = next((k for k, c in enumerate(self.cum) if u < c), len(self.cum) - 1)
        return k, rng.randrange(self.sources[k].n_records)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        k, j = self.pick(index)
        return self.sources[k][j]


# ------------------------------------------------------------------------ opening by spec


def open_source(path: str, image_size: int, **kw: Any) -> RecordSource:
    """``*.jsonl`` -> JsonlSource; ``*.tar`` (globs / ``{000..003}`` allowed) -> WebDatasetSource;
    a folder -> HFDatasetSource (``columns=`` passed through)."""
    if path.endswith((".jsonl", ".json")):
        return JsonlSource(path, image_size, **kw)
    if ".tar" in path:
        return WebDatasetSource(path, image_size, **kw)
    if Path(path).is_dir():
        return HFDatasetSource(path, image_size, **kw)
    raise ValueError(f"{path!r}: expected a .jsonl manifest, .tar shards or a datasets folder")


_SPEC_KEYS: dict[str, tuple[type, ...]] = {"path": (str,), "weight": (int, float), "columns": (dict,)}


def build_sources(specs: Sequence[dict], image_size: int, length: int, *, seed: int = 0,
                  **kw: Any) -> Dataset:
    """Training data from config entries ``[{"path": ..., "weight": 1.0, "columns": {...}}]``
    (unknown keys and wrong types are errors). One source with no weight is used directly
    (sequential, wrapping around after its last record); several are mixed."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ValueError("data sources: expected a non-empty list of {path, weight[, columns]}")
    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"data source {i}: expected a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown or "path" not in spec:
            raise ValueError(f"data source {i}: unknown keys {unknown} (allowed: {sorted(_SPEC_KEYS)}; 'path' is required)")
        for k, v in spec.items():
            if not isinstance(v, _SPEC_KEYS[k]) or isinstance(v, bool):
                raise ValueError(f"data source {i}: {k!r} must be {'/'.join(t.__name__ for t in _SPEC_KEYS[k])}, "
                                 f"got {type(v).__name__}")
        extra = {"columns": spec["columns"]} if "columns" in spec else {}
        built.append((open_source(spec["path"], image_size, seed=seed, **kw, **extra), spec.get("weight", 1.0)))
    if len(built) == 1 and "weight" not in specs[0]:
        src = built[0][0]
        src.length = length
        return src
    return MixedSource(built, length, seed)


def parse_data_spec(spec: str | dict) -> list[dict]:
    """A trainer config value -> ``build_sources`` entries. A string ``"a.jsonl"`` (one source,
    sequential) or ``"a.jsonl=3,shards-{000..003}.tar=1"`` (weighted mix; no commas in paths), or
    a mapping ``{path: weight}`` as YAML writes it."""
    if isinstance(spec, dict):
        out = []
        for path, w in spec.items():
            if not isinstance(path, str) or not isinstance(w, (int, float)) or isinstance(w, bool):
                raise ValueError(f"data: expected {{path: weight}}, got {path!r}: {w!r}")
            out.append({"path": path, "weight": w})
        return out
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data: expected a path, 'path=weight,...' or {{path: weight}}, got {spec!r}")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        return [{"path": parts[0]}]
    out = []
    for p in parts:
        path, eq, w = p.rpartition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if not eq or not path or weight is None:
            raise ValueError(f"data: {p!r} is not 'path=weight' (a positive number)")
        out.append({"path": path, "weight": weight})
    return out


def iter_problems(src: RecordSource) -> Iterator[BadItem]:
    """Every problem of a source: unreadable shards, then each bad record in order."""
    yield from getattr(src, "shard_errors", [])
    for j in range(src.n_records):
        bad = src.check(j)
        if bad is not None:
            yield bad
