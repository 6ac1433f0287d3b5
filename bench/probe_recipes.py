"""Linear-probe recipes against a logistic regression fitted on the same cached features.

    PYTHONPATH=src python bench/probe_recipes.py [--features-dir DIR] [--batch-sizes 8 256 1024]

Features: `DIR/features_{train,val}.safetensors` (written by `m3ae linear-probe --cached true` or
`m3ae embed`), or by default scikit-learn's bundled digits (8x8 images as 64-d vectors, 10
classes; every 5th sample held out), which install offline. For each batch size it trains the
probe head (BatchNorm + Linear) with the default recipe and with `--recipe mae`, and compares both
with `sklearn.linear_model.LogisticRegression` on standardised features. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _digits() -> dict[str, dict]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    val = np.arange(len(y)) % 5 == 0
    return {split: {"features": torch.tensor(x[mask], dtype=torch.float32), "labels": torch.tensor(y[mask]),
                    "keys": [str(i) for i in np.flatnonzero(mask)]}
            for split, mask in (("train", ~val), ("val", val))}


def _logistic_regression(features: dict[str, dict]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features["train"]["features"].numpy())
    fit = LogisticRegression(max_iter=5000).fit(scaler.transform(features["train"]["features"].numpy()),
                                                features["train"]["labels"].numpy())
    predicted = fit.predict(scaler.transform(features["val"]["features"].numpy()))
    return 100.0 * float((predicted == features["val"]["labels"].numpy()).mean())


def _stub_splits(root: Path) -> tuple[str, str]:
    """Two one-image class folders: the probe checks that its splits differ before it reads the
    cached features, which stand in for them."""
    from PIL import Image

    for split in ("train", "val"):
        (root / split / "c0").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "c0" / "0.png")
    return str(root / "train"), str(root / "val")


def _probe(features: dict[str, dict], model_dir: Path, splits: tuple[str, str], run_dir: Path, batch: int,
           recipe: str, epochs: int) -> tuple[float, float]:
    from m3ae.data import DataConfig
    from m3ae.eval.features import save_features
    from m3ae.eval.probe import LinearProbeConfig, TransferTrainer
    from m3ae.engine.metrics import LogConfig

    for split, part in features.items():
        save_features(part, run_dir / f"features_{split}.safetensors")
    cfg = LinearProbeConfig(checkpoint=str(model_dir), cached=True, batch_size=batch, recipe=recipe, epochs=epochs,
                            precision="fp32", device="cpu", keep=1, out_dir=str(run_dir),
                            data=DataConfig(source=splits[0], eval_val_source=splits[1]),
                            log=LogConfig(every=10_000, figures_every=0, tensorboard=False, progress=False))
    start = time.perf_counter()
    result = TransferTrainer(cfg).fit()
    return result.top1, time.perf_counter() - start


def main() -> None:
    from m3ae import M3AE, M3AEConfig
    from m3ae.eval.features import load_features

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features-dir", help="directory with features_{train,val}.safetensors")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 256, 1024])
    parser.add_argument("--epochs", type=int, default=90)
    args = parser.parse_args()
    if args.features_dir:
        features = {s: load_features(Path(args.features_dir) / f"features_{s}.safetensors") for s in ("train", "val")}
    else:
        features = _digits()
    width = features["train"]["features"].shape[1]
    reference = _logistic_regression(features)
    print(f"{features['train']['labels'].numel()} train / {features['val']['labels'].numel()} val features of "
          f"width {width}; logistic regression top-1 {reference:.2f}%\n")
    print("| batch | default recipe | top-1 (%) | `--recipe mae` top-1 (%) | logistic regression (%) "
          "| seconds (default / mae) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the head never reads the encoder when features are cached; any model of that width will do
        M3AE(M3AEConfig(image_size=32, patch_size=8, text_length=8, vocab_size=50, emb_dim=width, depth=1,
                        num_heads=1, dec_emb_dim=16, dec_depth=1, dec_num_heads=1)).save_pretrained(root / "model")
        splits = _stub_splits(root / "data")
        for batch in args.batch_sizes:
            from m3ae.eval.probe import LinearProbeConfig

            default = LinearProbeConfig(checkpoint="-", batch_size=batch).recipe
            auto, auto_s = _probe(features, root / "model", splits, root / f"auto{batch}", batch, "auto", args.epochs)
            mae, mae_s = _probe(features, root / "model", splits, root / f"mae{batch}", batch, "mae", args.epochs)
            print(f"| {batch} | {default} | {auto:.2f} | {mae:.2f} | {reference:.2f} | {auto_s:.0f} / {mae_s:.0f} |")


if __name__ == "__main__":
    main()
