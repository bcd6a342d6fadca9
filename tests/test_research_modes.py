"""The research configurations of issue 8: sparse MoE, iRoPE, late fusion, Chameleon ("tokens").

Comparative throughout: MoE with one expert and k = 1 equals the dense FFN; the dispatch equals a
dense all-experts reference; the load-balancing loss equals transformers' Mixtral function; a
NoPE layer with temperature tuning equals transformers' Llama 4 attention; Chameleon's loss is
one LM cross-entropy over the token sequence it describes; every mode's cached generation equals
a full recompute (the same checks ``test_pipeline.py`` runs on the default modes).
"""

import pytest
import torch
from PIL import Image
from test_pipeline import ATOL, full_text_logits, make_pipe, photo

from hybrid.config import HybridConfig
from hybrid.losses import hybrid_loss
from hybrid.model import Attention, HybridModel, attn_temperature
from hybrid.moe import IMAGE, PAD, TEXT, MoEFeedForward, router_losses
from hybrid.sampling import commit_image, image_prompt_rows, prefill, prompt_prefix_rows, sample_codes
from hybrid.sequence import IGNORE, ImageSegment, SampleBuilder, bidirectional_kinds, pack
from hybrid.tokenizer import special_token_ids
from encoders.latents import PixelCodec
from schedulers import get_scheduler

SAMPLES = [["a photo of a red circle", Image.new("RGB", (32, 32), (255, 0, 0))],
           ["Here is a picture.", Image.new("RGB", (32, 32), (0, 0, 255)), "And another one below it."]]


def batch_for(cfg, tokenizer, samples):
    sb = SampleBuilder(tokenizer, cfg, caption_dropout=0.0)
    return pack([sb.tokenize(s) for s in samples], cfg.max_seq_len, cfg.pad_id,
                bidirectional=bidirectional_kinds(cfg))


def forward(model, batch, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch.gen_index.shape[0], cfg.image_tokens, cfg.patch_dim, generator=g)
    t = torch.rand(batch.gen_index.shape[0], generator=g) * 1000
    return model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_tokens=x,
                 gen_index=batch.gen_index, gen_timesteps=t)


def experts_module(dim=16, hidden=32, n=4, k=2, **kw) -> MoEFeedForward:
    from hybrid.model import FeedForward

    torch.manual_seed(0)
    return MoEFeedForward(dim, n, k, lambda: FeedForward(dim, hidden), **kw)


# --------------------------------------------------------------------------- MoE
@torch.no_grad()
def test_moe_with_one_expert_and_top1_equals_the_dense_model(debug_cfg, tokenizer):
    dense = HybridModel(debug_cfg).eval()
    torch.nn.init.normal_(dense.image_out.weight, std=0.02)
    moe_cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "moe_experts": 1, "moe_top_k": 1})
    moe = HybridModel(moe_cfg).eval()
    state = {k.replace(".ffn.", ".ffn.experts.0."): v for k, v in dense.state_dict().items()}
    state.update({k: v for k, v in moe.state_dict().items() if "router" in k})  # its own (random) router
    moe.load_state_dict(state, strict=True)
    batch = batch_for(debug_cfg, tokenizer, SAMPLES)
    a, b = forward(dense, batch), forward(moe, batch)
    real = batch.document_ids >= 0  # padding is not dispatched to experts (no position reads it)
    torch.testing.assert_close(b.logits[real], a.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.image_pred, a.image_pred, atol=1e-5, rtol=0)
    assert a.routers is None and len(b.routers) == debug_cfg.n_layers


