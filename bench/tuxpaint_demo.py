"""`m3ae demo` on real captioned data: the Tux Paint stamps (Debian `tuxpaint-stamps-default`, GPL-2,
fetched into --work, never committed), their 16 top-level categories as labels and the first line of
each stamp's .txt as its caption, through the route a user takes with their own set
(docs/RESULTS.md, "Your own captioned data"): the packaged `demo_captions` recipe with the data
filled in, then `m3ae demo --recipe`.

    .venv/bin/python bench/tuxpaint_demo.py --split dev      # choose size and budget here
    .venv/bin/python bench/tuxpaint_demo.py --split heldout  # then measure once on the held-out split

The manifests are bench/tuxpaint_transfer.py's fixed 80/20 split by path hash, the images downscaled
once (bench/compact_vocab.py) so that PNG decoding does not dominate. `--split dev` pretrains on the
training stamps and scores on a fixed 20 % of them held out by key hash (data.eval_val_fraction):
size, resolution and budget are chosen on it, never on the held-out split. `--split heldout`
pretrains on the same training stamps and scores on the held-out 20 %. `--references-only` trains
and scores only the two rows the headroom is made of (random init, supervised ceiling), with the
demo's own code, to compare sizes and budgets on the dev split at a third of the cost.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import m3ae.cli  # noqa: F401  first: idle OpenMP threads sleep, as under `m3ae`, before torch loads
from compact_vocab import downscaled
from tuxpaint_transfer import build_manifests, extract

from m3ae import config as config_io
from m3ae import recipes
from m3ae.eval import demo
from m3ae.eval.api import data_for_model
from m3ae.train.pretrain import PretrainConfig

DEV_FRACTION = 0.2  # of the training stamps, by key hash: the split the budget is chosen on


def write_recipe(work: Path, split: str, image_size: int, side: int, text_length: int) -> Path:
    """The packaged demo_captions recipe with the stamps filled in, as `m3ae pretrain --config
    demo_captions --data.source ... --print-config` writes it."""
    train, val, _ = build_manifests(extract(work), work)
    small_train, small_val = downscaled(train, work, side), downscaled(val, work, side)
    data = ({"data.eval_val_fraction": DEV_FRACTION} if split == "dev" else {"data.eval_val_source": str(small_val)})
    cfg = config_io.load(PretrainConfig, recipes.resolve("demo_captions"),
                         {"data.source": str(small_train), "model.image_size": image_size,
                          "model.text_length": text_length, **data})
    path = work / f"recipe-{split}-{image_size}px-L{text_length}.yaml"
    path.write_text(config_io.to_yaml(cfg))
    return path


def references(cfg: demo.DemoConfig) -> None:
    """The random-init and supervised rows alone, run and read back as `m3ae demo` does, then the
    demo's headroom line."""
    out = Path(cfg.out_dir)
    first = demo.pretrain_config(cfg, demo.REFERENCES[0], 0, out)
    images = demo.decode_eval_images(data_for_model(first.data, first.model, "model.image_size"), out)
    results = {}
    for row in demo.REFERENCES:
        seeds = []
        for seed in range(cfg.seeds):
            done = out / row.name / f"seed{seed}" / demo.RESULT_FILE
            seeds.append(json.loads(done.read_text()) if done.is_file()
                         else demo.run_row(cfg, row, seed, out / row.name / f"seed{seed}", images))
            print(f"{row.name} seed {seed}: " + ", ".join(f"{m} {seeds[-1][m]:.1f}" for m in demo.METRICS), flush=True)
        results[row.name] = {"seeds": seeds, **demo.summarise(seeds)}
    print(demo.table(results, cfg.seeds))
    print(demo.headroom_report(demo.headroom(results)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/m3ae-tuxpaint")
    parser.add_argument("--split", choices=("dev", "heldout"), required=True,
                        help="dev: scored on 20 %% of the training stamps; heldout: on the held-out stamps")
    parser.add_argument("--image-size", type=int, default=32, help="model.image_size (the recipe's: 32)")
    parser.add_argument("--side", type=int, default=64, help="shorter side the stamps are downscaled to, once")
    parser.add_argument("--text-length", type=int, default=16, help="caption tokens (95 %% of the captions fit 16)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="default: WORK/demo-SPLIT-SIZEpx-STEPS")
    parser.add_argument("--references-only", action="store_true", help="random init and supervised rows only")
    args = parser.parse_args()
    work = Path(args.work)
    recipe = write_recipe(work, args.split, args.image_size, args.side, args.text_length)
    out = args.out_dir or str(work / f"demo-{args.split}-{args.image_size}px-{args.steps}")
    print(f"recipe {recipe}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    cfg = demo.DemoConfig(steps=args.steps, seeds=args.seeds, jobs=args.jobs, recipe=str(recipe), out_dir=out,
                          progress=False)
    if args.references_only:
        references(cfg)
    else:
        demo.run_demo(cfg)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
