"""Convert checkpoints between Hugging Face formats and ours, in both directions.

* Llama / Qwen2 causal LMs (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` folders) <-> a
  ``HybridModel`` folder: the text backbone of a new multimodal model, or a trained model's text
  part exported back.
* Janus / Janus-Pro (transformers' ``JanusForConditionalGeneration`` folders) <-> a folder laid
  out like a trained run's export: the ``HybridModel`` (``image_head="ar"``, causal input images)
  at the root, ``siglip/`` (the vision tower as our ``SiglipEncoder``), ``vq/`` (the VQ model as
  our ``VQTokenizer``, janus backend) and ``tokenizer/``.

Weights are streamed tensor by tensor from (possibly sharded) safetensors and renamed with
``KeyMap``s (``hybrid/checkpoint.py``); the Hugging Face model is never built. Anything our model
cannot compute exactly (dynamic / YaRN RoPE, sliding windows, biases it lacks, ...) is refused with the
config field that asks for it. Round trips (HF -> ours -> HF) reproduce every tensor exactly.

A converted folder loads with ``load_pretrained_model(dst)`` (``hybrid.checkpoint``),
``SiglipEncoder.from_pretrained(dst / "siglip")`` and ``VQTokenizer.from_pretrained(dst / "vq")``.

Command line (``--help`` has more)::

    python -m hybrid.convert ./TinyLlama-1.1B ./llama-hybrid --add-image-tokens
    python -m hybrid.convert ./Janus-Pro-1B ./janus-hybrid
    python -m hybrid.convert ./llama-hybrid ./llama-again --to llama
    python -m hybrid.convert ./janus-hybrid ./janus-again --to janus
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hybrid.checkpoint import (
    CONFIG,
    KeyMap,
    Route,
    load_pretrained_model,
    load_streamed,
    mlp_key_map,
    safetensors_files,
    save_pretrained_model,
    save_sharded,
)
from hybrid.config import ROPE_SCALINGS, HybridConfig
from hybrid.model import HybridModel
from hybrid.tokenizer import SPECIAL_TOKENS

TEXT_TYPES = ("llama", "qwen2")
FORMATS = TEXT_TYPES + ("janus", "hybrid")
IMAGE_ROLES = ("boi", "eoi", "img")
# Files of a tokenizer / processor that travel with a converted model, unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")
TOKENIZER_DIR = "tokenizer"
SIGLIP_DIR, VQ_DIR = "siglip", "vq"
# Janus' marker tokens (its processor writes <begin_of_image> <image_placeholder>*N <end_of_image>).
JANUS_TOKENS = {"boi": "<begin_of_image>", "eoi": "<end_of_image>", "img": "<image_placeholder>"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly, or a folder that is not a checkpoint."""


# --- folders ------------------------------------------------------------------------------


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder, with clear errors for the usual mistakes."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; pass the model folder that holds config.json")
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG}; expected a Hugging Face model folder "
                                f"(model_type one of {FORMATS[:-1]}) or a HybridModel folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def detect_format(folder: str | Path) -> str:
    """'llama' | 'qwen2' | 'janus' (Hugging Face folders, by ``model_type``) or 'hybrid' (ours)."""
    raw = read_config(folder)
    if "model_type" in raw:
        if raw["model_type"] not in FORMATS:
            raise ConversionError(f"{Path(folder) / CONFIG}: model_type={raw['model_type']!r} is not supported; "
                                  f"supported: {', '.join(FORMATS[:-1])}")
        return raw["model_type"]
    if {"dim", "n_layers", "vocab_size"} <= raw.keys():
        return "hybrid"
    raise ConversionError(f"{Path(folder) / CONFIG} has no model_type and is not a HybridConfig; "
                          f"cannot tell what this folder holds")


