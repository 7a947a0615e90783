"""The adapter maths as pure tensor functions: no parameters, no modules, no model.

Shapes follow the on-disk layout (see docs/format.md):

- LoRA: ``A`` (r, d_in), ``B`` (d_out, r).
- LoRAMoE: router ``W_g`` (E, d_in), ``A`` (E, r, d_in), ``B`` (E, d_out, r).

LoRAMoE (arXiv 2312.09979), per token ``x``::

    y = W0 x + s * sum_i g_i(x) * B_i A_i dropout(x),   g(x) = softmax(W_g x),   s = alpha / r

Production form: the E experts' ``A`` are one (E*r, d_in) matrix and their ``B`` one (d_out, E*r)
matrix, so the whole mixture is two matmuls with the gates broadcast over each expert's r columns
in between::

    x --dropout--> [A_1; ...; A_E] --> h (E*r) --* (g_i * s per block of r)--> [B_1 ... B_E] --> delta
    x -----------> W_g --> softmax (fp32) --> g (E) ---^

The shared form draws one dropout mask for all experts; the reference code draws one per expert.
Both are equal in expectation; equivalence tests run without dropout. The production op, which
also folds in the base layer and serves projections that share their input together, is
:mod:`loramoe.fused`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout: float = 0.0,
               training: bool = False) -> Tensor:
    """``scale * B A dropout(x)`` for x of shape (..., d_in); returns (..., d_out)."""
    h = F.linear(F.dropout(x, dropout, training), lora_A)  # (..., r)
    return F.linear(h, lora_B) * scale


def lora_delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """The dense update ``scale * B A`` of shape (d_out, d_in) that merging adds to W0."""
    return (lora_B @ lora_A) * scale


def router_gates(x: Tensor, router_weight: Tensor) -> Tensor:
    """Dense softmax gates in float32, whatever the input dtype: (..., d_in) -> (..., E)."""
    return torch.softmax(F.linear(x.float(), router_weight.float()), dim=-1)


def loramoe_delta(x: Tensor, gates: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                  dropout: float = 0.0, training: bool = False) -> Tensor:
    """The gated expert mixture in the concatenated two-matmul form.

    x (..., d_in), gates (..., E), lora_A (E, r, d_in), lora_B (E, d_out, r) -> (..., d_out).
    """
    num_experts, rank, d_in = lora_A.shape
    d_out = lora_B.shape[1]
    h = F.linear(F.dropout(x, dropout, training), lora_A.reshape(num_experts * rank, d_in))  # (..., E*r)
    weights = (gates * scale).to(h.dtype).unsqueeze(-1)  # (..., E, 1)
    h = (h.unflatten(-1, (num_experts, rank)) * weights).flatten(-2)  # (..., E*r)
    b_cat = lora_B.permute(1, 0, 2).reshape(d_out, num_experts * rank)  # (d_out, E*r)
    return F.linear(h, b_cat)


def dropout_drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A boolean mask of the elements dropout zeroes, each with probability p.

    On the CPU, drawing one random number per element (as ``F.dropout`` does) costs more than all
    of an adapter's matmuls together, so the mask comes from random 64-bit words split into four
    16-bit lanes: a quarter of the draws, with p rounded to a multiple of 1/65536. Both draw from
    torch's default generator, so ``torch.manual_seed`` makes them reproducible. A bool mask applied
    with ``masked_fill`` costs one pass and no float copy of the mask.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) < p
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    lanes = words.view(torch.int16)[:n]  # uniform over [-32768, 32767]
    return (lanes < round(p * 65536) - 32768).view(shape)
