"""The training entry point: config handling, artifacts, exact resumption after a stop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from train.__main__ import main
from train.config import load_config

DEBUG = "train/configs/debug.yaml"


def test_config_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(DEBUG, ["steps=7", "lr=1e-4", "model.dim=32", "model.n_heads=2"])
    assert cfg.steps == 7 and cfg.lr == 1e-4 and cfg.model_config().dim == 32
    with pytest.raises(ValueError, match="unknown config keys: \\['stepz'\\]"):
        load_config(DEBUG, ["stepz=3"])
    with pytest.raises(ValueError, match="unknown model keys"):
        load_config(DEBUG, ["model.width=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(DEBUG, ["steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: debug\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="steps: expected int, got 'many'"):
        load_config(DEBUG, ["steps=many"])
    assert main([DEBUG, "steps=0"]) == 2  # invalid value: a clear error, exit code 2


def run(out, *extra):
    assert main([DEBUG, f"output_dir={out}", "steps=12", "save_every=4", "log_every=2", *extra]) == 0


def test_killed_run_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    run(resumed, "stop_at=6")  # as if the job were killed after its step-4 checkpoint... at step 6
    state = json.loads((resumed / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and not (resumed / "final").exists()
    with (resumed / "log.jsonl").open("a") as f:  # a record written after the checkpoint, then killed
        f.write(json.dumps({"step": 8, "loss": -1.0}) + "\n")
    run(resumed)  # same command again: resumes from step 6
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    log_a = [r for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines()) if "loss" in r]
    log_b = [r for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in log_b] == [2, 4, 6, 8, 10, 12]
    for ra, rb in zip(log_a, log_b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    # artifacts of a finished run
    assert (straight / "config.yaml").is_file()
    assert (straight / "final" / "config.json").is_file()
    assert (straight / "final" / "tokenizer" / "tokenizer.json").is_file()
    assert list((straight / "samples").glob("*.png"))
    assert list((straight / "tensorboard").rglob("events.out.tfevents*"))
    kept = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert kept == ["step_0000008", "step_0000012"]  # keep_checkpoints=2


def test_incomplete_checkpoint_is_ignored_and_a_changed_model_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "stop_at=4")
    with pytest.raises(ValueError, match="different model config \\(differs in \\['dim'"):
        run(out, "model.dim=32")
    # a save killed half-way: directory without trainer_state.json
    (out / "checkpoints" / "step_0000010").mkdir()
    from train.trainer import latest_checkpoint

    assert latest_checkpoint(out).name == "step_0000004"


@pytest.fixture(scope="module")
def visual_components(tmp_path_factory):
    """A tiny random VQ tokenizer and SigLIP encoder saved where the trainer loads them from."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from encoders.siglip import SiglipEncoder
    from encoders.vq import VQTokenizer, make_vqmodel

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    VQTokenizer(make_vqmodel(32, (16, 16, 16), latent_channels=4, num_vq_embeddings=32, norm_num_groups=8),
                scaling_factor=2.0).save_pretrained(root / "vq")
    tower = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2))
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    SiglipEncoder.from_transformers_model(tower, processor).save_pretrained(root / "siglip")
    return root


