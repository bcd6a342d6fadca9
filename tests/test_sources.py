"""File data sources: a generated data set with good items, convertible modes and one of each bad
kind, as a JSONL manifest and as webdataset shards.

    /work/main/.venv/bin/python -m pytest -q tests/test_sources.py
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from hybrid.sequence import ImageSegment, SampleBuilder, TextSegment
from train.sources import (BadItemError, HFDatasetSource, JsonlSource, MixedSource, SampleLimit, SkipCounter,
                           WebDatasetSource, build_sources, decode_image, iter_problems, parse_data_spec)
from train.validate import main as validate_main

S = 32
MAX_PIXELS = 256 * 256
MAX_CHARS = 200
REPO = Path(__file__).resolve().parents[1]


def png_bytes(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG", **kw)
    return b.getvalue()


def raw_png_header(w: int, h: int) -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def noise(mode: str = "RGB", size=(S, S), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (size[1], size[0]) if ch is None else (size[1], size[0], ch)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    if mode in ("RGBA", "LA"):
        a[..., -1] = np.where(np.arange(size[0]) < size[0] // 2, 0, 255)[None, :]  # left transparent
    return Image.fromarray(a, mode)


def make_files(root: Path) -> dict[str, bytes]:
    """Every image file of the data set (name -> bytes)."""
    f: dict[str, bytes] = {}
    f["rgb.png"] = png_bytes(noise(seed=1))
    f["rgb2.png"] = png_bytes(noise(seed=2))
    f["wide.png"] = png_bytes(noise(size=(48, 40), seed=3))
    f["l.png"] = png_bytes(noise("L", seed=4))
    f["la.png"] = png_bytes(noise("LA", seed=5))
    f["p.png"] = png_bytes(noise(seed=6).quantize(16))
    f["rgba.png"] = png_bytes(noise("RGBA", seed=7))
    cmyk = io.BytesIO()
    noise(seed=8).convert("CMYK").save(cmyk, format="TIFF")
    f["cmyk.tif"] = cmyk.getvalue()
    f["i16.png"] = png_bytes(Image.fromarray((np.arange(S * S).reshape(S, S) * 64).astype(np.uint16)))
    exif_src = Image.new("RGB", (32, 16), (255, 0, 0))
    exif_src.paste((0, 0, 255), (16, 0, 32, 16))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    f["exif.png"] = png_bytes(exif_src, exif=exif)
    # bad ones
    f["corrupt.png"] = bytes(np.random.default_rng(9).integers(0, 256, 500, dtype=np.uint8))
    f["truncated.png"] = png_bytes(noise(seed=10))[:1500]
    f["empty.png"] = b""
    f["zero_hdr.png"] = raw_png_header(0, 16)
    f["big.png"] = png_bytes(Image.new("RGB", (300, 300), (10, 200, 30)))
    f["bomb.png"] = raw_png_header(30000, 30000)
    fl = io.BytesIO()
    Image.fromarray(np.ones((S, S), np.float32), "F").save(fl, format="TIFF")
    f["float.tif"] = fl.getvalue()
    for name, data in f.items():
        (root / name).write_bytes(data)
    return f


GOOD = [
    {"type": "caption", "image": "rgb.png", "text": "a photo of a red circle"},
    {"type": "vqa", "image": "rgb2.png", "question": "What colour?", "answer": "red"},
    {"type": "interleaved", "segments": [{"text": "Here is a picture."}, {"image": "l.png"},
                                         {"text": "And another one below it."}, {"image": "p.png", "role": "und"}]},
    {"type": "caption", "image": "wide.png", "text": "a photo of two blue squares"},
    {"type": "caption", "image": "la.png", "text": "a photo of a green triangle"},
    {"type": "caption", "image": "rgba.png", "text": "a photo of a yellow circle"},
    {"type": "caption", "image": "cmyk.tif", "text": "a photo of a red circle"},
    {"type": "caption", "image": "i16.png", "text": "a photo of a blue circle"},
    {"type": "caption", "image": "exif.png", "text": "a photo of a red square"},
]
BAD = [  # (record or raw line, reason, the name the problem line must carry)
    ({"type": "caption", "image": "corrupt.png", "text": "x y"}, "corrupt_image", "corrupt.png"),
    ({"type": "caption", "image": "truncated.png", "text": "x y"}, "corrupt_image", "truncated.png"),
    ({"type": "caption", "image": "empty.png", "text": "x y"}, "zero_size", "empty.png"),
    ({"type": "vqa", "image": "zero_hdr.png", "question": "q", "answer": "a"}, "zero_size", "zero_hdr.png"),
    ({"type": "caption", "image": "big.png", "text": "x y"}, "too_large", "big.png"),
    ({"type": "caption", "image": "bomb.png", "text": "x y"}, "too_large", "bomb.png"),
    ({"type": "caption", "image": "float.tif", "text": "x y"}, "unsupported_mode", "float.tif"),
    ({"type": "caption", "image": "missing.png", "text": "x y"}, "missing_file", "missing.png"),
    ({"type": "caption", "image": "rgb.png", "text": "   "}, "empty_text", None),
    ({"type": "caption", "image": "rgb.png", "text": "long " * 60}, "long_text", None),
    ("{not json", "bad_record", None),
    ({"type": "caption", "image": "rgb.png", "text": "x", "extra": 1}, "bad_record", None),
]
EXPECTED = dict(Counter(reason for _, reason, _ in BAD))


def records() -> list:
    """Good and bad interleaved (bad first and last, so skipping wraps around)."""
    out = []
    for i in range(max(len(GOOD), len(BAD))):
        if i < len(BAD):
            out.append(BAD[i][0])
        if i < len(GOOD):
            out.append(GOOD[i])
    out.append(BAD[-1][0])
    return out


EXPECTED_WITH_LAST = {**EXPECTED, "bad_record": EXPECTED["bad_record"] + 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_files(root)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records()]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def shards(data) -> str:
    """The same records as webdataset shards: two tars; the first good caption as key.txt +
    key.png, everything else as key.json naming members of its key by extension."""
    recs = records()
    tars = [tarfile.open(data / f"shards-{s:03d}.tar", "w") for s in range(2)]

    def add(tf, name, payload: bytes):
        ti = tarfile.TarInfo(name)
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))

    for k, rec in enumerate(recs):
        tf, key = tars[2 * k // len(recs)], f"s{k:04d}"  # in order: first half in shard 0
        if rec is GOOD[0]:
            add(tf, f"{key}.txt", rec["text"].encode())
            add(tf, f"{key}.png", (data / rec["image"]).read_bytes())
            continue
        if isinstance(rec, str):
            add(tf, f"{key}.json", rec.encode())
            continue
        rec = json.loads(json.dumps(rec))
        imgs = [rec] if "image" in rec else [s for s in rec.get("segments", []) if "image" in s]
        for m, holder in enumerate(imgs):
            name = holder["image"]
            ext = f"{m}.{name.rsplit('.', 1)[1]}"
            if (data / name).exists():
                add(tf, f"{key}.{ext}", (data / name).read_bytes())
            holder["image"] = ext
        add(tf, f"{key}.json", json.dumps(rec).encode())
    for tf in tars:
        tf.close()
    return str(data / "shards-{000..001}.tar")


def make(kind: str, data: Path, shards: str, **kw):
    kw = {"max_pixels": MAX_PIXELS, "max_chars": MAX_CHARS, **kw}
    if kind == "jsonl":
        return JsonlSource(data / "manifest.jsonl", S, **kw)
    return WebDatasetSource(shards, S, **kw)


def arr(im) -> np.ndarray:
    return np.asarray(im.image if isinstance(im, ImageSegment) else im)


def good_indices(src) -> list[int]:
    return [j for j in range(src.n_records) if src.check(j) is None]


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_skip_counts_and_pixels(kind, data, shards):
    src = make(kind, data, shards)
    recs = records()
    assert src.n_records == len(recs)
    items = [src[i] for i in range(len(src))]
    assert src.counter.as_dict() == EXPECTED_WITH_LAST
    assert src.counter.summary().startswith(f"skipped {sum(EXPECTED_WITH_LAST.values())} items: ")
    good = good_indices(src)
    assert [recs[j] for j in good] == GOOD  # every good and convertible record loads
    for i in range(len(recs)):  # a bad index yields the next good record (wrapping around)
        nxt = next((j for j in good if j >= i), good[0])
        a, b = items[i]["segments"], src.load(nxt)["segments"]
        assert len(a) == len(b) and all(type(x) is type(y) for x, y in zip(a, b))
    byname = {}
    for j in good:
        rec, item = recs[j], src.load(j)
        names = [rec["image"]] if "image" in rec else [s["image"] for s in rec["segments"] if "image" in s]
        ims = [s for s in item["segments"] if isinstance(s, (Image.Image, ImageSegment))]
        for n, im in zip(names, ims):
            byname[n] = arr(im)
            assert byname[n].shape == (S, S, 3) and byname[n].dtype == np.uint8
    raw = {n: Image.open(data / n) for n in ("rgb.png", "l.png", "p.png", "la.png", "rgba.png", "cmyk.tif")}
    for n in ("rgb.png", "l.png", "p.png", "cmyk.tif"):
        assert np.array_equal(byname[n], np.asarray(raw[n].convert("RGB"))), n
    for n in ("la.png", "rgba.png"):  # alpha composited on white: left half transparent
        assert (byname[n][:, : S // 2] == 255).all(), n
        assert np.array_equal(byname[n][:, S // 2:], np.asarray(raw[n].convert("RGB"))[:, S // 2:]), n
    i16 = (np.arange(S * S).reshape(S, S) * 64).astype(np.int64) * 255 // 65535
    assert np.array_equal(byname["i16.png"], np.repeat(i16[..., None], 3, -1).astype(np.uint8))
    ex = byname["exif.png"]  # rotated upright: top half red, bottom half blue
    assert ex[2, -2, 0] > 200 and ex[2, -2, 2] < 50 and ex[-2, 2, 2] > 200


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_item_structure(kind, data, shards):
    src = make(kind, data, shards, caption_dropout=0.5, seed=3)
    recs = records()
    j_vqa, j_int = recs.index(GOOD[1]), recs.index(GOOD[2])
    vqa = src.load(j_vqa)["segments"]
    assert isinstance(vqa[0], ImageSegment) and vqa[0].role == "und"
    assert vqa[1] == TextSegment("What colour?", loss=False) and vqa[2] == " red"
    inter = src.load(j_int)["segments"]
    assert isinstance(inter[1], Image.Image) and isinstance(inter[3], ImageSegment) and inter[3].role == "und"
    caps = [j for j, r in enumerate(recs) if isinstance(r, dict) and r in GOOD and r["type"] == "caption"]
    drops = [src.load(j)["drop_caption"] for j in caps]
    again = make(kind, data, shards, caption_dropout=0.5, seed=3)
    assert drops == [again.load(j)["drop_caption"] for j in caps]  # pure function of (seed, index)
    assert any(drops) and not all(drops)
    assert not src.load(j_vqa)["drop_caption"]


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_raise_names_the_file(kind, data, shards):
    src = make(kind, data, shards, on_error="raise")
    recs = records()
    seen = Counter()
    for i, rec in enumerate(recs):
        if rec in GOOD:
            src[i]
            continue
        with pytest.raises(BadItemError) as e:
            src[i]
        bad = next(b for b in BAD if b[0] == rec)
        assert e.value.bad.reason == bad[1]
        if bad[2] and not (kind == "wds" and bad[1] == "missing_file"):
            assert bad[2].rsplit(".", 1)[1] in str(e.value)
        if kind == "jsonl":
            assert (bad[2] or "manifest.jsonl") in str(e.value)
        seen[e.value.bad.reason] += 1
    assert dict(seen) == EXPECTED_WITH_LAST


@pytest.mark.parametrize("kind", ["jsonl", "wds"])
def test_validate(kind, data, shards, capsys):
    target = str(data / "manifest.jsonl") if kind == "jsonl" else shards
    rc = validate_main([target, "--image-size", str(S), "--max-pixels", str(MAX_PIXELS), "--max-chars", str(MAX_CHARS)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    problems, summary = out[:-1], out[-1]
    assert len(problems) == sum(EXPECTED_WITH_LAST.values())
    assert Counter(line.split(": ")[1].split(" ")[0] for line in problems) == Counter(EXPECTED_WITH_LAST)
    if kind == "jsonl":
        for _, reason, name in BAD:
            if name:
                assert any(name in line and reason in line for line in problems), name
    assert summary.startswith(f"skipped {sum(EXPECTED_WITH_LAST.values())} items: ")
    assert "bad_record=3" in summary and "corrupt_image=2" in summary


def test_validate_cli_clean_source(tmp_path):
    Image.new("RGB", (S, S), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"type": "caption", "image": "a.png", "text": "hi"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "train.validate", str(tmp_path / "m.jsonl")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("skipped 0 items")
    (tmp_path / "m.jsonl").write_text(json.dumps({"type": "caption", "image": "b.png", "text": "hi"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "train.validate", str(tmp_path / "m.jsonl")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "b.png: missing_file" in r.stdout


def test_convert_modes_off_refuses_non_rgb(data):
    with pytest.raises(BadItemError, match="unsupported_mode"):
        decode_image((data / "l.png").read_bytes(), "l.png", S, convert_modes=False)
    assert decode_image((data / "rgb.png").read_bytes(), "rgb.png", S, convert_modes=False).size == (S, S)


def test_counts_across_dataloader_workers(data):
    src = JsonlSource(data / "manifest.jsonl", S, max_pixels=MAX_PIXELS, max_chars=MAX_CHARS)
    loader = DataLoader(src, batch_size=3, num_workers=2, collate_fn=lambda b: len(b))
    assert sum(loader) == len(src)
    assert src.counter.as_dict() == EXPECTED_WITH_LAST


def _good_manifest(root: Path, name: str, n: int, text: str) -> Path:
    root.mkdir(exist_ok=True)
    for k in range(n):
        Image.new("RGB", (S, S), (k * 20 % 256, 100, 50)).save(root / f"{name}{k}.png")
    m = root / f"{name}.jsonl"
    m.write_text("".join(json.dumps({"type": "caption", "image": f"{name}{k}.png", "text": text}) + "\n" for k in range(n)))
    return m


def test_mixing_weights(tmp_path):
    a = _good_manifest(tmp_path / "a", "a", 5, "a photo of a red circle")
    b = _good_manifest(tmp_path / "b", "b", 3, "a photo of two blue squares")

    def mixed(seed):
        return MixedSource([(JsonlSource(a, S), 3.0), (JsonlSource(b, S), 1.0)], length=4000, seed=seed)

    m = mixed(0)
    picks = [m.pick(i) for i in range(len(m))]
    share = sum(k == 0 for k, _ in picks) / len(picks)
    assert abs(share - 0.75) < 0.03, share
    m0, m1 = mixed(0), mixed(1)
    assert picks == [m0.pick(i) for i in range(len(m))]  # deterministic
    assert picks != [m1.pick(i) for i in range(len(m))]
    assert {j for k, j in picks if k == 1} == {0, 1, 2}
    assert m[7]["segments"][0] == ("a photo of a red circle" if picks[7][0] == 0 else "a photo of two blue squares")
    built = build_sources([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], S, 4000)
    assert isinstance(built, MixedSource) and [built.pick(i) for i in range(50)] == picks[:50]
    single = build_sources([{"path": str(a)}], S, 12)
    assert len(single) == 12 and single[11]["segments"][0] == "a photo of a red circle"


@pytest.mark.parametrize("spec", [
    [{"path": "x.jsonl", "wieght": 1}],
    [{"path": "x.jsonl", "weight": "1"}],
    [{"path": 3}],
    [{"weight": 1.0}],
    [],
    ["x.jsonl"],
])
def test_source_config_rejects_unknown_keys_and_types(spec):
    with pytest.raises(ValueError):
        build_sources(spec, S, 10)


def test_builder_and_packing(tmp_path, data, shards, tokenizer, debug_cfg):
    builder = SampleBuilder(tokenizer, debug_cfg, seq_len=128)
    limit = SampleLimit.from_builder(builder)
    assert debug_cfg.image_size == S
    src = MixedSource([(make("jsonl", data, shards, limit=limit), 1.0), (make("wds", data, shards, limit=limit), 1.0)],
                      length=40, seed=0)
    n_gen = 0
    for batch in DataLoader(src, batch_size=8, collate_fn=builder):
        assert batch.input_ids.shape[1] == 128
        assert batch.gen_images.shape[1:] == (3, S, S) or batch.gen_images.numel() == 0
        n_gen += batch.gen_images.shape[0]
        assert (batch.document_ids.max(1).values >= 0).all()
    assert n_gen > 0
    # a caption that fits max_chars but not the 128-token context is a long_text
    m = _good_manifest(tmp_path / "long", "l", 2, "a photo of a red circle")
    lines = m.read_text().splitlines()
    lines[1] = json.dumps({"type": "caption", "image": "l1.png", "text": " ".join(["circle"] * 150)})
    m.write_text("\n".join(lines) + "\n")
    counter = SkipCounter()
    s = JsonlSource(m, S, limit=limit, counter=counter)
    assert [b.reason for b in iter_problems(s)] == ["long_text"]
    assert len(s[1]["segments"]) == 2 and counter.as_dict() == {"long_text": 1}
    builder([s[0], s[1]])  # packs without SequenceTooLongError


def test_parse_data_spec():
    assert parse_data_spec("a.jsonl") == [{"path": "a.jsonl"}]
    assert parse_data_spec("a.jsonl=3, s-{000..003}.tar=1.5") == [{"path": "a.jsonl", "weight": 3.0},
                                                                   {"path": "s-{000..003}.tar", "weight": 1.5}]
    assert parse_data_spec({"a.jsonl": 2}) == [{"path": "a.jsonl", "weight": 2}]
    for bad in ("a.jsonl=x", "a.jsonl,b.jsonl", "", {"a.jsonl": "2"}, {"a.jsonl": True}, 3):
        with pytest.raises(ValueError):
            parse_data_spec(bad)


# ------------------------------------------------------------------ Hugging Face datasets folder

# Caption rows (image file, text) with one of each problem a row can have; the same rows as a JSONL
# manifest are the reference: the folder must load and count exactly like it.
HF_ROWS = [
    ("rgb.png", "a photo of a red circle"),
    ("corrupt.png", "x y"),
    ("l.png", "a photo of a green triangle"),
    ("rgb2.png", "   "),
    ("wide.png", "a photo of two blue squares"),
    ("big.png", "x y"),
    ("rgba.png", "a photo of a yellow circle"),
    ("truncated.png", "x y"),
    ("p.png", "long " * 60),
    ("i16.png", "a photo of a blue circle"),
    ("missing.png", "x y"),
    ("cmyk.tif", "a photo of a red circle"),
    ("empty.png", "x y"),
    ("exif.png", "a photo of a red square"),
    ("float.tif", "x y"),
]
HF_EXPECTED = {"corrupt_image": 2, "empty_text": 1, "too_large": 1, "long_text": 1, "missing_file": 1,
               "zero_size": 1, "unsupported_mode": 1}
HF_FORMS = ("image_bytes", "image_pil", "binary", "path")


def save_hf(folder: Path, data: Path, form: str, img_col: str = "img", text_col: str = "caption",
            rows=HF_ROWS) -> Path:
    """The rows as a ``save_to_disk`` folder, the image column in one of the forms a datasets folder
    holds: a ``datasets.Image`` written from file bytes ("image_bytes") or from decoded in-memory
    PIL images ("image_pil"), a binary column, or a string column of file paths. A missing file is
    a null image (a path to nothing in the "path" form)."""
    import datasets  # a dependency: no skip when it is missing

    def cell(name: str):
        f = data / name
        if form == "path":
            return str(f)
        if not f.exists():
            return None
        raw = f.read_bytes()
        if form == "binary":
            return raw
        if form == "image_pil" and name != "exif.png":  # re-encoding would drop the EXIF tag
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    im.load()
                    return im.copy()  # in memory (no filename): datasets encodes its pixels
            except (OSError, ValueError):  # undecodable: stored as the bytes it is
                return {"bytes": raw, "path": None}
        return {"bytes": raw, "path": None}

    image_feature = {"image_bytes": datasets.Image(decode=False), "image_pil": datasets.Image(),
                     "binary": datasets.Value("binary"), "path": datasets.Value("string")}[form]
    features = datasets.Features({img_col: image_feature, text_col: datasets.Value("string")})
    ds = datasets.Dataset.from_dict({img_col: [cell(n) for n, _ in rows], text_col: [t for _, t in rows]},
                                    features=features)
    ds.save_to_disk(str(folder))
    return folder


def hf_twin_manifest(data: Path, rows=HF_ROWS) -> Path:
    m = data / "hf_twin.jsonl"
    m.write_text("".join(json.dumps({"type": "caption", "image": n, "text": t}) + "\n" for n, t in rows))
    return m


@pytest.mark.parametrize("form", HF_FORMS)
def test_hf_folder_loads_and_counts_like_jsonl(form, tmp_path, data):
    folder = save_hf(tmp_path / "hf", data, form)
    kw = {"max_pixels": MAX_PIXELS, "max_chars": MAX_CHARS, "caption_dropout": 0.5, "seed": 3}
    src = HFDatasetSource(folder, S, columns={"image": "img", "text": "caption"}, **kw)
    ref = JsonlSource(hf_twin_manifest(data), S, **kw)
    assert src.n_records == ref.n_records == len(HF_ROWS)
    problems = list(iter_problems(src))
    assert [b.reason for b in problems] == [b.reason for b in iter_problems(ref)]
    # a problem names the row, or the file a path column points to
    assert all(b.path.startswith(f"{folder}[") or (form == "path" and b.path.startswith(str(data)))
               for b in problems)
    items, ref_items = [src[i] for i in range(len(src))], [ref[i] for i in range(len(ref))]
    assert src.counter.as_dict() == ref.counter.as_dict() == HF_EXPECTED  # one pass: each bad row once
    for a, b in zip(items, ref_items):  # a bad row yields the next good one, in both
        assert a["segments"][0] == b["segments"][0] and a["drop_caption"] == b["drop_caption"]
        assert np.array_equal(np.asarray(a["segments"][1]), np.asarray(b["segments"][1]))
    assert any(it["drop_caption"] for it in items) and not all(it["drop_caption"] for it in items)
    ex = np.asarray(src.load(13)["segments"][1])  # EXIF orientation applied: rotated upright
    assert ex[2, -2, 0] > 200 and ex[2, -2, 2] < 50 and ex[-2, 2, 2] > 200
    on_raise = HFDatasetSource(folder, S, columns={"image": "img", "text": "caption"}, on_error="raise", **kw)
    with pytest.raises(BadItemError, match=r"(hf\[1\]|corrupt\.png): corrupt_image"):
        on_raise[1]
    with pytest.raises(BadItemError, match="empty_text"):
        on_raise[3]


def test_hf_folder_vqa_columns(tmp_path, data):
    import datasets

    ds = datasets.Dataset.from_dict({"picture": [{"bytes": (data / "rgb.png").read_bytes(), "path": None}],
                                     "q": ["What colour?"], "a": ["red"], "other": ["ignored"]},
                                    features=datasets.Features({"picture": datasets.Image(), "q": datasets.Value("string"),
                                                                "a": datasets.Value("string"),
                                                                "other": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "vqa"))
    src = HFDatasetSource(tmp_path / "vqa", S, columns={"image": "picture", "question": "q", "answer": "a"})
    segs = src[0]["segments"]
    assert isinstance(segs[0], ImageSegment) and segs[0].role == "und"
    assert np.array_equal(np.asarray(segs[0].image), np.asarray(Image.open(data / "rgb.png").convert("RGB")))
    assert segs[1] == TextSegment("What colour?", loss=False) and segs[2] == " red"
    assert src.ds.column_names == ["picture", "q", "a"]  # unmapped columns are never read
    with pytest.raises(ValueError, match="columns must map exactly"):
        HFDatasetSource(tmp_path / "vqa", S, columns={"image": "picture", "question": "q"})
    with pytest.raises(ValueError, match=r"no column \['image', 'text'\]"):
        HFDatasetSource(tmp_path / "vqa", S)  # the default columns: image, text
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]"):
        HFDatasetSource(tmp_path / "splits", S, columns={"image": "picture", "question": "q", "answer": "a"})
    assert len(HFDatasetSource(tmp_path / "splits" / "train", S,
                               columns={"image": "picture", "question": "q", "answer": "a"})) == 1


def test_hf_folder_through_the_trainer_spec(tmp_path, data, tokenizer, debug_cfg):
    """As train.trainer builds its data: ``data=<folder>`` (default columns image / text), and a
    folder mixed with a manifest; collated and packed by SampleBuilder in DataLoader workers."""
    folder = save_hf(tmp_path / "hf", data, "image_bytes", img_col="image", text_col="text")
    builder = SampleBuilder(tokenizer, debug_cfg, seq_len=128, truncate_long=False)
    kw = {"seed": 0, "caption_dropout": 0.1, "limit": SampleLimit.from_builder(builder), "on_error": "skip",
          "max_pixels": MAX_PIXELS}
    spec = parse_data_spec(str(folder))
    assert spec == [{"path": str(folder)}]
    src = build_sources(spec, S, 10_000_000, **kw)  # the trainer's length
    assert isinstance(src, HFDatasetSource) and len(src) == 10_000_000
    n = len(HF_ROWS)
    assert src[n + 2]["segments"][0] == HF_ROWS[2][1]  # sequential, wrapping around
    one_pass = build_sources(spec, S, n, **kw)  # the loader's read-ahead must not wrap around here
    batches = list(DataLoader(one_pass, batch_size=5, num_workers=2, collate_fn=builder))
    assert len(batches) == n // 5 and all(b.input_ids.shape[1] == 128 for b in batches)
    assert sum(b.gen_images.shape[0] for b in batches) == n  # a bad row yields the next good one
    # counted across the workers as one serial scan counts (max_chars is the default 100000 here:
    # the long caption is refused by the 128-token context instead)
    serial = Counter(b.reason for b in iter_problems(build_sources(spec, S, n, **kw)))
    assert one_pass.counter.as_dict() == dict(serial) == HF_EXPECTED
    manifest = _good_manifest(tmp_path / "m", "m", 3, "a photo of two blue squares")
    mixed = build_sources(parse_data_spec(f"{folder}=1,{manifest}=1"), S, 400, **kw)
    assert isinstance(mixed, MixedSource) and isinstance(mixed.sources[0], HFDatasetSource)
    texts = Counter(mixed[i]["segments"][0] for i in range(40))
    assert texts["a photo of two blue squares"] > 10 and texts["a photo of a red circle"] > 0


def test_hf_folder_validate(tmp_path, data, capsys):
    folder = save_hf(tmp_path / "hf", data, "image_pil")
    rc = validate_main([str(folder), "--columns", "image=img,text=caption", "--image-size", str(S),
                        "--max-pixels", str(MAX_PIXELS), "--max-chars", str(MAX_CHARS)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert Counter(line.split(": ")[1].split(" ")[0] for line in out[:-1]) == Counter(HF_EXPECTED)
    assert out[0].startswith(f"{folder}[1]: corrupt_image")
    assert out[-1].startswith(f"skipped {sum(HF_EXPECTED.values())} items: ") and f"{len(HF_ROWS)} records" in out[-1]
    assert validate_main([str(folder)]) == 2  # default columns image / text: not in this folder
    assert "no column" in capsys.readouterr().err
    assert validate_main([str(data / "manifest.jsonl"), "--columns", "image=img,text=caption"]) == 2
    assert "datasets folder only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        validate_main([str(folder), "--columns", "img"])
    # the command line, on a clean folder with the default column names
    good = [r for r in HF_ROWS if r[0] in ("rgb.png", "l.png", "wide.png")]
    clean = save_hf(tmp_path / "clean", data, "image_bytes", img_col="image", text_col="text", rows=good)
    r = subprocess.run([sys.executable, "-m", "train.validate", str(clean)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("skipped 0 items") and "3 records" in r.stdout
