"""eval.adapters: the VLMEvalKit model (HybridVLM) and the lmms-eval model (HybridLMM).

Outputs are compared with the pipeline itself (generate_text on the equivalent prompt) and the
log-likelihoods with a hand computation (one uncached forward, log-softmax gathered over the
continuation). Neither toolkit is needed: without them the adapters run on their stand-in base
classes; with them installed, the same tests run on the real ones (the interface test then checks
the real classes and registries too).

Interfaces as read from the toolkits' source:

* VLMEvalKit (open-compass/VLMEvalKit; also ms-vlmeval 0.0.20 as installed from PyPI):
  vlmeval/vlm/base.py ``BaseModel``: ``INTERLEAVE``, ``allowed_types``, ``__init__`` sets
  ``dump_image_func``, ``use_custom_prompt(dataset)``, ``build_prompt(line, dataset)``,
  ``set_dump_image(fn)``, ``dump_image(line, dataset)``, ``generate(message, dataset=None)`` ->
  ``generate_inner(message, dataset)``; vlmeval/inference.py ``infer_data``: the model is built as
  ``supported_VLM[model_name](**kwargs)`` (kwargs empty unless the name contains Llama-4 / Qwen2-VL /
  Qwen2.5-VL), then ``model.set_dump_image(dataset.dump_image)``, ``model.use_custom_prompt(
  dataset_name)``, ``model.build_prompt(line, dataset=dataset_name)`` or
  ``dataset.build_prompt(line)``, and ``model.generate(message=struct, dataset=dataset_name)``;
  vlmeval/dataset/image_mcq.py ``ImageMCQDataset.build_prompt``: ``[image dicts..., one text dict]``
  with "Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\nPlease select ...".
* lmms-eval (EvolvingLMMs-Lab/lmms-eval; 0.7.3 as installed from PyPI): lmms_eval/api/model.py
  ``lmms`` (abstract ``loglikelihood``, ``generate_until``, ``generate_until_multi_round``;
  ``create_from_arg_string(arg_string, additional_config)``; ``task_dict``; ``is_simple``);
  lmms_eval/api/task.py ``ConfigurableTask.construct_requests``: generate_until args
  ``(ctx, generation_kwargs, doc_to_visual, doc_id, task, split)``, loglikelihood args
  ``(ctx, doc_to_target, doc_to_visual, doc_id, task, split)``, multiple_choice
  ``(ctx, target_delimiter + choice, doc_to_visual, doc_id, task, split)`` and, for
  acc_mutual_info, ``("", choice)``; lmms_eval/evaluator.py ``simple_evaluate``:
  ``models.get_model(name).create_from_arg_string(model_args, {"batch_size", "max_batch_size",
  "device"})`` (batch_size arrives as the CLI's string), ``lm.task_dict[task] = task.dataset``,
  ``getattr(lm, reqtype)(requests)``; lmms_eval/api/instance.py ``Instance.args``;
  lmms_eval/api/registry.py ``register_model``; lmms_eval/models/__init__.py ``MODEL_REGISTRY_V2``.
"""

import functools
import inspect

import pytest
import torch
from test_pipeline import make_pipe, photo

from eval import adapters
from eval.adapters import HybridLMM, HybridVLM, message_to_segments
from hybrid.pipeline import HybridPipeline
from hybrid.sequence import ImageSegment, SpecialIds, TokenizedSample, bidirectional_kinds, pack, tokenize_sample

CTX = "Which one\nis red?"

try:  # the real request class when lmms-eval is installed, else one with the same .args
    from lmms_eval.api.instance import Instance as _RealInstance
except Exception:  # noqa: BLE001
    _RealInstance = None


class FakeInstance:
    """What lmms-eval's Instance exposes to a model: ``args`` (lmms_eval/api/instance.py), the
    tuple that task.py's construct_requests builds (layouts in the module doc)."""

    def __init__(self, request_type: str, args: tuple):
        self.request_type, self.arguments = request_type, args

    @property
    def args(self):
        return self.arguments


def request(request_type: str, args: tuple):
    if _RealInstance is not None:
        doc_id, task = (args[3], args[4]) if len(args) == 6 else (0, "none")
        return _RealInstance(request_type=request_type, arguments=args, idx=0,
                             metadata={"task": task, "doc_id": doc_id, "repeats": 1})
    return FakeInstance(request_type, args)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "pipe"
    make_pipe(tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref(model_dir):
    return HybridPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(3):
        photo(i).save(d / f"{i}.png")
        paths.append(str(d / f"{i}.png"))
    return paths


@pytest.fixture(scope="module")
def lmm(model_dir):
    lm = HybridLMM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=2, max_new_tokens=12)
    lm.task_dict = {"mmb": {"dev": [{"image": photo(i), "answer": " A"} for i in range(3)]}}
    return lm


