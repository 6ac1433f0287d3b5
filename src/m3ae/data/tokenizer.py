"""Caption tokenisation as in the paper: bert-base-uncased WordPiece, no special tokens, padded."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

SHIPPED_VOCABS = {"bert-base-uncased": "bert-base-uncased-vocab.txt",
                  "m3ae-embedded": "m3ae-embedded-vocab.txt"}  # the closed vocabulary of data.synth captions


class Tokenizer:
    """Batch tokeniser returning `(ids, padding_mask)`; padding id 0, mask True = padding."""

    def __init__(self, backend, max_length: int = 64, name: str = "") -> None:
        if max_length < 1:
            raise ValueError(f"Tokenizer max_length={max_length}: must be positive")
        self.backend = backend
        self.max_length = max_length
        self.name = name
        self.pad_id = 0
        self.unk_id = backend.token_to_id("[UNK]")
        # Official M3AE calls the HF tokenizer with add_special_tokens=False: no [CLS]/[SEP].
        backend.no_padding()
        backend.no_truncation()

    @classmethod
    def from_name(cls, name: str = "bert-base-uncased", max_length: int = 64) -> "Tokenizer":
        from tokenizers import BertWordPieceTokenizer
        from tokenizers import Tokenizer as HFTokenizer

        if name in SHIPPED_VOCABS:
            vocab = resources.files("m3ae").joinpath("assets", SHIPPED_VOCABS[name])
            with resources.as_file(vocab) as vocab_path:
                backend = BertWordPieceTokenizer(str(vocab_path), lowercase=True)
            return cls(backend, max_length, name)
        path = Path(name).expanduser()
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if path.is_file() and path.suffix == ".json":
            return cls(HFTokenizer.from_file(str(path)), max_length, name)
        if path.is_dir() and (path / "vocab.txt").is_file():
            return cls(BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=True), max_length, name)
        if path.is_file() and path.suffix == ".txt":
            return cls(BertWordPieceTokenizer(str(path), lowercase=True), max_length, name)
        if path.suffix in (".json", ".txt") or name.startswith((".", "/", "~")) or path.exists():
            raise FileNotFoundError(f"tokenizer {name!r}: no tokenizer.json or vocab.txt at this path")
        cached = _hub_cache_file(name)
        if cached is not None:
            return cls.from_name(cached, max_length)
        try:
            return cls(HFTokenizer.from_pretrained(name), max_length, name)
        except Exception as error:  # the hub client raises many types; all mean "not available"
            raise ValueError(
                f"tokenizer {name!r}: not a shipped vocabulary ({sorted(SHIPPED_VOCABS)}), not a local "
                f"tokenizer.json / vocab.txt / directory, and not loadable from the Hugging Face hub ({error})"
            ) from error

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Untruncated ids of each text, tokenised as one batch."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        length = max_length or self.max_length
        ids = torch.zeros((len(texts), length), dtype=torch.long)
        padding = torch.ones((len(texts), length), dtype=torch.bool)
        for row, token_ids in enumerate(self.encode(texts)):
            token_ids = token_ids[:length]
            ids[row, : len(token_ids)] = torch.tensor(token_ids, dtype=torch.long)
            padding[row, : len(token_ids)] = False
        return ids, padding


def _hub_cache_file(name: str) -> str | None:
    """A tokenizer file of hub model `name` already in the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    for filename in ("tokenizer.json", "vocab.txt"):
        try:
            return hf_hub_download(name, filename, local_files_only=True)
        except Exception:  # not cached (the hub client's error types vary across versions)
            continue
    return None
