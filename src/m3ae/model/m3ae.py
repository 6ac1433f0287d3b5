"""The M3AE model: patchify, mask, encode the visible tokens, decode, and score the reconstructions.

One ViT encoder over `[CLS] + visible image patches + visible caption tokens`; a light decoder
rebuilds every patch (MSE) and every word (cross-entropy). With `model_type="mae"` the same network
has no text parameters and is the MAE baseline. Shapes: B batch, N patches, P = p·p·3, L text
length, D / Dd encoder / decoder width, V vocabulary.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import M3AEConfig
from .files import CONFIG_NAME, WEIGHTS_NAME
from .layers import OutputHead, Transformer, sincos_1d, sincos_2d, sincos_buffer
from .losses import cross_entropy_by_sample, masked_cross_entropy, normalize_patches, patch_mse_loss
from .masking import Masking, draw_noise, gather_tokens, random_masking, real_token_masking, unshuffle

# Text positions are fixed sin-cos; a table this long serves captions and unpaired text corpora alike.
MAX_TEXT_POSITIONS = 512
# Weights as stored: floating point (an integer or boolean tensor would be cast silently).
WEIGHT_DTYPES = ("F32", "F16", "BF16")
_FIRST_BLOCK = re.compile(r"(encoder|decoder)\.blocks\.0\.")


class WeightsMismatchError(ValueError):
    """Weights that a model of the given config would not hold exactly (names, shapes, dtypes)."""


def table_elements(config: M3AEConfig) -> int:
    """Elements of the sin-cos tables a model of `config` computes when built (never saved)."""
    return (config.num_patches + max(config.text_length, MAX_TEXT_POSITIONS)) * (config.emb_dim + config.dec_emb_dim)


def check_weights(config: M3AEConfig, header: dict[str, tuple[str, tuple[int, ...]]], where: str,
                  encoder_only: bool = False, dtypes: tuple[str, ...] = WEIGHT_DTYPES) -> None:
    """Refuses, before any model is built, weights (`header`: name -> (dtype, shape), as a
    safetensors header gives them) that a model of `config` would not hold exactly. What a config
    costs is then bounded by what the file holds: depth 400 and width 2048 beside a tiny weights file
    once took 57 s and 5.5 GB to build before failing, emb_dim 10^9 asked for 768 GB.
    `encoder_only`: the image encoder of a classifier checkpoint."""
    held = sum(math.prod(shape) for _, shape in header.values())
    if table_elements(config) > max(held, 1 << 22):  # the fixed tables never outweigh the weights
        raise WeightsMismatchError(
            f"{where} does not match its config: a model of image_size {config.image_size}, text_length "
            f"{config.text_length}, widths {config.emb_dim}/{config.dec_emb_dim} needs more than weights of {held} "
            f"elements")
    with torch.device("meta"):  # shapes only: one block per stack, whose names the others repeat
        small = M3AE(config.replace(depth=1, dec_depth=1), initialize=False)
        if encoder_only:
            from .classifier import image_encoder

            small = image_encoder(small)
    repeats = {"encoder": config.depth, "decoder": config.dec_depth}
    entries = {name: tuple(t.shape) for name, t in small.state_dict().items()}
    blocks = {name: _FIRST_BLOCK.match(name) for name in entries}
    count = sum(repeats[m[1]] if m else 1 for m in blocks.values())
    if count != len(header):
        raise WeightsMismatchError(f"{where} does not match its config: {len(header)} tensors, where a model of "
                                   f"{config.depth} encoder and {config.dec_depth} decoder blocks has {count}")
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in entries.items():
        match = blocks[name]
        if match is None:
            expected[name] = shape
        else:
            expected.update({f"{match[1]}.blocks.{i}.{name[match.end():]}": shape for i in range(repeats[match[1]])})
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise WeightsMismatchError(f"{where} does not match its config: missing {missing[:4]}, unexpected "
                                   f"{[name[:80] for name in unexpected[:4]]}")
    for name, shape in expected.items():
        dtype, actual = header[name]
        if tuple(actual) != shape:
            raise WeightsMismatchError(f"{where} does not match its config: {name} has shape {tuple(actual)}, "
                                       f"the config implies {shape}")
        if dtype not in dtypes:
            raise WeightsMismatchError(f"{where}: {name} is {dtype}; weights are floating point ({', '.join(dtypes)})")


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuses weights holding NaN or infinities: a model would load and then output NaN everywhere."""
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsMismatchError(f"{where}: {name} holds NaN or infinite values")


