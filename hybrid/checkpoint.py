"""Model weights as safetensors + config.json (no pickle anywhere), and the plumbing to read and
write other checkpoint layouts: sharded Hugging Face folders streamed tensor by tensor, and
``KeyMap`` renames between their parameter names and ours (``hybrid/convert.py`` uses them)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import Tensor, nn

from hybrid.config import HybridConfig
from hybrid.model import HybridModel

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


def save_pretrained_model(model: HybridModel, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG)
    save_model(model, str(directory / WEIGHTS))  # handles tied embeddings
    return directory


def load_pretrained_model(directory: str | Path, device: str | torch.device = "cpu") -> HybridModel:
    """Rebuild a ``HybridModel`` from a folder written by ``save_pretrained_model``."""
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; expected a folder from save_pretrained_model")
    cfg = HybridConfig.load(directory / CONFIG)
    model = HybridModel(cfg)
    load_model(model, str(directory / WEIGHTS), strict=True, device=str(device))  # raises on any key mismatch
    return model.to(device)


# --- other layouts: key maps ------------------------------------------------------------

_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "w": r"(?P<w>weight|bias)", "rest": r"(?P<rest>.+)"}


class KeyMap:
    """Renames parameters between a foreign layout ("theirs") and ours, in both directions.

    Built from ``(theirs, ours)`` name templates; a template may hold ``{n}`` (a layer index),
    ``{w}`` (``weight`` or ``bias``) and ``{rest}`` (anything: a whole sub-module moved under
    another prefix), e.g.
    ``("model.layers.{n}.input_layernorm.weight", "layers.{n}.attn_norm.weight")``.
    A name no template matches maps to ``None``: the caller decides whether that is an error.
    """

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = list(pairs)
        self._fwd = [(self._compile(a), b) for a, b in self.pairs]
        self._rev = [(self._compile(b), a) for a, b in self.pairs]

    @staticmethod
    def _compile(template: str) -> re.Pattern:
        pattern = re.escape(template)
        for key, group in _PLACEHOLDERS.items():
            pattern = pattern.replace(re.escape("{" + key + "}"), group)
        return re.compile(pattern + r"\Z")

    @staticmethod
    def _apply(table, name: str) -> str | None:
        for pattern, template in table:
            m = pattern.match(name)
            if m:
                return template.format(**m.groupdict())
        return None

    def to_ours(self, name: str) -> str | None:
        return self._apply(self._fwd, name)

    def to_theirs(self, name: str) -> str | None:
        return self._apply(self._rev, name)

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.pairs + other.pairs)


def mlp_key_map(theirs: str, ours: str, depth: int, first: str = "fc1", rest: str = "hidden_layers") -> KeyMap:
    """Janus' aligner MLPs (``fc1`` then ``hidden_layers.{k}``, activation before each) onto our
    ``nn.Sequential(Linear, GELU, Linear, ...)`` from ``hybrid.model.mlp`` (Linear k sits at 2k)."""
    pairs = [(f"{theirs}.{first}.{{w}}", f"{ours}.0.{{w}}")]
    pairs += [(f"{theirs}.{rest}.{k}.{{w}}", f"{ours}.{2 * k + 2}.{{w}}") for k in range(depth - 1)]
    return KeyMap(pairs)


# --- other layouts: reading -------------------------------------------------------------


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face folder: one ``model.safetensors`` or the shards its
    ``model.safetensors.index.json`` names. Pickled ``*.bin`` checkpoints are refused."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]  # shard order, no repeats
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"{folder} holds pickled weights (*.bin / *.pt); only safetensors are read. "
                         "Re-save it with save_pretrained(..., safe_serialization=True).")
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS} nor {WEIGHTS_INDEX}")


def iter_safetensors(folder: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a (possibly sharded) folder, one at a time: only one tensor is held in
    memory beyond what the caller keeps."""
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                yield name, f.get_tensor(name)


@dataclass
class Route:
    """Where a foreign checkpoint's tensors go: ``rename`` maps a checkpoint name to a state-dict
    name of ``module`` (or None: not for this module). ``keep_init(name)`` marks our entries the
    checkpoint is not expected to fill (modules it has no counterpart for keep their init)."""

    rename: Callable[[str], str | None]
    module: nn.Module
    keep_init: Callable[[str], bool] = lambda name: False
    grow_rows: tuple[str, ...] = ()  # vocabulary matrices that may have more rows than the checkpoint's


@torch.no_grad()
def load_streamed(folder: str | Path, routes: list[Route], ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Copy a foreign checkpoint into modules, tensor by tensor.

    A tensor goes to the first route that maps its name. Names no route maps raise, unless
    ``ignore(name)``. Every state-dict entry of every module must be filled (tied weights count
    once), except those a route's ``keep_init`` names, and shapes must match, except that a
    ``grow_rows`` matrix with fewer rows in the checkpoint fills only our first rows (the rest are
    new tokens; the caller initialises them).
    """
    targets = [(r, r.module.state_dict(keep_vars=True)) for r in routes]
    filled: set[tuple[int, int]] = set()  # (module, tensor storage) pairs already loaded
    unexpected = []
    for name, tensor in iter_safetensors(folder):
        for route, state in targets:
            ours = route.rename(name)
            if ours is None:
                continue
            if ours not in state:
                raise KeyError(f"checkpoint tensor {name!r} maps to {ours!r}, which "
                               f"{type(route.module).__name__} lacks")
            dst = state[ours]
            grows = ours in route.grow_rows and dst.shape[1:] == tensor.shape[1:] and dst.shape[0] >= tensor.shape[0]
            if dst.shape != tensor.shape and not grows:
                raise ValueError(f"shape mismatch for {name!r} -> {ours!r}: checkpoint "
                                 f"{tuple(tensor.shape)}, model {tuple(dst.shape)}")
            dst.data[: tensor.shape[0]].copy_(tensor)
            filled.add((id(route.module), dst.data_ptr()))
            break
        else:
            if not ignore(name):
                unexpected.append(name)
    if unexpected:
        raise ValueError(f"{len(unexpected)} checkpoint tensors have no place in the model, e.g. {unexpected[:5]}")
    missing = [f"{type(r.module).__name__}.{k}" for r, state in targets for k, v in state.items()
               if (id(r.module), v.data_ptr()) not in filled and not r.keep_init(k)]
    if missing:
        raise ValueError(f"the checkpoint does not fill {len(missing)} model tensors, e.g. {missing[:5]}")


# --- other layouts: writing -------------------------------------------------------------


def save_sharded(tensors: Mapping[str, Tensor], folder: str | Path, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write tensors as Hugging Face does: one ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` when they
    exceed ``max_shard_bytes``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous()
        size += nbytes
    meta = {"format": "pt"}  # transformers checks this tag
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata=meta)
        return [folder / WEIGHTS]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths
