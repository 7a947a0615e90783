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


class _LoraMoEInPlace(torch.autograd.Function):
    """Router and experts of one LoRAMoE layer as one autograd node, adding the mixture to the base
    layer's output in place; returns ``(out, gates)``.

    Autograd alone would keep a float copy of the dropped-out input, the rank-space activations
    before and after gating and a separate delta tensor, and would read x, write the input
    gradient and add it up separately for the router and the experts. This keeps x (the base layer
    keeps it anyway), a one-byte dropout mask, the (N, E) gates and the (N, E*r) activations; without
    dropout, router and experts share one matmul over x forwards and one each way backwards. The
    dropout scale 1/(1-p) rides on the gates. On this CPU, passes over (N, d) tensors cost more than
    the arithmetic, so every pass saved counts.
    """

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, router_weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                scale: float, drop: Tensor | None, keep_scale: float) -> tuple[Tensor, Tensor]:
        num_experts, rank, d_in = lora_A.shape
        d_out = lora_B.shape[1]
        x2 = x.reshape(-1, d_in)  # (N, d_in)
        a_cat = lora_A.reshape(num_experts * rank, d_in)  # (E*r, d_in)
        shared = drop is None and x.dtype == torch.float32 and router_weight.dtype == torch.float32
        if shared:  # one pass over x for router and experts
            both = x2 @ torch.cat([a_cat, router_weight]).T  # (N, E*r + E)
            h, logits = both[:, :-num_experts], both[:, -num_experts:]
        else:
            logits = x2.float() @ router_weight.float().T  # (N, E) in float32
            h = (x2 if drop is None else x2.masked_fill(drop.reshape(-1, d_in), 0.0)) @ a_cat.T  # (N, E*r)
        gates = torch.softmax(logits, dim=-1)  # (N, E) float32
        weights = (gates * (scale * keep_scale)).to(h.dtype).repeat_interleave(rank, dim=1)  # (N, E*r)
        b_cat = lora_B.permute(1, 0, 2).reshape(d_out, num_experts * rank)  # (d_out, E*r)
        out.view(-1, d_out).addmm_(h * weights, b_cat.T)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, router_weight, lora_A, lora_B, drop, gates, h)
        ctx.scale, ctx.keep_scale, ctx.shared = scale, keep_scale, shared
        return out, gates.view(*x.shape[:-1], num_experts)

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_gates_out: Tensor | None):
        x, router_weight, lora_A, lora_B, drop, gates, h = ctx.saved_tensors
        num_experts, rank, d_in = lora_A.shape
        d_out = lora_B.shape[1]
        g = grad_out.reshape(-1, d_out)  # (N, d_out)
        x2 = x.reshape(-1, d_in)
        a_cat = lora_A.reshape(num_experts * rank, d_in)
        b_cat = lora_B.permute(1, 0, 2).reshape(d_out, num_experts * rank)
        gate_scale = ctx.scale * ctx.keep_scale
        weights = (gates * gate_scale).to(h.dtype).repeat_interleave(rank, dim=1)  # (N, E*r)
        grad_hw = g @ b_cat  # (N, E*r): gradient of the gated activations
        grad_b = (g.T @ (h * weights)).view(d_out, num_experts, rank).permute(1, 0, 2)  # (E, d_out, r)
        grad_gates = (grad_hw * h).view(-1, num_experts, rank).sum(-1).float() * gate_scale  # (N, E)
        if grad_gates_out is not None:  # a loss on the gates themselves (the balancing constraint)
            grad_gates = grad_gates + grad_gates_out.reshape(-1, num_experts)
        grad_logits = gates * (grad_gates - (grad_gates * gates).sum(-1, keepdim=True))  # softmax backward
        grad_h = grad_hw * weights
        if ctx.shared:
            grad_both = torch.cat([grad_h, grad_logits], dim=1)  # (N, E*r + E)
            grad_x = grad_both @ torch.cat([a_cat, router_weight])
            grad_params = grad_both.T @ x2
            grad_a, grad_router = grad_params[:-num_experts], grad_params[-num_experts:]
        else:
            dropped = x2 if drop is None else x2.masked_fill(drop.reshape(-1, d_in), 0.0)
            grad_x = grad_h @ a_cat
            if drop is not None:
                grad_x.masked_fill_(drop.reshape(-1, d_in), 0.0)
            grad_x = grad_x.addmm_(grad_logits.to(grad_x.dtype), router_weight.to(grad_x.dtype))
            grad_a = grad_h.T @ dropped
            grad_router = grad_logits.T @ x2.float()
        return (grad_out, grad_x.view_as(x), grad_router.to(router_weight.dtype),
                grad_a.view(num_experts, rank, d_in), grad_b.contiguous(), None, None, None)


def loramoe_inplace(out: Tensor, x: Tensor, router_weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    scale: float, dropout: float = 0.0, training: bool = False) -> tuple[Tensor, Tensor]:
    """``(out + loramoe_delta(...), gates)`` by one fused autograd node that writes into ``out``
    (a fresh tensor such as a layer's output, in the adapter's dtype). The gates (..., E) are
    float32 and differentiable. Dropout draws :func:`dropout_drop_mask`."""
    drop = dropout_drop_mask(x.shape, dropout, x.device) if training and dropout > 0 else None
    return _LoraMoEInPlace.apply(out, x, router_weight, lora_A, lora_B, scale, drop,
                                 1.0 / (1.0 - dropout) if drop is not None else 1.0)
