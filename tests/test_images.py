"""The one image decoder (encoders.images) behind both the pipeline's inputs and training data:
every accepted mode converts (the same way through both paths), refused modes name themselves,
EXIF orientation is applied in both, and both paths give the same pixels for a square image
(they differ, by design, only in how a non-square image becomes square: pad vs crop).

    /work/main/.venv/bin/python -m pytest -q tests/test_images.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.images import PAD_GREY, ImageError, fit_square, open_image, to_rgb
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.pipeline import HybridPipeline
from hybrid.tokenizer import special_token_ids
from train.sources import BadItemError, decode_image

S = 32

# 8-bit modes PIL converts itself; the expected pixels are its own convert("RGB")
PLAIN = ("RGB", "1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
ALPHA = ("LA", "PA", "RGBA")
SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# the file formats each mode can be saved in (HSV, RGBX, I;16L and I;16N have none that keeps them)
FILE_FORMAT = {"RGB": "PNG", "1": "PNG", "L": "PNG", "P": "PNG", "LA": "PNG", "RGBA": "PNG", "I;16": "PNG",
               "PA": "TIFF", "CMYK": "TIFF", "YCbCr": "TIFF", "LAB": "TIFF", "I;16B": "TIFF", "I": "TIFF"}


@pytest.fixture(scope="module")
def pipe(tokenizer) -> HybridPipeline:
    cfg = HybridConfig.from_preset("debug", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
    assert cfg.image_size == S
    return HybridPipeline(HybridModel(cfg), tokenizer)


def rgb_noise(size=(S, S), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def sixteen_bit_values(size=(S, S)) -> np.ndarray:
    """(H, W) int64: the whole 16-bit range, with 0, 257, 32896 and 65535 among them."""
    a = np.linspace(0, 65535, size[0] * size[1]).round().astype(np.int64).reshape(size[1], size[0])
    a[0, :4] = (0, 257, 32896, 65535)
    return a


def sample(mode: str, size=(S, S)) -> tuple[Image.Image, np.ndarray]:
    """An image in ``mode`` and the (H, W, 3) uint8 pixels the policy must turn it into."""
    rgb = rgb_noise(size)
    if mode in PLAIN:
        im = rgb.quantize(16) if mode == "P" else rgb.convert(mode)
        return im, np.asarray(im.convert("RGB"))
    if mode in ALPHA:
        base = rgb.quantize(16) if mode == "PA" else rgb.convert(mode[0] if mode == "LA" else "RGB")
        im = base.convert(mode)
        alpha = np.where(np.arange(size[0]) < size[0] // 2, 0, 255).astype(np.uint8)  # left half clear
        im.putalpha(Image.fromarray(np.broadcast_to(alpha, (size[1], size[0])).copy()))
        want = np.asarray(base.convert("RGB")).copy()
        want[:, : size[0] // 2] = 255  # composited on white
        return im, want
    a = sixteen_bit_values(size)
    if mode == "I":  # 32-bit signed: clipped to the 16-bit range first
        a32 = a.astype(np.int32)
        a32[1, :2] = (-1000, 100_000)
        im = Image.fromarray(a32)
        a = a32.astype(np.int64).clip(0, 65535)
    else:
        dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
        im = Image.frombytes(mode, size, a.astype(dtype).tobytes())
    grey = (a * 255 // 65535).astype(np.uint8)
    return im, np.repeat(grey[..., None], 3, axis=-1)


def file_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    """The pipeline's (3, S, S) float in [0, 1] -> (S, S, 3) uint8 (exact: it was k / 255)."""
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("mode", PLAIN + ALPHA + SIXTEEN)
def test_each_mode_converts_the_same_in_both_paths(mode, pipe, tmp_path):
    im, want = sample(mode)
    assert im.mode == mode
    out = to_rgb(im, "x")
    assert out.mode == "RGB" and out.size == im.size
    assert np.array_equal(np.asarray(out), want)
    assert np.array_equal(as_uint8(pipe.load_image(im)), want)  # the pipeline, from memory
    fmt = FILE_FORMAT.get(mode)
    if fmt is None:
        return
    data = file_bytes(im, fmt)
    assert Image.open(io.BytesIO(data)).mode in (mode, "I;16")  # (I;16B comes back from PNG as I;16)
    (tmp_path / "x").write_bytes(data)
    from_data = np.asarray(decode_image(data, "x", S))  # training's path, from the file
    assert np.array_equal(from_data, want)
    assert np.array_equal(as_uint8(pipe.load_image(tmp_path / "x")), from_data)  # the pipeline's


