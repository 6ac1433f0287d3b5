"""Runs under a scheduler and on shared disks: SIGTERM to the process group, a second signal, resume,\nrun-directory locks, a full disk, metrics after a kill, file modes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import m3ae.engine.run_dir
import m3ae.model.files
import m3ae.utils
from m3ae import M3AE
from m3ae.cli import main
from m3ae.data.synth import SynthSpec, generate
from m3ae.model import M3AEConfig
from m3ae.engine.checkpoint import CheckpointManager
from m3ae.engine.distributed import DistInfo
from m3ae.engine.metrics import LogConfig, read_metrics
from m3ae.train.pretrain import CheckpointConfig, PretrainConfig, TrainConfig, run_pretraining
from m3ae.train.synthetic import ListLoader, synthetic_batch
from m3ae.utils import DiskFullError

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
            # one thread in every run: the spawned run and the in-process ones must split GEMMs alike
            # (threads auto takes every core, and fp32 sums can round differently over 1 or 2 threads)
            "--train.threads", "1",
            "--checkpoint.every", "100000", "--log.every", "1", "--log.progress", "false",
            "--log.figures_every", "0", "--log.tensorboard", "false", *SMALL_MODEL]


@contextlib.contextmanager
def spawned(args: list[str]) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # start_new_session: the run leads its own process group, as under `setsid`
    proc = subprocess.Popen([sys.executable, "-m", "m3ae.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # a failed assertion must not leave a 100,000-step run behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


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
    with spawned(pretrain_args(data, run, workers)) as proc:
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
        "from m3ae.engine.run_dir import StopSignal\n"
        "with StopSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop.received == signal.SIGTERM\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # an echo (torchrun forwards the group's signal)\n"
        "    print('echo ignored', flush=True)\n"
        "    stop.echo_s = 0.0\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout == "first signal noted\necho ignored\n"
    assert done.returncode == -signal.SIGTERM


def test_a_second_run_on_the_same_out_dir_fails_at_once_naming_the_holder(data, tmp_path, capsys):
    run = tmp_path / "run"
    with spawned(pretrain_args(data, run, 0)) as proc:
        try:
            wait_for_steps(run, proc, 2)
            assert main(pretrain_args(data, run, 0)) == 2  # a user error, like every other command's
            err = capsys.readouterr().err
            assert f"{run} is in use by another run (pid {proc.pid} on host {socket.gethostname()})" in err
            assert len(err.strip().splitlines()) == 1
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=120)
    assert proc.returncode == 0
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaving


def tiny_run(out: Path, steps: int, **checkpoint) -> PretrainConfig:
    model = M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
                       image_size=32, patch_size=8, text_length=8, vocab_size=100)
    return PretrainConfig(model=model, train=TrainConfig(batch_size=4, total_steps=steps),
                          log=LogConfig(every=1, figures_every=0, progress=False, tensorboard=False),
                          checkpoint=CheckpointConfig(**{"every": 1000, **checkpoint}), out_dir=str(out))


def batches(cfg: PretrainConfig, count: int = 4) -> ListLoader:
    return ListLoader([synthetic_batch(cfg.model, 4, seed=i) for i in range(count)])


def test_a_full_disk_is_a_clear_error_that_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path, steps=4, every=2)
    cfg.train.max_steps = 2
    run_pretraining(cfg, loader=batches(cfg))
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name == "train_state.pt":
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle

    monkeypatch.setattr(m3ae.utils, "open", full_disk_open, raising=False)
    cfg.train.max_steps = None
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*step_00000004/train_state\.pt"):
        run_pretraining(cfg, loader=batches(cfg), resume="auto")
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no temporary left behind
    manager = CheckpointManager(tmp_path, keep=3, info=DistInfo(0, 1, 0, torch.device("cpu")))
    assert manager.newest_verified().name == "step_00000002"
    monkeypatch.undo()
    assert run_pretraining(cfg, loader=batches(cfg), resume="auto").step == 4


def test_resume_checks_space_before_writing_anything(tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path, steps=4)
    cfg.train.max_steps = 2
    run_pretraining(cfg, loader=batches(cfg))
    (tmp_path / "checkpoints" / ".tmp_step_00000003").mkdir()  # left by a run killed while saving
    config_yaml = (tmp_path / "config.yaml").stat().st_mtime_ns
    needed = sum(p.stat().st_size for p in (tmp_path / "checkpoints" / "step_00000002").iterdir())
    monkeypatch.setattr(m3ae.engine.run_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, needed - 1))
    cfg.train.max_steps = None
    with pytest.raises(DiskFullError, match="no space left on device for .*MiB free"):
        run_pretraining(cfg, loader=batches(cfg), resume="auto")
    assert (tmp_path / "config.yaml").stat().st_mtime_ns == config_yaml
    assert not (tmp_path / "checkpoints" / ".tmp_step_00000003").exists()


def test_metrics_have_no_duplicate_steps_after_a_kill_before_the_first_checkpoint(tmp_path):
    cfg = tiny_run(tmp_path, steps=5)

    class DiesAtFourthBatch(ListLoader):  # stands for kill -9: no checkpoint, no clean-up
        def __iter__(self):
            for index, batch in enumerate(super().__iter__()):
                if index == 3:
                    raise KeyboardInterrupt
                yield batch

    with pytest.raises(KeyboardInterrupt):
        run_pretraining(cfg, loader=DiesAtFourthBatch(batches(cfg).batches))
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert not (tmp_path / "checkpoints").exists()
    assert run_pretraining(cfg, loader=batches(cfg), resume="auto").step == 5
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_are_written_with_the_users_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        cfg = tiny_run(tmp_path, steps=1)
        run_pretraining(cfg, loader=batches(cfg))
        M3AE(cfg.model).save_pretrained(tmp_path / "exported")
    finally:
        os.umask(previous)
    written = [tmp_path / "config.yaml", tmp_path / "metrics.jsonl", tmp_path / "exported" / "model.safetensors",
               tmp_path / "exported" / "config.json",
               *(p for p in (tmp_path / "checkpoints" / "step_00000001").rglob("*") if p.is_file())]  # shards too
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written} == {
        str(p.relative_to(tmp_path)): oct(mode) for p in written}


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, where the machine lets the tests mount one (root in a container); else skipped,
    the patched-writer test above covering the same path."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk_is_a_clear_error(small_disk):
    cfg = tiny_run(small_disk / "run", steps=4, every=2)

    class FillsTheDiskAfterTheFirstCheckpoint(ListLoader):
        def __iter__(self):
            for index, batch in enumerate(super().__iter__()):
                if index == 2:  # step 2's checkpoint is written: leave 16 KiB, less than a checkpoint
                    stat = os.statvfs(small_disk)
                    (small_disk / "filler").write_bytes(bytes(stat.f_bavail * stat.f_frsize - 16384))
                yield batch

    with pytest.raises(DiskFullError, match="no space left on device while writing .*tmp_step_00000004"):
        run_pretraining(cfg, loader=FillsTheDiskAfterTheFirstCheckpoint(batches(cfg).batches))
    assert sorted(p.name for p in (small_disk / "run" / "checkpoints").iterdir()) == ["step_00000002"]
    manager = CheckpointManager(small_disk / "run", keep=3, info=DistInfo(0, 1, 0, torch.device("cpu")))
    assert manager.newest_verified().name == "step_00000002"
    with pytest.raises(DiskFullError, match="MiB free, a checkpoint of this run needs"):
        run_pretraining(cfg, loader=batches(cfg), resume="auto")  # refused before writing anything
    (small_disk / "filler").unlink()
    assert run_pretraining(cfg, loader=batches(cfg), resume="auto").step == 4


def test_sigterm_to_a_torchrun_group_checkpoints_every_rank(data, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # each rank gets the group's SIGTERM and the one torchrun's agent forwards; they mostly merge
    # (a pending signal is not queued twice), and StopSignal.echo_s covers the times they do not
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "m3ae.cli", *pretrain_args(data, run, 0), "--train.device", "cpu"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "run interrupted; continue with --resume auto" in out, err  # torchrun's own exit status is its own
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith("rank_")) == ["rank_0.pt", "rank_1.pt"]
    CheckpointManager(run, keep=3, info=DistInfo(0, 1, 0, torch.device("cpu"))).verify(checkpoint)


def test_a_fresh_run_refuses_a_directory_holding_another_run_and_overwrite_moves_it_aside(tmp_path, capsys):
    cfg = tiny_run(tmp_path / "run", steps=3, every=1)
    run_pretraining(cfg, loader=batches(cfg))
    first_metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    first_weights = weights(tmp_path / "run" / "checkpoints" / "step_00000003")
    for again in (tiny_run(tmp_path / "run", steps=2), tiny_run(tmp_path / "run", steps=5)):
        with pytest.raises(m3ae.engine.run_dir.RunDirExists, match="holds another run.*--resume auto"):
            run_pretraining(again, loader=batches(again))
    # nothing of the first run changed
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first_metrics
    assert [p.name for p in m3ae.model.files.step_dirs(tmp_path / "run")] == [f"step_0000000{i}" for i in (3, 2, 1)]
    # the CLI: one line, exit 2
    args = ["pretrain", "--out-dir", str(tmp_path / "run"), "--train.total-steps", "2", *SMALL_MODEL]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another run (checkpoints up to step_00000003)" in err
    # --overwrite moves the old run aside, whole, and starts afresh
    again = tiny_run(tmp_path / "run", steps=2)
    again.overwrite = True
    assert run_pretraining(again, loader=batches(again)).step == 2
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == first_metrics
    assert all(torch.equal(v, first_weights[k]) for k, v in weights(aside[0] / "checkpoints" / "step_00000003").items())
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_the_lock_is_taken_before_the_model_and_loader_are_built(tmp_path):
    with m3ae.engine.run_dir.run_dir_lock(tmp_path / "run"):
        # a second process holds it: the lock is per process, so take it from a child
        code = ("import sys; from m3ae.train.pretrain import *; from m3ae.engine.metrics import LogConfig\n"
                "from m3ae.model import M3AEConfig\n"
                "import m3ae.train.pretrain as p\n"
                "p.M3AE = lambda *a, **k: sys.exit('model built before the lock')\n"
                f"cfg = PretrainConfig(model=M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=32, dec_depth=1,"
                f" dec_num_heads=2, image_size=32, patch_size=8, text_length=8, vocab_size=100),"
                f" log=LogConfig(progress=False, figures_every=0), out_dir={str(tmp_path / 'run')!r})\n"
                "try:\n    Pretrainer(cfg, loader=[])\nexcept OSError as e:\n    print(type(e).__name__)\n")
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                              capture_output=True, text=True, timeout=120)
    # the child's model constructor exits with a message: RunDirBusy came first
    assert done.stdout.strip() == "RunDirBusy", done.stderr


def test_a_sigterm_during_teardown_after_the_last_checkpoint_still_exits_cleanly(tmp_path):
    import m3ae.train.pretrain

    cfg = tiny_run(tmp_path / "run", steps=2)
    real_teardown = m3ae.train.pretrain.Pretrainer.teardown

    def teardown(self):
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the scheduler's signal arriving as the run ends
        real_teardown(self)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        m3ae.train.pretrain.Pretrainer.teardown = teardown
        result = run_pretraining(cfg, loader=batches(cfg))
    finally:
        m3ae.train.pretrain.Pretrainer.teardown = real_teardown
    assert result.step == 2 and not result.interrupted
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored once the run is over


def test_a_full_disk_while_writing_metrics_names_the_file(tmp_path):
    from m3ae.engine.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LogConfig(tensorboard=False), True, {}, None)

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    logger._file = FullDisk()
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*metrics\.jsonl"):
        logger.log(1, {"loss": 1.0})
