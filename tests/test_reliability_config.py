"""Settings are type- and range-checked where they are read: recipes, flags and config.json alike."""

from __future__ import annotations

import json

import pytest

from m3ae import M3AE, ConfigError, M3AEConfig
from m3ae.cli import main

TINY = dict(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2, image_size=32,
            patch_size=8, text_length=8, vocab_size=100)


@pytest.fixture
def saved(tmp_path):
    return M3AE(M3AEConfig(**TINY)).save_pretrained(tmp_path / "model")


def edit_config(directory, **changes) -> str:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(path)


@pytest.mark.parametrize("field, value, why", [
    ("norm_pix_loss", "false", "expected true or false"),  # used to load as True
    ("layer_norm_eps", "tiny", "expected a number"),
    ("layer_norm_eps", -1.0, "finite number > 0"),
    ("depth", 1.5, "expected an integer"),
    ("masking", "random", "must be one of"),
    ("text_loss_weight", None, "expected a number"),
])
def test_from_pretrained_checks_config_json_types_naming_file_and_field(saved, field, value, why):
    path = edit_config(saved, **{field: value})
    with pytest.raises(ConfigError) as info:
        M3AE.from_pretrained(saved)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and f"{field}=" in message and why in message


def test_invalid_json_names_the_file(saved, capsys, tmp_path):
    (saved / "config.json").write_text('{"depth": 1,')
    with pytest.raises(ConfigError, match=f"^{saved / 'config.json'}: not a readable JSON file"):
        M3AE.from_pretrained(saved)
    # every command: one line, exit 2, no traceback
    assert main(["export", "--checkpoint", str(saved), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3ae export: config error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value, field", [
    ("--data.crop_scale", "[0, 1]", "crop_scale"),
    ("--data.crop_scale", "[0.9, 0.1]", "crop_scale"),
    ("--data.num_workers", "-1", "num_workers"),
    ("--data.seed", "-1", "seed"),
    ("--optim.lr", "nan", "optim.lr"),
    ("--data.unpaired_text_batch_size", "-1", "unpaired_text_batch_size"),
    ("--data.image_only_sources", "[42]", "source=42"),
    ("--data.text_only_sources", "[{source: a.txt, weight: .nan}]", "weight=nan"),
    ("--model.mlp_ratio", ".nan", "mlp_ratio"),
    ("--train.unpaired_text_weight", ".nan", "unpaired_text_weight"),
])
def test_invalid_settings_fail_at_load_time_naming_the_field(capsys, flag, value, field):
    assert main(["pretrain", "--print-config", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3ae pretrain: config error: ") and field in err and len(err.strip().splitlines()) == 1


def test_a_vocabulary_smaller_than_the_tokenizer_fails_before_training(capsys, tmp_path):
    assert main(["pretrain", "--model.vocab_size", "10", "--data.vocab", "full", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size=10: smaller than the 30522 tokens of data.tokenizer='bert-base-uncased'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes whose value expands to 10^levels strings wherever it is walked (the
    error message "model.depth=[...]: expected an integer" once formatted all of it)."""
    items = ['&a0 ["xxxxxxxxxxxxxxxx"]'] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "model:\n  depth: [" + ", ".join(items) + "]\n"


def test_a_yaml_alias_bomb_is_refused_at_once_in_one_line(tmp_path, capsys):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 700
    start = time.perf_counter()
    assert main(["pretrain", "--print-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 5
    assert f"{path}: not valid YAML" in err and "alias *a0 refused" in err
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000


def test_duplicate_yaml_keys_are_an_error_naming_the_key(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    assert main(["pretrain", "--print-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not valid YAML" in err and "duplicate key 'lr'" in err and len(err.strip().splitlines()) == 1


def test_a_binary_config_names_the_file(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 10)
    assert main(["pretrain", "--print-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a YAML text file" in err and len(err.strip().splitlines()) == 1


def test_errors_never_echo_a_long_value_whole(tmp_path, capsys):
    path = tmp_path / "long.yaml"
    path.write_text("model:\n  depth: " + "9" * 10 + "x" * 100_000 + "\ndata:\n  image_only_sources: [" +
                    ", ".join(["{source: 42}"] * 5000) + "]\n")
    assert main(["pretrain", "--print-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.depth='9999999999xxx" in err and len(err) < 1000, err[:2000]


@pytest.mark.parametrize("value", ["0", "0.0"])
def test_a_zero_or_negative_adam_eps_is_refused(capsys, value):
    # eps 0 divided zero gradients by zero: 5 of 6 steps non-finite and NaN weights saved, exit 0
    assert main(["pretrain", "--print-config", "--optim.eps", value]) == 2
    err = capsys.readouterr().err
    assert f"optim.eps={float(value)!r}: must be > 0" in err and len(err.strip().splitlines()) == 1


def test_a_stored_command_or_url_source_is_refused_unless_typed_again():
    from m3ae.data import DataConfig, WeightedSource
    from m3ae.data.config import refuse_stored_commands, runs_or_fetches

    for spec in ("pipe:curl -s http://x/a.tar", "a.tar::pipe:sh -c 'touch PWNED'", "{pipe:x,y}.tar",
                 "https://host/shard-{000..009}.tar", "s3://bucket/a.tar"):
        assert runs_or_fetches(spec), spec
    for spec in ("data/shards-{000..009}.tar", "file:///data/a.tar", "embedded", "/data/a.h5", ""):
        assert not runs_or_fetches(spec), spec
    stored = DataConfig(source="pipe:touch PWNED", image_only_sources=[WeightedSource("local.tar"),
                                                                       WeightedSource("https://x/b.tar")])
    with pytest.raises(ConfigError, match=r"^data.source='pipe:touch PWNED' \(from runs/a/config.yaml\) runs a "
                                          r"command or fetches a URL; .* type it again \(--data.source \.\.\.\)$"):
        refuse_stored_commands(stored, "runs/a/config.yaml")
    with pytest.raises(ConfigError, match=r"^data.image_only_sources\[1\].source='https://x/b.tar' .*"
                                          r"\(--data.image-only-sources \.\.\.\)$"):
        refuse_stored_commands(stored, "runs/a/config.yaml", typed={"data.source"})
    refuse_stored_commands(stored, "runs/a/config.yaml", typed={"data.source", "data.image_only_sources"})
    refuse_stored_commands(DataConfig(source="data/a.tar"), "runs/a/config.yaml")


def test_a_cuda_device_without_cuda_is_one_line(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only build
    assert main(["pretrain", "--train.device", "cuda", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda': CUDA is not available here" in err and len(err.strip().splitlines()) == 1
