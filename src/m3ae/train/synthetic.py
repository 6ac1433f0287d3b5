"""Random batches of the pretraining format, for benchmarks and tests: no files, no data pipeline."""

from __future__ import annotations

import torch


def synthetic_batch(cfg, batch_size: int, seed: int = 0, text_length: int | None = None,
                    unpaired_text_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pixels ~ N(0, 1), uniform token ids, the last quarter of each caption padded."""
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)}
    if cfg.has_text:
        for key, length in (("text", text_length or cfg.text_length), ("unpaired_text", unpaired_text_length)):
            if length:
                batch[key] = torch.randint(0, cfg.vocab_size, (batch_size, length), generator=g)
                pad = torch.zeros(batch_size, length, dtype=torch.bool)
                pad[:, length - length // 4 :] = True
                batch[f"{key}_padding_mask"] = pad
    return batch


class ListLoader:
    """Iterates a list of batches, resumable at any position like the real pretraining loader."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.position = 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        rows = next(iter(self.batches[0].values())).shape[0] if self.batches else 0
        return {"position": self.position, "batch_size": rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def reshard(self, states: list[dict[str, int]], rank: int, world_size: int) -> dict[str, int]:
        """The state of process `rank` of `world_size` from those of the processes that wrote it. The
        rule, exact for lists that hold on process r of W rows [r·b, (r+1)·b) of each global batch (the
        split pretraining expects): the samples all processes consumed together, re-split evenly."""
        from ..engine.checkpoint import ReshardError

        if len({s["position"] for s in states}) != 1:
            raise ReshardError("the processes' data positions differ")
        consumed = sum(s["position"] * s["batch_size"] for s in states)
        rows = self.state_dict()["batch_size"]
        if consumed % (world_size * rows):
            raise ReshardError(f"{consumed} samples consumed do not split into batches of {rows} on {world_size} "
                               f"processes")
        return {"position": consumed // (world_size * rows), "batch_size": rows}