def _source_dtype(folder: Path) -> torch.dtype:
    """The floating dtype the checkpoint is stored in (read from the first shard's header)."""
    from safetensors import safe_open

    with safe_open(str(safetensors_files(folder)[0]), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def _load_tokenizer(folder: Path):
    """The folder's tokenizer (local files only), or None when it has none."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    names = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(src / name, dst / name)
    return names


def _note(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)


# --- text LLMs: config ----------------------------------------------------------------------


def text_key_map(prefix: str = "model.") -> KeyMap:
    """Hugging Face Llama / Qwen2 names (under ``prefix``) <-> ours. ``{w}`` covers the q/k/v
    biases of Qwen2; a bias our model lacks (o_proj, MLP) is never mapped, so it cannot slip by."""
    p = prefix
    pairs = [(f"{p}embed_tokens.weight", "embed_tokens.weight"), (f"{p}norm.weight", "norm.weight"),
             ("lm_head.weight", "lm_head.weight"),
             (f"{p}layers.{{n}}.input_layernorm.weight", "layers.{n}.attn_norm.weight"),
             (f"{p}layers.{{n}}.post_attention_layernorm.weight", "layers.{n}.ffn_norm.weight"),
             (f"{p}layers.{{n}}.self_attn.o_proj.weight", "layers.{n}.attn.o_proj.weight")]
    pairs += [(f"{p}layers.{{n}}.self_attn.{x}_proj.{{w}}", f"layers.{{n}}.attn.{x}_proj.{{w}}") for x in "qkv"]
    pairs += [(f"{p}layers.{{n}}.mlp.{x}_proj.weight", f"layers.{{n}}.ffn.{x}_proj.weight")
              for x in ("gate", "up", "down")]
    return KeyMap(pairs)


def _parse_hf_config(cls, raw: dict[str, Any], where: str):
    from huggingface_hub.errors import (
        StrictDataclassError,  # what transformers' strict configs raise
    )

    try:
        return cls.from_dict(raw)
    except (StrictDataclassError, ValueError, TypeError) as e:
        raise ConversionError(f"{where}: transformers' {cls.__name__} rejects this config: {e}") from None


def _hf_text_config(raw: dict[str, Any], where: str):
    """Parse a Llama / Qwen2 config dict with transformers' own class (so defaults and legacy
    fields such as top-level ``rope_theta`` / ``rope_scaling`` resolve exactly as transformers
    resolves them) and refuse what our model does not compute."""
    from transformers import LlamaConfig, Qwen2Config

    model_type = raw.get("model_type")
    if model_type not in TEXT_TYPES:
        raise ConversionError(f"{where}: model_type={model_type!r} is not a supported text model; "
                              f"supported: {', '.join(TEXT_TYPES)}")
    c = _parse_hf_config({"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type], raw, where)

    def refuse(field: str, value: Any, why: str) -> None:
        raise ConversionError(f"{where}: {field}={value!r} is not supported ({why})")

    if c.hidden_act != "silu":
        refuse("hidden_act", c.hidden_act, "our feed-forward is SwiGLU with SiLU")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        refuse("head_dim", head_dim, f"our attention uses hidden_size / num_attention_heads = "
                                     f"{c.hidden_size // c.num_attention_heads}")
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", *ROPE_SCALINGS):
        refuse("rope_parameters.rope_type (or rope_scaling)", rope.get("rope_type"),
               f"implemented: default and the fixed-frequency scalings {ROPE_SCALINGS}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "RoPE covers the whole head")
    if model_type == "llama":
        if c.attention_bias:
            refuse("attention_bias", True, "Llama's flag also biases o_proj; our o_proj has no bias")
        if c.mlp_bias:
            refuse("mlp_bias", True, "our feed-forward has no biases")
    if model_type == "qwen2" and "sliding_attention" in (c.layer_types or []):
        refuse("use_sliding_window", c.use_sliding_window,
               f"layers {[i for i, t in enumerate(c.layer_types) if t != 'full_attention']} would use "
               f"sliding-window attention, which our model does not")
    return c


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """HF rope_parameters -> HybridConfig.rope_scaling (None for plain RoPE)."""
    if rope.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta" and v is not None}


def _special_id(c, folder: Path, name: str) -> Any:
    """A special token id from the model config, else from ``generation_config.json`` (Qwen2's
    configs often leave bos/eos to it)."""
    value = getattr(c, name, None)
    gen = folder / "generation_config.json"
    if value is None and gen.is_file():
        value = json.loads(gen.read_text()).get(name)
    return value


def _text_fields(c, folder: Path) -> dict[str, Any]:
    """HybridConfig fields for the transformer of a parsed Llama / Qwen2 config."""
    where = str(folder / CONFIG)
    eos = _special_id(c, folder, "eos_token_id")
    if isinstance(eos, (list, tuple)):
        if len(eos) > 1:
            _note(f"{where}: eos_token_id lists {list(eos)}; our model stops on one id, using {eos[0]}")
        eos = eos[0]
    if eos is None:
        raise ConversionError(f"{where}: eos_token_id is not set (nor in generation_config.json); our "
                              f"sequences need an end-of-sequence id")
    bos = _special_id(c, folder, "bos_token_id")
    if bos is None:
        _note(f"{where}: bos_token_id is not set; using eos_token_id={eos} as the start-of-sequence token")
        bos = eos
    pad = _special_id(c, folder, "pad_token_id")
    pad = eos if pad is None else pad  # pads are masked out; any valid id works
    return dict(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, ffn_dim=c.intermediate_size,
                norm_eps=c.rms_norm_eps, rope_theta=float(c.rope_parameters["rope_theta"]),
                rope_scaling=_rope_scaling(c.rope_parameters),
                attn_bias=c.model_type == "qwen2", qk_norm=False, tie_embeddings=bool(c.tie_word_embeddings),
                max_seq_len=c.max_position_embeddings, init_std=c.initializer_range,
                bos_id=bos, eos_id=eos, pad_id=pad)


@dataclass
class ImageIds:
    """Where the image markers live in the vocabulary, and what the converter must add for them."""

    ids: dict[str, int]  # "boi" / "eoi" / "img" -> id
    vocab_size: int  # the model's vocabulary after the conversion
    new_tokens: list[str]  # token strings to add to the tokenizer (their ids are ``ids`` in order)
    first_new_row: int | None  # the new tokens start at the mean of the rows before this one


def plan_image_ids(vocab_size: int, tokenizer, taken: set[int], add: bool,
                   given: Sequence[int] | None = None) -> ImageIds:
    """Choose the ``<boi>`` / ``<eoi>`` / ``<img>`` ids for a text LLM.

    In order: ids ``given`` by the caller; the tokenizer's own ``<boi>``/``<eoi>``/``<img>``;
    with ``add``, three new tokens after the tokenizer's last id (rows appended to the vocabulary
    when that runs past it); otherwise the last three ids that are not bos/eos/pad, with a
    warning, since those are real tokens the model cannot tell from image markers.
    """
    if given is not None:
        if add:
            raise ConversionError("pass either image token ids or add_image_tokens, not both")
        ids = dict(zip(IMAGE_ROLES, (int(i) for i in given)))
        if len(ids) != 3 or len(set(ids.values())) != 3 or not all(0 <= i < vocab_size for i in ids.values()):
            raise ConversionError(f"image token ids must be three distinct ids in [0, {vocab_size}), got {list(given)}")
        return ImageIds(ids, vocab_size, [], None)
    names = [SPECIAL_TOKENS[r] for r in IMAGE_ROLES]
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if all(n in vocab for n in names) and all(vocab[n] < vocab_size for n in names):
            return ImageIds({r: vocab[n] for r, n in zip(IMAGE_ROLES, names)}, vocab_size, [], None)
    if add:
        start = len(tokenizer) if tokenizer is not None else vocab_size
        ids = {r: start + i for i, r in enumerate(IMAGE_ROLES)}
        return ImageIds(ids, max(vocab_size, start + 3), names, start)
    unused = len(tokenizer) if tokenizer is not None else vocab_size  # rows past the tokenizer: padding
    if vocab_size - unused >= 3:
        free, what = list(range(unused, unused + 3)), "padding rows no token uses (untrained)"
    else:
        free = [i for i in range(vocab_size - 1, -1, -1) if i not in taken][:3][::-1]
        what = "the last real tokens of the vocabulary, which the model cannot tell from image markers"
    _note(f"no image marker tokens given: using ids {free} for <boi>/<eoi>/<img>, {what}. Fine for "
          f"text-only use; before training on images convert with add_image_tokens=True "
          f"(--add-image-tokens) or pass the ids (--image-token-ids BOI EOI IMG).")
    return ImageIds(dict(zip(IMAGE_ROLES, free)), vocab_size, [], None)


# --- text LLMs: Hugging Face -> ours -----------------------------------------------------------


def _is_rope_cache(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # old checkpoints stored this recomputed buffer


def load_hf_causal_lm(src: str | Path, *, add_image_tokens: bool = False,
                      image_token_ids: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                      **overrides: Any) -> HybridModel:
    """A Llama / Qwen2 causal LM folder -> a ``HybridModel`` computing the same logits.

    ``overrides`` set the HybridConfig fields that have no counterpart in a text LLM (the image
    path: ``image_head``, ``image_size``, ...); the modules for them start freshly initialised.
    See ``plan_image_ids`` for ``add_image_tokens`` / ``image_token_ids``.
    """
    model, _ = _load_text(Path(src), add_image_tokens, image_token_ids, overrides)
    return model.to(dtype)


def _load_text(src: Path, add: bool, given, overrides: dict) -> tuple[HybridModel, ImageIds]:
    c = _hf_text_config(read_config(src), str(src / CONFIG))
    safetensors_files(src)  # no weights: fail before any work
    fields = _text_fields(c, src)
    unknown = sorted(set(overrides) - {f.name for f in dataclass_fields(HybridConfig)})
    if unknown:
        raise ConversionError(f"unknown HybridConfig fields in overrides: {unknown}")
    plan = plan_image_ids(fields["vocab_size"], _load_tokenizer(src),
                          {fields["bos_id"], fields["eos_id"], fields["pad_id"]}, add, given)
    clash = sorted(set(overrides) & (set(fields) | {"boi_id", "eoi_id", "img_id"}))
    if clash:
        raise ConversionError(f"overrides {clash} are set by the checkpoint; only image-path fields may be overridden")
    cfg = HybridConfig(**{**fields, **overrides, "vocab_size": plan.vocab_size,
                          **{f"{r}_id": i for r, i in plan.ids.items()}})
    model = HybridModel(cfg)
    kmap = text_key_map()
    grow = ("embed_tokens.weight", "lm_head.weight") if plan.first_new_row is not None else ()
    # The image path has no counterpart in a text LLM: those modules keep their fresh init.
    route = Route(kmap.to_ours, model, keep_init=lambda name: kmap.to_theirs(name) is None, grow_rows=grow)
    load_streamed(src, [route], ignore=_is_rope_cache)
    if plan.first_new_row is not None:
        _init_new_rows(model, plan.first_new_row, [plan.ids[r] for r in IMAGE_ROLES])
    return model, plan


@torch.no_grad()
def _init_new_rows(model: HybridModel, first: int, rows: list[int]) -> None:
    """New tokens start at the mean of the rows of the tokens before them: an average token, so
    the new markers neither dominate the softmax nor start from noise (Hewitt, 2021)."""
    for w in {id(p): p for p in (model.embed_tokens.weight, model.lm_head.weight)}.values():
        w[rows] = w[:first].float().mean(0).to(w.dtype)


def convert_hf_causal_lm(src: str | Path, dst: str | Path, *, add_image_tokens: bool = False,
                         image_token_ids: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                         **overrides: Any) -> Path:
    """A Llama / Qwen2 folder -> a HybridModel folder (``config.json`` + ``model.safetensors``,
    ``tokenizer/``). ``dtype=None`` stores the checkpoint's own dtype."""
    src, dst = Path(src), Path(dst)
    model, plan = _load_text(src, add_image_tokens, image_token_ids, overrides)
    model.to(dtype or _source_dtype(src))
    save_pretrained_model(model, dst)
    tok = _load_tokenizer(src) if plan.new_tokens else None
    if tok is not None:  # the tokenizer must know the new markers, at exactly the planned ids
        tok.add_tokens(plan.new_tokens, special_tokens=True)
        got = tok.convert_tokens_to_ids(plan.new_tokens)
        if got != [plan.ids[r] for r in IMAGE_ROLES]:
            raise AssertionError(f"tokenizer gave the image markers ids {got}, planned {plan.ids}")
        if tok.pad_token is None:
            tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_id)
        tok.save_pretrained(str(dst / TOKENIZER_DIR))
    else:
        _copy_tokenizer_files(src, dst / TOKENIZER_DIR)
    return dst


