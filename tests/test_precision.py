"""Precision and threads that fit the machine (engine/runtime.py): `auto` decisions with the CPU's
capability mocked both ways, warnings for forced slow modes, the MFU denominator, threads applied."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch

from m3ae import config as config_io
from m3ae.cli import main as m3ae_main
from m3ae.engine import flops, runtime as precision
from m3ae.train.bench import BenchConfig, run_bench
from m3ae.engine.metrics import read_metrics
from m3ae.train.pretrain import PretrainConfig, run_pretraining
from m3ae.train.synthetic import ListLoader

from test_train_loop import global_batches, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Every test decides again, and leaves torch's thread count as it found it."""
    threads = torch.get_num_threads()
    for cached in (precision._auto, precision.measured_speedup, precision._auto_threads):
        cached.cache_clear()
    yield
    for cached in (precision._auto, precision.measured_speedup, precision._auto_threads):
        cached.cache_clear()
    torch.set_num_threads(threads)


def mock_cpu(monkeypatch, native: str | None, speedup: float) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: native)
    monkeypatch.setattr(precision, "measured_speedup", lambda name: speedup)


# ---------------------------------------------------------------------------------------- precision
def test_auto_takes_fp32_on_a_cpu_without_native_bf16_even_if_a_probe_said_faster(monkeypatch):
    mock_cpu(monkeypatch, None, 3.0)
    chosen = precision.resolve_precision("auto", CPU)
    assert chosen.name == "fp32" and "no AMX or AVX-512 BF16" in chosen.reason
    assert chosen.autocast().__class__.__name__ == "nullcontext"


@pytest.mark.parametrize("native", ["AMX", "AVX-512 BF16"])
def test_auto_takes_bf16_on_a_cpu_with_native_bf16_that_measures_faster(monkeypatch, native):
    mock_cpu(monkeypatch, native, 2.5)
    chosen = precision.resolve_precision("auto", CPU)
    assert (chosen.name, chosen.dtype) == ("bf16", torch.bfloat16)
    assert native in chosen.reason and "2.50×" in chosen.reason
    with chosen.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.bfloat16


def test_auto_takes_fp32_where_native_bf16_measures_slower(monkeypatch):
    """This machine's case: AVX-512 BF16 without AMX, bf16 matmuls at about half the fp32 rate."""
    mock_cpu(monkeypatch, "AVX-512 BF16", 0.5)
    chosen = precision.resolve_precision("auto", CPU)
    assert chosen.name == "fp32" and "0.50× fp32" in chosen.reason


def test_forced_bf16_on_a_cpu_without_native_support_warns_with_the_measured_slowdown(monkeypatch):
    mock_cpu(monkeypatch, None, 0.25)
    with pytest.warns(UserWarning, match=r"bf16 on this CPU \(no AMX or AVX-512 BF16: emulated\).*4\.0× slower"):
        chosen = precision.resolve_precision("bf16", CPU)
    assert (chosen.name, chosen.reason) == ("bf16", "requested")


