"""Real-data transfer check on Debian's `tuxpaint-stamps-default` (GPL-2; never committed): stamp
category as the label, a deterministic 80/20 split, then for each checkpoint a cached linear probe
and kNN, as `m3ae linear-probe --cached true` and `m3ae knn` do.

    .venv/bin/python bench/tuxpaint_transfer.py --checkpoint runs/demo/m3ae --checkpoint runs/demo/mae

The package is fetched with `apt-get download` into --work unless already extracted there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

STAMPS = "usr/share/tuxpaint/stamps"


def extract(work: Path) -> Path:
    root = work / "pkg"
    if not (root / STAMPS).is_dir():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "tuxpaint-stamps-default"], cwd=work, check=True)
        deb = next(work.glob("tuxpaint-stamps-default_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root / STAMPS


def build_manifests(stamps: Path, work: Path) -> tuple[Path, Path, list[str]]:
    """train.jsonl / val.jsonl: one row per PNG with its caption (first line of the .txt) and its
    top-level category. Rows are ordered by hash, so batches mix categories."""
    categories = sorted(p.name for p in stamps.iterdir() if p.is_dir())
    rows = {"train": [], "val": []}
    for png in sorted(stamps.rglob("*.png")):
        category = png.relative_to(stamps).parts[0]
        if category not in categories:
            continue
        txt = png.with_suffix(".txt")
        caption = txt.read_text(errors="replace").splitlines()[0].strip() if txt.is_file() else ""
        digest = hashlib.sha256(str(png.relative_to(stamps)).encode()).hexdigest()
        split = "val" if int(digest[:8], 16) % 5 == 0 else "train"
        rows[split].append((digest, {"image": str(png), "caption": caption, "label": categories.index(category),
                                     "key": digest[:16]}))
    paths = []
    for split, entries in rows.items():
        path = work / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for _, row in sorted(entries, key=lambda e: e[0])))
        paths.append(path)
    return paths[0], paths[1], categories


def evaluate(checkpoint: str, train: Path, val: Path, out: Path, epochs: int, lr: float) -> dict:
    from m3ae.data import DataConfig
    from m3ae.eval.features import load_features
    from m3ae.eval.knn import knn_predict, topk_accuracy
    from m3ae.eval.probe import LinearProbeConfig, run_transfer
    from m3ae.engine.metrics import LogConfig

    data = DataConfig(source=str(train), eval_train_source=str(train), eval_val_source=str(val), num_workers=0)
    cfg = LinearProbeConfig(checkpoint=checkpoint, data=data, cached=True, epochs=epochs, batch_size=64,
                            optimizer="sgd", lr=lr, warmup_epochs=epochs / 10, out_dir=str(out),
                            resume="auto", log=LogConfig(figures_every=0, progress=False))
    result = run_transfer(cfg)
    tr, va = (load_features(out / f"features_{s}.safetensors") for s in ("train", "val"))
    scores = knn_predict(tr["features"], tr["labels"], va["features"], int(tr["labels"].max()) + 1, k=20)
    return {"linear_top1": result.top1, "linear_top5": result.top5, "linear_best_top1": result.best_top1,
            **{f"knn_{k}": v for k, v in topk_accuracy(scores, va["labels"]).items()},
            "train": int(tr["labels"].numel()), "val": int(va["labels"].numel()),
            # the accuracy of always answering the most frequent training category
            "majority_top1": 100.0 * float((va["labels"] == tr["labels"].mode().values).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="repeatable")
    parser.add_argument("--work", default="/tmp/m3ae-tuxpaint")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    work = Path(args.work)
    train, val, categories = build_manifests(extract(work), work)
    results = {"categories": categories}
    for checkpoint in args.checkpoint:
        # one probe directory per checkpoint (it caches features and resumes)
        tag = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
        results[checkpoint] = evaluate(checkpoint, train, val, work / f"probe-{tag}", args.epochs, args.lr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
