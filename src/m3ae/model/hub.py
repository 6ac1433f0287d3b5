"""Publishing a model on the Hugging Face Hub: its model card and the upload (downloading and resolving
names: `m3ae.model.files`)."""

from __future__ import annotations

import tempfile
from typing import Any

import yaml

from ..utils import require
from .config import M3AEConfig


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
        + (f"; captions of {config.text_length} WordPiece tokens ({_vocabulary_line(config)})" if config.has_text else "")
        + " |",
        f"| masking | image {config.image_mask_ratio:.0%}" + (f", text {config.text_mask_ratio:.0%}" if config.has_text else "") + " |",
        f"| image target | {target} |",
        f"| training data | {info.get('data', 'not recorded')} |",
        "| training length | " + (f"{info['steps']} steps" if info.get("steps") is not None else "not recorded")
        + (f" ({info['epochs']} epochs)" if info.get("epochs") is not None else "") + " |",
    ]
    run_config = _vocabulary_counted(info.get("run_config") or {"model": config.to_dict()})
    probe = info.get("probe") or {}
    if probe:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in probe.items()]
    if info.get("notes"):
        lines += ["", str(info["notes"])]
    lines += ["", "## Configuration", "", "```yaml",
              yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from m3ae import M3AE",
        "model = M3AE.from_pretrained(\"<this repo or directory>\")",
        "features = model.encode(images).cls  # images: (B, 3, H, W), normalised",
        *(["from m3ae.data import Tokenizer",
           "text, padding = Tokenizer.for_model(model.config)([\"a red kangaroo.\"])  # the model's own ids",
           "features = model.encode(images, text, padding).cls"] if config.has_text else []),
        "```",
        "",
        "Files: `config.json` (M3AEConfig), `model.safetensors` (weights; no pickles).",
    ]
    return "\n".join(lines) + "\n"


def _vocabulary_line(config: M3AEConfig) -> str:
    tokenizer = config.tokenizer or "bert-base-uncased"
    if config.vocabulary is None:
        return f"tokenizer {tokenizer}, vocabulary {config.vocab_size}"
    return (f"tokenizer {tokenizer}, a compact vocabulary of {config.vocab_size} of its tokens, those of the "
            f"training captions, listed in config.json; any other token reads as [UNK]")


def _vocabulary_counted(run_config: dict[str, Any]) -> dict[str, Any]:
    """The configuration shown, a compact vocabulary's token list replaced by its length."""
    model = run_config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocabulary"), list):
        return run_config
    return {**run_config, "model": {**model, "vocabulary": f"{len(model['vocabulary'])} tokens (config.json)"}}


def push_to_hub(model: Any, repo_id: str, *, card_info: dict[str, Any] | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload M3AE", branch: str | None = None,
                create_pr: bool = False, api: Any = None) -> Any:
    """Creates `repo_id` if needed and uploads config, weights and a model card (generated from
    `card_info`, or from the config alone), with huggingface_hub's `push_to_hub` arguments."""
    if api is None:
        api = require("huggingface_hub", "hub", "push_to_hub").HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging, card_info=card_info or {})
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 revision=branch, create_pr=create_pr)