def test_forced_modes_are_kept_and_a_fast_bf16_cpu_does_not_warn(monkeypatch):
    mock_cpu(monkeypatch, "AMX", 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_precision("bf16", CPU).name == "bf16"
        assert precision.resolve_precision("fp32", CPU).name == "fp32"
    assert precision.resolve_precision("fp16", CPU).grad_scaler() is not None
    with pytest.raises(ValueError, match="precision='fp8'"):
        precision.resolve_precision("fp8", CPU)


def rates_in_turn(monkeypatch, bf16_over_fp32: list[float]) -> list[str]:
    """matmul_rate mocked: fp32 at 1, bf16 at the next of `bf16_over_fp32` per call; the calls made."""
    calls, ratios = [], iter(bf16_over_fp32)
    monkeypatch.setattr(precision, "matmul_rate",
                        lambda device, name, size, repeats: calls.append(name) or (next(ratios) if name == "bf16" else 1.0))
    return calls


def test_the_probe_takes_the_median_of_alternating_timings(monkeypatch):
    calls = rates_in_turn(monkeypatch, [3.0, 20.0, 4.0])  # one burst of load on fp32 says 20x
    assert precision._probe("bf16") == 4.0 and calls == ["bf16", "fp32"] * 3


def test_the_precision_decision_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("M3AE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the test sets it below: start without (CI's AVX2 pass sets it)
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "AVX-512 BF16")
    calls = rates_in_turn(monkeypatch, [4.0] * 3 + [0.5] * 6)
    first = precision.resolve_precision("auto", CPU)
    assert first.name == "bf16" and "4.00× fp32 (once for this CPU and torch" in first.reason
    kept = json.loads((tmp_path / "cache" / precision.PROBE_FILE).read_text())
    assert kept[precision.machine_key()]["bf16"] == 4.0
    # a new process (the caches cleared) on a busy machine, where the probe would now say 0.5x: same answer
    for cached in (precision._auto, precision.measured_speedup):
        cached.cache_clear()
    assert precision.resolve_precision("auto", CPU).name == "bf16" and len(calls) == 6
    # other kernels (here oneDNN limited to AVX2) are another machine: measured again
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    for cached in (precision._auto, precision.measured_speedup):
        cached.cache_clear()
    assert precision.resolve_precision("auto", CPU).name == "fp32" and len(calls) == 12
    kept = json.loads((tmp_path / "cache" / precision.PROBE_FILE).read_text())
    assert sorted(entry["bf16"] for entry in kept.values()) == [0.5, 4.0]


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"KEY": {"bf16": "fast"}}', '{"KEY": 3}'])
def test_a_damaged_probe_file_is_measured_again_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("M3AE_CACHE_DIR", str(tmp_path))
    (tmp_path / precision.PROBE_FILE).write_text(damage.replace("KEY", precision.machine_key()))
    rates_in_turn(monkeypatch, [2.0] * 3)
    assert precision.measured_speedup("bf16") == 2.0
    assert json.loads((tmp_path / precision.PROBE_FILE).read_text())[precision.machine_key()]["bf16"] == 2.0


