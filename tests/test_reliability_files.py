"""Model and checkpoint files are data: meta.json names stay inside their step directory, and a
model's size is checked against its weights' headers before anything is built."""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch

from m3ae.model.files import (CONFIG_NAME, META_NAME, STATE_NAME, WEIGHTS_NAME, CheckpointError, newest_verified,
                              resolve, sha256, step_dir_name, verify)


def step(run, number: int, files: dict | list | None = None):
    """A checkpoint step directory with three small files and a meta.json listing their digests
    (or `files` as given)."""
    directory = run / "checkpoints" / step_dir_name(number)
    directory.mkdir(parents=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME):
        (directory / name).write_bytes(f"{name} of step {number}".encode())
    listed = {name: sha256(directory / name) for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME)}
    (directory / META_NAME).write_text(json.dumps({"step": number, "files": listed if files is None else files}))
    return directory


@pytest.mark.parametrize("case", ["absolute", "climbing", "symlink_out", "list", "digest_not_text"])
def test_a_hostile_meta_json_falls_back_to_the_previous_checkpoint(tmp_path, case):
    good = step(tmp_path, 10)
    newest = step(tmp_path, 20)
    meta = json.loads((newest / META_NAME).read_text())
    if case == "absolute":
        meta["files"]["/proc/self/pagemap"] = "0" * 64  # hashing it never ends
    elif case == "climbing":
        meta["files"]["../../../secret"] = "0" * 64
    elif case == "symlink_out":
        (newest / "extra").symlink_to("/proc/self/pagemap")
        meta["files"]["extra"] = "0" * 64
    elif case == "list":
        meta["files"] = list(meta["files"])
    else:
        meta["files"][WEIGHTS_NAME] = ["not", "a", "digest"]
    (newest / META_NAME).write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(CheckpointError):
        verify(newest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert newest_verified(tmp_path) == good and resolve(tmp_path) == good
    assert any(f"skipping checkpoint {newest}" in str(w.message) for w in caught)
    assert time.perf_counter() - start < 5


def test_plain_names_still_verify(tmp_path):
    directory = step(tmp_path, 10)
    assert verify(directory) == 10
    os.rename(directory / STATE_NAME, directory / "state.bin")
    (directory / STATE_NAME).symlink_to("state.bin")  # a link inside the directory is its file
    assert verify(directory) == 10


def tiny_model():
    from m3ae import M3AE, M3AEConfig

    torch.manual_seed(0)
    return M3AE(M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
                           image_size=32, patch_size=8, text_length=8, vocab_size=100))


def classifier_checkpoint(directory, backbone_changes: dict):
    """A linear-probe checkpoint as the trainer writes it: the classifier's weights, and config.json
    with the backbone's config under "backbone"."""
    from safetensors.torch import save_file

    from m3ae.model.classifier import M3AEClassifier

    model = tiny_model()
    classifier = M3AEClassifier(model, 3, probe=True)
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps({"num_classes": 3,
                                                     "backbone": {**model.config.to_dict(), **backbone_changes}}))
    return directory


def test_the_backbone_route_type_checks_config_json(tmp_path):
    from m3ae import M3AE, ConfigError

    good = classifier_checkpoint(tmp_path / "good", {"layer_norm_eps": "1e-6"})  # YAML's reading of 1e-6: a number
    assert M3AE.from_pretrained(good).config.layer_norm_eps == 1e-6
    bad = classifier_checkpoint(tmp_path / "bad", {"norm_pix_loss": "false"})  # used to load as True
    with pytest.raises(ConfigError, match=f"^{bad / CONFIG_NAME}: backbone.norm_pix_loss='false': expected true or false"):
        M3AE.from_pretrained(bad)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "float64"])
def test_weights_of_a_non_float_dtype_are_refused_naming_the_tensor(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from m3ae import M3AE

    directory = tiny_model().save_pretrained(tmp_path / "m")
    state = load_file(str(directory / WEIGHTS_NAME))
    state["cls_token"] = state["cls_token"].to(getattr(torch, dtype))
    save_file(state, str(directory / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"cls_token is (I32|I64|BOOL|F64); weights are floating point"):
        M3AE.from_pretrained(directory)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from m3ae import M3AE

    directory = tiny_model().save_pretrained(tmp_path / "m")
    state = load_file(str(directory / WEIGHTS_NAME))
    state["encoder.blocks.0.attn.qkv.weight"][3, 4] = float("nan")
    save_file(state, str(directory / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"model.safetensors: encoder.blocks.0.attn.qkv.weight holds NaN or infinite"):
        M3AE.from_pretrained(directory)
