"""The pretraining loop on tiny models: learning, accumulation, resume, checkpoints, signals, NaN."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from m3ae import M3AE
from m3ae.model import M3AEConfig
from m3ae.model.files import resolve
from m3ae.engine.checkpoint import CheckpointManager
from m3ae.engine.distributed import DistInfo
from m3ae.engine.metrics import LogConfig, read_metrics
from m3ae.engine.optim import OptimConfig
from m3ae.train.pretrain import (
    CheckpointConfig, NonFiniteLossError, Pretrainer, PretrainConfig, TrainConfig, run_pretraining,
)
from m3ae.train.synthetic import ListLoader, synthetic_batch
from m3ae.viz.cli import checkpoint_normalization

TINY = dict(emb_dim=32, depth=2, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
            image_size=32, patch_size=8, text_length=16, vocab_size=100)


def tiny_config(tmp_path, steps: int = 6, batch: int = 8, micro: int | None = None, model: dict | None = None,
                **train) -> PretrainConfig:
    return PretrainConfig(
        model=M3AEConfig(**{**TINY, **(model or {})}),
        optim=OptimConfig(lr=2e-3, warmup_steps=1),
        # fp32 unless a test asks: the numbers these tests compare must not depend on what `auto` picks
        train=TrainConfig(batch_size=batch, micro_batch_size=micro, total_steps=steps, **{"precision": "fp32", **train}),
        log=LogConfig(every=1, figures_every=0, progress=False, tensorboard=False),
        checkpoint=CheckpointConfig(every=1000, keep=2),
        out_dir=str(tmp_path),
    )


def split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive row blocks of a batch: the micro-batches (or per-process shards) of one global batch."""
    size = next(iter(batch.values())).shape[0] // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def global_batches(cfg: M3AEConfig, count: int, size: int, padded: bool = True, **kw) -> list[dict]:
    batches = [synthetic_batch(cfg, size, seed=i, **kw) for i in range(count)]
    if not padded:
        for b in batches:
            for key in [k for k in b if k.endswith("padding_mask")]:
                b[key] = torch.zeros_like(b[key])
    return batches


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("mode", ["paired", "image_only", "text_only", "mae", "unpaired"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path, mode):
    model = {"model_type": "mae"} if mode == "mae" else {}
    train = {"unpaired_text_weight": 1.0} if mode == "unpaired" else {}
    cfg = tiny_config(tmp_path, steps=15, model=model, **train)
    batch = synthetic_batch(cfg.model, 8, unpaired_text_length=12 if mode == "unpaired" else None)
    keep = {"paired": None, "unpaired": None, "mae": ["image"], "image_only": ["image"],
            "text_only": ["text", "text_padding_mask"]}[mode]
    if keep:
        batch = {k: v for k, v in batch.items() if k in keep}
    cfg.optim.warmup_steps = 0
    result = run_pretraining(cfg, loader=ListLoader([batch]))
    history = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in history] == list(range(1, 16))
    first, last = history[0], history[-1]
    assert last["loss"] < 0.9 * first["loss"]
    expected_terms = {"paired": {"image_loss", "text_loss"}, "image_only": {"image_loss"}, "mae": {"image_loss"},
                      "text_only": {"text_loss"}, "unpaired": {"image_loss", "text_loss", "unpaired_text_loss"}}[mode]
    terms = {"image_loss", "text_loss", "unpaired_text_loss"}
    assert {k for k in terms if k in last} == expected_terms
    if mode == "unpaired":  # the total is L_img + 0.5 L_txt + w_u L_unpaired
        total = last["image_loss"] + 0.5 * last["text_loss"] + last["unpaired_text_loss"]
        assert last["loss"] == pytest.approx(total, rel=1e-5)
    assert result.checkpoint is not None and result.step == 15


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(tmp_path):
    # float64 weights: Adam divides by sqrt(v), which turns float32 rounding in near-zero gradients
    # into visible weight differences; in float64 the two summation orders agree to ~1e-12.
    runs = _train_with_micro_batches(tmp_path, (8, 2))
    (losses_full, weights_full), (losses_accum, weights_accum) = runs[8], runs[2]
    assert losses_accum == pytest.approx(losses_full, rel=1e-6)  # the model reports float32 losses
    for name, value in weights_full.items():
        torch.testing.assert_close(weights_accum[name], value, rtol=1e-9, atol=1e-11, msg=name)


