"""The VQ tokenizer (diffusers and Janus backends) and the VQ training stage, with tiny random models."""

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

from encoders.latents import PixelCodec, build_codec
from encoders.vq import VQTokenizer, make_vqmodel
from train.__main__ import main
from train.vq_stage import CodeUsage, ShapesRenders, code_stats, load_config, restart_dead_codes
from train.shapes import ShapesWorld

VQ_YAML = "train/configs/vq.yaml"


def tiny_diffusers(scale: float = 1.0, shift: float = 0.0) -> VQTokenizer:
    torch.manual_seed(0)
    model = make_vqmodel(image_size=16, block_out_channels=(8, 8), layers_per_block=1, latent_channels=3,
                         num_vq_embeddings=16, norm_num_groups=4)
    return VQTokenizer(model, scaling_factor=scale, shift_factor=shift)


def tiny_janus_vqvae(unit_norm_codebook: bool = True):
    from transformers.models.janus import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(0)
    # GroupNorm(32) is hard-coded in Janus, so 32 channels is the smallest width; 16px -> 8x8 codes.
    model = JanusVQVAE(JanusVQVAEConfig(**TINY_JANUS_VQ, num_patches=8)).eval()
    if unit_norm_codebook:
        _unit_norm_rows(model)
    return model


TINY_JANUS_VQ = dict(embed_dim=4, num_embeddings=32, latent_channels=8, base_channels=32,
                     channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=32,
                     image_token_embed_dim=32, num_hidden_layers=1)


def _unit_norm_rows(vqvae) -> None:
    # How the original Janus quantiser initialises its codebook; with unit-norm rows its cosine
    # nearest code and transformers' Euclidean argmin agree.
    w = vqvae.quantize.embedding.weight
    w.data = F.normalize(torch.randn_like(w), dim=-1)


def tiny_janus_full(path, shard: bool):
    from transformers import JanusConfig, JanusForConditionalGeneration

    config = JanusConfig(
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                           patch_size=2, projection_dim=32, mlp_ratio=2.0, num_image_tokens=64),
        vq_config=TINY_JANUS_VQ,
    )
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    _unit_norm_rows(model.model.vqmodel)
    model.save_pretrained(str(path), **({"max_shard_size": "100KB"} if shard else {}))
    return model


def pixels(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["diffusers", "janus"])
def tok(request) -> VQTokenizer:
    if request.param == "diffusers":
        return tiny_diffusers(scale=2.5, shift=0.3)
    # transformers' random codebook (rows of unequal norm): the case where cosine and Euclidean differ
    return VQTokenizer(tiny_janus_vqvae(unit_norm_codebook=False), scaling_factor=2.5, shift_factor=0.3)


def raw_latents(tok: VQTokenizer, x: torch.Tensor) -> torch.Tensor:
    """Encoder + quant_conv, straight from the backend's modules."""
    return tok.model.quant_conv(tok.model.encoder(x * 2 - 1))


def test_shapes_attributes_and_frozen(tok):
    x = pixels()
    enc = tok.encode(x)
    assert tok.downsample == 2 and enc.latents.shape == (2, tok.latent_channels, 8, 8)
    assert enc.codes.shape == (2, 8, 8) and enc.codes.dtype == torch.long
    assert tok.codebook_size == {"diffusers": 16, "janus": 32}[tok.backend]
    for y in (tok.decode(enc.latents), tok.decode(enc.codes), tok.decode(enc.codes.flatten(1)),
              tok.decode(enc.latents, quantize=False)):
        assert y.shape == (2, 3, 16, 16) and 0 <= y.min() and y.max() <= 1
    torch.testing.assert_close(tok.encode_latents(x), enc.latents, rtol=0, atol=0)
    assert torch.equal(tok.encode_codes(x), enc.codes)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())


def test_codes_are_the_nearest_code_of_the_pre_quant_latents(tok):
    x = pixels(3)
    with torch.no_grad():
        z = raw_latents(tok, x)  # (B, C, h, w)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    book = tok.codebook
    if tok.backend == "janus":  # Janus compares directions (l2-normalised vectors)
        flat, book = F.normalize(flat, dim=-1), F.normalize(book, dim=-1)
    expected = torch.cdist(flat, book).argmin(-1).view(3, 8, 8)
    enc = tok.encode(x)
    assert torch.equal(enc.codes, expected)
    # normalisation: latents = (z - shift) * scale, and decode undoes it
    torch.testing.assert_close(enc.latents, (z - 0.3) * 2.5)
    torch.testing.assert_close(enc.latents / tok.scaling_factor + tok.shift_factor, z, rtol=1e-5, atol=1e-5)


