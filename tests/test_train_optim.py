"""Optimiser groups, lr scaling and schedule, LARS, the skipped update, and the analytic FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from m3ae import M3AE
from m3ae.model import M3AEConfig
from m3ae.engine.distributed import apply_activation_checkpointing
from m3ae.engine.flops import forward_flops, training_flops
from m3ae.engine.optim import LARS, OptimConfig, build_optimizer, no_decay_names, param_groups
from m3ae.engine.schedule import LRScheduler, WarmupCosine
from m3ae.train.synthetic import synthetic_batch
from test_train_loop import TINY


@pytest.fixture(scope="module")
def model() -> M3AE:
    return M3AE(M3AEConfig(**TINY))


def _group_names(model, groups) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in groups}


def test_official_no_decay_group_is_biases_tokens_and_word_embedding(model):
    groups = _group_names(model, param_groups(model, 0.05, no_decay_names(model, "official")))
    no_decay = groups["no_decay"]
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} <= no_decay
    for name in ("cls_token", "image_mask_embedding", "text_mask_embedding", "encoder_image_type_embedding",
                 "decoder_text_type_embedding", "text_embedding.weight"):
        assert name in no_decay
    # LayerNorm scales and every Linear kernel are decayed
    assert "encoder.blocks.0.norm1.weight" in groups["decay"]
    assert "decoder.norm.weight" in groups["decay"]
    assert {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2
            and n != "text_embedding.weight"} <= groups["decay"]
    assert groups["decay"] | no_decay == {n for n, _ in model.named_parameters()}
    assert not groups["decay"] & no_decay


def test_mae_style_no_decay_group_is_every_one_dimensional_parameter(model):
    groups = _group_names(model, param_groups(model, 0.05, no_decay_names(model, "mae")))
    assert groups["no_decay"] == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert "encoder.blocks.0.norm1.weight" in groups["no_decay"]
    assert {"cls_token", "text_embedding.weight"} <= groups["decay"]


def test_group_names_survive_wrappers_applied_from_outside():
    wrapped = M3AE(M3AEConfig(**TINY))
    apply_activation_checkpointing(wrapped)
    compiled = torch.compile(wrapped)  # prefixes names with `_orig_mod.`
    exclude = no_decay_names(wrapped, "official")
    groups = param_groups(compiled, 0.05, exclude)
    assert len(groups[1]["params"]) == len(exclude)


def test_adamw_settings_and_lr_scaled_by_batch(model):
    cfg = OptimConfig(base_lr=1.5e-4)
    assert cfg.peak_lr(4096) == pytest.approx(1.5e-4 * 16)
    assert OptimConfig(lr=3e-4).peak_lr(4096) == 3e-4
    opt = build_optimizer(model, cfg, cfg.peak_lr(512), no_decay_names(model, "official"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == pytest.approx(3e-4)
               for g in opt.param_groups)


def test_warmup_cosine_values_at_chosen_steps():
    s = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10, init=0.0, end=0.0)
    assert s(0) == 0.0  # optax: the first update uses lr_init
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # half-way through the cosine
    assert s(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(0.0, abs=1e-12)
    assert s(500) == pytest.approx(0.0, abs=1e-12)  # stays at the end value
    floor = WarmupCosine(peak=2.0, total_steps=20, warmup_steps=0, end=0.5)
    assert floor(0) == 2.0 and floor(20) == pytest.approx(0.5)


def test_scheduler_sets_group_lrs_and_restores_its_position(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    schedule = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10)
    sched = LRScheduler(opt, schedule)
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    other = LRScheduler(torch.optim.AdamW(model.parameters(), lr=1.0), schedule)
    other.load_state_dict(sched.state_dict())
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_lars_scales_matrix_updates_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    opt = LARS([{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    update = torch.tensor([[0.0, 2.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # g + wd·w = [1.5, 4]
    ratio = 0.001 * 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * ratio * update)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))  # 1-D: plain SGD


def test_fused_adamw_skips_the_update_when_found_inf_is_set(model):
    opt = build_optimizer(model, OptimConfig(), 1e-3, set())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = [s["step"].clone() for s in opt.state.values()]
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, opt.state.values()))
    opt.zero_grad()


@pytest.mark.parametrize("model_type,text", [("m3ae", True), ("m3ae", False), ("mae", False)])
def test_analytic_flops_match_the_matmuls_torch_counts(model_type, text):
    cfg = M3AEConfig(**{**TINY, "model_type": model_type, "attn_impl": "math"})
    m = M3AE(cfg)
    batch = synthetic_batch(cfg, 4)
    if text:  # one full-length caption: the decoder then runs every position (no trailing padding to skip)
        batch["text_padding_mask"][0] = False
    with FlopCounterMode(display=False) as counter:
        m(image=batch["image"], text=batch.get("text") if text else None,
          text_padding_mask=batch.get("text_padding_mask") if text else None, compute_logits=False)
    expected = forward_flops(cfg, 4, image=True, text_length=cfg.text_length if text else None)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)
    assert training_flops(cfg, True, cfg.text_length if text else None).per_step(4) == 3 * expected
