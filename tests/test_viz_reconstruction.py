"""Reconstruction figures are honest: visible patches are the input's, norm-pix uses visible statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae import M3AE, M3AEConfig
from m3ae.viz.reconstruction import caption_predictions, plot_reconstructions, reconstruct_images

CONFIG = dict(image_size=32, patch_size=8, text_length=6, vocab_size=20, emb_dim=32, depth=1, num_heads=2,
              dec_emb_dim=16, dec_depth=1, dec_num_heads=2)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_pasted_view_keeps_visible_patches_and_takes_hidden_ones_from_the_model(norm_pix):
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(**CONFIG, norm_pix_loss=norm_pix)).eval()
    image = torch.randn(2, 3, 32, 32)
    out = model(image)
    rec = reconstruct_images(model, image, out)
    visible = (1 - out.image_mask)[..., None].bool()
    pasted, original = model.patchify(rec.pasted), model.patchify(image)
    assert torch.equal(pasted.masked_select(visible), original.masked_select(visible))
    hidden = ~visible
    torch.testing.assert_close(pasted.masked_select(hidden), model.patchify(rec.reconstruction).masked_select(hidden))
    if norm_pix:
        # changing only the hidden pixels must not change how the hidden predictions are shown
        changed = model.unpatchify(original + 3.0 * out.image_mask[..., None])
        again = reconstruct_images(model, changed, out)
        torch.testing.assert_close(model.patchify(again.reconstruction), model.patchify(rec.reconstruction))
    else:
        torch.testing.assert_close(rec.reconstruction, model.unpatchify(out.image_pred))


def test_caption_predictions_mark_masked_words_with_guesses():
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(**CONFIG)).eval()
    text = torch.tensor([[3, 4, 5, 6, 0, 0]])
    pad = text == 0
    out = model(torch.randn(1, 3, 32, 32), text, pad, text_noise=torch.tensor([0.9, 0.1, 0.8, 0.7, 0.0, 0.5]))
    (prediction,) = caption_predictions(text, pad, out, decode=lambda i: f"w{i}", top_k=2)
    # keep int(6 · 0.25) = 1 slot: the lowest noise is padding position 4, so all real words are masked
    assert prediction.words == ["w3", "w4", "w5", "w6"] and prediction.removed == [True] * 4
    assert all(len(g) == 2 for g in prediction.guesses)
    assert prediction.render().startswith("[w3] [w4] [w5] [w6]")
    assert len(prediction.render().splitlines()) == 1 + 4  # the caption, then every masked word
    # a figure's row has room for a few guess lines: the rest are counted, not drawn over the next row
    short = prediction.render(max_guesses=1).splitlines()
    assert len(short) == 3 and short[1].startswith("  'w3' -> ") and short[2] == "  … and 3 more masked words"


def test_reconstruction_figure_size_and_content(tmp_path):
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(**CONFIG)).eval()
    image = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    paths = []
    for scale in (1.0, -1.0):
        rec = reconstruct_images(model, image * scale, model(image * scale, image_noise=noise))
        paths.append(plot_reconstructions(rec, tmp_path / f"r{scale}.png", mean=[0.5] * 3, std=[0.25] * 3))
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths)
    assert a.shape == (352, 704, 3) and a.std() > 10 and np.abs(a - b).max() > 50
