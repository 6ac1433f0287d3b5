"""A switch whose optional package is missing says which extra installs it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from m3ae.utils import MissingExtraError


@pytest.mark.parametrize("module, extra, call", [
    ("wandb", "wandb", lambda tmp: _logger(tmp, wandb=True)),
    ("tensorboard", "tensorboard", lambda tmp: _logger(tmp, tensorboard=True)),
    ("h5py", "hdf5", lambda tmp: _hdf5(tmp)),
    ("matplotlib", "viz", lambda tmp: __import__("m3ae.viz.plotting", fromlist=["pyplot"]).pyplot()),
    ("sklearn.manifold", "viz", lambda tmp: __import__("m3ae.viz.tsne", fromlist=["embed_2d"]).embed_2d(np.zeros((5, 2)))),
])
def test_missing_package_names_its_extra(tmp_path, monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` meets where it is not installed
    with pytest.raises(MissingExtraError, match=rf"pip install 'm3ae\[{extra}\]'"):
        call(tmp_path)


def _logger(tmp_path, **switches):
    from m3ae.engine.metrics import LogConfig, MetricsLogger

    MetricsLogger(tmp_path, LogConfig(**switches), True, {}, None)


def _hdf5(tmp_path):
    from m3ae.data.sources import HDF5Source

    (tmp_path / "x.h5").write_bytes(b"")
    HDF5Source(str(tmp_path / "x.h5"), "jpg", "caption")
