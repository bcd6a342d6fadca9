"""Run-state objects (LR schedule, EMA, code-usage counters) saved without pickle.

``accelerator.register_for_checkpointing`` would pickle these objects and load them back with
``torch.load(weights_only=False)``, i.e. a checkpoint could run code. Instead every object's
``state_dict()`` is split into its tensors, stored in one safetensors file, and the rest (numbers,
strings, lists, dicts, None) as JSON in that file's metadata. Loading runs no code.

    save_objects({"lr_schedule": sched, "ema": ema}, ckpt / "run_objects.safetensors")
    load_objects({"lr_schedule": sched, "ema": ema}, ckpt / "run_objects.safetensors")

Tuples come back as lists (JSON has no tuple); none of the saved objects cares.

The checkpoint layout's names live here too (``STATE_FILE``, ``OBJECTS_FILE``,
``rank_objects_file``, ``latest_checkpoint``): the trainer writes them and ``train.export_zero``
reads them, and this module is light to import (the trainer pulls in the model code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_FILE = "trainer_state.json"  # written last: its presence marks a checkpoint complete
OBJECTS_FILE = "run_objects.safetensors"  # objects identical on every process (LR schedule, EMA)
_TENSOR = "__tensor__"


def rank_objects_file(rank: int) -> str:
    """Each process's own objects (a ZeRO-3 EMA: that rank's partitions)."""
    return f"run_objects_rank{rank}.safetensors"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint ``output_dir/checkpoints/step_*`` (one whose
    ``STATE_FILE`` was written last), or None."""
    ckpts = []
    for p in (Path(output_dir) / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            ckpts.append((int(m.group(1)), p))
    return max(ckpts)[1] if ckpts else None


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors[key...]`` and replaced by a reference."""
    if isinstance(value, torch.Tensor):
        if key in tensors:  # {"a/b": x, "a": {"b": y}}, or {1: x, "1": y}: one would overwrite the other
            raise ValueError(f"two tensors would be stored as {key!r}: rename a key")
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"{key}: only str / int keys can be saved, got {list(value)[:3]}")
        # int keys are tagged so they come back as ints (JSON object keys are strings)
        return {"__dict__": [[k, _split(v, f"{key}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: cannot save a {type(value).__name__} without pickle")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_objects(objects: dict[str, Stateful], path: Path) -> None:
    """Write every object's ``state_dict()`` into one safetensors file (call on one process)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {name: _split(obj.state_dict(), name, tensors) for name, obj in objects.items()}
    # json keeps floats exactly (repr round trip); inf / nan are written as Infinity / NaN
    save_file(tensors, str(path), metadata={"state": json.dumps(skeleton)})


def load_objects(objects: dict[str, Stateful], path: Path, device: torch.device | str = "cpu") -> None:
    """Restore every object from ``path``; a missing file or object is an error naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint has no saved run objects "
                                f"({', '.join(objects)})")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        skeleton = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = sorted(set(objects) - set(skeleton))
    if missing:
        raise KeyError(f"{path} has no state for {missing} (saved: {sorted(skeleton)})")
    for name, obj in objects.items():
        obj.load_state_dict(_join(skeleton[name], tensors))