def test_sixteen_bit_scaling():
    im, _ = sample("I;16")
    out = np.asarray(to_rgb(im, "x"))[0, :4, 0]
    assert out.tolist() == [0, 1, 128, 255]  # value * 255 // 65535


def test_palette_with_a_transparent_index(pipe, tmp_path):
    p = rgb_noise().quantize(8)
    clear = np.asarray(p) == 3
    assert clear.any() and not clear.all()
    data = file_bytes(p, "PNG", transparency=3)
    (tmp_path / "x.png").write_bytes(data)
    want = np.asarray(p.convert("RGB")).copy()
    want[clear] = 255  # composited on white
    assert np.array_equal(np.asarray(decode_image(data, "x.png", S)), want)
    assert np.array_equal(as_uint8(pipe.load_image(tmp_path / "x.png")), want)


@pytest.mark.parametrize("mode", ["F", "La", "RGBa"])
def test_refused_modes_are_named(mode, pipe, tmp_path):
    im = Image.new(mode, (S, S))
    with pytest.raises(ImageError, match=f"'{mode}'") as e:
        to_rgb(im, "x")
    assert e.value.reason == "unsupported_mode"
    with pytest.raises(ValueError, match=f"'{mode}'"):
        pipe.load_image(im)
    if mode == "F":  # a float TIFF: the data path counts it as unsupported_mode
        with pytest.raises(BadItemError, match="unsupported_mode") as e:
            decode_image(file_bytes(im, "TIFF"), "f.tif", S)
        assert "'F'" in str(e.value)
        (tmp_path / "f.tif").write_bytes(file_bytes(im, "TIFF"))
        with pytest.raises(ValueError, match=r"f\.tif: mode 'F' has no safe conversion"):
            pipe.load_image(tmp_path / "f.tif")


# EXIF orientation tag -> what a viewer does to the stored pixels to show them upright
ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("tag", [1, *ORIENTATION])
def test_exif_orientation_in_both_paths(tag, pipe, tmp_path):
    stored = rgb_noise(seed=tag)
    exif = Image.Exif()
    exif[0x0112] = tag
    data = file_bytes(stored, "PNG", exif=exif)
    (tmp_path / "x.png").write_bytes(data)
    upright = np.asarray(stored.transpose(ORIENTATION[tag]) if tag in ORIENTATION else stored)
    assert np.array_equal(np.asarray(decode_image(data, "x.png", S)), upright)
    assert np.array_equal(as_uint8(pipe.load_image(tmp_path / "x.png")), upright)
    # an in-memory image is taken as the caller holds it (their pixels, not a file's tag)
    assert np.array_equal(as_uint8(pipe.load_image(Image.open(tmp_path / "x.png"))), np.asarray(stored))


