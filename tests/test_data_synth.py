import functools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from data_helpers import cli

from m3ae.data import DataConfig, build_eval_loader, build_pretrain_loader
from m3ae.data import synth
from m3ae.data.factory import label_names, open_source
from m3ae.data.synth import (COLORS, FORMAT_VERSION, SHAPES, SynthSpec, caption_vocabulary, ensure_embedded_dataset,
                             format_version, generate, render_scene)
from m3ae.data.tokenizer import Tokenizer

SMALL = dict(train=60, val=20, image_size=32, shard_size=25)


def tar_bytes(root):
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def test_generation_is_deterministic_idempotent_and_checked(tmp_path):
    first = ensure_embedded_dataset(tmp_path / "a", seed=5, **SMALL)
    second = ensure_embedded_dataset(tmp_path / "b", seed=5, **SMALL)
    assert sorted(tar_bytes(first)) == ["train-0000.tar", "train-0001.tar", "train-0002.tar",
                                        "val-0000.tar"]
    assert tar_bytes(first) == tar_bytes(second)
    serial = generate(tmp_path / "serial", SynthSpec(seed=5, **SMALL), processes=1)
    assert tar_bytes(serial) == tar_bytes(first)
    assert tar_bytes(ensure_embedded_dataset(tmp_path / "c", seed=6, **SMALL)) != tar_bytes(first)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert ensure_embedded_dataset(first, seed=5, **SMALL) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different dataset"):
        ensure_embedded_dataset(first, seed=1, **SMALL)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert label_names("embedded", embedded_root=str(first)) == list(COLORS)  # the labels' names, from the manifest


def test_captions_name_the_label_once_among_nuisance_words():
    tokenizer = Tokenizer.from_name("m3ae-embedded")
    # the shipped vocabulary is the generator's, and every class name is one token of it
    assert tokenizer.vocab_size == len(caption_vocabulary())
    assert [tokenizer.backend.id_to_token(i) for i in range(tokenizer.vocab_size)] == caption_vocabulary()
    templates = set()
    for index in range(300):
        image, caption, attributes = render_scene(0, "train", index)
        assert image.size == (32, 32)
        words = caption.replace(",", " ").replace(";", " ").split()
        label_word = list(COLORS)[attributes["label"]]
        assert attributes["color"] == label_word and words.count(label_word) == 1
        assert attributes["shape"] in words and attributes["background_color"] != label_word
        distractor_colors = [d.split()[0] for d in attributes["distractors"]]
        assert label_word not in distractor_colors
        assert all(c in words for c in distractor_colors)  # other colour words appear as clutter
        templates.add(" ".join(w for w in words[:3] if w not in SHAPES and w not in COLORS))
        ids = tokenizer.encode([caption])[0]
        assert tokenizer.unk_id not in ids and len(ids) <= 32  # within the demo recipe's text_length
        assert ids.count(tokenizer.encode([label_word])[0][0]) == 1
    assert len(templates) >= 10  # varied sentences, not one slot pattern
    labels = {render_scene(0, "train", i)[2]["label"] for i in range(200)}
    assert labels == set(range(len(COLORS)))


def test_old_format_directory_is_rebuilt_and_interrupted_generation_leaves_nothing(tmp_path, monkeypatch, capsys):
    root = ensure_embedded_dataset(tmp_path / "emb", seed=2, **SMALL)
    current = tar_bytes(root)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    (root / "train-0000.tar").write_bytes(b"old")
    capsys.readouterr()
    assert ensure_embedded_dataset(root, seed=2, **SMALL) == root
    assert "replacing format" in capsys.readouterr().err
    assert tar_bytes(root) == current and format_version(root) == FORMAT_VERSION
    # the loaders' path (open_source) regenerates an old directory too
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    monkeypatch.setattr(synth, "ensure_embedded_dataset", functools.partial(ensure_embedded_dataset, seed=2, **SMALL))
    open_source("embedded", role="labelled", split="val", embedded_root=str(root))
    assert format_version(root) == FORMAT_VERSION

    def interrupted(out, spec, progress=True):
        out.mkdir(parents=True)
        (out / "train-0000.tar").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_dataset(tmp_path / "never", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]


def test_sigterm_during_generation_removes_the_temporary_directory(tmp_path):
    script = (f"from m3ae.data.synth import ensure_embedded_dataset\n"
              f"ensure_embedded_dataset({str(tmp_path / 'emb')!r}, train=100000, val=10, shard_size=500)")
    env = {**os.environ, "PYTHONPATH": str(Path(synth.__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".emb-*/data/train-*.tar")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert b"generating the embedded dataset" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_synth_shards_read_back_through_both_loaders(tmp_path, capsys):
    cli(["data", "synth", "--out-dir", str(tmp_path / "emb"), "--train", "60", "--val", "20", "--image-size", "32",
         "--shard-size", "25"])
    assert json.loads(capsys.readouterr().out)["classes"] == list(COLORS)
    with tarfile.open(tmp_path / "emb" / "train-0000.tar") as tar:
        names = tar.getnames()[:4]
        meta = json.loads(tar.extractfile(names[2]).read())
        label = int(tar.extractfile(names[3]).read())
    assert [n.split(".")[1] for n in names] == ["jpg", "txt", "json", "cls"]
    assert meta["label"] == label and meta["color"] == list(COLORS)[label]

    cfg = DataConfig(source="embedded", embedded_root=str(tmp_path / "emb"), image_size=32, text_length=32)
    keys = [k for batch in build_pretrain_loader(cfg, batch_size=16, epochs=1) for k in batch["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(60)]
    val = list(build_eval_loader(cfg, batch_size=16, split="val"))
    assert sum(len(b["key"]) for b in val) == 20 and all(b["image"].shape[1:] == (3, 32, 32) for b in val)
    assert all(k.startswith("1") for b in val for k in b["key"])  # held-out keys are disjoint
