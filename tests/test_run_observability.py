"""What a run shows while it trains and keeps afterwards: plain progress lines in a log file (a Slurm
job's), the bar only on a terminal, the line saying a run resumed, every process in run_info.json,
TensorBoard's scalars / hparams / images, the same figure samples across resumes, and a probe's
curves in the run report."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae.cli import main
from m3ae.data.synth import SynthSpec, generate
from m3ae.engine.metrics import ProgressBar, Throughput, read_metrics
from m3ae.eval.features import save_features

SRC = Path(__file__).resolve().parents[1] / "src"
# the smallest model the pretrain command builds, so that each run takes seconds
SMALL = ["--model.emb_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--model.dec_emb_dim", "16",
         "--model.dec_depth", "1", "--model.dec_num_heads", "2", "--model.patch_size", "16"]
LINE = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  image_loss \S+  text_loss \S+  text_accuracy \S+  grad_norm \S+  lr \S+  "
                  r"(\S+) samples/s \((\S+) per process\)  data wait \d+%  .*ETA \d+:\d\d:\d\d$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("obs") / "data",
                    SynthSpec(seed=0, train=48, val=8, image_size=64, shard_size=24), processes=1, progress=False)


def _pretrain(run: Path, data: Path, *flags: str) -> subprocess.CompletedProcess:
    """`m3ae pretrain` as a batch job runs it: stdout and stderr are files, not a terminal."""
    args = [sys.executable, "-m", "m3ae.cli", "pretrain", "--out-dir", str(run), "--data.source",
            f"{data}/train-*.tar", "--data.num_workers", "0", "--train.batch_size", "8", "--train.precision", "fp32",
            "--train.threads", "1", "--log.tensorboard", "false", "--log.figures_every", "0", *SMALL, *flags]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_a_batch_job_log_gets_one_plain_line_per_log_step_and_says_when_it_resumed(data, tmp_path):
    run = tmp_path / "run"
    first = _pretrain(run, data, "--train.total_steps", "6", "--max-steps", "4", "--log.every", "2")
    assert first.returncode == 0, first.stderr
    assert "\r" not in first.stdout + first.stderr  # no progress-bar frames in a log file
    lines = [m for m in map(LINE.match, first.stdout.splitlines()) if m]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(2, 4), (4, 4)]  # this run's end: --max-steps
    logged = read_metrics(run / "metrics.jsonl")
    assert [float(m[3]) for m in lines] == [pytest.approx(r["loss"], rel=1e-3) for r in logged]
    for m, record in zip(lines, logged):  # one process: its throughput is the total
        assert float(m[4]) == float(m[5]) == pytest.approx(record["samples_per_s"], rel=0.06, abs=0.06)
    assert "resumed" not in first.stdout

    again = _pretrain(run, data, "--resume", "auto", "--max-steps", "6", "--log.every", "1")
    assert again.returncode == 0, again.stderr
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resumed")]
    assert resumed == [f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4"]
    assert [int(m[1]) for m in map(LINE.match, again.stdout.splitlines()) if m] == [5, 6]

    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["hosts"] == [socket.gethostname()]
    [process] = info["processes"]
    assert process["rank"] == 0 and process["host"] == socket.gethostname() and process["device"] == "cpu"
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    assert process["device_name"] == model


def _rank(rank: int, out_dir: str, port: int) -> None:
    from m3ae.train.pretrain import run_pretraining
    from m3ae.train.synthetic import ListLoader
    from test_train_loop import global_batches, split, tiny_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    cfg = tiny_config(out_dir, steps=1)
    run_pretraining(cfg, loader=ListLoader([split(b, 2)[rank] for b in global_batches(cfg.model, 1, 8)]))


def test_run_info_lists_every_process_of_a_two_process_run(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(str(tmp_path / "run"), port), nprocs=2, join=True)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["hosts"] == [socket.gethostname()]
    assert [(p["rank"], p["host"], p["device"]) for p in info["processes"]] == [
        (0, socket.gethostname(), "cpu"), (1, socket.gethostname(), "cpu")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_only_on_a_terminal_and_lines_only_elsewhere(monkeypatch, capsys):
    metrics = {"loss": 0.5, "lr": 1e-3, "samples_per_s": 40.0, "samples_per_s_per_process": 20.0,
               "data_wait": 0.25, "flops_per_s": 2e12, "mfu": 0.1, "eta_s": 3725.0}
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = ProgressBar(total=10, initial=0, enabled=True)
    bar.update(2, metrics)
    bar.close()
    assert capsys.readouterr().out == ""
    assert "2/10" in terminal.getvalue() and "loss 0.5" in terminal.getvalue()

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file
    bar = ProgressBar(total=10, initial=4, enabled=True)
    bar.update(2, metrics)
    bar.update(1)  # no record: no line
    bar.close()
    assert capsys.readouterr().out == ("step 6/10  loss 0.5  lr 0.001  40.0 samples/s (20.0 per process)  "
                                       "data wait 25%  2.00 TFLOP/s  MFU 10.0%  ETA 1:02:05\n")
    assert sys.stderr.getvalue() == ""

    bar = ProgressBar(total=10, initial=0, enabled=False)  # --log.progress false: nothing anywhere
    bar.update(2, metrics)
    assert capsys.readouterr().out == "" and sys.stderr.getvalue() == ""


def test_throughput_per_process_and_mfu_against_one_device():
    # 2 processes share a global batch: the total FLOP/s is two devices' work, MFU is one device's share
    meter = Throughput(processes=2)
    meter.start = time.perf_counter() - 2.0
    meter.samples, meter.steps = 100, 4
    summary = meter.summary(flops_per_sample=10, peak_flops=1000.0)
    assert summary["samples_per_s"] == pytest.approx(50.0, rel=0.02)
    assert summary["samples_per_s_per_process"] == pytest.approx(25.0, rel=0.02)
    assert summary["mfu"] == pytest.approx(50.0 * 10 / 2 / 1000.0, rel=0.02)


def test_the_training_figures_show_the_same_samples_after_a_resume(data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import m3ae.train.figures as figures

    shown: dict[int, torch.Tensor] = {}
    draw = figures.reconstruction_figures

    def recording(model, bare, batch, noise, out_dir, step, *args, **kwargs):
        shown[step] = batch["image"].cpu().clone()
        return draw(model, bare, batch, noise, out_dir, step, *args, **kwargs)

    monkeypatch.setattr(figures, "reconstruction_figures", recording)
    run = tmp_path / "run"
    common = ["pretrain", "--out-dir", str(run), "--data.source", f"{data}/train-*.tar", "--data.num_workers", "0",
              "--train.batch_size", "8", "--train.total_steps", "4", "--log.every", "1", "--log.figures_every", "1",
              "--log.progress", "false", "--log.tensorboard", "false", "--train.precision", "fp32", *SMALL]
    assert main([*common, "--max-steps", "2"]) == 0
    assert main([*common, "--resume", "auto"]) == 0
    capsys.readouterr()
    assert sorted(shown) == [1, 2, 3, 4]
    # the resumed run's first batch holds other samples (the data position moved on) ...
    from m3ae.data import build_pretrain_loader
    from m3ae.train.pretrain import PretrainConfig

    cfg = PretrainConfig()  # the data settings of the runs above
    cfg.data.source, cfg.data.num_workers = f"{data}/train-*.tar", 0
    batches = iter(build_pretrain_loader(cfg.data, batch_size=8))
    first, _, third = next(batches), next(batches), next(batches)
    assert not torch.equal(first["image"], third["image"])
    # ... yet every figure, before and after the resume, shows the run's first samples
    assert all(torch.equal(shown[step], first["image"]) for step in shown)
    from safetensors import safe_open

    with safe_open(run / "figures" / "samples.safetensors", "pt") as kept:
        assert json.loads(kept.metadata()["keys"]) == first["key"]


def test_tensorboard_gets_the_logged_scalars_the_config_and_the_reconstructions(data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(run), "--data.source", f"{data}/train-*.tar", "--data.num_workers",
                 "0", "--train.batch_size", "8", "--train.total_steps", "2", "--log.every", "1",
                 "--log.figures_every", "2", "--log.tensorboard", "true", "--train.precision", "fp32", *SMALL]) == 0
    capsys.readouterr()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = read_metrics(run / "metrics.jsonl")
    for key in ("loss", "image_loss", "text_loss", "lr", "samples_per_s", "samples_per_s_per_process", "data_wait"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in logged]
    [image] = events.Images("reconstructions")
    png = Image.open(io.BytesIO(image.encoded_image_string))
    assert image.step == 2 and png.size == Image.open(run / "figures" / "recon_00000002.png").size
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["train.batch_size"].number_value == 8 and hparams["model.emb_dim"].number_value == 32
    assert hparams["train.precision"].string_value == "fp32" and hparams["train.max_steps"].string_value == "null"


def _panels_with_line_pixels(png: bytes, panels: int) -> list[int]:
    """Pixels of matplotlib's first line colour (C0) in each of `panels` equal columns of a figure."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    blue = (np.abs(pixels - np.array([31, 119, 180])).sum(-1) < 60)
    return [int(column.sum()) for column in np.array_split(blue, panels, axis=1)]


