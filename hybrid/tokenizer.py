"""Text tokenizers that need no download.

The embedded default trains a small byte-level BPE with the ``tokenizers`` library on text the
project generates, wraps it as a ``transformers.PreTrainedTokenizerFast`` and saves it next to
the model (``tokenizer.json``). Any local Hugging Face tokenizer folder works the same way; the
multimodal markers are added to it if it lacks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Role -> token string. Ids are whatever the tokenizer assigns; ``special_token_ids`` reads them.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "boi": "<boi>",  # begin of image span
    "eoi": "<eoi>",  # end of image span
    "img": "<img>",  # placeholder inside image spans (its embedding is replaced)
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (any string encodes; no unknown tokens) on ``texts``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte tokens + special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),  # ids 0..5, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(PreTrainedTokenizerFast(tokenizer_object=tok))


def _wrap(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure the multimodal markers exist and the standard roles point at ours."""
    missing = [s for s in SPECIAL_TOKENS.values() if s not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    # Keep an existing pad/bos/eos of a real tokenizer (Llama's <s>, </s>); fill the gaps with ours.
    if tok.pad_token is None:
        tok.pad_token = SPECIAL_TOKENS["pad"]
    if tok.bos_token is None:
        tok.bos_token = SPECIAL_TOKENS["bos"]
    if tok.eos_token is None:
        tok.eos_token = SPECIAL_TOKENS["eos"]
    return tok


def load_tokenizer(path: str | Path, add_markers: bool = True) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (never the hub). ``add_markers=False`` leaves it as
    it is: for a converted checkpoint whose markers have other names (Janus' ``<begin_of_image>``)
    and whose ids the model config already holds."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return _wrap(tok) if add_markers else tok


def special_token_ids(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids for HybridConfig's ``*_id`` fields (pad_id, bos_id, ...)."""
    vocab = tok.get_vocab()
    ids = {f"{role}_id": vocab[s] for role, s in SPECIAL_TOKENS.items() if s in vocab}
    ids.update(pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    return ids
