"""Resumable checkpoints of registered stateful parts, in the layout of `m3ae.model.files`:
`<run>/checkpoints/step_XXXXXXXX/` holding

    model.safetensors + config.json   the weights, whole (rank 0 gathers them): `M3AE.from_pretrained(dir)`,
                                      `m3ae export` and the Hub read them as they are
    optimizer/                        the optimizer state, sharded: every process writes its own part with
                                      `torch.distributed.checkpoint` (DCP); it is read back, resharded, by
                                      any number of processes
    train_state.pt                    every part registered once (lr scheduler, grad scaler, the task's
                                      counters): the same on every process
    rank_<r>.pt                       per process: the parts registered per rank (RNG states, the data
                                      loader's position, masking noise)
    meta.json                         written last: step, number of processes and the SHA-256 of every
                                      file of the directory, every process's shards included

Why the weights are whole and the optimizer sharded: AdamW keeps two fp32 moments per parameter, so
the optimizer state is twice the weights and is what no single process should gather; the weights are
needed whole by every reader of a model directory anyway, and keeping them once (not again inside the
DCP shards) means a resume starts from exactly the weights `from_pretrained` sees.

A part is anything with `state_dict()` / `load_state_dict()`. A checkpoint is written in a hidden
temporary directory and renamed into place, so a killed run never leaves a partial one. Loading
verifies the hashes and reads every file before anything is restored; `load_latest` walks back past
damaged or unreadable checkpoints with a warning. Files are read with `torch.load(weights_only=True)`,
safetensors, and DCP's index through an allow-list unpickler: no pickle runs code.

Resuming with another number of processes: the model and optimizer reshard through DCP; a per-rank
part is re-split only if it says how (`reshard(states, rank, world_size)`, from the states every
writing process saved); otherwise the resume stops with one line naming the part (`ReshardError`).
"""

from __future__ import annotations

import errno
import io
import json
import pickle
import pickletools
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..model import files
from ..model.files import CONFIG_NAME, META_NAME, OPTIMIZER_DIRNAME, STATE_NAME, WEIGHTS_NAME, CheckpointError
from ..utils import DiskFullError, write_bytes
from .distributed import DistInfo, barrier, broadcast_object


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class ReshardError(CheckpointError):
    """The checkpoint is sound but cannot continue exactly at this number of processes: a user error
    (one line, exit status 2), never a reason to fall back to an older checkpoint."""


def _torch_bytes(obj: Any) -> bytes:
    # Serialised in memory and written by `write_bytes`: torch.save's own writer reports a full
    # disk as "[enforce fail at inline_container.cc] unexpected pos", without a word of disk space.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _same_on_every_rank(name: str, states: list[Any]) -> Any:
    """The re-split of a state that every process holds identically: that state."""
    first = states[0]
    for state in states[1:]:
        if _torch_bytes(state) != _torch_bytes(first):
            raise ReshardError(f"'{name}' differs between the processes that wrote it")
    return first


