"""Training data from the shapes world, as a map-style dataset.

Every item is a pure function of (seed, index): the task (caption -> image, an interleaved
document, or understanding: image -> caption / multiple-choice answer), the sample itself and its
caption-dropout decision. A resumed run that skips the
first ``k`` batches therefore sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset

from hybrid.sequence import ImageSegment, TextSegment
from train.config import MC_ANSWERS
from train.shapes import QuestionExample, ShapesWorld

CAPTION_INSTRUCTION = "Describe the image."


def understanding_caption(image, caption: str) -> list:
    """Image in (understanding path), caption out: the text loss is on the caption only."""
    return [ImageSegment(image, "und"), TextSegment(CAPTION_INSTRUCTION, loss=False), " " + caption]


def mc_answer_text(q: QuestionExample, option: str, style: str = "letter") -> str:
    """The trained answer to ``q`` if ``option`` (a letter) were right: the letter itself, or
    (``style="text"``) that option's text after a space. The letter is its own segment with no
    leading space, so that it is a single token for any byte-level tokenizer (" A" is one token
    only if the BPE happened to merge it)."""
    if style not in MC_ANSWERS:
        raise ValueError(f"mc_answer must be one of {MC_ANSWERS}, got {style!r}")
    return option if style == "letter" else " " + q.options[option]


def understanding_question(q: QuestionExample, with_answer: bool = True, style: str = "letter",
                           option: str | None = None) -> list:
    """MMBench-style: image, question and options as context; the loss is on the answer: the
    right option's letter, or with ``style="text"`` its text. MMBench maps either to a choice
    (VLMEvalKit's matching: a lone option letter, else exactly one option text in the output);
    the text answer asks the model what the image shows rather than to bind it to a letter too.
    ``option`` puts another option's answer there (scoring every option by likelihood)."""
    segs = [ImageSegment(q.image, "und"), TextSegment(q.format(), loss=False)]
    return segs + [mc_answer_text(q, option or q.answer, style)] if with_answer else segs


class ShapesTrainSet(Dataset):
    def __init__(
        self,
        world: ShapesWorld,
        length: int = 10_000_000,
        mix_caption: float = 0.85,
        mix_interleaved: float = 0.15,
        mix_understand: float = 0.0,
        caption_dropout: float = 0.1,
        split: str = "train",
        seed: int = 0,
        mc_answer: str = "letter",
        understand_questions: float = 0.5,
    ):
        if mc_answer not in MC_ANSWERS:
            raise ValueError(f"mc_answer must be one of {MC_ANSWERS}, got {mc_answer!r}")
        self.world, self.length, self.split, self.seed = world, length, split, seed
        self.mc_answer = mc_answer
        total = mix_caption + mix_interleaved + mix_understand
        self.p_caption = mix_caption / total
        self.p_interleaved = mix_interleaved / total
        self.caption_dropout = caption_dropout
        self.understand_questions = understand_questions  # the rest of the understanding samples are captions

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}:{self.split}:{index}")  # str seeds are hashed stably
        u = rng.random()
        if u < self.p_caption:
            ex = self.world.caption_example(index, self.split)
            return {"segments": [ex.prompt, ex.image], "drop_caption": rng.random() < self.caption_dropout}
        if u < self.p_caption + self.p_interleaved:
            return {"segments": self.world.interleaved_example(index, self.split), "drop_caption": False}
        if rng.random() >= self.understand_questions:
            ex = self.world.caption_example(index, self.split)
            return {"segments": understanding_caption(ex.image, ex.prompt), "drop_caption": False}
        return {"segments": understanding_question(self.world.question_example(index, self.split),
                                                   style=self.mc_answer),
                "drop_caption": False}
