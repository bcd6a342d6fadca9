"""Exponential moving average (EMA) of a model's trainable parameters.

    shadow <- d * shadow + (1 - d) * param          after every optimizer step

with d = ``decay``, or with ``warmup=True`` d_n = min(decay, (1 + n) / (10 + n)) for the n-th
update (n = 0, 1, ...; the usual warmup of TensorFlow's / timm's EMA), so early shadows are not
dominated by the random initialisation.

The shadow is kept in fp32 on the parameters' device, keyed by parameter name, so it can be
checkpointed with ``accelerator.register_for_checkpointing(ema)`` (``state_dict`` /
``load_state_dict``) and copied into the live model for evaluation or export (``copy_to``,
``swapped``).

Always pass the *unwrapped* module (``accelerator.unwrap_model(model)``): DDP / DeepSpeed wrappers
prefix parameter names. With DeepSpeed ZeRO-1/2 every rank holds full parameters, so the update is
local and identical on all ranks. Under ZeRO-3 parameters are partitioned (each rank holds an
empty placeholder); this class refuses them rather than silently averaging placeholders. Gathering
every step (``deepspeed.zero.GatheredParameters``) would work but costs a full all-gather per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    partitioned = [name for name, p in params.items() if hasattr(p, "ds_id") and p.numel() == 0]
    if partitioned:
        raise NotImplementedError(f"EMA got ZeRO-3 partitioned parameters ({partitioned[0]}, ...): gather them "
                                  f"or use ZeRO stage 1/2")
    return params


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in _trainable(model).items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = _trainable(model)
        if params.keys() != self.shadow.keys():
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
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the trainable parameters of ``model`` with the EMA weights (cast to their dtype)."""
        for name, p in self._params(model).items():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped(model): evaluate(model)``: EMA weights inside, the live ones restored after
        (also on an exception)."""
        params = self._params(model)
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
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)  # keeps the shadow's device and fp32
