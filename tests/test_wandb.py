"""Weights & Biases through a stand-in `wandb` module on sys.path: one W&B run per run directory
(never two directories of the same name in one), the same one after a resume, and the settings."""

from __future__ import annotations

import json

from m3ae.engine.metrics import WANDB_ID_FILE, LogConfig, MetricsLogger

FAKE_WANDB = '''
import json, os

class _Run:
    def log(self, record, step):
        pass

    def finish(self):
        pass

def init(**kwargs):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as handle:
        handle.write(json.dumps({k: v for k, v in kwargs.items() if k != "config"}) + "\\n")
    return _Run()
'''


def test_run_ids_are_unique_per_directory_and_kept_on_resume(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(__import__("sys").modules, "wandb", raising=False)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_WANDB_LOG", str(log))
    cfg = LogConfig(tensorboard=False, wandb=True, wandb_entity="team", wandb_group="sweep-3", wandb_tags=["cc12m", "base"])
    for run_dir in (tmp_path / "a" / "exp1", tmp_path / "b" / "exp1", tmp_path / "a" / "exp1"):  # the last: a resume
        run_dir.mkdir(parents=True, exist_ok=True)
        MetricsLogger(run_dir, cfg, True, {}, None).close()
    MetricsLogger(tmp_path / "b" / "exp1", LogConfig(tensorboard=False, wandb=True, wandb_name="mine"), True, {}, None).close()
    first, other, resumed, named = [json.loads(line) for line in log.read_text().splitlines()]
    assert first["id"] != other["id"]  # the same basename once meant the same W&B run
    assert resumed["id"] == first["id"] == (tmp_path / "a" / "exp1" / WANDB_ID_FILE).read_text().strip()
    assert named["id"] == other["id"] and named["name"] == "mine"
    assert first == {"project": "m3ae", "entity": "team", "name": "exp1", "group": "sweep-3", "tags": ["cc12m", "base"],
                     "dir": str(tmp_path / "a" / "exp1"), "resume": "allow", "id": first["id"]}
    assert len(first["id"]) == 16 and int(first["id"], 16) >= 0