@torch.no_grad()
@pytest.mark.parametrize("routing", ["agnostic", "aware"])
def test_moe_dispatch_equals_a_dense_all_experts_reference(routing):
    layer = experts_module(n=4, k=2, routing=routing, image_experts=2)
    torch.manual_seed(1)
    x = torch.randn(2, 9, 16)
    modality = torch.tensor([[TEXT] * 4 + [IMAGE] * 5, [IMAGE] * 3 + [TEXT] * 4 + [PAD] * 2])
    out, r = layer(x, modality)
    # reference: every expert on every token, combined with the top-k gates of the allowed experts
    flat, mod = x.reshape(-1, 16), modality.reshape(-1)
    ys = torch.stack([e(flat) for e in layer.experts])  # (E, T, D)
    logits = layer.router(flat)
    if routing == "aware":  # image experts are the last two
        allowed = (torch.arange(4) >= 2)[None, :] == (mod == IMAGE)[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
    gate, idx = logits.softmax(-1).topk(2, dim=-1)
    gate = gate / gate.sum(-1, keepdim=True)
    ref = sum(gate[:, j, None] * ys[idx[:, j], torch.arange(flat.shape[0])] for j in range(2))
    ref[mod == PAD] = 0  # padding is not dispatched
    torch.testing.assert_close(out.reshape(-1, 16), ref, atol=1e-6, rtol=0)
    if routing == "aware":
        assert (r.experts[mod == IMAGE] >= 2).all() and (r.experts[mod == TEXT] < 2).all()


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_matches_transformers_mixtral(k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = experts_module(n=4, k=k)
    torch.manual_seed(2)
    x = torch.randn(3, 7, 16) * 3
    modality = torch.full((3, 7), TEXT)
    modality[2, 5:] = PAD
    _, r = layer(x, modality)
    balance, z = router_losses([r])
    # transformers sums the k assignments where we average them: theirs = k x ours
    theirs = load_balancing_loss_func((r.logits,), 4, k, attention_mask=(modality != PAD).long())
    torch.testing.assert_close(balance * k, theirs, atol=1e-6, rtol=0)
    real = r.logits[modality.reshape(-1) != PAD]
    torch.testing.assert_close(z, torch.logsumexp(real, -1).pow(2).mean())
    # a router that sends every token to one expert with certainty scores the worst balance, E
    r.logits = torch.full_like(r.logits, -30.0)
    r.logits[:, 0] = 30.0
    r.experts = torch.zeros_like(r.experts) if k == 1 else torch.tensor([[0, 1]]).expand_as(r.experts)
    worst, _ = router_losses([r])
    assert worst.item() == pytest.approx(4.0 / k, rel=1e-4)


@torch.no_grad()
def test_capacity_drops_the_latest_assignments_and_keeps_the_rest():
    dropless = experts_module(n=2, k=1)
    capped = experts_module(n=2, k=1, capacity_factor=0.5)  # capacity ceil(0.5 * 20 / 2) = 5 per expert
    capped.load_state_dict(dropless.state_dict())
    torch.manual_seed(3)
    x = torch.randn(1, 20, 16)
    modality = torch.full((1, 20), TEXT)
    full, r = dropless(x, modality)
    out, rc = capped(x, modality)
    expert = r.experts[:, 0]
    kept = torch.zeros(20, dtype=torch.bool)
    for e in range(2):
        kept[(expert == e).nonzero()[:5, 0]] = True  # the first 5 tokens of each expert, in order
    torch.testing.assert_close(out[0, kept], full[0, kept], atol=1e-6, rtol=0)  # matmul rounding by batch size
    assert (out[0, ~kept] == 0).all()
    assert int(rc.dropped) == int((~kept).sum()) == sum(max(0, int((expert == e).sum()) - 5) for e in range(2))
    capped.eval()  # evaluation and generation are dropless: a token's output never depends on the batch
    out, rc = capped(x, modality)
    assert int(rc.dropped) == 0
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)


@torch.no_grad()
def test_aware_capacity_is_shared_within_each_modality():
    """With aware routing an image expert serves image tokens only: its capacity is factor x image
    tokens x k / image experts. 15 image and 5 text tokens, 2 + 2 experts, factor 1: 8 per image
    expert, 3 per text expert; one image expert taking all 15 keeps 8."""
    layer = experts_module(n=4, k=1, routing="aware", image_experts=2, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # image expert 2 wins every image token with x[..., 0] > 0
        layer.router.weight[0, 0] = 10.0  # text expert 0 wins every text token likewise
    x = torch.randn(1, 20, 16)
    x[..., 0] = x[..., 0].abs() + 1
    modality = torch.tensor([[IMAGE] * 15 + [TEXT] * 5])
    _, r = layer(x, modality)
    assert int(r.dropped) == (15 - 8) + (5 - 3)


def test_moe_objective_adds_its_weighted_router_losses_and_trains_the_router(debug_cfg, tokenizer):
    cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "moe_experts": 4, "moe_top_k": 1})
    model = HybridModel(cfg)
    batch = batch_for(cfg, tokenizer, SAMPLES)
    kw = dict(scheduler=get_scheduler("flow"), codec=PixelCodec(), patch_size=cfg.patch_size)
    plain = hybrid_loss(model, batch, generator=torch.Generator().manual_seed(0), **kw)
    weighted = hybrid_loss(model, batch, generator=torch.Generator().manual_seed(0), moe_aux_weight=0.3,
                           moe_z_weight=0.2, **kw)
    assert torch.isfinite(plain.moe_balance) and plain.moe_balance > 0
    torch.testing.assert_close(weighted.total, plain.total + 0.3 * plain.moe_balance + 0.2 * plain.moe_z)
    plain.total.backward()  # top-1 gates are the router's probabilities: the task loss reaches the router
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_moe_config_errors():
    with pytest.raises(ValueError, match="moe_top_k"):
        HybridConfig.from_preset("debug", moe_experts=2, moe_top_k=3)
    with pytest.raises(ValueError, match="moe_layers"):
        HybridConfig.from_preset("debug", moe_experts=2, moe_layers=[5])
    with pytest.raises(ValueError, match="moe_image_experts"):
        HybridConfig.from_preset("debug", moe_experts=2, moe_routing="aware", moe_image_experts=2)
    cfg = HybridConfig.from_preset("debug", n_layers=4, moe_experts=2, moe_layers=[1, 3])
    kinds = [type(b.ffn).__name__ for b in HybridModel(cfg).layers]
    assert kinds == ["FeedForward", "MoEFeedForward", "FeedForward", "MoEFeedForward"]


