"""L2-regularised multinomial logistic regression on standardised frozen features, fitted with
L-BFGS: the linear probe of small studies. Convex, so the result depends on the features and the
regularisation only (no learning rate, schedule or seed), and it takes seconds on a CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LogisticProbe:
    mean: torch.Tensor  # (D,) training-feature statistics used to standardise every input
    std: torch.Tensor
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in %."""
        return 100.0 * (self.logits(features).argmax(1) == labels.to(self.bias.device)).double().mean().item()


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, l2: float = 1e-3,
                 max_iter: int = 200) -> LogisticProbe:
    """Minimises mean cross-entropy + l2/2 · ‖W‖² (bias not penalised) over standardised features,
    in float64. Constant features are left at zero rather than divided by a zero spread. 200
    iterations: on the demo's 10,000 × 128 features the loss is then within 3e-6 of 500 iterations'
    and the held-out accuracy the same, at 2.5-3.5x less time (docs/RESULTS.md)."""
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"fit_logistic: features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match")
    if l2 <= 0:
        raise ValueError(f"fit_logistic: l2={l2!r} must be > 0 (the problem has no minimum on separable data without it)")
    x = features.double()
    labels = labels.long().to(x.device)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    x = (x - mean) / std
    num_classes = num_classes or int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # A solver's gradient, not a training step (those are the engine's): L-BFGS reads `.grad`.
        loss = F.cross_entropy(x @ weight + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        weight.grad, bias.grad = torch.autograd.grad(loss, [weight, bias])
        return loss

    optimizer.step(closure)
    return LogisticProbe(mean, std, weight.detach(), bias.detach())