# --- text LLMs: ours -> Hugging Face -----------------------------------------------------------


def hf_text_config(cfg: HybridConfig, arch: str):
    """The transformers config of the text model ``cfg`` describes (``arch``: llama | qwen2)."""
    from transformers import LlamaConfig, Qwen2Config

    if cfg.qk_norm:
        raise ConversionError("qk_norm=True has no counterpart in Llama / Qwen2 (their attention does not "
                              "normalise queries and keys)")
    if arch == "llama" and cfg.attn_bias:
        raise ConversionError("attn_bias=True (q/k/v biases) is Qwen2's layout; export with --to qwen2")
    # the research modes change what the text path computes: a dense Llama / Qwen2 cannot hold it
    for name, value, why in (("moe_experts", cfg.moe_experts, "their feed-forwards are dense"),
                             ("late_fusion_layers", cfg.late_fusion_layers, "they have no per-image vision blocks"),
                             ("nope_every", cfg.nope_every, "every one of their layers applies RoPE")):
        if value:
            raise ConversionError(f"{name}={value} has no counterpart in Llama / Qwen2 ({why})")
    if arch not in TEXT_TYPES:
        raise ConversionError(f"unknown text architecture {arch!r}; choose from {TEXT_TYPES}")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps,
                  rope_parameters={**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, hidden_act="silu")
    if arch == "llama":
        c = LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)
        c.architectures = ["LlamaForCausalLM"]
    else:
        c = Qwen2Config(**common, use_sliding_window=False)
        c.architectures = ["Qwen2ForCausalLM"]
    return c