@dataclass
class M3AEOutput:
    loss: torch.Tensor  # weighted sum of the losses of the modalities present
    image_loss: torch.Tensor | None
    text_loss: torch.Tensor | None
    text_accuracy: torch.Tensor | None
    image_pred: torch.Tensor | None  # (B, N, P)
    text_logits: torch.Tensor | None  # (B, L, V); None when computed only where the loss reads
    image_mask: torch.Tensor | None  # (B, N), 1 = removed
    text_mask: torch.Tensor | None  # (B, L), 1 = removed (padding not taken into account)
    latent: torch.Tensor  # (B, 1 + visible image + visible text, D) encoder output
    image_ids_keep: torch.Tensor | None = None  # (B, visible image) patch indices, encoder order
    text_ids_keep: torch.Tensor | None = None  # (B, visible text) positions, encoder order
    encoder_attentions: tuple[torch.Tensor, ...] = ()  # per block (B, heads, S, S)
    decoder_attentions: tuple[torch.Tensor, ...] = ()


@dataclass
class M3AEEncoding:
    last_hidden_state: torch.Tensor  # (B, 1 + N + L, D), after the final LayerNorm
    cls: torch.Tensor  # (B, D)
    image_tokens: torch.Tensor | None  # (B, N, D)
    text_tokens: torch.Tensor | None  # (B, L, D)
    hidden_states: tuple[torch.Tensor, ...] = ()  # per block, before the final LayerNorm
    attentions: tuple[torch.Tensor, ...] = ()  # per block (B, heads, S, S)


