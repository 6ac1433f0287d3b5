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
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
