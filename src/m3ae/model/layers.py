"""Transformer building blocks shared by the encoder and decoder (pre-norm ViT, as the official code)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), dim): concat(sin(pos·omega), cos(pos·omega)), omega_i = 10000^(-i/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², dim) for row-major patches: first half encodes the column, second half the row."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def sincos_buffer(table: np.ndarray) -> torch.Tensor:
    """(1, n, dim) float32, ready to be added to a batch of tokens."""
    return torch.from_numpy(table).float().unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, impl: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, D = x.shape
        # (B, S, 3·D) -> 3 × (B, heads, S, head_dim); the (3, heads, head_dim) split is the official one
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attention = None
        # On CPU the written-out softmax ties the fused kernel or beats it (up to 2.3x in bf16) at the
        # sizes measured (bench/step_ab.py --switch attention); accelerators take the fused kernel.
        explicit = self.impl == "math" or (self.impl == "auto" and x.device.type == "cpu")
        if return_attention or explicit:
            attention = self._probabilities(q, k, key_padding_mask)  # (B, heads, S, S)
            out = attention @ v
        else:
            # SDPA's boolean mask is True where attention is allowed; the CLS key is never padding,
            # so no row is fully masked.
            allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, S, D)
        return self.proj(out), attention if return_attention else None

    def _probabilities(self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(scale·QK^T + padding bias), with the scale and the mask folded into one baddbmm:
        no scaled copy of Q and no masked copy of the (B, heads, S, S) logits, forward or backward."""
        B, H, S, Dh = q.shape
        if key_padding_mask is None:
            bias, beta = q.new_zeros(()).expand(B * H, 1, S), 0.0
        else:
            bias = q.new_zeros(B, 1, 1, S).masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
            bias, beta = bias.expand(B, H, 1, S).reshape(B * H, 1, S), 1.0
        logits = torch.baddbmm(
            bias, q.reshape(B * H, S, Dh), k.reshape(B * H, S, Dh).transpose(1, 2), beta=beta, alpha=self.scale
        )  # (B·heads, S, S)
        return logits.softmax(dim=-1).view(B, H, S, S)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The official GELU: tanh form (flax's default). A bfloat16 tensor on the CPU takes the exact erf
    form: ATen's tanh form costs 1.7-2.6x the erf form there (its tanh is SLEEF's accurate one), and in
    bfloat16 the two are the same function: the forms differ by at most 4.7e-4 (derivatives 8.7e-4),
    a sixteenth of bfloat16's spacing where they differ most, and ATen's bfloat16 results agree
    bit for bit on 97.8 % of inputs. Measured (bench/step_ab.py --switch gelu): the demo model's bf16
    training step 1.10x faster; small-224's within its noise (GELU is ~2 % of that step). fp32 and
    other devices keep the tanh form: parity with the official step."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    survivors = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * survivors / keep


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_impl: str, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        attn_out, attention = self.attn(self.norm1(x), key_padding_mask, return_attention)
        x = x + drop_path(attn_out, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return (x, attention) if return_attention else x


class Transformer(nn.Module):
    """A stack of blocks followed by a final LayerNorm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        eps: float,
        attn_impl: str,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        rates = np.linspace(0.0, drop_path, depth) if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, eps, attn_impl, float(rate)) for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Returns (normed output, attention probabilities per block, per-block outputs before the norm)."""
        attentions, hidden_states = [], []
        for block in self.blocks:
            if output_attentions:
                x, attention = block(x, key_padding_mask, return_attention=True)
                attentions.append(attention)
            else:
                x = block(x, key_padding_mask)
            if output_hidden_states:
                hidden_states.append(x)
        return self.norm(x), tuple(attentions), tuple(hidden_states)


class OutputHead(nn.Module):
    """Decoder output head: a Linear, or with depth k > 0 the official MLP
    LN -> k × [Linear -> GELU -> LN] (residual from the second layer on) -> Linear."""

    def __init__(self, dim: int, out_dim: int, depth: int, eps: float) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(dim, eps=eps) if depth > 0 else nn.Identity()
        self.hidden = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.hidden_norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in range(depth))
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        for i, (linear, norm) in enumerate(zip(self.hidden, self.hidden_norms)):
            y = norm(gelu(linear(x)))
            x = x + y if i > 0 else y
        return self.out(x)