def _text_state(model: HybridModel, arch: str, prefix: str = "model.") -> tuple[dict[str, Tensor], list[str]]:
    """Our text weights under Hugging Face names, and the top-level modules that have none."""
    kmap = text_key_map(prefix)
    out, dropped = {}, []
    for name, t in model.state_dict().items():
        theirs = kmap.to_theirs(name)
        if theirs is None:
            dropped.append(name.split(".")[0])
        elif not (name == "lm_head.weight" and model.config.tie_embeddings):  # tied: HF stores it once
            out[theirs] = t
    if arch == "qwen2" and not model.config.attn_bias:  # Qwen2 always has q/k/v biases: zeros are exact
        for i, layer in enumerate(model.layers):
            for x in "qkv":
                w = getattr(layer.attn, f"{x}_proj").weight
                out[f"{prefix}layers.{i}.self_attn.{x}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out, sorted(set(dropped))


def export_hf_causal_lm(src: HybridModel | str | Path, dst: str | Path, arch: str | None = None,
                        dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Our model (or a HybridModel folder) -> a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` folder.
    ``arch=None`` picks qwen2 for a model with q/k/v biases, llama otherwise. The image path
    (aligners, image heads) has no place in a text LLM and is left out, with a warning."""
    folder = None if isinstance(src, nn.Module) else Path(src)
    model = src if folder is None else load_pretrained_model(folder)
    arch = arch or ("qwen2" if model.config.attn_bias else "llama")
    hf = hf_text_config(model.config, arch)
    state, dropped = _text_state(model, arch)
    if dropped:
        _note(f"exporting the text model only; left out: {', '.join(dropped)}")
    dtype = dtype or next(iter(state.values())).dtype
    hf.dtype = str(dtype).removeprefix("torch.")
    dst = Path(dst)
    save_sharded({k: v.to(dtype) for k, v in state.items()}, dst, max_shard_bytes)
    hf.save_pretrained(str(dst))
    if folder is not None:
        _copy_tokenizer_files(folder / TOKENIZER_DIR, dst)
    return dst


# --- Janus -------------------------------------------------------------------------------------

JANUS_LM = "model.language_model."
JANUS_VISION = "model.vision_model."
JANUS_VQ = "model.vqmodel."


def janus_key_maps(cfg: HybridConfig) -> tuple[KeyMap, KeyMap, KeyMap]:
    """Name maps of a ``JanusForConditionalGeneration`` checkpoint onto our three components:
    (HybridModel, the SigLIP tower = transformers' ``SiglipVisionModel``, the ``JanusVQVAE``)."""
    d = cfg.aligner_depth
    lm = (text_key_map(JANUS_LM) + mlp_key_map("model.aligner", "aligner", d)
          + mlp_key_map("model.generation_aligner", "gen_aligner", d)
          + KeyMap([("model.generation_embeddings.weight", "gen_embed.weight"),
                    ("model.generation_head.proj_out.{w}", "gen_head.0.{w}"),
                    ("model.generation_head.vision_head.{w}", "gen_head.2.{w}")]))
    # JanusVisionModel is SigLIP's vision transformer with the attention output renamed.
    same = ["embeddings.patch_embedding.{w}", "embeddings.position_embedding.weight", "post_layernorm.{w}"]
    same += [f"encoder.layers.{{n}}.{m}.{{w}}" for m in
             ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2")]
    vision = KeyMap([(JANUS_VISION + t, t) for t in same]
                    + [(JANUS_VISION + "encoder.layers.{n}.self_attn.projection_layer.{w}",
                        "encoder.layers.{n}.self_attn.out_proj.{w}")])
    vq = KeyMap([(JANUS_VQ + "{rest}", "{rest}")])  # our VQTokenizer wraps JanusVQVAE as it is
    return lm, vision, vq


def _janus_hf_config(src: Path):
    from transformers import JanusConfig

    return _parse_hf_config(JanusConfig, read_config(src), str(src / CONFIG))


def _janus_image_ids(src: Path, hf, given: Sequence[int] | None) -> dict[str, int]:
    """<boi>/<eoi>/<img> ids: ``given``, else the config's image_token_id, the generation
    config's boi_token_id (what ``JanusForConditionalGeneration.generate`` reads) and the
    tokenizer's ``<begin_of_image>`` / ``<end_of_image>``."""
    if given is not None:
        if len(given) != 3:
            raise ConversionError(f"image token ids are three ids (boi, eoi, img), got {list(given)}")
        return dict(zip(IMAGE_ROLES, (int(i) for i in given)))
    gen = src / "generation_config.json"
    gen_kwargs = json.loads(gen.read_text()).get("generation_kwargs") or {} if gen.is_file() else {}
    tok = _load_tokenizer(src)
    vocab = tok.get_vocab() if tok is not None else {}
    ids = {"boi": gen_kwargs.get("boi_token_id", vocab.get(JANUS_TOKENS["boi"])),
           "eoi": vocab.get(JANUS_TOKENS["eoi"]), "img": hf.image_token_id}
    missing = [r for r, i in ids.items() if i is None]
    if missing:
        raise ConversionError(f"{src}: cannot find the id of {[JANUS_TOKENS[r] for r in missing]}: "
                              f"{'the tokenizer lacks it' if tok is not None else 'no tokenizer in the folder'}"
                              f"; pass image_token_ids=(boi, eoi, img) / --image-token-ids BOI EOI IMG")
    return ids


def janus_hybrid_config(src: str | Path, image_token_ids: Sequence[int] | None = None) -> HybridConfig:
    """The HybridConfig of a Janus checkpoint, refusing the variants we cannot compute exactly."""
    src = Path(src)
    hf = _janus_hf_config(src)
    where = str(src / CONFIG)
    t, v, q = hf.text_config, hf.vision_config, hf.vq_config
    c = _hf_text_config(t.to_dict(), f"{where} (text_config)")

    def need(ok: bool, field: str, value: Any, why: str) -> None:
        if not ok:
            raise ConversionError(f"{where}: {field}={value!r} is not supported ({why})")

    D = c.hidden_size
    need(not v.use_qk_norm, "vision_config.use_qk_norm", v.use_qk_norm, "SigLIP's attention has no qk-norm")
    need(v.attention_bias, "vision_config.attention_bias", v.attention_bias, "SigLIP's q/k/v always have biases")
    for name, cfg_ in (("vision_config", v), ("vq_config", q)):  # the aligners / head use this activation
        need(cfg_.hidden_act == "gelu", f"{name}.hidden_act", cfg_.hidden_act, "our aligner MLPs use exact GELU")
    need(v.projection_dim == D, "vision_config.projection_dim", v.projection_dim, f"the aligner must output hidden_size={D}")
    need(q.projection_dim == D, "vq_config.projection_dim", q.projection_dim, f"the generation aligner must output {D}")
    need(q.image_token_embed_dim == D, "vq_config.image_token_embed_dim", q.image_token_embed_dim,
         f"the generation head reads hidden states of size {D}")
    need(q.num_hidden_layers == v.depth, "vq_config.num_hidden_layers", q.num_hidden_layers,
         f"our two aligners share one depth, vision_config.depth={v.depth}")
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    need(isinstance(v.image_size, int) or len(set(v.image_size)) == 1, "vision_config.image_size", v.image_size, "square only")
    down = 2 ** (len(q.channel_multiplier) - 1)  # each VQ level but the last halves the resolution
    need(size // down == q.num_patches, "vq_config.channel_multiplier", q.channel_multiplier,
         f"the VQ grid of a {size}px image ({size // down}) must be the generated grid num_patches={q.num_patches}")
    need(v.num_image_tokens == q.num_patches ** 2, "vision_config.num_image_tokens", v.num_image_tokens,
         f"generation draws one token per VQ cell, {q.num_patches ** 2}")
    ids = _janus_image_ids(src, hf, image_token_ids)
    fields = {**_text_fields(c, src), "tie_embeddings": bool(hf.tie_word_embeddings)}  # Janus ties at the top
    return HybridConfig(**fields, image_size=size, image_codec="vq", latent_channels=q.embed_dim, latent_downsample=down,
                        patch_size=1, image_head="ar", codebook_size=q.num_embeddings, code_embed_dim=q.embed_dim,
                        gen_head_dim=q.projection_dim, und_feature_dim=v.hidden_size,
                        und_tokens=(size // patch) ** 2, aligner_depth=v.depth, und_bidirectional=False,
                        **{f"{r}_id": i for r, i in ids.items()})


def _siglip_processor(src: Path, size: int):
    """A SiglipImageProcessor doing what Janus' processor does to a square image: bicubic resize
    to ``size``, rescale, normalise with its mean/std (non-square images: Janus pads to a square,
    our encoder squashes)."""
    from transformers import SiglipImageProcessor
    from transformers.models.janus import JanusImageProcessor

    if (src / "preprocessor_config.json").is_file():
        jp = JanusImageProcessor.from_pretrained(str(src), local_files_only=True)
    else:  # JanusImageProcessor() would default to CLIP's mean/std; Janus' own processor uses 0.5
        warnings.warn(f"{src} has no preprocessor_config.json; assuming Janus' normalisation (mean = std = 0.5)")
        jp = JanusImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return SiglipImageProcessor(size={"height": size, "width": size}, resample=jp.resample,
                                do_rescale=True, rescale_factor=jp.rescale_factor, do_normalize=True,
                                image_mean=list(jp.image_mean), image_std=list(jp.image_std))


@dataclass
class JanusParts:
    model: HybridModel
    siglip: Any  # encoders.siglip.SiglipEncoder (transformers backend)
    vq: Any  # encoders.vq.VQTokenizer (janus backend)


def load_janus(src: str | Path, image_token_ids: Sequence[int] | None = None) -> JanusParts:
    """A ``JanusForConditionalGeneration`` folder -> our model, SigLIP encoder and VQ tokenizer
    (fp32), read in one streamed pass over its safetensors."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.janus import JanusVQVAE

    from encoders.siglip import SiglipEncoder
    from encoders.vq import VQTokenizer

    src = Path(src)
    cfg = janus_hybrid_config(src, image_token_ids)
    safetensors_files(src)  # no weights: fail before building anything
    hf = _janus_hf_config(src)
    v = hf.vision_config
    tower = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=int(v.hidden_size * v.mlp_ratio),
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels, image_size=cfg.image_size, patch_size=cfg.image_size // math.isqrt(cfg.und_tokens),
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, vision_use_head=False))
    vqvae = JanusVQVAE(hf.vq_config)
    model = HybridModel(cfg)
    lm, vision, vq = janus_key_maps(cfg)
    load_streamed(src, [Route(lm.to_ours, model), Route(vision.to_ours, tower), Route(vq.to_ours, vqvae)],
                  ignore=_is_rope_cache)
    siglip = SiglipEncoder.from_transformers_model(tower, _siglip_processor(src, cfg.image_size))
    return JanusParts(model.eval(), siglip, VQTokenizer(vqvae))


def convert_janus(src: str | Path, dst: str | Path, *, image_token_ids: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """A Janus folder -> our layout: the HybridModel at ``dst``, ``siglip/``, ``vq/``, ``tokenizer/``.
    ``dtype=None`` stores the checkpoint's own dtype."""
    src, dst = Path(src), Path(dst)
    parts = load_janus(src, image_token_ids)
    dtype = dtype or _source_dtype(src)
    save_pretrained_model(parts.model.to(dtype), dst)
    parts.siglip.to(dtype).save_pretrained(dst / SIGLIP_DIR)
    parts.vq.to(dtype).save_pretrained(dst / VQ_DIR)
    _copy_tokenizer_files(src, dst / TOKENIZER_DIR)
    return dst


def export_janus(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """Our Janus layout (see ``convert_janus``) -> a ``JanusForConditionalGeneration`` folder."""
    from transformers import JanusConfig

    from encoders.siglip import SiglipEncoder
    from encoders.vq import VQTokenizer

    src, dst = Path(src), Path(dst)
    for sub in (SIGLIP_DIR, VQ_DIR):
        if not (src / sub).is_dir():
            raise FileNotFoundError(f"{src} has no {sub}/ folder; a Janus export needs the model, {SIGLIP_DIR}/ and {VQ_DIR}/")
    model = load_pretrained_model(src)
    siglip, vq = SiglipEncoder.from_pretrained(src / SIGLIP_DIR), VQTokenizer.from_pretrained(src / VQ_DIR)
    cfg = model.config

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConversionError(f"cannot export {src} as Janus: {what} (--to llama / qwen2 exports "
                                  f"the text model alone)")

    need(cfg.image_head == "ar", f"image_head={cfg.image_head!r}; Janus generates VQ codes ('ar')")
    need(not cfg.und_bidirectional, "und_bidirectional=True; Janus reads input images causally")
    need(cfg.gen_head_dim == cfg.dim, f"gen_head_dim={cfg.gen_head_dim} must equal dim={cfg.dim} in Janus")
    need(siglip.backend == "transformers" and siglip.feature_layer is None,
         f"the SigLIP encoder must be a transformers tower read at its last layer (got {siglip.backend}, "
         f"feature_layer={siglip.feature_layer})")
    need(vq.backend == "janus", f"the VQ tokenizer must be the janus backend (got {vq.backend})")
    need(vq.codebook_size == cfg.codebook_size and siglip.num_tokens == cfg.und_tokens,
         "the encoders' sizes disagree with the model config")
    s = siglip.tower.config
    ratio = s.intermediate_size / s.hidden_size
    need(int(s.hidden_size * ratio) == s.intermediate_size, f"SigLIP intermediate_size={s.intermediate_size}")
    text = hf_text_config(cfg, "qwen2" if cfg.attn_bias else "llama")
    vision = dict(hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
                  num_attention_heads=s.num_attention_heads, num_channels=s.num_channels, image_size=s.image_size,
                  patch_size=s.patch_size, hidden_act=s.hidden_act, layer_norm_eps=s.layer_norm_eps, mlp_ratio=ratio,
                  attention_bias=True, projection_dim=cfg.dim, depth=cfg.aligner_depth,
                  num_image_tokens=cfg.image_tokens, use_qk_norm=False)
    hf = JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq.model.config.to_dict(),
                     image_token_id=cfg.img_id, tie_word_embeddings=cfg.tie_embeddings)
    hf.architectures = ["JanusForConditionalGeneration"]
    lm, vis_map, vq_map = janus_key_maps(cfg)
    state: dict[str, Tensor] = {}
    for kmap, module in ((lm, model), (vis_map, siglip.tower), (vq_map, vq.model)):
        for name, t in module.state_dict().items():
            theirs = kmap.to_theirs(name)
            if theirs is None:
                raise ConversionError(f"{type(module).__name__}.{name} has no place in a Janus checkpoint")
            if not (module is model and name == "lm_head.weight" and cfg.tie_embeddings):
                state[theirs] = t
    dtype = dtype or model.embed_tokens.weight.dtype
    hf.dtype = str(dtype).removeprefix("torch.")
    save_sharded({k: v.to(dtype) for k, v in state.items()}, dst, max_shard_bytes)
    hf.save_pretrained(str(dst))
    gen = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
           "generation_kwargs": {"boi_token_id": cfg.boi_id}}  # what JanusForConditionalGeneration.generate reads
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _copy_tokenizer_files(src / TOKENIZER_DIR, dst)
    return dst


# --- command line ------------------------------------------------------------------------------

EPILOG = """\
examples:
  # a Llama / Qwen2 LLM as the backbone of a new multimodal model, with <boi>/<eoi>/<img> added
  python -m hybrid.convert ./TinyLlama-1.1B ./llama-hybrid --add-image-tokens
  # ... with a Janus-style discrete image head
  python -m hybrid.convert ./Qwen2.5-0.5B ./qwen-hybrid --add-image-tokens \\
      --set image_head=ar --set image_codec=vq --set patch_size=1 --set image_size=384 \\
      --set latent_downsample=16 --set codebook_size=16384
  # Janus / Janus-Pro (transformers' JanusForConditionalGeneration folder) -> model + siglip/ + vq/ + tokenizer/
  python -m hybrid.convert ./Janus-Pro-1B ./janus-hybrid
  # back again: our text model to Llama / Qwen2, our Janus layout to Janus
  python -m hybrid.convert ./llama-hybrid ./llama-again --to llama
  python -m hybrid.convert ./janus-hybrid ./janus-again --to janus

The source format is read from SRC/config.json (model_type llama | qwen2 | janus, or a HybridConfig).
A Hugging Face source converts to 'hybrid'; a hybrid source defaults to 'janus' when it has siglip/
and vq/ folders, else to 'qwen2' if it has q/k/v biases, else 'llama'. Only local safetensors are read.
Supported RoPE: default, 'linear' and Llama 3.1+'s 'llama3'. Refused, with the config field named: dynamic / YaRN RoPE, sliding-window
layers, o_proj / MLP biases, head_dim != hidden_size / heads, non-SiLU MLPs, and Janus variants our
modules cannot compute exactly (vision qk-norm, aligner depths that differ, non-GELU aligners).
"""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string, e.g. image_head=ar


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConversionError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def convert(src: str | Path, dst: str | Path, to: str | None = None, *, add_image_tokens: bool = False,
            image_token_ids: Sequence[int] | None = None, dtype: torch.dtype | None = None,
            overrides: dict[str, Any] | None = None) -> tuple[str, str]:
    """Convert ``src`` into ``dst`` (see ``EPILOG`` for the defaults of ``to``). Returns
    (source format, destination format)."""
    src, dst = Path(src), Path(dst)
    fmt = detect_format(src)
    if fmt == "hybrid":
        to = to or ("janus" if (src / SIGLIP_DIR).is_dir() and (src / VQ_DIR).is_dir()
                    else "qwen2" if read_config(src).get("attn_bias") else "llama")
    to = to or "hybrid"
    if to not in FORMATS:
        raise ConversionError(f"unknown target format {to!r}; choose from {FORMATS}")
    if fmt != "hybrid" and to != "hybrid":
        raise ConversionError(f"{src} is a {fmt} checkpoint; it converts to 'hybrid' only (got --to {to})")
    if fmt == "hybrid" and to == "hybrid":
        raise ConversionError(f"{src} is already a hybrid folder; pass --to llama, qwen2 or janus")
    if (add_image_tokens or overrides) and fmt not in TEXT_TYPES:
        raise ConversionError("--add-image-tokens and --set apply to converting a Llama / Qwen2 model only")
    if image_token_ids is not None and fmt == "hybrid":
        raise ConversionError("--image-token-ids applies to Hugging Face sources; an export keeps the model's ids")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new destination folder")
    if fmt in TEXT_TYPES:
        convert_hf_causal_lm(src, dst, add_image_tokens=add_image_tokens, image_token_ids=image_token_ids,
                             dtype=dtype, **(overrides or {}))
    elif fmt == "janus":
        convert_janus(src, dst, image_token_ids=image_token_ids, dtype=dtype)
    elif to == "janus":
        export_janus(src, dst, dtype=dtype)
    else:
        export_hf_causal_lm(src, dst, arch=to, dtype=dtype)
    return fmt, to


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid.convert", description="Convert checkpoints between Hugging Face "
        "Llama / Qwen2 / Janus folders and hybrid's format (safetensors + config.json, no pickle).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source folder (its config.json tells the format)")
    parser.add_argument("dst", help="destination folder (new or empty)")
    parser.add_argument("--to", choices=FORMATS, help="target format (default: see below)")
    parser.add_argument("--add-image-tokens", action="store_true",
                        help="Llama/Qwen2 source: add <boi> <eoi> <img> to the vocabulary and tokenizer "
                             "(new rows = mean of the existing ones)")
    parser.add_argument("--image-token-ids", type=int, nargs=3, metavar=("BOI", "EOI", "IMG"),
                        help="use these existing ids for the image markers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="storage dtype (default: the source's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Llama/Qwen2 source: a HybridConfig field of the image path, e.g. image_head=ar")
    args = parser.parse_args(argv)
    try:
        fmt, to = convert(args.src, args.dst, args.to, add_image_tokens=args.add_image_tokens,
                          image_token_ids=args.image_token_ids, dtype=DTYPES.get(args.dtype),
                          overrides=_overrides(args.set))
    except (ValueError, OSError) as e:  # ConversionError, invalid configs, missing / existing folders
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} ({fmt}) -> {args.dst} ({to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
