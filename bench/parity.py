"""Largest deviation of our model from the official JAX fixtures, per quantity (docs/PARITY.md).

    python bench/parity.py [--fixtures tests/fixtures/official_m3ae]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from m3ae import M3AE
from m3ae.interop.official import infer_config, to_torch_state_dict

SIZES = dict(num_heads=4, dec_num_heads=2, image_size=48, text_length=18, masking="shared")


def load(path: Path) -> tuple[M3AE, dict]:
    data = dict(np.load(path))
    flat = {k.removeprefix("params/"): v for k, v in data.items() if k.startswith("params/")}
    config = infer_config(flat, **SIZES)
    model = M3AE(config)
    model.load_state_dict(to_torch_state_dict(flat, config.output_head_depth))
    return model, data


def max_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float((actual.detach().double() - torch.from_numpy(np.asarray(expected)).double()).abs().max())


def grad_error(model: M3AE, data: dict, branch: str) -> float:
    prefix = f"{branch}/grads/params/"
    expected = to_torch_state_dict({k.removeprefix(prefix): v for k, v in data.items() if k.startswith(prefix)},
                                   model.config.output_head_depth)
    return max(max_error(p.grad if p.grad is not None else torch.zeros_like(p), expected[n].numpy())
               for n, p in model.named_parameters())


def report(fixtures: Path) -> list[tuple[str, str, float]]:
    rows = []
    for name in ("m3ae_tiny", "m3ae_tiny_head1"):
        model, d = load(fixtures / f"{name}.npz")
        image = torch.from_numpy(d["input/image"]).permute(0, 3, 1, 2)
        text, pad = torch.from_numpy(d["input/text"]).long(), torch.from_numpy(d["input/text_padding_mask"])
        out = model(image, text, pad, image_noise=torch.from_numpy(d["paired/image_noise"]),
                    text_noise=torch.from_numpy(d["paired/text_noise"]))
        out.loss.backward()
        rows += [(name, "paired image head", max_error(out.image_pred, d["paired/image_output"])),
                 (name, "paired text logits", max_error(out.text_logits, d["paired/text_output"])),
                 (name, "paired losses", max(max_error(getattr(out, k), d[f"paired/{k}"]) for k in ("loss", "image_loss", "text_loss", "text_accuracy"))),
                 (name, "paired gradients (all params)", grad_error(model, d, "paired"))]
        with torch.no_grad():
            rows.append((name, "unmasked representation", max_error(model.encode(image, text, pad).last_hidden_state, d["repr/image_text"])))
        if "textonly/text_output" in d:
            model.zero_grad()
            t = model(text=torch.from_numpy(d["textonly/input/text"]).long(),
                      text_padding_mask=torch.from_numpy(d["textonly/input/text_padding_mask"]),
                      text_noise=torch.from_numpy(d["textonly/text_noise"]))
            t.text_loss.backward()
            rows += [(name, "text-only logits", max_error(t.text_logits, d["textonly/text_output"])),
                     (name, "text-only gradients", grad_error(model, d, "textonly"))]
            with torch.no_grad():
                i = model(image, image_noise=torch.from_numpy(d["imageonly/image_noise"]))
            rows.append((name, "image-only head", max_error(i.image_pred, d["imageonly/image_output"])))
            with torch.no_grad():
                o = model(image, text, pad, image_noise=torch.from_numpy(d["paired/image_noise"]),
                          text_noise=torch.from_numpy(d["paired/text_noise"]), output_attentions=True)
            rows.append((name, "attention probabilities", max(
                max_error(o.encoder_attentions[b], d[f"paired/inter/encoder/Block_{b}/Attention_0/attention/0"]) for b in range(2))))
    model, d = load(fixtures / "mae_tiny.npz")
    image = torch.from_numpy(d["input/image"]).permute(0, 3, 1, 2)
    out = model(image, image_noise=torch.from_numpy(d["mae/image_noise"]))
    out.loss.backward()
    rows += [("mae_tiny", "image head", max_error(out.image_pred, d["mae/image_output"])),
             ("mae_tiny", "loss", max_error(out.loss, d["mae/loss"])),
             ("mae_tiny", "gradients (all params)", grad_error(model, d, "mae"))]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).parents[1] / "tests/fixtures/official_m3ae")
    args = parser.parse_args()
    print("| fixture | quantity | max abs error |\n|---|---|---|")
    for fixture, quantity, error in report(args.fixtures):
        print(f"| {fixture} | {quantity} | {error:.2e} |")
