"""Resumable checkpoints of registered stateful parts, in the layout of `m3ae.model.files`:
`<run>/checkpoints/step_XXXXXXXX/` holding

    model.safetensors + config.json   the weights, loadable with `M3AE.from_pretrained(dir)`
    train_state.pt                    the optimizer and every part registered for rank 0 (lr
                                      scheduler, grad scaler, the task's counters)
    rank_<r>.pt                       per process: the parts registered per rank (RNG states, the
                                      data loader's position, masking noise)
    meta.json                         written last: step and the SHA-256 of every file

A part is anything with `state_dict()` / `load_state_dict()`. A checkpoint is written in a hidden
temporary directory and renamed into place, so a killed run never leaves a partial one. Loading
verifies the hashes; `latest_good` walks back past corrupted ones with a warning. Files are read with
`torch.load(weights_only=True)` and safetensors only: no pickle.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..model import files
from ..model.files import CONFIG_NAME, META_NAME, STATE_NAME, WEIGHTS_NAME, CheckpointError
from ..utils import write_bytes
from .distributed import DistInfo, barrier, broadcast_object


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def _torch_bytes(obj: Any) -> bytes:
    # Serialised in memory and written by `write_bytes`: torch.save's own writer reports a full
    # disk as "[enforce fail at inline_container.cc] unexpected pos", without a word of disk space.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class ProcessRNG:
    """The process's torch, Python, NumPy (and CUDA) generators as one stateful part."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, seq, *rest = state["python"]
        random.setstate((version, tuple(seq), *rest))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class GeneratorState:
    """A `torch.Generator` as a stateful part."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class CheckpointManager:
    """The checkpointer of one run: the model, its optimizer and the registered parts, saved together
    and restored together."""

    def __init__(self, run_dir: str | Path, keep: int, info: DistInfo) -> None:
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / files.CHECKPOINT_DIRNAME
        self.keep = keep
        self.info = info
        self.parts: dict[str, Stateful] = {}
        self.rank_parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful, per_rank: bool = False) -> None:
        """Saves `part` with every checkpoint: once (rank 0's) or, `per_rank`, each process its own."""
        (self.rank_parts if per_rank else self.parts)[name] = part

    def step_dirs(self) -> list[Path]:
        """Finished checkpoints, newest first."""
        return files.step_dirs(self.run_dir)

    # ------------------------------------------------------------------ save
    def save(self, step: int, model: nn.Module, model_config: dict[str, Any], optimizer: torch.optim.Optimizer) -> Path:
        """Collective: every rank calls it."""
        from safetensors.torch import save
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = self.directory / files.step_dir_name(step)
        tmp = self.directory / f".tmp_{final.name}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            # Gathering full (unsharded) state is collective under FSDP2; only rank 0 receives it.
            options = _state_options(cpu_offload=True)
            model_state = get_model_state_dict(model, options=options)
            optim_state = get_optimizer_state_dict(model, optimizer, options=options)
            rank_state = {name: part.state_dict() for name, part in self.rank_parts.items()}
            write_bytes(tmp / f"rank_{self.info.rank}.pt", _torch_bytes(rank_state))
            barrier()
            if self.info.is_main:
                tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
                train_state = {name: part.state_dict() for name, part in self.parts.items()}
                write_bytes(tmp / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
                write_bytes(tmp / CONFIG_NAME, (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode())
                write_bytes(tmp / STATE_NAME, _torch_bytes({**train_state, "optimizer": optim_state}))
                hashes = {p.name: files.sha256(p) for p in sorted(tmp.iterdir())}
                meta = {"step": step, "world_size": self.info.world_size, "files": hashes}
                write_bytes(tmp / META_NAME, (json.dumps(meta, indent=2) + "\n").encode())
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                for old in self.step_dirs()[self.keep :]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            # A full disk (or a second signal) must not leave a half-written directory eating space;
            # the previous checkpoint is untouched and still the newest that verifies.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()
        return final

    def remove_stale_temporaries(self) -> None:
        """Deletes `.tmp_step_*` left by a run killed while saving (call while holding the run lock)."""
        for stale in self.directory.glob(".tmp_step_*") if self.directory.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)

    def bytes_needed(self, model: nn.Module) -> int:
        """What the next checkpoint takes on disk: the newest one's size, else weights + AdamW's two
        moments + margin estimated from the parameters."""
        newest = self.step_dirs()
        if newest:
            return sum(p.stat().st_size for p in newest[0].iterdir())
        return 4 * sum(p.numel() * p.element_size() for p in model.parameters())

    # ------------------------------------------------------------------ find and verify
    def verify(self, path: Path) -> int:
        """The step of a complete, uncorrupted checkpoint; raises CheckpointError otherwise."""
        return files.verify(path)

    def newest_verified(self) -> Path | None:
        """Newest checkpoint that verifies, warning about each newer one skipped; this process only."""
        return files.newest_verified(self.run_dir)

    def latest_good(self) -> Path | None:
        """`newest_verified` as rank 0 finds it, on every rank."""
        chosen = self.newest_verified() if self.info.is_main else None
        chosen = broadcast_object(None if chosen is None else str(chosen))
        return Path(chosen) if chosen else None

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restores model, optimizer and every registered part in place. Every rank reads the full
        state and keeps its shard. A part the checkpoint lacks keeps its fresh state (a grad scaler
        when a run resumes in fp16)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = Path(path)
        if self.info.is_main:
            self.verify(path)
        written_by = json.loads((path / META_NAME).read_text())["world_size"]
        if written_by != self.info.world_size:
            raise CheckpointError(
                f"{path}: written by {written_by} processes, resumed with {self.info.world_size}; the data "
                f"position is per process, so resume with the same number"
            )
        model_state = load_file(str(path / WEIGHTS_NAME))
        set_model_state_dict(model, model_state, options=_state_options(strict=True))
        train_state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, train_state.pop("optimizer"), options=_state_options())
        rank_state = torch.load(path / f"rank_{self.info.rank}.pt", map_location="cpu", weights_only=True)
        for saved, parts in ((train_state, self.parts), (rank_state, self.rank_parts)):
            for name, part in parts.items():
                if saved.get(name) is not None:
                    part.load_state_dict(saved[name])
