"""Typed configs: YAML recipes, dotted overrides, and bad values failing before any work."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from m3ae import config as config_io
from m3ae.cli import main
from m3ae.config import ConfigError
from m3ae.recipes import DIRECTORY as RECIPES
from m3ae.train.pretrain import PretrainConfig


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    limit: int | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"
    flag: bool = False


def test_yaml_and_dotted_overrides_are_typed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("inner:\n  rate: 1e-4\n  sizes: [3, 4]\nname: run\n")
    cfg = config_io.load(Outer, path, {"inner.mode": "b", "flag": True, "inner.limit": 7})
    assert cfg == Outer(Inner(rate=1e-4, mode="b", sizes=[3, 4], limit=7), name="run", flag=True)
    assert config_io.load(Outer, None, {"inner.limit": None}).inner.limit is None
    round_trip = tmp_path / "out.yaml"
    config_io.save_yaml(cfg, round_trip)
    assert config_io.load(Outer, round_trip) == cfg


@pytest.mark.parametrize("overrides,field_name", [
    ({"inner.rate": "fast"}, "inner.rate"),
    ({"inner.mode": "c"}, "inner.mode"),
    ({"inner.sizes": [1, "x"]}, "inner.sizes[1]"),
    ({"inner.speed": 1}, "inner.speed"),
    ({"flag": "yes"}, "flag"),
    ({"name.sub": 1}, "name="),
])
def test_bad_values_raise_naming_the_field(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name.replace("[", r"\[").replace("]", r"\]")):
        config_io.load(Outer, None, overrides)


def test_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  mode: z\n")
    with pytest.raises(ConfigError, match=r"inner.mode.*bad.yaml"):
        config_io.load(Outer, path)


def test_model_section_starts_from_its_preset():
    cfg = config_io.load(PretrainConfig, None, {"model.preset": "base", "model.image_mask_ratio": 0.5})
    assert (cfg.model.emb_dim, cfg.model.depth, cfg.model.image_mask_ratio, cfg.model.preset) == (768, 12, 0.5, "base")
    assert (cfg.data.image_size, cfg.data.text_length) == (256, 64)  # the data follows the model
    with pytest.raises(ConfigError, match="model.*num_heads"):
        config_io.load(PretrainConfig, None, {"model.emb_dim": 30, "model.num_heads": 4})
    with pytest.raises(ConfigError, match="preset='giant'"):
        config_io.load(PretrainConfig, None, {"model.preset": "giant"})


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = config_io.load(PretrainConfig, RECIPES / f"{recipe}.yaml", {"data.source": "shards/{0..9}.tar"})
    assert cfg.train.batch_size >= 1


@pytest.mark.parametrize("recipe", ["cc12m_m3ae", "cc12m_mae"])
def test_a_scale_recipe_needs_data_source_and_derives_its_steps_from_epochs(recipe, tmp_path, capsys):
    # it once trained on the embedded toy set with 0 workers without a word
    assert main(["pretrain", "--config", recipe, "--out-dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.source: not given, and this config (a scale recipe) never falls back to the toy set: name your " \
           "data with --data.source" in line
    assert not (tmp_path / "run").exists()
    argv = ["pretrain", "--config", recipe, "--data.source", "cc12m/{00000..01242}.tar", "--print-config"]
    assert main([*argv, "--train.samples-per-epoch", "1000000"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["num_workers"] == 16
    assert printed["train"]["total_steps"] == math.ceil(100 * 1_000_000 / 4096) == 24415


def test_steps_derived_from_epochs_are_printed_and_max_steps_past_them_stretches_the_schedule():
    cfg = config_io.load(PretrainConfig, None, {"train.epochs": 2.5, "train.samples_per_epoch": 100,
                                                "train.batch_size": 8})
    assert cfg.train.total_steps == 32  # ceil(250 / 8)
    assert cfg.train.describe_schedule() == "schedule: 2.5 epochs x 100 samples / batch 8 = 32 steps"
    assert config_io.load(PretrainConfig, None, {"train.epochs": 1, "train.samples_per_epoch": 80,
                                                 "train.max_steps": 50}).train.total_steps == 50
    with pytest.raises(ConfigError, match="train.epochs=1: needs epochs > 0 and train.samples_per_epoch"):
        config_io.load(PretrainConfig, None, {"train.epochs": 1})


def test_paper_recipes_follow_the_paper():
    m3ae, mae = (config_io.load(PretrainConfig, RECIPES / f"{name}.yaml", {"data.source": "cc12m/"})
                 for name in ("cc12m_m3ae", "cc12m_mae"))
    for cfg in (m3ae, mae):
        assert cfg.train.batch_size == 4096 and cfg.optim.peak_lr(4096) == pytest.approx(1.5e-4 * 16)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
        assert cfg.optim.clip_grad_norm is None
        assert cfg.model.preset == "base" and cfg.model.image_size == 256 and cfg.model.image_mask_ratio == 0.75
        steps_per_epoch = 12_400_000 / 4096  # the paper's 100 epochs of CC12M
        assert cfg.train.total_steps == math.ceil(100 * steps_per_epoch)
        assert cfg.optim.warmup_steps == pytest.approx(5 * steps_per_epoch, rel=2e-4)
    assert m3ae.model.text_loss_weight == 0.5 and m3ae.model.text_mask_ratio == 0.75
    assert m3ae.data.vocab == "full" and m3ae.model.vocab_size == 30522  # BERT's, as the official checkpoints
    assert mae.model.model_type == "mae"


@pytest.mark.parametrize("args,field_name", [
    (["--optim.base_lr", "fast"], "optim.base_lr"),
    (["--train.precision", "fp8"], "train.precision"),
    (["--train.batch_size", "10", "--train.micro_batch_size", "4"], "train.micro_batch_size"),
    (["--model.preset", "giant"], "preset"),
    (["--config", "no_such_recipe"], "no_such_recipe"),
    (["--resume", "auto"], "--out-dir"),
])
def test_pretrain_command_rejects_bad_configs_before_any_work(tmp_path, monkeypatch, capsys, args, field_name):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert main(["pretrain", *args]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "config error" in err and field_name in err
    assert not (tmp_path / "runs").exists()


def test_pretrain_print_config_applies_cli_aliases(capsys, tmp_path):
    assert main(["pretrain", "--print-config", "--out-dir", str(tmp_path), "--max-steps", "7",
                 "--model.preset", "small", "--optim.lr", "1e-3"]) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["out_dir"] == str(tmp_path) and cfg["train"]["max_steps"] == 7
    assert cfg["model"]["emb_dim"] == 384 and cfg["optim"]["lr"] == 1e-3
    # what --print-config prints, --config reads back to the same config
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["pretrain", "--config", str(tmp_path / "printed.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_config_help_names_the_packaged_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a packaged recipe (cc12m_m3ae, cc12m_mae, demo, demo_captions, tiny)" in text


def test_bench_prints_one_json_object_with_throughput_and_mfu():
    out = subprocess.run(
        [sys.executable, "-m", "m3ae.cli", "bench", "--preset", "tiny", "--batch-size", "2", "--image-size", "32",
         "--text-length", "16", "--vocab-size", "100", "--steps", "2", "--warmup", "1", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out)
    for key in ("samples_per_s", "step_s", "flops_per_s", "peak_flops_per_s", "mfu"):
        assert result[key] > 0, key
    assert result["mfu"] == pytest.approx(result["flops_per_s"] / result["peak_flops_per_s"])
    assert result["samples_per_s"] == pytest.approx(2 / result["step_s"])
    assert (result["text_length"], result["image_mask_ratio"], result["text_mask_ratio"]) == (16, 0.75, 0.75)


def test_a_data_image_size_other_than_the_models_is_an_error_naming_both():
    cfg = config_io.load(PretrainConfig, None, {"model.preset": "tiny", "data.image_size": 64})
    assert cfg.data.image_size == 64  # the same size, given twice, is fine
    with pytest.raises(ConfigError, match=r"data.image_size=48 disagrees with model.image_size=64"):
        config_io.load(PretrainConfig, None, {"model.preset": "tiny", "data.image_size": 48})


def test_a_config_error_blames_the_file_or_the_command_line_whichever_holds_the_value(tmp_path, capsys):
    # a value typed on the command line was reported "(in .../tiny.yaml)"
    assert main(["pretrain", "--optim.base_lr", "fast", "--print-config"]) == 2
    line = capsys.readouterr().err.strip()
    # one line, through the CLI's one error path like every command's
    assert "optim.base_lr='fast': expected a number (on the command line) (M3AE_DEBUG" in line
    assert "tiny.yaml" not in line and len(line.splitlines()) == 1
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  base_lr: fast\n")
    assert main(["pretrain", "--config", str(recipe), "--train.batch_size", "8", "--print-config"]) == 2
    assert f"expected a number (in {recipe}) (M3AE_DEBUG" in capsys.readouterr().err
