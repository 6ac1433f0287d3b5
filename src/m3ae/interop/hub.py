"""What a model card says about a model trained here: its pretraining run and probe results (the card
itself and the upload: `m3ae.model.hub`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..engine.run_dir import RunDir


def card_info_from_runs(model_dir: Path, probe_runs: list[str | Path] = ()) -> dict[str, Any]:
    """What the model card says about a model: the pretraining run's config and length, found beside
    a checkpoint (`<run>/checkpoints/step_N/`), and the results of probe or fine-tuning runs."""
    info: dict[str, Any] = {}
    run_dir = RunDir.containing(model_dir)
    if run_dir is not None and run_dir.path != model_dir:
        run_config = run_dir.read_config()
        info.update(run_config=run_config, data=run_config.get("data", {}).get("source", "not recorded"),
                    steps=int(model_dir.name.removeprefix("step_")))
    probe = {}
    for run in map(RunDir, probe_runs):
        results = json.loads(run.results.read_text())
        kind = "fine-tuning" if "layer_decay" in run.read_config() else "linear probe"
        probe[f"{kind} top-1, {run.path.name} ({results.get('split', {}).get('val', 'val split')})"] = \
            f"{results['last']['top1']:.2f}%"
    if probe:
        info["probe"] = probe
    return info
