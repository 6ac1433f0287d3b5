"""Runs under a scheduler: SIGTERM to the whole process group, a second signal, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3ae.cli import main
from m3ae.data.synth import SynthSpec, generate
from m3ae.train.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL_MODEL = ["--model.emb_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--model.dec_emb_dim", "32",
               "--model.dec_depth", "1", "--model.dec_num_heads", "2", "--model.image_size", "32",
               "--model.patch_size", "8", "--model.text_length", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("data") / "synth", SynthSpec(seed=0, train=32, val=8, image_size=32, shard_size=8))
    return f"{root}/train-*.tar"


def pretrain_args(data: str, run: Path, workers: int) -> list[str]:
    return ["pretrain", "--out-dir", str(run), "--data.source", data, "--data.num_workers", str(workers),
            "--train.batch_size", "4", "--train.total_steps", "100000", "--train.deterministic", "true",
            "--checkpoint.every", "100000", "--log.every", "1", "--log.progress", "false",
            "--log.figures_every", "0", "--log.tensorboard", "false", *SMALL_MODEL]


def spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # start_new_session: the run leads its own process group, as under `setsid`
    return subprocess.Popen([sys.executable, "-m", "m3ae.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run / "metrics.jsonl")) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start training in time"
        time.sleep(0.05)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_to_the_process_group_checkpoints_exits_0_and_resumes_bit_exactly(data, tmp_path, workers):
    run = tmp_path / "run"
    proc = spawn(pretrain_args(data, run, workers))
    wait_for_steps(run, proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # what Slurm does: every process of the job, workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted; continue with --resume auto" in out
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("step_")
    stopped = int(saved[0].name.removeprefix("step_"))
    assert stopped >= 3

    assert main([*pretrain_args(data, run, workers), "--resume", "auto", "--max-steps", str(stopped + 2)]) == 0
    straight = tmp_path / "straight"
    assert main([*pretrain_args(data, straight, workers), "--max-steps", str(stopped + 2)]) == 0
    final = f"step_{stopped + 2:08d}"
    a, b = weights(run / "checkpoints" / final), weights(straight / "checkpoints" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, stopped + 3))
    assert ([m["loss"] for m in read_metrics(run / "metrics.jsonl")]
            == [m["loss"] for m in read_metrics(straight / "metrics.jsonl")])


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from m3ae.train.pretrain import _StopSignal\n"
        "with _StopSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop.received == signal.SIGTERM\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout == "first signal noted\n"
    assert done.returncode == -signal.SIGTERM
