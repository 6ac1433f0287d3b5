"""`m3ae demo` end to end on a tiny dataset and model, and the logistic-regression probe it uses."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from m3ae.cli import main
from m3ae.data.synth import SynthSpec, caption_vocabulary, generate
from m3ae.eval.demo import METRICS
from m3ae.eval.logistic import fit_logistic
from m3ae.engine.metrics import read_metrics

TINY = dict(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2, image_size=32,
            patch_size=8, text_length=32, vocab_size=len(caption_vocabulary()))


def test_logistic_probe_reaches_the_regularised_optimum_and_matches_sklearn():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (300,), generator=generator)
    features = torch.randn(300, 5, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0]) + 100.0
    features[:, 0] += 2.0 * labels  # one informative direction, other columns on very different scales
    probe = fit_logistic(features, labels, l2=0.01)
    # stationarity of mean CE + l2/2 |W|^2 at the returned weights
    weight, bias = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    x = (features.double() - probe.mean) / probe.std
    loss = torch.nn.functional.cross_entropy(x @ weight + bias, labels) + 0.005 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-6 and bias.grad.abs().max() < 1e-6
    sklearn = pytest.importorskip("sklearn.linear_model")
    # sklearn minimises sum CE + |W|^2 / (2C) over standardised features: C = 1 / (l2 · N)
    reference = sklearn.LogisticRegression(C=1 / (0.01 * 300), tol=1e-10, max_iter=10_000).fit(x.numpy(), labels.numpy())
    torch.testing.assert_close(probe.weight.T, torch.from_numpy(reference.coef_), atol=1e-4, rtol=1e-4)
    assert probe.accuracy(features, labels) == pytest.approx(100 * reference.score(x.numpy(), labels.numpy()))
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(features, labels, l2=0.0)


@pytest.fixture
def recipe(tmp_path):
    data = generate(tmp_path / "data", SynthSpec(seed=0, train=48, val=16, image_size=32, shard_size=24), processes=1,
                    progress=False)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": TINY, "data": {"embedded_root": str(data), "tokenizer": "m3ae-embedded", "num_workers": 0},
        "train": {"precision": "fp32"}, "log": {"every": 1},
    }))
    return path


def test_demo_with_two_seeds_writes_every_row_and_resumes(recipe, tmp_path, capsys):
    run = tmp_path / "demo"
    argv = ["demo", "--steps", "3", "--batch-size", "8", "--seeds", "2", "--knn-k", "5", "--recipe", str(recipe),
            "--out-dir", str(run), "--progress", "false"]
    assert main(argv) == 0
    results = json.loads((run / "demo_results.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["m3ae", "mae", "random_init", "supervised"]
    for name, row in rows.items():
        assert [r["seed"] for r in row["seeds"]] == [0, 1]
        for metric in METRICS:
            values = [r[metric] for r in row["seeds"]]
            assert all(0.0 <= v <= 100.0 for v in values)
            assert row["mean"][metric] == pytest.approx(sum(values) / 2)
            assert row["std"][metric] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    # equal steps for the pretrained rows; the supervised ceiling trains about as many from the random init
    for name in ("m3ae", "mae"):
        assert read_metrics(run / name / "seed1" / "metrics.jsonl")[-1]["step"] == 3
    assert all(r["supervised_steps"] == 6 and 0 <= r["finetune_top1"] <= 100 for r in rows["supervised"]["seeds"])
    # seeds give different encoders
    assert rows["random_init"]["seeds"][0]["logreg_cls"] != rows["random_init"]["seeds"][1]["logreg_cls"] or \
        rows["random_init"]["seeds"][0]["knn_cls"] != rows["random_init"]["seeds"][1]["knn_cls"]
    grounding = rows["m3ae"]["seeds"][0]["grounding"]
    assert set(grounding) == {"all_words", "class_names"} and grounding["class_names"]["words"] > 0
    assert "grounding_gap_class_names" in rows["m3ae"]["mean"] and "grounding" not in rows["mae"]["seeds"][0]
    assert (run / "demo_results.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| m3ae |" in out and "M3AE − MAE, logistic CLS:" in out and "runs left, about" in out
    # a second call reads every finished seed back instead of training again
    stamp = (run / "m3ae" / "seed0" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (run / "m3ae" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    out = capsys.readouterr().out
    assert "8 runs read back" in out and "runs left" not in out  # no ETA from runs that took no time
    assert json.loads((run / "demo_results.json").read_text())["rows"]["m3ae"]["mean"] == rows["m3ae"]["mean"]


def test_demo_studies_change_one_setting_per_row(recipe, tmp_path, capsys):
    from m3ae.eval.demo import STUDIES

    assert [r.overrides for r in STUDIES["text-mask"]] == [{"model.text_mask_ratio": r} for r in (0.15, 0.5, 0.75, 0.9)]
    assert [r.overrides for r in STUDIES["paired-fraction"]] == [{"data.paired_fraction": f} for f in (0.1, 0.2, 0.3, 1.0)]
    run = tmp_path / "paired"
    assert main(["demo", "--study", "paired-fraction", "--steps", "2", "--batch-size", "8", "--seeds", "1", "--knn-k", "5", "--jobs", "1",
                 "--recipe", str(recipe), "--out-dir", str(run), "--progress", "false"]) == 0
    rows = json.loads((run / "demo_results.json").read_text())["rows"]
    assert list(rows) == ["paired_10pct", "paired_20pct", "paired_30pct", "paired_100pct"]
    assert all(set(METRICS) <= set(r["mean"]) for r in rows.values())
    fractions = [yaml.safe_load((run / name / "seed0" / "config.yaml").read_text())["data"]["paired_fraction"] for name in rows]
    assert fractions == [0.1, 0.2, 0.3, 1.0]
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds=0" in capsys.readouterr().err


def test_an_interrupted_pretraining_stops_the_demo_instead_of_being_scored(recipe, tmp_path, monkeypatch):
    from m3ae.eval import demo
    from m3ae.train import pretrain

    def interrupted(cfg, resume=None):
        return pretrain.RunResult(tmp_path, 1, True, {}, None, [])

    monkeypatch.setattr(pretrain, "run_pretraining", interrupted)
    cfg = demo.DemoConfig(steps=3, batch_size=8, seeds=1, recipe=str(recipe), jobs=1, progress=False)
    with pytest.raises(SystemExit, match="interrupted"):
        demo.run_row(cfg, demo.STUDIES["main"][0], 0, tmp_path / "m3ae" / "seed0", {})
    assert not (tmp_path / "m3ae" / "seed0" / "result.json").exists()
