"""Frozen features from any checkpoint: images, captions or pairs; CLS or mean pool; any layer.

Feature files hold `features` (N, D) float32, `labels` (N,) int64 and `keys` (N strings): a
safetensors file (keys in its metadata) or a `.npz` of plain arrays (loaded without pickle)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..model import M3AE
from ..engine.runtime import PrecisionSetting, resolve_precision
from ..utils import progress_bar

Modality = Literal["image", "text", "pair"]
Pool = Literal["cls", "mean"]


@dataclass
class FeatureSpec:
    modality: Modality = "image"
    pool: Pool = "cls"
    # None: the encoder's output (after the final LayerNorm); k in 1..depth: block k's output
    # (before the norm), for layer-wise probes.
    layer: int | None = None


def pool_encoding(encoding, spec: FeatureSpec, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, D) from an `M3AEEncoding`. Mean pooling averages the image patches and the real (not
    padded) caption tokens present; CLS is position 0."""
    if spec.layer is None:
        hidden = encoding.last_hidden_state
    else:
        if not 1 <= spec.layer <= len(encoding.hidden_states):
            raise ValueError(f"layer={spec.layer}: the encoder has blocks 1..{len(encoding.hidden_states)}")
        hidden = encoding.hidden_states[spec.layer - 1]
    if spec.pool == "cls":
        return hidden[:, 0]
    if spec.pool != "mean":
        raise ValueError(f"pool={spec.pool!r}: choose 'cls' or 'mean'")
    tokens = hidden[:, 1:]
    weight = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
    if padding_mask is not None:  # text is last in the sequence: its padding is the tail
        weight[:, tokens.shape[1] - padding_mask.shape[1]:] = (~padding_mask.bool()).to(tokens.dtype)
    return (tokens * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1.0)


def extract_features(model: M3AE, batches: Iterable[dict], spec: FeatureSpec, device: torch.device,
                     precision: PrecisionSetting = "fp32", progress: bool = False) -> dict:
    """Runs the unmasked encoder over every batch; returns {"features", "labels", "keys"}."""
    return extract_pools(model, batches, (spec.pool,), spec.modality, spec.layer, device, precision, progress)[spec.pool]


@torch.no_grad()
def extract_pools(model: M3AE, batches: Iterable[dict], pools: Sequence[Pool], modality: Modality = "image",
                  layer: int | None = None, device: torch.device = torch.device("cpu"),
                  precision: PrecisionSetting = "fp32", progress: bool = False) -> dict[Pool, dict]:
    """{pool: {"features", "labels", "keys"}} for every pool asked, from one forward pass per batch:
    CLS and mean pool cost one pass, not two."""
    model.eval().to(device)
    autocast = resolve_precision(precision, device).autocast
    features: dict[Pool, list[torch.Tensor]] = {pool: [] for pool in pools}
    labels, keys = [], []
    for batch in progress_bar(batches, desc="features", unit="batch", enabled=progress):
        image = batch["image"].to(device) if modality in ("image", "pair") else None
        text = mask = None
        if modality in ("text", "pair"):
            if "text" not in batch:
                raise ValueError(f"modality={modality!r}: the data source yields no captions")
            text, mask = batch["text"].to(device), batch["text_padding_mask"].to(device)
        with autocast():
            encoding = model.encode(image, text, mask, output_hidden_states=layer is not None)
        for pool, out in features.items():
            out.append(pool_encoding(encoding, FeatureSpec(modality, pool, layer), mask).float().cpu())
        labels.append(batch["label"].cpu())
        keys += list(batch["key"])
    if not labels:
        raise ValueError("no batch to extract features from: the data source is empty")
    labels = torch.cat(labels).long()
    return {pool: {"features": torch.cat(out), "labels": labels, "keys": keys} for pool, out in features.items()}


class MissingLabelsError(ValueError):
    pass


def require_labels(labels: torch.Tensor, what: str) -> None:
    """A labelled command on unlabelled data fails here, in one line, rather than deep in indexing."""
    missing = int((labels < 0).sum())
    if missing:
        raise MissingLabelsError(f"{what}: {missing} of {labels.numel()} samples have no label; this command needs "
                         f"labelled data (class subfolders, .cls members or a label column)")


def save_features(data: dict, path: str | Path) -> Path:
    """Atomically writes `.safetensors` or `.npz` (chosen by the suffix)."""
    from ..utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"features": data["features"].contiguous(), "labels": data["labels"].contiguous()},
                      str(tmp), metadata={"keys": json.dumps(list(data["keys"]))})
        elif path.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, features=data["features"].numpy(), labels=data["labels"].numpy(),
                         keys=np.asarray(data["keys"], dtype=str))
        else:
            raise ValueError(f"feature file {path}: use a .safetensors or .npz suffix")
    return path


def load_features(path: str | Path) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = json.loads((f.metadata() or {}).get("keys", "[]"))
            return {"features": f.get_tensor("features"), "labels": f.get_tensor("labels"), "keys": keys}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {"features": torch.from_numpy(f["features"]), "labels": torch.from_numpy(f["labels"]),
                    "keys": [str(k) for k in f["keys"]]}
    raise ValueError(f"feature file {path}: expected a .safetensors or .npz suffix")
