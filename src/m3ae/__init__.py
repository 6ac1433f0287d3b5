"""Multimodal Masked Autoencoders (M3AE) in PyTorch."""

from typing import TYPE_CHECKING

__all__ = ["M3AE", "M3AEConfig", "M3AEEncoding", "M3AEOutput", "ConfigError", "create_model_and_transforms",
           "get_tokenizer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import create_model_and_transforms, get_tokenizer
    from .model import M3AE, ConfigError, M3AEConfig, M3AEEncoding, M3AEOutput


def __getattr__(name: str):
    # The public API loads on first use, not on `import m3ae`: the command line (m3ae.cli) must set
    # how OpenMP threads wait before anything imports torch, whose OpenMP runtime reads it once; and
    # open_clip's entry points (m3ae.api) load the data pipeline too.
    if name in ("create_model_and_transforms", "get_tokenizer"):
        from . import api

        return getattr(api, name)
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'm3ae' has no attribute {name!r}")
