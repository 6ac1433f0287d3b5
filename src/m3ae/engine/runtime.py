"""What fits the machine, decided in one place for every command that runs the model: the numerical
precision (autocast around the model, never inside it; a gradient scaler for fp16) and the number of
CPU threads.

`precision: auto` takes bf16 only where the device computes it natively *and* faster than fp32: CUDA
devices with bf16 units; CPUs with AMX or AVX-512 BF16, confirmed by a measured matmul probe,
because native is not enough (an AVX-512 BF16 CPU without AMX can run bf16 matmuls at half its fp32
rate). Elsewhere autocast emulates bf16 and a step is several times slower, so auto takes fp32.
The probe runs once per CPU model, flags, torch version and kernel level, and its result is kept in
the user's cache directory: a probe repeated per run, on a busy machine, could flip the precision of
the same command between two runs.
`threads: auto` takes this process's share of the physical cores, whatever else runs: with idle
OpenMP threads sleeping rather than spinning (set by m3ae.cli before torch loads), a team as large as
the cores was the faster choice quiet, busy and shared (docs/BENCHMARKS.md, "Threads"), while the
1-minute load average the rule once read trails the machine by a minute and halved the speed of a
run started right after a busy minute.
The CPU heap keeps the blocks a step frees for the next step (`cpu_heap`): glibc's malloc otherwise
hands every block above 32 MiB back to the kernel at free, and the next step's copy of it is faulted
in again page by page.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():  # torch would assert deep inside the first copy
        raise ValueError(f"device {setting!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); use cpu or auto")
    return device


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


def cache_dir() -> Path:
    """Where m3ae keeps what it measured about this machine: $M3AE_CACHE_DIR, else
    $XDG_CACHE_HOME/m3ae, else ~/.cache/m3ae."""
    if os.environ.get("M3AE_CACHE_DIR"):
        return Path(os.environ["M3AE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m3ae"


PROBE_FILE = "precision_probe.json"
PROBED = f"(once for this CPU and torch: {PROBE_FILE} in the user's cache)"


def machine_key() -> str:
    """What decides a precision probe's result: the CPU (model and flags), torch's version and the
    kernels it dispatches (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower them). The same key
    gives the same answer, so it is measured once per key."""
    import hashlib
    import platform

    model = ""
    with contextlib.suppress(OSError):
        model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    parts = [model or platform.processor(), " ".join(sorted(_cpu_flags())), torch.__version__,
             torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", "")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _probe_lock(directory: Path):
    """One process at a time reads, measures and writes the probe file: the ranks of a run started
    together on a fresh machine wait for the first one's measurement instead of each taking its own
    (and possibly deciding differently)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{PROBE_FILE}.lock", "a") as lock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; at worst two first runs both measure
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _probe(name: PrecisionName) -> float:
    """Matmul rate of `name` over fp32, with margins against a busy moment: one thread (the ratio
    is a property of a core's kernels, and a team of threads on a shared machine waits for its
    slowest), fp32 and `name` timed in alternation (a burst of load hits both), the median of
    three ratios."""
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratios = sorted(matmul_rate(cpu, name, 512, 3) / matmul_rate(cpu, "fp32", 512, 3) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return ratios[1]


@functools.cache
def measured_speedup(name: PrecisionName) -> float:
    """Matmul rate of `name` over fp32 on this CPU: measured once per machine (`machine_key`) and
    kept in the user's cache directory, so that the same CPU and torch decide the same way in every
    run; measured once per process where that directory cannot be written."""
    path = cache_dir() / PROBE_FILE
    key = machine_key()
    try:
        with _probe_lock(path.parent):
            probes = _read_probes(path)
            entry = probes[key] if isinstance(probes.get(key), dict) else {}
            if not isinstance(entry.get(name), (int, float)):
                probes[key] = {**entry, name: round(_probe(name), 3),
                               "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                from ..utils import atomic_path

                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps(probes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            return float(probes[key][name])
    except OSError:  # a read-only or missing home: this process measures for itself
        return _probe(name)


def _read_probes(path: Path) -> dict:
    """The probe file, or nothing when it is missing or not JSON (it is measured again)."""
    try:
        probes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return probes if isinstance(probes, dict) else {}


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
    speedup = measured_speedup("bf16")
    if speedup >= MIN_SPEEDUP:
        return "bf16", f"auto: the CPU has {native}; bf16 matmul measured {speedup:.2f}× fp32 {PROBED}"
    return "fp32", (f"auto: the CPU has {native} but bf16 matmul measured only {speedup:.2f}× fp32 {PROBED} "
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
        speedup = measured_speedup(setting)
        if speedup < 1:
            where = "this CPU"
            if setting == "bf16":
                where += f" ({cpu_bf16_support() or 'no AMX or AVX-512 BF16: emulated'})"
            warnings.warn(f"precision {setting} on {where}: its matmuls measured {1 / speedup:.1f}× slower than "
                          f"fp32 here; precision auto would take fp32", stacklevel=2)
    return Precision(setting, device, "requested")


# ----------------------------------------------------------------------------------------- CPU heap
# The user's own allocator settings, which cpu_heap leaves alone.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# mallopt takes a C int: blocks up to 2 GiB come from the heap and stay there when freed.
HEAP_KEEP_BYTES = 2**31 - 1


@functools.cache
def cpu_heap() -> str:
    """Makes glibc's malloc keep freed blocks for reuse, once per process, and says what it did.

    glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and
    unmaps it at free; the heap's free top above 128 KiB is returned to the kernel too. A training
    step frees and reallocates the same large tensors every step (a 30,522-row text head and its
    autocast copy, (B, heads, S, S) attention maps), so each step faulted them in again, page by page,
    zeroed by the kernel: 3.0-3.4 million page faults in 7 steps of the small model at 224 px, against
    0.66 million kept; its step ran a median 1.11x (fp32) and 1.08x (bf16) slower over 6 alternated pairs
    (docs/BENCHMARKS.md, "CPU heap"). Raising both thresholds keeps those blocks in the heap, as a
    caching allocator does on a GPU; the peak resident memory grew 1.6-4.7 %.
    Left alone where the user set malloc's tunables or preloads another allocator, off glibc, and with
    `M3AE_CPU_HEAP=system` (glibc's own behaviour, dynamic thresholds included; setting any one
    tunable turns those off)."""
    import ctypes
    import platform

    setting = os.environ.get("M3AE_CPU_HEAP", "keep")
    if setting not in ("keep", "system"):
        raise ValueError(f"M3AE_CPU_HEAP={setting!r}: choose keep (the default) or system")
    if setting == "system":
        return "glibc's defaults (M3AE_CPU_HEAP=system)"
    chosen = [name for name in MALLOC_ENV if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    chosen += [name for name in PRELOADED_ALLOCATORS if name in os.environ.get("LD_PRELOAD", "")]
    if chosen:
        return f"as the user set it ({', '.join(chosen)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the platform's malloc (not glibc)"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not (mallopt(m_mmap_threshold, HEAP_KEEP_BYTES) and mallopt(m_trim_threshold, HEAP_KEEP_BYTES)):
        return "glibc's defaults (mallopt refused the thresholds)"
    return "glibc heap keeps freed blocks up to 2 GiB (mmap and trim thresholds)"


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


def auto_threads(cores: int, processes: int = 1) -> tuple[int, str]:
    """The rule: this process's share of the physical cores (`processes` of this run share the node),
    at least 1."""
    threads = max(cores // max(processes, 1), 1)
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return threads, f"auto: {cores} physical cores{shared}"


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str

    def describe(self) -> str:
        return f"{self.count} CPU thread{'s' if self.count > 1 else ''} ({self.reason})"


@functools.cache
def _auto_threads() -> Threads:
    """Decided once per process. OMP_NUM_THREADS, when the user set it, wins."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return Threads(int(omp), "auto: OMP_NUM_THREADS")
    return Threads(*auto_threads(physical_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def apply_threads(setting: ThreadsSetting) -> Threads:
    """Sets torch's intra-op (and, where torch still allows it, inter-op) threads, and the CPU heap
    (`cpu_heap`): call it first, before anything is timed or computed."""
    cpu_heap()
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
            "threads_reason": threads.reason, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
            "cpu_heap": cpu_heap(),
            "device": str(precision.device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "machine_key": machine_key(),
            "world_size": len(processes), "hosts": sorted({str(p["host"]) for p in processes}),
            "processes": processes}
    path = Path(run_dir) / RUN_INFO
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
