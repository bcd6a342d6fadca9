"""Contract suite run over every registered scheduler, plus parity with diffusers used directly.

CPU, fp32 unless a test says why not; runs in a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from schedulers import SCHEDULERS, DDPM, RectifiedFlow, Scheduler, get_scheduler, scheduler_from_dict

NAMES = sorted(SCHEDULERS)
SHAPES = [(3, 16, 12), (3, 4, 8, 8)]  # (n, N, P) patch tokens and (n, C, H, W) latents


@pytest.fixture(params=NAMES)
def sched(request) -> Scheduler:
    return get_scheduler(request.param)


def _data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def _oracle(s: Scheduler, x0, t, x_t):
    """The perfect predictor for a single data point x0, derived through the contract only:
    add_noise is linear, x_t = a x0 + b noise, so recover the noise and ask for the target."""
    t = torch.full((x0.shape[0],), float(t))
    a = s.add_noise(torch.ones_like(x0), torch.zeros_like(x0), t)
    b = s.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t)
    return s.training_target(x0, (x_t - a * x0) / b, t)


def _toy_model(x, t):
    """A deterministic stand-in for a network, so loops differ by scheduler only."""
    return torch.tanh(x) * (1 + float(t) / 1000)


def _loop(s, x, steps, gen=None):
    """Sampling loop with the toy model; works for ours and for diffusers' schedulers alike."""
    s.set_timesteps(steps)
    for t in s.timesteps:
        out = s.step(_toy_model(x, t), t, x, generator=gen)
        x = getattr(out, "prev_sample", out)
    return x


# ---- contract -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_dtypes_preserved(sched, shape):
    x0, noise = _data(shape)
    t = sched.sample_timesteps(shape[0])
    for out in (sched.add_noise(x0, noise, t), sched.training_target(x0, noise, t),
                sched.predict_x0(noise, t, x0)):
        assert out.shape == x0.shape and out.dtype == torch.float32
    x = sched.init_noise(shape, generator=torch.Generator().manual_seed(0))
    assert x.shape == shape and x.dtype == torch.float32
    sched.set_timesteps(4)
    assert sched.step(noise, sched.timesteps[0], x).shape == shape
    # float64 goes through unchanged too (diffusers' flow step computes in fp32 internally)
    assert sched.step(noise.double(), sched.timesteps[1], x.double()).dtype == torch.float64


def test_sample_timesteps_range_and_reproducible(sched):
    t = sched.sample_timesteps(4096, generator=torch.Generator().manual_seed(1))
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= sched.num_train_timesteps
    again = sched.sample_timesteps(4096, generator=torch.Generator().manual_seed(1))
    other = sched.sample_timesteps(4096, generator=torch.Generator().manual_seed(2))
    assert torch.equal(t, again) and not torch.equal(t, other)
    assert t.unique().numel() > 100  # covers the range, not a handful of values


def test_add_noise_endpoints(sched):
    x0, noise = _data((4, 64, 16))
    n, last = x0.shape[0], sched.num_train_timesteps - 1
    assert _corr(sched.add_noise(x0, noise, torch.zeros(n)), x0) > 0.999
    noisy = sched.add_noise(x0, noise, torch.full((n,), float(last)))
    assert _corr(noisy, noise) > 0.99 and abs(_corr(noisy, x0)) < 0.05


@pytest.mark.parametrize("shape", SHAPES)
def test_target_and_predict_x0_are_consistent(sched, shape):
    # fp64: at DDPM's noisiest steps predict_x0 divides by sqrt(abar) ~ 5e-5, so fp32 rounding
    # alone would exceed 1e-4 there; this test checks the algebra, the oracle test checks fp32.
    x0, noise = _data(shape, dtype=torch.float64)
    n = shape[0]
    for t in (sched.sample_timesteps(n), torch.zeros(n), torch.full((n,), sched.num_train_timesteps - 1.0)):
        x_t = sched.add_noise(x0, noise, t)
        x0_hat = sched.predict_x0(sched.training_target(x0, noise, t), t, x_t)
        torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_oracle_sampling_recovers_x0(sched, steps):
    x0, _ = _data((2, 16, 8))
    gen = torch.Generator().manual_seed(0)
    timesteps = sched.set_timesteps(steps)
    assert len(timesteps) == steps and bool((timesteps[1:] < timesteps[:-1]).all())  # noisiest first
    x = sched.init_noise(x0.shape, generator=gen)
    for t in timesteps:
        x = sched.step(_oracle(sched, x0, t, x), t, x, generator=gen)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)  # measured: ~1e-7


def test_batch_step_equals_row_by_row(sched):
    # Row i uses generator i in both runs (a list of generators = one stream per row).
    x, _ = _data((3, 8, 4))
    batch = _loop(sched, x, 6, [torch.Generator().manual_seed(i) for i in range(3)])
    for i in range(3):
        row = _loop(scheduler_from_dict(sched.to_dict()), x[i:i + 1], 6, torch.Generator().manual_seed(i))
        torch.testing.assert_close(batch[i:i + 1], row, atol=1e-6, rtol=0)


def test_step_depends_only_on_its_arguments(sched):
    # CFG done as two calls per timestep must not advance any hidden state.
    x, out = _data((2, 8, 4))
    sched.set_timesteps(5)
    t = sched.timesteps[1]
    first = sched.step(out, t, x, generator=torch.Generator().manual_seed(0))
    second = sched.step(out, t, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, second)


