"""Do grounded words improve the image features? A controlled test of the mechanism behind the
paper's M3AE > MAE finding, on the embedded dataset's images.

M3AE is pretrained with a caption that names one attribute of the main object (its colour or its
shape: "a red object", "a star object"); MAE on the same images with the same steps, batch,
optimiser and masking. With --supervised, a third copy of the encoder (MAE-shaped) is trained on the
attribute as a class label from its masked input's CLS token: the most a perfectly grounded word could
teach. Then, on held-out images:
- grounding: masked-word accuracy of the named word with the pair's own image vs another image
  (eval.grounding), i.e. whether the model learned to read the word off the pixels;
- image-only features of each model, the final CLS (the linear-probe input) and the mean of the
  patch tokens: logistic regression on 5 000 training images for each attribute (colour, shape),
  accuracy on the 2 000 validation images.

    .venv/bin/python bench/caption_grounding.py --attribute color --steps 1500

Plain loop on decoded images held in memory, no augmentation, AdamW (lr 1e-3, betas 0.9/0.95,
wd 0.05, 20 warm-up steps, then constant), bf16 autocast. Needs scikit-learn (dev extra).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m3ae import M3AE, M3AEConfig
from m3ae.data.config import NORMALIZATION_PRESETS
from m3ae.data.synth import COLORS, SHAPES, ensure_embedded_dataset
from m3ae.data.tokenizer import Tokenizer
from m3ae.eval.grounding import grounding_accuracy
from m3ae.utils import atomic_path

NAMES = {"color": list(COLORS), "shape": list(SHAPES)}


def load_split(root: Path, split: str, limit: int) -> tuple[torch.Tensor, list[dict]]:
    """(N, 3, H, W) normalised images and their attribute records, in shard order."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION_PRESETS["cc12m"])
    images, records = [], []
    for shard in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                images.append(torch.from_numpy(np.asarray(image).copy()))
                records.append(json.loads(tar.extractfile(members[name[:-4] + ".json"]).read()))
                if len(images) == limit:
                    break
        if len(images) == limit:
            break
    pixels = torch.stack(images).permute(0, 3, 1, 2).float().div(255)
    return (pixels - mean) / std, records


def pretrain(arm: str, images: torch.Tensor, captions: list[str], labels: torch.Tensor, tokenizer: Tokenizer,
             steps: int, batch_size: int, seed: int) -> M3AE:
    """arm: "m3ae" (image + caption), "mae" (image) or "supervised" (masked image -> label)."""
    torch.manual_seed(seed)
    config = M3AEConfig.from_preset("tiny", image_size=images.shape[-1], text_length=tokenizer.max_length,
                                    model_type="m3ae" if arm == "m3ae" else "mae")
    model = M3AE(config).train()
    head = torch.nn.Linear(config.emb_dim, int(labels.max()) + 1)
    parameters = list(model.parameters()) + (list(head.parameters()) if arm == "supervised" else [])
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        text = padding = None
        if arm == "m3ae":
            text, padding = tokenizer([captions[i] for i in index.tolist()])
        with torch.autocast("cpu", torch.bfloat16):
            out = model(images[index], text, padding, compute_logits=False)
            loss = out.loss
            if arm == "supervised":  # the label from the masked input's CLS, no reconstruction
                loss = torch.nn.functional.cross_entropy(head(out.latent[:, 0]).float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            print(f"  {arm} step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    return model.eval()


@torch.no_grad()
def image_features(model: M3AE, images: torch.Tensor) -> dict[str, np.ndarray]:
    """{"cls": final CLS, "mean": mean of the final patch tokens}, image-only input."""
    pooled: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}
    for i in range(0, len(images), 500):
        with torch.autocast("cpu", torch.bfloat16):
            encoding = model.encode(images[i:i + 500])
        pooled["cls"].append(encoding.cls.float())
        pooled["mean"].append(encoding.image_tokens.float().mean(1))
    return {name: torch.cat(parts).numpy() for name, parts in pooled.items()}


def probe(train: np.ndarray, train_labels: list, val: np.ndarray, val_labels: list) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    classifier = LogisticRegression(max_iter=1000).fit(scaler.transform(train), train_labels)
    return 100.0 * classifier.score(scaler.transform(val), val_labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attribute", choices=sorted(NAMES), default="color", help="what the caption names")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--probe-images", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data/embedded")
    parser.add_argument("--supervised", action="store_true", help="also train the label-supervised encoder")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    root = ensure_embedded_dataset(args.root)
    train, train_records = load_split(root, "train", args.train_images)
    val, val_records = load_split(root, "val", 2_000)
    tokenizer = Tokenizer.from_name("bert-base-uncased", max_length=8)
    captions = [f"a {r[args.attribute]} object" for r in train_records]
    labels = torch.tensor([NAMES[args.attribute].index(r[args.attribute]) for r in train_records])
    results: dict = {"attribute": args.attribute, "steps": args.steps, "batch_size": args.batch_size}
    for arm in ("m3ae", "mae") + (("supervised",) if args.supervised else ()):
        model = pretrain(arm, train, captions, labels, tokenizer, args.steps, args.batch_size, args.seed)
        entry = results[arm] = {}
        if arm == "m3ae":
            text, padding = tokenizer([f"a {r[args.attribute]} object" for r in val_records])
            pairs = [{"image": val[i:i + 100], "text": text[i:i + 100], "text_padding_mask": padding[i:i + 100]}
                     for i in range(0, len(val), 100)]
            named = [i for ids in tokenizer.encode(NAMES[args.attribute]) for i in ids]
            entry["grounding"] = grounding_accuracy(model, pairs, torch.device("cpu"), "bf16",
                                                    {"named_word": named})["named_word"]
        features_train = image_features(model, train[: args.probe_images])
        features_val = image_features(model, val)
        for pool in features_train:
            for attribute in NAMES:
                entry[f"probe_{pool}_{attribute}"] = probe(
                    features_train[pool], [r[attribute] for r in train_records[: args.probe_images]],
                    features_val[pool], [r[attribute] for r in val_records])
        print(arm, json.dumps(entry), flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
