"""The production LoRAMoE op: frozen base projections that read the same input, with their
mixtures of LoRA experts, as one autograd node (or, without autograd, as plain tensor ops).

Per member k of a group (e.g. a Llama MLP's ``gate_proj`` and ``up_proj``, which both read x)::

    y_k = W_k x + b_k + sum_i g_ki(x) * s * B_ki A_ki drop(x),   g_k(x) = gates(R_k x) (fp32)

where ``gates`` and its backward are :mod:`loramoe.router`'s, the one router every path shares.

Why one node for the group, with the base matmul inside it: at small widths a training step is
bound by passes over (tokens x width) tensors, not by arithmetic, and autograd alone would make
many. Here, for the whole group:

- one dropout draw for the group, one pass over the dropped-out input for all experts and one
  for all their weight gradients. The routers see x without dropout, so with dropout they take
  their own pass over x (a (tokens x K*E) product, cheaper than patching the shared product with
  the dropped elements' share by index, which the CPU does at a few elements per ns); without
  dropout routers and experts share one pass;
- the small rank-space product writes each output first and the base matmul accumulates onto it
  (a large matmul reads its accumulator almost for free), and the same for the input gradient:
  it is written once for the base layers, the experts and the routers together, where autograd
  would write one tensor per branch and add them up;
- saved for backward: the gates (N, K, E), the rank-space activations (N, K*E*r), one input per
  group and what dropout dropped (flat indices on the CPU, p of the elements; a one-byte mask on
  a GPU); the dropped-out x is recomputed, a copy that costs less than keeping it. PEFT's LoRA
  saves a float copy of dropout(x) per projection, gate_proj and up_proj each.

Adapter maths runs in the model's dtype (the routers' fp32 weights are cast to it for their
matmul) and the router's logits-to-gates step in fp32, so gates are fp32. The dropout scale
1/(1-p) rides on the gates.
Members share one expert count, rank and scale (they come from one config).

A member without a weight (a quantized base, whose packed weight only its own module can use) gets
the experts' part alone: the caller adds the base layer's output, and its gradient to x, itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from loramoe import router
from loramoe.functional import drop_inputs, zero_dropped_


class Member(NamedTuple):
    """One projection of a group: its frozen base and its experts, in the on-disk layouts."""

    weight: Tensor | None
    """(d_out, d_in), frozen (a transposed view for a Conv1D base); None: the caller computes the
    base (its bias included, so ``bias`` is None too)."""
    bias: Tensor | None
    router: Tensor
    """(E, d_in), float32."""
    lora_A: Tensor
    """(E, r, d_in)."""
    lora_B: Tensor
    """(E, d_out, r)."""


class Experts(NamedTuple):
    """A group's experts concatenated for the two-matmul form, in the model's dtype."""

    a: Tensor
    """(K*E*r, d_in): every member's A, member-major."""
    router: Tensor
    """(K*E, d_in): every member's router."""
    both: Tensor | None
    """``cat([a, router])`` for the one shared pass over x without dropout, else None."""
    b: list[Tensor]
    """Per member, (d_out, E*r): B_1 ... B_E side by side, times ``b_scale``."""


def concat_experts(members: Sequence[Member], dtype: torch.dtype, *, shared_pass: bool,
                   b_scale: float = 1.0) -> Experts:
    """The concatenated expert matrices of a group (a few small copies per call)."""
    a = torch.cat([m.lora_A.flatten(0, 1) for m in members]).to(dtype)
    routers = torch.cat([m.router for m in members]).to(dtype)
    b = [m.lora_B.permute(1, 0, 2).reshape(m.lora_B.shape[1], -1).to(dtype) for m in members]
    if b_scale != 1.0:
        b = [t * b_scale for t in b]
    return Experts(a, routers, torch.cat([a, routers]) if shared_pass else None, b)


