"""HybridPipeline and the cached sampling loops.

The claims under test are comparative: every cached step (a text token, a denoising step's image
prediction, a VQ code's logits, the first token after an appended image) equals a full
recompute of the whole sequence; a batch equals its rows run one by one; guidance 1 equals the
conditional branch alone; a saved and reloaded pipeline reproduces its outputs exactly.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from encoders.siglip import SiglipEncoder
from encoders.vq import VQTokenizer, make_vqmodel
from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.pipeline import HybridPipeline
from hybrid.sampling import (
    commit_image, denoise, image_prompt_rows, prefill, prompt_prefix_rows, sample_codes, sample_token,
)
from hybrid.sequence import bidirectional_kinds, pack
from hybrid.tokenizer import special_token_ids

ATOL = 1e-5  # fp32, the tolerance for cached vs full recompute


def siglip() -> SiglipEncoder:
    torch.manual_seed(1)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8)).eval()
    return SiglipEncoder.from_transformers_model(model, SiglipImageProcessor(size={"height": 32, "width": 32}))


def vq() -> VQTokenizer:
    torch.manual_seed(2)
    return VQTokenizer(make_vqmodel(32, block_out_channels=(16, 16, 16), latent_channels=4,
                                    num_vq_embeddings=32, norm_num_groups=8))


def make_pipe(tokenizer, head: str = "diffusion", scheduler: str = "flow", with_siglip: bool = True,
              **overrides) -> HybridPipeline:
    """A random model whose outputs are not trivially zero (the diffusion head starts at 0).
    ``head="tokens"`` (Chameleon) adds the 32 VQ codes to the vocabulary; ``overrides`` are
    further HybridConfig fields (MoE, late fusion, iRoPE)."""
    extra = dict(image_codec="vq", latent_channels=4, latent_downsample=4, und_feature_dim=32, und_tokens=16,
                 max_seq_len=256, scheduler=scheduler)
    codes = head in ("ar", "tokens")
    extra.update(dict(image_head=head, patch_size=1, codebook_size=32) if codes else dict(patch_size=2))
    vocab = len(tokenizer) + (32 if head == "tokens" else 0)
    cfg = HybridConfig.from_preset("debug", vocab_size=vocab, **special_token_ids(tokenizer), **{**extra, **overrides})
    torch.manual_seed(0)
    model = HybridModel(cfg)
    if head == "diffusion":
        torch.nn.init.normal_(model.image_out.weight, std=0.05)
    return HybridPipeline(model, tokenizer, vq=vq(), siglip=siglip() if with_siglip else None)


def photo(seed: int, size=(32, 32), mode="RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def full_text_logits(pipe: HybridPipeline, row, generated: list[int]) -> torch.Tensor:
    """Logits after ``row`` + ``generated`` from one uncached forward over the whole sequence."""
    c = pipe.config
    row = type(row)(row.input_ids + generated, [-100] * (len(row) + len(generated)), row.spans, row.images)
    batch = pack([row], len(row), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    extra = {}
    if batch.und_index.numel():
        extra = dict(und_features=pipe._und_encoder()(batch.und_images), und_index=batch.und_index)
    out = pipe.model(batch.input_ids, batch.position_ids, batch.attention_mask(), **extra)
    return out.logits[0, -1]


@torch.no_grad()
@pytest.mark.parametrize("with_images", [False, True])
@pytest.mark.parametrize("head", ["diffusion", "tokens"])  # "tokens" (Chameleon) reads input images as codes
def test_text_logits_at_every_step_equal_full_recompute(tokenizer, with_images, head):
    pipe = make_pipe(tokenizer, head=head, with_siglip=head == "diffusion")
    prompts = ["a photo of a red circle", "two"]  # different lengths: the short row is left-padded
    images = [[photo(0)], [photo(1), photo(2)]] if with_images else ()
    out = pipe.generate_text(prompts, images=images, max_new_tokens=6, temperature=1.0, seed=0, output_scores=True)
    assert len(out.scores) == 6
    if head == "tokens":  # text sampling never writes an image code
        assert all(t < pipe.config.image_token_offset for row in out.token_ids for t in row)
    for b, p in enumerate(prompts):
        row = pipe.prompt_row(p, images[b] if with_images else ())
        for s in range(len(out.token_ids[b])):
            ref = full_text_logits(pipe, row, out.token_ids[b][:s])
            torch.testing.assert_close(out.scores[s][b], ref, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["ddpm", "flow"])
def test_image_prediction_at_every_denoising_step_equals_full_recompute(tokenizer, scheduler):
    pipe = make_pipe(tokenizer, scheduler=scheduler, with_siglip=False)
    c = pipe.config
    prompts = ["a photo of a red circle", "blue"]
    seen = []
    pipe.generate_image(prompts, num_steps=4, guidance_scale=3.0, seed=0,
                        callback=lambda i, t, x, pred: seen.append((t, x.clone(), pred.clone())))
    assert len(seen) == 4
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    rows = image_prompt_rows(ids, c, with_uncond=True)  # cond rows, then <bos><boi> rows
    batch = pack(rows, max(len(r) for r in rows), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    for t, x, pred in seen:
        ref = pipe.model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_tokens=x,
                         gen_index=batch.gen_index, gen_timesteps=torch.full((4,), float(t))).image_pred
        torch.testing.assert_close(pred, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_code_logits_at_every_position_equal_full_recompute(tokenizer):
    pipe = make_pipe(tokenizer, head="ar", with_siglip=False)
    c = pipe.config
    prompts = ["a photo of a red circle", "blue"]
    seen = {}
    gen = pipe.generate_image(prompts, guidance_scale=2.0, seed=0, top_k=8,
                              callback=lambda i, logits: seen.__setitem__(i, logits.clone()))
    assert gen.codes.shape == (2, 8, 8) and len(seen) == c.image_tokens
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    rows = image_prompt_rows(ids, c, with_uncond=True)
    batch = pack(rows, max(len(r) for r in rows), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    codes = gen.codes.flatten(1).repeat(2, 1)  # both halves saw the same codes
    ref = pipe.model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_index=batch.gen_index,
                     gen_codes=codes).code_logits  # (4, N, K)
    for i in range(c.image_tokens):
        torch.testing.assert_close(seen[i], ref[:, i], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("head", ["diffusion", "ar"])
def test_text_after_an_appended_image_equals_full_recompute(tokenizer, head):
    """commit_image puts the clean image (t=0 latents, or the codes) and <eoi> in the cache: the
    logits after it equal one forward over <bos> prompt <boi> image <eoi>."""
    pipe = make_pipe(tokenizer, head=head, with_siglip=False)
    c, model = pipe.config, pipe.model
    ids = [tokenizer.encode("a photo of a red circle", add_special_tokens=False)]
    cache, out = prefill(model, prompt_prefix_rows(ids, c, with_uncond=False))
    g = torch.Generator().manual_seed(0)
    row = image_prompt_rows(ids, c, with_uncond=False)[0]
    row = type(row)(row.input_ids + [c.eoi_id], row.targets + [-100], row.spans, row.images)
    batch = pack([row], len(row), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    if head == "ar":
        codes = sample_codes(model, cache, out.hidden[:, -1], 1, 1.0, generator=g)
        after = commit_image(model, cache, codes=codes[:, -1:])
        ref = model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_index=batch.gen_index,
                    gen_codes=codes)
    else:
        x = denoise(model, cache, 1, pipe.scheduler, 3, 1.0, g)
        after = commit_image(model, cache, tokens=x)
        ref = model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_tokens=x,
                    gen_index=batch.gen_index, gen_timesteps=torch.zeros(1))
    assert cache.length == len(row)
    torch.testing.assert_close(after.logits[0], ref.logits[0, -1], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("head", ["diffusion", "ar"])
def test_guidance_one_equals_the_conditional_branch_alone(tokenizer, head):
    """Scale 1 runs no unconditional rows; running them anyway (batched with the conditional
    ones) and guiding at 1 gives the same result: batching does not leak between rows."""
    pipe = make_pipe(tokenizer, head=head, with_siglip=False)
    c, model = pipe.config, pipe.model
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in ["a photo of a red circle", "blue"]]
    runs = []
    for with_uncond in (False, True):
        cache, out = prefill(model, prompt_prefix_rows(ids, c, with_uncond))
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        if head == "ar":
            runs.append(sample_codes(model, cache, out.hidden[:, -1], 2, 1.0, top_k=4, generator=gens))
        else:
            runs.append(denoise(model, cache, 2, pipe.scheduler, 3, 1.0, gens))
    torch.testing.assert_close(runs[0], runs[1], atol=ATOL, rtol=0)
    unguided = pipe.generate_image(["a photo of a red circle", "blue"], guidance_scale=1.0, num_steps=3, seed=0,
                                   top_k=4)
    if head == "ar":
        assert torch.equal(unguided.codes.flatten(1), runs[0])


@pytest.mark.parametrize("head", ["diffusion", "ar"])
def test_seed_reproduces_and_a_batch_equals_its_prompts_one_by_one(tokenizer, head):
    pipe = make_pipe(tokenizer, head=head, with_siglip=False)
    prompts = ["a photo of a red circle", "two blue squares"]
    kw = dict(num_steps=3, guidance_scale=3.0, top_k=8)
    batch = pipe.generate_image(prompts, num_images=2, seed=7, **kw)  # images seeded 7, 8, 9, 10
    again = pipe.generate_image(prompts, num_images=2, seed=7, **kw)
    other = pipe.generate_image(prompts, num_images=2, seed=8, **kw)
    assert torch.equal(batch.pixels, again.pixels) and not torch.equal(batch.pixels, other.pixels)
    assert len(batch.images) == 4 and batch.images[0].size == (32, 32)
    singles = [pipe.generate_image(p, num_images=2, seed=[7 + 2 * i, 8 + 2 * i], **kw) for i, p in enumerate(prompts)]
    torch.testing.assert_close(batch.pixels, torch.cat([s.pixels for s in singles]), atol=ATOL, rtol=0)
    if head == "ar":
        assert torch.equal(batch.codes, torch.cat([s.codes for s in singles]))

    text = pipe.generate_text(prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    ones = [pipe.generate_text(p, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3 + i) for i, p in enumerate(prompts)]
    assert text.token_ids == [o.token_ids[0] for o in ones]


def test_save_and_load_reproduce_outputs_exactly(tokenizer, tmp_path):
    pipe = make_pipe(tokenizer)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = HybridPipeline.from_pretrained(tmp_path / "pipe")
    assert {p.name for p in (tmp_path / "pipe").iterdir()} >= {"config.json", "model.safetensors", "tokenizer",
                                                              "scheduler.json", "vq", "siglip"}
    kw = dict(num_images=2, num_steps=3, seed=0)
    assert torch.equal(pipe.generate_image("a photo of a red circle", **kw).pixels,
                       loaded.generate_image("a photo of a red circle", **kw).pixels)
    a = pipe.generate_text("Describe the image.", images=[photo(0)], max_new_tokens=6, temperature=1.0, seed=1)
    b = loaded.generate_text("Describe the image.", images=[photo(0)], max_new_tokens=6, temperature=1.0, seed=1)
    assert a == b


def test_streaming_yields_the_generated_text_piece_by_piece(tokenizer):
    pipe = make_pipe(tokenizer, with_siglip=False)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=4)
    pieces = list(pipe.stream_text("a photo of", **kw))
    full = pipe.generate_text("a photo of", **kw)
    assert len(pieces) == len(full.token_ids[0])  # one yield per decoding step
    assert "".join(p[0] for p in pieces) == full.texts[0]
    # with a stop string, nothing streamed is later cut: the pieces add up to the final text
    stop = full.texts[0][4:7]
    pieces = list(pipe.stream_text("a photo of", stop=[stop], **kw))
    cut = pipe.generate_text("a photo of", stop=[stop], **kw)
    assert cut.finish_reasons == ["stop"] and "".join(p[0] for p in pieces) == cut.texts[0]
    assert cut.texts[0] == full.texts[0][: full.texts[0].index(stop)]
    # a stop string at the very start: nothing may be shown, not even the part before the hold
    for seed in range(6):
        free = pipe.generate_text("a photo of", max_new_tokens=6, temperature=1.0, seed=seed)
        stop = free.texts[0][:3]
        if len(stop) < 3:
            continue
        pieces = list(pipe.stream_text("a photo of", stop=[stop], max_new_tokens=6, temperature=1.0, seed=seed))
        assert "".join(p[0] for p in pieces) == "", (seed, stop, pieces)


def test_stop_strings_and_eos_end_rows(tokenizer):
    pipe = make_pipe(tokenizer, with_siglip=False)
    free = pipe.generate_text(["a photo of", "two"], max_new_tokens=10, temperature=1.0, seed=0)
    assert free.finish_reasons == ["length", "length"]
    stop = free.texts[0][3:5]  # a string the first row is known to write
    cut = pipe.generate_text(["a photo of", "two"], max_new_tokens=10, temperature=1.0, seed=0, stop=[stop])
    assert cut.finish_reasons[0] == "stop" and cut.texts[0] == free.texts[0][: free.texts[0].index(stop)]
    assert stop not in cut.texts[1] or cut.finish_reasons[1] == "stop"
    # eos: make it the model's only choice after the first token
    pipe.model.lm_head.weight.data[pipe.config.eos_id] += 100 * pipe.model.lm_head.weight.data.mean(0).sign()
    out = pipe.generate_text("a photo of", max_new_tokens=10)
    assert out.finish_reasons == ["eos"] and len(out.token_ids[0]) <= 10


@pytest.mark.parametrize("head", ["diffusion", "ar"])
def test_interleaved_generation_draws_the_image_the_image_api_draws(tokenizer, head):
    """Forced to open an image (its <boi> logit made dominant), the model's interleaved output is
    [image, text]; the image equals generate_image's for the same prompt and seed, and the text
    after it is what the cached <eoi> logits lead to."""
    pipe = make_pipe(tokenizer, head=head, with_siglip=False)
    c = pipe.config
    w = pipe.model.lm_head.weight.data
    w[c.boi_id] = w[c.boi_id] + 50
    out = pipe.generate_interleaved("a photo of", max_new_tokens=4, max_images=1, num_steps=3, guidance_scale=2.0,
                                    seed=5, image_top_k=8)
    kinds = [type(p).__name__ for p in out.parts]
    assert kinds[0] == "Image", kinds
    ref = pipe.generate_image("a photo of", num_steps=3, guidance_scale=2.0, seed=6, top_k=8)  # image k: seed + 1 + k
    diff = np.abs(np.asarray(out.parts[0], dtype=int) - np.asarray(ref.images[0], dtype=int)).max()
    assert diff <= 1  # equal up to the uint8 rounding of a 1e-6 difference
    assert out.finish_reason in ("length", "eos")


def test_input_image_conditions_image_generation(tokenizer):
    pipe = make_pipe(tokenizer)
    kw = dict(num_steps=3, seed=0, guidance_scale=1.0)
    a = pipe.generate_image("like this", images=[photo(0)], **kw).pixels
    b = pipe.generate_image("like this", images=[photo(1)], **kw).pixels
    c = pipe.generate_image("like this", images=[photo(0)], **kw).pixels
    assert torch.equal(a, c) and not torch.allclose(a, b)


def test_images_are_converted_where_safe_and_refused_otherwise(tokenizer, tmp_path):
    pipe = make_pipe(tokenizer)
    rgb = pipe.load_image(photo(0))
    assert rgb.shape == (3, 32, 32)
    assert torch.equal(pipe.load_image(photo(0, mode="P").convert("RGB")), pipe.load_image(photo(0, mode="P").convert("RGB")))
    grey = pipe.load_image(photo(0, mode="L"))
    assert torch.equal(grey[0], grey[1])
    rgba = photo(0).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    assert torch.equal(pipe.load_image(rgba), torch.ones(3, 32, 32))
    wide = pipe.load_image(photo(0, size=(64, 32)))  # padded to 64x64 with grey, then resized
    assert wide.shape == (3, 32, 32) and abs(wide[:, 0, 16].mean().item() - 127 / 255) < 0.02
    photo(0).save(tmp_path / "x.png")
    assert torch.equal(pipe.load_image(tmp_path / "x.png"), rgb)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.load_image(tmp_path / "bad.png")
    # 16-bit grey is scaled to 8 bit (value * 255 // 65535), as training data is
    i16 = Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16).repeat(16, 0).repeat(16, 1))
    assert i16.mode == "I;16"
    x = pipe.load_image(i16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert x[0, 0, 0] == 1.0 and x[0, 31, 0] == 0.0 and x[0, 31, 31] == 1 / 255
    assert abs(x[0, 0, 31].item() - 0.5) < 0.003  # 32896 -> 128
    with pytest.raises(ValueError, match="'F'"):
        pipe.load_image(Image.new("F", (32, 32)))
    with pytest.raises(ValueError, match="'La'"):  # premultiplied alpha: no safe conversion in PIL
        pipe.load_image(Image.new("La", (32, 32)))
    assert torch.equal(pipe.load_image(photo(0).convert("RGBX")), rgb)
    assert torch.equal(pipe.load_image(rgb.to(torch.bfloat16).float()), rgb)
    assert pipe.load_image(rgb.to(torch.bfloat16)).shape == (3, 32, 32)
    assert torch.equal(pipe.load_image(rgb.clone().requires_grad_()), rgb)
    with pytest.raises(ValueError, match="finite"):
        pipe.load_image(torch.full((3, 32, 32), float("nan")))
    # a camera photo stored sideways with an EXIF orientation is read upright
    tall = photo(3, size=(32, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tall.save(tmp_path / "sideways.jpg", exif=exif, quality=100)
    upright = pipe.load_image(Image.open(tmp_path / "sideways.jpg").transpose(Image.Transpose.ROTATE_270))
    assert torch.equal(pipe.load_image(tmp_path / "sideways.jpg"), upright)
    with pytest.raises(ValueError, match="zero size"):
        pipe.load_image(Image.new("RGB", (0, 32)))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        pipe.load_image(torch.rand(32, 32))


def test_errors_name_the_problem(tokenizer):
    pipe = make_pipe(tokenizer)
    c = pipe.config
    with pytest.raises(ValueError, match="exceeds the context"):
        pipe.generate_text("a photo " * 200)
    with pytest.raises(ValueError, match="exceeds the context"):
        # fits as text, not with the image after it: <bos> + prompt + <boi> + N > max_seq_len
        n = c.max_seq_len - c.image_tokens
        prompt = tokenizer.decode(tokenizer.encode("a photo " * 200, add_special_tokens=False)[:n])
        pipe.generate_text(prompt, max_new_tokens=1)
        pipe.generate_image(prompt)
    with pytest.raises(ValueError, match="unknown scheduler 'eulerx'"):
        pipe.generate_image("a", scheduler="eulerx")
    with pytest.raises(ValueError, match="trained with 'flow'"):
        pipe.generate_image("a", scheduler="ddpm")
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.generate_text("")
    no_eye = make_pipe(tokenizer, with_siglip=False)
    with pytest.raises(ValueError, match="no siglip"):
        no_eye.generate_text("what is this?", images=[photo(0)])
    pipe.vq = VQTokenizer(make_vqmodel(32, block_out_channels=(16, 16), latent_channels=8,
                                       num_vq_embeddings=32, norm_num_groups=8))
    with pytest.raises(ValueError, match=r"vq latent_channels=8, the model config says 4(.|\n)*downsample=2"):
        pipe.generate_image("a")
    with pytest.raises(ValueError, match="vq latent_channels"):
        HybridPipeline(pipe.model, tokenizer, vq=pipe.vq)
    assert c.latent_channels == 4


def test_sample_token_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_token(logits, 0.0), greedy)
    assert torch.equal(sample_token(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_token(logits, 1.0, top_p=1e-4, generator=g), greedy)
    # top_p keeps the smallest set whose mass reaches p: the sampled ids stay inside it
    probs = logits.softmax(-1)
    draws = torch.stack([sample_token(logits, 1.0, top_p=0.5, generator=g) for _ in range(200)])  # (200, 3)
    for b in range(3):
        order = probs[b].argsort(descending=True)
        keep = order[: int((probs[b][order].cumsum(0) < 0.5).sum()) + 1]
        assert set(draws[:, b].tolist()) <= set(keep.tolist())
    per_row = sample_token(logits, 1.0, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = [sample_token(logits[b:b + 1], 1.0, generator=torch.Generator().manual_seed(b + 1)) for b in range(3)]
    assert torch.equal(per_row, torch.cat(alone))
    with pytest.raises(ValueError, match="top_p"):
        sample_token(logits, 1.0, top_p=0.0)


@pytest.mark.parametrize("head", ["diffusion", "ar"])
def test_bf16_pipeline_runs_and_keeps_sampling_state_in_fp32(tokenizer, head):
    """.to(dtype=bf16) moves model and encoders; noise, guidance and scheduler arithmetic stay
    fp32, and the cached text path agrees with the fp32 pipeline on a greedy decode's first token."""
    pipe = make_pipe(tokenizer, head=head)
    ref = pipe.generate_text("a photo of", images=[photo(0)], max_new_tokens=1, output_scores=True)
    pipe.to(dtype=torch.bfloat16)
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    assert pipe.model.rope.inv_freq.dtype == torch.float32  # bf16 angles would drift at long positions
    out = pipe.generate_image("a photo of a red circle", num_steps=2, seed=0, top_k=4, return_latents=True)
    assert out.pixels.dtype == torch.float32 and torch.isfinite(out.pixels).all()
    text = pipe.generate_text("a photo of", images=[photo(0)], max_new_tokens=1, output_scores=True)
    torch.testing.assert_close(text.scores[0], ref.scores[0], atol=0.1, rtol=0.05)


