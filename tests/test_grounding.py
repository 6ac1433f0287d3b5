"""eval.grounding: masked-word accuracy with each pair's own image vs another one's."""

from __future__ import annotations

import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.eval.grounding import grounding_accuracy

TINY = dict(emb_dim=32, depth=2, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2, image_size=16,
            patch_size=8, text_length=8)


class ReadsTheImage(M3AE):
    """Names, at every text position, the word whose id is written in the image's first pixel: it
    is always right with its own image and always wrong with another one."""

    def forward(self, image, text, text_padding_mask, **kw):
        out = super().forward(image, text, text_padding_mask, **kw)
        ids = image[:, 0, 0, 0].long()  # (B,)
        out.text_logits = torch.nn.functional.one_hot(ids, self.config.vocab_size).float()[:, None].expand_as(
            out.text_logits)
        return out


def _batch(ids: list[int], length: int = 8, real: int = 8) -> dict:
    image = torch.zeros(len(ids), 3, 16, 16)
    image[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float)
    padding = torch.zeros(len(ids), length, dtype=torch.bool)
    padding[:, real:] = True
    return {"image": image, "text": torch.tensor(ids)[:, None].expand(-1, length).clone(),
            "text_padding_mask": padding}


def test_a_model_that_reads_the_image_scores_all_with_its_own_and_none_with_another():
    model = ReadsTheImage(M3AEConfig(**TINY))
    batches = [_batch([5, 6, 7, 8], real=6), _batch([9, 10, 11])]
    result = grounding_accuracy(model, batches, torch.device("cpu"), word_sets={"all": None, "five": [5, 9]})
    assert result["all"]["matched"] == 100.0 and result["all"]["mismatched"] == 0.0 and result["all"]["gap"] == 100.0
    # removed slots are drawn over all 8 positions (padding included, as in training); padding is never scored
    removed = 8 - model.config.text_keep(8)
    assert result["all"]["words"] <= 7 * removed and result["all"]["words"] >= 3 * removed
    assert 0 < result["five"]["words"] <= 2 * removed and result["five"]["matched"] == 100.0


def test_identical_images_leave_no_gap_and_the_count_is_every_removed_real_word():
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(**TINY))
    batch = {"image": torch.randn(1, 3, 16, 16).expand(4, -1, -1, -1).clone(),
             "text": torch.randint(1000, 2000, (4, 8)), "text_padding_mask": torch.zeros(4, 8, dtype=torch.bool)}
    result = grounding_accuracy(model, [batch], torch.device("cpu"))["all_words"]
    assert result["gap"] == 0.0 and result["words"] == 4 * (8 - model.config.text_keep(8))
    again = grounding_accuracy(model, [batch], torch.device("cpu"))["all_words"]
    assert again == result  # same seed, same masks


def test_bad_inputs_are_refused_with_a_reason():
    model = M3AE(M3AEConfig(**TINY))
    with pytest.raises(ValueError, match="no captions"):
        grounding_accuracy(model, [{"image": torch.zeros(2, 3, 16, 16)}], torch.device("cpu"))
    with pytest.raises(ValueError, match="set 'x'"):
        grounding_accuracy(model, [_batch([5, 6])], torch.device("cpu"), word_sets={"x": [4]})
    with pytest.raises(ValueError, match="MAE model"):
        grounding_accuracy(M3AE(M3AEConfig(**TINY, model_type="mae")), [_batch([5, 6])], torch.device("cpu"))
