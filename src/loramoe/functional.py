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
Both are equal in expectation; equivalence tests run without dropout.
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


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A boolean keep mask, each element kept with probability 1 - p.

    On the CPU, drawing one random number per element (as ``F.dropout`` does) costs more than all
    of an adapter's matmuls together, so the mask comes from random 64-bit words split into four
    16-bit lanes: a quarter of the draws, with p rounded to a multiple of 1/65536. Both draw from
    torch's default generator, so ``torch.manual_seed`` makes them reproducible.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    lanes = words.view(torch.int16)[:n]  # uniform over [-32768, 32767]
    return (lanes >= round(p * 65536) - 32768).view(shape)


class _AddLoraMoE(torch.autograd.Function):
    """``out += sum_i gates_i * B_i A_i dropout(x)``, in place on the base layer's output.

    Autograd would keep the dropped-out input (a float copy of x), the rank-space activations before
    and after gating and a separate delta tensor; this keeps x (the base layer keeps it anyway), a
    one-byte dropout mask, the (N, E) gates and the (N, E*r) rank-space activations, and writes the
    mixture straight into the base output with one addmm.
    """

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, gates: Tensor, lora_A: Tensor, lora_B: Tensor,
                keep: Tensor | None, keep_scale: float) -> Tensor:
        num_experts, rank, d_in = lora_A.shape
        d_out = lora_B.shape[1]
        x2 = x.reshape(-1, d_in)  # (N, d_in)
        xd = x2 if keep is None else x2 * keep.reshape(-1, d_in) * keep_scale
        a_cat = lora_A.reshape(num_experts * rank, d_in)  # (E*r, d_in)
        b_cat = lora_B.permute(1, 0, 2).reshape(d_out, num_experts * rank)  # (d_out, E*r)
        h = xd @ a_cat.T  # (N, E*r)
        weights = gates.reshape(-1, num_experts).to(h.dtype).repeat_interleave(rank, dim=1)  # (N, E*r)
        out.view(-1, d_out).addmm_(h * weights, b_cat.T)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, gates, lora_A, lora_B, keep, h)
        ctx.keep_scale = keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gates, lora_A, lora_B, keep, h = ctx.saved_tensors
        num_experts, rank, d_in = lora_A.shape
        d_out = lora_B.shape[1]
        g = grad_out.reshape(-1, d_out)  # (N, d_out)
        x2 = x.reshape(-1, d_in)
        xd = x2 if keep is None else x2 * keep.reshape(-1, d_in) * ctx.keep_scale
        a_cat = lora_A.reshape(num_experts * rank, d_in)
        b_cat = lora_B.permute(1, 0, 2).reshape(d_out, num_experts * rank)
        weights = gates.reshape(-1, num_experts).to(h.dtype).repeat_interleave(rank, dim=1)
        grad_hw = g @ b_cat  # (N, E*r): gradient of the gated rank-space activations
        grad_b = (g.T @ (h * weights)).view(d_out, num_experts, rank).permute(1, 0, 2)  # (E, d_out, r)
        grad_gates = (grad_hw * h).view(-1, num_experts, rank).sum(-1)  # (N, E)
        grad_h = grad_hw * weights
        grad_a = (grad_h.T @ xd).view(num_experts, rank, d_in)
        grad_x = grad_h @ a_cat  # (N, d_in)
        if keep is not None:
            grad_x = grad_x * keep.reshape(-1, d_in) * ctx.keep_scale
        return (grad_out, grad_x.view_as(x), grad_gates.view_as(gates).to(gates.dtype), grad_a, grad_b.contiguous(),
                None, None)


def add_loramoe(out: Tensor, x: Tensor, gates: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                dropout: float = 0.0, training: bool = False) -> Tensor:
    """``out + loramoe_delta(...)``, computed in place on ``out`` by a fused autograd function
    (``out`` must be a fresh tensor such as a layer's output, in the adapter's dtype). Dropout uses
    :func:`dropout_keep_mask`. Returns ``out``."""
    keep = dropout_keep_mask(x.shape, dropout, x.device) if training and dropout > 0 else None
    return _AddLoraMoE.apply(out, x, gates * scale, lora_A, lora_B, keep, 1.0 / (1.0 - dropout))
