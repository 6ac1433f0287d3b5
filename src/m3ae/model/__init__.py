"""The M3AE model: configuration, layers, masking, losses."""

from .config import PRESETS, ConfigError, M3AEConfig
from .m3ae import M3AE, M3AEEncoding, M3AEOutput

__all__ = ["M3AE", "M3AEConfig", "M3AEEncoding", "M3AEOutput", "ConfigError", "PRESETS"]