def test_exif_rotation_then_each_paths_geometry(pipe, tmp_path):
    """A 2:1 photo stored sideways: upright it is tall (1:2); the pipeline pads its sides with
    grey, training crops its top and bottom; both around the same upright image."""
    stored = rgb_noise(size=(2 * S, S), seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = file_bytes(stored, "PNG", exif=exif)
    (tmp_path / "x.png").write_bytes(data)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (S, 2 * S)
    cropped = np.asarray(decode_image(data, "x.png", S))
    assert np.array_equal(cropped, np.asarray(upright.crop((0, S // 2, S, S // 2 + S))))  # no resize needed
    padded = pipe.load_image(tmp_path / "x.png")
    assert torch.equal(padded, pipe.load_image(upright))
    assert np.array_equal(as_uint8(padded), np.asarray(fit_square(upright, S, "pad")))
    assert (as_uint8(padded)[:, :3] == PAD_GREY[0]).all() and (as_uint8(padded)[:, -3:] == PAD_GREY[0]).all()


@pytest.mark.parametrize("side", [S, 2 * S, S // 2 + 3])
def test_square_images_give_identical_pixels_in_both_paths(side, pipe, tmp_path):
    im = rgb_noise(size=(side, side), seed=side)
    data = file_bytes(im, "PNG")
    (tmp_path / "x.png").write_bytes(data)
    from_data = np.asarray(decode_image(data, "x.png", S))
    assert from_data.shape == (S, S, 3)
    assert np.array_equal(as_uint8(pipe.load_image(tmp_path / "x.png")), from_data)
    assert np.array_equal(as_uint8(pipe.load_image(im)), from_data)
    if side == S:  # already at the target size: untouched
        assert np.array_equal(from_data, np.asarray(im))


def test_fit_square_geometry():
    wide = rgb_noise(size=(48, 40), seed=1)
    crop = fit_square(wide, S, "crop")  # short side to 32: 38 x 32, then the centre 32 columns
    assert crop.size == (S, S)
    assert np.array_equal(np.asarray(crop), np.asarray(wide.resize((38, 32), Image.Resampling.BICUBIC).crop((3, 0, 35, 32))))
    pad = fit_square(rgb_noise(size=(2 * S, S), seed=2), S, "pad")  # 64 x 64 with 16 grey rows above and below
    assert pad.size == (S, S) and (np.asarray(pad)[:6] == PAD_GREY[0]).all() and (np.asarray(pad)[-6:] == PAD_GREY[0]).all()
    square = rgb_noise(size=(S, S), seed=3)
    assert fit_square(square, S, "pad") is square and fit_square(square, S, "crop") is square
    with pytest.raises(ValueError, match="'stretch'"):
        fit_square(square, S, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RGB"):
        fit_square(square.convert("L"), S, "crop")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (its pixel data is not there)."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_open_image_problems_and_how_each_caller_reports_them(pipe, tmp_path: Path):
    good = file_bytes(rgb_noise(), "PNG")
    cases = {  # bytes -> (reason, the pipeline's message)
        b"": ("zero_size", "has zero size"),
        png_header_only(0, 16): ("zero_size", "has zero size"),
        b"not an image": ("corrupt_image", "not a readable image"),
        good[:1500]: ("corrupt_image", "not a readable image"),
        png_header_only(30000, 30000): ("too_large", "too large"),  # past PIL's own bomb limit
    }
    for k, (data, (reason, message)) in enumerate(cases.items()):
        with pytest.raises(ImageError) as e:
            open_image(data, "x.png", max_pixels=None)
        assert e.value.reason == reason and e.value.where == "x.png"
        with pytest.raises(BadItemError) as b:
            decode_image(data, "x.png", S)
        assert b.value.bad.reason == reason and b.value.bad.path == "x.png"
        (tmp_path / f"{k}.png").write_bytes(data)
        with pytest.raises(ValueError, match=message) as v:
            pipe.load_image(tmp_path / f"{k}.png")
        assert f"{k}.png" in str(v.value) and not isinstance(v.value, ImageError)
    # max_pixels is read from the header, before decoding; None leaves only PIL's limit
    with pytest.raises(ImageError, match="max_pixels=1000") as e:
        open_image(good, "x.png", max_pixels=1000)
    assert e.value.reason == "too_large"
    assert open_image(good, "x.png", max_pixels=None).size == (S, S)
    with pytest.raises(ValueError, match="zero size"):
        pipe.load_image(Image.new("RGB", (0, S)))
