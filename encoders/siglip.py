"""The understanding-path image encoder: a SigLIP vision tower that returns patch features.

    enc = SiglipEncoder.from_pretrained("runs/siglip/final")          # our format (either backend)
    enc = SiglipEncoder.open_clip("ViT-B-16-SigLIP", "weights.safetensors")  # open_clip name + local file
    enc = SiglipEncoder.open_clip("local-dir:/path/to/open_clip/folder")     # open_clip's folder format
    enc = SiglipEncoder.transformers("/path/to/siglip")  # a local Hugging Face SigLIP folder
    feats = enc(pixels)        # (B, 3, H, W) floats in [0, 1], any H, W  ->  (B, N, D)

Two backends, each with the preprocessing its models were trained with, done on tensors: resize to
the model's input size with the backend's interpolation (antialiased, as PIL does), then
normalise with the backend's mean/std. Tests check it against the backend's own PIL pipeline.

What "patch features" means per backend (both: one vector per patch, no pooling, prefix tokens
such as a class token dropped, the tower's final norm applied):

* open_clip, timm-based towers (every SigLIP in open_clip): the timm trunk's ``forward_features``
  (last block, then ``norm``) minus its ``num_prefix_tokens``;
* open_clip's own ``VisionTransformer`` (e.g. the small one ``train/siglip_stage.py`` trains): the
  token output (``output_tokens=True``): ``ln_post`` of the last block with the class token cut;
* transformers ``SiglipVisionModel``: ``last_hidden_state`` (after ``post_layernorm``).

Both open_clip towers are read through open_clip's ``forward_intermediates`` (one code path,
tested equal to the above). ``feature_layer`` selects another layer like LLaVA/Janus do: an index
into ``hidden_states`` = [embeddings, block 1, ..., block L] (so -2 is the penultimate block),
taken *without* the final norm, as Hugging Face's ``hidden_states`` are.

The encoder is frozen by default: no parameter requires grad and it stays in eval mode even when
a parent module calls ``.train()``. ``trainable=True`` makes it an ordinary trainable module.
``save_pretrained`` writes ``config.json`` + ``model.safetensors`` (the vision tower only).
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "hybrid-siglip-encoder"
BACKENDS = ("open_clip", "transformers")
# Pixels may stray this far outside [0, 1] (rounding in upstream float ops); beyond it the
# input is almost surely in another convention ([0, 255], [-1, 1]).
RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- preprocessing
def check_pixels(pixels: Tensor) -> None:
    """Raise a clear error unless ``pixels`` is a float (B, 3, H, W) batch in [0, 1]."""
    if not isinstance(pixels, Tensor):
        raise TypeError(f"expected a torch.Tensor of pixels, got {type(pixels).__name__}")
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise ValueError(f"expected float pixels in [0, 1], got dtype {pixels.dtype} (divide uint8 by 255)")
    if pixels.numel() and (pixels.min() < -RANGE_TOLERANCE or pixels.max() > 1 + RANGE_TOLERANCE):
        raise ValueError(f"expected pixels in [0, 1], got values in [{pixels.min().item():.3g}, "
                         f"{pixels.max().item():.3g}] (for [-1, 1] use (x + 1) / 2, for [0, 255] x / 255)")


def _square(size: Any, what: str) -> int:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ValueError(f"{what}: only square model inputs are supported, got {h}x{w}")
    return int(h)


def pillow_resizes_height_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether Pillow resizes (H, W) -> (h, w) height first. Pillow >= 13 does when the height
    shrinks much more than the width (python-pillow/Pillow#9549; the rule below reproduces
    Pillow 13.0 on every size pair we tried); older Pillow always goes width first."""
    import PIL

    (H, W), (h, w) = in_hw, out_hw
    return int(PIL.__version__.split(".")[0]) >= 13 and h < H and H - h > 2 * (W - w)


def resize_like_pil(x: Tensor, height: int, width: int, interpolation: Any, height_first: bool = False) -> Tensor:
    """Antialiased resize of a float batch in [0, 1] the way PIL (and torchvision on uint8) resize
    8-bit images: one pass per axis, saturating at 0 and 1 after each, since the image between
    the passes is uint8 and clips bicubic overshoot. A one-pass float resize differs from them by
    up to ~20/255 at sharp edges; this matches them up to uint8 rounding (~1/255)."""
    import torchvision.transforms.functional as F

    def resize(t: Tensor, hw: list[int]) -> Tensor:
        return t if list(t.shape[-2:]) == hw else F.resize(t, hw, interpolation, antialias=True).clamp(0, 1)

    if height_first:
        return resize(resize(x, [height, x.shape[-1]]), [height, width])
    return resize(resize(x, [x.shape[-2], width]), [height, width])


