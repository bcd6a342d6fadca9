"""The local tokenizer: trained offline, saved with the model, any local HF folder loads."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hybrid.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids, train_tokenizer
from train.data import ShapesTrainSet
from train.shapes import ShapesWorld


def test_train_save_load_round_trip(tmp_path):
    world = ShapesWorld()
    tok = train_tokenizer(world.corpus_texts(500), vocab_size=400)
    ids = special_token_ids(tok)
    assert [ids[f"{r}_id"] for r in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "a photo of a red circle left of a blue square"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text
    assert len(enc) < len(text) / 2, "BPE should compress the world's captions"
    assert tok.decode(tok.encode("Ünïcödé ✓", add_special_tokens=False)) == "Ünïcödé ✓"  # byte-level: no <unk>
    tok.save_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode(text, add_special_tokens=False) == enc
    assert special_token_ids(again) == ids


def test_foreign_tokenizer_gets_the_multimodal_markers(tmp_path):
    t = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="world").save_pretrained(str(tmp_path / "hf"))
    tok = load_tokenizer(tmp_path / "hf")
    ids = special_token_ids(tok)
    assert ids["eos_id"] == 2, "an existing eos token is kept"
    assert {"boi_id", "eoi_id", "img_id", "pad_id", "bos_id"} <= set(ids)
    assert len(set(ids.values())) == len(ids)


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_training_set_is_a_pure_function_of_the_index():
    world = ShapesWorld()
    a, b = ShapesTrainSet(world, seed=3), ShapesTrainSet(world, seed=3)
    kinds = set()
    for i in range(0, 200, 7):
        x, y = a[i], b[i]
        assert x["drop_caption"] == y["drop_caption"] and len(x["segments"]) == len(y["segments"])
        for s, t in zip(x["segments"], y["segments"]):
            assert s == t if isinstance(s, str) else s.tobytes() == t.tobytes()
        kinds.add(len(x["segments"]))
    assert 2 in kinds and any(k > 2 for k in kinds), "both caption and interleaved samples occur"
    drops = sum(a[i]["drop_caption"] for i in range(2000))
    assert 100 < drops < 300, "about 10% of caption samples drop their caption"
    with pytest.raises(IndexError):
        a[len(a)]