def test_decode_codes_equals_decode_of_exact_codebook_latents(tok):
    codes = torch.randint(tok.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    vectors = tok.codebook[codes].permute(0, 3, 1, 2)  # (B, C, h, w) raw codebook vectors
    latents = (vectors - tok.shift_factor) * tok.scaling_factor
    from_codes = tok.decode(codes)
    torch.testing.assert_close(tok.decode(latents), from_codes)
    torch.testing.assert_close(tok.decode(codes.flatten(1)), from_codes)
    # and a latent slightly off a code still decodes to that code (quantize=True is the default)
    torch.testing.assert_close(tok.decode(latents + 1e-4), from_codes)


def test_decode_matches_the_backends_own_decode(tok):
    codes = torch.randint(tok.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if tok.backend == "janus":
            ref = tok.model.decode(codes.flatten(1))  # transformers' JanusVQVAE.decode
            torch.testing.assert_close(tok.decode(codes), ((ref + 1) / 2).clamp(0, 1))
        else:
            z = raw_latents(tok, pixels())
            ref = tok.model.decode(z).sample  # diffusers VQModel.decode quantises internally
            latents = (z - tok.shift_factor) * tok.scaling_factor
            torch.testing.assert_close(tok.decode(latents), ((ref + 1) / 2).clamp(0, 1))
            unq = tok.model.decode(z, force_not_quantize=True).sample
            torch.testing.assert_close(tok.decode(latents, quantize=False), ((unq + 1) / 2).clamp(0, 1))


def test_janus_codes_match_transformers_encode_for_unit_norm_codebooks():
    vqvae = tiny_janus_vqvae(unit_norm_codebook=True)
    x = pixels()
    ref = vqvae.encode(x * 2 - 1).image_tokens.view(2, 8, 8)
    assert torch.equal(VQTokenizer(vqvae).encode_codes(x), ref)


def test_save_and_load_round_trip(tok, tmp_path):
    x = pixels()
    tok.save_pretrained(tmp_path / "tok")
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert "hybrid_vq.json" in files and "config.json" in files
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    assert (loaded.backend, loaded.scaling_factor, loaded.shift_factor) == (tok.backend, 2.5, 0.3)
    assert (loaded.latent_channels, loaded.downsample, loaded.codebook_size) == (tok.latent_channels, tok.downsample, tok.codebook_size)
    a, b = tok.encode(x), loaded.encode(x)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.codes, b.codes)
    assert torch.equal(tok.decode(a.latents), loaded.decode(a.latents))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert isinstance(build_codec("vq", str(tmp_path / "tok")), VQTokenizer)


def test_plain_backend_folders_load(tmp_path):
    x = pixels()
    d = tiny_diffusers()
    d.model.register_to_config(scaling_factor=0.5)
    d.model.save_pretrained(str(tmp_path / "vqmodel"))  # a plain diffusers VQModel folder
    loaded = VQTokenizer.from_pretrained(tmp_path / "vqmodel")
    assert (loaded.backend, loaded.scaling_factor, loaded.shift_factor) == ("diffusers", 0.5, 0.0)
    assert torch.equal(loaded.encode_codes(x), d.encode_codes(x))
    j = tiny_janus_vqvae()
    j.save_pretrained(str(tmp_path / "janus_vq"))  # a saved JanusVQVAE folder
    loaded = VQTokenizer.from_pretrained(tmp_path / "janus_vq")
    assert loaded.backend == "janus" and torch.equal(loaded.encode_codes(x), VQTokenizer(j).encode_codes(x))


@pytest.mark.parametrize("shard", [True, False])
def test_full_janus_checkpoint_loads_only_its_vq(tmp_path, shard):
    full = tiny_janus_full(tmp_path / "janus", shard)
    assert (tmp_path / "janus" / "model.safetensors.index.json").is_file() == shard
    tok = VQTokenizer.from_pretrained(tmp_path / "janus")
    assert tok.backend == "janus" and tok.codebook_size == 32 and tok.latent_channels == 4
    x = pixels()
    with torch.no_grad():
        ref = full.model.vqmodel.encode(x * 2 - 1).image_tokens.view(2, 8, 8)
        assert torch.equal(tok.encode_codes(x), ref)
        img = full.decode_image_tokens(ref.flatten(1))  # (B, H, W, 3) in [-1, 1]
    torch.testing.assert_close(tok.decode(ref), ((img.permute(0, 3, 1, 2) + 1) / 2).clamp(0, 1))


def test_bad_paths_and_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        VQTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no hybrid_vq.json and no config.json; expected .*VQModel"):
        VQTokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a recognised VQ model.*model_type='llama'"):
        VQTokenizer.from_pretrained(tmp_path / "llama")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "hybrid_vq.json").write_text(json.dumps({"backend": "taming"}))
    with pytest.raises(ValueError, match="unknown backend 'taming'"):
        VQTokenizer.from_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="needs a path"):
        build_codec("vq")
    with pytest.raises(ValueError, match="unknown image codec"):
        build_codec("vae")
    tok = tiny_diffusers()
    with pytest.raises(ValueError, match="expected float pixels of shape"):
        tok.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        tok.encode(torch.rand(1, 3, 15, 15))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        tok.decode(torch.full((1, 8, 8), 16))
    with pytest.raises(ValueError, match="square grid"):
        tok.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="expected latents of shape"):
        tok.decode(torch.zeros(1, 5, 8, 8))


