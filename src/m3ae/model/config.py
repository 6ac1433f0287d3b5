"""`M3AEConfig`: every hyper-parameter of the model, with the paper's sizes as presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The one typed-field checker, shared with YAML recipes and the command line.
from ..config import ConfigError, from_dict

ModelType = Literal["m3ae", "mae"]
MaskingMode = Literal["per_sample", "shared"]
TextMaskOver = Literal["padded", "real"]
AttentionImpl = Literal["auto", "sdpa", "math"]
PREPROCESSING_KEY = "preprocessing"  # config.json's record of how inputs were prepared (not a field)

# Encoder (width, depth, heads); SPEC 7. The decoder is 512 wide, 8 deep, 16 heads for the paper's
# sizes. `tiny` is ours: small enough to learn the embedded 64 px dataset on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        emb_dim=192, depth=6, num_heads=3, dec_emb_dim=128, dec_depth=2, dec_num_heads=4,
        image_size=64, patch_size=8, text_length=32,
    ),
    "small": dict(emb_dim=384, depth=12, num_heads=6),
    "base": dict(emb_dim=768, depth=12, num_heads=12),
    "large": dict(emb_dim=1024, depth=24, num_heads=16),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16),
}


@dataclass
class M3AEConfig:
    model_type: ModelType = "m3ae"  # "mae": the image-only baseline, without text parameters
    image_size: int = 256  # input image side, in pixels
    patch_size: int = 16  # side of one ViT patch, in pixels
    in_chans: int = 3  # image channels
    text_length: int = 64  # caption tokens (no [CLS]/[SEP]: the model adds its own CLS), padded or cut to this
    # rows of the word embedding and the text head: the tokenizer's vocabulary size (bert-base-uncased:
    # 30522), or the length of `vocabulary`, which pretraining sets (data.vocab=compact)
    vocab_size: int = 30522
    # the tokenizer whose WordPiece segmentation made the text ids (pretraining records data.tokenizer);
    # null: not recorded (official checkpoints: bert-base-uncased)
    tokenizer: str | None = None
    # a compact vocabulary, written by pretraining (data.vocab=compact): the tokenizer's tokens this
    # model reads, id i being vocabulary[i]; any other token reads as [UNK]. null: the tokenizer's ids
    vocabulary: list[str] | None = None
    emb_dim: int = 768  # encoder width
    depth: int = 12  # encoder blocks
    num_heads: int = 12  # encoder attention heads
    dec_emb_dim: int = 512  # decoder width
    dec_depth: int = 8  # decoder blocks
    dec_num_heads: int = 16  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon
    image_mask_ratio: float = 0.75  # fraction of image patches removed
    text_mask_ratio: float = 0.75  # fraction of caption tokens removed
    # "padded": the ratio of all text_length positions, padding included, as the official code (a
    # short caption keeps fewer real words than the ratio says); "real": each caption keeps
    # int(n_real · (1 - text_mask_ratio)) of its real tokens
    text_mask_over: TextMaskOver = "padded"
    image_loss_weight: float = 1.0  # weight of the pixel loss
    text_loss_weight: float = 0.5  # the paper's value; the official flag default (0.1) is not
    output_head_depth: int = 0  # decoder output head: 0 a Linear, k > 0 the official k-layer MLP
    use_type_embedding: bool = True  # add a learned image/text type embedding to the tokens
    norm_pix_loss: bool = False  # pixel targets normalised per patch (MAE's norm_pix_loss)
    image_loss_on_all: bool = False  # loss on every patch instead of the removed ones
    text_loss_on_all: bool = False  # loss on every real token instead of the removed ones
    masking: MaskingMode = "per_sample"  # "shared": one noise vector per batch, as the official code
    # "sdpa": torch's fused kernels; "math": softmax(QK^T)V written out, which ties or beats SDPA on
    # CPU (bench/step_ab.py --switch attention); "auto": sdpa on accelerators, math on CPU
    attn_impl: AttentionImpl = "auto"
    drop_path: float = 0.0  # stochastic depth in the encoder (fine-tuning; 0 in pretraining)
    # the preset these values started from, for the record (on the command line: --preset)
    preset: str | None = field(default=None, metadata={"flag": "--preset"})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def has_text(self) -> bool:
        return self.model_type == "m3ae"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def image_keep(self) -> int:
        return int(self.num_patches * (1 - self.image_mask_ratio))

    def text_keep(self, length: int | None = None) -> int:
        return int((self.text_length if length is None else length) * (1 - self.text_mask_ratio))

    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ConfigError(f"M3AEConfig.{field}={getattr(self, field)!r}: {why}")

        if self.model_type not in ("m3ae", "mae"):
            fail("model_type", "must be 'm3ae' or 'mae'")
        if self.masking not in ("per_sample", "shared"):
            fail("masking", "must be 'per_sample' or 'shared'")
        if self.text_mask_over not in ("padded", "real"):
            fail("text_mask_over", "must be 'padded' or 'real'")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            fail("attn_impl", "must be 'auto', 'sdpa' or 'math'")
        for name in ("image_size", "patch_size", "in_chans", "text_length", "vocab_size", "emb_dim",
                     "depth", "num_heads", "dec_emb_dim", "dec_depth", "dec_num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        if self.image_size % self.patch_size:
            fail("image_size", f"must be divisible by patch_size={self.patch_size}")
        if self.emb_dim % self.num_heads:
            fail("num_heads", f"must divide emb_dim={self.emb_dim}")
        if self.dec_emb_dim % self.dec_num_heads:
            fail("dec_num_heads", f"must divide dec_emb_dim={self.dec_emb_dim}")
        for name in ("emb_dim", "dec_emb_dim"):
            if getattr(self, name) % 4:
                fail(name, "must be divisible by 4 (2-D sin-cos position embedding)")
        for name in ("image_mask_ratio", "text_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "must be in [0, 1)")
        if self.output_head_depth < 0:
            fail("output_head_depth", "must be >= 0")
        for name in ("mlp_ratio", "layer_norm_eps"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a finite number > 0")
        for name in ("image_loss_weight", "text_loss_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be a finite number >= 0")
        if not 0.0 <= self.drop_path < 1.0:
            fail("drop_path", "must be in [0, 1)")
        if self.image_keep < 1:
            fail("image_mask_ratio", f"keeps no patch of {self.num_patches}")
        if self.vocabulary is not None:
            if len(self.vocabulary) != self.vocab_size:
                fail("vocab_size", f"must be the length of the vocabulary ({len(self.vocabulary)} tokens)")
            if len(set(self.vocabulary)) != len(self.vocabulary) or not all(isinstance(t, str) for t in self.vocabulary):
                raise ConfigError("M3AEConfig.vocabulary: must list distinct token strings")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "M3AEConfig":
        if name not in PRESETS:
            raise ConfigError(f"M3AEConfig.preset={name!r}: unknown; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def replace(self, **changes: Any) -> "M3AEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "M3AEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"M3AEConfig: unknown field(s) {unknown}")
        return cls(**values)

    def save(self, path: str | Path, preprocessing: dict[str, Any] | None = None) -> None:
        """config.json: the fields, and `preprocessing` (how inputs were prepared) when known."""
        extra = {PREPROCESSING_KEY: preprocessing} if preprocessing is not None else {}
        Path(path).write_text(json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, section: str | None = None) -> "M3AEConfig":
        """A config.json (or its `section`, e.g. a classifier checkpoint's "backbone"), every field
        type-checked as the command line's (`"false"` is not false); errors name the file and the field."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: not a readable JSON file ({error})") from None
        if section is not None:
            values = values.get(section) if isinstance(values, dict) else None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of M3AEConfig fields{f' under {section!r}' if section else ''}")
        values.pop(PREPROCESSING_KEY, None)  # the data pipeline's record, not a field of the network
        try:
            return from_dict(cls, values, section or "")
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
