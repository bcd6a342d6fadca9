"""The hybrid training stage: one loop for a laptop CPU and for multi-GPU ``accelerate launch``.

What is trained is handed to ``accelerator.prepare`` as one module: the ``HybridModel``, or with
``siglip_trainable=true`` a ``ModelWithEncoder`` holding it and the SigLIP encoder (one DDP
reducer, one DeepSpeed engine). The frozen image codec (pixels, or a VQ tokenizer
from ``vq_path``) and a frozen encoder stay outside. The model config takes its latent grid /
codebook / feature sizes from these components. Run state (model, optimizer, LR schedule, RNG states)
is saved with ``accelerator.save_state`` every ``save_every`` steps under
``<output_dir>/checkpoints/step_XXXXXXX`` and a restarted run resumes from the newest one.

Hardware and distribution (CPU, DDP, DeepSpeed ZeRO-2/3 with or without offload, several
machines) come from the accelerate config the run is launched with (train/accelerate/*.yaml),
never from branches here: the loop only uses accelerate's API, which DeepSpeed implements
(``backward`` steps its engine, ``save_state`` writes its sharded checkpoint). Its "auto" fields
are filled from this config: micro batch (batch_size), accumulation (grad_accum), clipping
(grad_clip), precision. Sampling runs on every process (under ZeRO-3 the forward gathers
parameters collectively) and the export gathers the full state dict with ``get_state_dict``.

With ``val_batches > 0`` a finished run also writes ``<output_dir>/val.json``: the token-weighted
mean text and image loss of the final weights on held-out data (``validation_set``), the parameter
counts and the tokens trained, which ``python -m train.sweep`` fits scaling laws to.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from PIL import Image
from safetensors.torch import load_model
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from encoders.latents import build_codec
from encoders.siglip import SiglipEncoder
from hybrid.pipeline import HybridPipeline, to_uint8  # to_uint8: also the vq stage's and sample_eval's
from hybrid.losses import hybrid_loss
from hybrid.model import HybridModel, HybridOutput
from hybrid.sampling import generate_images, scheduler_for
from hybrid.sequence import MultimodalBatch, SampleBuilder, pack
from hybrid.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
from train.ema import EMA
from train.schedules import build_lr_lambda
# (STATE_FILE and latest_checkpoint are also imported from here by the vq / siglip stages and tests)
from train.state_io import (OBJECTS_FILE, STATE_FILE, Stateful, latest_checkpoint, load_objects,
                            rank_objects_file, save_objects)
from train.config import TrainConfig, load_config  # noqa: F401  (the stage's config loader)
from train.sources import REASONS, SampleLimit, build_sources, parse_data_spec
from train.data import ShapesTrainSet, understanding_question
from train.detect import judge
from train.probes import image_reliance
from train.scaling import count_parameters
from train.shapes import ShapesWorld



# The tokenizer a run trains when none is given: on this many texts of its shapes world.
TOKENIZER_TEXTS = 20_000
# The final validation (TrainConfig.val_batches) on the shapes world reads another world of the
# same distribution, with this seed: scenes that were not trained on, from the same compositions
# (the "heldout" split would measure compositional generalisation instead). The same world and
# noise for every training seed, so that runs of different seeds are scored on the same samples.
VAL_WORLD_SEED = 1_000_003
# Its diffusion timesteps and noise: batch i draws from a generator seeded val_noise_seed(i).
VAL_NOISE_SEED = 0x5EED_7A1


class NonFiniteError(RuntimeError):
    """``max_bad_steps`` consecutive steps had a non-finite loss or gradient norm."""


class ModelWithEncoder(torch.nn.Module):
    """The model and the fine-tuned SigLIP encoder (``siglip_trainable``) as ONE trained module:
    accelerate gives DeepSpeed one model per engine, and under DDP one module is one reducer (a
    rank whose batch has no understanding image leaves the encoder unused, which
    ``find_unused_parameters`` would allow, but DeepSpeed's gradient buckets and ZeRO-3's
    collective parameter gathers would not: so when training, a rank without one runs the encoder
    on a blank image and hands the model none of its features (``[:0]``), as ``hybrid_loss`` runs
    the model's own heads on nothing). ``forward`` is the model's, except that ``und_features``
    are the understanding *images*, encoded inside this forward so the engine sees the encoder
    used. Parameter names get a ``model.`` / ``encoder.`` prefix."""

    def __init__(self, model: HybridModel, encoder: SiglipEncoder, image_size: int):
        super().__init__()
        self.model, self.encoder, self.image_size = model, encoder, image_size

    def forward(self, *args, und_features: torch.Tensor | None = None, **kwargs) -> HybridOutput:
        if und_features is not None:
            und_features = self.encoder(und_features)  # (n_und, 3, H, W) -> (n_und, M, F)
        elif torch.is_grad_enabled():  # (the tower cannot take an empty batch: one blank image)
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=args[0].device)
            und_features = self.encoder(blank)[:0]  # (0, M, F)
            kwargs["und_index"] = torch.zeros(0, und_features.shape[1], dtype=torch.long, device=blank.device)
        return self.model(*args, und_features=und_features, **kwargs)


class CountedCollate:
    """``(batch, skips)``: ``skips`` counts, by reason, the bad records these items stand in for
    (an item names the one skipped at its own index). Counting what the loop *consumes*, not what
    a loader worker read ahead, keeps the counts exact across resumes and workers. A class, not a
    closure: DataLoader workers started by spawn / forkserver pickle it."""

    def __init__(self, collate: SampleBuilder):
        self.collate = collate

    def __call__(self, items: list) -> tuple:
        skips = torch.zeros(len(REASONS), dtype=torch.long)
        for it in items:
            if isinstance(it, dict) and it.get("skipped"):
                skips[REASONS.index(it["skipped"])] += 1
        return self.collate(items), skips


def pick_mixed_precision(configured: str | None) -> str:
    """The precision a run uses: the training config's, else the launcher's (``accelerate launch``
    passes its config's choice as ACCELERATE_MIXED_PRECISION), else by device: bf16 autocast on a
    GPU that has bf16, fp32 ("no") elsewhere (on these CPUs bf16 matmul is ~100x slower)."""
    if configured is not None:
        return configured
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher:
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def save_run(accelerator, out: Path, step: int, key: str, value, keep: int, extra: dict | None = None,
             objects: dict[str, Stateful] | None = None, sharded: dict[str, Stateful] | None = None) -> Path:
    """Save the run state as ``out/checkpoints/step_XXXXXXX``: accelerate's (model, optimizer, RNG
    states; DeepSpeed's sharded files under DeepSpeed), then ``objects`` (LR schedule, EMA, ...,
    identical on every process) in ``run_objects.safetensors`` (train/state_io.py: no pickle) and
    ``sharded`` ones (a ZeRO-3 EMA: each process its own) in ``run_objects_rank{i}.safetensors``, then
    ``trainer_state.json`` (step, ``key: value``, what ``resume_run`` checks, and ``extra``) last,
    so its presence marks the checkpoint complete and a killed save is ignored. Only the newest
    ``keep`` complete ones are kept (an incomplete one is removed when a later save completes)."""
    path = out / "checkpoints" / f"step_{step:07d}"
    accelerator.save_state(str(path))
    if sharded:
        save_objects(sharded, path / rank_objects_file(accelerator.process_index))
    accelerator.wait_for_everyone()  # every process's files are on disk before the marker
    if accelerator.is_main_process:
        if objects:
            save_objects(objects, path / OBJECTS_FILE)
        tmp = path / (STATE_FILE + ".tmp")  # written whole, then renamed: never a half-written marker
        tmp.write_text(json.dumps({"step": step, key: value, **(extra or {})}))
        os.replace(tmp, path / STATE_FILE)
        done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for broken in (p for p in (out / "checkpoints").glob("step_*") if not (p / STATE_FILE).is_file()):
            if broken.name < path.name:  # a save killed midway, superseded by this complete one
                shutil.rmtree(broken, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def resume_run(accelerator, out: Path, resume: str, key: str, expected,
               objects: dict[str, Stateful] | None = None) -> int:
    """Restore the run state of ``out`` (``resume``: "auto" = newest complete checkpoint, "none",
    or a checkpoint path) and ``objects`` (as given to ``save_run``), and return its step (0 when
    starting fresh). ``trainer_state.json[key]`` must equal ``expected`` (the model config): a
    different model must not silently resume."""
    return resume_state(accelerator, out, resume, key, expected, objects=objects)[0]


def resume_state(accelerator, out: Path, resume: str, key: str, expected, train_config: dict | None = None,
                 allow_config_change: bool = False, objects: dict[str, Stateful] | None = None,
                 sharded: dict[str, Stateful] | None = None) -> tuple[int, dict]:
    """``resume_run``, returning ``(step, trainer_state)`` too. With ``train_config`` (the fields
    of the training config that change the math), a checkpoint saved with a different one is
    refused, naming the fields, unless ``allow_config_change``."""
    ckpt = None if resume == "none" else latest_checkpoint(out) if resume == "auto" else Path(resume)
    if ckpt is None:
        # starting from step 0: records of an earlier attempt (one killed before its first complete
        # checkpoint) are about to be redone, and would otherwise be logged twice
        if accelerator.is_main_process:
            drop_log_after(out / "log.jsonl", 0)
        return 0, {}
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads((ckpt / STATE_FILE).read_text())
    saved = state.get(key)
    if saved is not None and saved != expected:
        diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        raise ValueError(f"{ckpt} was trained with a different model config (differs in {diff}); "
                         f"use another output_dir, or resume=none to start over")
    saved = state.get("train_config")
    if train_config is not None and saved is not None and saved != train_config:
        diff = {k: (saved.get(k), train_config.get(k)) for k in sorted(set(saved) | set(train_config))
                if saved.get(k) != train_config.get(k)}
        if not allow_config_change:
            raise ValueError(f"{ckpt} was trained with a different training config (checkpoint, now): {diff}; "
                             f"use the same config, another output_dir, resume=none to start over, or "
                             f"allow_config_change=true to resume with the new values")
        accelerator.print(f"warning: resuming {ckpt} with a changed training config (checkpoint, now): {diff}")
    # accelerate loads its own files (RNG states, optimizer, ...) with weights_only=True; DeepSpeed's
    # engine reads its sharded files itself (with pickle: resume only from checkpoints you wrote)
    accelerator.load_state(str(ckpt))
    if objects:
        load_objects(objects, ckpt / OBJECTS_FILE)
    if sharded:
        load_objects(sharded, ckpt / rank_objects_file(accelerator.process_index), accelerator.device)
    accelerator.print(f"resumed from {ckpt} at step {state['step']}")
    if accelerator.is_main_process:
        drop_log_after(out / "log.jsonl", state["step"])
    return state["step"], state


def drop_log_after(log: Path, step: int) -> None:
    """After a resume, forget log records past the checkpoint: they are about to be redone."""
    if log.is_file():
        lines = log.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in kept))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, encoder: torch.nn.Module | None = None
                    ) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and embeddings (the usual Llama / nanoGPT split).
    groups = []
    for module, lr in ((model, cfg.lr), (encoder, cfg.lr * cfg.siglip_lr_scale)):
        decay, no_decay = [], []
        for name, p in module.named_parameters() if module is not None else ():
            if p.requires_grad:
                is_embedding = name.split(".")[0] in ("embed_tokens", "gen_embed")
                (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_lambda(cfg: TrainConfig):
    """The LR multiplier per step for the configured schedule (train/schedules.py)."""
    # the vq / siglip stages' configs have no schedule choice: warmup + cosine
    return build_lr_lambda(getattr(cfg, "lr_schedule", "cosine"), cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio,
                           getattr(cfg, "cooldown_fraction", 0.2))


def sample_prompts(world: ShapesWorld, n: int, heldout: bool) -> list[dict]:
    """A fixed spread of GenEval-format prompt rows over the six tags; the second half from the
    held-out compositions if asked. Each row gets a "split" key."""
    n_held = n // 2 if heldout else 0
    per_tag = -(-n // 6)

    def spread(split: str) -> list[dict]:  # round-robin over tags (prompts() groups by tag)
        rows = world.prompts(split, n_per_tag=per_tag)
        return [{**r, "split": split} for i in range(per_tag) for r in rows[i::per_tag]]

    return spread("train")[: n - n_held] + (spread("heldout")[:n_held] if n_held else [])


def score_samples(pixels: torch.Tensor, rows: list[dict]) -> dict[str, float]:
    """GenEval's rule applied by the shapes detector, per split: the fraction of images that
    satisfy their prompt (sample_accuracy), of those that do so on a clean canvas (sample_strict,
    which clutter cannot raise), and the clutter guard's shares of images with more objects than
    prompted, nothing, or stray foreground (``train.detect.judge``). A quick learning signal, not
    the full evaluation."""
    imgs = to_uint8(pixels)  # (n, H, W, 3)
    verdicts: dict[str, list[dict]] = {}
    for img, row in zip(imgs, rows):
        v = judge(img, row)
        verdicts.setdefault(row["split"], []).append(v)
        verdicts.setdefault(f"{row['split']}/{row['tag']}", []).append(v)
    out = {}
    for group, vs in verdicts.items():
        fields = (("accuracy", "correct"), ("strict", "strict"), ("extra", "extra"), ("empty", "empty"),
                  ("noisy", "noisy")) if "/" not in group else (("accuracy", "correct"), ("strict", "strict"))
        for key, field in fields:
            out[f"sample_{key}_{group}"] = sum(v[field] for v in vs) / len(vs)  # per split, and split/tag
    return out


@torch.no_grad()
def option_scores(model: HybridModel, encoder: SiglipEncoder, builder: SampleBuilder, qs: list,
                  style: str = "letter") -> torch.Tensor:
    """(n, 4) scores of options A..D for multiple-choice questions ``qs`` read through the
    understanding path (image, question, options). ``style="letter"``: the logits of the four
    letter tokens where the answer starts; ``style="text"``: the summed log-probability of each
    option's answer text and the ``<eos>`` after it (the tokens training puts a loss on)."""
    letters = [builder.tokenizer.encode(k, add_special_tokens=False) for k in "ABCD"]
    if any(len(t) != 1 for t in letters) or len({t[0] for t in letters}) != 4:
        raise ValueError(f"the option letters A..D must be one distinct token each, got {letters}")
    letters = [t[0] for t in letters]
    if style == "letter":
        samples = [builder.tokenize(understanding_question(q, with_answer=False)) for q in qs]
    else:
        samples = [builder.tokenize(understanding_question(q, style=style, option=k)) for q in qs for k in "ABCD"]
    device = next(model.parameters()).device
    batch = pack(samples, max(len(s) for s in samples), builder.ids.pad, packing=False,
                 bidirectional=builder.bidirectional).to(device)
    T = batch.input_ids.shape[1]
    last = None
    if style == "letter":  # the position before <eos> reads the answer
        last = torch.tensor([b * T + len(s) - 2 for b, s in enumerate(samples)], device=device)
    out = model(batch.input_ids, batch.position_ids, batch.attention_mask(model.config.attn_impl),
                und_features=encoder(batch.und_images), und_index=batch.und_index, logits_index=last)
    if style == "letter":
        return out.logits[:, letters].float()  # (n, 4)
    logp = out.logits.float().log_softmax(-1)  # (4n, T, V)
    tok = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]  # (4n, T)
    return (tok * (batch.targets != -100)).sum(-1).view(len(qs), 4)


