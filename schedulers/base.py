"""The one contract every noise scheduler in hybrid satisfies.

Why our own contract instead of diffusers' `SchedulerMixin` directly: the diffusion loss and the
sampling loop need things diffusers spreads over several places (training-timestep sampling lives
in `diffusers.training_utils` and the example scripts, the regression target depends on the
prediction type, DDPM indexes integer timesteps while flow matching looks up float ones). Each
adapter wraps one diffusers scheduler (one algorithm per file, as diffusers does) and exposes the
same methods, so `hybrid.losses` and `hybrid.sampling` never branch on the scheduler kind.

Timesteps are float32 "model units": the number fed to the model's sinusoidal timestep embedding
(DDPM: integer-valued t in [0, N-1]; flow: t = sigma * N, as diffusers' flow scheduler does).
Per-row timesteps are (n,) and broadcast over any trailing dims, so x0 may be patch tokens
(n, N, P) or images (n, C, H, W).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

# A list of generators gives every batch row its own stream (diffusers' randn_tensor semantics),
# which is what makes a batched stochastic step equal to stepping the rows one by one.
GeneratorLike = torch.Generator | list[torch.Generator] | None


class Scheduler(ABC):
    """Noise schedule + training target + sampler step behind one small interface.

    Subclasses store every constructor argument as an attribute of the same name; that is what
    `to_dict` saves, so a scheduler round-trips through a model's config.json.
    """

    name: ClassVar[str]  # registry name, e.g. "ddpm"
    prediction_type: ClassVar[str]  # what the model regresses: "epsilon" | "velocity"
    num_train_timesteps: int
    init_noise_sigma: float = 1.0  # std of the starting noise for sampling
    timesteps: Tensor | None = None  # inference schedule, noisiest first; set by set_timesteps

    # ---- training ---------------------------------------------------------------------------
    @abstractmethod
    def sample_timesteps(self, n: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """(n,) float32 training timesteps in model units, drawn from this scheduler's density."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward process: clean x0 (n, ...) + noise (n, ...) at per-row timesteps (n,) -> x_t."""

    @abstractmethod
    def training_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the model regresses at x_t (epsilon or velocity), same shape as x0."""

    @abstractmethod
    def predict_x0(self, model_output: Tensor, timesteps: Tensor | float, sample: Tensor) -> Tensor:
        """Clean estimate from a model prediction at x_t (previews, tests, x0-space guidance)."""

    # ---- sampling ---------------------------------------------------------------------------
    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> Tensor:
        """Build the inference schedule (noisiest first, model units); also kept on self.timesteps.

        Schedulers hold the schedule as state: one instance serves one sampling loop at a time.
        """

    @abstractmethod
    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor,
             generator: GeneratorLike = None) -> Tensor:
        """One denoising step for the whole batch at `timestep` (one of self.timesteps).

        The result depends only on (model_output, timestep, sample): classifier-free guidance
        may step a combined batch, or the same timestep more than once.
        """

    def init_noise(self, shape: Sequence[int], generator: GeneratorLike = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Starting noise for sampling, scaled by the scheduler's initial sigma."""
        device = torch.device(device) if device is not None else None
        noise = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype or torch.float32)
        return noise * self.init_noise_sigma

    # ---- config -----------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        """Constructor options, i.e. the keys of to_dict() besides "name"."""
        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p != "self"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able config: {"name": ..., option: value, ...}."""
        return {"name": self.name, **{k: getattr(self, k) for k in self.option_names()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scheduler":
        """Rebuild from to_dict() output; unknown options are a TypeError naming them."""
        d = dict(d)
        name = d.pop("name", cls.name)
        if name != cls.name:
            raise ValueError(f"config is for scheduler {name!r}, not {cls.name!r}")
        unknown = sorted(set(d) - set(cls.option_names()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for scheduler {cls.name!r}; "
                            f"valid options: {cls.option_names()}")
        return cls(**d)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({opts})"

    # ---- helpers for subclasses -------------------------------------------------------------
    @staticmethod
    def _rows(timesteps: Tensor | float, x: Tensor) -> Tensor:
        """Per-row timesteps (n,) on x's device; a scalar is broadcast to every row."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    @staticmethod
    def _per_row(coef: Tensor, x: Tensor) -> Tensor:
        """(n,) -> (n, 1, ..., 1) in x's dtype, so it broadcasts over x's trailing dims."""
        return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _scalar(timestep: Tensor | float) -> float:
        """step() takes one timestep for the batch; accept a tensor of identical values too."""
        t = torch.as_tensor(timestep).detach().flatten().cpu()
        if t.numel() == 0 or not bool((t == t[0]).all()):
            raise ValueError(f"step() takes one timestep for the whole batch, got {t.tolist()}")
        return float(t[0])

    def _require_schedule(self) -> Tensor:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before "
                               "set_timesteps(num_inference_steps)")
        return self.timesteps

    @staticmethod
    def _gen_device(generator: GeneratorLike, device: torch.device | str | None) -> torch.device:
        """Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move."""
        if isinstance(generator, torch.Generator):
            return generator.device
        return torch.device(device) if device is not None else torch.device("cpu")
