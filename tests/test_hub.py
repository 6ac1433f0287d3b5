"""Hub conventions without a network: local directories, the HF cache layout, push_to_hub, model cards."""

from __future__ import annotations

import shutil

import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.model.hub import model_card

CONFIG = dict(image_size=32, patch_size=8, text_length=8, vocab_size=50, emb_dim=32, depth=1, num_heads=2,
              dec_emb_dim=16, dec_depth=1, dec_num_heads=2)


class FolderHub:
    """Stands in for huggingface_hub.HfApi: 'uploads' into a local directory."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=False):
        target = self.root / repo_id if revision is None else self.root / revision / repo_id
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        self.calls.append(("upload_folder", repo_id, commit_message))
        return f"{target}"


def test_push_to_hub_then_from_pretrained_round_trip(tmp_path):
    model = M3AE(M3AEConfig(**CONFIG, norm_pix_loss=True))
    hub = FolderHub(tmp_path)
    model.push_to_hub("me/m3ae-test", api=hub, card_info={"data": "embedded synthetic", "steps": 100,
                                                          "probe": {"linear top-1": "71.0%"}})
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    uploaded = tmp_path / "me" / "m3ae-test"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert "norm_pix_loss" in card and "embedded synthetic" in card and "linear top-1 | 71.0%" in card
    loaded = M3AE.from_pretrained(uploaded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_repo_id_resolves_from_the_offline_hf_cache_by_revision(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # the cache layout huggingface_hub reads: models--owner--name/{refs/<name>, snapshots/<rev>/...}
    cache = tmp_path / "cache"
    repo = cache / "models--me--cached"
    (repo / "refs").mkdir(parents=True)
    for ref, commit, width in (("main", "abc123", 32), ("v2", "def456", 48)):
        M3AE(M3AEConfig(**{**CONFIG, "emb_dim": width})).save_pretrained(repo / "snapshots" / commit)
        (repo / "refs" / ref).write_text(commit)
    assert M3AE.from_pretrained("me/cached", cache_dir=cache).config.emb_dim == 32
    assert M3AE.from_pretrained("me/cached", revision="v2", cache_dir=cache, local_files_only=True).config.emb_dim == 48


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a Hub repo id"):
        M3AE.from_pretrained(tmp_path / "a" / "b" / "c")


def test_model_card_states_what_the_files_are():
    mae = M3AEConfig(**{**CONFIG, "model_type": "mae"})
    card = model_card(mae, {"encoder_only": True})
    assert "MAE (image only)" in card and "image encoder only" in card and "normalised pixels" in card
    assert "not recorded" in card  # no data or steps given: said so, not invented
    assert "| training length | not recorded |" in card  # once "not recorded steps"
    assert "| training length | 300 steps (2 epochs) |" in model_card(mae, {"steps": 300, "epochs": 2})


def test_push_to_hub_command_writes_the_run_config_and_probe_results_into_the_card(tmp_path, monkeypatch):
    import json

    import yaml

    huggingface_hub = pytest.importorskip("huggingface_hub")  # the hub extra: skipped without it

    from m3ae.cli import main

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000300"
    model = M3AE(M3AEConfig(**CONFIG))
    model.save_pretrained(step)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": CONFIG, "data": {"source": "shards/{0..9}.tar"},
                                                     "train": {"total_steps": 300}}))
    probe = tmp_path / "lp"
    probe.mkdir()
    (probe / "results.json").write_text(json.dumps({"last": {"epoch": 90, "top1": 61.234, "top5": 90.0},
                                                    "split": {"val": "classes [0.2 held out by key hash]"}}))
    hub = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    assert main(["push-to-hub", "--checkpoint", str(step), "--repo-id", "me/tiny", "--probe", str(probe), "--branch", "v1"]) == 0
    uploaded = tmp_path / "hub" / "v1" / "me" / "tiny"
    card = (uploaded / "README.md").read_text()
    assert "| training data | shards/{0..9}.tar |" in card and "| training length | 300 steps |" in card
    assert "linear probe top-1, lp (classes [0.2 held out by key hash]) | 61.23%" in card
    assert "total_steps: 300" in card  # the run's config, as YAML
    loaded = M3AE.from_pretrained(uploaded)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
