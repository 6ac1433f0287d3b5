"""Process groups and the wrappers applied to the model from outside (torchtitan order): activation
checkpointing, then torch.compile per block, then FSDP2 `fully_shard` per block or DDP.

Launched by `torchrun`, every process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment;
without them the run is a single process and no process group is created."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from .runtime import resolve_device

ParallelName = Literal["auto", "ddp", "fsdp"]
# Sizes whose replicated AdamW state would crowd a GPU; `auto` shards them.
FSDP_PRESETS = ("large", "huge")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Reads the torchrun environment; creates the process group (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        exit_with_launcher()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, dev)


def exit_with_launcher(interval_s: float = 1.0) -> None:
    """Ends this process within `interval_s` once its parent (torchrun's agent, srun's step daemon)
    is gone. kill -9 of a torchrun process group left the ranks running, reparented, still writing
    metrics and holding the run directory's lock, so the requeued `--resume auto` found it "in use by
    another run". The rank exits at once, as if killed with its launcher: the newest checkpoint
    resumes bit for bit, while a checkpoint now would wait on ranks that may already be gone.
    A thread polls the parent's pid: Linux's PR_SET_PDEATHSIG would also fire when the launcher
    thread that started us ends, and does not exist elsewhere."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(f"rank {os.environ.get('RANK', '?')}: its launcher (pid {parent}) is gone; exiting", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="m3ae-launcher-watch", daemon=True).start()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def broadcast_object(obj):
    """Rank 0's value of a picklable object of our own making (never loaded from a file) on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's value of a picklable object of our own making, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.encoder.blocks, *model.decoder.blocks]


def _checkpointed_forward(forward, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass. The block's `forward` is replaced on
    the instance, so parameter names (and checkpoints) are unchanged."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place: the blocks of one stack are identical, so one graph serves them
    all, and FSDP2 can still shard per block. Static shapes: encoder and decoder blocks share
    `Block.forward` with different sequence lengths, and dynamo's default would turn that second
    graph (and every later one) into a symbolic-length graph; static graphs, one per shape, are the
    kernels inductor specialises (docs/BENCHMARKS.md, "torch.compile"); so the model keeps its
    decoder at full length."""
    for block in transformer_blocks(model):
        block.compile(dynamic=False)
    if hasattr(model, "trim_decoder_padding"):
        model.trim_decoder_padding = False  # the decoder's length would follow each batch: a recompile per length


def resolve_parallel(parallel: str, preset: str | None) -> str:
    if parallel != "auto":
        return parallel
    return "fsdp" if preset in FSDP_PRESETS else "ddp"


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, param_dtype: torch.dtype | None) -> nn.Module:
    """The model as trained: unchanged on one process, DDP or FSDP2 on several. With FSDP2 and a
    low-precision `param_dtype`, weights are gathered in that dtype and gradients reduced in fp32."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    raise ValueError(f"train.parallel={parallel!r}: must be 'auto', 'ddp' or 'fsdp'")


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's backward: with `enabled=False` gradients accumulate locally and
    the all-reduce (DDP) or reduce-scatter (FSDP2) waits for the last micro-batch."""
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

