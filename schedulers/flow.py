"""Rectified flow / flow matching with velocity prediction (SD3, JanusFlow, BAGEL).

x_t = (1 - sigma) x0 + sigma noise, the model regresses v = noise - x0, sampling integrates
dx/dsigma = v from sigma=1 to 0 with Euler steps. Conventions, training-timestep density and
the sampler are diffusers' own: `FlowMatchEulerDiscreteScheduler` (its shifted sigma grid and
`step`) and `training_utils.compute_density_for_timestep_sampling`, used as SD3's
train_dreambooth_sd3.py uses them. Model units: t = sigma * num_train_timesteps.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from .base import GeneratorLike, Scheduler

_WEIGHTINGS = ("logit_normal", "mode", "uniform")


class RectifiedFlow(Scheduler):
    """Rectified flow, velocity prediction, Euler sampling.

    Args:
        num_train_timesteps: size of the discrete sigma grid (t = sigma * N, sigma in (0, 1]).
        shift: SD3's timestep shift, sigma' = shift sigma / (1 + (shift - 1) sigma); > 1 spends
            more training and sampling time at high noise (SD3 uses 3.0 at 1024px).
        weighting_scheme: training-timestep density: "logit_normal" (SD3 default), "mode", "uniform".
        logit_mean, logit_std: parameters of the logit-normal density.
        mode_scale: parameter of the "mode" density.

    The inference schedule is state: set_timesteps() replaces it, so one instance serves one
    sampling loop at a time. step() itself is a function of its timestep (see step()).
    """

    name = "flow"
    prediction_type = "velocity"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in _WEIGHTINGS:
            raise ValueError(f"weighting_scheme must be one of {_WEIGHTINGS}, got {weighting_scheme!r}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.mode_scale = float(mode_scale)
        self._flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                                     shift=self.shift)
        # The training grid must be copied now: diffusers' set_timesteps() overwrites
        # .timesteps/.sigmas with the inference schedule (SD3's script keeps a whole
        # `noise_scheduler_copy` for the same reason).
        self._train_grid = self._flow.timesteps.clone()  # (N,) shifted sigma * N, descending
        # diffusers' flow scheduler has no init_noise_sigma: x at sigma=1 is the unit noise itself.
        self.init_noise_sigma = float(getattr(self._flow, "init_noise_sigma", 1.0))
        self.timesteps = None
        self._schedule_cpu: Tensor | None = None

    # ---- training ---------------------------------------------------------------------------
    def sample_timesteps(self, n: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """SD3 recipe: u ~ density on (0, 1), index the (shifted) training grid at floor(u N)."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme, batch_size=n, logit_mean=self.logit_mean,
            logit_std=self.logit_std, mode_scale=self.mode_scale,
            device=self._gen_device(generator, device), generator=generator)
        # sigmoid() rounds to exactly 1.0 in fp32 for large draws; SD3's script would index out of range.
        idx = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self._train_grid.to(idx.device)[idx].to(device=device, dtype=torch.float32)  # (n,)

    def _sigma(self, timesteps: Tensor | float, x: Tensor) -> Tensor:
        """Model units -> sigma, (n, 1, ..., 1) in x's dtype.

        t / N instead of diffusers' scale_noise(): that looks sigma up by exact float equality
        on the training grid (a Python loop with one .item() per row), which fails for inference
        timesteps off the grid (e.g. K=50). On the grid both give identical results (tested).
        """
        t = self._rows(timesteps, x)
        t = t.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32, fp64 stays fp64
        return self._per_row(t / self.num_train_timesteps, x)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigma = self._sigma(timesteps, x0)
        return sigma * noise + (1.0 - sigma) * x0  # scale_noise's expression, term for term

    def training_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Velocity d x_t / d sigma = noise - x0 (diffusers' / SD3's sign convention)."""
        return noise - x0

    def predict_x0(self, model_output: Tensor, timesteps: Tensor | float, sample: Tensor) -> Tensor:
        return sample - self._sigma(timesteps, sample) * model_output

    # ---- sampling ---------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> Tensor:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        # Also resets diffusers' step_index/begin_index. Sigmas get K + 1 entries (terminal 0).
        self._flow.set_timesteps(num_inference_steps=num_inference_steps, device=device)
        self.timesteps = self._flow.timesteps  # (K,) float32, noisiest first
        self._schedule_cpu = self.timesteps.detach().cpu()
        return self.timesteps

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor,
             generator: GeneratorLike = None) -> Tensor:
        """Euler step sigma_i -> sigma_{i+1}: x + (sigma_{i+1} - sigma_i) v.

        diffusers' step() ignores `timestep` after the first call and just advances an internal
        step_index, so stepping a timestep twice (CFG done as two calls, a retried step) would
        silently skip ahead. We point step_index at `timestep` on every call instead, which makes
        step() a function of its arguments and turns a timestep off the schedule into an error.
        """
        self._require_schedule()
        t = self._scalar(timestep)
        hits = (self._schedule_cpu - t).abs().le(1e-3).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not in the schedule; pass one of self.timesteps")
        self._flow._step_index = int(hits[0])  # private in diffusers; pinned by the parity test
        out = self._flow.step(model_output, t, sample, generator=generator).prev_sample
        return out.to(sample.dtype)  # diffusers casts to model_output's dtype
