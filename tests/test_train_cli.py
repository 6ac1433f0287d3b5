"""`m3ae pretrain` end to end on a small generated dataset: run directory, resume, figures."""

from __future__ import annotations

import yaml

from m3ae.cli import main
from m3ae.data.synth import SynthSpec, generate
from m3ae.engine.metrics import read_metrics


def test_pretrain_command_trains_resumes_and_reports_where_outputs_are(tmp_path, capsys):
    data = generate(tmp_path / "data", SynthSpec(seed=0, train=48, val=8, image_size=64, shard_size=24))
    run = tmp_path / "run"
    common = ["pretrain", "--out-dir", str(run), "--data.source", f"{data}/train-*.tar", "--data.num_workers", "0",
              "--train.batch_size", "8", "--train.total_steps", "4", "--log.every", "1", "--log.progress", "false"]
    assert main([*common, "--max-steps", "2"]) == 0
    assert "run finished at step 2" in capsys.readouterr().out
    assert main([*common, "--resume", "auto", "--log.figures_every", "2"]) == 0
    out = capsys.readouterr().out
    assert f"run finished at step 4: {run}" in out and "metrics.jsonl" in out
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "figures" / "recon_00000004.png").is_file()
    assert (run / "figures" / "loss_curves.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_resume_reloads_the_run_config_and_max_steps_is_the_new_stopping_point(tmp_path, capsys):
    data = generate(tmp_path / "data", SynthSpec(seed=0, train=24, val=8, image_size=64, shard_size=24))
    run = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(run), "--data.source", f"{data}/train-*.tar", "--data.num_workers", "0",
                 "--train.batch_size", "4", "--train.total_steps", "3", "--max-steps", "2", "--log.every", "1",
                 "--log.progress", "false", "--log.figures_every", "0"]) == 0
    capsys.readouterr()
    # a shape or data-order change is refused before any work, naming the field
    assert main(["pretrain", "--out-dir", str(run), "--resume", "auto", "--train.batch_size", "8"]) == 2
    assert "--batch-size: 4 -> 8 would change the shapes" in capsys.readouterr().err  # the spelling --help lists
    # only the run directory and the new stopping point, past the old schedule's end
    assert main(["pretrain", "--out-dir", str(run), "--resume", "auto", "--max-steps", "5"]) == 0
    assert f"run finished at step 5: {run}" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 4 and saved["train"]["total_steps"] == 5


def test_resume_latest_needs_a_checkpoint(tmp_path, capsys):
    assert main(["pretrain", "--out-dir", str(tmp_path / "empty"), "--resume", "latest"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_does_not_run_a_pipe_command_stored_in_the_run_directory(tmp_path, capsys):
    # a run directory from someone else: its config.yaml names a `pipe:` source the user never typed
    run = tmp_path / "run"
    marker = tmp_path / "RAN"
    assert main(["pretrain", "--out-dir", str(run), "--print-config"]) == 0
    config = capsys.readouterr().out.replace("source: embedded", f"source: 'pipe:touch {marker}; cat x.tar'")
    run.mkdir()
    (run / "config.yaml").write_text(config)
    assert main(["pretrain", "--out-dir", str(run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "data.source='pipe:touch" in err and "does not run it unless you type it again (--data.source" in err
    assert not marker.exists()


def test_pretrain_takes_the_spelling_every_other_command_uses(capsys):
    import yaml

    assert main(["pretrain", "--print-config", "--batch-size", "16", "--precision", "fp32", "--threads", "1",
                 "--seed", "3", "--preset", "tiny", "--device", "cpu"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["train"]["batch_size"], cfg["train"]["precision"], cfg["train"]["threads"], cfg["train"]["seed"],
            cfg["train"]["device"], cfg["model"]["preset"]) == (16, "fp32", 1, 3, "cpu", "tiny")
