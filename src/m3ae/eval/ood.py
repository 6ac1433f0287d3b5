"""Out-of-distribution detection as in the paper: Mahalanobis and maximum-softmax scores, AUROC.
Scores are oriented so that higher means "more in-distribution"."""

from __future__ import annotations

import torch


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Probability that an in-distribution sample scores above an out-of-distribution one (ties
    count one half): the area under the ROC curve, by the rank-sum identity."""
    scores = torch.cat([in_scores, out_scores]).double()
    n_in, n_out = in_scores.numel(), out_scores.numel()
    if n_in == 0 or n_out == 0:
        raise ValueError("AUROC needs at least one in- and one out-of-distribution score")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse = torch.unique(scores, return_inverse=True)
    rank_sum = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    count = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (rank_sum / count)[inverse]
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def max_softmax_score(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(dim=-1).max(dim=-1).values


class MahalanobisScorer:
    """Class-conditional Gaussians with a shared covariance fitted on in-distribution training
    features; the score is minus the smallest Mahalanobis distance to a class mean."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, shrinkage: float = 1e-6) -> None:
        features = features.double()
        classes = labels.unique()
        self.means = torch.stack([features[labels == c].mean(0) for c in classes])  # (C, D)
        centered = features - self.means[torch.searchsorted(classes, labels)]
        covariance = centered.T @ centered / features.shape[0]
        covariance += shrinkage * covariance.diagonal().mean() * torch.eye(features.shape[1], dtype=torch.float64)
        self.precision = torch.linalg.inv(covariance)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        diff = features.double()[:, None, :] - self.means[None]  # (N, C, D)
        distances = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return -distances.min(dim=1).values


def fit_softmax_head(features: torch.Tensor, labels: torch.Tensor, steps: int = 200,
                     weight_decay: float = 1e-4):
    """A softmax classifier on standardised in-distribution features (the logistic probe,
    eval.logistic), whose maximum probability is the max-softmax score when no fine-tuned classifier
    is at hand. Returns a function features -> logits."""
    from .logistic import fit_logistic

    probe = fit_logistic(features, labels, l2=2 * weight_decay, max_iter=steps)
    return lambda f: probe.logits(f).float()
