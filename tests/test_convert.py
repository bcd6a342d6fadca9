"""Checkpoint conversion: parity with transformers' own models (tiny random weights, fp32),
exact round trips HF -> ours -> HF, the command line, and clear errors for what is refused."""

import copy
import json
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from PIL import Image
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.janus import JanusImageProcessor

from hybrid.checkpoint import iter_safetensors, load_pretrained_model
from hybrid.convert import (
    ConversionError,
    convert,
    convert_hf_causal_lm,
    convert_janus,
    detect_format,
    export_hf_causal_lm,
    load_hf_causal_lm,
    load_janus,
    main,
)
from hybrid.masks import dense_mask
from hybrid.sequence import (
    ImageSegment,
    SpecialIds,
    bidirectional_kinds,
    pack,
    tokenize_sample,
)

ATOL = 1e-4
TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (norm gains and biases too, which init leaves at 1 / 0), so a wrongly
    mapped tensor cannot hide behind a default value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def word_tokenizer(words: list[str], extra: list[str] = ()) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words + list(extra))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    mask = dense_mask(torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1))  # causal, one document
    return model(ids, torch.arange(T).expand(B, T), mask).logits


def save_hf(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


def tensors(folder) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(folder))


# --- Llama / Qwen2 ------------------------------------------------------------------------------


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("arch,tied,rope", [("llama", False, None), ("llama", True, None), ("qwen2", False, None),
                                            ("qwen2", True, None), ("llama", True, LLAMA3_ROPE),
                                            ("qwen2", False, {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0})])