@pytest.mark.parametrize("head,tune_siglip", [("diffusion", True), ("ar", False)])
def test_visual_paths_train_sample_and_export(tmp_path, visual_components, head, tune_siglip):
    """VQ latents (diffusion) or VQ codes (ar) for generation, SigLIP features for understanding:
    the model takes its sizes from the components, trains on all tasks, samples, scores multiple
    choice, and exports a self-contained folder. The encoder is fine-tuned only when asked."""
    from hybrid.checkpoint import load_pretrained_model

    out = tmp_path / head
    patch = 2 if head == "diffusion" else 1
    assert main([DEBUG, f"output_dir={out}", "steps=4", "log_every=2", "save_every=4", "sample_every=4",
                 "num_samples=2", "und_eval=4", "mix_understand=0.5", "model.image_codec=vq",
                 f"model.image_head={head}", f"model.patch_size={patch}", "model.max_seq_len=256",
                 f"vq_path={visual_components / 'vq'}", f"siglip_path={visual_components / 'siglip'}",
                 f"siglip_trainable={str(tune_siglip).lower()}", "siglip_lr_scale=1.0"]) == 0
    model = load_pretrained_model(out / "final")
    c = model.config
    assert (c.latent_channels, c.latent_downsample, c.und_tokens, c.und_feature_dim) == (4, 4, 16, 32)
    assert c.image_tokens == (16 if head == "diffusion" else 64)
    assert (out / "final" / "vq" / "hybrid_vq.json").is_file() and (out / "final" / "siglip" / "config.json").is_file()
    before = load_file(visual_components / "siglip" / "model.safetensors")
    after = load_file(out / "final" / "siglip" / "model.safetensors")
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == tune_siglip
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scored = [r for r in records if "answer_accuracy_heldout" in r]
    assert scored and 0.0 <= scored[-1]["answer_accuracy_heldout"] <= 1.0
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN
    from train.sample_eval import score_run

    scores = score_run(out / "final", n=4, seeds=[0], num_steps=2)  # the exported run is self-contained
    assert scores["images"] == 4
    for split in ("train", "heldout"):
        s = scores[split]
        assert s["n"] == 2 and 0.0 <= s["strict"] <= s["accuracy"] <= 1.0
        assert s["ci95"][0] <= s["accuracy"] <= s["ci95"][1]
    assert any("reliance_gap_train" in r for r in records)  # logged at every sampling step
    with pytest.raises(ValueError, match="vq_path"):
        load_config(DEBUG, ["model.image_codec=vq"])
    with pytest.raises(ValueError, match="siglip_path"):
        load_config(DEBUG, ["mix_understand=0.3"])


