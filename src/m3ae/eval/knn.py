"""k-nearest-neighbour classification on frozen features (cosine similarity, temperature-weighted votes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, num_classes): each of the k most similar training samples votes for its class
    with weight exp(cosine / temperature)."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels")
    if train_labels.numel() and not 0 <= int(train_labels.min()) <= int(train_labels.max()) < num_classes:
        raise ValueError(f"training labels span [{int(train_labels.min())}, {int(train_labels.max())}]: "
                         f"expected classes 0..{num_classes - 1}")
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[index].long(), (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} (a k larger than the number of classes counts every sample correct)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