def test_an_unwritable_cache_measures_in_the_process(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("M3AE_CACHE_DIR", str(tmp_path / "file" / "m3ae"))  # a directory under a file
    calls = rates_in_turn(monkeypatch, [2.0] * 3)
    assert precision.measured_speedup("bf16") == 2.0 and len(calls) == 6


def test_processes_started_together_take_the_first_one_s_measurement(tmp_path):
    """The ranks of a run on a fresh machine: without the lock each would measure its own (here: its
    own pid) and they could decide differently."""
    script = (
        "import os, time\n"
        "from m3ae.engine import runtime\n"
        "def probe(name):\n"
        "    time.sleep(0.5)\n"
        "    return float(os.getpid())\n"
        "runtime._probe = probe\n"
        "print(runtime.measured_speedup('bf16'))\n"
    )
    env = {**os.environ, "M3AE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    answers = {float(p.communicate(timeout=120)[0]) for p in procs}
    assert len(answers) == 1 and answers.pop() in {float(p.pid) for p in procs}


@pytest.mark.parametrize("capability, name", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_device_s_native_bf16(monkeypatch, capability, name):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU-X")
    chosen = precision.resolve_precision("auto", torch.device("cuda"))
    assert chosen.name == name and "GPU-X" in chosen.reason


@pytest.mark.parametrize("capability, flags, expected", [
    ("AVX2", {"avx512_bf16", "amx_bf16"}, None),  # torch dispatches AVX2 kernels: bf16 is emulated
    ("AVX512", {"avx512f"}, None),
    ("AVX512", {"avx512f", "avx512_bf16"}, "AVX-512 BF16"),
    ("AVX512", {"avx512_bf16", "amx_tile", "amx_bf16"}, "AMX"),
])
def test_cpu_support_from_torch_capability_and_cpu_flags(monkeypatch, capability, flags, expected):
    monkeypatch.delattr(torch._C._cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert precision.cpu_bf16_support() == expected


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "AMX"), (False, True, "AVX-512 BF16"),
                                                        (False, False, None)])
def test_cpu_support_as_torch_reports_it_when_it_can(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch._C._cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert precision.cpu_bf16_support() == expected


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ATEN_CPU_CAPABILITY=avx2 is x86")
def test_an_avx2_cpu_really_gets_fp32_and_a_bf16_peak_no_lower_than_fp32(tmp_path):
    """torch and oneDNN limited to AVX2 (the common laptop): bf16 is emulated there, and the old MFU
    denominator (a bf16 matmul at 1/20 of the fp32 rate) gave a 526 % MFU."""
    script = (
        "import json, torch\n"
        "from m3ae.engine import flops, runtime as precision\n"
        "cpu = torch.device('cpu')\n"
        "p = precision.resolve_precision('auto', cpu)\n"
        "print(json.dumps({'name': p.name, 'reason': p.reason,\n"
        "    'bf16': precision.matmul_rate(cpu, 'bf16', 256, 2), 'fp32': precision.matmul_rate(cpu, 'fp32', 256, 2),\n"
        "    'peak': flops.measure_peak_flops(cpu, 'bf16', sizes=(256,), repeats=2)}))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = json.loads(subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                                    text=True).stdout)
    assert out["name"] == "fp32" and "AVX2" in out["reason"]
    assert out["bf16"] < out["fp32"]  # emulated
    # the peak is the fp32 floor, not the emulated bf16 rate (10-20x lower here): a wide margin, since
    # two timings taken apart differ by load
    assert out["peak"] > 2 * out["bf16"]


# ---------------------------------------------------------------------------------------------- MFU
def test_peak_is_the_precision_s_autocast_rate_floored_by_fp32(monkeypatch):
    rates = {"fp32": 100.0, "bf16": 5.0, "fp16": 400.0}
    monkeypatch.setattr(flops, "matmul_rate", lambda device, name, size, repeats: rates[name] * size)
    assert flops.measure_peak_flops(CPU, "bf16", sizes=(1, 2)) == 200.0  # emulated bf16: fp32's rate
    assert flops.measure_peak_flops(CPU, "fp16", sizes=(1, 2)) == 800.0  # native: its own rate
    assert flops.measure_peak_flops(CPU, "fp32", sizes=(1,)) == 100.0


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_bench_and_pretraining_mfu_stay_at_most_one(tmp_path, name):
    result = run_bench(BenchConfig(preset="tiny", batch_size=2, image_size=32, text_length=16, vocab_size=100,
                                   precision=name, steps=1, warmup=1, threads=1))
    assert result["precision"] == name and 0 < result["mfu"] <= 1
    cfg = tiny_config(tmp_path, steps=2, precision=name, threads=1)
    run_pretraining(cfg, loader=ListLoader(global_batches(cfg.model, 1, 8)))
    assert all(0 < m["mfu"] <= 1 for m in read_metrics(tmp_path / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("cores, processes, expected", [(2, 1, 2), (8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 4, 1), (1, 1, 1)])
def test_auto_threads_is_the_process_s_share_of_the_cores(cores, processes, expected):
    count, reason = precision.auto_threads(cores, processes)
    assert count == expected and f"{cores} physical cores" in reason
    assert (f"shared by {processes} processes" in reason) == (processes > 1)


def test_apply_threads_sets_torch_and_auto_ignores_the_load_average(monkeypatch):
    """The load average trails the machine by a minute: right after a busy minute it read 1.5 on two
    free cores, and the old rule took 1 thread (half the speed)."""
    assert precision.apply_threads(1).count == 1 and torch.get_num_threads() == 1
    assert precision.apply_threads(2).reason == "requested" and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(precision, "physical_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    chosen = precision.apply_threads("auto")
    assert (chosen.count, torch.get_num_threads()) == (2, 2) and chosen.reason == "auto: 2 physical cores"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert precision.apply_threads("auto").count == 2  # decided once per process
    precision._auto_threads.cache_clear()
    assert precision.apply_threads("auto") == precision.Threads(1, "auto: 2 physical cores shared by 2 processes")
    precision._auto_threads.cache_clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert precision.apply_threads("auto") == precision.Threads(2, "auto: OMP_NUM_THREADS")
    for bad in (0, "two", True):
        with pytest.raises(ValueError, match="threads="):
            precision.apply_threads(bad)


@pytest.mark.parametrize("preset, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                              ({"GOMP_SPINCOUNT": "10000"}, None)])
def test_the_command_line_makes_idle_openmp_threads_sleep_before_torch_starts_them(preset, expected):
    """libgomp reads OMP_WAIT_POLICY once, as torch loads it: `m3ae` sets it before any import of
    torch (checked with libgomp's own report of its settings), and a user's choice is kept."""
    script = ("import os, sys\nimport m3ae.cli\nassert 'torch' not in sys.modules\n"
              "print(os.environ.get('OMP_WAIT_POLICY'))\nimport torch\ntorch.ones(2).sum()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", script], env={**env, **preset, "OMP_DISPLAY_ENV": "TRUE"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(expected)
    if expected:
        assert f"OMP_WAIT_POLICY = '{expected}'" in done.stderr


# Allocates, fills and frees a 64 MiB tensor (a small tensor allocated after it each time, as a step
# does) until the heap settles, then prints the cpu_heap decision and the page faults of 8 more rounds.
HEAP_SCRIPT = """
import resource, torch
from m3ae.engine.runtime import apply_threads, cpu_heap
apply_threads(1)
print(cpu_heap())
def rounds(n):
    for _ in range(n):
        big = torch.empty(16 << 20).fill_(1.0)
        small = torch.empty(1000)
        del big
rounds(16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_the_cpu_heap_keeps_a_freed_large_tensor_instead_of_faulting_it_in_every_time():
    """glibc unmaps (or trims) a freed 64 MiB block and faults it in again at its next allocation:
    16,384 pages of 4 KiB every round. With the heap policy, once the heap has settled, the rounds
    reuse freed blocks. A malloc tunable the user set (here glibc's own default top pad) keeps glibc's
    behaviour, and so does M3AE_CPU_HEAP=system."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*precision.MALLOC_ENV, "GLIBC_TUNABLES", "LD_PRELOAD", "M3AE_CPU_HEAP")}

    def faults(extra: dict[str, str]) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], env={**env, **extra}, capture_output=True,
                             text=True, check=True).stdout.split("\n")
        return out[0], int(out[1])

    kept, kept_faults = faults({})
    user, user_faults = faults({"MALLOC_TOP_PAD_": "131072"})
    system, system_faults = faults({"M3AE_CPU_HEAP": "system"})
    assert kept.startswith("glibc heap keeps freed blocks") and user == "as the user set it (MALLOC_TOP_PAD_)"
    assert system == "glibc's defaults (M3AE_CPU_HEAP=system)"
    assert min(user_faults, system_faults) > 8 * 16_000  # every allocation faulted in afresh
    assert kept_faults < 1_000  # reused: no block is faulted in again


def test_threads_flags_and_config_fields(capsys):
    assert m3ae_main(["knn", "--checkpoint", "x", "--threads", "none"]) == 2
    assert "m3ae knn: config error: threads='none'" in capsys.readouterr().err
    cfg = config_io.load(PretrainConfig, None, {"train.threads": 1, "train.precision": "bf16"})
    assert (cfg.train.threads, cfg.train.precision) == (1, "bf16")
    with pytest.raises(config_io.ConfigError, match="train.threads"):
        config_io.load(PretrainConfig, None, {"train.threads": "many"})
    assert (PretrainConfig().train.precision, PretrainConfig().train.threads) == ("auto", "auto")


def test_pretraining_applies_threads_prints_and_records_the_resolved_choices(tmp_path, monkeypatch, capsys):
    mock_cpu(monkeypatch, None, 3.0)
    cfg = tiny_config(tmp_path, steps=1, threads=1, precision="auto")
    run_pretraining(cfg, loader=ListLoader(global_batches(cfg.model, 1, 8)))
    assert torch.get_num_threads() == 1
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["precision"], info["threads"], info["threads_reason"]) == ("fp32", 1, "requested")
    assert "no AMX or AVX-512 BF16" in info["precision_reason"]
    assert info["machine_key"] == precision.machine_key()  # the key of the probe that decided
    assert info["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "(libgomp default)")
    assert info["cpu_heap"] == precision.cpu_heap()
    assert "precision fp32 (auto: " in capsys.readouterr().out
    saved = config_io.load(PretrainConfig, tmp_path / "config.yaml")
    assert (saved.train.precision, saved.train.threads) == ("auto", 1)  # the setting, not the decision


def test_feature_and_probe_commands_default_to_auto_and_say_what_they_chose(setup, tmp_path, monkeypatch, capsys):
    mock_cpu(monkeypatch, None, 3.0)
    root, data = setup
    split = ["--data.source", f"{data}/train-*.tar", "--train-data", f"{data}/train-*.tar", "--val-data", f"{data}/val-*.tar"]
    assert m3ae_main(["knn", "--checkpoint", str(root / "model"), *split, "--k", "5", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "1 CPU thread (requested)" in err and "precision fp32 (auto: " in err
    assert torch.get_num_threads() == 1
    assert m3ae_main(["linear-probe", "--checkpoint", str(root / "model"), "--data.source", f"{data}/train-*.tar",
                      "--data.eval_train_source", f"{data}/train-*.tar", "--data.eval_val_source",
                      f"{data}/val-*.tar", "--data.num_workers", "0", "--cached", "true", "--epochs", "1",
                      "--batch_size", "16", "--log.progress", "false", "--threads", "1",
                      "--out_dir", str(tmp_path / "lp")]) == 0
    info = json.loads((tmp_path / "lp" / "run_info.json").read_text())
    assert (info["precision"], info["threads"]) == ("fp32", 1) and info["precision_reason"].startswith("auto: ")
