"""Multimodal Masked Autoencoders (M3AE) in PyTorch."""

from .model import M3AE, ConfigError, M3AEConfig, M3AEEncoding, M3AEOutput

__all__ = ["M3AE", "M3AEConfig", "M3AEEncoding", "M3AEOutput", "ConfigError"]
__version__ = "0.1.0"
