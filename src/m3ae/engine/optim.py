"""Optimisers with the paper's settings: AdamW β=(0.9, 0.95) with weight decay split into the official
no-decay list (or MAE's), the lr scaled linearly with the batch, LARS for the linear probe, and
layer-wise lr decay groups for fine-tuning."""

from __future__ import annotations

import math
import re

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# Prefixes that wrappers applied from outside (torch.compile, DDP, activation checkpointing) insert
# into parameter names; removed so that groups and checkpoints see the model's own names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars"] = "adamw"  # optimiser
    base_lr: float = 1.5e-4  # peak lr = base_lr × global batch / 256 ...
    lr: float | None = None  # ... unless the peak lr is given directly
    lr_init: float = 0.0  # warm-up starts here
    lr_end: float = 0.0  # cosine decays to here
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.05  # decoupled weight decay
    no_decay: Literal["official", "mae"] = "official"  # official list, or MAE's: every 1-D parameter
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    momentum: float = 0.9  # LARS
    trust_coefficient: float = 0.001  # LARS
    clip_grad_norm: float | None = 1e9  # the official default clips only absurd norms; null disables
    fused: bool | None = None  # fused AdamW kernel; None: wherever the device supports it

    def __post_init__(self) -> None:
        from ..config import ConfigError

        floats = {name: getattr(self, name) for name in ("base_lr", "lr", "lr_init", "lr_end", "weight_decay", "eps",
                                                         "momentum", "trust_coefficient", "clip_grad_norm")}
        for name, value in [*floats.items(), *(("betas", b) for b in self.betas)]:
            if value is not None and math.isnan(value):  # NaN passes every comparison below
                raise ConfigError(f"optim.{name}={getattr(self, name)!r}: must be a number, not NaN")
        for name in ("base_lr", "lr_init", "lr_end", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}={getattr(self, name)!r}: must be >= 0")
        if self.eps <= 0:  # AdamW divides by sqrt(v) + eps: 0 turns every zero gradient into NaN
            raise ConfigError(f"optim.eps={self.eps!r}: must be > 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr!r}: must be > 0 (or null to scale base_lr)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps!r}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas!r}: each must be in [0, 1)")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"optim.clip_grad_norm={self.clip_grad_norm!r}: must be > 0 or null")

    def peak_lr(self, global_batch_size: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch_size / 256


def no_decay_names(model: nn.Module, scheme: str) -> set[str]:
    """Names (wrapper prefixes removed) of the parameters trained without weight decay.

    official: the model's own list (biases, CLS, type and mask embeddings, word embedding; LayerNorm
    scales decayed). mae: every parameter with at most one dimension (biases and LayerNorm), as
    timm's `add_weight_decay` does for MAE pretraining (tokens decayed)."""
    if scheme == "official":
        return set(model.no_weight_decay())
    if scheme == "mae":
        return {clean_name(n) for n, p in model.named_parameters() if p.ndim <= 1}
    raise ValueError(f"optim.no_decay={scheme!r}: must be 'official' or 'mae'")


def param_groups(model: nn.Module, weight_decay: float, exclude: set[str]) -> list[dict]:
    """Two groups, decay and no-decay, over the trainable parameters of `model` (possibly wrapped)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if clean_name(name) in exclude else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, peak_lr: float, exclude: set[str]
) -> torch.optim.Optimizer:
    """`model` is the wrapped model whose parameters are trained; `exclude` the no-decay names
    computed on the bare model (wrappers such as FSDP2 replace parameters, not their names)."""
    groups = param_groups(model, cfg.weight_decay, exclude)
    if cfg.name == "lars":
        return LARS(groups, lr=peak_lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    params = [p for g in groups for p in g["params"]]
    fused = _fused_supported(params) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as MAE's linear probe uses it:
    parameters with more than one dimension get weight decay and the ratio ‖w‖ / ‖g + wd·w‖;
    biases and norms plain momentum SGD."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    one = torch.ones_like(param_norm)
                    ratio = torch.where(
                        param_norm > 0,
                        torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


# Layer-wise learning-rate decay for fine-tuning a ViT encoder (BEiT / MAE): the deeper a parameter,
# the larger its learning rate; the patch embedding is in the lowest group.
# parameters that come before the first block: CLS, the patch embedding and its type embedding
_EMBEDDING = re.compile(r"(^|\.)(cls_token|image_embedding|encoder_image_type_embedding|text_embedding|"
                        r"encoder_text_type_embedding)(\.|$)")
_BLOCK = re.compile(r"(^|\.)encoder\.blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for encoder block i, depth + 1 for the final norm and the head."""
    block = _BLOCK.search(name)
    if block:
        return int(block.group(2)) + 1
    if _EMBEDDING.search(name):
        return 0
    return depth + 1


def layer_decay_groups(
    model: nn.Module, depth: int, layer_decay: float, weight_decay: float, no_decay: set[str]
) -> list[dict]:
    """Optimizer groups with `lr_scale = layer_decay ** (depth + 1 - layer_id)`; the scheduler
    multiplies each group's lr by its `lr_scale`. `no_decay` names parameters without weight decay."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decayed = layer_id(name, depth), name not in no_decay
        group = groups.setdefault((layer, decayed), {
            "params": [], "names": [], "layer_id": layer, "lr_scale": layer_decay ** (depth + 1 - layer),
            "weight_decay": weight_decay if decayed else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]
