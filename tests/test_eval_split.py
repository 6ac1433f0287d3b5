"""Honest evaluation: no score on the data a classifier was fitted on, a deterministic held-out
split on request, and one clear line for unlabelled data."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import image_bytes, write_folder, write_tar

from m3ae import M3AE, M3AEConfig
from m3ae.cli import main
from m3ae.data import DataConfig, build_eval_loader
from m3ae.data.splits import OverlappingSplitsError, check_eval_split, held_out
from m3ae.eval.knn import knn_predict

TINY = dict(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2, image_size=32,
            patch_size=8, text_length=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    torch.manual_seed(0)
    M3AE(M3AEConfig(**TINY)).save_pretrained(root / "model")
    write_folder(root / "classes", 24)  # class0..class2, no train/ or val/
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    write_tar(unlabelled / "s-0000.tar", [m for i in range(8) for m in
                                          ((f"{i:04d}.png", image_bytes(i)), (f"{i:04d}.txt", b"a caption"))])
    return root


def _keys(cfg: DataConfig, split: str) -> list[str]:
    return [k for batch in build_eval_loader(cfg, 8, split=split) for k in batch["key"]]


def test_a_source_without_splits_is_refused_for_knn(setup, capsys):
    args = ["knn", "--checkpoint", str(setup / "model"), "--data.source", str(setup / "classes"), "--batch-size", "8",
            "--precision", "fp32", "--device", "cpu"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]  # not what it chose
    assert len(err) == 1 and "reads 24 file(s) of the train split" in err[0] and "--val-fraction" in err[0]
    # naming the same data as the val split is no escape
    assert main([*args, "--val-data", str(setup / "classes")]) == 2
    with pytest.raises(OverlappingSplitsError):
        check_eval_split(DataConfig(source=str(setup / "classes"), image_size=32))


def test_val_fraction_holds_out_a_fixed_disjoint_part_by_key_hash(setup, capsys):
    cfg = DataConfig(source=str(setup / "classes"), image_size=32, eval_val_fraction=0.25)
    train, val = _keys(cfg, "train"), _keys(cfg, "val")
    assert not set(train) & set(val) and len(train) + len(val) == 24
    assert val == [k for k in sorted(train + val) if held_out(k, 0.25)]  # the rule, not the reading order
    assert (train, val) == (_keys(cfg, "train"), _keys(cfg, "val"))
    assert 0 < len(val) < 12
    split = check_eval_split(cfg)
    assert split.method == "key-hash" and split.val_fraction == 0.25
    assert main(["knn", "--checkpoint", str(setup / "model"), "--data.source", str(setup / "classes"), "--val-fraction",
                 "0.25", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--k", "3"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["split"] == split.to_dict()
    assert "evaluation split (key-hash)" in captured.err


def test_the_probe_stores_the_split_in_results_json(setup, tmp_path):
    run = tmp_path / "probe"
    assert main(["linear-probe", "--checkpoint", str(setup / "model"), "--data.source", str(setup / "classes"),
                 "--val-fraction", "0.25", "--cached", "true", "--epochs", "1", "--batch_size", "8",
                 "--log.progress", "false", "--precision", "fp32", "--out_dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["split"]["method"] == "key-hash" and results["split"]["val_fraction"] == 0.25
    assert results["train_samples"] == len(_keys(DataConfig(source=str(setup / "classes"), image_size=32,
                                                            eval_val_fraction=0.25), "train"))


def test_unlabelled_data_for_a_labelled_command_is_one_line(setup, capsys):
    assert main(["knn", "--checkpoint", str(setup / "model"), "--data.source", str(setup / "unlabelled"),
                 "--val-fraction", "0.5", "--batch-size", "8", "--precision", "fp32", "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "have no label" in errors[0] and "unlabelled" in errors[0]


def test_knn_rejects_negative_labels_instead_of_crashing_in_indexing():
    with pytest.raises(ValueError, match=r"training labels span \[-1, 1\]"):
        knn_predict(torch.randn(4, 8), torch.tensor([0, 1, -1, 1]), torch.randn(2, 8), 2, k=2)


def class_folders(root, classes: dict[str, int]):
    """root/<class>/<i>.png for each class and its image count; every image distinct."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(image_bytes(100 * c + i))
    return root


def _labels(cfg: DataConfig, split: str) -> dict[str, int]:
    return {k: int(label) for batch in build_eval_loader(cfg, 8, split=split)
            for k, label in zip(batch["key"], batch["label"])}


def test_val_is_labelled_with_the_train_class_map_when_a_class_is_missing(tmp_path, caplog):
    # val lacks "bird": alone it would number "cat" 0 and "dog" 1, against train's 1 and 2
    class_folders(tmp_path / "train", {"bird": 2, "cat": 2, "dog": 2})
    class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    cfg = DataConfig(source=str(tmp_path), image_size=32)
    with caplog.at_level("WARNING", logger="m3ae.data"):
        val = _labels(cfg, "val")
    assert val == {"cat/0": 1, "dog/0": 2}
    assert _labels(cfg, "train") == {"bird/0": 0, "bird/1": 0, "cat/0": 1, "cat/1": 1, "dog/0": 2, "dog/1": 2}
    assert "has no folder for 1 of the 3 train class(es) (bird)" in caplog.text
    split = check_eval_split(cfg)
    assert split.classes == ["bird", "cat", "dog"] and split.to_dict()["classes"] == ["bird", "cat", "dog"]


def test_a_val_class_unseen_in_training_is_an_error_naming_it(tmp_path, capsys):
    class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    class_folders(tmp_path / "val", {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(ValueError, match=r"class folder\(s\) 'emu' do not occur in the train split"):
        check_eval_split(DataConfig(source=str(tmp_path), image_size=32))
    model = tmp_path / "model"
    M3AE(M3AEConfig(**TINY)).save_pretrained(model)
    assert main(["knn", "--checkpoint", str(model), "--data.source", str(tmp_path), "--batch-size", "8",
                 "--precision", "fp32", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1 and "'emu' do not occur in the train split" in err[0]


def test_knn_scores_a_val_split_lacking_a_class_correctly(tmp_path, capsys):
    # the report's case: val lacking one class scored 50.0 where the truth was 100; here the val
    # images are copies of train images, so each one's nearest neighbour is its own class
    class_folders(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    (tmp_path / "val").mkdir()
    for name in ("b", "c"):
        (tmp_path / "val" / name).mkdir()
        (tmp_path / "val" / name / "copy.png").write_bytes((tmp_path / "train" / name / "0.png").read_bytes())
    model = tmp_path / "model"
    torch.manual_seed(0)
    M3AE(M3AEConfig(**TINY)).save_pretrained(model)
    assert main(["knn", "--checkpoint", str(model), "--data.source", str(tmp_path), "--batch-size", "8",
                 "--precision", "fp32", "--device", "cpu", "--k", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == 100.0 and result["split"]["classes"] == ["a", "b", "c"]
