"""What fits the machine, decided in one place for every command that runs the model: the numerical
precision (autocast around the model, never inside it; a gradient scaler for fp16) and the number of
CPU threads.

`precision: auto` takes bf16 only where the device computes it natively *and* faster than fp32: CUDA
devices with bf16 units; CPUs with AMX or AVX-512 BF16, confirmed by a measured matmul probe,
because native is not enough (an AVX-512 BF16 CPU without AMX can run bf16 matmuls at half its fp32
rate). Elsewhere autocast emulates bf16 and a step is several times slower, so auto takes fp32.
`threads: auto` takes every physical core when they are free, and one thread when the load average
says other processes compete for them: an OpenMP team waits for its slowest thread, so a team larger
than the free cores loses far more than it gains.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

def resolve_device(setting: str = "auto") -> torch.device:
    """`auto`: CUDA when available, else the CPU; anything else as torch spells it ("cuda:1")."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


PrecisionName = Literal["fp32", "bf16", "fp16"]
PrecisionSetting = Literal["auto", "fp32", "bf16", "fp16"]  # what configs and flags accept
ThreadsSetting = int | Literal["auto"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 must beat fp32 by this factor in the probe: a tie is not worth bf16's rounding.
MIN_SPEEDUP = 1.1


@dataclass
class Precision:
    name: PrecisionName
    device: torch.device
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"


# ---------------------------------------------------------------------------------------- precision
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_bf16_support() -> str | None:
    """The CPU's native bf16 instructions as torch and the kernel report them: 'AMX', 'AVX-512 BF16',
    or None (bf16 is emulated)."""
    cpu = getattr(torch._C, "_cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512_bf16 is not None:
        if amx():
            return "AMX"
        return "AVX-512 BF16" if avx512_bf16() else None
    # This torch does not say: its kernel dispatch level, then the CPU flags the kernel exposes.
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX-512 BF16" if "avx512_bf16" in flags else None


def matmul_rate(device: torch.device, name: PrecisionName, size: int, repeats: int) -> float:
    """FLOP/s of the best of `repeats` square `F.linear` calls under `name`'s autocast: the path the
    model's matmuls take (fp32 inputs, autocast casts), not a matmul on pre-cast tensors, which
    takes slower reference kernels on some CPUs."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    autocast = Precision(name, device).autocast()
    best = float("inf")
    with autocast:
        for i in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            sync(device)
            if i:  # the first call warms up kernels and caches
                best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@functools.cache
def measured_speedup(device_type: str, name: PrecisionName) -> float:
    """Matmul rate of `name` over fp32 on this device, measured once per process (about 0.1 s)."""
    device = torch.device(device_type)
    return matmul_rate(device, name, 512, 5) / matmul_rate(device, "fp32", 512, 5)


@functools.cache
def _auto(device_type: str) -> tuple[PrecisionName, str]:
    if device_type == "cuda":
        # bf16 tensor cores from compute capability 8.0 (Ampere); ROCm answers for its own GPUs.
        # torch.cuda.is_bf16_supported() alone also says yes where bf16 is only emulated.
        name, (major, _) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        native = torch.cuda.is_bf16_supported() if torch.version.hip else major >= 8
        if native:
            return "bf16", f"auto: {name} computes bf16 natively"
        return "fp32", f"auto: {name} has no native bf16 (compute capability {major}.x)"
    if device_type != "cpu":
        return "fp32", f"auto: no bf16 rule for {device_type} devices"
    native = cpu_bf16_support()
    if native is None:
        return "fp32", (f"auto: the CPU ({torch.backends.cpu.get_cpu_capability()}) has no AMX or AVX-512 BF16, "
                        f"so bf16 would be emulated")
    speedup = measured_speedup("cpu", "bf16")
    if speedup >= MIN_SPEEDUP:
        return "bf16", f"auto: the CPU has {native}; bf16 matmul measured {speedup:.2f}× fp32"
    return "fp32", (f"auto: the CPU has {native} but bf16 matmul measured only {speedup:.2f}× fp32 "
                    f"(bf16 needs >= {MIN_SPEEDUP}×)")


def resolve_precision(setting: PrecisionSetting, device: torch.device) -> Precision:
    """The precision a run uses for `setting` on `device`: 'auto' decides (once per process and
    device type); an explicit name is kept, with a warning when the CPU computes it slower than fp32."""
    if setting == "auto":
        name, reason = _auto(device.type)
        return Precision(name, device, reason)
    if setting not in DTYPES:
        raise ValueError(f"precision={setting!r}: choose auto, fp32, bf16 or fp16")
    if setting != "fp32" and device.type == "cpu":
        speedup = measured_speedup("cpu", setting)
        if speedup < 1:
            where = "this CPU"
            if setting == "bf16":
                where += f" ({cpu_bf16_support() or 'no AMX or AVX-512 BF16: emulated'})"
            warnings.warn(f"precision {setting} on {where}: its matmuls measured {1 / speedup:.1f}× slower than "
                          f"fp32 here; precision auto would take fp32", stacklevel=2)
    return Precision(setting, device, "requested")


# ------------------------------------------------------------------------------------------ threads
def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings count once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    siblings = set()
    for cpu in cpus:
        try:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return max(len(siblings), 1)


def auto_threads(cores: int, load: float, processes: int = 1) -> tuple[int, str]:
    """The rule: this process's share of the cores (`processes` of this run share the node) less
    what the 1-minute load average says others use, at least 1."""
    share = max(cores // max(processes, 1), 1)
    free = cores - load
    threads = min(share, max(int(free + 0.5), 1))
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return threads, f"auto: {cores} physical cores{shared}, 1-minute load average {load:.2f}"


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str

    def describe(self) -> str:
        return f"{self.count} CPU thread{'s' if self.count > 1 else ''} ({self.reason})"


@functools.cache
def _auto_threads() -> Threads:
    """Decided once per process: the later runs of one process (the demo's) keep the first decision
    rather than counting their own load. OMP_NUM_THREADS, when the user set it, wins."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return Threads(int(omp), "auto: OMP_NUM_THREADS")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return Threads(*auto_threads(physical_cores(), load, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def apply_threads(setting: ThreadsSetting) -> Threads:
    """Sets torch's intra-op (and, where torch still allows it, inter-op) threads: call it first,
    before anything is timed or computed."""
    if setting == "auto":
        chosen = _auto_threads()
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        chosen = Threads(setting, "requested")
    else:
        raise ValueError(f"threads={setting!r}: a number >= 1 or 'auto'")
    torch.set_num_threads(chosen.count)
    # Inter-op threads can only be set before the first inter-op parallel work; later it raises.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(chosen.count)
    return chosen


def sync(device: torch.device) -> None:
    """Waits for the device's queued work, so that a timer reads its end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


RUN_INFO = "run_info.json"


def _cpu_name() -> str:
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    line = next((line for line in text.splitlines() if line.startswith("model name")), "")
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def process_info(rank: int, device: torch.device) -> dict[str, object]:
    """Where one process of the run runs: its rank, host and device by name (the GPU's, or the
    CPU's model); run_info.json lists every rank's."""
    import socket

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"rank": rank, "host": socket.gethostname(), "device": str(device), "device_name": name}


def write_run_info(run_dir: str | Path, precision: Precision, threads: Threads,
                   processes: list[dict[str, object]] | None = None) -> Path:
    """Prints what the run resolved and why, and records it in `run_info.json`, with the world size and
    every process's host and device (`processes`, one `process_info` per rank, gathered at start).
    config.yaml keeps the settings as given (`auto`), so that a resumed or copied run decides again
    on its machine."""
    import json

    from ..utils import atomic_path

    print(f"{precision.describe()}; {threads.describe()}", flush=True)
    processes = processes or [process_info(0, precision.device)]
    info = {"precision": precision.name, "precision_reason": precision.reason, "threads": threads.count,
            "threads_reason": threads.reason, "device": str(precision.device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "world_size": len(processes), "hosts": sorted({str(p["host"]) for p in processes}),
            "processes": processes}
    path = Path(run_dir) / RUN_INFO
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
