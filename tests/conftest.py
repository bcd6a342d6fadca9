import pytest
import torch

from hybrid.config import HybridConfig
from hybrid.tokenizer import special_token_ids, train_tokenizer

CORPUS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle left of a yellow circle",
    "Here is a picture. And another one below it.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def debug_cfg(tokenizer) -> HybridConfig:
    torch.manual_seed(0)
    return HybridConfig.from_preset("debug", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
