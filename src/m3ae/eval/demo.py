"""`m3ae demo`: the paper's comparison measured on the embedded dataset, with seeds and references.

Main table (default): M3AE and MAE pretrained with equal steps, batch and recipe; a randomly
initialised encoder (what the architecture gives for free) and the same encoder trained on the label
for the same number of steps (the supervised ceiling). Every row is scored with an L2-regularised
logistic regression on standardised frozen image-only features (final CLS and mean of the patch
tokens, one forward pass, the labelled images decoded once per demo) and a kNN beside it, over
`--seeds` seeds, reported as mean ± std, with the probes on which M3AE > MAE > random init holds on
every seed. For M3AE it also measures how much its masked-word predictions depend on the image
(eval.grounding). Every study prints its headroom (supervised ceiling − random init) and warns
under 10 points, and the split of its time.

`--study text-mask` (paper Fig. 4: text mask 0.15/0.5/0.75/0.9, and 0.75 over real tokens only),
`--study paired-fraction` (Fig. 3: 0 (MAE)/10/30/100 % of the pairs keep their caption, the rest are
image-only) and `--study scale` (Fig. 4: three widths, and 2x/4x the steps, M3AE and MAE) write the
same JSON and figure. Re-running with the same --out-dir resumes: finished seeds are read back."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

METRICS = ("logreg_cls", "logreg_mean", "knn_cls", "knn_mean")
RESULT_FILE = "result.json"  # one row and seed, scored: a rerun reads it back instead of training again
METRIC_NAMES = {"logreg_cls": "logistic CLS", "logreg_mean": "logistic mean-pool", "knn_cls": "kNN CLS",
                "knn_mean": "kNN mean-pool"}


@dataclass(frozen=True)
class Row:
    """One line of a table: how its encoder is obtained, and what differs from the recipe."""

    name: str
    kind: str  # "pretrain", "random" or "supervised"
    overrides: dict = field(default_factory=dict)
    width: float = 1.0  # encoder width (model.emb_dim) relative to the recipe's
    steps: int = 1  # training steps relative to --steps


# Every study carries both references: its headroom (ceiling − random init) is printed with its table.
REFERENCES = (Row("random_init", "random"), Row("supervised", "supervised"))
MAE = {"model.model_type": "mae"}
STUDIES: dict[str, tuple[Row, ...]] = {
    "main": (Row("m3ae", "pretrain"), Row("mae", "pretrain", MAE), *REFERENCES),
    "text-mask": (*(Row(f"text_mask_{r}", "pretrain", {"model.text_mask_ratio": r}) for r in (0.15, 0.5, 0.75, 0.9)),
                  Row("text_mask_0.75_real", "pretrain", {"model.text_mask_ratio": 0.75, "model.text_mask_over": "real"}),
                  *REFERENCES),
    # 0 % of the pairs keep their caption: image-only training, i.e. MAE
    "paired-fraction": (Row("paired_0pct", "pretrain", MAE),
                        *(Row(f"paired_{round(f * 100)}pct", "pretrain", {"data.paired_fraction": f})
                          for f in (0.1, 0.3, 1.0)), *REFERENCES),
    # paper Fig. 4 at laptop scale: three widths at the recipe's steps, then 2x and 4x the steps at its width
    "scale": (*(Row(f"{name}_width{w}x", "pretrain", over, width=w)
                for w in (0.5, 1.0, 2.0) for name, over in (("m3ae", {}), ("mae", MAE))),
              *(Row(f"{name}_steps{k}x", "pretrain", over, steps=k)
                for k in (2, 4) for name, over in (("m3ae", {}), ("mae", MAE))), *REFERENCES),
}


StudyName = Literal["main", "text-mask", "paired-fraction", "scale"]


@dataclass
class DemoConfig:
    steps: int = 600  # training steps of every trained row (pretraining, and the supervised ceiling)
    batch_size: int = 64  # samples per step of every trained row
    seeds: int = 3  # seeds per row: the table reports their mean ± std
    # main: M3AE, MAE, random init, supervised; text-mask: paper Fig. 4's text ratios (and real-token
    # masking); paired-fraction: paper Fig. 3; scale: Fig. 4's widths and lengths. Every study adds
    # the random-init and supervised references.
    study: StudyName = "main"
    l2: float = 1e-3  # regularisation of the logistic-regression probe
    knn_k: int = 20  # neighbours of the kNN probe
    recipe: str = "demo"  # pretraining recipe (a packaged recipe's name or a YAML path): the same for every row
    out_dir: str | None = None  # null: runs/demo-<date-time>
    jobs: int = 2  # runs side by side in separate processes (each with cpu_count / jobs threads)
    progress: bool = True  # progress bars (one line per finished run when jobs > 1)

    def __post_init__(self) -> None:
        from ..config import ConfigError

        for name in ("steps", "batch_size", "seeds", "knn_k", "jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: must be >= 1")
        if self.l2 <= 0:
            raise ConfigError(f"--l2={self.l2!r}: must be > 0")


def pretrain_config(cfg: DemoConfig, row: Row, seed: int, run_dir: Path):
    """The recipe with the row's overrides, size and steps, and the seed: rows differ in nothing else."""
    from .. import config as config_io
    from .. import recipes
    from ..train.pretrain import PretrainConfig

    steps = cfg.steps * row.steps
    overrides = {"train.total_steps": steps, "train.batch_size": cfg.batch_size, "train.seed": seed,
                 "data.seed": seed, "out_dir": str(run_dir), "log.progress": cfg.progress, "log.figures_every": 0,
                 "checkpoint.every": max(steps // 2, 1), **row.overrides}
    recipe = config_io.load(PretrainConfig, recipes.resolve(cfg.recipe), overrides)
    if row.width == 1.0:
        return recipe
    # the heads keep their width: a multiple of 4 (sin-cos embedding) and of the head count
    unit = 4 * recipe.model.num_heads // math.gcd(4, recipe.model.num_heads)
    width = max(unit, round(recipe.model.emb_dim * row.width / unit) * unit)
    return config_io.load(PretrainConfig, recipes.resolve(cfg.recipe), {**overrides, "model.emb_dim": width})


def supervised_encoder(cfg: DemoConfig, pretrain, start: Path, run_dir: Path, train_size: int):
    """The encoder trained on the label from `start` (the random-init row's weights) for about the
    pretraining's steps and batch, through the fine-tuning trainer with its regularisers off:
    what a perfectly grounded caption could teach at most."""
    from ..engine.loop import run_task
    from ..engine.metrics import METRICS_FILE, LogConfig, read_metrics
    from ..model import M3AE
    from .probe import FinetuneConfig, TransferTrainer

    tune = FinetuneConfig(
        checkpoint=str(start), data=dataclasses.replace(pretrain.data), pool="mean",
        epochs=max(1, round(cfg.steps * cfg.batch_size / train_size)), batch_size=cfg.batch_size,
        lr=pretrain.optim.lr, warmup_epochs=0.0, layer_decay=1.0, drop_path=0.0, mixup=0.0, cutmix=0.0,
        label_smoothing=0.0, precision=pretrain.train.precision, seed=pretrain.train.seed, keep=1,
        out_dir=str(run_dir), resume="auto", log=LogConfig(figures_every=0, progress=cfg.progress))
    result = run_task(TransferTrainer, tune)  # the run directory's lock and teardown, as every task
    if result.epoch < tune.epochs:  # SIGTERM/SIGINT: checkpointed; a truncated ceiling must not be scored
        raise SystemExit(f"m3ae demo: interrupted during {run_dir}; run the same command again to resume")
    steps = read_metrics(run_dir / METRICS_FILE)[-1]["step"]
    return M3AE.from_pretrained(run_dir), {"finetune_top1": result.top1, "supervised_steps": steps}


EVAL_IMAGES = "eval_images_{split}.safetensors"  # the labelled splits, decoded once per demo


def decode_eval_images(data, run_dir: Path) -> dict[str, Path]:
    """The labelled train and val splits decoded once into run_dir (read back when there): every
    row and pool is scored on these tensors instead of decoding the JPEGs again."""
    from ..data import build_eval_loader
    from .api import DecodedImages

    paths = {}
    for split in ("train", "val"):
        paths[split] = run_dir / EVAL_IMAGES.format(split=split)
        if not paths[split].is_file():
            DecodedImages.decode(build_eval_loader(data, 256, split=split)).save(paths[split])
    return paths


def score(model, images: dict[str, Path], cfg: DemoConfig, device, timing: dict[str, float]) -> dict[str, float]:
    """Logistic regression and kNN on frozen image-only features (CLS and mean pool, one forward
    pass) of the labelled train split, accuracy on the val split. Adds its seconds to `timing`."""
    from . import api

    started = time.perf_counter()
    train, val = (api.features(model, api.DecodedImages.load(images[split]), ("cls", "mean"), device=device)
                  for split in ("train", "val"))
    timing["features_s"] = time.perf_counter() - started
    result = {}
    for pool in ("cls", "mean"):
        result[f"logreg_{pool}"] = api.logistic(train[pool], val[pool], cfg.l2)["top1"]
        result[f"knn_{pool}"] = api.knn(train[pool], val[pool], cfg.knn_k, ks=(1,))["top1"]
    timing["probes_s"] = time.perf_counter() - started - timing["features_s"]
    return result


def caption_pairs(data, vocabulary: list[str] | None = None):
    """Held-out image-caption pairs of the recipe's data, tokenised to the model's compact
    `vocabulary` when it has one, or None when its validation split has no captions to score."""
    from ..data.loader import BatchStream, PretrainLoader

    if data.source == "embedded":
        spec = str(Path(data.embedded_root) / "val-*.tar")
    elif data.eval_val_source:
        spec = data.eval_val_source
    else:
        return None
    # batches of 16: the full (16, L, 30 522) logits of two passes stay small. Every held-out pair
    # keeps its caption: paired_fraction is how the row trains, not what grounding is scored on.
    held_out = dataclasses.replace(data, source=spec, num_workers=0, paired_fraction=1.0)
    return PretrainLoader(BatchStream(held_out, 16, 0, 1, epochs=1, train_transform=False, vocabulary=vocabulary))


def class_name_ids(data, vocabulary: list[str] | None = None) -> list[int] | None:
    """Token ids (in the model's compact `vocabulary` when it has one) of the held-out labels' class
    names (the words the labels are), where the source records them (the embedded dataset, an image
    folder); else None."""
    from ..data.factory import label_names
    from ..data.tokenizer import Tokenizer

    names = label_names(data.eval_val_source or data.source, data.format, "val", data.embedded_root)
    if not names:
        return None
    words = [name.replace("_", " ") for name in names]
    return [i for ids in Tokenizer.from_name(data.tokenizer, vocabulary=vocabulary).encode(words) for i in ids]


def grounding(model, pretrain) -> dict[str, dict[str, float]]:
    """Masked-word accuracy of an M3AE model with each caption's own image vs another one's: all
    words, and the class names alone when the data has them."""
    from ..engine.runtime import resolve_device
    from .grounding import grounding_accuracy

    # the recipe's data config predates the run's compact vocabulary: the model carries it
    pairs = caption_pairs(pretrain.data, model.config.vocabulary)
    if pairs is None:
        return {}
    word_sets = {"all_words": None}
    if (names := class_name_ids(pretrain.data, model.config.vocabulary)) is not None:
        word_sets["class_names"] = names
    return grounding_accuracy(model, pairs, resolve_device(pretrain.train.device), pretrain.train.precision, word_sets)


def run_row(cfg: DemoConfig, row: Row, seed: int, run_dir: Path, images: dict[str, Path]) -> dict:
    """The row's encoder for one seed, scored; written as RESULT_FILE in its directory."""
    import torch

    from ..engine.runtime import resolve_device
    from ..model import M3AE
    from ..train.pretrain import run_pretraining
    from ..utils import atomic_path
    from .api import DecodedImages

    pretrain = pretrain_config(cfg, row, seed, run_dir)
    started = time.perf_counter()
    extra: dict = {}
    if row.kind == "pretrain":
        if run_pretraining(pretrain, resume="auto").interrupted:  # SIGTERM/SIGINT: checkpointed, resumable
            raise SystemExit(f"m3ae demo: interrupted during {run_dir}; run the same command again to resume")
        model = M3AE.from_pretrained(run_dir)
    else:
        torch.manual_seed(seed)
        model = M3AE(pretrain.model)
        if row.kind == "supervised":
            start = model.save_pretrained(run_dir / "init")
            train_size = len(DecodedImages.load(images["train"]))
            model, extra = supervised_encoder(cfg, pretrain, start, run_dir / "supervised", train_size)
    timing = {"train_s": time.perf_counter() - started}
    result = {"seed": seed, **score(model, images, cfg, resolve_device(pretrain.train.device), timing), **extra}
    if pretrain.model.model_type == "m3ae" and row.kind == "pretrain" and row.overrides.get("data.paired_fraction", 1):
        grounding_started = time.perf_counter()
        result["grounding"] = grounding(model, pretrain)
        timing["grounding_s"] = time.perf_counter() - grounding_started
    result.update(timing, total_s=time.perf_counter() - started)
    with atomic_path(run_dir / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarise(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of every number the seeds share."""
    flat = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "seed"} for r in per_seed]
    for r, src in zip(flat, per_seed, strict=True):
        for words, g in src.get("grounding", {}).items():
            r[f"grounding_gap_{words}"] = g["gap"]
    keys = [k for k in flat[0] if all(k in r for r in flat)]
    values = {k: [r[k] for r in flat] for k in keys}
    return {"mean": {k: statistics.fmean(v) for k, v in values.items()},
            "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}}


def bar_chart(results: dict, path: Path, title: str) -> Path:
    """Mean top-1 of every row for each probe, the seeds' standard deviation as error bars."""
    from ..viz.plotting import pyplot, save_figure

    rows = list(results)
    fig, ax = pyplot().subplots(figsize=(1.6 + 1.5 * len(METRICS), 3.4))
    width = 0.8 / len(rows)
    for i, name in enumerate(rows):
        means = [results[name]["mean"].get(m, math.nan) for m in METRICS]
        stds = [results[name]["std"].get(m, 0.0) for m in METRICS]
        bars = ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(METRICS))], means, width,
                      yerr=stds, capsize=2, label=name.replace("_", " "))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(METRICS)), [METRIC_NAMES[m] for m in METRICS], fontsize=8)
    ax.set_ylabel("top-1 accuracy (%), held-out")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def claim_failures(results: dict) -> dict[str, list[str]]:
    """Per probe, where the paper's claims fail seed by seed: a pretrained row (M3AE, MAE) at or
    below random init, or M3AE at or below MAE. A probe with no failure can head the table."""
    seeds = {name: results[name]["seeds"] for name in ("m3ae", "mae", "random_init") if name in results}
    pairs = [("m3ae", "mae")] + [(name, "random_init") for name in ("m3ae", "mae") if "random_init" in seeds]
    failures = {}
    for m in METRICS:
        failures[m] = [f"{a} ≤ {b} on seed {i}" for a, b in pairs
                       for i, (x, y) in enumerate(zip(seeds[a], seeds[b], strict=True)) if x[m] <= y[m]]
    return failures