def doc_to_visual(doc):
    return [doc["image"]]


# ---------------------------------------------------------------- (a) VLMEvalKit
def test_vlm_generate_inner_equals_generate_text_of_the_equivalent_prompt(model_dir, ref, images):
    vlm = HybridVLM(model_path=str(model_dir), device="cpu", max_new_tokens=12)
    a, b = images[:2]
    message = [dict(type="image", value=a), dict(type="image", value=b),
               dict(type="text", value="Which one"), dict(type="text", value="is red?")]
    want = ref.generate_text(CTX, images=[a, b], max_new_tokens=12)
    assert want.finish_reasons == ["length"] and want.texts[0]  # a real answer, not an empty one
    assert vlm.generate_inner(message, dataset="MMBench_DEV_EN") == want.texts[0]
    # the toolkit's entry point (BaseModel.generate -> generate_inner) gives the same
    assert vlm.generate(message=message, dataset="MMBench_DEV_EN") == want.texts[0]
    # the images are read: without them (or with one of them) the answer differs
    assert ref.generate_text(CTX, max_new_tokens=12).texts[0] != want.texts[0]
    assert ref.generate_text(CTX, images=[a], max_new_tokens=12).texts[0] != want.texts[0]


def test_vlm_interleaved_message_keeps_its_order(model_dir, ref, images):
    vlm = HybridVLM(model_path=str(model_dir), device="cpu", max_new_tokens=8, stop=["zz"])
    a, b = images[:2]
    message = [dict(type="text", value="Here is a picture."), dict(type="image", value=a),
               dict(type="text", value="And another"), dict(type="text", value="one below it."),
               dict(type="image", value=b)]
    segs = message_to_segments(message)
    assert [type(s).__name__ for s in segs] == ["str", "ImageSegment", "str", "ImageSegment"]
    assert segs[2] == "And another\none below it."
    want = ref.generate_text([["Here is a picture.", ImageSegment(a, "und"), "And another\none below it.",
                               ImageSegment(b, "und")]], max_new_tokens=8, stop=["zz"])
    assert vlm.generate_inner(message) == want.texts[0]
    with pytest.raises(ValueError, match="video"):
        message_to_segments([dict(type="video", value="x.mp4")])


# ---------------------------------------------------------------- (b) lmms-eval generation
def test_lmm_generate_until_honours_until_and_max_new_tokens(lmm, ref):
    img = lmm.task_dict["mmb"]["dev"][0]["image"]
    full = ref.generate_text(CTX, images=[img], max_new_tokens=12)
    text, ids = full.texts[0], full.token_ids[0]
    assert full.finish_reasons == ["length"] and " a" in text[1:]
    cut = text.index(" a")
    three = ref.tokenizer.decode(ids[:3], skip_special_tokens=True)
    reqs = [
        request("generate_until", (CTX, {"until": [" a"], "max_new_tokens": 12, "do_sample": False},
                                   doc_to_visual, 0, "mmb", "dev")),
        request("generate_until", (CTX, {"until": [], "max_new_tokens": 3, "temperature": 0}, doc_to_visual, 0, "mmb",
                                   "dev")),
        request("generate_until", (CTX, {"until": " a", "max_new_tokens": 12}, doc_to_visual, 0, "mmb", "dev")),
        request("generate_until", (CTX, {"until": ["never-there"], "max_new_tokens": 12}, doc_to_visual, 0, "mmb",
                                   "dev")),
        request("generate_until", ("two", {"until": ["never-there"], "max_new_tokens": 12}, doc_to_visual, 1, "mmb",
                                   "dev")),
    ]
    out = lmm.generate_until(reqs)
    assert out[0] == text[:cut] and out[2] == text[:cut]  # the stop string and what follows are cut
    assert out[1] == three != text  # the first 3 tokens only
    assert out[3] == text  # batched with the next (different lengths: left padding) and in order
    other = lmm.task_dict["mmb"]["dev"][1]["image"]
    assert out[4] == ref.generate_text("two", images=[other], max_new_tokens=12).texts[0]


