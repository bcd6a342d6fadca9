"""Training data from the shapes world, as a map-style dataset.

Every item is a pure function of (seed, index): the task (caption -> image or an interleaved
document), the sample itself and its caption-dropout decision. A resumed run that skips the
first ``k`` batches therefore sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset

from train.shapes import ShapesWorld


class ShapesTrainSet(Dataset):
    def __init__(
        self,
        world: ShapesWorld,
        length: int = 10_000_000,
        mix_caption: float = 0.85,
        mix_interleaved: float = 0.15,
        caption_dropout: float = 0.1,
        split: str = "train",
        seed: int = 0,
    ):
        self.world, self.length, self.split, self.seed = world, length, split, seed
        self.p_caption = mix_caption / (mix_caption + mix_interleaved)
        self.caption_dropout = caption_dropout

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}:{self.split}:{index}")  # str seeds are hashed stably
        if rng.random() < self.p_caption:
            ex = self.world.caption_example(index, self.split)
            return {"segments": [ex.prompt, ex.image], "drop_caption": rng.random() < self.caption_dropout}
        return {"segments": self.world.interleaved_example(index, self.split), "drop_caption": False}