def table(results: dict, seeds: int) -> str:
    def cell(row: dict, key: str) -> str:
        return f"{row['mean'][key]:.1f} ± {row['std'][key]:.1f}" if key in row["mean"] else "–"

    lines = [f"| row ({seeds} seeds) | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r, m) for m in METRICS) + " |" for name, r in results.items()]
    if "m3ae" in results and "mae" in results:
        for m in METRICS:
            gaps = [a[m] - b[m] for a, b in zip(results["m3ae"]["seeds"], results["mae"]["seeds"], strict=True)]
            lines.append(f"M3AE − MAE, {METRIC_NAMES[m]}: " + ", ".join(f"{g:+.1f}" for g in gaps)
                         + f" (mean {statistics.fmean(gaps):+.2f})")
        failures = claim_failures(results)
        held = [METRIC_NAMES[m] for m in METRICS if not failures[m]]
        lines.append("M3AE > MAE > random init on every seed: " + (", ".join(held) or "no probe"))
        lines += [f"  not on {METRIC_NAMES[m]}: " + "; ".join(why) for m, why in failures.items() if why]
    if "supervised" in results:
        lines.append(f"supervised ceiling, its own classifier: {cell(results['supervised'], 'finetune_top1')}")
    for name, r in results.items():
        for key in r["mean"]:
            if key.startswith("grounding_gap_"):
                lines.append(f"{name} masked-word accuracy gap, own image − another image "
                             f"({key[len('grounding_gap_'):].replace('_', ' ')}): {cell(r, key)} points")
    return "\n".join(lines)


HEADROOM_MIN = 10.0  # points between the supervised ceiling and random init below which a table says nothing


def headroom(results: dict) -> dict[str, float]:
    """Per logistic probe, the supervised ceiling's mean minus random init's: the most any
    pretraining objective can add on this set at this budget. Empty without both reference rows."""
    if "supervised" not in results or "random_init" not in results:
        return {}
    return {m: results["supervised"]["mean"][m] - results["random_init"]["mean"][m] for m in METRICS
            if m.startswith("logreg_")}


def headroom_report(gaps: dict[str, float]) -> str:
    """One line of gaps, and one warning line when even the largest is under HEADROOM_MIN."""
    line = "headroom, supervised ceiling − random init: " + ", ".join(
        f"{METRIC_NAMES[m]} {g:+.1f}" for m, g in gaps.items()) + " points"
    if max(gaps.values()) < HEADROOM_MIN:
        line += (f"\nwarning: headroom under {HEADROOM_MIN:.0f} points: this set cannot separate pretraining "
                 f"objectives at this budget; raise --steps, the image size or the model width")
    return line


TIMES = {"train_s": "training", "features_s": "features", "probes_s": "probes", "grounding_s": "grounding"}


def time_split(per_run: list[dict], wall_s: float, decode_s: float) -> str:
    """Where the runs' time went (summed over runs, each on its own share of the cores), beside the
    one decoding of the labelled splits."""
    spent = {name: sum(r.get(key, 0.0) for r in per_run) for key, name in TIMES.items()}
    total = sum(spent.values()) or 1.0
    return (f"time: {wall_s:.0f} s wall (labelled splits decoded once in {decode_s:.0f} s); of the runs' "
            f"{total:.0f} s: " + ", ".join(f"{name} {100 * v / total:.0f} %" for name, v in spent.items()))


class Eta:
    """Remaining time from the runs already made: each row at its own measured cost once one of its
    seeds has run, else at the mean of the trained rows seen so far (random init: at its own or
    nothing, it only extracts features). Printed after every run, first after the first one."""

    def __init__(self, units: list[Row], jobs: int = 1) -> None:
        self.pending = list(units)
        self.jobs = jobs
        self.spent: dict[str, list[float]] = {}

    def done(self, row: Row, seconds: float) -> str:
        self.pending.remove(row)
        self.spent.setdefault(row.name, []).append(seconds)
        known = {name: statistics.fmean(v) for name, v in self.spent.items()}
        trained = [v for name, v in known.items() if name != "random_init"] or [0.0]
        left = sum(known.get(r.name, 0.0 if r.kind == "random" else statistics.fmean(trained)) for r in self.pending)
        return f"{len(self.pending)} runs left, about {left / self.jobs / 60:.1f} min"


def run_order(rows: tuple[Row, ...], seeds: int) -> list[tuple[Row, int]]:
    """Seed by seed, trained rows first and random-init rows (features only, about a tenth of a
    trained run) last: with runs side by side, the short ones fill the gap while the last long run
    finishes instead of one worker idling."""
    units = [(row, seed) for seed in range(seeds) for row in rows]
    return sorted(units, key=lambda unit: unit[0].kind == "random")  # stable: seed order kept within each group


def _worker_init(threads: int) -> None:
    import os

    import torch

    # Every run in this worker takes its share of the cores: `threads: auto` of the pretraining and
    # fine-tuning tasks reads OMP_NUM_THREADS (else it takes every core, jobs × cores threads in all).
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _timed_run(cfg: DemoConfig, row: Row, seed: int, run_dir: Path, images: dict[str, Path]) -> tuple[dict, float]:
    started = time.perf_counter()
    return run_row(cfg, row, seed, run_dir, images), time.perf_counter() - started


def run_demo(cfg: DemoConfig) -> dict:
    from ..data.factory import open_source
    from ..engine.run_dir import default_run_dir
    from ..utils import atomic_path
    from .api import data_for_model

    started = time.perf_counter()
    run_dir = Path(cfg.out_dir or default_run_dir("demo"))
    rows = STUDIES[cfg.study]
    units = run_order(rows, cfg.seeds)
    print(f"m3ae demo ({cfg.study}): {len(rows)} rows × {cfg.seeds} seeds, {cfg.steps} steps of batch "
          f"{cfg.batch_size} per trained row, {cfg.jobs} at a time; results in {run_dir}", flush=True)
    recipe = pretrain_config(cfg, rows[0], 0, run_dir)
    data = data_for_model(recipe.data, recipe.model, "model.image_size")
    if data.source == "embedded":  # generated once here, not by every parallel run
        open_source("embedded", role="labelled", split="train", embedded_root=data.embedded_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    decode_started = time.perf_counter()
    images = decode_eval_images(data, run_dir)
    decode_s = time.perf_counter() - decode_started
    results_by_unit: dict[tuple[str, int], dict] = {}
    todo = []
    for row, seed in units:
        done = run_dir / row.name / f"seed{seed}" / RESULT_FILE
        if done.is_file():
            results_by_unit[row.name, seed] = json.loads(done.read_text())
        else:
            todo.append((row, seed))
    if len(todo) < len(units):
        print(f"m3ae demo: {len(units) - len(todo)} runs read back from {run_dir}", flush=True)
    eta = Eta([row for row, _ in todo], cfg.jobs)

    def finished(row: Row, seed: int, result: dict, seconds: float) -> None:
        results_by_unit[row.name, seed] = result
        print(f"m3ae demo: {row.name} seed {seed} done in {seconds:.0f} s; {eta.done(row, seconds)}", flush=True)

    if cfg.jobs == 1:
        for row, seed in todo:
            finished(row, seed, *_timed_run(cfg, row, seed, run_dir / row.name / f"seed{seed}", images))
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # Small models use one core poorly: whole runs side by side, the cores shared among them,
        # one progress line per finished run instead of interleaved bars.
        quiet = dataclasses.replace(cfg, progress=False)
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
        with ProcessPoolExecutor(cfg.jobs, multiprocessing.get_context("spawn"), _worker_init, (threads,)) as pool:
            futures = {pool.submit(_timed_run, quiet, row, seed, run_dir / row.name / f"seed{seed}", images): (row, seed)
                       for row, seed in todo}
            for future in as_completed(futures):
                finished(*futures[future], *future.result())
    results = {}
    for row in rows:
        seeds = [results_by_unit[row.name, seed] for seed in range(cfg.seeds)]
        results[row.name] = {"seeds": seeds, **summarise(seeds)}
    wall_s = time.perf_counter() - started
    with atomic_path(run_dir / "demo_results.json") as tmp:
        tmp.write_text(json.dumps({"config": dataclasses.asdict(cfg), "wall_s": wall_s,
                                   "headroom": headroom(results), "rows": results}, indent=1) + "\n")
    bar_chart(results, run_dir / "demo_results.png",
              f"{cfg.study}: frozen features, {cfg.steps} steps, mean ± std over {cfg.seeds} seeds")
    print(table(results, cfg.seeds))
    if gaps := headroom(results):
        print(headroom_report(gaps))
    print(time_split(list(results_by_unit.values()), wall_s, decode_s))
    print(f"results: {run_dir / 'demo_results.json'}  chart: {run_dir / 'demo_results.png'}")
    return results


def register(subparsers) -> None:
    from ..config import add_config_arguments

    p = subparsers.add_parser("demo", help="M3AE vs MAE (+ random-init and supervised references) on the "
                              "embedded dataset, over seeds; or a paper ablation (--study)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from ..config import command_config

    cfg = command_config(args, DemoConfig)
    if cfg is not None:
        run_demo(cfg)
    return 0
