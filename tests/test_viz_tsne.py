from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m3ae.viz.tsne import embed_2d, plot_tsne

pytest.importorskip("sklearn")


def test_tsne_separates_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (40, 16)), rng.normal(8, 1, (40, 16))])
    a, b = embed_2d(features, seed=1), embed_2d(features, seed=1)
    np.testing.assert_array_equal(a, b)
    centre_gap = np.linalg.norm(a[:40].mean(0) - a[40:].mean(0))
    assert centre_gap > 3 * max(a[:40].std(0).max(), a[40:].std(0).max())


def test_tsne_figure_has_a_panel_per_model_and_depends_on_features(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    clustered = rng.normal(0, 0.3, (60, 8)) + labels[:, None] * 3.0
    mixed = rng.normal(0, 1, (60, 8))
    plot_tsne({"M3AE": (clustered, labels), "MAE": (mixed, labels)}, tmp_path / "a.png", ["x", "y", "z"])
    plot_tsne({"M3AE": (mixed, labels), "MAE": (mixed, labels)}, tmp_path / "b.png", ["x", "y", "z"])
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"), dtype=np.int16)
    assert a.shape == (500, 1000, 3) and a.std() > 5 and np.abs(a - b).max() > 50