def _mixture_forward(x2: Tensor, drop: Tensor | None, gate_scale: float, bases: Sequence[tuple[Tensor, Tensor | None]],
                     experts: Experts, num_experts: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """(outputs (N, d_out_k), gates (N, K, E) fp32, rank-space activations (N, K*E*r)) for x2 (N, d_in)."""
    n, k, e = x2.shape[0], len(bases), num_experts
    ker = experts.a.shape[0]
    if drop is not None:  # the routers read x itself
        h = drop_inputs(x2, drop) @ experts.a.T
        logits = x2 @ experts.router.T
    else:  # one pass for routers and experts
        both = x2 @ experts.both.T  # (N, K*E*r + K*E)
        h, logits = both[:, :ker], both[:, ker:]
    gates = router.gates_from_logits(logits.view(n, k, e))  # (N, K, E)
    weights = gates * gate_scale if gate_scale != 1.0 else gates
    hw = (h.view(n, k, e, -1) * weights.to(h.dtype).unsqueeze(-1)).view(n, ker)
    width = ker // k
    outs = []
    for i, (weight, bias) in enumerate(bases):
        cols = hw[:, i * width:(i + 1) * width]
        out = cols @ experts.b[i].T if bias is None else torch.addmm(bias, cols, experts.b[i].T)
        outs.append(out if weight is None else out.addmm_(x2, weight.T))  # the large matmul accumulates onto it
    return outs, gates, h


class _LoraMoEGroup(torch.autograd.Function):
    """See the module docstring. Inputs: x, drop, gate_scale, num_experts, then per member its
    five ``Member`` fields; outputs: each member's output, then the gates (..., K, E)."""

    @staticmethod
    def forward(ctx, x: Tensor, drop: Tensor | None, gate_scale: float, num_experts: int,
                *flat: Tensor | None) -> tuple[Tensor, ...]:
        members = [Member(*flat[i:i + 5]) for i in range(0, len(flat), 5)]
        x2 = x.reshape(-1, x.shape[-1])
        experts = concat_experts(members, x.dtype, shared_pass=drop is None)
        bases = [(m.weight, m.bias) for m in members]
        outs, gates, h = _mixture_forward(x2, drop, gate_scale, bases, experts, num_experts)
        ctx.save_for_backward(x2, drop, gates, h, experts.a, experts.router, *experts.b,
                              *(m.weight for m in members))
        ctx.gate_scale, ctx.num_members, ctx.router_dtype = gate_scale, len(members), members[0].router.dtype
        ctx.x_shape = x.shape
        lead = x.shape[:-1]
        return (*(out.view(*lead, -1) for out in outs), gates.view(*lead, *gates.shape[1:]))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x2, drop, gates, h, a_cat, router_cat, *rest = ctx.saved_tensors
        k = ctx.num_members
        b_cats, weights = rest[:k], rest[k:]
        n, _, e = gates.shape
        g_outs = [g.reshape(n, -1) for g in grads[:k]]
        ker = a_cat.shape[0]
        width = ker // k
        gate_w = (gates * ctx.gate_scale).to(h.dtype).unsqueeze(-1)  # (N, K, E, 1)
        hw = (h.view(n, k, e, -1) * gate_w).view(n, ker)
        grad_hw = torch.cat([g @ b for g, b in zip(g_outs, b_cats)], dim=1) if k > 1 else g_outs[0] @ b_cats[0]
        grad_b = [(hw[:, i * width:(i + 1) * width].T @ g).view(e, -1, g.shape[1]).transpose(1, 2)
                  for i, g in enumerate(g_outs)]  # (E, d_out, r); this order of the product is the faster
        grad_gates = (grad_hw.view(n, k, e, -1) * h.view(n, k, e, -1)).sum(-1).float() * ctx.gate_scale
        grad_gates = grad_gates + grads[k].reshape(n, k, e)  # a loss on the gates (the balancing constraint)
        grad_logits = router.logits_grad(gates, grad_gates)
        grad_h = (grad_hw.view(n, k, e, -1) * gate_w).view(n, ker)
        grad_logits = grad_logits.view(n, k * e).to(h.dtype)
        grad_x = None
        if drop is not None:  # the dropped-out x recomputed: a copy, cheaper to make than to keep
            if ctx.needs_input_grad[0]:
                grad_x = zero_dropped_(grad_h @ a_cat, drop).addmm_(grad_logits, router_cat)
            grad_a = grad_h.T @ drop_inputs(x2, drop)
            grad_router = grad_logits.T @ x2
        else:
            grad_both = torch.cat([grad_h, grad_logits], dim=1)
            grad_params = grad_both.T @ x2
            grad_a, grad_router = grad_params[:ker], grad_params[ker:]
            if ctx.needs_input_grad[0]:
                grad_x = grad_both @ torch.cat([a_cat, router_cat])
        if grad_x is not None:
            for g, weight in zip(g_outs, weights):
                if weight is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.x_shape)
        member_grads = []
        for i in range(k):
            member_grads += [None, None, grad_router[i * e:(i + 1) * e].to(ctx.router_dtype),
                             grad_a[i * width:(i + 1) * width].view(e, -1, x2.shape[1]), grad_b[i]]
        return (grad_x, None, None, None, *member_grads)