def test_text_parity_and_round_trip(tmp_path, arch, tied, rope):
    """Llama 3.2-style scaled RoPE included ("llama3", with an original context shorter than the
    test sequence so the scaled low frequencies matter; and "linear")."""
    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    rope = rope or {"rope_type": "default", "rope_theta": 5e5}
    hf = randomize(cls(cfg_cls(**TEXT, tie_word_embeddings=tied, rope_parameters=rope)))
    src = save_hf(hf, tmp_path / "hf", max_shard_size="40KB")  # sharded: exercises the streamed index
    assert (src / "model.safetensors.index.json").is_file()
    with pytest.warns(UserWarning, match="image marker"):
        ours = load_hf_causal_lm(src).eval()
    c = ours.config
    assert (c.n_kv_heads, c.tie_embeddings, c.attn_bias, c.rope_theta) == (2, tied, arch == "qwen2", 5e5)
    assert (c.rope_scaling or {}).get("rope_type", "default") == rope["rope_type"]
    ids = torch.randint(0, TEXT["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (text_logits(ours, ids) - hf(ids).logits).abs().max().item()
    print(f"{arch} tied={tied} rope={rope['rope_type']}: max |logit diff| = {diff:.2e}")
    assert diff < ATOL

    # HF -> ours -> HF: every tensor identical, and transformers loads it without complaint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_hf_causal_lm(src, tmp_path / "ours")
        export_hf_causal_lm(tmp_path / "ours", tmp_path / "back", arch=arch)
    a, b = tensors(src), tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info.values()), info
    for key in ("hidden_size", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "rope_parameters"):
        assert getattr(again.config, key) == getattr(hf.config, key), key


def test_add_image_tokens_grows_vocab_and_tokenizer(tmp_path):
    words = [f"w{i}" for i in range(40)]
    tok = word_tokenizer(words)
    hf = randomize(LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": len(tok)})))
    src = save_hf(hf, tmp_path / "hf")
    tok.save_pretrained(str(src))
    dst = convert_hf_causal_lm(src, tmp_path / "ours", add_image_tokens=True)
    ours = load_pretrained_model(dst).eval()
    V = len(tok)
    c = ours.config
    assert (c.vocab_size, c.boi_id, c.eoi_id, c.img_id) == (V + 3, V, V + 1, V + 2)
    new_tok = PreTrainedTokenizerFast.from_pretrained(str(dst / "tokenizer"))
    assert new_tok.convert_tokens_to_ids(["<boi>", "<eoi>", "<img>"]) == [V, V + 1, V + 2]
    for w, hf_w in ((ours.embed_tokens.weight, hf.model.embed_tokens.weight), (ours.lm_head.weight, hf.lm_head.weight)):
        assert torch.equal(w[:V], hf_w)
        torch.testing.assert_close(w[V:], hf_w.mean(0).expand(3, -1))
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():  # the old vocabulary computes exactly what it did
        torch.testing.assert_close(text_logits(ours, ids)[..., :V], hf(ids).logits, atol=ATOL, rtol=0)
    # a tokenizer that already has the markers is used as it is
    tok2 = word_tokenizer(words, extra=["<boi>", "<eoi>", "<img>"])
    save_hf(randomize(LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": len(tok2)}))), tmp_path / "hf2")
    tok2.save_pretrained(str(tmp_path / "hf2"))
    c2 = load_hf_causal_lm(tmp_path / "hf2").config
    assert (c2.vocab_size, c2.boi_id, c2.img_id) == (len(tok2), len(tok2) - 3, len(tok2) - 1)


def test_fallback_image_ids_avoid_special_tokens(tmp_path):
    src = save_hf(LlamaForCausalLM(LlamaConfig(**{**TEXT, "pad_token_id": 95})), tmp_path / "hf")
    with pytest.warns(UserWarning, match="add_image_tokens"):
        c = load_hf_causal_lm(src).config
    assert [c.boi_id, c.eoi_id, c.img_id] == [92, 93, 94]
    c = load_hf_causal_lm(src, image_token_ids=(10, 11, 12)).config
    assert [c.boi_id, c.eoi_id, c.img_id] == [10, 11, 12]
    tok = word_tokenizer([f"w{i}" for i in range(40)])  # 43 tokens, 96 rows: padded like Qwen2's
    tok.save_pretrained(str(src))
    with pytest.warns(UserWarning, match="padding rows"):
        c = load_hf_causal_lm(src).config
    assert [c.boi_id, c.eoi_id, c.img_id] == [43, 44, 45]


@pytest.mark.parametrize("arch,change,field", [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e4}, "rope_type"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"head_dim": 32}, "head_dim"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "use_sliding_window"),
    ("mistral", {}, "model_type"),
])
def test_unsupported_configs_name_the_field(tmp_path, arch, change, field):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": arch, **TEXT, **change}))
    with pytest.raises(ConversionError, match=field):
        convert(src, tmp_path / "out")


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        detect_format(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "llama", **TEXT}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert(tmp_path / "cfg", tmp_path / "out")
    (tmp_path / "cfg" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled"):
        convert(tmp_path / "cfg", tmp_path / "out2")


def test_bf16_checkpoint_stays_bf16_and_round_trips(tmp_path):
    hf = randomize(LlamaForCausalLM(LlamaConfig(**TEXT))).to(torch.bfloat16)
    src = save_hf(hf, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "ours", image_token_ids=(3, 4, 5))
        convert(tmp_path / "ours", tmp_path / "back")
    assert {t.dtype for t in tensors(tmp_path / "ours").values()} == {torch.bfloat16}
    a, b = tensors(src), tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_pretrained_model(tmp_path / "ours").embed_tokens.weight.dtype == torch.float32  # CPU math in fp32


def test_export_refuses_what_llama_cannot_hold(tmp_path):
    from hybrid.config import HybridConfig
    from hybrid.model import HybridModel

    with pytest.raises(ConversionError, match="qk_norm"):
        export_hf_causal_lm(HybridModel(HybridConfig.from_preset("debug")), tmp_path / "x")
    with pytest.raises(ConversionError, match="qwen2"):
        export_hf_causal_lm(HybridModel(HybridConfig(dim=64, n_heads=4, n_layers=1, attn_bias=True)),
                            tmp_path / "y", arch="llama")
    for field, value in (("moe_experts", 2), ("late_fusion_layers", 1), ("nope_every", 2)):  # research modes
        with pytest.raises(ConversionError, match=field):
            export_hf_causal_lm(HybridModel(HybridConfig(dim=64, n_heads=4, n_layers=2, **{field: value})),
                                tmp_path / field)


def test_cli_text_round_trip_and_errors(tmp_path, capsys):
    hf = randomize(Qwen2ForCausalLM(Qwen2Config(**TEXT)))
    src = save_hf(hf, tmp_path / "hf")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "python -m hybrid.convert ./Janus-Pro-1B" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(src), str(tmp_path / "ours"), "--add-image-tokens", "--set", "image_size=64"]) == 0
        assert detect_format(tmp_path / "ours") == "hybrid"
        assert load_pretrained_model(tmp_path / "ours").config.image_size == 64
        assert main([str(tmp_path / "ours"), str(tmp_path / "back")]) == 0  # attn_bias -> qwen2
    assert detect_format(tmp_path / "back") == "qwen2"
    back = tensors(tmp_path / "back")
    for k, v in tensors(src).items():  # the three appended rows aside, identical
        assert torch.equal(back[k][: v.shape[0]], v), k
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "y"), "--to", "llama"]) == 2
    assert "converts to 'hybrid' only" in capsys.readouterr().err


# --- Janus -------------------------------------------------------------------------------------

JANUS_WORDS = [f"w{i}" for i in range(30)]
JANUS_EXTRA = ["<begin_of_image>", "<end_of_image>", "<image_placeholder>"]