def test_a_probe_report_plots_train_loss_top1_and_top5(data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from m3ae import M3AE, M3AEConfig

    torch.manual_seed(0)
    M3AE(M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2,
                    image_size=32, patch_size=8, text_length=16)).save_pretrained(tmp_path / "model")
    run = tmp_path / "probe"
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", 128), ("val", 64)):  # cached features: the head trains in a moment
        labels = torch.arange(n) % 4
        features = torch.eye(32)[labels] * 3.0 + torch.randn(n, 32, generator=generator)
        save_features({"features": features, "labels": labels, "keys": [str(i) for i in range(n)]},
                      run / f"features_{split}.safetensors")
    assert main(["linear-probe", "--checkpoint", str(tmp_path / "model"), "--cached", "true", "--epochs", "4",
                 "--batch_size", "32", "--out_dir", str(run), "--data.source", f"{data}/train-*.tar",
                 "--val-data", f"{data}/val-*.tar"]) == 0
    out = capsys.readouterr().out
    # a probe's progress lines in a log file: one per epoch, with its accuracies
    epochs = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in epochs] == ["4/16", "8/16", "12/16", "16/16"]
    assert all(re.search(r"train_loss \S+ .*top1 \S+  top5 \S+  epoch \d  lr ", line) for line in epochs)

    assert main(["report", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    page = (run / "report.html").read_text()
    section = page[page.index("<h2>Loss curves</h2>"):]
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', section)[1])
    # four panels (train_loss, top1, top5, lr), each with its curve drawn
    assert all(count > 20 for count in _panels_with_line_pixels(png, 4))

    from m3ae.viz.plotting import loss_curves_figure

    records = read_metrics(run / "metrics.jsonl")
    figure = loss_curves_figure(records)
    assert [ax.get_title() for ax in figure.axes] == ["train_loss", "top1", "top5", "lr"]
    for ax in figure.axes:
        [line] = ax.get_lines()
        assert list(line.get_ydata()) == [r[ax.get_title()] for r in records]


def test_no_command_writes_progress_frames_into_a_log(tmp_path):
    """Issue 18 why 3: `m3ae data synth` and feature extraction wrote tqdm's carriage-return frames
    into a non-terminal stderr (a Slurm log); every command now follows pretraining's rule."""
    from m3ae import M3AE, M3AEConfig

    M3AE(M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=16, dec_depth=1, dec_num_heads=2, image_size=32,
                    patch_size=8, text_length=16)).save_pretrained(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for argv in (["data", "synth", "--out-dir", "set", "--train", "16", "--val", "8", "--image-size", "32",
                  "--shard-size", "8"],
                 ["embed", "--checkpoint", "model", "--data.source", "set/train-*.tar", "--out", "f.npz",
                  "--batch-size", "4", "--precision", "fp32"]):
        with open(tmp_path / "log.txt", "w+b") as log:
            done = subprocess.run([sys.executable, "-m", "m3ae", *argv], cwd=tmp_path, env=env, stdout=log,
                                  stderr=log, timeout=300)
            log.seek(0)
            text = log.read()
        assert done.returncode == 0, text
        assert b"\r" not in text, f"m3ae {argv[0]}: {text[-300:]!r}"
    assert (tmp_path / "f.npz").is_file()
