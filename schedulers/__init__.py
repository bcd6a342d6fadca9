"""Noise schedulers for the diffusion loss on continuous image patches.

One contract (`Scheduler`, see base.py), one algorithm per file, each a thin adapter over
diffusers' own scheduler:

    ddpm  DDPM, cosine schedule, epsilon prediction (Transfusion)
    flow  rectified flow, logit-normal timesteps, velocity prediction (SD3 / JanusFlow / BAGEL)

    sched = get_scheduler("flow", shift=3.0)
    cfg = sched.to_dict()                 # JSON-able, saved in the model's config.json
    sched = scheduler_from_dict(cfg)
"""

from __future__ import annotations

from typing import Any

from .base import Scheduler
from .ddpm import DDPM
from .flow import RectifiedFlow

SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (DDPM, RectifiedFlow)}


def get_scheduler(name: str, **kwargs: Any) -> Scheduler:
    """Build a registered scheduler by name; unknown name -> ValueError, unknown option -> TypeError."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_dict(kwargs)


def scheduler_from_dict(d: dict[str, Any]) -> Scheduler:
    """Inverse of Scheduler.to_dict(): the "name" key picks the class, the rest are options."""
    if "name" not in d:
        raise ValueError(f"scheduler config needs a 'name' key (one of {sorted(SCHEDULERS)}), got {d}")
    options = {k: v for k, v in d.items() if k != "name"}
    return get_scheduler(d["name"], **options)


__all__ = ["Scheduler", "DDPM", "RectifiedFlow", "SCHEDULERS", "get_scheduler", "scheduler_from_dict"]
