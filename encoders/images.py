"""Decoding input images: one policy for training data (``train.sources``) and for the images a
prompt carries (``hybrid.pipeline.HybridPipeline.load_image``), so the model sees at inference
the pixels it was trained on.

Three steps, each usable alone:

``open_image(data, where, max_pixels)``: file bytes -> a decoded PIL image. An empty file or a
0-pixel side is ``zero_size``; a header saying width*height > ``max_pixels`` is ``too_large``
before any pixel is decoded (PIL's own decompression-bomb check becomes the same reason; with
``max_pixels=None`` only PIL's limit applies); an unidentifiable, truncated or undecodable file,
or a broken EXIF block, is ``corrupt_image``. EXIF orientation is applied (the image as a viewer
shows it: cameras store photos sideways and tag them).

``to_rgb(image, where)``: the mode policy.
    RGB                                            kept
    1, L, P, RGBX, CMYK, YCbCr, LAB, HSV           converted by PIL (a real colour conversion)
    LA, PA, RGBA, P with a transparent index       alpha composited on white, then RGB
    I;16, I;16L, I;16B, I;16N, I (16-bit grey)     scaled to 8 bit: value * 255 // 65535 ("I" is
                                                   clipped to 0..65535 first), then grey -> RGB
    F (float) and anything else (La, RGBa, ...)    refused: ``unsupported_mode`` naming the mode
A float image has no agreed range, and PIL has no conversion for premultiplied alpha, so those are
refused rather than guessed.

``fit_square(image, size, mode)``: the geometry, the caller's choice. "crop" (training data):
resize (bicubic) so the shorter side is ``size``, then centre-crop. "pad" (the pipeline, as Janus
does at inference): pad the shorter side with grey 127 to a square (the whole image is kept),
then resize (bicubic). Both leave an image already ``size`` x ``size`` untouched, and give the
same pixels for any square input.

Problems raise ``ImageError`` (a ``ValueError``) with ``.reason`` one of ``PROBLEMS``; the names
are ``train.sources.REASONS``' own, and each caller maps the error to its exception and message.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PROBLEMS = ("zero_size", "corrupt_image", "too_large", "unsupported_mode")
# Modes PIL converts to RGB without guessing (LA / PA / RGBA: alpha composited on white first).
RGB_CONVERTIBLE = ("RGB", "RGBA", "RGBX", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# Integer grey deeper than 8 bit ("I" is 32-bit signed: what PIL makes of some 16-bit files).
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA")
DEFAULT_MAX_PIXELS = 4096 * 4096
PAD_GREY = (127, 127, 127)  # Janus pads input images with this grey


class ImageError(ValueError):
    """An image that cannot be used: ``reason`` (one of ``PROBLEMS``), ``where`` (the file, or a
    description of the image) and a human ``detail``."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        assert reason in PROBLEMS, reason
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.where, self.detail = reason, where, detail


def check_size(size: tuple[int, int], where: str, max_pixels: int | None = None) -> None:
    """``zero_size`` for a 0-pixel side; ``too_large`` above ``max_pixels`` (None: no limit)."""
    w, h = size
    if w == 0 or h == 0:
        raise ImageError("zero_size", where, f"{w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("too_large", where, f"{w}x{h} > max_pixels={max_pixels}")


def _png_zero_side(data: bytes) -> bool:
    """PIL cannot identify a PNG whose header says 0 wide or high; tell that case apart."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return w == 0 or h == 0


def open_image(data: bytes, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image file bytes -> the decoded PIL image, upright (EXIF orientation applied), in its own
    mode; or ``ImageError`` (see the module doc)."""
    if len(data) == 0 or _png_zero_side(data):
        raise ImageError("zero_size", where, "empty file" if not data else "0-pixel side")
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # PIL's warning tier becomes a refusal like ours
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            check_size(im.size, where, max_pixels)  # from the header: nothing decoded yet
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", where, str(e)) from None
    except UnidentifiedImageError:
        raise ImageError("corrupt_image", where, "not a readable image") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError("corrupt_image", where, f"{type(e).__name__}: {e}") from None
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 -- a broken EXIF block raises many types; one bad file must not stop training
        raise ImageError("corrupt_image", where, f"EXIF: {e}") from None


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """Any accepted mode -> an RGB image of the same size, or ``ImageError("unsupported_mode")``
    (the policy table is in the module doc)."""
    mode = image.mode
    if mode in SIXTEEN_BIT:
        a = np.asarray(image, dtype=np.int64).clip(0, 65535)  # (H, W)
        image = Image.fromarray((a * 255 // 65535).astype(np.uint8))  # (H, W) uint8 -> mode L
    elif mode not in RGB_CONVERTIBLE:
        raise ImageError("unsupported_mode", where, f"mode {mode!r} has no safe conversion to RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        # PIL's plain convert would drop alpha and expose whatever colour transparent pixels hold
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, mode: Literal["pad", "crop"]) -> Image.Image:
    """An RGB (W, H) image (``to_rgb``'s output) -> (size, size), by padding ("pad") or
    centre-cropping ("crop"); an image already (size, size) is returned as is."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"fit_square mode must be 'pad' or 'crop', got {mode!r}")
    if image.mode != "RGB":
        raise ValueError(f"fit_square expects an RGB image (see to_rgb), got mode {image.mode!r}")
    S = size
    if image.size == (S, S):
        return image
    w, h = image.size
    if mode == "pad":
        if w != h:
            side = max(w, h)
            square = Image.new("RGB", (side, side), PAD_GREY)
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image = square
        return image if image.size == (S, S) else image.resize((S, S), Image.Resampling.BICUBIC)
    scale = S / min(w, h)
    nw, nh = max(S, round(w * scale)), max(S, round(h * scale))  # the short side exactly S
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - S) // 2, (nh - S) // 2
    return image.crop((left, top, left + S, top + S))