def test_to_dict_round_trip(sched):
    d = json.loads(json.dumps(sched.to_dict()))
    assert d["name"] == sched.name
    twin = scheduler_from_dict(d)
    assert type(twin) is type(sched) and twin.to_dict() == sched.to_dict()
    x0, noise = _data((2, 8, 4))
    t = sched.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(twin.add_noise(x0, noise, t), sched.add_noise(x0, noise, t))
    assert torch.equal(_loop(twin, x0, 5, torch.Generator().manual_seed(3)),
                       _loop(sched, x0, 5, torch.Generator().manual_seed(3)))


def test_errors(sched):
    x, out = _data((2, 4))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(out, 500.0, x)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the schedule"):
        sched.step(out, 123.5, x)
    with pytest.raises(ValueError, match="one timestep"):
        sched.step(out, torch.tensor([sched.timesteps[0], sched.timesteps[1]]), x)
    with pytest.raises(ValueError, match="timesteps must be"):
        sched.add_noise(x, out, torch.zeros(3))
    with pytest.raises(TypeError, match="bogus"):
        get_scheduler(sched.name, bogus=1)
    with pytest.raises(ValueError, match="not"):
        type(sched).from_dict({"name": "other"})
    with pytest.raises(ValueError, match="ddpm.*flow"):
        get_scheduler("edm")
    with pytest.raises(ValueError, match="name"):
        scheduler_from_dict({"shift": 3.0})


# ---- DDPM: parity with diffusers used directly ----------------------------------------------
def _diffusers_ddpm(**kw):
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, **kw)


def test_ddpm_add_noise_matches_diffusers():
    x0, noise = _data((4, 16, 12))
    t = DDPM().sample_timesteps(4, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_ddpm().add_noise(x0, noise, t.long())
    assert torch.equal(DDPM().add_noise(x0, noise, t), ref)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_ddpm_sampling_loop_matches_diffusers(spacing):
    x, _ = _data((2, 8, 4))
    ours = _loop(DDPM(timestep_spacing=spacing), x, 25, torch.Generator().manual_seed(0))
    ref = _loop(_diffusers_ddpm(timestep_spacing=spacing), x, 25, torch.Generator().manual_seed(0))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("steps", [25, 50])
def test_ddpm_inference_timesteps(steps):
    ts = DDPM().set_timesteps(steps)
    assert ts.dtype == torch.float32 and len(ts) == steps
    assert ts[0] == 1000 - 1000 // steps and torch.equal(ts, ts.round())  # leading (the default)
    assert DDPM(timestep_spacing="trailing").set_timesteps(steps)[0] == 999


def _oracle_stds(s: DDPM, x0: torch.Tensor, error: float, steps: int = 25) -> tuple[torch.Tensor, list[float]]:
    """Sample with a model that knows x0 and predicts epsilon with an absolute error ``error``;
    returns the final sample and the std of the sample after every step."""
    g = torch.Generator().manual_seed(0)
    abar = s._ddpm.alphas_cumprod
    x = torch.randn(x0.shape, generator=g)
    stds = []
    s.set_timesteps(steps)
    for t in s.timesteps:
        a = abar[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = s.step(eps + error * torch.randn(x0.shape, generator=g), t, x, generator=g)
        stds.append(x.std().item())
    return x, stds


def test_ddpm_default_sampling_stays_on_the_data_scale():
    """With an epsilon model that errs by 0.01, every intermediate sample of the default schedule
    keeps unit scale (what a trained model has seen). The "trailing" spacing does not: at t=999
    sqrt(abar) ~ 5e-5 turns the error into an x0 estimate ~2e4x off, and the first step lands
    at ~13x the data's scale. An oracle recovers from that (it knows x0); a trained VQ-latent
    model did not: its samples were coloured noise."""
    x0 = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1))  # unit-variance latents
    exact, _ = _oracle_stds(DDPM(), x0, 0.0)
    torch.testing.assert_close(exact, x0, atol=1e-4, rtol=0)
    _, stds = _oracle_stds(DDPM(), x0, 0.01)
    assert max(stds) < 1.2 and min(stds) > 0.8, stds
    _, stds = _oracle_stds(DDPM(timestep_spacing="trailing"), x0, 0.01)
    assert stds[0] > 5.0, stds


# ---- flow: parity with diffusers and SD3's recipe -------------------------------------------
def test_flow_training_follows_sd3_recipe():
    x0, noise = _data((64, 16, 12))
    s, ref = RectifiedFlow(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = s.sample_timesteps(64, generator=torch.Generator().manual_seed(0))
    u = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, ref.timesteps[(u * 1000).long()])  # train_dreambooth_sd3.py's indexing
    sigma = (t / 1000).view(-1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.scale_noise(x0, t, noise), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.training_target(x0, noise, t), noise - x0)


def test_flow_logit_normal_density():
    sigma = RectifiedFlow().sample_timesteps(20000, generator=torch.Generator().manual_seed(0)) / 1000
    assert abs(sigma.median().item() - 0.5) < 0.02
    middle = ((sigma > 1 / 3) & (sigma < 2 / 3)).float().mean().item()
    assert middle > 0.45  # logit-normal(0, 1): ~0.51; uniform would give 1/3
    shifted = RectifiedFlow(shift=3.0).sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert shifted.median() / 1000 > 0.7  # shift pushes training toward high noise


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampling_loop_matches_diffusers(shift):
    x, _ = _data((2, 8, 4))
    ref = _loop(FlowMatchEulerDiscreteScheduler(shift=shift), x, 12)
    assert torch.equal(_loop(RectifiedFlow(shift=shift), x, 12), ref)