@pytest.fixture(scope="module")
def janus_src(tmp_path_factory):
    """A tiny JanusForConditionalGeneration (fp32, random weights everywhere) with its tokenizer."""
    tok = word_tokenizer(JANUS_WORDS, JANUS_EXTRA)
    V = len(tok)
    cfg = JanusConfig(
        text_config=dict(model_type="llama", **{**TEXT, "vocab_size": V}),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
                           projection_dim=64, num_image_tokens=16),
        vq_config=dict(embed_dim=8, num_embeddings=48, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
                       num_res_blocks=1, projection_dim=64, image_token_embed_dim=64),
        image_token_id=V - 1, tie_word_embeddings=False)
    hf = randomize(JanusForConditionalGeneration(cfg))
    src = tmp_path_factory.mktemp("janus") / "hf"
    save_hf(hf, src)
    tok.save_pretrained(str(src))
    # Janus' own normalisation (0.5), which differs from JanusImageProcessor's CLIP defaults
    JanusImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(src)
    return src, hf, tok


def test_janus_config_and_ids(janus_src):
    src, _, tok = janus_src
    c = load_janus(src).model.config
    ids = tok.convert_tokens_to_ids(JANUS_EXTRA)
    assert [c.boi_id, c.eoi_id, c.img_id] == ids
    assert (c.image_head, c.image_codec, c.und_bidirectional, c.tie_embeddings) == ("ar", "vq", False, False)
    assert (c.image_tokens, c.und_tokens, c.codebook_size, c.und_feature_dim) == (16, 16, 48, 32)
    assert bidirectional_kinds(c) == ()


def test_janus_understanding_parity(janus_src):
    """Image + text prompt: our sequence machinery, SigLIP encoder and aligner vs Janus' forward
    with pixel_values through its vision tower and placeholder ids in input_ids."""
    src, hf, tok = janus_src
    parts = load_janus(src)
    model, siglip, c = parts.model, parts.siglip, parts.model.config
    arr = torch.randint(0, 256, (c.image_size, c.image_size, 3), generator=torch.Generator().manual_seed(2))
    image = Image.fromarray(arr.to(torch.uint8).numpy())
    sample = tokenize_sample(["w1 w2 w3", ImageSegment(image, "und"), "w4 w5 w6 w7"], tok, SpecialIds.from_config(c),
                             c.image_size, c.image_tokens, c.und_tokens)
    batch = pack([sample], len(sample), c.pad_id, bidirectional=bidirectional_kinds(c))
    # the reference input comes from Janus' own image processor, saved with the checkpoint
    pixel_values = JanusImageProcessor.from_pretrained(str(src))(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model(batch.input_ids, batch.position_ids, batch.attention_mask(), und_features=siglip(batch.und_images),
                     und_index=batch.und_index).logits
        ref = hf(input_ids=batch.input_ids, pixel_values=pixel_values).logits
    diff = (ours - ref).abs().max().item()
    print(f"janus understanding: max |logit diff| = {diff:.2e}")
    assert diff < ATOL


def test_janus_generation_head_parity(janus_src):
    """A prompt then image codes fed through generation_embeddings + generation_aligner; the
    generation head on Janus' hidden states vs our code_logits (read one position earlier)."""
    src, hf, tok = janus_src
    model = load_janus(src).model
    c = model.config
    sample = tokenize_sample(["w3 w9", ImageSegment(torch.zeros(3, c.image_size, c.image_size), "gen")], tok,
                             SpecialIds.from_config(c), c.image_size, c.image_tokens, c.und_tokens)
    batch = pack([sample], len(sample), c.pad_id, bidirectional=bidirectional_kinds(c))
    codes = torch.randint(0, c.codebook_size, (1, c.image_tokens), generator=torch.Generator().manual_seed(3))
    start, N = batch.gen_index[0, 0].item(), c.image_tokens
    assert batch.input_ids[0, start - 1] == c.boi_id
    with torch.no_grad():
        ours = model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_codes=codes,
                     gen_index=batch.gen_index).code_logits
        embeds = torch.cat([hf.get_input_embeddings()(batch.input_ids[:, :start]),
                            hf.prepare_embeddings_for_image_generation(codes)], dim=1)
        hidden = hf.model.language_model(inputs_embeds=embeds).last_hidden_state
        ref = hf.model.generation_head(hidden[:, start - 1 : start - 1 + N])
    diff = (ours - ref).abs().max().item()
    print(f"janus generation head: max |logit diff| = {diff:.2e}")
    assert diff < ATOL


def test_janus_vq_matches(janus_src):
    src, hf, _ = janus_src
    vq = load_janus(src).vq
    codes = torch.randint(0, 48, (1, 16))
    with torch.no_grad():
        ref = hf.model.vqmodel.decode(codes)  # (B, 3, H, W) in [-1, 1]
        torch.testing.assert_close(vq.decode(codes), ((ref + 1) / 2).clamp(0, 1))


