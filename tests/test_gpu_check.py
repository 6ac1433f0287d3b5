"""bench/gpu_check.py's logic on the CPU (`--device cpu --smoke`): every section runs and reports
numbers that hold on any device: the same model on the same device is bit-identical, a wrapper on
a group of one computes the bare model's loss, data wait is a share of the time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert done.returncode == 0 and report["ok"], json.dumps(sections, indent=1)[-3000:]
    assert set(sections) == {"parity", "mfu", "compile", "data", "distributed"}
    parity = sections["parity"]
    assert parity["ok"] and parity["loss_relative_difference"] == 0.0 and parity["gradients_compared"] > 10
    mfu = sections["mfu"]
    assert [r["batch_size"] for r in mfu["runs"]] == [2, 4][:len(mfu["runs"])] and mfu["largest_batch"] in (2, 4)
    assert 0 < mfu["mfu"] <= 1 and mfu["best"]["precision"] == "bf16" and mfu["peak_bf16_flops_per_s"] > 0
    assert "skipped" in sections["compile"]
    data = sections["data"]
    assert data["pictures"] == 24 and data["shard_bytes"] > 24 * 500  # JPEGs, not empty members
    (run,) = data["runs"]
    assert run["workers"] == 2 and 0 <= run["data_wait"] < 1 and run["samples_per_s"] > 0
    for parallel, wrapper in (("ddp", "DistributedDataParallel"), ("fsdp", "FSDPM3AE")):
        assert sections["distributed"][parallel]["wrapper"] == wrapper
        assert sections["distributed"][parallel]["loss_relative_difference"] < 1e-6