def answer_accuracy(model: HybridModel, encoder: SiglipEncoder, builder: SampleBuilder, world: ShapesWorld,
                    split: str, n: int, batch_size: int = 16, style: str = "letter") -> dict[str, float]:
    """MMBench-style multiple choice through the understanding path: the answer is the option
    with the highest ``option_scores``. Returns the accuracy overall ("all") and per question
    category (chance: 0.25)."""
    hits: dict[str, list[bool]] = {}
    per_batch = batch_size if style == "letter" else max(1, batch_size // 4)  # text: 4 samples a question
    for lo in range(0, n, per_batch):
        qs = [world.question_example(i, split) for i in range(lo, min(n, lo + per_batch))]
        for p, q in zip(option_scores(model, encoder, builder, qs, style).argmax(-1).tolist(), qs):
            right = "ABCD"[p] == q.answer
            hits.setdefault("all", []).append(right)
            hits.setdefault(q.category, []).append(right)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def save_sample_grid(pixels: torch.Tensor, prompts: list[str], path: Path, scale: int = 4) -> None:
    """Images side by side (upscaled, nearest) and the prompts in a text file next to them."""
    imgs = to_uint8(pixels)  # (n, H, W, 3)
    n, H, W, _ = imgs.shape
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * W * scale + (cols + 1) * 2, rows * H * scale + (rows + 1) * 2), (40, 40, 40))
    for i, im in enumerate(imgs):
        tile = Image.fromarray(im).resize((W * scale, H * scale), Image.NEAREST)
        grid.paste(tile, (2 + (i % cols) * (W * scale + 2), 2 + (i // cols) * (H * scale + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    path.with_suffix(".txt").write_text("\n".join(f"{i}: {p}" for i, p in enumerate(prompts)) + "\n")


def validation_set(cfg: TrainConfig, mcfg, collate: SampleBuilder) -> Dataset:
    """The held-out data of the final validation: for the shapes world, the training mixture from
    another world (``VAL_WORLD_SEED``, whatever the training seed; the next seed if a run trains on
    that one), caption dropout included, so that the number is the training objective on unseen
    samples; for file data, ``cfg.val_data`` read like ``cfg.data``."""
    if cfg.shapes_data:
        seed = VAL_WORLD_SEED + (cfg.seed == VAL_WORLD_SEED)
        world = ShapesWorld(resolution=mcfg.image_size, seed=seed)
        return ShapesTrainSet(world, mix_caption=cfg.mix_caption, mix_interleaved=cfg.mix_interleaved,
                              mix_understand=cfg.mix_understand, caption_dropout=mcfg.caption_dropout,
                              seed=seed, mc_answer=cfg.mc_answer, understand_questions=cfg.understand_questions)
    if not cfg.val_data:
        raise ValueError("val_batches > 0 with file data needs val_data (held-out files)")
    return build_sources(parse_data_spec(cfg.val_data), mcfg.image_size, 10_000_000, seed=cfg.seed,
                         caption_dropout=mcfg.caption_dropout, limit=SampleLimit.from_builder(collate),
                         on_error=cfg.data_on_error)


def val_batch(dataset: Dataset, collate: SampleBuilder, i: int, batch_size: int) -> MultimodalBatch:
    """Validation batch ``i``: items ``i * batch_size ...`` of ``dataset``, packed as in training."""
    return collate([dataset[j] for j in range(i * batch_size, (i + 1) * batch_size)])


def val_noise_seed(i: int) -> int:
    return VAL_NOISE_SEED + i


@torch.no_grad()
def validation_sums(model: HybridModel, batches: Iterable[tuple[int, MultimodalBatch]], scheduler, codec,
                    encoder: SiglipEncoder | None = None, encoder_trained: bool = False) -> torch.Tensor:
    """Summed losses over ``(i, batch)`` pairs: ``(text loss x text tokens, text tokens, image loss x
    image tokens, image tokens)`` (float64), each batch scored by ``hybrid_loss`` as the training
    loop scores it, with noise from a generator seeded ``val_noise_seed(i)``. Understanding
    images go through ``encoder`` (with ``image_head="tokens"`` hybrid_loss reads them as VQ codes
    itself); a batch without any gives the aligner features of no image, as in training (a trained
    encoder still runs, on a blank image: under ZeRO-3 every process must run every module). The
    auxiliary losses (MoE balance, z-loss) enter only the total, which is not read here. The
    caller puts the modules in eval mode."""
    cfg = model.config
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    g = torch.Generator(device)
    for i, batch in batches:
        batch = batch.to(device)
        und = None
        if cfg.image_head != "tokens":  # "tokens": hybrid_loss reads input images as VQ codes itself
            if batch.und_images.shape[0]:
                if encoder is None:
                    raise ValueError("the validation data has understanding images but there is no SigLIP encoder")
                und = encoder(batch.und_images)
            elif encoder is not None and encoder_trained:
                und = encoder(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))[:0]
            elif encoder is not None:
                und = torch.zeros(0, cfg.und_tokens, cfg.und_feature_dim, device=device)
        g.manual_seed(val_noise_seed(i))
        loss = hybrid_loss(model, batch, scheduler, codec, cfg.patch_size, cfg.image_loss_weight, cfg.attn_impl,
                           und_features=und, generator=g, image_head=cfg.image_head)
        sums += torch.tensor([loss.text.item() * loss.text_tokens, loss.text_tokens,
                              loss.image.item() * loss.image_tokens, loss.image_tokens],
                             dtype=torch.float64, device=device)
    return sums


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) the hybrid stage. Returns the exported model folder."""
    out = Path(cfg.output_dir)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # accelerate picks no process-group backend for DeepSpeed without a GPU, and then counts one
        # process per rank: name the backend of DeepSpeed's CPU accelerator (gloo) first.
        from deepspeed.accelerator import get_accelerator

        PartialState(backend=get_accelerator().communication_backend_name())
    accelerator = Accelerator(
        mixed_precision=pick_mixed_precision(cfg.mixed_precision),
        # hybrid_loss runs an absent image head on nothing, but some modules can still go without
        # gradient (the aligner of a run without a SigLIP encoder; the LM head in a batch with no
        # text target): DDP must not wait for them.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    ds_plugin = accelerator.state.deepspeed_plugin  # set when the accelerate config selects DeepSpeed
    if ds_plugin is not None:  # its engine clips inside backward: its "auto" clipping is ours, not 1.0
        ds_plugin.fill_match("gradient_clipping", must_match=False, gradient_clipping=cfg.grad_clip)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")

    init = Path(cfg.init_from) if cfg.init_from else None
    if init is not None and not (init / "model.safetensors").is_file():
        raise FileNotFoundError(f"init_from={init} has no model.safetensors (expected a run's final/ or a "
                                f"`python -m hybrid.convert` output)")

    def component(given: str | None, name: str) -> str | None:  # a path, or init_from's copy
        return given or (str(init / name) if init is not None and (init / name).is_dir() else None)

    base = cfg.model_config()  # preset or init_from's config.json, plus the model: overrides
    world = ShapesWorld(resolution=base.image_size, seed=cfg.seed)
    tok_dir = out / "tokenizer"
    tok_src = component(cfg.tokenizer, "tokenizer")
    if init is not None and tok_src is None:
        raise ValueError(f"init_from={init} has no tokenizer/: pass tokenizer=<the folder it was trained with>")
    if tok_src:
        # A pretrained model's tokenizer is used as is: its marker ids are already in the config.
        tokenizer = load_tokenizer(tok_src, add_markers=init is None)
        if main:
            tokenizer.save_pretrained(str(tok_dir))  # the run keeps the tokenizer it trained with
    else:
        if main and not (tok_dir / "tokenizer.json").is_file():
            train_tokenizer(world.corpus_texts(TOKENIZER_TEXTS), cfg.tokenizer_vocab).save_pretrained(str(tok_dir))
        accelerator.wait_for_everyone()
        tokenizer = load_tokenizer(tok_dir)

    # Frozen components first: the model's latent grid, codebook and feature sizes come from them.
    codec = build_codec(base.image_codec, component(cfg.vq_path, "vq")).to(accelerator.device).eval()
    sizes = dict(latent_channels=codec.latent_channels, latent_downsample=codec.downsample)
    if base.image_codec == "vq":
        sizes["codebook_size"] = codec.codebook_size
    encoder = None
    tokens_mode = base.image_head == "tokens"  # Chameleon: input images are VQ codes, no SigLIP
    siglip_path = None if tokens_mode else component(cfg.siglip_path, "siglip")
    if cfg.mix_understand > 0 and not siglip_path and not tokens_mode:
        raise ValueError("mix_understand > 0 needs siglip_path (or an init_from folder with siglip/)")
    if siglip_path:
        encoder = SiglipEncoder.from_pretrained(siglip_path, trainable=cfg.siglip_trainable)
        encoder = encoder.to(accelerator.device).eval()
        sizes.update(und_tokens=encoder.num_tokens, und_feature_dim=encoder.feature_dim)
    fixed = cfg.model if init is None else base.to_dict()  # what the user or the checkpoint fixed
    clash = {k: (fixed[k], v) for k, v in sizes.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError(f"the model config disagrees with the frozen components (config, actual): {clash}")
    if init is None:
        # "tokens": the VQ codes are the vocabulary's last codebook_size ids, after the text tokens
        vocab = len(tokenizer) + (codec.codebook_size if tokens_mode else 0)
        mcfg = cfg.model_config(vocab_size=vocab, **special_token_ids(tokenizer), **sizes)
    else:
        mcfg = base
        if len(tokenizer) > mcfg.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model at {init} only "
                             f"{mcfg.vocab_size} rows")
    model = HybridModel(mcfg)
    if init is not None:
        try:
            load_model(model, str(init / "model.safetensors"), strict=True)
        except RuntimeError as e:  # a model: override changed the architecture
            raise ValueError(f"the weights in {init} do not fit the configured model: {e}") from None
        accelerator.print(f"initialised from {init}")
    codec_name = mcfg.image_codec
    scheduler = scheduler_for(mcfg)
    collate = SampleBuilder(tokenizer, mcfg, seq_len=cfg.seq_len, truncate_long=False)
    if cfg.shapes_data:
        dataset = ShapesTrainSet(world, mix_caption=cfg.mix_caption, mix_interleaved=cfg.mix_interleaved,
                                 mix_understand=cfg.mix_understand, caption_dropout=mcfg.caption_dropout,
                                 seed=cfg.seed, mc_answer=cfg.mc_answer,
                                 understand_questions=cfg.understand_questions)
    else:  # files: bad records are skipped (counted by reason) or raise, per data_on_error
        dataset = build_sources(parse_data_spec(cfg.data), mcfg.image_size, 10_000_000, seed=cfg.seed,
                                caption_dropout=mcfg.caption_dropout, limit=SampleLimit.from_builder(collate),
                                on_error=cfg.data_on_error)

    # Sequential order: the data is already random per index, and resuming = skipping batches.
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=CountedCollate(collate),
                        num_workers=cfg.num_workers, drop_last=True)
    tuned = encoder if cfg.siglip_trainable else None
    optimizer = build_optimizer(model, cfg, tuned)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    hyper = [{k: g[k] for k in ("initial_lr", "betas", "weight_decay")} for g in optimizer.param_groups]
    # The LR schedule is not prepared: accelerate would step it once per process per step.
    # A fine-tuned encoder is trained inside the same module: one DDP reducer / DeepSpeed engine.
    trained = ModelWithEncoder(model, tuned, mcfg.image_size) if tuned is not None else model
    model, optimizer, loader = accelerator.prepare(trained, optimizer, loader)
    unwrapped: HybridModel = accelerator.unwrap_model(model)
    if tuned is not None:
        unwrapped = unwrapped.model
    # EMA of the model's weights (fp32 shadow); it and the LR schedule are checkpointed with the run
    ema = EMA(unwrapped, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    run_objects = {"lr_schedule": lr_sched, **({"ema": ema} if ema is not None and not ema.sharded else {})}
    shard_objects = {"ema": ema} if ema is not None and ema.sharded else None  # ZeRO-3: each rank its part
    # Diffusion timesteps and noise come from a generator reseeded from (seed, global batch
    # number) before every batch: a pure function of which data batch is trained on, so a resumed
    # run draws exactly what the uninterrupted run drew, and N processes x 1 batch draw what 1
    # process x N accumulated batches draws (accelerate gives process p batches p, p+N, ...).
    # (torch's global RNG is no good here: every new DataLoader iterator draws from it.)
    noise_gen = torch.Generator(accelerator.device)

    resumed_at, resumed = resume_state(accelerator, out, cfg.resume, "model_config", mcfg.to_dict(),
                                       cfg.math_dict(), cfg.allow_config_change, run_objects, shard_objects)
    step = resumed_at
    if step:  # the optimizer hyperparameters and LR schedule are the config's (they differ from the
        # checkpoint's only with allow_config_change): the same formula as LambdaLR, so bitwise equal
        lr_sched.base_lrs = [h["initial_lr"] for h in hyper]
        for g, h, f in zip(optimizer.param_groups, hyper, lr_sched.lr_lambdas):
            g.update(h, lr=h["initial_lr"] * f(lr_sched.last_epoch))
        lr_sched._last_lr = [g["lr"] for g in optimizer.param_groups]

    # bad records skipped in the batches trained on so far: this process's since the start of this
    # invocation, plus the whole run's up to the checkpoint it resumed from
    consumed_skips = torch.zeros(len(REASONS), dtype=torch.long, device=accelerator.device)
    resumed_skips = resumed.get("skipped_items", {})
    # tokens (non-padding, text and image) trained on: this process's in this invocation, plus the
    # run's up to the checkpoint (None if it predates the count)
    tokens_here = 0
    resumed_tokens = resumed.get("tokens_trained") if resumed_at else 0

    def tokens_trained() -> int | None:  # collective
        here = accelerator.reduce(torch.tensor(tokens_here, device=accelerator.device), "sum").item()
        return None if resumed_tokens is None else int(here) + resumed_tokens

    def skipped_items() -> dict[str, int]:  # collective: every process calls it
        """Bad records skipped so far in the run (all processes), by reason."""
        total = accelerator.reduce(consumed_skips.clone(), "sum").cpu().tolist()
        return {r: int(n) + resumed_skips.get(r, 0) for r, n in zip(REASONS, total) if n or resumed_skips.get(r)}
    accelerator.init_trackers("hybrid", config={k: v for k, v in cfg.to_dict().items() if not isinstance(v, (dict, list))})

    log_file = (out / "log.jsonl").open("a") if main else None
    prompts = sample_prompts(world, cfg.num_samples, cfg.heldout_eval)
    if main:
        head = f"scheduler={mcfg.scheduler}" if mcfg.image_head == "diffusion" else f"{mcfg.codebook_size} codes"
        # under ZeRO-3 a parameter is a placeholder here; ds_numel is its full size
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters())
        accelerator.print(f"model: {n_params / 1e6:.2f}M parameters, "
                          f"{mcfg.image_tokens} tokens per image, {mcfg.image_head} head ({head}), "
                          f"codec={mcfg.image_codec}")

    def checkpoint(at: int) -> None:  # collective
        save_run(accelerator, out, at, "model_config", mcfg.to_dict(), cfg.keep_checkpoints,
                 {"train_config": cfg.math_dict(), "skipped_items": skipped_items(), "tokens_trained": tokens_trained()},
                 run_objects, shard_objects)

    # what reads an input image for the multiple-choice scores: the encoder, or for "tokens" the VQ codes
    und_reader = (lambda px: codec.encode_codes(px).flatten(1)) if tokens_mode else encoder

    def sample(at: int) -> None:  # on every process (ZeRO-3 gathers parameters collectively); main writes
        unwrapped.eval()
        if encoder is not None:
            encoder.eval()
        ids = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in prompts]
        g = torch.Generator(accelerator.device).manual_seed(cfg.seed)
        pixels = generate_images(unwrapped, ids, scheduler_for(mcfg), codec, cfg.sample_steps,
                                 cfg.guidance_scale, generator=g, attn_impl=mcfg.attn_impl,
                                 temperature=cfg.temperature, top_k=cfg.top_k)
        path = out / "samples" / f"step_{at:07d}.png"
        if main:
            save_sample_grid(pixels, [f"[{r['split']}] {r['prompt']}" for r in prompts], path)
        scores = score_samples(pixels, prompts)
        if encoder is not None or tokens_mode:  # does the model read its input image? (train.probes)
            for split in ("train", "heldout"):
                r = image_reliance(unwrapped, und_reader, codec, collate, world, split, cfg.reliance_n)
                scores.update({f"reliance_{k}_{split}": v for k, v in r.items()})
        if cfg.mix_understand > 0:
            for split in ("train", "heldout"):
                acc = answer_accuracy(unwrapped, und_reader, collate, world, split, cfg.und_eval, style=cfg.mc_answer)
                scores[f"answer_accuracy_{split}"] = acc.pop("all")
                scores.update({f"answer_accuracy_{split}/{k}": v for k, v in acc.items()})
        if main:
            accelerator.log(scores, step=at)
            log_file.write(json.dumps({"step": at, **scores}) + "\n")
            log_file.flush()
            accelerator.print(f"step {at}: samples in {path}; " + ", ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        unwrapped.train()
        if encoder is not None:
            encoder.train()  # a frozen encoder stays in eval mode (SiglipEncoder.train)

    model.train()
    if encoder is not None:
        encoder.train()
    batches = accelerator.skip_first_batches(loader, step * cfg.grad_accum) if step else loader
    bar = tqdm(total=cfg.steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    # total, text, image (and the MoE balance and router z-loss) summed over this step's micro-batches
    step_losses = torch.zeros(5, device=accelerator.device)
    micro = step * cfg.grad_accum  # batches consumed so far on this process
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    bad_run = 0  # consecutive skipped (non-finite) steps
    grad_norm = None
    for batch, skips in batches:
        if step >= end:
            break
        consumed_skips += skips
        noise_gen.manual_seed(cfg.seed * 1_000_003**2 + micro * accelerator.num_processes + accelerator.process_index)
        with accelerator.accumulate(model):
            und = None
            if batch.und_images.shape[0] and encoder is None and not tokens_mode:
                raise ValueError("the data has understanding images (vqa records, or images with role "
                                 "'und') but no SigLIP encoder: set siglip_path")
            if batch.und_images.shape[0] and tuned is not None:
                und = batch.und_images  # encoded inside the trained module (ModelWithEncoder)
            elif batch.und_images.shape[0] and not tokens_mode:  # ("tokens": hybrid_loss reads the codes)
                with torch.no_grad():
                    und = encoder(batch.und_images)  # (n_und, M, F)
            elif encoder is not None and tuned is None:  # the aligner runs on nothing (hybrid_loss)
                und = torch.zeros(0, mcfg.und_tokens, mcfg.und_feature_dim, device=accelerator.device)
            loss = hybrid_loss(model, batch, scheduler, codec, mcfg.patch_size, mcfg.image_loss_weight,
                               mcfg.attn_impl, und_features=und, generator=noise_gen, image_head=mcfg.image_head,
                               moe_aux_weight=mcfg.moe_aux_weight, moe_z_weight=mcfg.moe_z_weight,
                               z_loss_weight=mcfg.z_loss_weight)
            if step + 1 in cfg.fault_nan_steps:  # debug fault injection (see TrainConfig)
                loss.total = loss.total * float("nan")
            accelerator.backward(loss.total)
            moe = [loss.moe_balance, loss.moe_z] if loss.moe_balance is not None else [loss.total * 0] * 2
            step_losses += torch.stack([loss.total, loss.text, loss.image, *moe]).detach().float()
            skipped = None
            if accelerator.sync_gradients:
                # The norm over all processes' gradients (an infinite max_norm clips nothing).
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                norm = torch.as_tensor(0.0 if grad_norm is None else float(grad_norm), device=accelerator.device)
                # non-finite loss / gradient norm, on any process: every process takes the same decision
                flags = torch.stack([~torch.isfinite(step_losses).all(), ~torch.isfinite(norm)]).float()
                loss_bad, grad_bad = accelerator.reduce(flags, "sum").tolist()
                if accelerator.mixed_precision == "fp16":  # overflowing gradients are the loss scaler's
                    grad_bad = 0  # business (it skips the update and lowers its scale), not a fault
                skipped = "non-finite loss" if loss_bad else "non-finite grad_norm" if grad_bad else None
                if ds_plugin is not None and skipped and not optimizer.step_was_skipped:
                    # DeepSpeed's engine stepped inside backward, before this check could run. It
                    # skips a step whose gradient norm is not finite itself (DeepSpeed >= 0.17, any
                    # precision); had it applied one, the weights are no longer trustworthy.
                    raise NonFiniteError(f"step {step + 1}: {skipped}, but DeepSpeed applied the update; the last "
                                         f"good checkpoint is {latest_checkpoint(out)}")
                if skipped is None:
                    optimizer.step()
                    if ema is not None:
                        ema.update(unwrapped)
                elif accelerator.scaler is not None:
                    accelerator.scaler.update()  # closes the unscale_ of clip_grad_norm_; lowers the scale
                lr_sched.step()  # a skipped step still advances the schedule: LR stays f(step)
            optimizer.zero_grad(set_to_none=True)
        tokens_since += batch.num_tokens * accelerator.num_processes
        tokens_here += batch.num_tokens
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        bad_run = bad_run + 1 if skipped else 0
        # the logged losses are the step's: mean over micro-batches and processes (the same
        # number for any split of the global batch into processes x accumulation)
        logged, step_losses = step_losses / cfg.grad_accum, torch.zeros_like(step_losses)
        if skipped:  # always logged
            total = accelerator.reduce(logged, "mean").tolist()[0]
            rec = {"step": step, "skipped": skipped, "loss": total if math.isfinite(total) else None,
                   "grad_norm": float(norm) if math.isfinite(float(norm)) else None, "bad_steps_in_a_row": bad_run}
            if main:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            accelerator.print(f"step {step}: skipped ({skipped}), {bad_run} in a row")
            if bad_run >= cfg.max_bad_steps:
                last = latest_checkpoint(out)
                if log_file:
                    log_file.close()
                accelerator.end_training()
                raise NonFiniteError(
                    f"stopping at step {step}: {bad_run} consecutive steps with a non-finite loss or gradient "
                    f"norm (max_bad_steps={cfg.max_bad_steps}); no checkpoint was written for them. The last good "
                    f"checkpoint is {last or '(none: the run starts over)'}; rerunning resumes from it (lower lr, "
                    f"check the data, or raise max_bad_steps)")
        elif step % cfg.log_every == 0 or step == cfg.steps:
            total, text, image, balance, router_z = accelerator.reduce(logged, "mean").tolist()
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": total,
                "text_loss": text,
                "image_loss": image,
                "lr": lr_sched.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_since / (now - t_last),
            }
            if mcfg.moe_experts:  # 1.0 = perfectly balanced experts (hybrid/moe.py)
                rec.update(moe_balance=balance, moe_router_z=router_z)
            if not cfg.shapes_data:
                rec["skipped_items"] = skipped_items()
            t_last, tokens_since = now, 0
            accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
            if main:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{rec['loss']:.3f}", text=f"{rec['text_loss']:.3f}",
                                image=f"{rec['image_loss']:.4f}", lr=f"{rec['lr']:.1e}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)
        if step % cfg.save_every == 0 and step < end and not bad_run:  # never in a bad streak
            checkpoint(step)
        if step % cfg.sample_every == 0 and step < end:
            sample(step)
    bar.close()

    if step > resumed_at:  # a rerun of a finished (or stop_at) invocation must not rewrite its
        checkpoint(step)  # complete checkpoint: a kill midway would leave a marker on half-written files
    if not cfg.shapes_data:
        counts = skipped_items()
        accelerator.print(f"data: skipped {sum(counts.values())} items" +
                          (": " + ", ".join(f"{k}={v}" for k, v in counts.items()) if counts else ""))
    if step < cfg.steps:
        accelerator.print(f"stopped at step {step} of {cfg.steps}; rerun the same command to resume")
        if log_file:
            log_file.close()
        accelerator.end_training()
        return out / "checkpoints" / f"step_{step:07d}"
    sample(step)
    final = out / "final"
    # The full weights, gathered on the main process under ZeRO-3 (collective: every process
    # calls it; needs zero3_save_16bit_model), the unwrapped model's own state dict otherwise.
    weights = accelerator.get_state_dict(model)
    tuned_weights = None
    if tuned is not None and main:  # ModelWithEncoder's names: model.* and encoder.*
        tuned_weights = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
        weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    if ema is not None:  # collective too when sharded (ZeRO-3): one parameter gathered at a time
        ema_weights = ema.full_weights(unwrapped, accelerator.gather, accelerator.device, keep=main)
    if main:
        exported = HybridModel(mcfg)
        exported.load_state_dict(weights)  # copies into fp32 parameters
        exported_encoder = encoder
        if tuned_weights is not None:  # the fine-tuned encoder from the gathered weights (under
            # ZeRO-3 the live one holds only this rank's partitions)
            exported_encoder = SiglipEncoder.from_pretrained(siglip_path, trainable=True)
            exported_encoder.load_state_dict(tuned_weights)
        # the pipeline's layout: model + tokenizer + scheduler + vq/ + siglip/ (the fine-tuned
        # encoder if siglip_trainable), self-contained for HybridPipeline.from_pretrained
        HybridPipeline(exported, tokenizer, scheduler, codec if codec_name == "vq" else None, exported_encoder
                       ).save_pretrained(final)
        if ema is not None:  # the same layout with the EMA weights
            with torch.no_grad():  # by parameter (not state-dict key): a tied weight takes its EMA, once
                for name, p in exported.named_parameters():
                    if name in ema_weights:
                        p.copy_(ema_weights[name])
            HybridPipeline(exported, tokenizer, scheduler, codec if codec_name == "vq" else None, exported_encoder
                           ).save_pretrained(out / "final_ema")
        log_file.close()
    accelerator.wait_for_everyone()
    if cfg.val_batches:  # last: val.json marks a run that finished, exported and was evaluated
        # process p scores batches p, p + P, ...; every process runs the same number of forwards
        # (ZeRO-3 gathers parameters collectively), the surplus ones are not counted
        P, p = accelerator.num_processes, accelerator.process_index
        vset = validation_set(cfg, mcfg, collate)
        unwrapped.eval()
        if encoder is not None:
            encoder.eval()
        counted = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        with accelerator.autocast():
            for i in range(p, -(-cfg.val_batches // P) * P, P):
                sums = validation_sums(unwrapped, [(i, val_batch(vset, collate, i, cfg.batch_size))], scheduler,
                                       codec, encoder, tuned is not None)
                if i < cfg.val_batches:
                    counted += sums
        text_sum, text_tokens, image_sum, image_tokens = accelerator.reduce(counted, "sum").tolist()
        trained = tokens_trained()
        if main:
            total, non_embedding = count_parameters(exported)
            text, image = text_sum / max(text_tokens, 1), image_sum / max(image_tokens, 1)
            # the objective as trained: one cross-entropy over text and codes for "tokens", else text + lambda x image
            loss = ((text_sum + image_sum) / max(text_tokens + image_tokens, 1) if mcfg.image_head == "tokens"
                    else text + mcfg.image_loss_weight * image)
            record = {"text_loss": text, "image_loss": image, "loss": loss,
                      "text_tokens": int(text_tokens), "image_tokens": int(image_tokens),
                      "val_batches": cfg.val_batches, "batch_size": cfg.batch_size, "params": total,
                      "non_embedding_params": non_embedding, "tokens_trained": trained, "steps": step,
                      "seed": cfg.seed, "data": cfg.data, "val_data": cfg.val_data, "weights": "final"}
            (out / "val.json").write_text(json.dumps(record, indent=2) + "\n")
            accelerator.log({"val/text_loss": text, "val/image_loss": image}, step=step)
            accelerator.print(f"validation ({cfg.val_batches} batches): text {text:.4f}, image {image:.4f}; "
                              f"{non_embedding / 1e6:.3f}M non-embedding parameters, {trained} tokens trained "
                              f"-> {out / 'val.json'}")
    accelerator.end_training()
    return final