class M3AE(nn.Module):
    def __init__(self, config: M3AEConfig, initialize: bool = True) -> None:
        """`initialize=False` leaves the parameters as allocated: for weights loaded right after, or
        shapes only (on the meta device, where drawing normal values imports a 6 s, 70 MB decomposition)."""
        super().__init__()
        config.validate()
        self.config = c = config
        # How inputs were prepared in training (tokenizer name, pixel mean/std, crop scale, flip), as
        # the data pipeline records it; kept in config.json under "preprocessing" and read back by
        # `m3ae.create_model_and_transforms`. The network never reads it. None: not recorded.
        self.preprocessing: dict[str, Any] | None = None
        # Whether forward may size the CPU decoder from the batch (forward_decoder's `trim_padding`);
        # a runtime switch, not saved: static-shape compilation (engine.distributed.apply_compile)
        # turns it off, since a length that follows the data would recompile the blocks.
        self.trim_decoder_padding = True
        D, Dd = c.emb_dim, c.dec_emb_dim

        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.image_embedding = nn.Linear(c.patch_dim, D)
        self.image_mask_embedding = nn.Parameter(torch.zeros(1, 1, Dd))
        if c.has_text:
            # uninitialised, its own normal draw is skipped too (kept otherwise: seeded models stay as they were)
            self.text_embedding = nn.Embedding(c.vocab_size, D,
                                               _weight=None if initialize else torch.empty(c.vocab_size, D))
            self.text_mask_embedding = nn.Parameter(torch.zeros(1, 1, Dd))
        if c.use_type_embedding:
            self.encoder_image_type_embedding = nn.Parameter(torch.zeros(1, 1, D))
            self.decoder_image_type_embedding = nn.Parameter(torch.zeros(1, 1, Dd))
            if c.has_text:
                self.encoder_text_type_embedding = nn.Parameter(torch.zeros(1, 1, D))
                self.decoder_text_type_embedding = nn.Parameter(torch.zeros(1, 1, Dd))

        self.encoder = Transformer(D, c.depth, c.num_heads, c.mlp_ratio, c.layer_norm_eps, c.attn_impl, c.drop_path)
        self.decoder_input_projection = nn.Linear(D, Dd)
        self.decoder = Transformer(Dd, c.dec_depth, c.dec_num_heads, c.mlp_ratio, c.layer_norm_eps, c.attn_impl)
        self.decoder_image_output = OutputHead(Dd, c.patch_dim, c.output_head_depth, c.layer_norm_eps)
        if c.has_text:
            self.decoder_text_output = OutputHead(Dd, c.vocab_size, c.output_head_depth, c.layer_norm_eps)

        # Fixed sin-cos tables: buffers, not parameters, and recomputed rather than saved, so a
        # checkpoint loads at another image size.
        n_text = max(c.text_length, MAX_TEXT_POSITIONS)
        self.register_buffer("encoder_image_pos", sincos_buffer(sincos_2d(D, c.grid_size)), persistent=False)
        self.register_buffer("decoder_image_pos", sincos_buffer(sincos_2d(Dd, c.grid_size)), persistent=False)
        self.register_buffer("encoder_text_pos", sincos_buffer(sincos_1d(D, range(n_text))), persistent=False)
        self.register_buffer("decoder_text_pos", sincos_buffer(sincos_1d(Dd, range(n_text))), persistent=False)
        if initialize:
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Xavier-uniform Linear kernels and zero biases; N(0, 0.02) CLS/type/mask; N(0, 1) word embedding."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
        for name, param in self.named_parameters(recurse=False):
            nn.init.normal_(param, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay by the official list: biases, the CLS token,
        type and mask embeddings and the word embedding. LayerNorm scales are decayed."""
        return {
            name
            for name, _ in self.named_parameters()
            if name.endswith(".bias") or "." not in name or name == "text_embedding.weight"
        }

    # ------------------------------------------------------------------ patches
    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p·p·C); patches row-major, each flattened in (py, px, c) order."""
        p, g, C = self.config.patch_size, self.config.grid_size, self.config.in_chans
        B = image.shape[0]
        x = image.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, py, px, C)
        return x.reshape(B, g * g, p * p * C)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W)."""
        p, g, C = self.config.patch_size, self.config.grid_size, self.config.in_chans
        B = patches.shape[0]
        x = patches.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, py, gw, px)
        return x.reshape(B, C, g * p, g * p)

    # ------------------------------------------------------------------ inputs
    def _check_inputs(
        self, image: torch.Tensor | None, text: torch.Tensor | None, text_padding_mask: torch.Tensor | None
    ) -> tuple[int, torch.Tensor | None]:
        """Validates shapes and dtypes; returns the batch size and the padding mask as bool (True = pad)."""
        c = self.config
        if image is None and text is None:
            raise ValueError("M3AE needs `image`, `text` or both")
        batch = None
        if image is not None:
            expected = (c.in_chans, c.image_size, c.image_size)
            if image.ndim != 4 or tuple(image.shape[1:]) != expected:
                raise ValueError(f"image must have shape (B, {', '.join(map(str, expected))}), got {tuple(image.shape)}")
            if not image.is_floating_point():
                raise TypeError(f"image must be a float tensor (normalised pixels), got {image.dtype}")
            batch = image.shape[0]
        if text is None:
            if text_padding_mask is not None:
                raise ValueError("text_padding_mask given without text")
            return batch, None
        if not c.has_text:
            raise ValueError("this is an image-only (model_type='mae') model: it takes no text")
        if text.ndim != 2:
            raise ValueError(f"text must have shape (B, L), got {tuple(text.shape)}")
        if text.is_floating_point() or text.dtype == torch.bool:
            raise TypeError(f"text must hold integer token ids, got {text.dtype}")
        if text.shape[1] > self.encoder_text_pos.shape[1]:
            raise ValueError(f"text length {text.shape[1]} exceeds the {self.encoder_text_pos.shape[1]} positions")
        if batch is not None and text.shape[0] != batch:
            raise ValueError(f"image batch {batch} and text batch {text.shape[0]} differ")
        if text_padding_mask is None:
            text_padding_mask = torch.zeros_like(text, dtype=torch.bool)
        elif tuple(text_padding_mask.shape) != tuple(text.shape):
            raise ValueError(
                f"text_padding_mask must have the shape of text {tuple(text.shape)}, got {tuple(text_padding_mask.shape)}"
            )
        return text.shape[0], text_padding_mask.bool()

    def _embed_image(self, image: torch.Tensor) -> torch.Tensor:
        x = self.image_embedding(self.patchify(image)) + self.encoder_image_pos  # (B, N, D)
        if self.config.use_type_embedding:
            x = x + self.encoder_image_type_embedding
        return x

    def _embed_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.text_embedding(text) + self.encoder_text_pos[:, : text.shape[1]]  # (B, L, D)
        if self.config.use_type_embedding:
            x = x + self.encoder_text_type_embedding
        return x

    def _tokens(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        pad: torch.Tensor | None,
        image_masking: Masking | None = None,
        text_masking: Masking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input `[CLS, image tokens, text tokens]` (B, S, D) and its key padding (B, S),
        True = never attended to. With maskings, only the visible tokens, in the maskings' order."""
        reference = image if image is not None else text
        B, device = reference.shape[0], reference.device
        tokens = [self.cls_token.expand(B, -1, -1)]  # (B, 1, D)
        padding = [torch.zeros(B, 1, dtype=torch.bool, device=device)]
        if image is not None:
            x = self._embed_image(image)  # (B, N, D)
            if image_masking is not None:
                x = gather_tokens(x, image_masking.ids_keep)  # (B, keep_i, D)
            tokens.append(x)
            padding.append(torch.zeros(B, x.shape[1], dtype=torch.bool, device=device))
        if text is not None:
            x, text_pad = self._embed_text(text), pad  # (B, L, D)
            if text_masking is not None:
                # kept padding slots enter the encoder but are never attended to as keys
                x, text_pad = gather_tokens(x, text_masking.ids_keep), torch.gather(pad, 1, text_masking.ids_keep)
            tokens.append(x)
            padding.append(text_pad)
        return torch.cat(tokens, dim=1), torch.cat(padding, dim=1)

    def _decoder_tokens(self, visible: torch.Tensor, masking: Masking, modality: str) -> torch.Tensor:
        """Visible decoder tokens (B, keep, Dd) -> all positions (B, L, Dd) with mask tokens, positions, type."""
        x = unshuffle(visible, getattr(self, f"{modality}_mask_embedding"), masking.ids_restore)
        x = x + getattr(self, f"decoder_{modality}_pos")[:, : x.shape[1]]
        if self.config.use_type_embedding:
            x = x + getattr(self, f"decoder_{modality}_type_embedding")
        return x

    # ------------------------------------------------------------------ masked autoencoding
    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        *,
        image_noise: torch.Tensor | None = None,
        text_noise: torch.Tensor | None = None,
        compute_logits: bool = True,
        output_attentions: bool = False,
    ) -> M3AEOutput:
        """Paired (image + text), image-only (text=None) or text-only (image=None) masked autoencoding.

        `text_padding_mask`: (B, L) bool or float, True/1 = padding. Noise (B, L) or (L,): positions
        sorted ascending by noise, the first `keep` visible. `compute_logits=False` runs the text head
        only at removed positions (what the loss reads) and returns no `text_logits`.
        """
        c = self.config
        _, pad = self._check_inputs(image, text, text_padding_mask)
        image_masking, text_masking = self.random_masks(image, text, image_noise, text_noise, pad)
        latent, encoder_attentions = self.forward_encoder(image, text, pad, image_masking, text_masking, output_attentions)
        # When nothing returned reads the decoder at padding (the text head only where the loss reads,
        # no attention maps), the CPU decoder skips the batch's trailing padding (see forward_decoder).
        trim = (self.trim_decoder_padding and latent.device.type == "cpu"
                and not (compute_logits or c.text_loss_on_all or output_attentions))
        decoded_image, decoded_text, decoder_attentions = self.forward_decoder(
            latent, image_masking, text_masking, pad, output_attentions, trim_padding=trim
        )

        image_pred = image_loss = text_logits = text_loss = text_accuracy = None
        loss = latent.new_zeros((), dtype=torch.float32)
        if image is not None:
            image_pred, image_loss = self.forward_image_loss(decoded_image, image, image_masking)
            loss = loss + c.image_loss_weight * image_loss
        if text is not None:
            text_logits, text_loss, text_accuracy = self.forward_text_loss(
                decoded_text, text, pad, text_masking, compute_logits
            )
            loss = loss + c.text_loss_weight * text_loss

        return M3AEOutput(
            loss=loss,
            image_loss=image_loss,
            text_loss=text_loss,
            text_accuracy=text_accuracy,
            image_pred=image_pred,
            text_logits=text_logits,
            image_mask=image_masking.mask if image is not None else None,
            text_mask=text_masking.mask if text is not None else None,
            latent=latent,
            image_ids_keep=image_masking.ids_keep if image is not None else None,
            text_ids_keep=text_masking.ids_keep if text is not None else None,
            encoder_attentions=encoder_attentions,
            decoder_attentions=decoder_attentions,
        )

    def random_masks(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        image_noise: torch.Tensor | None = None,
        text_noise: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
    ) -> tuple[Masking | None, Masking | None]:
        """Per modality present: keep int(L·(1 - ratio)) positions, the lowest of independent noise
        (drawn here, image first, unless given); with text_mask_over "real", int(n_real·(1 - ratio))
        real tokens of each caption (`pad`: True = padding)."""
        c = self.config
        image_masking = text_masking = None
        if image is not None:
            B, N = image.shape[0], c.num_patches
            if image_noise is None:
                image_noise = draw_noise(B, N, c.masking, image.device)
            image_masking = random_masking(image_noise, B, N, c.image_keep)  # ids_keep (B, keep_i)
        if text is not None:
            B, L = text.shape
            if text_noise is None:
                text_noise = draw_noise(B, L, c.masking, text.device)
            if c.text_mask_over == "real":
                padding = torch.zeros_like(text, dtype=torch.bool) if pad is None else pad
                text_masking = real_token_masking(text_noise, padding, c.text_mask_ratio)
            else:
                text_masking = random_masking(text_noise, B, L, c.text_keep(L))  # ids_keep (B, keep_t)
        return image_masking, text_masking

    def forward_encoder(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        pad: torch.Tensor | None,
        image_masking: Masking | None,
        text_masking: Masking | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[CLS, visible image, visible text] -> latent (B, 1 + keep_i + keep_t, D) and attentions."""
        tokens, padding = self._tokens(image, text, pad, image_masking, text_masking)
        latent, attentions, _ = self.encoder(tokens, padding, output_attentions)
        return latent, attentions

    def forward_decoder(
        self,
        latent: torch.Tensor,
        image_masking: Masking | None,
        text_masking: Masking | None,
        pad: torch.Tensor | None,
        output_attentions: bool = False,
        trim_padding: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """Latent -> decoded image (B, N, Dd) and text (B, L, Dd) at every position (mask tokens at the
        removed ones), and attentions. The CLS token takes part but is not returned.

        `trim_padding`: drop the trailing positions that are padding in every caption of the batch
        before the decoder (text then (B, L', Dd), L' = the longest caption). No query attends to a
        padding key, so every other output is unchanged; the padding's own outputs are never read by
        the training loss. Real captions are mostly padding at text_length 64: this is decoder work
        the official code spends on them. Sizing a tensor from data syncs an accelerator, so callers
        ask for it on CPU only."""
        c = self.config
        B = latent.shape[0]
        projected = self.decoder_input_projection(latent)  # (B, 1 + keep_i + keep_t, Dd)
        tokens, padding = [projected[:, :1]], [torch.zeros(B, 1, dtype=torch.bool, device=latent.device)]
        if image_masking is not None:
            visible = projected[:, 1 : 1 + c.image_keep]  # (B, keep_i, Dd)
            tokens.append(self._decoder_tokens(visible, image_masking, "image"))  # (B, N, Dd)
            padding.append(torch.zeros(B, c.num_patches, dtype=torch.bool, device=latent.device))
        if text_masking is not None:
            visible = projected[:, projected.shape[1] - text_masking.ids_keep.shape[1] :]  # (B, keep_t, Dd)
            tokens.append(self._decoder_tokens(visible, text_masking, "text"))  # (B, L, Dd)
            padding.append(pad)
        x, key_padding = torch.cat(tokens, dim=1), torch.cat(padding, dim=1)  # (B, 1 + N + L, Dd), (B, 1 + N + L)
        if trim_padding and text_masking is not None:
            length = int((~key_padding).any(dim=0).nonzero().max()) + 1  # the CLS position is never padding
            x, key_padding = x[:, :length], key_padding[:, :length]
        decoded, attentions, _ = self.decoder(x, key_padding, output_attentions)
        n_image = c.num_patches if image_masking is not None else 0
        decoded_image = decoded[:, 1 : 1 + n_image] if image_masking is not None else None
        decoded_text = decoded[:, 1 + n_image :] if text_masking is not None else None
        return decoded_image, decoded_text, attentions

    def forward_image_loss(
        self, decoded_image: torch.Tensor, image: torch.Tensor, masking: Masking
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches (B, N, P) and their MSE against the (optionally per-patch normalised)
        pixels, at removed patches (or all with `image_loss_on_all`)."""
        c = self.config
        image_pred = self.decoder_image_output(decoded_image)  # (B, N, P)
        target = self.patchify(image)  # (B, N, P)
        if c.norm_pix_loss:
            target = normalize_patches(target.float())
        weight = torch.ones_like(masking.mask) if c.image_loss_on_all else masking.mask
        return image_pred, patch_mse_loss(image_pred, target, weight)

    def forward_text_loss(
        self, decoded_text: torch.Tensor, text: torch.Tensor, pad: torch.Tensor, masking: Masking, compute_logits: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Logits (B, L, V) or None, and cross-entropy and accuracy at removed real words (or at every
        real word with `text_loss_on_all`)."""
        c = self.config
        if compute_logits or c.text_loss_on_all:
            text_logits = self.decoder_text_output(decoded_text)  # (B, L, V)
            real = (~pad).float()
            weight = real if c.text_loss_on_all else masking.mask * real
            return (text_logits, *masked_cross_entropy(text_logits, text, weight))
        return (None, *self._text_loss_where_read(decoded_text, text, pad, masking,
                                                  sync_free=decoded_text.device.type != "cpu"))

    def _text_loss_where_read(
        self, decoded_text: torch.Tensor, text: torch.Tensor, pad: torch.Tensor, masking: Masking, sync_free: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text loss with the V-way head run only where the loss reads. On accelerators, at every
        removed position (a fixed shape, so no host-device sync); on CPU, where sizing a tensor from
        data costs nothing, only at removed real words."""
        if sync_free:
            removed = masking.ids_removed  # (B, L - keep_t)
            logits = self.decoder_text_output(gather_tokens(decoded_text, removed))  # (B, L - keep_t, V)
            return masked_cross_entropy(logits, torch.gather(text, 1, removed), torch.gather((~pad).float(), 1, removed))
        rows, cols = (masking.mask.bool() & ~pad).nonzero(as_tuple=True)
        logits = self.decoder_text_output(decoded_text[rows, cols])  # (M, V)
        return cross_entropy_by_sample(logits, text[rows, cols], torch.ones_like(rows), rows, text.shape[0])

    # ------------------------------------------------------------------ representations
    def encode(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> M3AEEncoding:
        """Unmasked encoder over `[CLS, all patches, all text]` (either modality may be absent): the
        representation used for transfer; the linear probe reads `cls` of the image-only sequence."""
        _, pad = self._check_inputs(image, text, text_padding_mask)
        tokens, padding = self._tokens(image, text, pad)  # (B, 1 + N + L, D)
        # an image alone has no padding: no mask lets the attention take its fastest path
        x, attentions, hidden_states = self.encoder(
            tokens, padding if text is not None else None, output_attentions, output_hidden_states
        )
        n_image = self.config.num_patches if image is not None else 0
        return M3AEEncoding(
            last_hidden_state=x,
            cls=x[:, 0],
            image_tokens=x[:, 1 : 1 + n_image] if image is not None else None,
            text_tokens=x[:, 1 + n_image :] if text is not None else None,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path, card_info: dict | None = None) -> Path:
        """Writes `config.json` and `model.safetensors` (atomically: temp files, then rename), and a
        model card `README.md` when `card_info` is given (see `m3ae.model.hub.model_card`)."""
        from safetensors.torch import save_file

        from ..utils import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "m3ae_config": json.dumps(self.config.to_dict())})
        with atomic_path(directory / CONFIG_NAME) as tmp:
            self.config.save(tmp, self.preprocessing)
        if card_info is not None:
            from .hub import model_card

            with atomic_path(directory / "README.md") as tmp:
                tmp.write_text(model_card(self.config, card_info))
        return directory

    def push_to_hub(self, repo_id: str, **kwargs) -> object:
        """Uploads config, weights and a model card to the Hugging Face Hub (`m3ae.model.hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None, *, cache_dir: str | None = None,
                        force_download: bool = False, local_files_only: bool = False, token: str | None = None,
                        **config_overrides) -> "M3AE":
        """Loads a `save_pretrained` directory, a run or checkpoint directory, or a Hub repo id (with
        huggingface_hub's revision, cache, offline and token arguments). Overrides may change
        non-structural fields (mask ratios, loss options, attention implementation, image size)."""
        from safetensors.torch import load_file

        from .files import resolve, weights_header

        download = dict(cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only,
                        token=token)
        directory = resolve(name_or_path, revision, **download)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: expected a directory written by save_pretrained")
        try:
            stored = json.loads(config_path.read_text())
            backbone, preprocessing = stored.get("backbone"), stored.get("preprocessing")
        except (ValueError, AttributeError):
            backbone = preprocessing = None  # M3AEConfig.load below says what is wrong with the file
        # A linear-probe or fine-tuning checkpoint: its weights are a classifier's, whose backbone is the
        # image encoder alone, so the model comes back as that encoder (encode(image)).
        prefix = "backbone." if backbone is not None else ""
        config = M3AEConfig.load(config_path, section="backbone" if prefix else None)
        config = config.replace(**config_overrides) if config_overrides else config
        header = {name.removeprefix(prefix): value for name, value in weights_header(weights_path).items()
                  if name.startswith(prefix)}
        check_weights(config, header, f"{weights_path} (with {config_path})", encoder_only=bool(prefix))
        state = {k.removeprefix(prefix): v for k, v in load_file(str(weights_path)).items() if k.startswith(prefix)}
        check_finite(state, str(weights_path))
        if prefix:
            from .classifier import image_encoder

            model = image_encoder(cls(config))
        else:
            model = cls(config)
        model.load_state_dict(state)
        model.preprocessing = preprocessing if isinstance(preprocessing, dict) else None
        return model
