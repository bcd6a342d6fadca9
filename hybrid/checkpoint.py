"""Model weights as safetensors + config.json (no pickle anywhere)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from hybrid.config import HybridConfig
from hybrid.model import HybridModel

WEIGHTS = "model.safetensors"
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
