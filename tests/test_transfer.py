"""Transfer evaluation: features, the linear probe and fine-tuning runs, kNN / OOD / embed commands."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from m3ae import M3AE
from m3ae.cli import main
from m3ae.data import DataConfig, build_eval_loader
from m3ae.data.synth import render_scene
from m3ae.eval.features import FeatureSpec, extract_features, load_features, pool_encoding, save_features
from m3ae.eval.probe import FinetuneConfig, TransferTrainer, run_transfer
from m3ae.model.classifier import M3AEClassifier
from m3ae.engine.metrics import read_metrics

def _data(data, **kw) -> DataConfig:
    return DataConfig(**{"source": f"{data}/train-*.tar", "eval_train_source": f"{data}/train-*.tar",
                         "eval_val_source": f"{data}/val-*.tar", "image_size": 32, "text_length": 16, "num_workers": 0,
                         **kw})


def test_features_have_the_right_shapes_and_are_deterministic(setup):
    root, data = setup
    model = M3AE.from_pretrained(root / "model")
    first, second = (extract_features(model, build_eval_loader(_data(data), 16, split="val"), FeatureSpec("image", "cls"),
                                      torch.device("cpu")) for _ in range(2))
    assert first["features"].shape == (16, 32) and first["labels"].shape == (16,) and len(first["keys"]) == 16
    assert torch.equal(first["features"], second["features"]) and first["keys"] == second["keys"]
    image = next(iter(build_eval_loader(_data(data), 16, split="val")))["image"]
    with torch.no_grad():
        expected = model.eval().encode(image).cls
    torch.testing.assert_close(first["features"][: image.shape[0]], expected)


def test_mean_pool_skips_padding_and_layers_read_the_blocks(setup):
    model = M3AE.from_pretrained(setup[0] / "model").eval()
    torch.manual_seed(0)
    image, text = torch.randn(2, 3, 32, 32), torch.randint(1000, 2000, (2, 16))
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad():
        encoding = model.encode(image, text, padding, output_hidden_states=True)
    pooled = pool_encoding(encoding, FeatureSpec("pair", "mean"), padding)
    real = torch.cat([encoding.last_hidden_state[0, 1:17], encoding.last_hidden_state[0, 17:22]])
    torch.testing.assert_close(pooled[0], real.mean(0))
    torch.testing.assert_close(pooled[1], encoding.last_hidden_state[1, 1:].mean(0))
    layer1 = pool_encoding(encoding, FeatureSpec("pair", "cls", layer=1), padding)
    torch.testing.assert_close(layer1, encoding.hidden_states[0][:, 0])
    with pytest.raises(ValueError, match="layer=3"):
        pool_encoding(encoding, FeatureSpec("pair", "cls", layer=3), padding)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_feature_files_round_trip(tmp_path, suffix):
    data = {"features": torch.randn(5, 4), "labels": torch.arange(5), "keys": [f"k{i}" for i in range(5)]}
    back = load_features(save_features(data, tmp_path / f"f{suffix}"))
    assert torch.equal(back["features"], data["features"]) and torch.equal(back["labels"], data["labels"])
    assert back["keys"] == data["keys"]
    with pytest.raises(ValueError, match="f.txt"):
        save_features(data, tmp_path / "f.txt")


def _separable(n: int, generator: torch.Generator) -> dict:
    """Four classes on four far-apart directions plus noise (what a good encoder gives)."""
    labels = torch.arange(n) % 4
    centres = torch.eye(32)[:4] * 6.0 + 3.0  # large offset: BatchNorm must remove it
    features = centres[labels] + torch.randn(n, 32, generator=generator)
    return {"features": features, "labels": labels, "keys": [str(i) for i in range(n)]}


def test_cached_probe_on_separable_features_reaches_100_percent_and_resumes_exactly(setup, tmp_path):
    root, data = setup
    generator = torch.Generator().manual_seed(0)
    run = tmp_path / "probe"
    for split, n in (("train", 256), ("val", 128)):
        save_features(_separable(n, generator), run / f"features_{split}.safetensors")
    args = ["linear-probe", "--checkpoint", str(root / "model"), "--cached", "true", "--epochs", "3",
            "--batch_size", "32", "--optimizer", "sgd", "--lr", "0.5", "--warmup_epochs", "1", "--out_dir", str(run), "--log.progress", "false",
            "--data.source", f"{data}/train-*.tar", "--val-data", f"{data}/val-*.tar"]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["last"]["top1"] == pytest.approx(100.0) and results["num_classes"] == 4
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    final = load_file(run / "checkpoints" / "step_00000003" / "model.safetensors")
    assert not any(k.startswith("head_norm.") and "weight" in k for k in final)  # BatchNorm without affine
    # Resume: drop the last epoch's checkpoint and continue; the head must come out identical.
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    assert main([*args, "--resume", "auto"]) == 0
    resumed = load_file(run / "checkpoints" / "step_00000003" / "model.safetensors")
    assert resumed.keys() == final.keys()
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_streaming_probe_and_finetune_commands_run_end_to_end(setup, tmp_path, capsys):
    root, data = setup
    common = ["--checkpoint", str(root / "model"), "--data.source", f"{data}/train-*.tar", "--data.eval_train_source",
              f"{data}/train-*.tar", "--data.eval_val_source", f"{data}/val-*.tar", "--data.num_workers", "0",
              "--epochs", "1", "--batch_size", "16", "--log.progress", "false", "--precision", "fp32"]
    assert main(["linear-probe", *common, "--out_dir", str(tmp_path / "lp")]) == 0
    assert main(["finetune", *common, "--out_dir", str(tmp_path / "ft"), "--image_size", "48"]) == 0
    out = capsys.readouterr().out
    assert out.count("epoch 1: top-1") == 2
    classes = 1 + max(render_scene(0, "train", i, 32)[2]["label"] for i in range(48))  # inferred from the labels
    for run, image_size in (("lp", 32), ("ft", 48)):
        results = json.loads((tmp_path / run / "results.json").read_text())
        assert results["train_samples"] == 48 and results["num_classes"] == classes
        # the reported top-1 is the saved classifier's accuracy on the 16 val samples, recomputed here
        step = tmp_path / run / "checkpoints" / "step_00000001"
        classifier = M3AEClassifier.from_pretrained(step, classes, probe=run == "lp")
        classifier.load_state_dict(load_file(step / "model.safetensors"))
        val = next(iter(build_eval_loader(_data(data, image_size=image_size), 16, split="val")))
        with torch.no_grad():
            right = (classifier.eval()(val["image"]).argmax(1) == val["label"]).sum().item()
        assert results["last"]["top1"] == pytest.approx(100 * right / 16)
    assert json.loads((tmp_path / "ft" / "checkpoints" / "step_00000001" / "config.json").read_text())[
        "backbone"]["image_size"] == 48  # fine-tuned at another size: the sin-cos grid was recomputed
    assert main(["linear-probe", "--epochs", "1"]) == 2  # no checkpoint: a config error naming the field
    assert "checkpoint: required" in capsys.readouterr().err


def test_finetune_optimizer_uses_layer_decay_and_the_scheduler_applies_it(setup, tmp_path):
    root, data = setup
    cfg = FinetuneConfig(checkpoint=str(root / "model"), data=_data(data), epochs=2, batch_size=16,
                         warmup_epochs=0, layer_decay=0.5, out_dir=str(tmp_path / "ft"), precision="fp32")
    trainer = TransferTrainer(cfg)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    depth = trainer.model.config.depth
    assert scale_of["backbone.image_embedding.weight"] == 0.5 ** (depth + 1)  # patch embedding: lowest group
    assert scale_of["backbone.encoder.blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert scale_of["head.weight"] == 1.0
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(trainer.peak_lr * group["lr_scale"])
        if any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0
    assert trainer.model.backbone.config.drop_path == cfg.drop_path


def test_knn_ood_and_embed_commands(setup, tmp_path, capsys):
    root, data = setup
    split = ["--data.source", f"{data}/train-*.tar", "--train-data", f"{data}/train-*.tar",
             "--val-data", f"{data}/val-*.tar", "--precision", "fp32"]
    assert main(["knn", "--checkpoint", str(root / "model"), *split, "--k", "5"]) == 0
    knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert knn["k"] == 5 and knn["top1"] <= knn["top5"]  # exact values: the constructed set below
    # The same set as in- and out-distribution cannot be told apart: AUROC one half.
    assert main(["ood", "--checkpoint", str(root / "model"), *split, "--out-data", f"{data}/val-*.tar"]) == 0
    ood = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ood["mahalanobis_auroc"] == pytest.approx(0.5) and ood["max_softmax_auroc"] == pytest.approx(0.5)
    out = tmp_path / "pairs.npz"
    assert main(["embed", "--checkpoint", str(root / "model"), "--data.source", f"{data}/val-*.tar", "--modality", "pair",
                 "--pool", "mean", "--layer", "1", "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["features"].shape == (16, 32) and f["labels"].shape == (16,) and f["keys"].shape == (16,)


def _colour_folders(root: Path, split: str, colours: dict[str, list[tuple[int, int, int]]]) -> str:
    """root/split/<class>/<i>.png, one flat-colour image per listed colour."""
    from PIL import Image

    for label, pictures in colours.items():
        (root / split / label).mkdir(parents=True)
        for i, rgb in enumerate(pictures):
            Image.new("RGB", (32, 32), rgb).save(root / split / label / f"{i}.png")
    return str(root / split)


def test_knn_command_gives_the_exact_top1_of_a_constructed_set(setup, tmp_path, capsys):
    """Flat-colour images: a val image identical to six train images of its class has cosine 1 to
    them, every other image less, so it is right; a val image painted in another class's colour is
    wrong. Three of four right: exactly 75 %, and top-2 of three classes finds the fourth."""
    root, _ = setup
    red, green, blue = (220, 30, 30), (30, 200, 30), (30, 30, 220)
    train = _colour_folders(tmp_path, "train", {"a": [red] * 6, "b": [green] * 6, "c": [blue] * 6})
    val = _colour_folders(tmp_path, "val", {"a": [red, green], "b": [green], "c": [blue]})
    assert main(["knn", "--checkpoint", str(root / "model"), "--data.source", train, "--train-data", train,
                 "--val-data", val, "--k", "6", "--precision", "fp32"]) == 0
    knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert knn["top1"] == 75.0 and knn["top5"] == 100.0


@pytest.mark.parametrize("command", ["knn", "ood", "embed", "linear-probe"])
def test_a_data_image_size_that_disagrees_with_the_model_is_one_error_in_every_command(setup, tmp_path, capsys,
                                                                                        command):
    root, data = setup
    extra = {"ood": ["--out-data", f"{data}/val-*.tar"], "embed": ["--out", str(tmp_path / "f.npz")],
             "linear-probe": ["--out-dir", str(tmp_path / "lp")]}.get(command, [])
    assert main([command, "--checkpoint", str(root / "model"), "--data.source", f"{data}/train-*.tar", "--val-data",
                 f"{data}/val-*.tar", "--data.image-size", "64", *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "data.image_size=64 disagrees with" in errors[0] and "image_size=32" in errors[0]


def test_softmax_head_for_ood_is_confident_on_its_classes_and_not_between_them():
    from m3ae.eval.ood import auroc, fit_softmax_head, max_softmax_score

    generator = torch.Generator().manual_seed(0)
    train = _separable(200, generator)
    head = fit_softmax_head(train["features"], train["labels"])
    assert (head(train["features"]).argmax(1) == train["labels"]).float().mean() == 1.0
    inside = _separable(50, generator)["features"]
    # halfway between two class centres: no class is more likely than the other
    between = (torch.eye(32)[0] + torch.eye(32)[1]) * 3.0 + 3.0 + 0.1 * torch.randn(50, 32, generator=generator)
    assert auroc(max_softmax_score(head(inside)), max_softmax_score(head(between))) > 0.95


@pytest.mark.parametrize("batch", [8, 256])
def test_the_default_probe_recipe_learns_at_small_and_large_batches(setup, tmp_path, batch):
    root, data = setup
    generator = torch.Generator().manual_seed(1)
    losses = {}
    for recipe in ("auto", "mae"):
        run = tmp_path / recipe
        for split, n in (("train", 512), ("val", 128)):
            save_features(_separable(n, generator), run / f"features_{split}.safetensors")
        assert main(["linear-probe", "--checkpoint", str(root / "model"), "--cached", "true", "--epochs", "10",
                     "--batch_size", str(batch), "--recipe", recipe, "--out_dir", str(run), "--log.progress", "false",
                     "--data.source", f"{data}/train-*.tar", "--val-data", f"{data}/val-*.tar"]) == 0
        results = json.loads((run / "results.json").read_text())
        losses[results["optimizer"]["recipe"]] = read_metrics(run / "metrics.jsonl")[-1]["train_loss"]
        if recipe == "auto":
            assert results["optimizer"]["name"] == "sgd" and results["last"]["top1"] >= 98.0
    # MAE's LARS protocol, meant for a 16,384 batch, leaves the loss near ln 4 at these batches
    assert losses["sgd"] < 0.3 and losses["mae"] > 0.9 * math.log(4)


def test_transfer_checkpoints_load_with_from_pretrained_as_their_encoder(setup, tmp_path):
    root, data = setup
    cfg = FinetuneConfig(checkpoint=str(root / "model"), data=_data(data), epochs=1, batch_size=16, mixup=0.0,
                         cutmix=0.0, out_dir=str(tmp_path / "ft"), precision="fp32")
    cfg.log.progress = False
    result = run_transfer(cfg)
    step_dir = tmp_path / "ft" / "checkpoints" / "step_00000001"
    saved = load_file(step_dir / "model.safetensors")
    for name in (step_dir, tmp_path / "ft"):  # the step directory, and the run directory resolved to it
        encoder = M3AE.from_pretrained(name)
        weights = encoder.state_dict()
        assert weights.keys() == {k.removeprefix("backbone.") for k in saved if k.startswith("backbone.")}
        assert all(torch.equal(weights[k], saved[f"backbone.{k}"]) for k in weights)
    pretrained = M3AE.from_pretrained(root / "model").state_dict()
    assert not torch.equal(weights["image_embedding.weight"], pretrained["image_embedding.weight"])  # fine-tuned
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert encoder.eval().encode(image).cls.shape == (2, 32)
    assert result.epoch == 1
    with pytest.raises(ValueError, match="text"):
        encoder.encode(image, torch.randint(1000, 2000, (2, 16)))


def test_transfer_runs_take_the_run_directory_lock(setup, tmp_path, capsys):
    root, data = setup
    run = tmp_path / "lp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom m3ae.engine.run_dir import run_dir_lock\n"
         f"with run_dir_lock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        args = ["linear-probe", "--checkpoint", str(root / "model"), "--data.source", f"{data}/train-*.tar",
                "--data.eval_train_source", f"{data}/train-*.tar", "--data.eval_val_source", f"{data}/val-*.tar",
                "--data.num_workers", "0", "--epochs", "1", "--batch_size", "16", "--log.progress", "false",
                "--precision", "fp32", "--out_dir", str(run)]
        assert main(args) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{run} is in use by another run (pid {holder.pid}" in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("command", ["linear-probe", "finetune"])
def test_probe_and_finetune_train_through_the_engine_step(setup, tmp_path, monkeypatch, command):
    from m3ae.engine.step import TrainStep

    calls = []
    real = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    root, data = setup
    cls = FinetuneConfig if command == "finetune" else __import__("m3ae.eval.probe", fromlist=["x"]).LinearProbeConfig
    cfg = cls(checkpoint=str(root / "model"), data=_data(data), epochs=1, batch_size=16, precision="fp32",
              out_dir=str(tmp_path / command))
    run_transfer(cfg)
    assert len(calls) == math.ceil(48 / 16)  # one engine step per batch of the epoch


def test_fp16_finetuning_scales_the_loss_and_skips_an_overflowing_step(setup, tmp_path):
    root, data = setup
    cfg = FinetuneConfig(checkpoint=str(root / "model"), data=_data(data), epochs=1, batch_size=16, precision="fp16",
                         warmup_epochs=0, mixup=0.0, cutmix=0.0, out_dir=str(tmp_path / "ft"))
    trainer = TransferTrainer(cfg)
    try:
        step = trainer.train_step
        assert step.scaler is not None
        scale = step.scaler.get_scale()
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        images, labels = next(iter(trainer._train_batches(0)))
        huge = images * 6e4  # fp16 overflows in the first matmul: inf activations, inf gradients
        stats = step(iter(((huge, labels),)), trainer.losses)
        assert stats["skipped"].item() == 1.0 and step.nonfinite_total.item() == 1.0
        assert step.scaler.get_scale() < scale  # the scale was lowered
        after = trainer.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the update was skipped
        stats = step(iter(((images, labels),)), trainer.losses)
        assert stats["skipped"].item() == 0.0
        assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    finally:
        trainer.close()


def test_a_run_too_short_to_train_says_so_in_one_line_and_the_headline_is_the_last_epoch(setup, tmp_path, capsys):
    root, data = setup
    args = ["finetune", "--checkpoint", str(root / "model"), "--data.source", f"{data}/train-*.tar",
            "--data.eval_train_source", f"{data}/train-*.tar", "--data.eval_val_source", f"{data}/val-*.tar",
            "--data.num_workers", "0", "--epochs", "2", "--batch-size", "1024", "--log.progress", "false",
            "--precision", "fp32", "--out-dir", str(tmp_path / "ft")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: 48 training samples at batch_size 1024 make 1 step(s) per epoch, 2 in all (2 of "
                       "warm-up): too few to train; lower --batch-size or raise --epochs"]
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    headline = next(line for line in out.splitlines() if line.startswith("epoch "))
    assert headline == f"epoch 2: top-1 {results['last']['top1']:.2f}%  top-5 {results['last']['top5']:.2f}%"
    assert "chosen on that split, optimistic" in out


def test_knn_names_the_split_whose_labels_are_missing(setup, tmp_path, capsys):
    from PIL import Image

    root, data = setup
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for i in range(4):  # a flat folder: images without class folders, so without labels
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(flat / f"{i}.png")
    assert main(["knn", "--checkpoint", str(root / "model"), "--data.source", f"{data}/val-*.tar", "--train-data",
                 str(flat), "--val-data", f"{data}/val-*.tar", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert f"data source {str(flat)!r} (--train-data): 4 of 4 samples have no label" in err


def test_embed_reads_a_whole_unlabelled_folder_by_default_and_says_so(setup, tmp_path, capsys):
    """Issue 18 (why 8): `m3ae embed` on a folder of images refused it (the default split was the
    scoring side, which repeated the train side); embedding is not scoring: every image is embedded."""
    from PIL import Image

    root, _ = setup
    (tmp_path / "flat").mkdir()
    for i in range(7):
        Image.new("RGB", (40, 30), (30 * i, 10, 200)).save(tmp_path / "flat" / f"{i}.png")
    out = tmp_path / "f.npz"
    assert main(["embed", "--checkpoint", str(root / "model"), "--data.source", str(tmp_path / "flat"),
                 "--out", str(out), "--precision", "fp32"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("7 image features of dimension 32, every sample of ") and "(--split all)" in line
    with np.load(out, allow_pickle=False) as f:
        assert f["features"].shape == (7, 32) and len(set(f["keys"].tolist())) == 7
    # a root of train/ and val/: both, the val folders numbered as the train ones
    red, blue = (220, 30, 30), (30, 30, 220)
    _colour_folders(tmp_path / "split", "train", {"a": [red] * 3, "b": [blue] * 2})
    _colour_folders(tmp_path / "split", "val", {"b": [blue]})
    assert main(["embed", "--checkpoint", str(root / "model"), "--data.source", str(tmp_path / "split"),
                 "--out", str(out), "--precision", "fp32"]) == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["labels"].tolist() == [0, 0, 0, 1, 1, 1]
        assert f["keys"].tolist() == ["train/a/0", "train/a/1", "train/a/2", "train/b/0", "train/b/1", "val/b/0"]
    # asking for the scoring side of a source without one is still the one-line refusal
    assert main(["embed", "--checkpoint", str(root / "model"), "--data.source", str(tmp_path / "flat"),
                 "--out", str(out), "--split", "val", "--precision", "fp32"]) == 2
    assert "--val-fraction" in capsys.readouterr().err


def test_the_probe_is_cached_by_default_exactly_when_it_does_not_augment(capsys):
    """Issue 18 item 6: caching gives the same protocol as the uncached probe only without
    augmentation; there it is the default, with augmentation (MAE's protocol, the default) it cannot be."""
    import yaml

    def resolved(*flags):
        assert main(["linear-probe", "--checkpoint", "m", *flags, "--print-config"]) == 0
        cfg = yaml.safe_load(capsys.readouterr().out)
        return cfg["augment"], cfg["cached"]

    assert resolved() == (True, False)
    assert resolved("--augment", "false") == (False, True)
    assert resolved("--cached", "true") == (False, True)
    assert resolved("--augment", "false", "--cached", "false") == (False, False)
    assert main(["linear-probe", "--checkpoint", "m", "--augment", "true", "--cached", "true"]) == 2
    assert "cached=true with augment=true" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", "m", "--augment", "false", "--print-config"]) == 0
    assert "cached: false" in capsys.readouterr().out  # fine-tuning trains the encoder: never cached


def test_an_uncached_probe_without_augmentation_reads_the_evaluation_transform(setup, tmp_path, monkeypatch):
    from m3ae.eval import probe

    seen = []
    real = probe.TransferTrainer._loader

    def spy(self, split, augment, epoch):
        seen.append((split, augment))
        return real(self, split, augment, epoch)

    monkeypatch.setattr(probe.TransferTrainer, "_loader", spy)
    root, data = setup
    assert main(["linear-probe", "--checkpoint", str(root / "model"), "--data.source", f"{data}/train-*.tar",
                 "--val-data", f"{data}/val-*.tar", "--augment", "false", "--cached", "false", "--epochs", "1",
                 "--batch-size", "16", "--precision", "fp32", "--out-dir", str(tmp_path / "lp")]) == 0
    assert ("train", False) in seen and ("train", True) not in seen
