"""Attention maps (paper Figs. 7-8): probabilities are proper distributions, figures depend on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae import M3AE, M3AEConfig
from m3ae.viz.attention import (attention_matrix, patch_to_words, plot_patch_attention, plot_word_attention,
                                word_to_patches)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(image_size=32, patch_size=8, text_length=6, vocab_size=50, emb_dim=32, depth=2,
                            num_heads=4, dec_emb_dim=16, dec_depth=1, dec_num_heads=2)).eval()
    text = torch.tensor([[5, 9, 11, 0, 0, 0]])
    return model, torch.randn(1, 3, 32, 32), text, text == 0


@pytest.mark.parametrize("layer, head", [(-1, "mean"), (0, 2), ("mean", "mean"), ("mean", "max")])
def test_aggregated_rows_sum_to_one(inputs, layer, head):
    model, image, text, pad = inputs
    attention = attention_matrix(model, image, text, pad, layer=layer, head=head)[0]
    assert attention.shape == (1 + 16 + 6, 1 + 16 + 6)
    torch.testing.assert_close(attention.sum(-1), torch.ones(23))
    assert attention[:, 1 + 16 + 3 :].abs().max() == 0  # padding is never attended to
    assert (word_to_patches(attention, 1, 16) >= 0).all() and word_to_patches(attention, 1, 16).sum() <= 1
    assert patch_to_words(attention, 4, 16, 3).shape == (3,)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_word_attention_figure_size_and_content(inputs, tmp_path):
    model, image, text, pad = inputs
    picture = np.random.default_rng(0).random((32, 32, 3))
    words = ["a", "red", "dog"]
    grid_a = {1: np.eye(4), 2: np.ones((4, 4))}
    grid_b = {1: np.eye(4)[::-1], 2: np.ones((4, 4))}
    a = _pixels(plot_word_attention(picture, words, grid_a, tmp_path / "a.png"))
    b = _pixels(plot_word_attention(picture, words, grid_b, tmp_path / "b.png"))
    assert a.shape == (300, 780, 3)
    assert a.std() > 10 and np.abs(a - b).max() > 50  # not blank, and the map shows


def test_patch_attention_figure_depends_on_weights(tmp_path):
    picture = np.zeros((32, 32, 3))
    words = ["a", "red", "dog", "runs"]
    a = _pixels(plot_patch_attention(picture, words, 5, 4, np.array([0.0, 0.1, 0.9, 0.0]), tmp_path / "a.png"))
    b = _pixels(plot_patch_attention(picture, words, 5, 4, np.array([0.9, 0.1, 0.0, 0.0]), tmp_path / "b.png"))
    assert a.shape == (300, 800, 3) and np.abs(a - b).max() > 50


def _red(pixels):
    return (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)


def test_word_attention_panels_carry_a_colour_bar_of_the_raw_scale(tmp_path):
    # a grey picture and a constant overlay: the only saturated blue and red come from colour bars
    picture = np.full((32, 32, 3), 0.5)
    flat = _pixels(plot_word_attention(picture, ["a", "b"], {0: np.full((4, 4), 0.2)}, tmp_path / "flat.png"))
    ramp = _pixels(plot_word_attention(picture, ["a", "b"], {0: np.arange(16.0).reshape(4, 4) / 120},
                                       tmp_path / "ramp.png"))
    blue = (ramp[..., 2] > 180) & (ramp[..., 0] < 60)
    # the bar is right of the panel, opaque: jet's both ends, in a column strip the image does not reach
    columns = np.flatnonzero(_red(ramp).any(axis=0) & blue.any(axis=0))
    assert columns.size >= 3 and columns.min() > ramp.shape[1] // 2
    assert _red(ramp).sum() > 50 and blue.sum() > 50 and flat.std() > 5


def test_a_border_patch_keeps_its_whole_outline(tmp_path):
    picture, words, weights = np.zeros((32, 32, 3)), ["a", "dog"], np.array([0.3, 0.7])
    corner = _red(_pixels(plot_patch_attention(picture, words, 15, 4, weights, tmp_path / "corner.png")))
    inside = _red(_pixels(plot_patch_attention(picture, words, 5, 4, weights, tmp_path / "inside.png")))
    # the bottom-right patch's outline was cut off on its two outer sides by the axes' clip
    left = slice(0, corner.shape[1] // 2)  # the image panel, not the caption
    assert corner[:, left].sum() >= 0.9 * inside[:, left].sum() > 0
