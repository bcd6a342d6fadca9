"""Exponential moving average (EMA) of a model's trainable parameters.

    shadow <- d * shadow + (1 - d) * param          after every optimizer step

with d = ``decay``, or with ``warmup=True`` d_n = min(decay, (1 + n) / (10 + n)) for the n-th
update (n = 0, 1, ...; the usual warmup of TensorFlow's / timm's EMA), so early shadows are not
dominated by the random initialisation.

The shadow is kept in fp32 on the parameters' device, keyed by parameter name, so it can be
checkpointed with the run (``state_dict`` / ``load_state_dict``, saved without pickle by
train/state_io.py) and copied into the live model for evaluation or export (``copy_to``,
``swapped``).

Always pass the *unwrapped* module (``accelerator.unwrap_model(model)``): DDP / DeepSpeed wrappers
prefix parameter names. With DDP and DeepSpeed ZeRO-1/2 every rank holds full parameters, so the
update is local and identical on all ranks (``sharded`` is False: one copy is checkpointed).
Under ZeRO-3 each rank owns one flat partition of every parameter (``p.ds_tensor``; the
parameter itself is a placeholder, or a gathered copy for small "persistent" ones): the EMA then
follows that partition (``sharded`` is True), so it costs 1/N of the model per rank and no
communication per step, and each rank checkpoints its own shadow. ``full_weights`` all-gathers the
partitions one parameter at a time for the export; ``copy_to`` / ``swapped`` need full
parameters and refuse a sharded EMA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensor the EMA follows per trainable parameter: the parameter, or this rank's ZeRO-3
    partition of it (the one the optimizer updates, whether the parameter is gathered or not)."""
    return {name: p.ds_tensor if _zero3(p) else p for name, p in model.named_parameters() if p.requires_grad}


def _zero3(p: torch.Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.sharded = any(_zero3(p) for p in model.parameters())
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in _trainable(model).items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = _trainable(model)
        if params.keys() != self.shadow.keys() or any(p.shape != self.shadow[n].shape for n, p in params.items()):
            missing, extra = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"model does not match the EMA (pass the unwrapped module): missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of ``model`` (the unwrapped module) into the shadow."""
        d = self.current_decay()
        for name, p in self._params(model).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # s + (1 - d) * (p - s)
        self.num_updates += 1

    @torch.no_grad()
    def full_weights(self, model: nn.Module, gather: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device | str | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
        """The EMA weights by parameter name, full size, fp32, on the CPU (empty where ``keep`` is
        False). Sharded: every process must call it (``gather`` = ``accelerator.gather``:
        concatenates a tensor over processes in rank order); one parameter at a time is gathered
        on ``device`` (the backend's: an offloaded shadow lives on the CPU) and only the processes
        that ``keep`` hold the result, in CPU memory."""
        if not self.sharded:
            return {k: v.detach().cpu().clone() for k, v in self.shadow.items()} if keep else {}
        params = dict(model.named_parameters())
        self._params(model)  # the same parameters as when the EMA was made
        out = {}
        for name, part in self.shadow.items():
            p = params[name]
            full = gather(part.to(device) if device is not None else part)  # (N * partition,)
            if keep:
                out[name] = full[: p.ds_numel].view(p.ds_shape).cpu()  # -> the parameter's shape
            del full
        return out

    def _full_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.sharded:
            raise ValueError("a sharded (ZeRO-3) EMA cannot be copied into partitioned parameters; use full_weights")
        return self._params(model)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the trainable parameters of ``model`` with the EMA weights (cast to their dtype)."""
        for name, p in self._full_params(model).items():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped(model): evaluate(model)``: EMA weights inside, the live ones restored after
        (also on an exception)."""
        params = self._full_params(model)
        backup = {name: p.detach().clone() for name, p in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.detach().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state does not match this model's trainable parameters")
        shapes = {k: (tuple(v.shape), tuple(self.shadow[k].shape)) for k, v in state["shadow"].items()
                  if v.shape != self.shadow[k].shape}
        if shapes:  # a ZeRO-3 shard saved with another number of processes, most likely
            name, (got, want) = next(iter(shapes.items()))
            raise ValueError(f"EMA state has other shapes than this model's parameters (e.g. {name}: {got} vs "
                             f"{want}); a sharded (ZeRO-3) EMA resumes only with the same number of processes")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)  # keeps the shadow's device and fp32
