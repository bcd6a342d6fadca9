"""Run a hybrid checkpoint through the evaluation toolkits: VLMEvalKit and lmms-eval.

Both adapters load a ``HybridPipeline`` folder (``save_pretrained`` / a training run's ``final/``)
and answer with the pipeline's own prompt tokenization and KV-cached decoding, so what a toolkit
scores is exactly what ``pipe.generate_text`` writes. Neither toolkit is a dependency: each base
class is imported when installed, otherwise a stand-in with the same contract is defined, so this
module always imports (and is tested against the contract).

VLMEvalKit (https://github.com/open-compass/VLMEvalKit; ``pip install ms-vlmeval`` is a packaged
copy that also ships ``vlmeval/run.py``) -- ``HybridVLM``, a ``vlmeval.vlm.base.BaseModel``::

    # from a VLMEvalKit checkout: register the model in vlmeval/config.py ...
    from functools import partial
    from eval.adapters import HybridVLM
    supported_VLM['hybrid'] = partial(HybridVLM, model_path='runs/tiny_und/final', dtype='bf16')
    # ... then, from the checkout (1 GPU; `torchrun --nproc-per-node=N run.py ...` for N):
    python run.py --data MMBench_DEV_EN --model hybrid --mode all
    # or, without editing VLMEvalKit (registers in-process, then runs its run.py):
    python -m eval.adapters vlmevalkit --model-path runs/tiny_und/final --dtype bf16 \\
        --run-py /path/to/VLMEvalKit/run.py -- --data MMBench_DEV_EN --model hybrid
    # (with ms-vlmeval, whose package holds run.py, --run-py can be left out)

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, ``pip install lmms-eval``) --
``HybridLMM``, an ``lmms_eval.api.model.lmms`` registered as ``"hybrid"``::

    python -m eval.adapters lmms-eval --model hybrid \\
        --model_args pretrained=runs/tiny_und/final,dtype=bf16 \\
        --tasks mmbench_en_dev --batch_size 8 --output_path out/lmms
    # (multiple-choice tasks, scored by log-likelihood: add nll=True to --model_args; HybridLMM doc)
    # in Python: import eval.adapters, then lmms_eval.evaluator.simple_evaluate(model="hybrid",
    # model_args="pretrained=...", tasks=["mmbench_en_dev"]), or pass model=HybridLMM(...) itself

(lmms-eval >= 0.5 resolves ``--model`` through its manifest registry, which a plain ``lmms-eval``
command fills from built-ins and the ``lmms_eval.models`` entry-point group only; importing this
module adds ``hybrid`` to it, and ``python -m eval.adapters lmms-eval ...`` is the ``lmms-eval``
command with that import done first.)

Prompts: the toolkits' prompts are used as given (text only, no chat template: the hybrid model
has none); input images go through the understanding path (``ImageSegment(image, "und")``).
``HybridVLM(mcq_prompt=True)`` instead builds multiple-choice prompts in the format the project
trains on (train.shapes.QuestionExample.format: question, "X. option" lines, "Answer:").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from hybrid.pipeline import DTYPES as PIPELINE_DTYPES, HybridPipeline
from hybrid.sequence import IGNORE, ImageSegment, TokenizedSample, bidirectional_kinds, pack

MODULE = "eval.adapters"  # the import path the toolkits' registries point at
DTYPES = {"auto": None, **PIPELINE_DTYPES}


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_pipeline(model_path: str, device: str | None = None, dtype: str | torch.dtype | None = None) -> HybridPipeline:
    """``HybridPipeline.from_pretrained`` with toolkit-style arguments: ``dtype`` may be a name
    ("bf16", "float32", "auto" = as saved); ``device`` None = this process's GPU, else the CPU."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    return HybridPipeline.from_pretrained(model_path, device=device or default_device(), dtype=dtype)


# ================================================================ scoring (log-likelihoods)

