"""Configuration of the data pipeline: one typed dataclass that training configs embed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from m3ae.config import ConfigError

# Per-channel statistics (RGB, in [0, 1] units) used by the official M3AE release.
NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cc12m": ((0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

DEFAULT_IMAGE_SIZE = 256


class SizeMismatchError(ConfigError):
    """A data.image_size that disagrees with the model's: the same user error in every command."""

FORMATS = ("auto", "wds", "hdf5", "manifest", "folder", "flat", "parquet")


@dataclass
class WeightedSource:
    """An extra source mixed into each batch; `weight` is relative to the main source's weight 1."""

    source: str
    weight: float = 1.0
    format: str = "auto"  # the source's layout: auto (from its names) or one in docs/DATA.md

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"WeightedSource.source={self.source!r}: expected a non-empty path or pattern")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"WeightedSource.weight={self.weight!r}: expected a finite number")
        if self.format not in FORMATS:
            raise ValueError(f"WeightedSource.format={self.format!r}: expected one of {FORMATS}")


@dataclass
class TableColumns:
    """Column names of CSV/TSV/JSONL tables and parquet files (open_clip's --csv-img-key,
    --csv-caption-key and --csv-separator set `image`, `caption` and `separator`)."""

    # "": "image" in tables; in parquet the first of jpg, png, webp, image present (open_clip's
    # --csv-img-key is accepted too)
    image: str = field(default="", metadata={"aliases": ("--csv-img-key",)})
    # caption column (open_clip's --csv-caption-key is accepted too)
    caption: str = field(default="caption", metadata={"aliases": ("--csv-caption-key",)})
    label: str = "label"  # class label column
    key: str = "key"  # sample key column
    # "": tab for .tsv files, comma otherwise (open_clip's --csv-separator is accepted too)
    separator: str = field(default="", metadata={"aliases": ("--csv-separator",)})

    def __post_init__(self) -> None:
        if self.separator.startswith("\\"):  # "\t" as typed in a shell or YAML
            self.separator = self.separator.encode().decode("unicode_escape")
        if len(self.separator) > 1:
            raise ValueError(f"DataConfig.columns.separator={self.separator!r}: expected one character")


