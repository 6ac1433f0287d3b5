"""The one training step every task runs: pretraining, linear probing, fine-tuning, the demo's
supervised row and `m3ae bench`.

A task supplies what only it knows, `losses(batch, micro) -> {name: scalar tensor or None}` with the
weighted total under `"loss"` (None: a term this run does not compute); the step does the rest once:
micro-batch accumulation with gradient sync only on the last micro-batch, autocast by the resolved
precision, the fp16 grad scaler, unscale and clipping, the on-device non-finite skip and its
counters, the optimizer and scheduler steps, and the statistics (one device tensor, so that
micro-batches sum into it and processes average it in one all-reduce at log steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import gradient_sync, mean_across_ranks
from .metrics import Throughput
from .runtime import Precision

LossFn = Callable[[Any, int], dict[str, "torch.Tensor | None"]]
TOTAL = "loss"  # the key of the back-propagated total in a task's losses


@dataclass
class StepStats:
    """One step's statistics as a single device tensor, in the order of `names`: the task's loss
    terms, then the gradient norm and whether the step was skipped as non-finite. `present`: the
    terms this run computes (the others stay zero and are not logged)."""

    names: tuple[str, ...]
    values: torch.Tensor  # (len(names),), or (steps, len(names)) for a window of steps
    present: tuple[str, ...]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[..., self.names.index(name)]


class StatsWindow:
    """The steps since the last log, averaged over the finite steps and over processes in one
    all-reduce. A window whose every step was skipped logs its loss terms as None (JSON null), never
    as zeros: a diverged run must not look like a perfect one."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def __len__(self) -> int:
        return len(self.steps)

    def append(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def summary(self, extra: Sequence[torch.Tensor] = ()) -> tuple[dict[str, float | None], list[float]]:
        """(the window's metrics, `extra` scalars averaged across processes in the same all-reduce)."""
        first = self.steps[0]
        window = torch.stack([s.values for s in self.steps])  # (steps, names)
        skipped = window[:, first.names.index("skipped")]
        finite = 1.0 - skipped
        averaged = (torch.nan_to_num(window, nan=0.0, posinf=0.0, neginf=0.0) * finite[:, None]).sum(0)
        reduced = mean_across_ranks(torch.cat([averaged, finite.sum().reshape(1), skipped.sum().reshape(1),
                                               *[e.float().reshape(1) for e in extra]])).tolist()
        n = len(first.names)
        sums, finite_steps, skipped_steps = reduced[:n], reduced[n], reduced[n + 1]
        metrics: dict[str, float | None] = {}
        for name, total in zip(first.names, sums):
            if name == "skipped" or (name not in first.present and name != "grad_norm"):
                continue
            metrics[name] = total / finite_steps if finite_steps > 0 else None
        metrics["skipped_steps"] = int(round(skipped_steps))
        self.steps = []
        return metrics, reduced[n + 2:]


class TrainStep:
    """One optimizer step over `accum` micro-batches (see the module's docstring)."""

    def __init__(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, precision: Precision,
                 device: torch.device, accum: int = 1, clip_grad_norm: float | None = None,
                 meter: Throughput | None = None) -> None:
        self.wrapped, self.optimizer, self.scheduler = wrapped, optimizer, scheduler
        self.precision, self.device, self.accum, self.clip = precision, device, accum, clip_grad_norm
        self.meter = meter if meter is not None else Throughput()  # data wait and steps; the task counts samples
        self.scaler = precision.grad_scaler()  # fp16 only; a task registers it with its checkpoints
        self.nonfinite_total = torch.zeros((), device=device)  # skipped steps over the run
        self.nonfinite_run = torch.zeros((), device=device)  # consecutive skipped steps up to now
        self.calls = 0  # steps run by this process since it started: tests and bench read it

    def _next(self, batches: Iterator[Any]) -> Any:
        start = time.perf_counter()
        batch = next(batches)
        self.meter.data_wait += time.perf_counter() - start
        return batch

    def __call__(self, batches: Iterator[Any], losses: LossFn) -> StepStats:
        """Draws `accum` micro-batches from `batches`; returns the step's statistics on the device
        without synchronising the host (except for optimizers that cannot skip on the device)."""
        sums: torch.Tensor | None = None
        names: tuple[str, ...] = ()
        present: tuple[str, ...] = ()
        for micro in range(self.accum):
            batch = self._next(batches)
            with gradient_sync(self.wrapped, micro == self.accum - 1), self.precision.autocast():
                terms = losses(batch, micro)
            total = terms[TOTAL] / self.accum
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
            if sums is None:
                names = (*terms, "grad_norm", "skipped")
                present = tuple(k for k, v in terms.items() if v is not None)
                zero = terms[TOTAL].new_zeros((), dtype=torch.float32)
            values = torch.stack([(v if v is not None else zero).detach().float() for v in terms.values()])
            sums = values if sums is None else sums + values
        mean = sums / self.accum
        grad_norm = self._unscale_and_clip()
        found_inf = (~torch.isfinite(grad_norm) | ~torch.isfinite(mean[names.index(TOTAL)])).float()
        self._optimizer_step(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.nonfinite_total += found_inf
        self.nonfinite_run = (self.nonfinite_run + found_inf) * found_inf
        self.calls += 1
        self.meter.steps += 1
        return StepStats(names, torch.cat([mean, grad_norm.detach().float().reshape(1), found_inf.reshape(1)]),
                         present)

    def _unscale_and_clip(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        if self.clip is not None and math.isfinite(self.clip):
            torch.nn.utils.clip_grads_with_norm_(params, self.clip, grad_norm, foreach=True)
        return grad_norm

    def _optimizer_step(self, found_inf: torch.Tensor) -> None:
        if self.scaler is not None:
            # The scaler skips the update on its own inf check and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # The fused kernel reads `found_inf` on the device and skips the update (step counts
            # included) without a host sync: the hook torch's GradScaler uses.
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(found_inf.item()):
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_total": float(self.nonfinite_total.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_total.fill_(float(state["nonfinite_total"]))
