"""Official checkpoints -> our model: end to end through the CLI, older formats, hostile pickles."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from conftest import OFFICIAL, assert_close
from m3ae import M3AE
from m3ae.cli import main
from m3ae.interop.official import ConversionError, convert_official, load_official

CKPT = OFFICIAL / "m3ae_tiny_official_ckpt.pkl"


def test_official_checkpoint_converts_through_cli_and_reproduces_official_outputs(tmp_path, m3ae_tiny, capsys):
    assert main(["convert-official", "--checkpoint", str(CKPT), "--out-dir", str(tmp_path / "out")]) == 0
    assert "parameters" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    model = M3AE.from_pretrained(tmp_path / "out", masking="shared")
    expected = np.load(OFFICIAL / "m3ae_tiny_official_ckpt_expected.npz")
    # the stored parameters, one AdamW step after m3ae_tiny.npz's
    flat = {k.removeprefix("params/"): v for k, v in expected.items() if k.startswith("params/")}
    from m3ae.interop.official import to_torch_state_dict

    for name, tensor in to_torch_state_dict(flat, 0).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    fx = m3ae_tiny
    with torch.no_grad():
        out = model(
            fx.image, fx["input/text"].long(), fx["input/text_padding_mask"],
            image_noise=fx["paired/image_noise"], text_noise=fx["paired/text_noise"],
        )
    assert_close(out.image_pred, torch.from_numpy(expected["paired/image_output"]), "image head")
    assert_close(out.text_logits, torch.from_numpy(expected["paired/text_output"]), "text head")
    for name in ("loss", "image_loss", "text_loss", "text_accuracy"):
        assert_close(getattr(out, name), torch.from_numpy(expected[f"paired/{name}"]), name)
    assert model.config.image_size == 48 and model.config.text_length == 18 and model.config.num_heads == 4


def test_npz_of_flax_paths_converts(tmp_path, m3ae_tiny):
    np.savez(tmp_path / "params.npz", **{f"params/{k}": v for k, v in m3ae_tiny.flat.items()})
    model = convert_official(tmp_path / "params.npz", num_heads=4, dec_num_heads=2, image_size=48)
    for name, tensor in m3ae_tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def test_pickled_nested_dict_of_params_converts(tmp_path, mae_tiny):
    (tmp_path / "mae.pkl").write_bytes(pickle.dumps({"params": _nest(mae_tiny.flat)}))
    model = convert_official(tmp_path / "mae.pkl", num_heads=4, dec_num_heads=2, image_size=48)
    assert model.config.model_type == "mae"
    for name, tensor in mae_tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _fake_module(name, **classes):
    module = types.ModuleType(name)
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__ = name, cls_name
        setattr(module, cls_name, cls)
    return module


def test_2022_checkpoint_layout_flax05_frozendict_numpy1(tmp_path, m3ae_tiny, monkeypatch):
    """flax 0.5 kept params in FrozenDicts (`_dict` attribute) and numpy 1.x pickled arrays through
    `numpy.core.multiarray`; the optimiser's moment trees have the same structure as the params."""

    class FrozenDict:
        def __init__(self, d):
            self._dict = {k: FrozenDict(v) if isinstance(v, dict) else v for k, v in d.items()}
            self._hash = None

    class TrainState:
        pass

    class ScaleByAdamState:
        pass

    for name, module in {
        "flax.core.frozen_dict": _fake_module("flax.core.frozen_dict", FrozenDict=FrozenDict),
        "flax.training.train_state": _fake_module("flax.training.train_state", TrainState=TrainState),
        "optax._src.transform": _fake_module("optax._src.transform", ScaleByAdamState=ScaleByAdamState),
    }.items():
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a dotted name needs its parents
            parent = ".".join(parts[:i])
            monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent) or types.ModuleType(parent))
        monkeypatch.setitem(sys.modules, name, module)
    zeros = {k: np.zeros_like(v) for k, v in m3ae_tiny.flat.items()}
    adam = ScaleByAdamState()
    adam.count, adam.mu, adam.nu = np.int32(1), FrozenDict({"params": _nest(zeros)}), FrozenDict({"params": _nest(zeros)})
    state = TrainState()
    state.step, state.opt_state = 1, (adam,)
    state.params = FrozenDict({"params": _nest(m3ae_tiny.flat)})
    blob = pickle.dumps({"step": 0, "variant": {"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2}, "state": state}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in blob and b"flax.core.frozen_dict" in blob
    (tmp_path / "old.pkl").write_bytes(blob)
    monkeypatch.undo()  # the reader must not need those modules
    model = convert_official(tmp_path / "old.pkl", image_size=48, text_length=18)
    for name, tensor in m3ae_tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


class _Exploit:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_hostile_pickle_executes_nothing(tmp_path, m3ae_tiny):
    marker = tmp_path / "pwned"
    payload = {
        "state": {"params": {"params": _nest(m3ae_tiny.flat)}, "opt_state": None},
        "a": _Exploit(os.system, f"touch {marker}"),
        "b": _Exploit(eval, f"open({str(marker)!r}, 'w')"),
        "c": _Exploit(exec, f"open({str(marker)!r}, 'w')"),
    }
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload))
    flat, _ = load_official(tmp_path / "evil.pkl")
    assert not marker.exists()
    assert set(flat) == set(m3ae_tiny.flat)


def test_pickle_with_only_a_payload_is_refused_with_the_path(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Exploit(os.system, f"touch {marker}")))
    with pytest.raises(ConversionError, match="evil.pkl: no M3AE/MAE parameter tree"):
        load_official(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_unreadable_or_missing_files_name_the_path(tmp_path):
    (tmp_path / "broken.pkl").write_bytes(CKPT.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="broken.pkl"):
        load_official(tmp_path / "broken.pkl")
    with pytest.raises(FileNotFoundError, match="nothing.pkl"):
        load_official(tmp_path / "nothing.pkl")


def test_head_count_must_be_given_when_the_checkpoint_cannot_tell(tmp_path, m3ae_tiny):
    np.savez(tmp_path / "params.npz", **m3ae_tiny.flat)
    with pytest.raises(ConversionError, match="--num-heads"):
        convert_official(tmp_path / "params.npz")