@dataclass
class DataConfig:
    # Main image-text source: a path, a glob, a brace pattern ("shards-{0000..0009}.tar"), a URL or
    # `pipe:` command, a comma-separated list of those, or "embedded" for the procedural dataset;
    # null (the scale recipes): must be given.
    source: str | None = "embedded"
    format: str = "auto"  # the source's layout: auto (from its names) or one in docs/DATA.md
    embedded_root: str = "data/embedded"  # where the embedded dataset is generated (once) and read
    columns: TableColumns = field(default_factory=TableColumns)
    # null: the model's size (training and evaluation commands fill it in; a standalone loader reads
    # DEFAULT_IMAGE_SIZE); a size that disagrees with the model's is an error (`follow_model`).
    image_size: int | None = None
    # Images with a side shorter than this (one ViT patch) carry no usable patch: skipped.
    min_image_size: int = 16
    text_length: int = 64  # caption tokens; training and evaluation commands use the model's
    tokenizer: str = "bert-base-uncased"  # tokenizer name or tokenizer.json path
    # Pretraining from scratch: "compact" sizes the model's word embedding and text head to the tokens
    # the captions use (scanned from a sample of `vocab_sample` captions, kept in the model's
    # config.json; other tokens read as [UNK]); "full": the tokenizer's whole vocabulary (30522 rows
    # for BERT, as the paper's checkpoints)
    vocab: Literal["compact", "full"] = "compact"
    vocab_sample: int = 20_000  # captions read, spread over the source's shards, to make a compact vocabulary
    # A preset name, or "custom" with `mean`/`std` set.
    normalization: str = "cc12m"
    mean: tuple[float, float, float] | None = None  # per-channel mean (normalization custom)
    std: tuple[float, float, float] | None = None  # per-channel std (normalization custom)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area range of the training random-resized crop
    horizontal_flip: bool = True  # random horizontal flips in training
    # Fraction of pairs that keep their caption (the paper's 10/20/30/100% study).
    paired_fraction: float = 1.0
    # deterministic: the same pairs lose their caption every epoch; random: redrawn each epoch
    caption_drop: str = "deterministic"
    # Extra image-only sources mixed into each batch: [{source, weight, format}, ...]
    image_only_sources: list[WeightedSource] = field(default_factory=list)
    text_only_sources: list[WeightedSource] = field(default_factory=list)  # text-only ones, likewise
    unpaired_text_length: int = 256  # tokens per unpaired text sample
    unpaired_text_batch_size: int = 0  # 0: same as the image batch size
    num_workers: int = 0  # loader worker processes; 0 reads in the main process
    # MB of samples each loader process keeps in memory for its later epochs and loaders (shard
    # records, then their decoded images); 0: off. Pays when the set fits and is read many times
    # (a small set trained for several epochs); batches are the same either way.
    memory_cache_mb: int = 0
    # Records are shuffled within a shard through a buffer of this many records (shard order is
    # permuted every epoch); 0 reads shards in order.
    shuffle_buffer: int = 1000
    # Index-addressable sources (HDF5, manifest, folder) are cut into units of this many samples,
    # which then play the role of shards.
    index_unit_size: int = 64
    seed: int = 0  # seed of shuffling, augmentation and caption drop
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    # Labelled evaluation sources; empty: derived from `source` (see docs/DATA.md).
    eval_train_source: str = field(default="", metadata={"flag": "--train-data"})
    # the evaluation split's source
    eval_val_source: str = field(default="", metadata={"flag": "--val-data"})
    # > 0: both splits come from the train source, this fraction of it held out by key hash.
    eval_val_fraction: float = field(default=0.0, metadata={"flag": "--val-fraction"})

    def __post_init__(self) -> None:
        if self.source is None:  # a recipe that must never fall back to the toy set
            raise ValueError("data.source: not given, and this config (a scale recipe) never falls back to the toy set: "
                             "name your data with --data.source (shards, a folder, a table, parquet or HDF5; docs/DATA.md)")
        self.image_only_sources = [_as_weighted(s, "image_only_sources") for s in self.image_only_sources]
        self.text_only_sources = [_as_weighted(s, "text_only_sources") for s in self.text_only_sources]
        if self.format not in FORMATS:
            raise ValueError(f"DataConfig.format={self.format!r}: expected one of {FORMATS}")
        if self.caption_drop not in ("deterministic", "random"):
            raise ValueError(f"DataConfig.caption_drop={self.caption_drop!r}: expected 'deterministic' or 'random'")
        if self.vocab not in ("compact", "full"):
            raise ValueError(f"DataConfig.vocab={self.vocab!r}: expected 'compact' or 'full'")
        if not 0.0 <= self.paired_fraction <= 1.0:
            raise ValueError(f"DataConfig.paired_fraction={self.paired_fraction}: expected a value in [0, 1]")
        sizes = (1 if self.image_size is None else self.image_size, self.text_length, self.unpaired_text_length)
        if min(sizes) < 1:
            raise ValueError("DataConfig.image_size, text_length and unpaired_text_length must be positive")
        if not 0.0 <= self.eval_val_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_val_fraction={self.eval_val_fraction}: expected a value in [0, 1)")
        self._check_ranges()
        self.normalization_stats()

    def follow_model(self, image_size: int, model_field: str = "model.image_size") -> None:
        """Images are read at the model's size: fills an unset `image_size`, refuses another one
        (silently replacing it would train or score at a size the user did not ask for)."""
        if self.image_size is not None and self.image_size != image_size:
            raise SizeMismatchError(f"data.image_size={self.image_size} disagrees with {model_field}={image_size}: "
                                    f"the data are read at the model's size; drop data.image_size or change "
                                    f"{model_field}")
        self.image_size = image_size

    def _check_ranges(self) -> None:
        # Values that would otherwise pass here and fail minutes later inside a DataLoader worker.
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"DataConfig.crop_scale={list(self.crop_scale)}: expected 0 < min <= max <= 1")
        for name, least in (("num_workers", 0), ("memory_cache_mb", 0), ("seed", 0), ("unpaired_text_batch_size", 0), ("vocab_sample", 1),
                            ("shuffle_buffer", 0), ("index_unit_size", 1), ("min_image_size", 1),
                            ("max_image_pixels", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r}: must be >= {least}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and not all(math.isfinite(v) for v in values):
                raise ValueError(f"DataConfig.{name}={values!r}: must be finite")

    def preprocessing(self) -> dict:
        """How this pipeline prepares images, as config.json records it beside the model's fields
        (`m3ae.create_model_and_transforms` and the HF export read it back). The tokenizer is not
        here: it is the model's own field (`M3AEConfig.tokenizer`), recorded once."""
        mean, std = self.normalization_stats()
        return {"image_mean": list(mean), "image_std": list(std),
                "crop_scale": list(self.crop_scale), "horizontal_flip": self.horizontal_flip}

    def normalization_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.normalization == "custom":
            if self.mean is None or self.std is None or len(self.mean) != 3 or len(self.std) != 3:
                raise ValueError("DataConfig.normalization='custom' needs 3-element `mean` and `std`")
            if min(self.std) <= 0:
                raise ValueError(f"DataConfig.std={self.std}: must be positive")
            return tuple(self.mean), tuple(self.std)
        if self.normalization not in NORMALIZATION_PRESETS:
            raise ValueError(
                f"DataConfig.normalization={self.normalization!r}: expected 'custom' or one of "
                f"{sorted(NORMALIZATION_PRESETS)}"
            )
        return NORMALIZATION_PRESETS[self.normalization]


def _as_weighted(item: WeightedSource | dict | str, field_name: str) -> WeightedSource:
    # YAML configs give plain strings or mappings; accept both so configs stay short.
    if isinstance(item, WeightedSource):
        source = item
    elif isinstance(item, str):
        source = WeightedSource(item)
    elif isinstance(item, dict):
        source = WeightedSource(**item)
    else:
        raise TypeError(f"DataConfig.{field_name}: entries must be str, dict or WeightedSource, got {item!r}")
    if source.weight <= 0:
        raise ValueError(f"DataConfig.{field_name}: weight of {source.source!r} must be positive")
    return source


def runs_or_fetches(spec: str) -> bool:
    """Whether reading a source spec may run a command (`pipe:`) or fetch a URL: anywhere in it, since
    a pattern joins several ("a.tar::pipe:curl ...") and braces expand ("{pipe:x,y}")."""
    return "pipe:" in spec or "://" in spec.replace("file://", "")


def source_fields(cfg: DataConfig) -> dict[str, str]:
    """{dotted field: spec} of every data source a config names."""
    fields = {f"data.{name}": getattr(cfg, name) for name in ("source", "eval_train_source", "eval_val_source")}
    for name in ("image_only_sources", "text_only_sources"):
        fields.update({f"data.{name}[{i}].source": s.source for i, s in enumerate(getattr(cfg, name))})
    return fields


def refuse_stored_commands(cfg: DataConfig, origin: str, typed: Iterable[str] = ()) -> None:
    """Refuses a config read back from a run directory (`origin`) whose sources run a command or
    fetch a URL, unless the user typed that field again (`typed`: dotted names, "data.source" or
    "data.image_only_sources"): a run directory from someone else must not be code."""
    typed = set(typed)
    for name, spec in source_fields(cfg).items():
        if runs_or_fetches(spec) and name not in typed and name.partition("[")[0] not in typed:
            flag = "--" + name.partition("[")[0].replace("_", "-")
            raise ConfigError(f"{name}={spec[:80]!r} (from {origin}) runs a command or fetches a URL; a stored config "
                              f"does not run it unless you type it again ({flag} ...)")