def test_init_from_a_converted_llama(tmp_path):
    """A Llama checkpoint converted with python -m hybrid.convert is the starting point of a run:
    its weights are loaded (a near-zero learning rate leaves them in place) and its tokenizer is
    used as it is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid.convert import main as convert_main
    from hybrid.tokenizer import special_token_ids, train_tokenizer
    from train.shapes import ShapesWorld

    tok = train_tokenizer(ShapesWorld(seed=0).corpus_texts(300), 300)
    hf = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(hf)
    tok.save_pretrained(hf)
    ids = special_token_ids(tok)
    conv = tmp_path / "hybrid"
    assert convert_main([str(hf), str(conv), "--image-token-ids", str(ids["boi_id"]), str(ids["eoi_id"]),
                         str(ids["img_id"]), "--set", "patch_size=8"]) == 0
    out = tmp_path / "run"
    assert main([DEBUG, f"output_dir={out}", f"init_from={conv}", "steps=2", "lr=1e-12", "warmup_steps=1",
                 "sample_every=100", "save_every=100"]) == 0
    a, b = load_file(conv / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    with pytest.raises(ValueError, match="(?s)do not fit.*size mismatch"):
        main([DEBUG, f"output_dir={tmp_path / 'bad'}", f"init_from={conv}", "model.ffn_dim=96", "steps=1"])


def test_answer_is_read_where_training_puts_the_answer_target(debug_cfg):
    """answer_accuracy reads the letter logits at len(question sample) - 2; in the training
    sample (with the answer) that is exactly the position whose target is the answer letter."""
    from hybrid.sequence import SampleBuilder
    from hybrid.tokenizer import train_tokenizer
    from train.data import understanding_question
    from train.shapes import ShapesWorld

    tokenizer = train_tokenizer(ShapesWorld(seed=0).corpus_texts(2000), 320)  # as the trainer does
    sb = SampleBuilder(tokenizer, debug_cfg)
    letters = [tokenizer.encode(k, add_special_tokens=False) for k in "ABCD"]
    assert all(len(t) == 1 for t in letters), "each option letter must be one token"
    for i in range(5):
        q = ShapesWorld(seed=0).question_example(i, "heldout")
        asked = sb.tokenize(understanding_question(q, with_answer=False))
        trained = sb.tokenize(understanding_question(q))
        trained_at = [j for j, t in enumerate(trained.targets) if t != -100]
        answer = letters["ABCD".index(q.answer)][0]
        assert trained_at[0] == len(asked) - 2 and trained.targets[trained_at[0]] == answer


def test_ema_and_wsd_schedule_resume_exactly(tmp_path):
    """With EMA and the warmup-stable-decay schedule on, a stopped-and-resumed run equals the
    uninterrupted one, EMA weights included (they are checkpointed); final_ema/ holds them, and
    the logged LR follows the schedule."""
    from train.schedules import build_lr_lambda

    extra = ("ema_decay=0.9", "lr_schedule=wsd", "cooldown_fraction=0.5", "warmup_steps=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, *extra)
    run(resumed, *extra, "stop_at=6")
    run(resumed, *extra)
    for folder in ("final", "final_ema"):
        a = load_file(straight / folder / "model.safetensors")
        b = load_file(resumed / folder / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{folder}: {k}")
    raw, ema = load_file(straight / "final/model.safetensors"), load_file(straight / "final_ema/model.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA lags the live weights
    cfg = load_config(DEBUG, list(extra))
    f = build_lr_lambda("wsd", 2, 12, cfg.min_lr_ratio, 0.5)
    log = [r for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert len(log) == 6
    for r in log:  # lr logged after the step's scheduler update: the multiplier of step r["step"]
        assert r["lr"] == pytest.approx(cfg.lr * f(r["step"]), rel=1e-9), r


def test_text_answers_are_scored_as_the_training_loss_reads_them(debug_cfg):
    """mc_answer="text": the trained answer is the right option's text (then <eos>), and each
    option's score is minus the summed text loss hybrid_loss gives for that option's training
    sample alone; answer_accuracy picks the best-scored option."""
    from encoders.latents import PixelCodec
    from encoders.siglip import SiglipEncoder
    from hybrid.losses import hybrid_loss
    from hybrid.model import HybridModel
    from hybrid.sequence import SampleBuilder
    from hybrid.tokenizer import special_token_ids, train_tokenizer
    from train.data import understanding_question
    from train.shapes import ShapesWorld
    from train.trainer import answer_accuracy, option_scores
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    world = ShapesWorld(seed=0)
    tokenizer = train_tokenizer(world.corpus_texts(2000), 320)
    cfg = type(debug_cfg).from_preset("debug", vocab_size=len(tokenizer), **special_token_ids(tokenizer),
                                      und_feature_dim=32, und_tokens=16)
    torch.manual_seed(0)
    model = HybridModel(cfg).eval()
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8)).eval()
    encoder = SiglipEncoder.from_transformers_model(tower, SiglipImageProcessor(size={"height": 32, "width": 32}))
    sb = SampleBuilder(tokenizer, cfg, caption_dropout=0.0)
    qs = [world.question_example(i, "train") for i in range(6)]
    with torch.no_grad():
        expected = []
        for q in qs:
            assert understanding_question(q, style="text")[-1] == " " + q.options[q.answer]
            row = []
            for k in "ABCD":
                batch = sb([understanding_question(q, style="text", option=k)])
                n = int((batch.targets != -100).sum())  # the option's tokens and <eos>
                assert n == len(tokenizer.encode(" " + q.options[k], add_special_tokens=False)) + 1
                out = hybrid_loss(model, batch, None, PixelCodec(), cfg.patch_size,
                                  und_features=encoder(batch.und_images))
                row.append(-out.text.item() * n)  # mean CE over the answer -> summed log-likelihood
            expected.append(row)
        expected = torch.tensor(expected)
        torch.testing.assert_close(option_scores(model, encoder, sb, qs, "text"), expected, rtol=1e-4, atol=1e-4)
        got = answer_accuracy(model, encoder, sb, world, "train", len(qs), batch_size=8, style="text")
    right = expected.argmax(-1) == torch.tensor(["ABCD".index(q.answer) for q in qs])
    assert got["all"] == pytest.approx(right.float().mean().item())
    with pytest.raises(ValueError, match="mc_answer"):
        understanding_question(qs[0], style="words")
    with pytest.raises(ValueError, match="mc_answer"):
        load_config(DEBUG, ["mc_answer=words"])
