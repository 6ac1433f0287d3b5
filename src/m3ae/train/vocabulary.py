"""The text vocabulary of a pretraining run, settled before its model is built.

A model trained from scratch on a user's captions reads only the tokens those captions use
(`data.vocab: compact`): with BERT's 30,522 rows, the word embedding's update and the 30,522-way text
head dominate a small model's step (docs/BENCHMARKS.md). The vocabulary is kept in the model's
config.json, so every checkpoint, `save_pretrained` directory and Hub upload carries it, and a
resumed run reads its own back instead of scanning data that may have changed since.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..data import DataConfig
from ..data.loader import caption_sample
from ..data.tokenizer import Tokenizer
from ..model import ConfigError, M3AEConfig
from ..model.files import CONFIG_NAME, step_dirs


def resumed_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint a run with `resume` ("auto" or a step directory) continues from, if any. Any of
    the run's checkpoints holds its vocabulary: the newest one is read, verified or not."""
    if resume == "auto":
        found = step_dirs(run_dir)
        return found[0] if found else None
    return Path(resume) if resume else None


def settle_vocabulary(model: M3AEConfig, data: DataConfig, checkpoint: Path | None) -> M3AEConfig:
    """`model` with its tokenizer recorded and its vocabulary settled: a resumed run's own, the one
    given, or (data.vocab=compact) the tokens of a sample of the captions; the tokenizer's ids must
    fit the embedding either way."""
    if not model.has_text:
        return model
    if checkpoint is not None:
        saved = M3AEConfig.load(checkpoint / CONFIG_NAME)
        if saved.tokenizer not in (None, data.tokenizer):
            raise ConfigError(f"data.tokenizer={data.tokenizer!r}: the run being resumed ({checkpoint}) was "
                              f"trained with {saved.tokenizer!r}")
        model = model.replace(vocab_size=saved.vocab_size, vocabulary=saved.vocabulary)
    elif model.vocabulary is None and data.vocab == "compact":
        tokenizer = Tokenizer.from_name(data.tokenizer)
        captions = caption_sample(data)
        vocabulary = tokenizer.compact_vocabulary(captions)
        logging.getLogger("m3ae.train").info(
            "compact vocabulary: %d of the %d tokens of %s, from %d captions (data.vocab=full keeps them all)",
            len(vocabulary), tokenizer.vocab_size, data.tokenizer, len(captions))
        model = model.replace(vocab_size=len(vocabulary), vocabulary=vocabulary)
    # Token ids beyond the embedding table would fail in the first forward, deep in torch.
    try:
        tokens = Tokenizer.from_name(data.tokenizer, vocabulary=model.vocabulary).vocab_size
    except ValueError as error:
        raise ConfigError(f"model.vocabulary: {error}") from None
    if model.vocab_size < tokens:
        raise ConfigError(f"model.vocab_size={model.vocab_size}: smaller than the {tokens} tokens of "
                          f"data.tokenizer={data.tokenizer!r}")
    return model.replace(tokenizer=data.tokenizer)
