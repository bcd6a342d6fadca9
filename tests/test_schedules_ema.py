"""LR schedules (train/schedules.py), the parameter EMA (train/ema.py) and per-block activation
checkpointing (HybridConfig.activation_checkpointing)."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

from hybrid.config import HybridConfig
from hybrid.model import HybridModel
from hybrid.sampling import prefill, prompt_prefix_rows, run_chunk
from hybrid.sequence import SampleBuilder, pack
from train.config import TrainConfig
from train.ema import EMA
from train.schedules import build_lr_lambda, warmup_cosine, warmup_stable_decay
from train.trainer import lr_lambda


# --- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,warmup,min_ratio", [(1000, 50, 0.1), (37, 0, 0.0), (10, 10, 0.5), (200, 3, 1.0)])
def test_warmup_cosine_matches_trainer(steps, warmup, min_ratio):
    ref = lr_lambda(TrainConfig(steps=steps, warmup_steps=warmup, min_lr_ratio=min_ratio))
    ours = warmup_cosine(warmup, steps, min_ratio)
    named = build_lr_lambda("cosine", warmup, steps, min_ratio)
    for s in range(steps + 5):
        assert ours(s) == ref(s) == named(s), s


def test_wsd_shape_and_hand_computed_points():
    total, warmup, r = 100, 10, 0.1
    f = warmup_stable_decay(warmup, total, cooldown_fraction=0.2, min_ratio=r)
    assert [f(s) for s in range(warmup)] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert all(f(s) == 1.0 for s in range(warmup, 80))  # stable until the last 20% of the steps
    cool = [f(s) for s in range(80, total + 1)]
    assert cool[0] == 1.0 and cool[-1] == r  # reaches min_ratio exactly at the end
    assert all(a > b for a, b in zip(cool, cool[1:]))  # strictly decreasing through the cooldown
    assert f(total + 7) == r
    # p = (s - 80) / 20: p = 1/4 -> 1 - 1/2; p = 1/16 is not a step, p = 9/20 -> 1 - sqrt(0.45)
    assert f(85) == pytest.approx(r + (1 - r) * 0.5)
    assert f(89) == pytest.approx(r + (1 - r) * (1 - math.sqrt(0.45)))
    assert f(95) == pytest.approx(r + (1 - r) * (1 - math.sqrt(0.75)))
    # 1 - sqrt drops fast first: after a quarter of the cooldown half the LR is gone (cosine: 15%)
    assert f(85) < 0.6
    assert build_lr_lambda("wsd", warmup, total, r, cooldown_fraction=0.2)(89) == f(89)


def test_wsd_cooldown_never_starts_inside_warmup():
    f = warmup_stable_decay(8, 10, cooldown_fraction=0.5, min_ratio=0.0)
    assert [f(s) for s in range(8)] == pytest.approx([(s + 1) / 8 for s in range(8)])
    assert f(8) == 1.0 and f(9) == pytest.approx(1 - math.sqrt(0.5)) and f(10) == 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'.*cosine.*wsd"):
        build_lr_lambda("linear", 10, 100, 0.1)
    with pytest.raises(ValueError, match="cooldown_fraction"):
        warmup_stable_decay(10, 100, cooldown_fraction=0.0)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(-1, 100, 0.1)
    # a warmup longer than the run only ramps up (what a short debug run with the default warmup does)
    assert [warmup_cosine(5, 3, 0.1)(s) for s in range(3)] == pytest.approx([0.2, 0.4, 0.6])
    with pytest.raises(ValueError, match="min_ratio"):
        warmup_cosine(10, 100, 1.5)


# --- EMA --------------------------------------------------------------------------------------

def tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    m[1].bias.requires_grad_(False)  # frozen parameters are not tracked
    return m


def perturb(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_closed_form_after_k_updates():
    m, d, k = tiny(), 0.9, 5
    ema = EMA(m, decay=d)
    assert set(ema.shadow) == {n for n, p in m.named_parameters() if p.requires_grad}
    history = [{n: p.detach().clone() for n, p in m.named_parameters()}]  # theta_0
    for i in range(1, k + 1):
        perturb(m, i)
        history.append({n: p.detach().clone() for n, p in m.named_parameters()})
        ema.update(m)
    for name, s in ema.shadow.items():  # s_k = d^k theta_0 + (1 - d) sum_i d^(k - i) theta_i
        expected = d**k * history[0][name] + sum((1 - d) * d ** (k - i) * history[i][name] for i in range(1, k + 1))
        torch.testing.assert_close(s, expected, atol=1e-6, rtol=0)
        assert s.dtype == torch.float32


def test_ema_warmup_decay_and_bf16_model_keeps_fp32_shadow():
    m = tiny().to(torch.bfloat16)
    ema = EMA(m, decay=0.999, warmup=True)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    perturb(m, 1)
    ema.update(m)  # d = 0.1: the shadow moves 90% of the way to the new weights
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_ema_state_dict_round_trip_and_swapped():
    m = tiny()
    ema = EMA(m, decay=0.5)
    perturb(m, 1)
    ema.update(m)
    state = ema.state_dict()
    other = EMA(tiny(), decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.5 and other.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    ema.update(m)  # the saved state is a copy, not a view of the live shadow
    assert not torch.equal(state["shadow"]["0.weight"], ema.shadow["0.weight"])

    live = {n: p.detach().clone() for n, p in m.named_parameters()}
    with ema.swapped(m):
        for n, s in ema.shadow.items():
            assert torch.equal(dict(m.named_parameters())[n], s)
        assert not torch.equal(m[0].weight, live["0.weight"])
    for n, p in m.named_parameters():
        assert torch.equal(p, live[n])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(m):  # restored on errors too
        raise RuntimeError("boom")
    assert torch.equal(m[0].weight, live["0.weight"])
    with pytest.raises(ValueError, match="unwrapped"):
        ema.update(nn.Sequential(m))  # a wrapper's prefixed names do not match


def test_ema_and_lr_schedule_checkpointed_without_pickle(tmp_path):
    """The trainer's save_run / resume_run round trip: the EMA and the LR schedule come back from
    run_objects.safetensors; the checkpoint holds no pickle of them (accelerate would load a
    registered object with weights_only=False)."""
    from accelerate import Accelerator

    from train.trainer import resume_run, save_run

    accelerator = Accelerator(cpu=True)
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, opt = accelerator.prepare(m, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda("wsd", 2, 10, 0.1, 0.3))
    ema = EMA(accelerator.unwrap_model(m), decay=0.8, warmup=True)
    objects = {"lr_schedule": sched, "ema": ema}
    for _ in range(3):
        m(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(accelerator.unwrap_model(m))
    saved = {n: s.clone() for n, s in ema.shadow.items()}
    saved_sched = sched.state_dict()
    save_run(accelerator, tmp_path, 3, "arch", {"a": 1}, keep=2, objects=objects)
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    assert not list(ckpt.glob("custom_checkpoint_*")), "run objects must not be pickled"
    perturb(m, 9)
    ema.update(accelerator.unwrap_model(m))
    sched.step()
    assert ema.num_updates == 4 and sched.last_epoch == 4
    assert resume_run(accelerator, tmp_path, "auto", "arch", {"a": 1}, objects) == 3
    assert ema.num_updates == 3 and ema.warmup and ema.decay == 0.8
    for n, s in ema.shadow.items():
        assert torch.equal(s, saved[n])
    assert sched.state_dict() == saved_sched
    # a checkpoint without them is refused by name, not silently resumed with fresh ones
    (ckpt / "run_objects.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lr_schedule, ema"):
        resume_run(accelerator, tmp_path, "auto", "arch", {"a": 1}, objects)


def test_state_io_round_trip_and_refusals(tmp_path):
    from train.state_io import load_objects, save_objects

    class Box:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    state = {"t": torch.arange(6, dtype=torch.int64).view(2, 3), "nested": {"x": torch.ones(2, dtype=torch.bfloat16),
             "ys": [torch.zeros(0), 1.5, None, "s"]}, 3: float("inf"), "f": 0.1 + 0.2, "flag": True}
    save_objects({"box": Box(state)}, tmp_path / "o.safetensors")
    out = Box(None)
    load_objects({"box": out}, tmp_path / "o.safetensors")
    got = out.state
    assert set(got) == {"t", "nested", 3, "f", "flag"}  # the int key stays an int
    assert torch.equal(got["t"], state["t"]) and got["nested"]["x"].dtype == torch.bfloat16
    assert got["nested"]["ys"][0].shape == (0,) and got["nested"]["ys"][1:] == [1.5, None, "s"]
    assert got[3] == math.inf and got["f"] == 0.1 + 0.2 and got["flag"] is True
    with pytest.raises(KeyError, match="other"):
        load_objects({"other": out}, tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="two tensors would be stored"):
        save_objects({"box": Box({"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}})}, tmp_path / "q.safetensors")
    with pytest.raises(TypeError, match="without pickle"):
        save_objects({"box": Box({"fn": print})}, tmp_path / "p.safetensors")


# --- activation checkpointing -----------------------------------------------------------------

SAMPLES = [["a photo of a red circle", Image.new("RGB", (32, 32), (255, 0, 0))],
           ["Here is a picture.", Image.new("RGB", (32, 32), (0, 0, 255)), "And another one below it."]]


def test_activation_checkpointing_config():
    assert HybridConfig.from_preset("debug").activation_checkpointing is False
    with pytest.raises(ValueError, match="activation_checkpointing must be a bool"):
        HybridConfig.from_preset("debug", activation_checkpointing="yes")


def test_activation_checkpointing_same_loss_and_gradients(debug_cfg, tokenizer):
    sb = SampleBuilder(tokenizer, debug_cfg, caption_dropout=0.0)
    batch = pack([sb.tokenize(s) for s in SAMPLES], debug_cfg.max_seq_len, debug_cfg.pad_id)
    n, N, P = batch.gen_index.shape[0], debug_cfg.image_tokens, debug_cfg.patch_dim
    g = torch.Generator().manual_seed(0)
    x, t, target = torch.randn(n, N, P, generator=g), torch.tensor([10.0, 700.0]), torch.randn(n, N, P, generator=g)
    torch.manual_seed(0)
    ref = HybridModel(debug_cfg)
    with torch.no_grad():  # the zero-init diffusion head would give its input layers no gradient
        ref.image_out.weight.normal_(std=0.02)
    results = []
    for flag in (False, True):
        model = HybridModel(HybridConfig.from_dict({**debug_cfg.to_dict(), "activation_checkpointing": flag}))
        model.load_state_dict(ref.state_dict())
        model.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            out = model(batch.input_ids, batch.position_ids, batch.attention_mask("sdpa"), gen_tokens=x,
                        gen_index=batch.gen_index, gen_timesteps=t)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.input_ids[:, 1:].flatten()) \
            + (out.image_pred - target).square().mean()
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((loss.detach(), grads, len(saved)))
    (loss_off, grads_off, saved_off), (loss_on, grads_on, saved_on) = results
    assert saved_on < saved_off / 2, (saved_on, saved_off)  # the blocks' activations really are dropped
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=0)
    assert grads_on.keys() == grads_off.keys()
    for name, g_off in grads_off.items():
        if g_off is None:
            assert grads_on[name] is None, name
            continue
        torch.testing.assert_close(grads_on[name], g_off, atol=1e-6, rtol=0, msg=name)
    assert any(grads_off[f"layers.{i}.attn.q_proj.weight"].abs().sum() > 0 for i in range(debug_cfg.n_layers))


def test_activation_checkpointing_leaves_cached_generation_alone(debug_cfg, tokenizer):
    torch.manual_seed(0)
    ref = HybridModel(debug_cfg).eval()
    on = HybridModel(HybridConfig.from_dict({**debug_cfg.to_dict(), "activation_checkpointing": True}))
    on.load_state_dict(ref.state_dict())
    on.train()  # training mode with gradients on: the cached path must still run plainly
    rows = prompt_prefix_rows([tokenizer.encode("a photo of a red circle", add_special_tokens=False)], debug_cfg,
                              with_uncond=False)
    next_id = torch.tensor([[tokenizer.encode("blue", add_special_tokens=False)[0]]])
    with torch.no_grad():
        cache_ref, out_ref = prefill(ref, rows)
        step_ref = run_chunk(ref, cache_ref, next_id, keep=True)
    cache_on, out_on = prefill(on, rows)
    step_on = run_chunk(on, cache_on, next_id, keep=True)
    assert cache_on.length == cache_ref.length == len(rows[0]) + 1
    for a, b in zip(cache_on.keys + cache_on.values, cache_ref.keys + cache_ref.values):
        torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_on.logits.detach(), out_ref.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(step_on.logits.detach(), step_ref.logits, atol=1e-6, rtol=0)


# --- precision by device ----------------------------------------------------------------------

def test_mixed_precision_is_picked_by_config_then_launcher_then_device(monkeypatch):
    from train.trainer import pick_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_mixed_precision(None) == "no"  # the CPU: fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_mixed_precision(None) == "bf16"  # a GPU with bf16: autocast
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_mixed_precision(None) == "no"  # an old GPU: fp32, not fp16 without being asked
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert pick_mixed_precision(None) == "fp16"  # the accelerate config's choice
    assert pick_mixed_precision("no") == "no"  # the training config's, above all
