"""The official JAX/Flax M3AE and MAE checkpoints in PyTorch.

The official trainer writes a cloudpickle of `{step, epoch, variant, state}` with a flax TrainState.
We read it with `safe_pickle` (nothing in the file runs, jax/flax/optax need not be installed), find
the parameter tree by its structure -- plain dicts (flax >= 0.6) or FrozenDicts (flax 0.5, 2022
checkpoints) -- map every flax path to our names and infer the configuration from the shapes and
the run's `variant`. A `.npz` or pickled dict of flax paths is accepted too.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import PRESETS, M3AE, M3AEConfig
from ..model.m3ae import WeightsMismatchError, check_weights
from .safe_pickle import Opaque, OpaqueMeta, opaque_fields, safe_load


class ConversionError(ValueError):
    pass


# ---------------------------------------------------------------------------------------- reading
def _as_mapping(obj: Any) -> Mapping | None:
    if isinstance(obj, Mapping):
        return obj
    fields = opaque_fields(obj)
    if fields is None:
        return None
    # flax 0.5 FrozenDict keeps its contents in `_dict`
    inner = fields.get("_dict")
    return inner if isinstance(inner, Mapping) else fields


def _children(obj: Any) -> list[Any]:
    mapping = _as_mapping(obj)
    if mapping is not None:
        return list(mapping.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, (Opaque, OpaqueMeta)):
        return list(obj._opaque_args) + list(getattr(obj, "_opaque_list", []))
    return []


# The largest official model (huge) has ~600 parameter arrays at depth <= 6; a tree far beyond
# these is hostile (shared references make a small file describe 2^40 paths).
MAX_TREE_DEPTH = 32
MAX_TREE_NODES = 100_000


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    """flax path -> array. Each mapping is entered once: a subtree reached twice (shared or cyclic
    references) or a tree beyond MAX_TREE_DEPTH / MAX_TREE_NODES is a ConversionError."""
    flat: dict[str, np.ndarray] = {}
    entered: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("", tree, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        mapping = _as_mapping(node)
        if mapping is None:
            array = np.asarray(node) if isinstance(node, (np.ndarray, np.generic)) else None
            if array is None or array.dtype.kind not in "fiub":
                raise ConversionError(f"parameter {prefix!r} is not a numeric array ({type(node).__name__})")
            flat[prefix] = array
            continue
        if id(node) in entered:  # nodes live in the unpickled tree, so their ids stay unique
            raise ConversionError(f"parameter tree reaches {prefix!r} a second time (shared or cyclic reference)")
        entered.add(id(node))
        if depth > MAX_TREE_DEPTH or len(entered) + len(flat) > MAX_TREE_NODES:
            raise ConversionError(f"parameter tree is deeper than {MAX_TREE_DEPTH} or larger than "
                                  f"{MAX_TREE_NODES} nodes (at {prefix!r})")
        stack.extend((f"{prefix}/{key}" if prefix else str(key), value, depth + 1)
                     for key, value in reversed(list(mapping.items())))
    return flat


def _is_param_tree(mapping: Mapping) -> bool:
    return "cls_token" in mapping and "encoder" in mapping and "image_embedding" in mapping


def find_param_tree(root: Any) -> Mapping:
    """Breadth-first search for the model parameters: the `params` of a train state (an object with
    both `params` and `opt_state`, so the optimiser's moment trees are not mistaken for them), else
    the first mapping that looks like the parameter tree."""
    fallback = None
    queue, seen = collections.deque([root]), set()
    while queue:
        obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        mapping = _as_mapping(obj)
        if mapping is not None:
            if "params" in mapping and "opt_state" in mapping:
                params = _as_mapping(mapping["params"])
                if params is not None and "params" in params and not _is_param_tree(params):
                    params = _as_mapping(params["params"])
                if params is not None and _is_param_tree(params):
                    return params
            if fallback is None and _is_param_tree(mapping):
                fallback = mapping
        queue.extend(_children(obj))
    if fallback is None:
        raise ConversionError("no M3AE/MAE parameter tree (cls_token, image_embedding, encoder, ...) found")
    return fallback


def _find_variant(root: Any) -> dict[str, Any]:
    mapping = _as_mapping(root)
    variant = _as_mapping(mapping.get("variant")) if mapping is not None else None
    return dict(variant) if variant is not None else {}


def load_official(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Returns (flat flax-path -> array without the leading 'params/', the run's variant dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: archive[key] for key in archive.files}
        flat = {key.removeprefix("params/"): value for key, value in flat.items() if not key.startswith(("grads/", "opt_state/"))}
        return flat, {}
    try:
        root = safe_load(path.read_bytes())
    except Exception as error:  # a truncated or foreign file: name it
        raise ConversionError(f"{path}: not a readable pickle ({error})") from error
    try:
        return _flatten(find_param_tree(root)), _find_variant(root)
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None


# ---------------------------------------------------------------------------------------- mapping
_BLOCK_PARTS = {
    "LayerNorm_0": "norm1",
    "LayerNorm_1": "norm2",
    "Attention_0/Dense_0": "attn.qkv",
    "Attention_0/Dense_1": "attn.proj",
    "TransformerMLP_0/fc1": "mlp.fc1",
    "TransformerMLP_0/fc2": "mlp.fc2",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def _head_module(name: str, depth: int) -> str:
    """Official output MLP names -> ours (`OutputHead`)."""
    kind, index = name.split("_")
    index = int(index)
    if kind == "Dense":
        return "out" if index == depth else f"hidden.{index}"
    return "input_norm" if index == 0 else f"hidden_norms.{index - 1}"


def torch_name(flax_path: str, head_depth: int) -> str:
    *modules, leaf = flax_path.split("/")
    if leaf not in _LEAF and not modules:
        return flax_path  # cls_token, type and mask embeddings keep their names
    if leaf not in _LEAF:
        raise ConversionError(f"unknown parameter {flax_path!r}")
    path = "/".join(modules)
    match = re.fullmatch(r"(encoder|decoder)/Block_(\d+)/(.+)", path)
    if match:
        stack, index, part = match.groups()
        if part not in _BLOCK_PARTS:
            raise ConversionError(f"unknown parameter {flax_path!r}")
        module = f"{stack}.blocks.{index}.{_BLOCK_PARTS[part]}"
    elif path in ("encoder/LayerNorm_0", "decoder/LayerNorm_0"):
        module = f"{modules[0]}.norm"
    elif re.fullmatch(r"decoder_(image|text)_output/(Dense|LayerNorm)_\d+", path):
        module = f"{modules[0]}.{_head_module(modules[1], head_depth)}"
    elif path in ("image_embedding", "text_embedding", "decoder_input_projection"):
        module = path
    else:
        raise ConversionError(f"unknown parameter {flax_path!r}")
    return f"{module}.{_LEAF[leaf]}"


def to_torch_state_dict(flat: Mapping[str, np.ndarray], head_depth: int) -> dict[str, torch.Tensor]:
    state = {}
    for path, value in flat.items():
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        if path.endswith("/kernel"):
            tensor = tensor.T.contiguous()  # flax Dense kernel is (in, out)
        state[torch_name(path, head_depth)] = tensor
    return state


# ---------------------------------------------------------------------------------------- config
def _count(flat: Mapping[str, Any], pattern: str) -> int:
    return len({m.group(1) for key in flat if (m := re.match(pattern, key))})


def infer_config(flat: Mapping[str, np.ndarray], variant: Mapping[str, Any] | None = None, **overrides: Any) -> M3AEConfig:
    """Architecture from the parameter shapes; what shapes cannot tell (heads, image size, text
    length, mask ratios, loss weights) from the run's variant, the paper's presets, or `overrides`."""
    variant = dict(variant or {})
    try:
        emb_dim = flat["cls_token"].shape[-1]
        patch_dim, _ = flat["image_embedding/kernel"].shape
        dec_emb_dim = flat["decoder_input_projection/kernel"].shape[1]
        fc1 = flat["encoder/Block_0/TransformerMLP_0/fc1/kernel"]
    except KeyError as missing:
        raise ConversionError(f"parameter {missing} not found: not an M3AE/MAE checkpoint") from None
    has_text = "text_embedding/embedding" in flat
    prefix = "m3ae" if has_text else "mae"
    patch_size = math.isqrt(patch_dim // 3)
    if patch_size * patch_size * 3 != patch_dim:
        raise ConversionError(f"image_embedding kernel has {patch_dim} inputs: not p·p·3 for an integer p")

    def from_variant(name: str) -> Any:
        return variant.get(f"{prefix}.{name}", variant.get(name))

    size_name = from_variant("model_type")
    preset = PRESETS.get(size_name) if size_name not in (None, "tiny") else None
    # paper sizes determine the head count; other widths need it from the variant or the user
    heads_by_width = {p["emb_dim"]: p["num_heads"] for name, p in PRESETS.items() if name != "tiny"}
    values: dict[str, Any] = dict(
        model_type=prefix,
        patch_size=patch_size,
        emb_dim=emb_dim,
        depth=_count(flat, r"encoder/Block_(\d+)/"),
        dec_emb_dim=dec_emb_dim,
        dec_depth=_count(flat, r"decoder/Block_(\d+)/"),
        mlp_ratio=fc1.shape[1] / emb_dim,
        output_head_depth=_count(flat, r"decoder_image_output/(Dense_\d+)/") - 1,
        use_type_embedding="encoder_image_type_embedding" in flat,
        num_heads=from_variant("num_heads") or (preset or {}).get("num_heads") or heads_by_width.get(emb_dim),
        dec_num_heads=from_variant("dec_num_heads") or (16 if dec_emb_dim == 512 else None),
        image_size=variant.get("data.image_size") or variant.get("image_size") or 256,
    )
    if values["mlp_ratio"] == int(values["mlp_ratio"]):
        values["mlp_ratio"] = int(values["mlp_ratio"])
    if has_text:
        values["vocab_size"] = flat["text_embedding/embedding"].shape[0]
        values["text_length"] = variant.get("data.tokenizer_max_length") or 64
        for name in ("text_mask_ratio",):
            if from_variant(name) is not None:
                values[name] = from_variant(name)
        for name in ("image_loss_weight", "text_loss_weight"):
            if variant.get(name) is not None:
                values[name] = variant[name]
    if from_variant("image_mask_ratio") is not None:
        values["image_mask_ratio"] = from_variant("image_mask_ratio")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("num_heads", "dec_num_heads"):
        if not values.get(name):
            raise ConversionError(
                f"cannot infer {name} from the checkpoint (width {emb_dim if name == 'num_heads' else dec_emb_dim}); "
                f"pass --{name.replace('_', '-')}"
            )
    return M3AEConfig(**values)


# flax parameters may be stored in any float width; conversion makes them float32
_FLOAT_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


def convert_official(path: str | Path, **overrides: Any) -> M3AE:
    """Loads an official checkpoint (or dict/npz of flax paths) into an `M3AE`."""
    flat, variant = load_official(path)
    config = infer_config(flat, variant, **overrides)
    try:
        # shapes inferred from a small file can describe a huge model: compared with the file's
        # arrays before the model is built (the kernels are stored transposed)
        header = {torch_name(name, config.output_head_depth):
                  (_FLOAT_NAMES.get(np.asarray(value).dtype, str(np.asarray(value).dtype)),
                   np.shape(value)[::-1] if name.endswith("/kernel") else np.shape(value))
                  for name, value in flat.items()}
        check_weights(config, header, str(path), dtypes=tuple(_FLOAT_NAMES.values()))
    except (ConversionError, WeightsMismatchError) as error:
        message = str(error)
        raise ConversionError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    model = M3AE(config)
    model.load_state_dict(to_torch_state_dict(flat, config.output_head_depth))
    return model