# --------------------------------------------------------------------------- iRoPE
def test_nope_layers_follow_llama4s_interval():
    from transformers import Llama4TextConfig

    for every in (2, 4):
        hf = Llama4TextConfig(num_hidden_layers=8, no_rope_layer_interval=every)
        model = HybridModel(HybridConfig.from_preset("debug", n_layers=8, nope_every=every))
        assert [int(b.attn.use_rope) for b in model.layers] == list(hf.no_rope_layers)


@torch.no_grad()
def test_nope_attention_with_temperature_equals_transformers_llama4():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextAttention

    hf_cfg = Llama4TextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_hidden_layers=2, no_rope_layer_interval=2, attn_temperature_tuning=True,
                              floor_scale=4, attn_scale=0.3, use_qk_norm=False, attention_bias=False)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = Llama4TextAttention(hf_cfg, layer_idx=1).eval()  # layer 1 of interval 2: no RoPE
    assert not theirs.use_rope
    ours = Attention(32, 4, 2, qk_norm=False, bias=False, eps=1e-5, use_rope=False, temperature=(4.0, 0.3))
    ours.load_state_dict(theirs.state_dict())
    T = 23  # positions past floor_scale, where the temperature grows
    x = torch.randn(2, T, 32)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    additive = torch.zeros(T, T).masked_fill(~causal, float("-inf"))[None, None]
    ref, _ = theirs(x, None, additive)
    pos = torch.arange(T).expand(2, T)
    got = ours(x, None, None, causal[None, None].expand(2, 1, T, T), position_ids=pos)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert attn_temperature(pos, 4.0, 0.3)[0, 2] == 1.0 and attn_temperature(pos, 4.0, 0.3)[0, 22] > 1.5
    plain = Attention(32, 4, 2, qk_norm=False, bias=False, eps=1e-5, use_rope=False)
    plain.load_state_dict(theirs.state_dict())
    assert not torch.allclose(plain(x, None, None, causal[None, None].expand(2, 1, T, T)), ref, atol=1e-3)


