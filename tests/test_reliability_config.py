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
