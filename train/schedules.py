"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

Each builder returns ``f(step) -> multiplier`` of the base learning rate, where ``step`` is the
number of ``scheduler.step()`` calls so far: the optimizer step ``s`` (0-based) trains with
``f(s)``, and ``f(total)`` is the value after the last step.

* ``warmup_cosine``: linear warmup, then cosine decay to ``min_ratio`` (the trainer's schedule).
* ``warmup_stable_decay`` (WSD): linear warmup, a constant LR, then a "1 - sqrt" cooldown over the
  last ``cooldown_fraction`` of the steps. This is the schedule of Hägele et al. 2024, "Scaling
  Laws and Compute-Optimal Training Beyond Fixed Training Durations" (arXiv:2405.18392, Sec. 3:
  lr = 1 - sqrt((n - N_cool_start) / N_cool)), which the native-multimodal scaling study of Shukor
  et al. 2025 (arXiv:2504.07951) reports using with a 20% cooldown (``cooldown_fraction=0.2``).
"""

from __future__ import annotations

import math
from typing import Callable

LRLambda = Callable[[int], float]


def _check(warmup: int, total: int, min_ratio: float) -> None:
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    if warmup < 0:  # warmup > total is allowed: a short (debug) run then only ramps up
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> LRLambda:
    """Linear warmup then cosine decay.

    f(s) = (s + 1) / warmup                                   for s < warmup
    f(s) = r + (1 - r) * (1 + cos(pi * p)) / 2                otherwise, with
           p = min(1, (s - warmup) / max(1, total - warmup)) and r = min_ratio,
    so f reaches r at s = total and stays there.
    """
    _check(warmup, total, min_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def warmup_stable_decay(warmup: int, total: int, cooldown_fraction: float = 0.2,
                        min_ratio: float = 0.0) -> LRLambda:
    """Warmup-stable-decay with the "1 - sqrt" cooldown (Hägele et al. 2024; Shukor et al. 2025).

    With C = max(1, round(cooldown_fraction * total)) cooldown steps starting at c0 = max(warmup, total - C):

    f(s) = (s + 1) / warmup                                   for s < warmup
    f(s) = 1                                                  for warmup <= s < c0
    f(s) = r + (1 - r) * (1 - sqrt(p))                        for s >= c0, with
           p = min(1, (s - c0) / (total - c0)) and r = min_ratio,
    so the cooldown starts at 1, is monotone non-increasing and reaches r at s = total.
    """
    _check(warmup, total, min_ratio)
    if not 0.0 < cooldown_fraction <= 1.0:
        raise ValueError(f"cooldown_fraction must be in (0, 1], got {cooldown_fraction}")
    start = max(warmup, total - max(1, round(cooldown_fraction * total)))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < start or start == total:
            return 1.0
        progress = min(1.0, (step - start) / (total - start))
        return min_ratio + (1 - min_ratio) * (1 - math.sqrt(progress))

    return f


SCHEDULES: dict[str, Callable[..., LRLambda]] = {"cosine": warmup_cosine, "wsd": warmup_stable_decay}


def build_lr_lambda(name: str, warmup: int, total: int, min_ratio: float,
                    cooldown_fraction: float = 0.2) -> LRLambda:
    """The multiplier for ``LambdaLR`` named ``name``: "cosine" or "wsd" (``cooldown_fraction`` is
    used by "wsd" only)."""
    if name == "cosine":
        return warmup_cosine(warmup, total, min_ratio)
    if name == "wsd":
        return warmup_stable_decay(warmup, total, cooldown_fraction, min_ratio)
    raise ValueError(f"unknown lr schedule {name!r}; choose from {sorted(SCHEDULES)}")