def open_clip_preprocess(pixels: Tensor, cfg: Mapping[str, Any]) -> Tensor:
    """open_clip's eval transform (``open_clip.transform.image_transform_v2(PreprocessCfg(**cfg),
    is_train=False)``) on a float batch: (B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised."""
    import torchvision.transforms.functional as F
    from open_clip.transform import center_crop_or_pad
    from torchvision.transforms import InterpolationMode

    size = _square(cfg["size"], "open_clip preprocess size")
    # open_clip maps "random" (a training option) to bicubic at eval, as here
    interp = InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    mode = cfg.get("resize_mode", "shortest")
    x = pixels.float()
    h, w = x.shape[-2:]
    if mode == "squash":
        new = (size, size)
    elif mode == "shortest":  # torchvision Resize(size): shortest side to size (long side truncated)
        long = int(size * max(h, w) / min(h, w))
        new = (long, size) if w <= h else (size, long)
    elif mode == "longest":  # open_clip's ResizeKeepRatio(longest=1), then CenterCropOrPad
        ratio = max(h / size, w / size)
        new = (round(h / ratio), round(w / ratio))
    else:
        raise ValueError(f"unknown open_clip resize_mode {mode!r}; expected squash, shortest or longest")
    x = resize_like_pil(x, *new, interp, height_first=pillow_resizes_height_first((h, w), new))  # as PIL
    if mode == "shortest":
        x = F.center_crop(x, [size, size])
    elif mode == "longest":
        x = center_crop_or_pad(x, [size, size], fill=cfg.get("fill_color", 0) / 255)
    mean = torch.tensor(cfg["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def hf_preprocess(pixels: Tensor, processor: Any) -> Tensor:
    """A ``SiglipImageProcessor``'s resize / rescale / normalise on a float batch:
    (B, 3, H, W) in [0, 1] -> (B, 3, h, w) as the processor would produce from uint8 images."""
    from transformers.image_utils import pil_torch_interpolation_mapping

    if getattr(processor, "do_center_crop", False) or getattr(processor, "do_pad", False):
        raise ValueError("image processors with center crop or padding are not supported (SigLIP uses neither)")
    x = pixels.float()
    if processor.do_resize:  # the processor resizes uint8 tensors with torchvision: width pass first
        x = resize_like_pil(x, *_height_width(processor.size), pil_torch_interpolation_mapping[processor.resample])
    # the processor sees 0..255 values and rescales them itself (usually by 1/255)
    x = x * 255 * (processor.rescale_factor if processor.do_rescale else 1.0)
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def _height_width(size: Any) -> tuple[int, int]:
    """(height, width) from a processor's size (a dict or transformers' SizeDict)."""
    h, w = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    if not h or not w:
        raise ValueError(f"only processors that resize to a fixed height and width are supported, got size={size}")
    return int(h), int(w)


def _preprocess_for_open_clip_name(name: str, tag: str | None) -> dict[str, Any] | None:
    """The preprocessing open_clip's pretrained tags of ``name`` declare (mean/std/resize mode).

    open_clip only applies it when it downloads a tag; a local weights file gets the OpenAI
    defaults (the wrong mean/std and resize mode for SigLIP), so we look it up ourselves."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    keys = ("mean", "std", "interpolation", "resize_mode")
    if tag is not None:
        if tag not in tags:
            raise ValueError(f"open_clip model {name!r} has no pretrained tag {tag!r}; tags: {tags}")
        tags = [tag]
    found = {json.dumps({k: open_clip.get_pretrained_cfg(name, t).get(k) for k in keys}) for t in tags}
    if len(found) > 1:
        raise ValueError(f"open_clip tags of {name!r} differ in preprocessing; pass pretrained_tag= one of {tags}")
    return {k: v for k, v in json.loads(found.pop()).items() if v is not None} if found else None


# --------------------------------------------------------------------------- the encoder
class SiglipEncoder(nn.Module):
    """A SigLIP vision tower returning patch features; see the module docstring.

    Build it with :meth:`from_pretrained`, :meth:`open_clip`, :meth:`transformers` or, for a
    model already in memory, :meth:`from_open_clip_model` / :meth:`from_transformers_model`.
    ``__init__`` takes a built tower and the JSON-able ``spec`` needed to rebuild it.
    """

    def __init__(self, backend: str, tower: nn.Module, spec: dict[str, Any],
                 feature_layer: int | None = None, trainable: bool = False) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown SigLIP backend {backend!r}; choose from {BACKENDS}")
        self.backend, self.tower, self.spec = backend, tower, copy.deepcopy(spec)
        self.trainable = trainable
        if backend == "open_clip":
            self.preprocess_cfg = dict(spec["preprocess_cfg"])
            self.image_size = _square(self.preprocess_cfg["size"], "open_clip preprocess size")
            if not hasattr(tower, "trunk") and not hasattr(tower, "transformer"):
                raise ValueError(f"open_clip tower {type(tower).__name__} is not a ViT (timm or open_clip's own)")
            if hasattr(tower, "trunk"):  # open_clip.timm_model.TimmModel
                trunk = tower.trunk
                self.feature_dim = int(trunk.num_features)
                self.num_tokens = int(trunk.patch_embed.num_patches)
                num_layers = len(trunk.blocks)
            else:  # open_clip.transformer.VisionTransformer
                self.feature_dim = int(tower.transformer.width)
                self.num_tokens = int(tower.grid_size[0] * tower.grid_size[1])
                num_layers = len(tower.transformer.resblocks)
        else:
            from transformers import SiglipImageProcessor

            self.processor = SiglipImageProcessor.from_dict(spec["processor"])
            cfg = tower.config
            self.image_size = _square(_height_width(self.processor.size), "SiglipImageProcessor size")
            if self.image_size != cfg.image_size:
                raise ValueError(f"processor resizes to {self.image_size} but the model expects {cfg.image_size}")
            self.feature_dim = int(cfg.hidden_size)
            self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
            num_layers = cfg.num_hidden_layers
        self.num_layers = num_layers
        self.feature_layer = self._check_layer(feature_layer)
        self.tower.requires_grad_(trainable)
        self.train(False)

    def _check_layer(self, layer: int | None) -> int | None:
        n = self.num_layers + 1  # hidden_states: embeddings + one per block
        if layer is None:
            return None
        if not -n <= layer < n:
            raise ValueError(f"feature_layer {layer} is out of range for {self.num_layers} blocks "
                             f"(hidden_states has {n} entries: -{n}..{n - 1})")
        if self.backend == "open_clip" and layer % n == 0:
            raise ValueError("feature_layer 0 (the patch embeddings) is not available for open_clip towers")
        return layer

    # ---------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> SiglipEncoder:
        # A frozen encoder stays in eval mode whatever its parent does (dropout, norms stay fixed).
        return super().train(mode and self.trainable)

    def preprocess(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised model input."""
        check_pixels(pixels)
        return self._transform(pixels)

    def _transform(self, pixels: Tensor) -> Tensor:
        if self.backend == "open_clip":
            return open_clip_preprocess(pixels, self.preprocess_cfg)
        return hf_preprocess(pixels, self.processor)

    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) floats in [0, 1] -> (B, num_tokens, feature_dim) patch features."""
        check_pixels(pixels)
        param = next(self.tower.parameters())
        x = self._transform(pixels.to(param.device)).to(param.dtype)  # (B, 3, S, S)
        if self.backend == "transformers":
            if self.feature_layer is None:
                return self.tower(pixel_values=x).last_hidden_state  # (B, N, D)
            return self.tower(pixel_values=x, output_hidden_states=True).hidden_states[self.feature_layer]
        last = self.feature_layer is None
        block = self.num_layers - 1 if last else self.feature_layer % (self.num_layers + 1) - 1
        # The last block normalised = forward_features / the token output; other layers raw.
        normalize = last and getattr(self.tower, "attn_pool", None) is None
        out = self.tower.forward_intermediates(x, indices=[block], stop_early=True, intermediates_only=True,
                                               normalize_intermediates=normalize, output_fmt="NLC")
        return out["image_intermediates"][0]  # (B, N, D), prefix tokens removed

    forward = encode

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_open_clip_model(cls, model: nn.Module, model_cfg: Mapping[str, Any],
                             preprocess_cfg: Mapping[str, Any] | None = None,
                             feature_layer: int | None = None, trainable: bool = False) -> SiglipEncoder:
        """Wrap the vision tower of an open_clip model in memory (``model.visual``), given the
        open_clip model config it was built from (needed to rebuild it in ``from_pretrained``)."""
        import open_clip

        tower = getattr(model, "visual", model)
        pp = dict(preprocess_cfg) if preprocess_cfg is not None else open_clip.get_model_preprocess_cfg(model)
        if not pp or "mean" not in pp:
            raise ValueError("no preprocessing config: pass preprocess_cfg (size, mean, std, interpolation, resize_mode)")
        pp.setdefault("size", tuple(tower.image_size))
        spec = {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(pp)}
        return cls("open_clip", tower, spec, feature_layer, trainable)

    @classmethod
    def open_clip(cls, model: str | Path, pretrained: str | Path | None = None, *, pretrained_tag: str | None = None,
                  feature_layer: int | None = None, trainable: bool = False) -> SiglipEncoder:
        """An open_clip model: a built-in name (e.g. "ViT-B-16-SigLIP") with ``pretrained`` = a
        local weights file, or a local open_clip folder (``local-dir:<path>`` or just the path;
        open_clip_config.json + weights) such as the ``final/`` folder of the siglip stage.

        For a built-in name the preprocessing is that of its pretrained tag (``pretrained_tag``,
        needed only if its tags disagree), not open_clip's OpenAI default for local files."""
        import open_clip

        name = str(model)
        if name.startswith("hf-hub:"):
            raise ValueError("hf-hub: models need the network; download once and pass a local file or folder")
        folder = Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else Path(name)
        if name.startswith("local-dir:") or folder.is_dir():
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"{folder} is not an open_clip folder (no open_clip_config.json)")
            if pretrained is not None:
                raise ValueError("pretrained= is not used with an open_clip folder (its weights are in the folder)")
            clip = open_clip.create_model(f"local-dir:{folder}", device="cpu")
            model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
            return cls.from_open_clip_model(clip, model_cfg, None, feature_layer, trainable)
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
            siglip = [m for m in open_clip.list_models() if "SigLIP" in m]
            raise ValueError(f"unknown open_clip model {name!r}; close matches: {close}; SigLIP models: {siglip}")
        if pretrained is None:
            raise ValueError(f"pretrained= must name a local weights file for {name!r} (nothing is downloaded)")
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained weights file {pretrained} does not exist "
                                    f"(a tag such as 'webli' would need the network: pass a local file)")
        pp = _preprocess_for_open_clip_name(name, pretrained_tag)
        clip = open_clip.create_model(name, pretrained=str(pretrained), device="cpu", force_preprocess_cfg=pp)
        return cls.from_open_clip_model(clip, model_cfg, None, feature_layer, trainable)

    @classmethod
    def from_transformers_model(cls, model: nn.Module, processor: Any, feature_layer: int | None = None,
                                trainable: bool = False) -> SiglipEncoder:
        """Wrap a transformers ``SiglipVisionModel`` and its ``SiglipImageProcessor``."""
        spec = {"vision_config": model.config.to_dict(), "processor": _jsonable(processor.to_dict())}
        return cls("transformers", model, spec, feature_layer, trainable)

    @classmethod
    def transformers(cls, path: str | Path, *, feature_layer: int | None = None,
                     trainable: bool = False) -> SiglipEncoder:
        """A local Hugging Face folder: a SigLIP (vision or full) model + preprocessor_config.json."""
        from transformers import SiglipImageProcessor, SiglipVisionModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"SigLIP folder {path} does not exist")
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{path} has no preprocessor_config.json (save the SiglipImageProcessor there)")
        model = SiglipVisionModel.from_pretrained(str(path), local_files_only=True)
        processor = SiglipImageProcessor.from_pretrained(str(path), local_files_only=True)
        return cls.from_transformers_model(model, processor, feature_layer, trainable)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` (backend + what rebuilds the tower) and ``model.safetensors``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "backend": self.backend, "feature_layer": self.feature_layer, **self.spec}
        state = {k: v.detach().cpu().contiguous() for k, v in self.tower.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, trainable: bool = False) -> SiglipEncoder:
        """Load a folder written by :meth:`save_pretrained`."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a saved SiglipEncoder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_NAME} is not a SiglipEncoder config (format={config.get('format')!r}); "
                             f"for an open_clip folder use SiglipEncoder.open_clip, for a HF folder .transformers")
        backend, layer = config["backend"], config.get("feature_layer")
        if backend == "open_clip":
            from open_clip.model import (
                _build_vision_tower,  # builds the vision tower alone
            )

            cfg = copy.deepcopy(config["model_cfg"])
            vision_cfg = {**cfg["vision_cfg"], "timm_model_pretrained": False}  # never download
            tower = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))
            if hasattr(tower, "trunk") and tuple(tower.trunk.patch_embed.img_size) != tuple(tower.image_size):
                tower.set_input_size(tower.image_size)  # as open_clip's create_model(force_image_size=...)
            spec = {"model_cfg": config["model_cfg"], "preprocess_cfg": config["preprocess_cfg"]}
        elif backend == "transformers":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            tower = SiglipVisionModel(SiglipVisionConfig.from_dict(config["vision_config"]))
            spec = {"vision_config": config["vision_config"], "processor": config["processor"]}
        else:
            raise ValueError(f"unknown SigLIP backend {backend!r} in {path / CONFIG_NAME}; choose from {BACKENDS}")
        state = load_file(str(path / WEIGHTS_NAME))
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:  # keep the saved precision (e.g. a bf16 export) instead of fp32
            tower.to(dtypes.pop())
        tower.load_state_dict(state, strict=True)
        return cls(backend, tower, spec, layer, trainable)


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists etc., so the spec equals what json.loads returns (exact round trips)."""
    return json.loads(json.dumps(obj))
