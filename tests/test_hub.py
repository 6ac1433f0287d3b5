"""Hub conventions without a network: local directories, the HF cache layout, push_to_hub, model cards."""

from __future__ import annotations

import shutil

import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.interop.hub import model_card

CONFIG = dict(image_size=32, patch_size=8, text_length=8, vocab_size=50, emb_dim=32, depth=1, num_heads=2,
              dec_emb_dim=16, dec_depth=1, dec_num_heads=2)


class FolderHub:
    """Stands in for huggingface_hub.HfApi: 'uploads' into a local directory."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        self.calls.append(("upload_folder", repo_id, commit_message))
        return f"{self.root / repo_id}"


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


def test_repo_id_resolves_from_the_offline_hf_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # the cache layout huggingface_hub reads: models--owner--name/{refs/main, snapshots/<rev>/...}
    cache = tmp_path / "cache"
    snapshot = cache / "models--me--cached" / "snapshots" / "abc123"
    M3AE(M3AEConfig(**CONFIG)).save_pretrained(snapshot)
    (cache / "models--me--cached" / "refs").mkdir(parents=True)
    (cache / "models--me--cached" / "refs" / "main").write_text("abc123")
    from huggingface_hub import snapshot_download

    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, **kw: snapshot_download(repo_id, cache_dir=cache, **kw))
    model = M3AE.from_pretrained("me/cached")
    assert model.config.emb_dim == 32


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a Hub repo id"):
        M3AE.from_pretrained(tmp_path / "a" / "b" / "c")


def test_model_card_states_what_the_files_are():
    mae = M3AEConfig(**{**CONFIG, "model_type": "mae"})
    card = model_card(mae, {"encoder_only": True})
    assert "MAE (image only)" in card and "image encoder only" in card and "normalised pixels" in card
    assert "not recorded" in card  # no data or steps given: said so, not invented
