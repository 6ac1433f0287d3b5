"""The top-level command line: --version, and user errors as one line with exit status 2."""

from __future__ import annotations

import pytest

from m3ae import __version__
from m3ae.cli import main, one_line


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"m3ae {__version__}"


@pytest.mark.parametrize("argv", [
    ["knn", "--checkpoint", "no/such/run-dir", "--data.source", "embedded"],
    ["reconstruct", "--checkpoint", "no-such-model", "--image", "no-such.jpg"],
])
def test_missing_path_is_one_line_and_exit_2(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("M3AE_DEBUG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the last line, after what the command said it chose (threads, precision), and nothing else
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"m3ae {argv[0]}: error: ") and "Traceback" not in err
    assert sum(": error: " in line for line in err.splitlines()) == 1


def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M3AE_DEBUG", "1")
    with pytest.raises((ValueError, OSError)):
        main(["reconstruct", "--checkpoint", "no-such-model", "--image", "no-such.jpg"])


def test_missing_optional_package_names_it():
    error = ModuleNotFoundError("No module named 'wandb'", name="wandb")
    assert one_line(error) == "the optional package 'wandb' is not installed"
    assert one_line(ValueError("bad\n  value")) == "bad value"


def test_config_flags_have_one_kebab_spelling_an_alias_help_and_defaults(capsys):
    import yaml

    assert main(["pretrain", "--print-config", "--optim.base-lr", "0.002", "--train.batch_size", "16"]) == 0
    kebab = yaml.safe_load(capsys.readouterr().out)
    assert main(["pretrain", "--print-config", "--optim.base_lr", "0.002", "--train.batch-size", "16"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == kebab
    assert kebab["optim"]["base_lr"] == 0.002 and kebab["train"]["batch_size"] == 16
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    assert "--optim.base-lr" in text and "--optim.base_lr" not in text  # the alias is not listed
    assert "(default: 0.75)" in text  # the mask ratios' defaults are shown
