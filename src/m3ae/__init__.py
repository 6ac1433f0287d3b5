"""Multimodal Masked Autoencoders (M3AE) in PyTorch."""

from .model import M3AE, ConfigError, M3AEConfig, M3AEEncoding, M3AEOutput

__all__ = ["M3AE", "M3AEConfig", "M3AEEncoding", "M3AEOutput", "ConfigError", "create_model_and_transforms",
           "get_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # open_clip's entry points (m3ae.api) load the data pipeline too: only when asked for, so that
    # `import m3ae` (every command line starts with it) stays the model alone
    if name in ("create_model_and_transforms", "get_tokenizer"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'm3ae' has no attribute {name!r}")