def test_pixel_codec_speaks_the_same_names():
    x = pixels()
    codec = PixelCodec()
    torch.testing.assert_close(codec.decode(codec.encode_latents(x)), x)


def test_code_stats_and_dead_code_restarts():
    stats = code_stats(torch.tensor([0, 1, 2, 3] * 5), size=8)
    assert stats["codebook_used"] == 0.5 and stats["perplexity"] == pytest.approx(4.0)
    tok = tiny_diffusers()
    usage = CodeUsage(tok.codebook_size)
    usage.counts[:10] = 3  # codes 10..15 unused over the window
    before = tok.codebook.detach().clone()
    z = torch.randn(2, tok.latent_channels, 8, 8)
    n = restart_dead_codes(tok, usage, z, Accelerator(cpu=True), torch.Generator().manual_seed(0))
    assert n == 6 and usage.counts.sum() == 0
    assert torch.equal(tok.codebook[:10], before[:10])
    candidates = z.permute(0, 2, 3, 1).reshape(-1, tok.latent_channels)
    for row in tok.codebook[10:]:  # each restarted code is one of the batch's encoder outputs
        assert (candidates == row).all(-1).any()


def test_stage_config(tmp_path):
    cfg = load_config(VQ_YAML, ["block_out_channels=[8, 16]", "norm_num_groups=4", "steps=5"])
    assert cfg.block_out_channels == (8, 16) and cfg.steps == 5
    with pytest.raises(ValueError, match="block_out_channels: expected a list of ints"):
        load_config(VQ_YAML, ["block_out_channels=wide"])
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(VQ_YAML, ["codebook=12"])
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        load_config(VQ_YAML, ["block_out_channels=[8, 12]", "norm_num_groups=8"])


TINY_STAGE = ["block_out_channels=[8, 8]", "norm_num_groups=4", "latent_channels=3", "num_vq_embeddings=128",
              "image_size=24", "batch_size=4", "steps=6", "warmup_steps=2", "restart_every=2", "log_every=1",
              "eval_every=3", "save_every=2", "eval_images=8", "stats_images=16"]


def test_stage_trains_exports_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([VQ_YAML, f"output_dir={straight}", *TINY_STAGE]) == 0
    assert main([VQ_YAML, f"output_dir={resumed}", *TINY_STAGE, "stop_at=3"]) == 0  # "killed" after step 3
    assert not (resumed / "final").exists()
    assert json.loads((resumed / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())["step"] == 3
    assert main([VQ_YAML, f"output_dir={resumed}", *TINY_STAGE]) == 0  # same command: resumes at 3

    a = load_file(straight / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "final" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    log_a = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k not in ("images_per_s",):
                assert ra[k] == pytest.approx(rb[k], abs=1e-5), k
    train_recs = [r for r in log_a if "loss" in r]
    assert train_recs[-1]["restarts_total"] > 0  # 128 codes for 4 images of 12x12 cells: some go unused

    metrics = json.loads((straight / "final" / "metrics.json").read_text())
    for key in ("heldout_psnr", "heldout_codebook_used", "heldout_perplexity", "heldout_detect_accuracy",
                "scaling_factor", "shift_factor", "dead_code_restarts"):
        assert key in metrics
    assert (straight / "final" / "recon.png").is_file()
    # the exported tokenizer normalises its training renders' latents to mean 0, std 1
    tok = VQTokenizer.from_pretrained(straight / "final")
    renders = ShapesRenders(ShapesWorld(resolution=24, seed=0))
    lat = tok.encode_latents(torch.stack([renders[i] for i in range(16)]))
    assert lat.mean().item() == pytest.approx(0.0, abs=1e-4) and lat.std().item() == pytest.approx(1.0, abs=1e-4)
