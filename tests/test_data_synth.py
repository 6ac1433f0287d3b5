import json
import tarfile

import pytest
from data_helpers import cli

from m3ae.data import DataConfig, build_eval_loader, build_pretrain_loader
from m3ae.data.sources import label_names
from m3ae.data.synth import SHAPES, SynthSpec, ensure_embedded_dataset, generate, render_scene

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
    assert label_names("embedded", embedded_root=str(first)) == list(SHAPES)  # the labels' names, from the manifest


def test_captions_describe_the_scene_and_labels_match():
    for index in range(40):
        image, caption, attributes = render_scene(0, "train", index, 64)
        assert image.size == (64, 64)
        assert SHAPES[attributes["label"]] in caption.split() and attributes["color"] in caption.split()
        distractor_shapes = {d.split()[1] for d in attributes["distractors"]}
        assert SHAPES[attributes["label"]] not in distractor_shapes
    labels = {render_scene(0, "train", i)[2]["label"] for i in range(200)}
    assert labels == set(range(len(SHAPES)))


def test_cli_synth_shards_read_back_through_both_loaders(tmp_path, capsys):
    cli(["data", "synth", "--out-dir", str(tmp_path / "emb"), "--train", "60", "--val", "20", "--image-size", "32",
         "--shard-size", "25"])
    assert json.loads(capsys.readouterr().out)["classes"] == list(SHAPES)
    with tarfile.open(tmp_path / "emb" / "train-0000.tar") as tar:
        names = tar.getnames()[:4]
        meta = json.loads(tar.extractfile(names[2]).read())
        label = int(tar.extractfile(names[3]).read())
    assert [n.split(".")[1] for n in names] == ["jpg", "txt", "json", "cls"]
    assert meta["label"] == label and meta["shape"] == SHAPES[label]

    cfg = DataConfig(source="embedded", embedded_root=str(tmp_path / "emb"), image_size=32, text_length=32)
    keys = [k for batch in build_pretrain_loader(cfg, batch_size=16, epochs=1) for k in batch["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(60)]
    val = list(build_eval_loader(cfg, batch_size=16, split="val"))
    assert sum(len(b["key"]) for b in val) == 20 and all(b["image"].shape[1:] == (3, 32, 32) for b in val)
    assert all(k.startswith("1") for b in val for k in b["key"])  # held-out keys are disjoint