def _train_with_micro_batches(tmp_path, micro_sizes):
    runs = {}
    for micro in micro_sizes:
        cfg = tiny_config(tmp_path / str(micro), steps=3, micro=micro)
        batches = [part for b in global_batches(cfg.model, 3, 8, padded=False) for part in split(b, 8 // micro)]
        for b in batches:
            b["image"] = b["image"].double()
        trainer = Pretrainer(cfg, loader=ListLoader(batches))
        trainer.model.double()  # in place: the optimizer keeps the same parameters
        trainer.fit()
        runs[micro] = (losses(tmp_path / str(micro)), trainer.model.state_dict())
    return runs


def test_kill_and_resume_continues_the_same_trajectory_bit_for_bit(tmp_path):
    def run(out, max_steps=None, resume=None):
        cfg = tiny_config(out, steps=6, max_steps=max_steps, deterministic=True)
        loader = ListLoader(global_batches(cfg.model, 4, 8))  # 4 batches: the resumed run crosses an epoch
        return run_pretraining(cfg, loader=loader, resume=resume)

    straight = run(tmp_path / "straight")
    first = run(tmp_path / "resumed", max_steps=4)
    assert first.step == 4
    resumed = run(tmp_path / "resumed", resume="auto")
    assert resumed.step == 6
    assert [m["step"] for m in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == list(range(1, 7))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = M3AE.from_pretrained(straight.checkpoint).state_dict()
    b = M3AE.from_pretrained(resumed.checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path):
    cfg = tiny_config(tmp_path, steps=4)
    cfg.checkpoint = CheckpointConfig(every=1, keep=3)
    cfg.data.normalization = "imagenet"  # recorded in the run's config.yaml, read back by the figure commands
    run_pretraining(cfg, loader=ListLoader(global_batches(cfg.model, 2, 8)))
    manager = CheckpointManager(tmp_path, keep=3, info=DistInfo(0, 1, 0, torch.device("cpu")))
    assert [p.name for p in manager.step_dirs()] == ["step_00000004", "step_00000003", "step_00000002"]
    weights = manager.step_dirs()[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_00000004.*corrupted"):
        assert manager.latest_good().name == "step_00000003"
    # every command that takes a model accepts the run directory: its newest checkpoint that verifies
    assert resolve(tmp_path) == manager.step_dirs()[1]
    assert checkpoint_normalization(tmp_path) == "imagenet" == checkpoint_normalization(resolve(tmp_path))
    M3AE.from_pretrained(tmp_path)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint under .* verifies"):
        resolve(tmp_path / "empty")
    cfg.train.total_steps, cfg.resume = 5, "auto"
    with pytest.warns(UserWarning, match="corrupted"):
        trainer = Pretrainer(cfg, loader=ListLoader(global_batches(cfg.model, 2, 8)))
    assert trainer.step == 3


def test_sigterm_writes_a_checkpoint_and_returns_cleanly(tmp_path):
    cfg = tiny_config(tmp_path, steps=50)

    class KillAtThirdBatch(ListLoader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    result = run_pretraining(cfg, loader=KillAtThirdBatch(global_batches(cfg.model, 5, 8)))
    assert result.interrupted and result.step == 3
    assert result.checkpoint.name == "step_00000003"
    assert "continue with --resume auto" in result.describe()
    cfg.resume = "auto"
    resumed = Pretrainer(cfg, loader=ListLoader(global_batches(cfg.model, 5, 8)))
    assert resumed.step == 3 and resumed.loader.position == 3


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run_when_they_persist(tmp_path):
    cfg = tiny_config(tmp_path, steps=20, max_nonfinite_steps=3)
    good = global_batches(cfg.model, 1, 8)[0]
    bad = {**good, "image": torch.full_like(good["image"], float("nan"))}
    trainer = Pretrainer(cfg, loader=ListLoader([good, bad, good, bad, bad, bad, good]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*train.max_nonfinite_steps=3"):
        trainer.fit()
    history = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["nonfinite_steps"] for m in history] == [0, 1, 1, 2, 3, 4]
    # a skipped step is logged as skipped, its losses absent: never as a perfect 0.0
    assert [m["skipped_steps"] for m in history] == [0, 1, 0, 1, 1, 1]
    assert [("loss" in m, "grad_norm" in m) for m in history] == [(s == 0, s == 0) for s in [0, 1, 0, 1, 1, 1]]
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_run_directory_has_metrics_figures_config_and_loadable_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, steps=4)
    cfg.log = dataclasses.replace(cfg.log, figures_every=2)
    result = run_pretraining(cfg, loader=ListLoader(global_batches(cfg.model, 2, 8)))
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"recon_00000002.png", "recon_00000004.png", "captions_00000004.txt", "loss_curves.png"} <= names
    captions = (tmp_path / "figures" / "captions_00000004.txt").read_text()
    assert captions.startswith("sample 0: ") and "[" in captions and " -> " in captions  # masked words, guesses
    assert (tmp_path / "config.yaml").is_file()
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for key in ("step", "loss", "lr", "samples_per_s", "flops_per_s", "mfu", "data_wait", "eta_s"):
        assert key in record
    model = M3AE.from_pretrained(result.checkpoint)
    assert model.config.emb_dim == TINY["emb_dim"]


def test_loader_batches_must_match_the_micro_batch(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, micro=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        run_pretraining(cfg, loader=ListLoader(global_batches(cfg.model, 1, 8)))


def _output_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_low_precision_autocast_trains_and_keeps_fp32_weights(tmp_path, precision):
    cfg = tiny_config(tmp_path, steps=10, precision=precision)
    cfg.optim.warmup_steps = 0
    trainer = Pretrainer(cfg, loader=ListLoader(global_batches(cfg.model, 1, 8)))
    assert (trainer.train_step.scaler is not None) == (precision == "fp16")
    inside = _output_dtypes(trainer.model.encoder.blocks[0].mlp)  # what a block computes in
    trainer.fit()
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert inside and set(inside) == {want}
    history = losses(tmp_path)
    assert history[-1] < 0.9 * history[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_activation_checkpointing_recomputes_without_changing_the_result(tmp_path):
    runs, forwards = [], []
    for checkpointing in (False, True):
        cfg = tiny_config(tmp_path / str(checkpointing), steps=3, activation_checkpointing=checkpointing)
        trainer = Pretrainer(cfg, loader=ListLoader(global_batches(cfg.model, 3, 8)))
        calls: list[int] = []
        # a pre-hook: recomputation stops as soon as the tensors backward needs exist again, before the
        # MLP's output (so a forward hook would not see it)
        trainer.model.encoder.blocks[0].mlp.register_forward_pre_hook(lambda mod, args: calls.append(1))
        trainer.fit()
        forwards.append(len(calls))
        runs.append((losses(tmp_path / str(checkpointing)), trainer.model.state_dict()))
    # with checkpointing each block's forward runs again in the backward pass: twice per step
    assert forwards[0] > 0 and forwards[1] == 2 * forwards[0]
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6)
    assert set(runs[1][1]) == set(runs[0][1])  # parameter names unchanged by the wrapper