def test_lmm_generate_until_sampling_is_seeded_per_document(lmm, ref):
    img = lmm.task_dict["mmb"]["dev"][2]["image"]
    kw = {"until": [], "max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    req = request("generate_until", (CTX, dict(kw), doc_to_visual, 2, "mmb", "dev"))
    want = ref.generate_text(CTX, images=[img], max_new_tokens=6, temperature=1.0, seed=[lmm.seed + 2]).texts[0]
    assert lmm.generate_until([req]) == [want]
    greedy = ref.generate_text(CTX, images=[img], max_new_tokens=6).texts[0]
    assert want != greedy  # sampling did happen
    # do_sample=False is greedy whatever the temperature
    req = request("generate_until", (CTX, dict(kw, do_sample=False), doc_to_visual, 2, "mmb", "dev"))
    assert lmm.generate_until([req]) == [greedy]
    with pytest.raises(ValueError, match="beam"):
        lmm.generate_until([request("generate_until", (CTX, {"num_beams": 4}, doc_to_visual, 2, "mmb", "dev"))])


# ---------------------------------------------------------------- (c) lmms-eval log-likelihoods
def hand_loglikelihood(pipe: HybridPipeline, context: str, continuation: str, image=None) -> tuple[float, list[int]]:
    """Sum of log p(continuation token | everything before) from one full forward, built from
    tokenize_sample directly: [<bos>] [image] context continuation."""
    c = pipe.config
    segs = ([ImageSegment(pipe.load_image(image), "und")] if image is not None else []) + ([context] if context else [])
    cont = pipe.tokenizer.encode(continuation, add_special_tokens=False)
    if segs:
        s = tokenize_sample(segs, pipe.tokenizer, SpecialIds.from_config(c), c.image_size, c.image_tokens, c.und_tokens)
        ids, spans, imgs = s.input_ids[:-1], s.spans, s.images
    else:
        ids, spans, imgs = [c.bos_id], [], []
    row = TokenizedSample(ids + cont, [-100] * (len(ids) + len(cont)), spans, imgs)
    batch = pack([row], len(row), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    extra = {}
    if batch.und_index.numel():
        extra = dict(und_features=pipe.siglip(batch.und_images), und_index=batch.und_index)
    with torch.no_grad():
        logits = pipe.model(batch.input_ids, batch.position_ids, batch.attention_mask(), **extra).logits[0].float()
    logp = logits.log_softmax(-1)
    n = len(ids)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont)), cont


def roundtrip_prefix(tok, ids: list[int]) -> list[int]:
    """The longest prefix of ids that decodes to text encoding back to exactly those ids."""
    best = []
    for k in range(1, len(ids) + 1):
        if tok.encode(tok.decode(ids[:k], skip_special_tokens=True), add_special_tokens=False) == ids[:k]:
            best = ids[:k]
    return best


def test_lmm_loglikelihood_equals_hand_computation_and_is_greedy(lmm, ref):
    docs = lmm.task_dict["mmb"]["dev"]
    ctx = "a photo of"
    greedy_ids = roundtrip_prefix(ref.tokenizer, ref.generate_text(ctx, images=[docs[0]["image"]], max_new_tokens=6,
                                                                   ignore_eos=True).token_ids[0])
    assert len(greedy_ids) >= 3
    greedy_text = ref.tokenizer.decode(greedy_ids, skip_special_tokens=True)
    # the same tokens with the last one swapped for the runner-up: not what greedy decoding writes
    lp, _ = hand_loglikelihood(ref, ctx, greedy_text, docs[0]["image"])
    other_text = ref.tokenizer.decode(greedy_ids[:-1] + [ref.tokenizer.encode(" a", add_special_tokens=False)[0]])
    reqs = [
        request("loglikelihood", (ctx, greedy_text, doc_to_visual, 0, "mmb", "dev")),  # multiple_choice layout
        request("loglikelihood", (ctx, other_text, doc_to_visual, 0, "mmb", "dev")),
        request("loglikelihood", (CTX, lambda doc: doc["answer"], doc_to_visual, 1, "mmb", "dev")),  # doc_to_target
        request("loglikelihood", ("", " a photo")),  # acc_mutual_info's unconditional request
        request("loglikelihood", (CTX + " ", "two", None, 2, "mmb", "dev")),  # trailing space moves over
    ]
    out = lmm.loglikelihood(reqs)
    assert all(isinstance(x, float) and isinstance(g, bool) for x, g in out)
    want = [lp, hand_loglikelihood(ref, ctx, other_text, docs[0]["image"])[0],
            hand_loglikelihood(ref, CTX, " A", docs[1]["image"])[0], hand_loglikelihood(ref, "", " a photo")[0],
            hand_loglikelihood(ref, CTX, " two")[0]]
    for (got, _), w in zip(out, want):
        assert got == pytest.approx(w, abs=1e-4)
        assert got < 0
    assert out[0][1] is True and out[1][1] is False
    # the image is part of the condition
    assert out[0][0] != pytest.approx(hand_loglikelihood(ref, ctx, greedy_text)[0], abs=1e-3)
    # batch size does not change the numbers; nll=True (for lmms-eval's argmin) negates them
    lmm.batch_size_per_gpu, lmm.nll = 1, True
    try:
        assert lmm.loglikelihood(reqs) == [(pytest.approx(-x, abs=1e-4), g) for x, g in out]
    finally:
        lmm.batch_size_per_gpu, lmm.nll = 2, False