def _split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context belongs to the continuation (lm-eval's ``_encode_pair``):
    "Answer: " + "A" is scored as "Answer:" + " A"."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def context_row(pipe: HybridPipeline, context: str, images: Sequence = ()) -> TokenizedSample:
    """The prompt exactly as ``generate_text`` builds it: ``<bos> [input images] context``.
    An empty context without images is ``<bos>`` alone (unconditional scoring)."""
    if not context and not images:
        return TokenizedSample([pipe.config.bos_id], [IGNORE], [], [])
    return pipe.prompt_row(context, list(images))


@torch.no_grad()
def continuation_logprobs(pipe: HybridPipeline, items: Sequence[tuple[str, str, Sequence]],
                          batch_size: int = 1) -> list[tuple[float, bool]]:
    """For each ``(context, continuation, images)``: the summed log-probability of the
    continuation's tokens after ``<bos> [images] context`` and whether greedy decoding (as
    ``generate_text`` does it: ids it never writes, such as ``<pad>`` or ``<boi>``, excluded)
    would write exactly those tokens. Context and continuation are tokenized separately (two
    segments, as the model trains on a question and its answer). One uncached forward per batch
    of ``batch_size`` requests (right-padded), text logits at the continuation positions only."""
    c = pipe.config
    pipe.check()
    banned = pipe.non_text_ids() + [c.boi_id]
    rows, spans = [], []
    for context, continuation, images in items:
        context, continuation = _split_whitespace(context, continuation)
        row = context_row(pipe, context, images)
        cont = pipe.tokenizer.encode(continuation, add_special_tokens=False)
        if not cont:
            raise ValueError(f"empty continuation {continuation!r}: nothing to score")
        full = TokenizedSample(row.input_ids + cont, [IGNORE] * (len(row) + len(cont)), row.spans, row.images)
        if len(full) > c.max_seq_len:
            raise ValueError(f"context + continuation are {len(full)} tokens, more than the model's context "
                             f"of {c.max_seq_len} (max_seq_len)")
        rows.append(full)
        spans.append((len(row), cont))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
    device = pipe.device
    for k in range(0, len(order), max(1, batch_size)):
        chunk = order[k:k + max(1, batch_size)]
        T = max(len(rows[i]) for i in chunk)
        batch = pack([rows[i] for i in chunk], T, c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
        batch = batch.to(device)
        extra = {}
        if batch.und_index.numel():
            extra = dict(und_features=pipe.siglip(batch.und_images), und_index=batch.und_index)
        # position p predicts token p + 1: the continuation [s, s + n) is predicted from [s - 1, s + n - 1)
        index = torch.cat([b * T + torch.arange(spans[i][0] - 1, spans[i][0] - 1 + len(spans[i][1]))
                           for b, i in enumerate(chunk)]).to(device)
        logits = pipe.model(batch.input_ids, batch.position_ids, batch.attention_mask(), logits_index=index,
                            **extra).logits.float()  # (K, V)
        target = torch.tensor([t for i in chunk for t in spans[i][1]], device=device)
        logp = logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]
        logits[:, banned] = float("-inf")
        greedy = logits.argmax(-1) == target
        start = 0
        for i in chunk:
            n = len(spans[i][1])
            results[i] = (float(logp[start:start + n].sum()), bool(greedy[start:start + n].all()))
            start += n
    return results  # type: ignore[return-value]


# ================================================================ VLMEvalKit

try:  # the real base class, when VLMEvalKit is installed (its package imports much; any failure = absent)
    from vlmeval.vlm.base import BaseModel as _VLMBase
    VLMEVAL_ERROR: str | None = None
except Exception as e:  # noqa: BLE001
    VLMEVAL_ERROR = f"{type(e).__name__}: {e}"

    class _VLMBase:
        """Stand-in for ``vlmeval.vlm.base.BaseModel`` (the contract its inference loop relies on:
        ``set_dump_image``, ``use_custom_prompt``, ``build_prompt``, ``generate`` ->
        ``generate_inner(message, dataset)``, messages as lists of {'type', 'value'} dicts)."""

        INTERLEAVE = False
        allowed_types = ["text", "image"]

        def __init__(self):
            self.dump_image_func = None

        def use_custom_prompt(self, dataset):
            return False

        def build_prompt(self, line, dataset):
            raise NotImplementedError

        def set_dump_image(self, dump_image_func):
            self.dump_image_func = dump_image_func

        def dump_image(self, line, dataset):
            return self.dump_image_func(line)

        def generate_inner(self, message, dataset=None):
            raise NotImplementedError

        def preproc_content(self, inputs):
            if isinstance(inputs, str):
                return [dict(type="text", value=inputs)]
            if isinstance(inputs, dict):
                return [inputs]
            if isinstance(inputs, list) and all(isinstance(m, dict) and "type" in m and "value" in m for m in inputs):
                return inputs
            return None

        def generate(self, message, dataset=None):
            message = self.preproc_content(message)
            assert message is not None, f"invalid input: {message}"
            for item in message:
                assert item["type"] in self.allowed_types, f"Invalid input type: {item['type']}"
            return self.generate_inner(message, dataset)


def _present(v: Any) -> bool:
    """A cell that holds something (pandas' NaN, None and "" do not)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""


def message_to_segments(message: Sequence[dict]) -> list:
    """A VLMEvalKit message (``[{'type': 'image' | 'text', 'value': ...}, ...]``) -> the pipeline's
    segment list, in order: each image an input image, adjacent texts joined with newlines (as
    VLMEvalKit's ``message_to_promptimg`` joins them)."""
    segs: list = []
    texts: list[str] = []
    for item in message:
        kind, value = item["type"], item["value"]
        if kind == "text":
            if value:
                texts.append(str(value))
        elif kind == "image":
            if texts:
                segs.append("\n".join(texts))
                texts = []
            segs.append(ImageSegment(value, "und"))  # a path (what VLMEvalKit passes) or a PIL image
        else:
            raise ValueError(f"the hybrid model reads text and images, not {kind!r}")
    if texts:
        segs.append("\n".join(texts))
    if not segs:
        raise ValueError("empty message")
    return segs


class HybridVLM(_VLMBase):
    """VLMEvalKit model: ``generate_inner(message, dataset)`` -> greedy text.

    ``model_path``: a pipeline folder; ``device``: default this process's GPU (VLMEvalKit's
    torchrun sets one per rank), else the CPU; ``dtype``: "bf16", "fp32", ... or "auto" (as saved);
    ``max_new_tokens``; ``stop``: strings that end an answer; ``mcq_prompt``: for multiple-choice
    datasets (MMBench, ...), build the prompt in the project's training format instead of the
    dataset's own (see the module doc). Registration and the run command: module doc."""

    INSTALL_REQ = False
    INTERLEAVE = True
    allowed_types = ["text", "image"]

    def __init__(self, model_path: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                 max_new_tokens: int = 128, stop: Sequence[str] = (), mcq_prompt: bool = False, **kwargs):
        super().__init__()
        if kwargs:  # VLMEvalKit passes use_vllm only to models with certain names; anything else is a typo
            raise TypeError(f"HybridVLM got unexpected arguments: {sorted(kwargs)}")
        self.model_path = model_path
        self.pipe = load_pipeline(model_path, device, dtype)
        self.max_new_tokens = int(max_new_tokens)
        self.stop = [stop] if isinstance(stop, str) else list(stop)
        self.mcq_prompt = bool(mcq_prompt)

    def generate_inner(self, message, dataset=None) -> str:
        segs = message_to_segments(message)
        out = self.pipe.generate_text([segs], max_new_tokens=self.max_new_tokens, temperature=0.0, stop=self.stop)
        return out.texts[0]

    # -- optional: multiple-choice prompts in the training format
    def use_custom_prompt(self, dataset) -> bool:
        if not self.mcq_prompt or dataset is None:
            return False
        try:
            from vlmeval.dataset import DATASET_TYPE
            return DATASET_TYPE(dataset) == "MCQ"
        except ImportError:  # no VLMEvalKit: the MCQ benchmarks by name
            return any(k in dataset for k in ("MMBench", "MMStar", "SEEDBench", "AI2D", "ScienceQA", "MMMU"))

    def build_prompt(self, line, dataset=None) -> list[dict]:
        """[images..., text] with text = [Hint: ...] question, one "X. option" line per option, "Answer:"."""
        paths = self.dump_image(line, dataset)
        paths = [paths] if isinstance(paths, str) else list(paths)
        lines = [f"Hint: {line['hint']}"] if "hint" in line and _present(line["hint"]) else []
        lines.append(str(line["question"]))
        lines += [f"{k}. {line[k]}" for k in "ABCDEFGHIJ" if k in line and _present(line[k])]
        lines.append("Answer:")
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value="\n".join(lines))]