@torch.no_grad()
def test_a_model_without_rope_ignores_positions_and_one_with_it_does_not(debug_cfg, tokenizer):
    batch = batch_for(debug_cfg, tokenizer, [["a photo of a red circle"]])
    shuffled = batch.position_ids[:, torch.randperm(batch.position_ids.shape[1], generator=torch.Generator().manual_seed(0))]
    for every, invariant in ((1, True), (2, False)):
        model = HybridModel(HybridConfig.from_dict({**debug_cfg.to_dict(), "nope_every": every})).eval()
        a = model(batch.input_ids, batch.position_ids, batch.attention_mask()).logits
        b = model(batch.input_ids, shuffled, batch.attention_mask()).logits
        assert torch.allclose(a, b, atol=1e-5) == invariant


# --------------------------------------------------------------------------- late fusion
@torch.no_grad()
def test_late_fusion_keeps_the_parameter_count_and_reads_each_image_alone(debug_cfg, tokenizer):
    early = HybridModel(debug_cfg)
    late = HybridModel(HybridConfig.from_dict({**debug_cfg.to_dict(), "late_fusion_layers": 1})).eval()
    assert late.num_parameters() == early.num_parameters()
    assert (len(late.vision_layers), len(late.layers)) == (1, debug_cfg.n_layers - 1)
    batch = batch_for(late.config, tokenizer, SAMPLES)
    D, BT = debug_cfg.dim, batch.input_ids.numel()
    h = torch.randn(BT, D)
    other = torch.randn(BT, D)  # different text around the same image embeddings
    spans = batch.gen_index.reshape(-1)
    other[spans] = h[spans]
    a, b = late.encode_spans(h, batch.gen_index, None), late.encode_spans(other, batch.gen_index, None)
    torch.testing.assert_close(a[spans], b[spans], atol=0, rtol=0)  # the vision encoder sees its span only
    assert not torch.allclose(a[spans], h[spans])  # and it did change the image rows
    outside = torch.ones(BT, dtype=torch.bool)
    outside[spans] = False
    assert torch.equal(a[outside], h[outside])
    with pytest.raises(ValueError, match="late_fusion_layers needs image_head='diffusion'"):
        HybridConfig.from_preset("debug", late_fusion_layers=1, image_head="ar", image_codec="vq", patch_size=1)


def test_late_fusion_runs_its_vision_blocks_in_every_training_step(debug_cfg, tokenizer):
    """ZeRO-3 gathers a block's parameters collectively each time it runs: a training step must run
    the vision blocks the same number of times whatever the batch holds (twice: generated and input
    images, on nothing if need be); evaluation skips the empty passes."""
    cfg = HybridConfig.from_dict({**debug_cfg.to_dict(), "late_fusion_layers": 1})
    model = HybridModel(cfg)
    calls = []
    model.vision_layers[0].register_forward_hook(lambda *a: calls.append(1))
    kw = dict(scheduler=get_scheduler("flow"), codec=PixelCodec(), patch_size=cfg.patch_size)
    for samples in (SAMPLES, [["just some text here"]]):
        calls.clear()
        hybrid_loss(model, batch_for(cfg, tokenizer, samples), generator=torch.Generator().manual_seed(0), **kw)
        assert len(calls) == 2, samples
    calls.clear()
    with torch.no_grad():
        text = batch_for(cfg, tokenizer, [["just some text here"]])
        model(text.input_ids, text.position_ids, text.attention_mask())
    assert not calls


