"""`m3ae pretrain` end to end on a small generated dataset: run directory, resume, figures."""

from __future__ import annotations

from m3ae.cli import main
from m3ae.data.synth import SynthSpec, generate
from m3ae.train.metrics import read_metrics


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