def loramoe_group(x: Tensor, members: Sequence[Member], scale: float, drop: Tensor | None = None,
                  keep_scale: float = 1.0) -> tuple[list[Tensor], Tensor]:
    """Each member's output (..., d_out_k) and the gates (..., K, E) fp32, differentiable in x, the
    routers, the experts and (through the gates) in a loss on the gates. ``drop`` names the inputs
    dropout zeroes for the experts, as :func:`loramoe.functional.dropout_positions` gives them (a
    bool mask of x's shape or flat indices); ``keep_scale`` is then 1/(1-p)."""
    flat = [t for m in members for t in m]
    if drop is not None and drop.dtype == torch.bool:
        drop = drop.reshape(-1, x.shape[-1])
    *outs, gates = _LoraMoEGroup.apply(x, drop, scale * keep_scale, members[0].lora_A.shape[0], *flat)
    return outs, gates


class InferencePlan(NamedTuple):
    """A group's tensors laid out for generation, prepared once while the weights stay the same."""

    both_t: Tensor
    """(d_in, K*E*r + K*E): every member's A, then every router, for one matmul."""
    b_t: list[Tensor]
    """Per member, (E*r, d_out): B_1 ... B_E stacked, times the scale."""
    weight_t: list[Tensor | None]
    """Per member, the base weight as (d_in, d_out), or None (see ``Member.weight``)."""
    bias: list[Tensor | None]
    num_experts: int


def inference_plan(members: Sequence[Member], dtype: torch.dtype, scale: float) -> InferencePlan:
    experts = concat_experts(members, dtype, shared_pass=True, b_scale=scale)
    return InferencePlan(experts.both.T.contiguous(), [b.T.contiguous() for b in experts.b],
                         [None if m.weight is None else m.weight.T for m in members], [m.bias for m in members],
                         members[0].lora_A.shape[0])


def loramoe_group_inference(x: Tensor, plan: InferencePlan) -> tuple[list[Tensor], Tensor]:
    """The forward of :func:`loramoe_group` without autograd or dropout, for generation. Decoding
    runs this once per group and token on a few rows, where each tensor op costs more in dispatch
    than in arithmetic, so it makes as few as the maths allows: one matmul for all routers and
    experts, the router's gates, one gating product, then per member the base matmul and the small
    matmul accumulating onto it. The other way round from training, where the large matmul accumulates
    onto the small one: on a few rows (a matrix-vector product that streams the weight) the CPU's
    addmm with the base weight ran at half the speed of a plain mm on the embedded model."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n, k, e = x2.shape[0], len(plan.b_t), plan.num_experts
    ker = plan.both_t.shape[1] - k * e
    both = x2 @ plan.both_t
    gates = router.gates_from_logits(both[:, ker:].view(n, k, e))
    weights = gates if both.dtype == torch.float32 else gates.to(both.dtype)
    hw = (both[:, :ker].view(n, k, e, -1) * weights.unsqueeze(-1)).view(n, ker)
    width = ker // k
    outs = []
    for i, (b_t, weight_t, bias) in enumerate(zip(plan.b_t, plan.weight_t, plan.bias)):
        cols = hw if k == 1 else hw[:, i * width:(i + 1) * width]
        if weight_t is None:
            outs.append(torch.mm(cols, b_t).view(*lead, -1))
            continue
        out = torch.mm(x2, weight_t) if bias is None else torch.addmm(bias, x2, weight_t)
        outs.append(out.addmm_(cols, b_t).view(*lead, -1))
    return outs, gates.view(*lead, k, e)
