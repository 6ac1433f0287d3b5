"""Learning-rate schedule of the official release: linear warm-up from `init` to `peak`, then cosine
decay to `end` (optax.join_schedules of linear_schedule and cosine_decay_schedule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    peak: float
    total_steps: int
    warmup_steps: int
    init: float = 0.0
    end: float = 0.0

    def __call__(self, step: int) -> float:
        """The learning rate applied by optimizer update number `step` (0-based), as optax counts."""
        if step < self.warmup_steps:
            return self.init + (self.peak - self.init) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min(step - self.warmup_steps, decay_steps) / decay_steps
        return self.end + (self.peak - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRScheduler:
    """Sets each param group's lr to `schedule(step) × group["lr_scale"]`; python floats, so no
    device sync. Its only state is the step counter."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def last_lr(self) -> float:
        return self.schedule(self.step_count)

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
