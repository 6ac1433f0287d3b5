"""Evaluation as library functions, the one implementation that `m3ae embed`, `knn`, `ood`, the demo
and the figures call (their handlers only parse flags, load the model and print):

    data = data_for_model(cfg.data, model.config)     # the data read as the model reads them
    train = features(model, build_eval_loader(data, 256, split="train"), pools=("cls", "mean"))
    val = features(model, ...)
    knn(train["cls"], val["cls"]); logistic(train["mean"], val["mean"]); ood(train, inside, outside)

Feature sets are dicts {"features" (N, D) float32, "labels" (N,), "keys"}; `features` returns one
per pool from a single forward pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..data import DataConfig
from ..engine.runtime import PrecisionSetting
from ..model import M3AE, M3AEConfig
from .features import Modality, Pool, extract_pools, require_labels

FeatureSet = dict  # {"features": (N, D), "labels": (N,), "keys": [N]}


def data_for_model(data: DataConfig, model: M3AEConfig, model_field: str = "the checkpoint's image_size",
                   **fields) -> DataConfig:
    """"Data follow the model", the one rule of every evaluation command: a copy of `data` (with
    `fields` replaced) read at the model's image size and caption length. A data.image_size the user
    gave that disagrees with the model is the same one-line ConfigError everywhere, never silently
    replaced."""
    data = dataclasses.replace(data, text_length=model.text_length, **fields)
    data.follow_model(model.image_size, model_field)
    return data


def features(model: M3AE, batches: Iterable[dict], pools: Sequence[Pool] = ("cls",), *, modality: Modality = "image",
             layer: int | None = None, device: torch.device | str = "cpu", precision: PrecisionSetting = "fp32",
             progress: bool = False, labelled: str | None = None) -> dict[Pool, FeatureSet]:
    """Frozen features of every batch, one set per pool, from one unmasked forward pass per batch.
    `labelled`: a description of the source (for the error) when every sample must have a label."""
    out = extract_pools(model, batches, pools, modality, layer, torch.device(device), precision, progress)
    if labelled is not None:
        require_labels(next(iter(out.values()))["labels"], labelled)
    return out


def embedded_split(data: DataConfig, split: str) -> str:
    """What embedding `split` of `data` reads, in words (the line `m3ae embed` and `tsne` print). "all":
    every sample of the source, no split; "val": the scoring side, refused when it repeats the train
    split (as in knn), so that features kept "for scoring" never include the training data. A val/
    folder of the source's own is held out by construction (its root without train/ is no train split)."""
    from ..data.splits import check_eval_split, has_split, open_eval_split

    if split == "all":
        return f"every sample of {data.source!r} (--split all)"
    if split == "val" and (data.eval_val_source or not has_split(data.source, "val")):
        check_eval_split(data)
    return f"the {split} split, {open_eval_split(data, split).name}"


def embed(model: M3AE, data: DataConfig, split: str = "all", *, modality: Modality = "image", pool: Pool = "cls",
          layer: int | None = None, batch_size: int = 256, device: torch.device | str = "cpu",
          precision: PrecisionSetting = "fp32", progress: bool = False) -> FeatureSet:
    """Features of images (the labelled `split`, or "all" of the source), captions or pairs (the pair source, one pass in its
    streaming order, evaluation transform) of `data`, already read at the model's sizes."""
    from ..data import build_eval_loader
    from ..data.loader import BatchStream, PretrainLoader

    if modality == "image":
        batches = build_eval_loader(data, batch_size, split=split)
    else:  # captions in the model's ids: its recorded tokenizer and compact vocabulary
        data = dataclasses.replace(data, tokenizer=model.config.tokenizer or data.tokenizer)
        batches = PretrainLoader(BatchStream(data, batch_size, 0, 1, epochs=1, train_transform=False,
                                             vocabulary=model.config.vocabulary))
    return features(model, batches, (pool,), modality=modality, layer=layer, device=device, precision=precision,
                    progress=progress)[pool]


def _classes(*sets: FeatureSet) -> int:
    return int(max(int(s["labels"].max()) for s in sets)) + 1


def knn(train: FeatureSet, val: FeatureSet, k: int = 20, temperature: float = 0.07,
        ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (%) of the temperature-weighted cosine kNN of `val` among `train`."""
    from .knn import knn_predict, topk_accuracy

    scores = knn_predict(train["features"], train["labels"], val["features"], _classes(train, val), k, temperature)
    return topk_accuracy(scores, val["labels"], ks)


def logistic(train: FeatureSet, val: FeatureSet, l2: float = 1e-3) -> dict[str, float]:
    """Top-1 accuracy (%) on `val` of the L2-regularised logistic regression fitted on `train`."""
    from .logistic import fit_logistic

    probe = fit_logistic(train["features"], train["labels"], _classes(train, val), l2=l2)
    return {"top1": probe.accuracy(val["features"], val["labels"])}


def ood(train: FeatureSet, inside: FeatureSet, outside: FeatureSet) -> dict[str, float | int]:
    """Out-of-distribution AUROC of `outside` against `inside` (held-out in-distribution samples),
    both detectors fitted on the labelled `train` set: Mahalanobis, and the max-softmax of a logistic
    head."""
    from .ood import MahalanobisScorer, auroc, fit_softmax_head, max_softmax_score

    mahalanobis = MahalanobisScorer(train["features"], train["labels"])
    head = fit_softmax_head(train["features"], train["labels"])
    return {"mahalanobis_auroc": auroc(mahalanobis(inside["features"]), mahalanobis(outside["features"])),
            "max_softmax_auroc": auroc(max_softmax_score(head(inside["features"])),
                                       max_softmax_score(head(outside["features"]))),
            "in_samples": int(inside["labels"].numel()), "out_samples": int(outside["labels"].numel())}


class DecodedImages:
    """A labelled split decoded once into tensors, replayed as batches: the demo scores every row on
    the same images without decoding its JPEGs again. Saved as one safetensors file so that parallel
    runs map it instead of decoding it each."""

    def __init__(self, image: torch.Tensor, label: torch.Tensor, keys: list[str], batch_size: int = 256) -> None:
        self.image, self.label, self.keys, self.batch_size = image, label, keys, batch_size

    @classmethod
    def decode(cls, batches: Iterable[dict], batch_size: int = 256) -> "DecodedImages":
        images, labels, keys = [], [], []
        for batch in batches:
            images.append(batch["image"])
            labels.append(batch["label"])
            keys += list(batch["key"])
        if not images:
            raise ValueError("no batch to decode: the data source is empty")
        return cls(torch.cat(images), torch.cat(labels).long(), keys, batch_size)

    def save(self, path) -> None:
        import json

        from safetensors.torch import save_file

        from ..utils import atomic_path

        with atomic_path(path) as tmp:
            save_file({"image": self.image.contiguous(), "label": self.label.contiguous()}, str(tmp),
                      metadata={"keys": json.dumps(self.keys)})

    @classmethod
    def load(cls, path, batch_size: int = 256) -> "DecodedImages":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return cls(f.get_tensor("image"), f.get_tensor("label"), json.loads(f.metadata()["keys"]), batch_size)

    def __len__(self) -> int:
        return self.label.numel()

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), self.batch_size):
            stop = start + self.batch_size
            yield {"image": self.image[start:stop], "label": self.label[start:stop], "key": self.keys[start:stop]}
