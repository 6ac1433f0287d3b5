"""Hugging Face Hub conventions: pushing and the model card (resolving names: `m3ae.model.files`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..model.config import M3AEConfig


def model_card(config: M3AEConfig, info: dict[str, Any] | None = None) -> str:
    """A README.md that says what the files are. `info` may hold `data`, `steps`, `epochs`,
    `probe` ({metric: value}), `encoder_only` and `notes`."""
    info = info or {}
    kind = "M3AE (image + text)" if config.has_text else "MAE (image only)"
    target = ("per-patch normalised pixels (norm_pix_loss): reconstructions are shown in that space, "
              "un-normalised with the visible patches' statistics") if config.norm_pix_loss else "normalised pixels"
    contents = ("the image encoder only" if info.get("encoder_only")
                else "the full model: encoder, decoder and both reconstruction heads")
    lines = [
        "---",
        "library_name: m3ae",
        "tags: [m3ae, masked-autoencoder, multimodal, vision-language, pytorch]",
        "---",
        f"# {kind}, {config.preset or 'custom'} size",
        "",
        f"Multimodal Masked Autoencoder (arXiv 2205.14204) weights for the `m3ae` PyTorch package: {contents}.",
        "",
        "| | |",
        "|---|---|",
        f"| encoder | {config.emb_dim} wide, {config.depth} deep, {config.num_heads} heads |",
        f"| decoder | {config.dec_emb_dim} wide, {config.dec_depth} deep, {config.dec_num_heads} heads |",
        f"| input | {config.image_size}px images, patch {config.patch_size}"
        + (f"; captions of {config.text_length} WordPiece tokens (vocabulary {config.vocab_size})" if config.has_text else "")
        + " |",
        f"| masking | image {config.image_mask_ratio:.0%}" + (f", text {config.text_mask_ratio:.0%}" if config.has_text else "") + " |",
        f"| image target | {target} |",
        f"| training data | {info.get('data', 'not recorded')} |",
        f"| training length | {info.get('steps', 'not recorded')} steps"
        + (f" ({info['epochs']} epochs)" if info.get("epochs") is not None else "") + " |",
    ]
    run_config = info.get("run_config")
    probe = info.get("probe") or {}
    if probe:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in probe.items()]
    if info.get("notes"):
        lines += ["", str(info["notes"])]
    lines += ["", "## Configuration", "", "```yaml",
              yaml.safe_dump(run_config or {"model": config.to_dict()}, sort_keys=False).rstrip(), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from m3ae import M3AE",
        "model = M3AE.from_pretrained(\"<this repo or directory>\")",
        "features = model.encode(images).cls  # images: (B, 3, H, W), normalised",
        "```",
        "",
        "Files: `config.json` (M3AEConfig), `model.safetensors` (weights; no pickles).",
    ]
    return "\n".join(lines) + "\n"


def push_to_hub(model: Any, repo_id: str, *, card_info: dict[str, Any] | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload M3AE", branch: str | None = None,
                create_pr: bool = False, api: Any = None) -> Any:
    """Creates `repo_id` if needed and uploads config, weights and a model card (generated from
    `card_info`, or from the config alone), with huggingface_hub's `push_to_hub` arguments."""
    if api is None:
        from ..utils import require

        api = require("huggingface_hub", "hub", "push_to_hub").HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging, card_info=card_info or {})
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 revision=branch, create_pr=create_pr)


def card_info_from_runs(model_dir: Path, probe_runs: list[str | Path] = ()) -> dict[str, Any]:
    """What the model card says about a model: the pretraining run's config and length, found beside
    a checkpoint (`<run>/checkpoints/step_N/`), and the results of probe or fine-tuning runs."""
    info: dict[str, Any] = {}
    run_dir = model_dir.parent.parent
    if model_dir.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        run_config = yaml.safe_load((run_dir / "config.yaml").read_text())
        info.update(run_config=run_config, data=run_config.get("data", {}).get("source", "not recorded"),
                    steps=int(model_dir.name.removeprefix("step_")))
    probe = {}
    for run in map(Path, probe_runs):
        results = json.loads((run / "results.json").read_text())
        command = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        kind = "fine-tuning" if "layer_decay" in command else "linear probe"
        probe[f"{kind} top-1, {run.name} ({results.get('split', {}).get('val', 'val split')})"] = \
            f"{results['last']['top1']:.2f}%"
    if probe:
        info["probe"] = probe
    return info
