"""`m3ae demo`: pretrain M3AE and MAE on the embedded dataset with equal steps and batch, probe both
(cached linear probe and kNN) on its held-out labels, print a table, save a bar chart and
`demo_results.json` in the run directory. For M3AE it also measures how much its masked-word
predictions depend on the image (eval.grounding): the text can only improve the image features once
the model reads the picture to name words. Re-running with the same --out-dir resumes each part."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MODELS = ("m3ae", "mae")


@dataclass
class DemoConfig:
    steps: int = 200  # pretraining steps of each model
    batch_size: int = 32  # pretraining batch of each model
    probe_epochs: int = 50  # linear probe on cached features (seconds on CPU)
    knn_k: int = 20
    recipe: str = "tiny"  # pretraining recipe (a packaged recipe's name or a YAML path): same for both models
    out_dir: str | None = None  # null: runs/demo-<date-time>
    progress: bool = True

    def __post_init__(self) -> None:
        from ..config import ConfigError

        for name in ("steps", "batch_size", "probe_epochs", "knn_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: must be >= 1")


def pretrain_config(cfg: DemoConfig, model_type: str, run_dir: Path):
    """The recipe with only the model type changed: the comparison differs in nothing else."""
    from .. import config as config_io
    from .. import recipes
    from ..train.pretrain import PretrainConfig

    overrides = {"model.model_type": model_type, "train.total_steps": cfg.steps, "train.batch_size": cfg.batch_size,
                 "out_dir": str(run_dir / model_type), "log.progress": cfg.progress, "log.figures_every": 0,
                 "checkpoint.every": max(cfg.steps // 2, 1)}
    return config_io.load(PretrainConfig, recipes.resolve(cfg.recipe), overrides)


def evaluate(cfg: DemoConfig, pretrain_cfg, run_dir: Path) -> dict[str, float]:
    """Cached linear probe, then kNN on the same cached features."""
    from ..engine.metrics import LogConfig
    from .features import load_features
    from .knn import knn_predict, topk_accuracy
    from .probe import LinearProbeConfig, run_transfer

    # SGD rather than LARS: with a 256 batch, LARS's trust ratio (0.001 × ‖w‖/‖g‖) at MAE's linearly
    # scaled lr moves the head by ~1e-4 of its norm per step, too little in a short schedule.
    probe = LinearProbeConfig(
        checkpoint=pretrain_cfg.out_dir, data=dataclasses.replace(pretrain_cfg.data), cached=True,
        epochs=cfg.probe_epochs, optimizer="sgd", lr=0.1, warmup_epochs=min(5.0, cfg.probe_epochs / 10),
        precision=pretrain_cfg.train.precision,
        out_dir=str(run_dir), log=LogConfig(figures_every=0, progress=cfg.progress),
    )
    result = run_transfer(probe, resume="auto")
    train, val = (load_features(run_dir / f"features_{split}.safetensors") for split in ("train", "val"))
    classes = int(train["labels"].max()) + 1
    scores = knn_predict(train["features"], train["labels"], val["features"], classes, k=cfg.knn_k)
    return {"linear": result.top1, "linear_best": result.best_top1,
            "knn": topk_accuracy(scores, val["labels"], ks=(1,))["top1"]}


def caption_pairs(data):
    """Held-out image-caption pairs of the recipe's data, or None when its validation split has no
    captions to score."""
    from ..data.loader import BatchStream, PretrainLoader

    if data.source == "embedded":
        spec = str(Path(data.embedded_root) / "val-*.tar")
    elif data.eval_val_source:
        spec = data.eval_val_source
    else:
        return None
    # batches of 16: the full (16, L, 30 522) logits of two passes stay small
    return PretrainLoader(BatchStream(dataclasses.replace(data, source=spec, num_workers=0), 16, 0, 1, epochs=1,
                                      train_transform=False))


def class_name_ids(data) -> list[int] | None:
    """Token ids of the held-out labels' class names (the words the labels are), where the source
    records them (the embedded dataset, an image folder); else None."""
    from ..data.sources import label_names
    from ..data.tokenizer import Tokenizer

    names = label_names(data.eval_val_source or data.source, data.format, "val", data.embedded_root)
    if not names:
        return None
    words = [name.replace("_", " ") for name in names]
    return [i for ids in Tokenizer.from_name(data.tokenizer).encode(words) for i in ids]


def grounding(pretrain_cfg) -> dict[str, dict[str, float]]:
    """Masked-word accuracy of the M3AE run with each caption's own image vs another one's: all
    words, and the class names alone when the data has them."""
    from ..engine.runtime import resolve_device
    from ..model import M3AE
    from .grounding import grounding_accuracy

    pairs = caption_pairs(pretrain_cfg.data)
    if pairs is None:
        return {}
    word_sets = {"all_words": None}
    if (names := class_name_ids(pretrain_cfg.data)) is not None:
        word_sets["class_names"] = names
    return grounding_accuracy(M3AE.from_pretrained(pretrain_cfg.out_dir), pairs, resolve_device(pretrain_cfg.train.device),
                              pretrain_cfg.train.precision, word_sets)


def bar_chart(results: dict[str, dict[str, float]], path: Path) -> Path:
    from ..viz.plotting import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    width = 0.38
    for i, model in enumerate(results):
        values = [results[model]["linear"], results[model]["knn"]]
        bars = ax.bar([j + (i - 0.5) * width for j in range(2)], values, width, label=model.upper())
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(2), ["linear probe", "kNN"])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| model | linear probe top-1 (%) | kNN top-1 (%) |", "|---|---|---|"]
    lines += [f"| {m.upper()} | {r['linear']:.2f} | {r['knn']:.2f} |" for m, r in results.items()]
    for words, g in results.get("m3ae", {}).get("grounding", {}).items():
        lines.append(f"M3AE masked-word accuracy ({words.replace('_', ' ')}), own image vs another image: "
                     f"{g['matched']:.1f} vs {g['mismatched']:.1f} % (gap {g['gap']:+.1f})")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict[str, dict[str, float]]:
    from ..engine.run_dir import default_run_dir
    from ..train.pretrain import run_pretraining
    from ..utils import atomic_path

    run_dir = Path(cfg.out_dir or default_run_dir("demo"))
    results = {}
    for model_type in MODELS:
        pretrain = pretrain_config(cfg, model_type, run_dir)
        started = time.perf_counter()
        run_pretraining(pretrain, resume="auto")
        pretrain_s = time.perf_counter() - started
        started = time.perf_counter()
        results[model_type] = evaluate(cfg, pretrain, run_dir / model_type / "linear-probe")
        if model_type == "m3ae":
            results[model_type]["grounding"] = grounding(pretrain)
        results[model_type].update(pretrain_s=pretrain_s, probe_s=time.perf_counter() - started)
    with atomic_path(run_dir / "demo_results.json") as tmp:
        tmp.write_text(json.dumps({"config": dataclasses.asdict(cfg), **results}, indent=2) + "\n")
    bar_chart(results, run_dir / "demo_results.png")
    print(table(results))
    print(f"results: {run_dir / 'demo_results.json'}  chart: {run_dir / 'demo_results.png'}")
    return results


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="pretrain M3AE and MAE on the embedded dataset, probe both, compare",
                              description=__doc__)
    for f in dataclasses.fields(DemoConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=int if f.type in ("int", int) else str, default=f.default)
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    except ConfigError as e:
        print(f"m3ae demo: {e}", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0

