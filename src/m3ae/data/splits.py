"""The two splits of a labelled evaluation: what a probe or k-NN fits on and what it scores.

A score measured on the data the classifier was fitted on says nothing about transfer, so the
splits must not share a file. When a source has no separate splits (a class folder without
`train/` and `val/`), the user either names one (`eval_val_source`) or holds out a fraction of it
by key hash: the same keys every run, on every machine, in any reading order.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

from m3ae.data.config import DataConfig
from m3ae.data.factory import open_source
from m3ae.data.layouts import ParquetSource
from m3ae.data.sources import FolderSource, HDF5Source, ManifestSource, RawRecord, Source, WebDatasetSource, _is_remote

_HASH_BUCKETS = 1_000_000


def key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass"))


def held_out(key: str, fraction: float) -> bool:
    return key_hash(key) % _HASH_BUCKETS < fraction * _HASH_BUCKETS


class OverlappingSplitsError(ValueError):
    pass


class HashSplitSource(Source):
    """The records of `source` whose key falls in the held-out fraction (`val`) or outside it."""

    def __init__(self, source: Source, fraction: float, val: bool) -> None:
        self.source, self.fraction, self.val = source, fraction, val
        part = f"{fraction:g} held out" if val else f"all but {fraction:g}"
        self.name = f"{source.name} [{part} by key hash]"

    def units(self) -> Sequence[int]:
        return self.source.units()

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        return (r for r in self.source.read_unit(unit) if held_out(r.key, self.fraction) == self.val)


class JoinedSource(Source):
    """Sources read one after the other, as one: every sample of a root holding train/ and val/."""

    def __init__(self, parts: Sequence[Source], key_prefixes: Sequence[str] | None = None) -> None:
        self.parts, self.key_prefixes = list(parts), key_prefixes
        self.name = " + ".join(part.name for part in self.parts)
        self._units = [(i, unit) for i, part in enumerate(self.parts) for unit in part.units()]

    def units(self) -> Sequence[int]:
        return range(len(self._units))

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        part, inner = self._units[unit]
        records = self.parts[part].read_unit(inner)
        if self.key_prefixes is None:
            return records
        return (replace(r, key=self.key_prefixes[part] + r.key) for r in records)


def has_split(spec: str | None, split: str) -> bool:
    """Whether the source names its own `split`: the embedded set, or a root with that subfolder."""
    return spec == "embedded" or os.path.isdir(os.path.join(spec or "", split))


@dataclass(frozen=True)
class EvalSplit:
    """How the two splits were chosen: `separate` sources, or a `key-hash` split of one source."""

    train: str
    val: str
    method: str
    val_fraction: float = 0.0
    # class name of each label index, the train split's for both splits (None: the data name none)
    classes: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"evaluation split ({self.method}): fit on {self.train}; score on {self.val}"


def open_eval_split(cfg: DataConfig, split: str) -> Source:
    """The labelled source of `split` ("train" or "val") as `cfg` defines it; "all": every sample of
    `cfg.source`, no split applied (what embedding a source reads)."""
    kwargs = dict(role="labelled", unit_size=cfg.index_unit_size, embedded_root=cfg.embedded_root,
                  columns=cfg.columns)
    if split == "all":  # a root of train/ and val/ (or the embedded set): both, val numbered as train
        whole = replace(cfg, eval_train_source="", eval_val_source="", eval_val_fraction=0.0)
        splits = [s for s in ("train", "val") if has_split(cfg.source, s)]
        if not splits:
            return open_source(cfg.source, cfg.format, **kwargs)
        parts = [open_eval_split(whole, s) for s in splits]
        if len(parts) == 1:
            return parts[0]
        # keys relative to the root (train/cat/1, val/cat/1): each split's own keys may repeat
        return JoinedSource(parts, None if cfg.source == "embedded" else [f"{s}/" for s in splits])
    if cfg.eval_val_fraction > 0:
        base = open_source(cfg.eval_train_source or cfg.source, cfg.format, split="train", **kwargs)
        return HashSplitSource(base, cfg.eval_val_fraction, val=split == "val")
    spec = getattr(cfg, f"eval_{split}_source") or cfg.source
    source = open_source(spec, cfg.format, split=split, **kwargs)
    if split == "val" and isinstance(source, FolderSource) and source.classes:
        # Class folders are numbered by sorted name: each split alone would number a class set that
        # differs (a folder missing or extra) differently, and the score would compare wrong indices.
        train = open_eval_split(cfg, "train")
        names = class_names(train)
        # a root holding only val/ has no train split of its own to align with (the figures read it)
        inside = Path(source.name).resolve().is_relative_to(Path(train.name).resolve())
        if names is not None and not inside:
            source.use_classes(names, train.name)
    return source


def class_names(source: Source) -> list[str] | None:
    """The class name of each label index of a labelled source, where the source names them (class
    folders); None otherwise."""
    base = source.source if isinstance(source, HashSplitSource) else source
    base = base.parts[0] if isinstance(base, JoinedSource) else base  # the others are numbered as it
    return list(base.classes) if isinstance(base, FolderSource) and base.classes else None


def _footprint(source: Source) -> set[str]:
    """The files (or HDF5 datasets) a source reads its images from."""
    if isinstance(source, WebDatasetSource):
        return {s if _is_remote(s) else os.path.realpath(s) for s in source.shards}
    if isinstance(source, HDF5Source):
        return {f"{os.path.realpath(source.path)}#{source.fields[0]}"}
    if isinstance(source, FolderSource):
        return {os.path.realpath(path) for path, _ in source.files}
    if isinstance(source, ParquetSource):
        return {os.path.realpath(path) for path, _ in source.groups}
    if isinstance(source, ManifestSource):
        return {os.path.realpath(source.root / str(row["image"])) for row in source.rows if row}
    return {source.name}


def check_eval_split(cfg: DataConfig) -> EvalSplit:
    """The split an evaluation will use; `OverlappingSplitsError` when its val split would score
    samples of its train split."""
    if cfg.eval_val_fraction > 0:
        if cfg.eval_val_source:
            raise ValueError(f"evaluation data: both a val source ({cfg.eval_val_source!r}) and a val fraction "
                             f"({cfg.eval_val_fraction}) were given; choose one")
        train, val = (open_eval_split(cfg, s) for s in ("train", "val"))
        return EvalSplit(train.name, val.name, "key-hash", cfg.eval_val_fraction, class_names(train))
    train, val = (open_eval_split(cfg, s) for s in ("train", "val"))
    shared = _footprint(train) & _footprint(val)
    if shared:
        raise OverlappingSplitsError(
            f"evaluation data: the val split {val.name!r} reads {len(shared)} file(s) of the train split "
            f"{train.name!r}, so the score would be measured on the training data; pass --val-data with a "
            f"separate split, or --val-fraction 0.2 to hold out a fixed fifth by key hash")
    return EvalSplit(train.name, val.name, "separate", classes=class_names(train))
