"""scripts/slurm_pretrain.sbatch run as Slurm would run it, on this machine: a fake `srun` starts the
step once per node, a fake `scontrol` names the nodes and records requeues; 2 nodes x 1 CPU process
(gloo) train the same run, and USR1 (the --signal ahead of the time limit) checkpoints and requeues."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3ae.data.synth import SynthSpec, generate
from m3ae.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_pretrain.sbatch"

FAKE_SRUN = """#!/bin/bash
# one task per node of the job, all on this machine; SIGTERM reaches every task, like srun's
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do wait "$pid"; s=$?; kill -0 "$pid" 2>/dev/null || break; done
    [ "$s" -ne 0 ] && status=$s
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
    show) for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) exit 1 ;;
esac
"""
SMALL = ["--model.emb_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--model.dec_emb_dim", "32",
         "--model.dec_depth", "1", "--model.dec_num_heads", "2", "--model.image_size", "32", "--model.patch_size", "8",
         "--model.text_length", "8", "--train.device", "cpu", "--train.batch_size", "4", "--data.num_workers", "0",
         "--log.every", "1", "--log.progress", "false", "--log.figures_every", "0", "--log.tensorboard", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm(tmp_path):
    """(environment of a 2-node job, path of the requeue log) with the fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1", "M3AE_PYTHON": sys.executable, "MASTER_PORT": str(_free_port()),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "1", "FAKE_SLURM_LOG": str(log)}
    return env, log


@pytest.fixture
def shards(tmp_path):
    root = generate(tmp_path / "data", SynthSpec(seed=0, train=32, val=8, image_size=32, shard_size=8))
    return f"{root}/train-*.tar"


def _sbatch(env, *args, **popen):
    return subprocess.Popen(["bash", str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def test_the_sbatch_script_runs_one_torchrun_per_node_with_the_first_node_as_rendezvous(slurm, shards, tmp_path):
    env, log = slurm
    run = tmp_path / "run"
    # the length as a scale recipe gives it: epochs of a known number of samples (printed once, by rank 0)
    proc = _sbatch(env, "--out-dir", str(run), "--data.source", shards, "--train.epochs", "1.5",
                   "--train.samples-per-epoch", "8", *SMALL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in out
    assert out.count("schedule: 1.5 epochs x 8 samples / batch 4 = 3 steps") == 1, out
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    assert not log.exists()  # finished: nothing requeued


def test_usr1_before_the_time_limit_checkpoints_requeues_and_the_requeued_job_resumes(slurm, shards, tmp_path):
    env, log = slurm
    run = tmp_path / "run"
    args = ["--out-dir", str(run), "--data.source", shards, "--train.total-steps", "100000",
            "--checkpoint.every", "100000", *SMALL]
    proc = _sbatch(env, *args)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run / "metrics.jsonl")) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert log.read_text() == "requeue 4242\n"
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped = int(checkpoint.name.removeprefix("step_"))
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    # the requeued job: the same submission, SLURM_RESTART_COUNT set; it continues the run
    env = {**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(_free_port())}
    proc = _sbatch(env, *args, "--max-steps", str(stopped + 2))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "restart 1" in out, out
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, stopped + 3))
    assert log.read_text() == "requeue 4242\n"