class ProcessRNG:
    """The process's torch, Python, NumPy (and CUDA) generators as one stateful part. `drawn_by`
    names what in the training step draws from them (None: nothing does, so that a resume at another
    number of processes may hand any state to a new process without changing the computation)."""

    def __init__(self, device: torch.device, drawn_by: str | None = "the task's random draws") -> None:
        self.device, self.drawn_by = device, drawn_by

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

    def reshard(self, states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        """Each process draws its own stream, so streams cannot be merged or split; when nothing draws
        from them, process r continues old process r's (r mod the old number)."""
        if self.drawn_by is not None:
            raise ReshardError(f"the per-process random generators (drawn by {self.drawn_by}) cannot be re-split")
        return states[rank % len(states)]


class GeneratorState:
    """A `torch.Generator` as a stateful part. `replicated`: every process draws the same numbers from
    it (seeded alike, drawing for the whole global batch), so it re-splits to any number of processes."""

    def __init__(self, generator: torch.Generator, replicated: bool = False) -> None:
        self.generator, self.replicated = generator, replicated

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])

    def reshard(self, states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        if not self.replicated:
            raise ReshardError("a per-process random generator cannot be re-split")
        return _same_on_every_rank("generator", states)


# ---------------------------------------------------------------------- DCP, read without running code
def _dcp_index_classes() -> dict[tuple[str, str], Any]:
    """What DCP's `.metadata` index may name: its own record types, paths, sizes, dtypes, layouts."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: list[Any] = [metadata.Metadata, metadata.TensorStorageMetadata, metadata.BytesStorageMetadata,
                          metadata.ChunkStorageMetadata, metadata.TensorProperties, metadata.MetadataIndex,
                          metadata.StorageMeta, metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo,
                          pathlib.PosixPath, pathlib.PurePosixPath, torch.Size, torch.serialization._get_layout]
    return {(c.__module__, c.__qualname__): c for c in allowed}


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"names {module}.{name}, which a checkpoint index may not")


def read_dcp_index(path: Path) -> Any:
    """DCP's `.metadata` (a pickle) through an allow-list: its own record types and nothing that runs
    code. Memo indices are checked first: a crafted PUT index makes C pickle allocate a memo table of
    that size."""
    data = path.read_bytes()
    ops = 0
    for op, arg, _ in pickletools.genops(data):
        ops += 1
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and int(arg) > ops:
            raise pickle.UnpicklingError(f"memo index {arg} beyond the {ops} opcodes read")
    return _IndexUnpickler(io.BytesIO(data), _dcp_index_classes()).load()


def _dcp_reader(directory: Path, listed: set[str]):
    """A DCP reader of `directory` whose index is read safely and may only name shard files that the
    checkpoint's manifest lists (so verified by hash), never paths outside it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = directory / ".metadata"
            metadata = read_dcp_index(index)
            for info in (metadata.storage_data or {}).values():
                name = str(info.relative_path)
                if "/" in name or f"{OPTIMIZER_DIRNAME}/{name}" not in listed:
                    raise CheckpointError(f"{index}: names {name!r}, not a shard listed in {META_NAME}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(directory)


def _dcp_planner():
    """DCP's load planner, with its non-tensor entries (the optimizer's param groups) read by
    `torch.load(weights_only=True)` instead of its default full unpickling."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return Planner()


def _full(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _dcp_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    # DCP warns on every call of a single process that it assumes one process: that is our intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return function(*args, **kwargs)


def _first_failure(error: Any) -> BaseException:
    """The exception of the first failing process inside DCP's CheckpointException."""
    return next(iter(error.failures.values()))[0]


def _all_gather(obj: Any) -> list[Any]:
    """Every process's `obj` (our own small values, never read from a file), in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _unreadable(file: Path, error: BaseException) -> CheckpointError:
    text = " ".join(str(error).split())[:300] or type(error).__name__
    return CheckpointError(f"{file}: unreadable ({type(error).__name__}: {text})")


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
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = self.directory / files.step_dir_name(step)
        tmp = self.directory / f".tmp_{final.name}"
        rank = self.info.rank
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            # The weights, gathered whole on rank 0 (collective under FSDP2); the optimizer state as
            # each process holds it (its shard under FSDP2), written by DCP without gathering.
            model_state = get_model_state_dict(model, options=_full(cpu_offload=True))
            try:
                _dcp_call(dcp.save, {"optimizer": get_optimizer_state_dict(model, optimizer)},
                          storage_writer=dcp.FileSystemWriter(tmp / OPTIMIZER_DIRNAME), no_dist=not self.info.enabled)
            except CheckpointException as error:  # every process gets it; an OSError inside says more
                cause = _first_failure(error)
                if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(cause.errno, f"no space left on device while writing "
                                                     f"{tmp / OPTIMIZER_DIRNAME}") from error
                raise cause if isinstance(cause, OSError) else error
            rank_state = {name: part.state_dict() for name, part in self.rank_parts.items()}
            write_bytes(tmp / f"rank_{rank}.pt", _torch_bytes(rank_state))
            # Each process hashes what it wrote; rank 0 the rest, and checks that nothing is left out.
            mine = [tmp / f"rank_{rank}.pt", *(tmp / OPTIMIZER_DIRNAME).glob(f"__{rank}_*.distcp")]
            hashes = {p.relative_to(tmp).as_posix(): files.sha256(p) for p in mine}
            for theirs in _all_gather(hashes):
                hashes.update(theirs)
            if self.info.is_main:
                tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
                train_state = {name: part.state_dict() for name, part in self.parts.items()}
                write_bytes(tmp / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
                write_bytes(tmp / CONFIG_NAME, (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode())
                write_bytes(tmp / STATE_NAME, _torch_bytes(train_state))
                for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME, f"{OPTIMIZER_DIRNAME}/.metadata"):
                    hashes[name] = files.sha256(tmp / name)
                present = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
                if present != hashes.keys():
                    raise CheckpointError(f"{tmp}: the manifest and the files written disagree on "
                                          f"{sorted(present ^ hashes.keys())}")
                meta = {"step": step, "world_size": self.info.world_size, "files": dict(sorted(hashes.items()))}
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
            return sum(p.stat().st_size for p in newest[0].rglob("*") if p.is_file())
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
    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path | None:
        """`--resume auto`: restores the newest checkpoint that verifies and reads on every process,
        warning about each newer one skipped; None when the run has none. Collective."""
        candidates = [Path(p) for p in broadcast_object([str(p) for p in self.step_dirs()] if self.info.is_main
                                                        else None)]
        reasons = []
        for path in candidates:
            try:
                self.load(path, model, optimizer)
                return path
            except ReshardError:
                raise
            except CheckpointError as error:
                reasons.append(f"{path.name}: {error}")
                if self.info.is_main:
                    warnings.warn(f"skipping checkpoint {path}: {error}; falling back to an earlier one", stacklevel=2)
        if candidates:
            # Starting afresh here would rotate the damaged run's checkpoints away under the new one's.
            raise CheckpointError(f"{self.directory}: no checkpoint can be read ({reasons[0]}); start over in "
                                  f"another --out-dir")
        return None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restores model, optimizer and every registered part in place, at this number of processes
        whatever the number that wrote it (see the module doc). Every file is verified and read before
        anything is restored; the processes agree on any failure, so all raise the same error. A part
        the checkpoint lacks keeps its fresh state (a grad scaler when a run resumes in fp16)."""
        path = Path(path)
        try:
            staged, error = self._read(path), None
        except CheckpointError as e:
            staged, error = None, e
        failed = sorted(e for e in _all_gather(None if error is None else (isinstance(error, ReshardError), str(error)))
                        if e is not None)
        if failed:  # the same error everywhere; a damaged file on any process outranks a refusal to reshard
            reshard, text = failed[0]
            raise (ReshardError if reshard else CheckpointError)(text)
        self._apply(path, staged, model, optimizer)

    def _read(self, path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        share = (self.info.rank, self.info.world_size)
        meta = files.verify_meta(path, share)  # each process hashes its share of the files
        listed = set(meta["files"])
        written_by = int(meta["world_size"])
        world, rank = self.info.world_size, self.info.rank

        def read(file: Path, reader) -> Any:
            try:
                return reader(file)
            except Exception as e:  # any parser's failure on a damaged or foreign file
                raise _unreadable(file, e) from e

        def torch_file(file: Path) -> Any:
            return torch.load(file, map_location="cpu", weights_only=True)

        staged: dict[str, Any] = {
            "weights": read(path / WEIGHTS_NAME, lambda f: load_file(str(f))),
            "train_state": read(path / STATE_NAME, torch_file),
        }
        if (path / OPTIMIZER_DIRNAME).is_dir():
            read(path / OPTIMIZER_DIRNAME / ".metadata",
                 lambda f: _dcp_reader(f.parent, listed).read_metadata())  # the index is sound before DCP runs
        elif "optimizer" not in staged["train_state"]:
            raise CheckpointError(f"{path}: holds no optimizer state ({OPTIMIZER_DIRNAME}/ or in {STATE_NAME})")
        if written_by == world:
            staged["rank_state"] = read(path / f"rank_{rank}.pt", torch_file)
            return staged
        old = [read(path / f"rank_{r}.pt", torch_file) for r in range(written_by)]
        staged["rank_state"] = {}
        for name, part in self.rank_parts.items():
            states = [o.get(name) for o in old]
            if all(s is None for s in states):
                continue
            what = f"'{name}' ({type(part).__name__})"
            try:
                if not hasattr(part, "reshard"):
                    raise ReshardError(f"{what} is kept per process and cannot be re-split")
                staged["rank_state"][name] = part.reshard(states, rank, world)
            except ReshardError as e:
                raise ReshardError(f"{path}: written by {written_by} processes, resumed with {world}; {e}; resume "
                                   f"with {written_by} processes") from None
        return staged

    def _apply(self, path: Path, staged: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        set_model_state_dict(model, staged["weights"], options=_full(strict=True))
        train_state = staged["train_state"]
        if (path / OPTIMIZER_DIRNAME).is_dir():
            listed = set(json.loads((path / META_NAME).read_text())["files"])
            target = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            try:
                _dcp_call(dcp.load, target, storage_reader=_dcp_reader(path / OPTIMIZER_DIRNAME, listed),
                          planner=_dcp_planner(), no_dist=not self.info.enabled)
            except CheckpointException as error:  # raised on every process, whichever failed
                raise _unreadable(path / OPTIMIZER_DIRNAME, _first_failure(error)) from error
            set_optimizer_state_dict(model, optimizer, target["optimizer"])
        else:  # written before the optimizer was sharded: its full state in train_state.pt
            set_optimizer_state_dict(model, optimizer, train_state["optimizer"], options=_full())
        for saved, parts in ((train_state, self.parts), (staged["rank_state"], self.rank_parts)):
            for name, part in parts.items():
                if saved.get(name) is not None:
                    part.load_state_dict(saved[name])
