"""The checkpointer's registered parts (what the engine may import: tests/test_layering.py)."""

from __future__ import annotations

import json

import torch
from torch import nn

from m3ae.engine.checkpoint import CheckpointManager, GeneratorState
from m3ae.engine.distributed import DistInfo


class Counter:
    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_checkpointer_restores_every_registered_part_and_leaves_absent_ones_fresh(tmp_path):
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    counter, generator = Counter(7), torch.Generator().manual_seed(5)
    saver = CheckpointManager(tmp_path, keep=2, info=info)
    saver.register("counter", counter)
    saver.register("noise", GeneratorState(generator), per_rank=True)
    path = saver.save(3, model, {"kind": "test"}, optimizer)
    expected_draw = torch.rand(4, generator=generator)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = optimizer.state[model.weight]["momentum_buffer"].clone()
    assert path.name == "step_00000003" and saver.verify(path) == 3
    assert json.loads((path / "config.json").read_text()) == {"kind": "test"}

    fresh_model = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    restored, fresh_generator, absent = Counter(0), torch.Generator().manual_seed(99), Counter(42)
    loader = CheckpointManager(tmp_path, keep=2, info=info)
    loader.register("counter", restored)
    loader.register("noise", GeneratorState(fresh_generator), per_rank=True)
    loader.register("scaler", absent)  # not in the checkpoint: keeps its own state
    loader.load(loader.latest_good(), fresh_model, fresh_optimizer)
    assert restored.value == 7 and absent.value == 42
    assert torch.equal(torch.rand(4, generator=fresh_generator), expected_draw)
    assert all(torch.equal(fresh_model.state_dict()[k], weights[k]) for k in weights)
    assert torch.equal(fresh_optimizer.state[fresh_model.weight]["momentum_buffer"], momentum)
