"""DDPM with the improved-DDPM cosine schedule and epsilon prediction (what Transfusion trained).

A thin adapter over `diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")`: the noise
schedule, `add_noise` and the ancestral `step` are diffusers' own. What the adapter adds:
uniform integer training timesteps, float32 "model unit" timesteps for the model, a
`predict_x0`, and loud errors where diffusers would index out of range or silently fall back to
1000-step sampling.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from .base import GeneratorLike, Scheduler

_SPACINGS = ("linspace", "leading", "trailing")


class DDPM(Scheduler):
    """Cosine-schedule DDPM, epsilon prediction.

    Args:
        num_train_timesteps: length of the training chain (t in [0, N-1]).
        clip_sample: clamp predicted x0 to [-1, 1] while sampling. Off by default because
            VQ latents are not confined to [-1, 1] (diffusers' default is True, for pixels).
        timestep_spacing: how set_timesteps picks K of the N steps. Default "leading" (diffusers'
            default too): K=25 starts at t=960. "trailing" starts at t=N-1 (Lin et al. 2023,
            "Common Diffusion Noise Schedules and Sample Steps are Flawed"), which is right for
            v-prediction on a zero-terminal-SNR schedule but not for epsilon prediction on this
            capped cosine schedule: sqrt(abar_999) ~ 5e-5, so the first step's x0 estimate
            amplifies the model's epsilon error ~2e4x (16x at t=960). Measured on the recipe's
            VQ latents: every sample of a trained model was coloured noise with "trailing" and a
            clean canvas with objects with "leading"; tests/test_schedulers.py checks the same
            with an oracle that errs by 1%.
    """

    name = "ddpm"
    prediction_type = "epsilon"

    def __init__(self, num_train_timesteps: int = 1000, clip_sample: bool = False,
                 timestep_spacing: str = "leading"):
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.clip_sample = bool(clip_sample)
        self.timestep_spacing = timestep_spacing
        self._ddpm = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            clip_sample=self.clip_sample,
            timestep_spacing=timestep_spacing,
        )
        self.init_noise_sigma = float(self._ddpm.init_noise_sigma)
        self.timesteps = None  # diffusers pre-fills a 1000-step schedule; we insist on set_timesteps

    # ---- training ---------------------------------------------------------------------------
    def sample_timesteps(self, n: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer t in [0, N-1] (Ho et al. / Transfusion), as float32 model units."""
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator,
                          device=self._gen_device(generator, device))
        return t.to(device=device, dtype=torch.float32)  # (n,)

    def _index(self, timesteps: Tensor | float, x: Tensor) -> Tensor:
        """Float model units -> (n,) long indices into alphas_cumprod (they are integer-valued)."""
        t = self._rows(timesteps, x).round().long()
        if bool((t < 0).any()) or bool((t >= self.num_train_timesteps).any()):
            raise ValueError(f"DDPM timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        return t

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, by diffusers' own add_noise."""
        return self._ddpm.add_noise(x0, noise, self._index(timesteps, x0))

    def training_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Epsilon prediction: the model regresses the noise itself."""
        return noise

    def _sqrt_abar(self, timesteps: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)), each (n, 1, ..., 1) in x's dtype."""
        # Same precision path as diffusers' add_noise: cast abar to x's dtype, then take roots.
        abar = self._ddpm.alphas_cumprod.to(device=x.device, dtype=x.dtype)[self._index(timesteps, x)]
        return self._per_row(abar.sqrt(), x), self._per_row((1 - abar).sqrt(), x)

    def predict_x0(self, model_output: Tensor, timesteps: Tensor | float, sample: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), DDPM eq. 15 (as in diffusers' step).

        Ill-conditioned at the noisiest steps: sqrt(abar_999) ~ 5e-5 for the cosine schedule,
        so fp32 rounding in x_t is amplified ~2e4x there. Inherent to epsilon prediction.
        """
        a, b = self._sqrt_abar(timesteps, sample)
        return (sample - b * model_output) / a

    # ---- sampling ---------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> Tensor:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], "
                             f"got {num_inference_steps}")
        # diffusers' schedule stays on the CPU: its step() indexes CPU alphas_cumprod with it.
        self._ddpm.set_timesteps(num_inference_steps)
        self.timesteps = self._ddpm.timesteps.to(device=device, dtype=torch.float32)  # (K,)
        return self.timesteps

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor,
             generator: GeneratorLike = None) -> Tensor:
        """Ancestral DDPM step t -> previous t of the schedule (adds fresh noise unless last).

        With a list of generators, row i draws its noise from generator i, so stepping a batch
        equals stepping each row with its own generator.
        """
        self._require_schedule()
        t = int(round(self._scalar(timestep)))
        # diffusers' previous_timestep() raises a bare IndexError for a timestep off the schedule.
        if not bool((self._ddpm.timesteps == t).any()):
            raise ValueError(f"timestep {t} is not in the schedule; pass one of self.timesteps "
                             f"(set_timesteps({len(self._ddpm.timesteps)}) gave "
                             f"{self._ddpm.timesteps[:3].tolist()}...)")
        out = self._ddpm.step(model_output, t, sample, generator=generator).prev_sample
        return out.to(sample.dtype)
