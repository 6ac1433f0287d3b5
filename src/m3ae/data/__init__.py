"""Data pipeline: image-text sources, the paper's tokenizer offline, unpaired mixing, exact resume.

See docs/DATA.md.
"""

from m3ae.data.config import DataConfig, WeightedSource
from m3ae.data.loader import PretrainLoader, build_eval_loader, build_pretrain_loader
from m3ae.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "PretrainLoader", "Tokenizer", "WeightedSource", "build_eval_loader",
           "build_pretrain_loader"]
