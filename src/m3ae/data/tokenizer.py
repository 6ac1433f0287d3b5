"""Caption tokenisation as in the paper: bert-base-uncased WordPiece, no special tokens, padded.

A compact vocabulary keeps the tokenizer's segmentation and renumbers only the tokens a corpus uses
(plus the special ones) to 0..V-1, so that a model trained on a user's captions carries a V-row
embedding and text head instead of the tokenizer's 30,522 (`compact_vocabulary`; ids it does not
list read as [UNK]). Renumbering rather than a smaller WordPiece vocabulary keeps every caption's
token count and pieces exactly the official ones: a word the corpus never showed becomes [UNK]
pieces in place instead of being re-split into other pieces.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SHIPPED_VOCABS = {"bert-base-uncased": "bert-base-uncased-vocab.txt",
                  "m3ae-embedded": "m3ae-embedded-vocab.txt"}  # the closed vocabulary of data.synth captions


UNK = "[UNK]"


class Tokenizer:
    """Batch tokeniser returning `(ids, padding_mask)`; padding id 0, mask True = padding. With a
    `vocabulary` (the backend's tokens the model reads, id i being vocabulary[i]) ids are compact."""

    def __init__(self, backend, max_length: int = 64, name: str = "", vocabulary: Sequence[str] | None = None) -> None:
        if max_length < 1:
            raise ValueError(f"Tokenizer max_length={max_length}: must be positive")
        self.backend = backend
        self.max_length = max_length
        self.name = name
        self.pad_id = 0
        # Official M3AE calls the HF tokenizer with add_special_tokens=False: no [CLS]/[SEP].
        backend.no_padding()
        backend.no_truncation()
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self._compact = None if vocabulary is None else self._compact_ids(self.vocabulary)
        self.unk_id = self.token_to_id(UNK)

    def _compact_ids(self, vocabulary: list[str]) -> np.ndarray:
        """backend id -> compact id, [UNK]'s for every token the vocabulary does not list."""
        where = f"vocabulary of tokenizer {self.name!r}"
        if UNK not in vocabulary:
            raise ValueError(f"{where}: lacks {UNK}, which every unlisted token reads as")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"{where}: lists a token twice")
        backend_ids = [self.backend.token_to_id(token) for token in vocabulary]
        missing = [token for token, i in zip(vocabulary, backend_ids) if i is None]
        if missing:
            raise ValueError(f"{where}: {len(missing)} token(s) the tokenizer does not have, e.g. {missing[:3]} "
                             f"(a vocabulary made with another tokenizer?)")
        if backend_ids[0] != self.pad_id:
            raise ValueError(f"{where}: id 0 must be the padding token {self.backend.id_to_token(self.pad_id)!r}, "
                             f"not {vocabulary[0]!r}")
        table = np.full(self.backend.get_vocab_size(), vocabulary.index(UNK), dtype=np.int64)
        table[backend_ids] = np.arange(len(vocabulary))
        return table

    def compact_vocabulary(self, texts: Sequence[str]) -> list[str]:
        """The tokens `texts` use plus the special ones (padding first), in the tokenizer's id order:
        the `vocabulary` of a compact tokenizer for a model trained on such texts."""
        if self.backend.token_to_id(UNK) is None:
            raise ValueError(f"tokenizer {self.name!r} has no {UNK} token: a compact vocabulary needs one")
        used = {self.pad_id, self.backend.token_to_id(UNK)}
        used.update(i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)
        for ids in self._backend_ids(texts):
            used.update(ids)
        return [self.backend.id_to_token(i) for i in sorted(used)]

    @classmethod
    def for_model(cls, config, name: str | None = None) -> "Tokenizer":
        """The tokenizer of a model's text ids, from its `M3AEConfig`: `name`, else the tokenizer the
        model records, else bert-base-uncased; the model's text length and compact vocabulary, if any."""
        return cls.from_name(name or config.tokenizer or "bert-base-uncased", config.text_length, config.vocabulary)

    @classmethod
    def from_name(cls, name: str = "bert-base-uncased", max_length: int = 64,
                  vocabulary: Sequence[str] | None = None) -> "Tokenizer":
        if vocabulary is not None:
            return cls(cls.from_name(name, max_length).backend, max_length, name, vocabulary)
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
        return self.backend.get_vocab_size() if self.vocabulary is None else len(self.vocabulary)

    def token_to_id(self, token: str) -> int | None:
        if self.vocabulary is None:
            return self.backend.token_to_id(token)
        return self.vocabulary.index(token) if token in self.vocabulary else None

    def id_to_token(self, index: int) -> str:
        return self.backend.id_to_token(index) if self.vocabulary is None else self.vocabulary[index]

    def _backend_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Untruncated ids of each text, tokenised as one batch."""
        ids = self._backend_ids(texts)
        return ids if self._compact is None else [self._compact[row].tolist() for row in ids]

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
