"""The engine owns the one training step: no task back-propagates on its own, and pretraining, the
linear probe, fine-tuning, bench and the demo's supervised row all run `engine.step.TrainStep`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from m3ae.engine.step import StatsWindow, StepStats, TrainStep

SRC = Path(__file__).resolve().parents[1] / "src" / "m3ae"


def test_only_the_engine_step_calls_backward():
    callers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"\.backward\(", p.read_text()))
    assert callers == ["engine/step.py"]


@pytest.fixture
def counted_steps(monkeypatch):
    calls = []
    real = TrainStep.__call__

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", counting)
    return calls


def test_bench_times_the_pretraining_step(counted_steps):
    from m3ae.train.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(preset="tiny", batch_size=2, image_size=32, text_length=8, vocab_size=100,
                                   steps=2, warmup=1, precision="fp32", threads=1, device="cpu"))
    assert len(counted_steps) == 3 and "TrainStep" in result["timed"]
    assert result["step_s"] > 0 and result["precision"] == "fp32"


def test_bench_times_a_model_given_apart_from_the_presets_and_reports_the_untimed_steps(counted_steps):
    from m3ae.engine.flops import training_flops
    from m3ae.model import M3AEConfig
    from m3ae.train.bench import BenchConfig, run_bench

    # a recipe's model (the demo's kind): widths of no preset; the batch's shapes come from the bench config
    model = M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2, patch_size=8)
    b = BenchConfig(preset="base", batch_size=2, image_size=32, text_length=8, vocab_size=100,
                    steps=1, warmup=2, precision="fp32", threads=1, device="cpu")
    result = run_bench(b, model)
    timed_model = model.replace(image_size=32, text_length=8, vocab_size=100)
    assert result["flops_per_step"] == training_flops(timed_model, True, 8).per_step(2)
    assert result["preset"] is None and len(counted_steps) == 3
    assert len(result["warmup_times"]) == 2 and all(t > 0 for t in result["warmup_times"])
    assert result["step_cpu_s"] > 0


def test_a_window_of_skipped_steps_has_no_losses_and_counts_them():
    names = ("loss", "image_loss", "grad_norm", "skipped")
    window = StatsWindow()
    window.append(StepStats(names, torch.tensor([2.0, 1.0, 3.0, 0.0]), ("loss", "image_loss")))
    window.append(StepStats(names, torch.tensor([float("nan"), 5.0, float("inf"), 1.0]), ("loss", "image_loss")))
    metrics, _ = window.summary()
    assert metrics == {"loss": 2.0, "image_loss": 1.0, "grad_norm": 3.0, "skipped_steps": 1}
    window.append(StepStats(names, torch.tensor([float("nan"), 0.0, float("nan"), 1.0]), ("loss", "image_loss")))
    metrics, _ = window.summary()
    assert metrics == {"loss": None, "image_loss": None, "grad_norm": None, "skipped_steps": 1}


def test_accumulation_scales_each_micro_batch_and_steps_once():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    from m3ae.engine.runtime import resolve_precision

    step = TrainStep(model, optimizer, scheduler, resolve_precision("fp32", torch.device("cpu")), torch.device("cpu"),
                     accum=2)
    x = torch.randn(4, 3)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    reference_loss = reference(x).pow(2).mean()
    reference_loss.backward()
    expected = {k: v - 0.1 * reference.get_parameter(k).grad for k, v in reference.state_dict().items()}
    stats = step(iter([x[:2], x[2:]]), lambda batch, micro: {"loss": model(batch).pow(2).mean()})
    assert stats["loss"].item() == pytest.approx(reference_loss.item(), rel=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_pretraining_runs_one_engine_step_per_optimizer_step(counted_steps, tmp_path):
    from m3ae.engine.metrics import LogConfig
    from m3ae.model import M3AEConfig
    from m3ae.train.pretrain import PretrainConfig, TrainConfig, run_pretraining
    from m3ae.train.synthetic import ListLoader, synthetic_batch

    model = M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
                       image_size=32, patch_size=8, text_length=8, vocab_size=100)
    cfg = PretrainConfig(model=model, train=TrainConfig(batch_size=4, micro_batch_size=2, total_steps=3,
                                                        precision="fp32"),
                         log=LogConfig(every=1, figures_every=0, progress=False, tensorboard=False),
                         out_dir=str(tmp_path))
    loader = ListLoader([synthetic_batch(model, 2, seed=i) for i in range(6)])
    assert run_pretraining(cfg, loader=loader).step == 3
    assert len(counted_steps) == 3 and counted_steps[0].accum == 2  # two micro-batches inside each step