# ---------------------------------------------------------------- (d) the interfaces the toolkits call
def test_vlmevalkit_interface(model_dir, ref, images):
    sig = inspect.signature(HybridVLM.generate_inner)
    assert list(sig.parameters) == ["self", "message", "dataset"] and sig.parameters["dataset"].default is None
    assert HybridVLM.INTERLEAVE is True and HybridVLM.INSTALL_REQ is False
    assert list(inspect.signature(HybridVLM.build_prompt).parameters)[:3] == ["self", "line", "dataset"]
    if adapters.VLMEVAL_ERROR is None:
        from vlmeval.vlm.base import BaseModel
        assert issubclass(HybridVLM, BaseModel)
    # as vlmeval/inference.py drives a model registered with functools.partial in supported_VLM
    supported = {"hybrid": functools.partial(HybridVLM, model_path=str(model_dir), device="cpu", max_new_tokens=6)}
    model = supported["hybrid"]()
    line = {"index": 0, "question": "What colour?", "hint": float("nan"), "A": "red", "B": "blue",
            "C": float("nan"), "answer": "A"}
    model.set_dump_image(lambda ln: [images[0]])
    assert model.use_custom_prompt("MMBench_DEV_EN") is False  # the dataset's own prompt by default
    struct = [dict(type="image", value=images[0]),
              dict(type="text", value="Question: What colour?\nOptions:\nA. red\nB. blue\n"
                                      "Please select the correct answer from the options above. \n")]
    want = ref.generate_text(struct[1]["value"], images=[images[0]], max_new_tokens=6).texts[0]
    assert model.generate(message=struct, dataset="MMBench_DEV_EN") == want
    # mcq_prompt: the training format (train.shapes.QuestionExample.format)
    mcq = functools.partial(supported["hybrid"], mcq_prompt=True)()
    mcq.set_dump_image(lambda ln: [images[0]])
    assert mcq.use_custom_prompt("MMBench_DEV_EN") is True
    assert mcq.build_prompt(line, dataset="MMBench_DEV_EN") == [
        dict(type="image", value=images[0]), dict(type="text", value="What colour?\nA. red\nB. blue\nAnswer:")]
    line["hint"] = "Look."
    assert mcq.build_prompt(line, dataset="MMBench_DEV_EN")[1]["value"].startswith("Hint: Look.\nWhat colour?\n")
    with pytest.raises(TypeError, match="unexpected"):
        HybridVLM(model_path=str(model_dir), device="cpu", max_new_token=6)


def test_lmms_eval_interface(model_dir):
    for name in ("loglikelihood", "generate_until", "generate_until_multi_round"):
        assert list(inspect.signature(getattr(HybridLMM, name)).parameters) == ["self", "requests"]
    assert not inspect.isabstract(HybridLMM) and HybridLMM.is_simple is True
    # as simple_evaluate builds it: model_args string + the CLI's batch_size (a string), None filtered out
    lm = HybridLMM.create_from_arg_string(f"pretrained={model_dir},dtype=float32,max_new_tokens=5,seed=3",
                                          {"batch_size": "4", "max_batch_size": None, "device": "cpu"})
    assert (lm.batch_size, lm.max_new_tokens, lm.seed, lm.rank, lm.world_size) == (4, 5, 3, 0, 1)
    assert lm.task_dict == {} and str(lm.device) == "cpu"
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.raises(TypeError):
        HybridLMM.create_from_arg_string(f"pretrained={model_dir},temprature=0", {"device": "cpu"})
    if adapters.LMMS_EVAL_ERROR is None:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import MODEL_REGISTRY
        from lmms_eval.models import get_model
        assert issubclass(HybridLMM, lmms) and MODEL_REGISTRY["hybrid"] is HybridLMM
        assert get_model("hybrid") is HybridLMM  # what simple_evaluate resolves --model with