def test_janus_round_trip_via_cli(janus_src, tmp_path):
    src, hf, tok = janus_src
    assert main([str(src), str(tmp_path / "ours")]) == 0
    ours = tmp_path / "ours"
    assert {p.name for p in ours.iterdir()} >= {"config.json", "model.safetensors", "siglip", "vq", "tokenizer"}
    assert main([str(ours), str(tmp_path / "back")]) == 0  # siglip/ + vq/ -> janus by default
    a, b = tensors(src), tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again, info = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info.values()), info
    assert again.config.image_token_id == hf.config.image_token_id
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert gen["generation_kwargs"]["boi_token_id"] == tok.convert_tokens_to_ids("<begin_of_image>")


def test_janus_unsupported_variants(janus_src, tmp_path):
    src, _, _ = janus_src
    raw = json.loads((src / "config.json").read_text())
    for section, change, field in [("vision_config", {"use_qk_norm": True}, "use_qk_norm"),
                                   ("vision_config", {"depth": 3}, "num_hidden_layers"),
                                   ("vq_config", {"hidden_act": "silu"}, "hidden_act")]:
        bad = tmp_path / field
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**raw, section: {**raw[section], **change}}))
        with pytest.raises(ConversionError, match=field):
            convert_janus(bad, tmp_path / f"{field}_out")
    nodir = tmp_path / "noids"
    nodir.mkdir()
    (nodir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match="image-token-ids"):
        convert_janus(nodir, tmp_path / "noids_out")


def test_bf16_janus_converts_and_runs_in_fp32(janus_src, tmp_path):
    """Janus-Pro ships bf16 weights: the converted components keep bf16 on disk, and the CPU path
    (fp32 model) still reads the bf16 SigLIP features and the VQ latents / codes."""
    from encoders.siglip import SiglipEncoder
    from encoders.vq import VQTokenizer

    src, hf, tok = janus_src
    bf16 = tmp_path / "bf16"
    save_hf(copy.deepcopy(hf).to(torch.bfloat16), bf16)  # the module-scoped fixture stays fp32
    tok.save_pretrained(str(bf16))
    JanusImageProcessor.from_pretrained(str(src)).save_pretrained(bf16)
    assert main([str(bf16), str(tmp_path / "ours")]) == 0
    model = load_pretrained_model(tmp_path / "ours")
    siglip = SiglipEncoder.from_pretrained(tmp_path / "ours" / "siglip")
    vq = VQTokenizer.from_pretrained(tmp_path / "ours" / "vq")
    assert next(siglip.parameters()).dtype == torch.bfloat16 and vq.codebook.dtype == torch.bfloat16
    c = model.config
    pixels = torch.rand(1, 3, c.image_size, c.image_size)
    enc = vq.encode(pixels)
    assert enc.latents.dtype == torch.float32 and vq.decode(enc.codes).dtype == torch.float32
    sample = tokenize_sample(["w1", ImageSegment(pixels[0], "und"), "w2"], tok, SpecialIds.from_config(c),
                             c.image_size, c.image_tokens, c.und_tokens)
    batch = pack([sample], len(sample), c.pad_id, bidirectional=bidirectional_kinds(c))
    with torch.no_grad():
        out = model(batch.input_ids, batch.position_ids, batch.attention_mask(), und_features=siglip(batch.und_images),
                    und_index=batch.und_index)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_converted_janus_runs_in_the_pipeline_and_decodes_like_janus(janus_src, tmp_path):
    """A converted Janus folder is a pipeline folder. Its KV-cached greedy answer about an image
    matches Janus' own forward over the growing sequence at every step, and it draws images
    code by code with its VQ decoder."""
    from hybrid.pipeline import HybridPipeline

    src, hf, tok = janus_src
    assert main([str(src), str(tmp_path / "ours")]) == 0
    pipe = HybridPipeline.from_pretrained(tmp_path / "ours")
    c = pipe.config
    arr = torch.randint(0, 256, (c.image_size, c.image_size, 3), generator=torch.Generator().manual_seed(2))
    image = Image.fromarray(arr.to(torch.uint8).numpy())
    out = pipe.generate_text("w1 w2 w3", images=[image], max_new_tokens=5, output_scores=True, ignore_eos=True)
    row = pipe.prompt_row("w1 w2 w3", [image])
    pixel_values = JanusImageProcessor.from_pretrained(str(src))(images=image, return_tensors="pt")["pixel_values"]
    for s, scores in enumerate(out.scores):
        ids = torch.tensor([row.input_ids + out.token_ids[0][:s]])
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixel_values).logits[0, -1]
        torch.testing.assert_close(scores[0], ref, atol=ATOL, rtol=0)
    gen = pipe.generate_image("w3 w9", num_images=2, guidance_scale=2.0, seed=0, top_k=4)
    assert gen.codes.shape == (2, 4, 4) and gen.images[0].size == (c.image_size, c.image_size)
