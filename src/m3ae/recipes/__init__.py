"""Pretraining recipes: YAML files of `PretrainConfig` sections, shipped inside the package so that an
installed wheel finds them from any directory."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

DIRECTORY = Path(__file__).resolve().parent
DEFAULT = "tiny"


def names() -> list[str]:
    return sorted(p.stem for p in DIRECTORY.glob("*.yaml"))


def resolve(name: str) -> Path:
    """A YAML file's path as given, else the packaged recipe of that name."""
    for path in (Path(name), DIRECTORY / f"{name}.yaml"):
        if path.is_file():
            return path
    raise ConfigError(f"--config {name!r}: no such file or recipe (recipes: {', '.join(names())})")
