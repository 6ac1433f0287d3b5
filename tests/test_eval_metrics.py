"""k-NN, OOD scores and AUROC against small hand-computed cases; Mixup/CutMix label mixing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from m3ae.eval.knn import knn_predict, topk_accuracy
from m3ae.eval.ood import MahalanobisScorer, auroc, max_softmax_score
from m3ae.eval.mixup import Mixup


def test_knn_votes_are_temperature_weighted_cosines():
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 1.0]])
    scores = knn_predict(bank, labels, query, num_classes=3, k=2, temperature=0.5)
    # cosines with the query: 0.894 (class 0), 0.447, 0.949 (class 1), -0.894: the top two are #2 and #0
    c0, c2 = 2 / math.sqrt(5), 3 / math.sqrt(10)
    expected = torch.tensor([[math.exp(c0 / 0.5), math.exp(c2 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)
    assert topk_accuracy(scores, torch.tensor([1]), ks=(1,)) == {"top1": 100.0}
    assert topk_accuracy(scores, torch.tensor([0]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}


def test_knn_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    bank, labels, query = torch.randn(50, 8), torch.randint(0, 5, (50,)), torch.randn(23, 8)
    torch.testing.assert_close(knn_predict(bank, labels, query, 5, k=7, chunk_size=4),
                               knn_predict(bank, labels, query, 5, k=7))


@pytest.mark.parametrize(
    "inside, outside, expected",
    [([3.0, 4.0], [1.0, 2.0], 1.0), ([1.0, 2.0], [3.0, 4.0], 0.0), ([1.0], [1.0], 0.5),
     ([0.9, 0.3, 0.5], [0.3, 0.1], (2 + 1.5 + 2) / 6)],
)
def test_auroc_hand_cases(inside, outside, expected):
    assert auroc(torch.tensor(inside), torch.tensor(outside)) == pytest.approx(expected)


def test_auroc_equals_the_pairwise_count():
    g = torch.Generator().manual_seed(0)
    inside, outside = torch.randint(0, 6, (40,), generator=g).float(), torch.randint(0, 6, (30,), generator=g).float()
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(inside.tolist(), outside.tolist())]
    assert auroc(inside, outside) == pytest.approx(sum(pairs) / len(pairs))


def test_mahalanobis_uses_the_shared_covariance():
    # two classes at x = -1 / +1, within-class spread 0.5 along x and 2 along y (identical per class)
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 2.0], [0.0, -2.0]])
    features = torch.cat([offsets + torch.tensor([-1.0, 0.0]), offsets + torch.tensor([1.0, 0.0])])
    labels = torch.tensor([0] * 4 + [1] * 4)
    scorer = MahalanobisScorer(features, labels, shrinkage=0.0)
    # covariance diag(0.125, 2): a point 1 along y from a mean is closer than 1 along x
    scores = scorer(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    torch.testing.assert_close(scores, torch.tensor([-0.5, -8.0], dtype=torch.float64))


def test_max_softmax_and_ood_separation():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    torch.testing.assert_close(max_softmax_score(logits), logits.softmax(-1).max(-1).values)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 4, generator=g) + torch.tensor([3.0, 0, 0, 0]) * torch.randint(0, 2, (200, 1), generator=g)
    scorer = MahalanobisScorer(train, (train[:, 0] > 1.5).long())
    near, far = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g) + 10
    assert auroc(scorer(near), scorer(far)) > 0.99


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_sum_to_one_and_match_the_pixels(mixup_alpha, cutmix_alpha):
    mix = Mixup(num_classes=10, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.1, seed=3)
    images = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 3, 16, 16).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(10):
        mixed, targets = mix(images, labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        # image i holds value i, mixed with image 3-i: the mean pixel tells the weight actually used
        lam = (mixed[0].mean() - 3.0) / (0.0 - 3.0)
        on, off = 1 - 0.1 + 0.01, 0.01
        torch.testing.assert_close(targets[0, 0], lam * on + (1 - lam) * off)
        torch.testing.assert_close(targets[0, 3], lam * off + (1 - lam) * on)


def test_no_mixing_leaves_smoothed_labels():
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    mixed, targets = Mixup(num_classes=4, prob=0.0, label_smoothing=0.2)(images, labels)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.85, 0.05, 0.05, 0.05]]))
