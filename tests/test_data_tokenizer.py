import json

import pytest
import torch

from m3ae.data import Tokenizer

# Reference from the issue: BertWordPieceTokenizer(vocab, lowercase=True) with special tokens gives
# 101, 1037, 6302, 1997, 1037, 3899, 102 for "a photo of a dog"; M3AE drops [CLS]=101/[SEP]=102.
REFERENCE = [1037, 6302, 1997, 1037, 3899]


def test_reference_ids_without_special_tokens_and_padding():
    tok = Tokenizer.from_name("bert-base-uncased", max_length=64)
    ids, pad = tok(["a photo of a dog", ""])
    assert ids.dtype == torch.long and pad.dtype == torch.bool
    assert ids.shape == pad.shape == (2, 64)
    assert ids[0, :5].tolist() == REFERENCE
    assert (ids[0, 5:] == 0).all() and (ids[1] == 0).all()
    assert pad[0].tolist() == [False] * 5 + [True] * 59
    assert pad[1].all()  # an empty caption is all padding: the sample is image-only


def test_lowercasing_truncation_and_length_override():
    tok = Tokenizer.from_name("bert-base-uncased", max_length=3)
    ids, pad = tok(["A PHOTO OF A DOG"])
    assert ids[0].tolist() == REFERENCE[:3] and not pad.any()
    long_ids, long_pad = tok(["a photo of a dog"], max_length=8)
    assert long_ids.shape == (1, 8) and long_pad[0].sum() == 3


def test_batch_equals_one_at_a_time():
    tok = Tokenizer.from_name("bert-base-uncased", max_length=16)
    texts = ["a red star", "unbelievably tokenisable words", "x"]
    batch_ids, batch_pad = tok(texts)
    for row, text in enumerate(texts):
        ids, pad = tok([text])
        assert torch.equal(ids[0], batch_ids[row]) and torch.equal(pad[0], batch_pad[row])


def test_local_vocab_and_tokenizer_json_paths(tmp_path):
    from importlib import resources

    vocab = resources.files("m3ae").joinpath("assets", "bert-base-uncased-vocab.txt").read_text()
    (tmp_path / "vocab.txt").write_text(vocab)
    from_dir = Tokenizer.from_name(str(tmp_path), max_length=8)
    assert from_dir(["a photo of a dog"])[0][0, :5].tolist() == REFERENCE

    from tokenizers import BertWordPieceTokenizer

    BertWordPieceTokenizer(str(tmp_path / "vocab.txt"), lowercase=True).save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_name(str(tmp_path / "tokenizer.json"), max_length=8)
    assert from_json(["a photo of a dog"])[0][0, :5].tolist() == REFERENCE
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


def test_missing_local_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        Tokenizer.from_name(str(tmp_path / "nothing.json"))


def test_hub_name_resolves_from_the_local_cache(tmp_path, monkeypatch):
    from importlib import resources

    from tokenizers import BertWordPieceTokenizer

    pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--tiny-bert" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-bert" / "refs" / "main").write_text("0" * 40)
    with resources.as_file(resources.files("m3ae").joinpath("assets", "bert-base-uncased-vocab.txt")) as vocab:
        BertWordPieceTokenizer(str(vocab), lowercase=True).save(str(snapshot / "tokenizer.json"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    tok = Tokenizer.from_name("someone/tiny-bert", max_length=8)
    assert tok(["a photo of a dog"])[0][0, :5].tolist() == REFERENCE