# --------------------------------------------------------------------------- Chameleon ("tokens")
def test_tokens_loss_is_one_lm_cross_entropy_over_the_token_sequence(tokenizer):
    """Chameleon's objective: write every image's codes into the sequence as vocabulary ids and
    train one next-token cross-entropy on the text and code targets; hybrid_loss equals that
    computed by hand on a plain LM forward (plus the z-loss)."""
    pipe = make_pipe(tokenizer, head="tokens", with_siglip=False)
    model, vq, cfg = pipe.model, pipe.vq, pipe.config
    samples = [["a photo of a red circle", photo(0)],
               [ImageSegment(photo(1), "und"),
                "Describe the image.", " a blue square"]]
    batch = batch_for(cfg, tokenizer, samples)
    loss = hybrid_loss(model, batch, None, vq, 1, image_head="tokens", z_loss_weight=cfg.z_loss_weight)
    ids, targets = batch.input_ids.clone().view(-1), batch.targets.clone().view(-1)
    gen = vq.encode_codes(batch.gen_images).flatten(1) + cfg.image_token_offset
    und = vq.encode_codes(batch.und_images).flatten(1) + cfg.image_token_offset
    ids[batch.gen_index.reshape(-1)] = gen.reshape(-1)
    ids[batch.und_index.reshape(-1)] = und.reshape(-1)
    targets[batch.gen_index.reshape(-1) - 1] = gen.reshape(-1)  # the position before a code predicts it
    logits = model(ids.view_as(batch.input_ids), batch.position_ids, batch.attention_mask()).logits.view(-1, cfg.vocab_size)
    keep = targets != IGNORE
    ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    z = torch.logsumexp(logits[keep], -1).pow(2).mean()
    torch.testing.assert_close(loss.total, ce + 1e-5 * z, atol=1e-5, rtol=0)
    assert loss.image_tokens == gen.numel() and cfg.z_loss_weight == 1e-5