def test_text_never_writes_markers_and_stops_on_either_eos(tokenizer):
    """Padding, <img>, <eoi> and (in text-only generation) <boi> are never sampled as text,
    however much the model prefers them; a tokenizer whose eos differs from the config's
    (Llama 3 Instruct's <|eot_id|>) loads, and either id ends a row."""
    import copy

    pipe = make_pipe(tokenizer, with_siglip=False)
    c = pipe.config
    boost = torch.zeros(c.vocab_size)
    hook = pipe.model.lm_head.register_forward_hook(lambda mod, args, out: out + boost)
    boost[[c.pad_id, c.img_id, c.eoi_id, c.boi_id]] = 30.0
    out = pipe.generate_text(["a photo of", "two"], max_new_tokens=8, temperature=1.0, seed=0)
    assert not {c.pad_id, c.img_id, c.eoi_id, c.boi_id} & {t for row in out.token_ids for t in row}
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(100)  # a second end id, as a chat tokenizer's end-of-turn
    other = tok.eos_token_id
    assert other == 100 != c.eos_id
    pipe = HybridPipeline(pipe.model, tok, vq=pipe.vq)
    boost.zero_()
    boost[other] = 30.0
    out = pipe.generate_text("a photo of", max_new_tokens=8)
    assert out.finish_reasons == ["eos"] and out.token_ids == [[other]] and out.texts == [""]
    hook.remove()


def test_compiled_decoding_equals_eager(tokenizer):
    """pipe.compile() (torch.compile, dynamic shapes) changes speed, not results."""
    pipe = make_pipe(tokenizer, with_siglip=False)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=0, output_scores=True)
    eager = pipe.generate_text(["a photo of", "two"], **kw)
    compiled = pipe.compile().generate_text(["a photo of", "two"], **kw)
    assert compiled.token_ids == eager.token_ids
    for a, b in zip(compiled.scores, eager.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