# ================================================================ lmms-eval

try:
    from lmms_eval.api.model import lmms as _LMMBase
    from lmms_eval.api.registry import register_model as _register_model
    LMMS_EVAL_ERROR: str | None = None
except Exception as e:  # noqa: BLE001
    LMMS_EVAL_ERROR = f"{type(e).__name__}: {e}"

    def _parse_arg(v: str):
        """lmms_eval.utils.handle_arg_string."""
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        if v.isnumeric():
            return int(v)
        try:
            return float(v)
        except ValueError:
            return v

    class _CacheHook:
        def add_partial(self, attr, req, res) -> None: ...

    class _LMMBase:
        """Stand-in for ``lmms_eval.api.model.lmms``: the evaluator fills ``task_dict``
        (task -> split -> docs), builds the model with ``create_from_arg_string`` and calls
        ``loglikelihood`` / ``generate_until`` / ``generate_until_multi_round`` on lists of requests."""

        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.cache_hook = _CacheHook()
            self.task_dict: dict = {}

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = {k: _parse_arg(v) for k, v in (a.split("=", 1) for a in arg_string.split(",") if a.strip())}
            more = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **more)

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

        def set_cache_hook(self, cache_hook) -> None:
            self.cache_hook = cache_hook

        def clean(self) -> None: ...

    def _register_model(*names):
        return lambda cls: cls


