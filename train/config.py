"""TrainConfig: a flat dataclass read from YAML, with dotted command-line overrides.

    stage: hybrid
    preset: tiny           # a HybridConfig preset ...
    model: {dim: 192}      # ... plus per-field overrides (checked against HybridConfig)
    steps: 600
    lr: 1.0e-3

Overrides on the command line: ``steps=50 model.dim=128 output_dir=runs/x``. Values are parsed
as YAML scalars (``1e-3`` -> float, ``true`` -> bool, ``[1, 2]`` -> list). Unknown keys, in the
file or in an override, are errors: a typo must not silently train the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybrid.config import HybridConfig

# What a multiple-choice answer is trained as (TrainConfig.mc_answer; train/data.py builds it).
MC_ANSWERS = ("letter", "text")


@dataclass
class TrainConfig:
    stage: str = "hybrid"
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # HybridConfig overrides
    output_dir: str = "runs/tiny"
    seed: int = 0

    # data: None (or "shapes"): the shapes world, the embedded default. Otherwise files, as
    # train.sources.parse_data_spec reads them: "a.jsonl", "a.jsonl=3,shards-{000..001}.tar=1", or
    # a datasets folder (mix_* do not apply to files; samples still use shapes-world prompts)
    data: str | None = None
    data_on_error: str = "skip"  # a bad record: "skip" (counted by reason, logged) or "raise"
    heldout_eval: bool = True  # sample prompts from the held-out compositions too
    mix_caption: float = 0.85  # caption -> image samples
    mix_interleaved: float = 0.15  # text, image, text, image documents
    mix_understand: float = 0.0  # image -> caption / multiple-choice answer, through the SigLIP path
    understand_questions: float = 0.5  # of the understanding samples, the share that are questions
    # what a multiple-choice answer is trained as: "letter" ("B") or "text" (" a red circle", the
    # right option's text); both are what MMBench's answer matching reads (train/data.py)
    mc_answer: str = "letter"
    tokenizer: str | None = None  # a local HF tokenizer folder; None: train one on the world's text
    tokenizer_vocab: int = 512
    batch_size: int = 16  # samples per step and process (packed into rows of seq_len)
    seq_len: int | None = None  # None: the model's max_seq_len
    num_workers: int = 0
    # Start from a pretrained model folder (a run's final/, or `python -m hybrid.convert` output of a
    # Llama / Qwen2 / Janus checkpoint): its config.json replaces preset (model: overrides still
    # apply), its tokenizer/, vq/ and siglip/ are used unless given below.
    init_from: str | None = None
    # frozen components, from local folders (the model config takes their sizes from them)
    vq_path: str | None = None  # a VQTokenizer folder (train stage "vq"); needed by model.image_codec=vq
    siglip_path: str | None = None  # a SiglipEncoder folder (stage "siglip"); needed by mix_understand > 0
    siglip_trainable: bool = False  # fine-tune the SigLIP encoder with the model (frozen by default)
    siglip_lr_scale: float = 0.1  # its learning rate relative to lr
    und_eval: int = 100  # held-out and train multiple-choice questions scored at every sample step
    # captions per split read with their own and with another image's features at every sample step
    # (train.probes.image_reliance): the gap shows whether the model uses the image, and when it stops
    reliance_n: int = 64
    # > 0: when the run finishes, the mean text and image loss (hybrid_loss, token-weighted, eval
    # mode, fixed noise) over this many batches of batch_size held-out samples, in OUT/val.json
    # (with the parameter and training-token counts: what train.sweep fits scaling laws to). The
    # shapes world holds out by seed (another world of the same distribution); file data needs
    # val_data, held-out files in the same spec format as data.
    val_batches: int = 0
    val_data: str | None = None

    # optimisation
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    # "cosine": warmup + cosine to min_lr_ratio; "wsd": warmup + constant + a 1 - sqrt cooldown over
    # the last cooldown_fraction of the steps (train/schedules.py)
    lr_schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    ema_decay: float = 0.0  # > 0: keep fp32 EMA weights (checkpointed) and export them as final_ema/
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)): early updates move faster
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    # "no" (fp32: the CPU path), "bf16", "fp16" (GPUs); None: what the accelerate config / launcher
    # says (train/accelerate/*.yaml), else by device: bf16 on a GPU with bf16, fp32 on the CPU
    mixed_precision: str | None = None

    # logging, checkpoints, samples
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 200
    num_samples: int = 8
    sample_steps: int = 25
    guidance_scale: float = 3.0
    temperature: float = 1.0  # "ar" head: code sampling temperature
    top_k: int | None = None  # "ar" head: sample from the k most likely codes
    resume: str = "auto"  # "auto": latest checkpoint in output_dir if any; "none"; or a path
    # End this invocation after this step (checkpointing there) while the LR schedule still
    # follows ``steps``: for job-time limits, and for tests of exact resumption.
    stop_at: int | None = None
    # A resumed run must have the training config its checkpoint was written with, except for the
    # fields in RESTART_FIELDS (cadence, paths, stop_at, ...); true accepts any difference.
    allow_config_change: bool = False

    # faults: a step whose loss or gradient norm is not finite (on any process) is skipped: no
    # optimizer update, but its batch is consumed and the step / LR schedule advance. This many
    # consecutive skipped steps stop the run (the last good checkpoint is kept).
    max_bad_steps: int = 5
    # Debug fault injection: the loss of these steps is made NaN before backward (a transient
    # fault such as a bad node or a corrupt batch), to exercise the guard end to end.
    fault_nan_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = []
        if self.stage != "hybrid":
            problems.append(f"stage {self.stage!r} is not available yet (only 'hybrid')")
        if self.data is not None and not self.data.strip():
            problems.append("data must be a path / spec, or unset for the shapes world")
        if self.data_on_error not in ("skip", "raise"):
            problems.append(f"data_on_error must be skip/raise, got {self.data_on_error!r}")
        if self.lr_schedule not in ("cosine", "wsd"):
            problems.append(f"lr_schedule must be cosine/wsd, got {self.lr_schedule!r}")
        if not 0 < self.cooldown_fraction <= 1:
            problems.append(f"cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.val_batches < 0:
            problems.append(f"val_batches must be >= 0 (0: no validation), got {self.val_batches}")
        if self.val_batches and not self.shapes_data and not self.val_data:
            problems.append("val_batches > 0 with file data needs val_data (held-out files, a spec like data)")
        if self.val_data is not None and not self.val_data.strip():
            problems.append("val_data must be a path / spec, or unset")
        if self.max_bad_steps < 1:
            problems.append(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be no/bf16/fp16 (or unset), got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "log_every", "save_every", "sample_every", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        mixes = (self.mix_caption, self.mix_interleaved, self.mix_understand)
        if min(mixes) < 0 or sum(mixes) <= 0:
            problems.append("mix_caption, mix_interleaved and mix_understand must be >= 0 and not all 0")
        if not 0.0 <= self.understand_questions <= 1.0:
            problems.append(f"understand_questions must be in [0, 1], got {self.understand_questions}")
        if self.mc_answer not in MC_ANSWERS:
            problems.append(f"mc_answer must be one of {MC_ANSWERS}, got {self.mc_answer!r}")
        if self.model_config().image_head == "tokens" and (self.siglip_path or self.siglip_trainable):
            problems.append("model.image_head=tokens (Chameleon) reads input images as VQ codes: siglip_path and "
                            "siglip_trainable do not apply; leave them unset")
        if (self.mix_understand > 0 and not self.siglip_path and not self.init_from
                and self.model_config().image_head != "tokens"):  # "tokens" reads input images as VQ codes
            problems.append("mix_understand > 0 needs siglip_path (a SiglipEncoder folder, e.g. runs/siglip/final)")
        if self.model_config().image_codec == "vq" and not self.vq_path and not self.init_from:
            problems.append("model.image_codec=vq needs vq_path (a VQTokenizer folder, e.g. runs/vq/final)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        self.model_config()  # validates preset + model overrides early

    @property
    def shapes_data(self) -> bool:
        return self.data in (None, "shapes")

    def math_dict(self) -> dict[str, Any]:
        """The fields that decide what is computed (all but RESTART_FIELDS): what a resumed run
        must share with its checkpoint."""
        return {k: v for k, v in self.to_dict().items() if k not in RESTART_FIELDS}

    def model_config(self, **extra: Any) -> HybridConfig:
        """The preset (or ``init_from``'s config.json) + ``model`` overrides + ``extra``."""
        if self.init_from:
            base = HybridConfig.load(Path(self.init_from) / "config.json").to_dict()
            return HybridConfig.from_dict({**base, **self.model, **extra})
        return HybridConfig.from_preset(self.preset, **{**self.model, **extra})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Fields that may differ between a checkpoint and the run resuming it: where and when to stop,
# save, log and sample, how many checkpoints to keep, how to resume, the fault policy, data
# loading workers (the data is a pure function of the index), the debug fault injection (a
# transient fault is not expected to recur after a restart), and the final validation. Anything
# else changes the math.
RESTART_FIELDS = frozenset({
    "output_dir", "stop_at", "resume", "allow_config_change", "log_every", "save_every",
    "keep_checkpoints", "sample_every", "num_samples", "sample_steps", "guidance_scale", "temperature",
    "top_k", "und_eval", "reliance_n", "heldout_eval", "num_workers", "max_bad_steps", "fault_nan_steps", "data_on_error",
    "val_batches", "val_data",  # evaluated after training, from the exported weights
})


def read_raw(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML mapping (empty if ``path`` is None) with ``key=value`` / ``section.key=value``
    overrides applied. Shared by every training stage; each checks the keys against its own
    dataclass with ``build_config``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        top, _, rest = key.strip().partition(".")
        if rest:
            raw[top] = {**(raw.get(top) or {}), rest: yaml.safe_load(value)}
        else:
            raw[top] = yaml.safe_load(value)
    return raw


def build_config(cls: type, raw: dict[str, Any], sections: dict[str, type] | None = None) -> Any:
    """Instantiate the flat dataclass ``cls`` from ``raw``: unknown keys are errors, values are
    checked against the field annotations. ``sections`` names dict-valued fields whose keys are
    fields of another dataclass (e.g. ``model`` -> ``HybridConfig``), checked the same way."""
    sections = sections or {}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}; valid keys: {sorted(hints)}")
    values = {}
    for k, v in raw.items():
        if k in sections:
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"{k}: expected a mapping, got {v!r}")
            sub = typing.get_type_hints(sections[k])
            bad = sorted(set(v or {}) - set(sub))
            if bad:
                raise ValueError(f"unknown {k} keys: {bad}")
            values[k] = {kk: _coerce(f"{k}.{kk}", sub[kk], vv) for kk, vv in (v or {}).items()}
        elif isinstance(v, dict) and typing.get_origin(hints[k]) is not dict:
            raise ValueError(f"override {k}.*: {k!r} is not a section")
        else:
            values[k] = _coerce(k, hints[k], v)
    return cls(**values)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a hybrid-stage YAML file (or defaults if ``path`` is None) and apply overrides."""
    return build_config(TrainConfig, read_raw(path, overrides), sections={"model": HybridConfig})


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check a value against a field's annotation; accept what YAML 1.1 leaves as a string
    (``1e-4`` is a str to PyYAML) when it parses as the declared number."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is bool:
            if isinstance(value, bool):
                return value
        elif t in (int, float):
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (t is float and isinstance(value, float)):
                return t(value)
            if isinstance(value, str):
                try:
                    return t(value)
                except ValueError:
                    pass
        elif t is str and isinstance(value, str):
            return value
        elif typing.get_origin(t) is dict and isinstance(value, dict):
            return value
        elif typing.get_origin(t) is list and isinstance(value, list):
            (item,) = typing.get_args(t)
            return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ValueError(f"{name}: expected {expected}, got {value!r}")