@torch.no_grad()
def test_tokens_mode_code_logits_and_text_after_the_image_equal_full_recompute(tokenizer):
    pipe = make_pipe(tokenizer, head="tokens", with_siglip=False)
    c, model = pipe.config, pipe.model
    seen = {}
    gen = pipe.generate_image(["a photo of a red circle", "blue"], guidance_scale=2.0, seed=0, top_k=8,
                              callback=lambda i, logits: seen.__setitem__(i, logits.clone()))
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in ["a photo of a red circle", "blue"]]
    rows = image_prompt_rows(ids, c, with_uncond=True)
    batch = pack(rows, max(len(r) for r in rows), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    codes = gen.codes.flatten(1).repeat(2, 1)
    ref = model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_index=batch.gen_index,
                gen_codes=codes).code_logits  # (4, N, K): the LM head's code rows
    full = model.lm_head(model.norm(model(batch.input_ids, batch.position_ids, batch.attention_mask(),
                                          gen_index=batch.gen_index, gen_codes=codes).hidden))
    torch.testing.assert_close(ref, full.view(-1, c.vocab_size)[batch.gen_index.reshape(-1) - 1][:, c.image_token_offset:]
                               .view_as(ref), atol=1e-5, rtol=0)
    for i in range(c.image_tokens):
        torch.testing.assert_close(seen[i], ref[:, i], atol=ATOL, rtol=0)
    # the image goes into the cache as codes, then <eoi>: the next text logits equal a full forward
    cache, out = prefill(model, prompt_prefix_rows(ids[:1], c, with_uncond=False))
    codes = sample_codes(model, cache, out.hidden[:, -1], 1, 1.0, generator=torch.Generator().manual_seed(0))
    after = commit_image(model, cache, codes=codes[:, -1:])
    row = image_prompt_rows(ids[:1], c, with_uncond=False)[0]
    row = type(row)(row.input_ids + [c.eoi_id], row.targets + [-100], row.spans, row.images)
    b1 = pack([row], len(row), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    ref = model(b1.input_ids, b1.position_ids, b1.attention_mask(), gen_index=b1.gen_index, gen_codes=codes)
    torch.testing.assert_close(after.logits[0], ref.logits[0, -1], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- every mode, cached
VARIANTS = {
    "moe": dict(moe_experts=4, moe_top_k=2),
    "moe_aware_capacity": dict(moe_experts=4, moe_routing="aware", moe_capacity_factor=1.0),
    "late_fusion": dict(late_fusion_layers=1),
    "irope": dict(nope_every=2, attn_temperature_tuning=True, attn_floor_scale=4.0),
    "adaln": dict(time_conditioning="adaln"),
    "adaln_pooled_text": dict(time_conditioning="adaln", pooled_text_conditioning=True),
}


@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_mode_generates_text_and_images_as_a_full_recompute_does(tokenizer, variant):
    from hybrid.sampling import denoise

    pipe = make_pipe(tokenizer, with_siglip=True, **VARIANTS[variant])
    c, model = pipe.config, pipe.model
    for name, p in model.named_parameters():  # zero-initialised heads and adaLN: make them count
        if p.dim() >= 2 and not p.any():
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    assert not model.training  # generation is dropless: capacity (moe_aware_capacity) applies in training only
    prompts = ["a photo of a red circle", "two"]
    images = [[photo(0)], [photo(1), photo(2)]]
    out = pipe.generate_text(prompts, images=images, max_new_tokens=4, temperature=1.0, seed=0, output_scores=True)
    for b, p in enumerate(prompts):
        row = pipe.prompt_row(p, images[b])
        for s in range(len(out.token_ids[b])):
            torch.testing.assert_close(out.scores[s][b], full_text_logits(pipe, row, out.token_ids[b][:s]),
                                       atol=ATOL, rtol=0)
    seen = []
    pipe.generate_image(prompts, num_steps=3, guidance_scale=3.0, seed=0,
                        callback=lambda i, t, x, pred: seen.append((t, x.clone(), pred.clone())))
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    rows = image_prompt_rows(ids, c, with_uncond=True)
    batch = pack(rows, max(len(r) for r in rows), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    for t, x, pred in seen:
        ref = model(batch.input_ids, batch.position_ids, batch.attention_mask(), gen_tokens=x,
                    gen_index=batch.gen_index, gen_timesteps=torch.full((4,), float(t))).image_pred
        torch.testing.assert_close(pred, ref, atol=ATOL, rtol=0)
    # and the text after a committed image
    cache, o = prefill(model, prompt_prefix_rows(ids[:1], c, with_uncond=False))
    x = denoise(model, cache, 1, pipe.scheduler, 2, 1.0, torch.Generator().manual_seed(0))
    after = commit_image(model, cache, tokens=x)
    row = image_prompt_rows(ids[:1], c, with_uncond=False)[0]
    row = type(row)(row.input_ids + [c.eoi_id], row.targets + [-100], row.spans, row.images)
    b1 = pack([row], len(row), c.pad_id, packing=False, bidirectional=bidirectional_kinds(c))
    ref = model(b1.input_ids, b1.position_ids, b1.attention_mask(), gen_tokens=x, gen_index=b1.gen_index,
                gen_timesteps=torch.zeros(1))
    torch.testing.assert_close(after.logits[0], ref.logits[0, -1], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- routing report
@pytest.mark.parametrize("routing", ["agnostic", "aware"])
def test_routing_report_counts_every_assignment_and_sees_aware_experts_specialise(tokenizer, tmp_path, routing):
    from eval.moe_routing import main, report, shapes_batches

    pipe = make_pipe(tokenizer, moe_experts=4, moe_top_k=2, moe_routing=routing, moe_image_experts=2)
    pipe.save_pretrained(tmp_path / "model")
    s = report(tmp_path / "model", tmp_path / "out", samples=12, batch_size=6, mix_understand=0.5)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"routing.json", "routing.md", "routing.png"}
    # every real position of the data, k assignments each, in every layer
    batches = list(shapes_batches(pipe, 12, 6, 0.5, 1234))
    img = sum(int((b.input_ids == pipe.config.img_id).sum()) for b in batches)
    txt = sum(int(((b.input_ids != pipe.config.img_id) & (b.input_ids != pipe.config.pad_id)).sum()) for b in batches)
    for layer in s["layers"]:
        assert sum(e["tokens"] for e in layer["experts"]) == 2 * (img + txt)
        assert sum(e["load"] for e in layer["experts"]) == pytest.approx(1.0)
    assert s["data_image_share"] == pytest.approx(img / (img + txt))
    if routing == "aware":  # text experts 0-1 see only text, image experts 2-3 only images
        for layer in s["layers"]:
            assert [e["image_frac"] for e in layer["experts"]] == [0.0, 0.0, 1.0, 1.0]
            assert layer["specialisation"] == pytest.approx(1.0)
    else:
        assert all(0.0 <= layer["specialisation"] < 1.0 for layer in s["layers"])
    assert main([str(tmp_path / "model"), "--out", str(tmp_path / "again"), "--samples", "4"]) == 0
    dense = make_pipe(tokenizer)
    dense.save_pretrained(tmp_path / "dense")
    assert main([str(tmp_path / "dense"), "--out", str(tmp_path / "x"), "--samples", "4"]) == 2  # a clear error


# --------------------------------------------------------------------------- every mode trains
from test_train import DEBUG, visual_components  # noqa: E402,F401  (the fixture: a tiny VQ and SigLIP)

TRAINED_MODES = {
    "moe": ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_capacity_factor=1.25"],
    "moe_aware": ["model.moe_experts=4", "model.moe_routing=aware", "model.moe_layers=[1]"],
    "late_fusion": ["model.late_fusion_layers=1"],
    "irope": ["model.nope_every=2", "model.attn_temperature_tuning=true"],
    "adaln": ["model.time_conditioning=adaln", "model.pooled_text_conditioning=true"],
    "chameleon": ["model.image_head=tokens", "model.patch_size=1", "model.und_bidirectional=false"],
}


@pytest.mark.parametrize("mode", sorted(TRAINED_MODES))
def test_each_mode_trains_and_samples_on_the_debug_config(tmp_path, visual_components, mode):
    import json

    from hybrid.pipeline import HybridPipeline
    from train.__main__ import main

    tokens = mode == "chameleon"
    out = tmp_path / mode
    args = [DEBUG, f"output_dir={out}", "steps=4", "log_every=2", "save_every=4", "sample_every=4", "num_samples=2",
            "und_eval=4", "mix_understand=0.4", "model.image_codec=vq", "model.max_seq_len=256",
            f"vq_path={visual_components / 'vq'}", *TRAINED_MODES[mode]]
    if not tokens:  # Chameleon reads input images as codes: no SigLIP
        args += ["model.patch_size=2", f"siglip_path={visual_components / 'siglip'}"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert losses and all(r["loss"] == r["loss"] for r in losses)  # finite, logged
    if mode.startswith("moe"):
        assert all(0 < r["moe_balance"] < 4 and r["moe_router_z"] >= 0 for r in losses)  # logged, finite
    assert any("answer_accuracy_heldout" in r for r in records)  # multiple choice scored through its path
    pipe = HybridPipeline.from_pretrained(out / "final")
    c = pipe.config
    if tokens:
        assert pipe.siglip is None and c.vocab_size == len(pipe.tokenizer) + c.codebook_size
        assert c.z_loss_weight == 1e-5 and c.qk_norm
    img = pipe.generate_image("a photo of a red circle", num_steps=2, seed=0)
    assert img.images[0].size == (32, 32)
    text = pipe.generate_text("Describe the image.", images=[img.images[0]], max_new_tokens=4, seed=0)
    assert len(text.token_ids[0]) >= 1


@pytest.mark.parametrize("head", ["diffusion", "tokens"])
def test_understanding_report_reads_images_through_the_models_own_path(tokenizer, tmp_path, head):
    """train.sample_eval --understanding: SigLIP features, or for Chameleon the codes; the
    shuffled-image control pairs each text with another sample's image either way."""
    from train.sample_eval import understanding_report

    pipe = make_pipe(tokenizer, head=head, with_siglip=head == "diffusion")
    if head == "tokens":  # loud code embeddings: at init std 0.02 the image moves the loss by < 1e-4
        pipe.model.embed_tokens.weight.data[pipe.config.image_token_offset:] *= 50
    pipe.save_pretrained(tmp_path / "m")
    r = understanding_report(tmp_path / "m", n=4, style="text")
    for kind in ("caption", "answer"):
        own, other = r[f"{kind}_text_loss_train/own_image"], r[f"{kind}_text_loss_train/shuffled_images"]
        assert own > 0 and other > 0 and own != other  # the image is read: another one changes the loss
    assert 0.0 <= r["answer_accuracy_heldout/all"] <= 1.0