def _flatten_visuals(visuals) -> list:
    """doc_to_visual's result -> a flat list of images (PIL or paths); None = no image."""
    if visuals is None:
        return []
    if isinstance(visuals, (Image.Image, str)):
        return [visuals]
    out = []
    for v in visuals:
        if isinstance(v, (list, tuple)):
            out += _flatten_visuals(v)
        elif isinstance(v, (Image.Image, str)):
            out.append(v)
        elif v is not None:
            raise ValueError(f"the hybrid model reads images only, got a {type(v).__name__} visual (audio / video?)")
    return out


@_register_model("hybrid")
class HybridLMM(_LMMBase):
    """lmms-eval model ``hybrid``: ``--model_args pretrained=DIR[,device=cuda][,dtype=bf16]
    [,max_new_tokens=N][,seed=S]``; ``--batch_size N`` batches generation (left-padded, KV-cached)
    and scoring (one forward per batch).

    ``generate_until``: request args ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``;
    the images are ``doc_to_visual(self.task_dict[task][split][doc_id])``, before the context.
    gen_kwargs read: ``until`` (str or list: stop strings, cut from the answer), ``max_new_tokens``,
    ``temperature``, ``do_sample`` (greedy unless do_sample and temperature > 0; then ``top_p`` /
    ``top_k``, seeded with seed + doc_id), ``num_beams`` (1 only). ``loglikelihood``: args
    ``(context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)`` or
    ``(context, continuation)``; returns ``(sum of log-probs, is_greedy)`` as the ``lmms`` base class
    documents it (see ``continuation_logprobs``). lmms-eval's ``multiple_choice`` scoring, however,
    takes the argmin of that number (most of its models return a loss: lmms-eval issue #370), so
    for multiple-choice tasks pass ``nll=True``, which returns the negated sum."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = "auto",
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_new_tokens: int = 256,
                 seed: int = 0, nll: bool = False) -> None:
        super().__init__()
        self.pretrained = pretrained
        self.pipe = load_pipeline(pretrained, device, dtype)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1  # "auto": 1
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.nll = bool(nll)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    # -- generation
    def _sampling(self, gen_kwargs: dict) -> dict:
        if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
            raise ValueError(f"num_beams={gen_kwargs['num_beams']}: the hybrid pipeline has no beam search")
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        if not do_sample or temperature <= 0:
            return dict(temperature=0.0, top_p=None, top_k=None)
        top_p = gen_kwargs.get("top_p")
        top_k = gen_kwargs.get("top_k")
        return dict(temperature=temperature, top_p=None if top_p is None or float(top_p) >= 1 else float(top_p),
                    top_k=None if top_k is None or int(top_k) <= 0 else int(top_k))

    def generate_until(self, requests) -> list[str]:
        parsed = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until")
            until = [] if until is None else [until] if isinstance(until, str) else list(until)
            if not all(isinstance(u, str) for u in until):
                raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
            settings = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                            stop=tuple(until), **self._sampling(gen_kwargs))
            visuals = _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual else []
            seed = self.seed + (doc_id if isinstance(doc_id, int) else 0)
            parsed.append((context, visuals, settings, seed, gen_kwargs))
        out: list[str | None] = [None] * len(parsed)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(parsed):  # one batch shares its settings
            groups.setdefault(tuple(sorted(p[2].items())), []).append(i)
        for key, idx in groups.items():
            settings = dict(key)
            idx.sort(key=lambda i: -len(parsed[i][0]))
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                gen = self.pipe.generate_text([parsed[i][0] for i in chunk], images=[parsed[i][1] for i in chunk],
                                              seed=[parsed[i][3] for i in chunk] if settings["temperature"] else None,
                                              **settings)
                for i, text in zip(chunk, gen.texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", (parsed[i][0], parsed[i][4]), text)
        return out  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("HybridLMM does not support multi-round tasks (generate_until_multi_round); "
                                  "run single-round tasks such as mmbench_en_dev")

    # -- scoring
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            args = req.args
            if len(args) == 2:  # (context, continuation): e.g. the unconditional half of acc_mutual_info
                context, continuation, visuals = args[0], args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = args[:6]
                doc = None
                if not isinstance(target, str) or doc_to_visual is not None:
                    doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                if isinstance(continuation, list):  # doc_to_target may give a list; score the first
                    continuation = continuation[0]
                visuals = _flatten_visuals(doc_to_visual(doc)) if doc_to_visual is not None else []
            items.append((context, str(continuation), visuals))
        res = continuation_logprobs(self.pipe, items, self.batch_size)
        if self.nll:
            res = [(-lp, greedy) for lp, greedy in res]
        for (context, continuation, _), r in zip(items, res):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), r)
        return res


def register_lmms_eval(name: str = "hybrid") -> bool:
    """Make ``--model NAME`` resolve to ``HybridLMM`` in lmms-eval: the legacy registry (the
    decorator did that) and, in lmms-eval >= 0.5, the manifest registry the evaluator resolves
    names with. Returns False when lmms-eval is not installed."""
    if LMMS_EVAL_ERROR is not None:
        return False
    from lmms_eval.api.registry import MODEL_REGISTRY
    if MODEL_REGISTRY.get(name) is not HybridLMM:
        _register_model(name)(HybridLMM)
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError:  # an lmms-eval before the manifest registry
        return True
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=name, simple_class_path=f"{MODULE}.HybridLMM"),
                                        overwrite=True)
    return True


if LMMS_EVAL_ERROR is None and __name__ == MODULE:
    register_lmms_eval()


# ================================================================ launchers

def main(argv: Iterable[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("vlmevalkit", "lmms-eval"):
        print(__doc__)
        print("usage: python -m eval.adapters {vlmevalkit,lmms-eval} ...", file=sys.stderr)
        return 2
    tool, rest = argv[0], argv[1:]
    if tool == "lmms-eval":
        if not register_lmms_eval():
            print(f"lmms-eval is not importable ({LMMS_EVAL_ERROR}); pip install lmms-eval", file=sys.stderr)
            return 1
        sys.argv = ["lmms-eval", *rest]
        try:
            from lmms_eval.cli.dispatch import main as lmms_main
        except ImportError:
            from lmms_eval.__main__ import cli_evaluate as lmms_main
        lmms_main()
        return 0
    p = argparse.ArgumentParser(prog="python -m eval.adapters vlmevalkit",
                                description="Register HybridVLM in VLMEvalKit's supported_VLM, then run its run.py "
                                            "with the arguments after `--`.")
    p.add_argument("--model-path", required=True)
    p.add_argument("--name", default="hybrid", help="the model name to give run.py's --model")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mcq-prompt", action="store_true", help="multiple-choice prompts in the training format")
    p.add_argument("--run-py", default=None, help="VLMEvalKit's run.py (default: vlmeval.run, as ms-vlmeval ships)")
    split = rest.index("--") if "--" in rest else len(rest)
    args, run_args = p.parse_args(rest[:split]), rest[split + 1:]
    if VLMEVAL_ERROR is not None:
        print(f"VLMEvalKit is not importable ({VLMEVAL_ERROR})", file=sys.stderr)
        return 1
    from functools import partial

    from vlmeval.config import supported_VLM
    supported_VLM[args.name] = partial(HybridVLM, model_path=args.model_path, device=args.device, dtype=args.dtype,
                                       max_new_tokens=args.max_new_tokens, mcq_prompt=args.mcq_prompt)
    if "--model" not in run_args and "--config" not in run_args:
        run_args += ["--model", args.name]
    sys.argv = [args.run_py or "run.py", *run_args]
    if args.run_py:
        import runpy
        runpy.run_path(args.run_py, run_name="__main__")
    else:
        from vlmeval.run import main as run_main
        run_main()
    return 0


if __name__ == "__main__":
    from eval import adapters  # the importable copy, so registries and class paths agree

    sys.exit(adapters.main())
