"""The adapter maths as pure tensor functions: no parameters, no modules, no model.

Shapes follow the on-disk layout (see docs/format.md):

- LoRA: ``A`` (r, d_in), ``B`` (d_out, r).
- Tied LoRA: ``A`` (r, d_in) and ``B`` (d_out, r) shared by the layers, per layer ``u`` (r) and
  ``v`` (d_out), each None when frozen (all ones).
- LoRAMoE: router ``W_g`` (E, d_in), ``A`` (E, r, d_in), ``B`` (E, d_out, r).

LoRAMoE (arXiv 2312.09979), per token ``x``::

    y = W0 x + s * sum_i g_i(x) * B_i A_i dropout(x),   g(x) = softmax(W_g x),   s = alpha / r

where the router, ``W_g x`` to ``g(x)``, is :mod:`loramoe.router`.

Production form: the E experts' ``A`` are one (E*r, d_in) matrix and their ``B`` one (d_out, E*r)
matrix, so the whole mixture is two matmuls with the gates broadcast over each expert's r columns
in between::

    x --dropout--> [A_1; ...; A_E] --> h (E*r) --* (g_i * s per block of r)--> [B_1 ... B_E] --> delta
    x -----------> W_g --> router (fp32) --> g (E) ----^

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


def tied_lora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_u: Tensor | None, lora_v: Tensor | None,
                    scale: float, dropout: float = 0.0, training: bool = False) -> Tensor:
    """``scale * v * (B (u * (A dropout(x))))`` for x of shape (..., d_in); returns (..., d_out).
    A u or v of None is all ones."""
    h = F.linear(F.dropout(x, dropout, training), lora_A)  # (..., r)
    if lora_u is not None:
        h = h * lora_u
    out = F.linear(h, lora_B)  # (..., d_out)
    return out * (scale if lora_v is None else lora_v * scale)


def untied_factors(lora_A: Tensor, lora_B: Tensor, lora_u: Tensor | None, lora_v: Tensor | None,
                   scale: float) -> tuple[Tensor, Tensor]:
    """One Tied LoRA layer's update as a plain LoRA pair of scale 1: ``diag(u) A`` (r, d_in) and
    ``s diag(v) B`` (d_out, r)."""
    a = lora_A if lora_u is None else lora_u[:, None] * lora_A
    b = lora_B * scale if lora_v is None else (lora_v * scale)[:, None] * lora_B
    return a, b


def tied_lora_delta_weight(lora_A: Tensor, lora_B: Tensor, lora_u: Tensor | None, lora_v: Tensor | None,
                           scale: float) -> Tensor:
    """The dense update ``s diag(v) B diag(u) A`` of shape (d_out, d_in) that merging adds to W0."""
    a, b = untied_factors(lora_A, lora_B, lora_u, lora_v, scale)
    return b @ a


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


def dropout_positions(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """The elements dropout zeroes, each independently with probability p: on the CPU the sorted
    flat (row-major) indices as int64, elsewhere a bool mask of ``shape``.

    On the CPU, one random number per element (as ``F.dropout`` draws) costs more than all of an
    adapter's matmuls, and applying a bool mask (``masked_fill``) runs at a quarter of the speed of
    a copy. The positions of the dropped elements are a Bernoulli(p) process, so they are the
    running sums of geometric gaps: p times fewer draws, exact p, and zeroing by index is a copy
    plus a scatter over p of the elements. On a GPU, where a mask costs one fast pass and reading
    back a count would stall the stream, it is a plain mask, drawn straight into bool (a float
    ``rand`` and a comparison would pass over five bytes per element more). Both draw from torch's
    default generators, so ``torch.manual_seed`` makes them reproducible.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(p)
    n = math.prod(shape)
    if p <= 0 or n == 0:
        return torch.empty(0, dtype=torch.long)
    mean, scale = n * p, 1.0 / math.log1p(-p)
    chunks, last = [], -1
    while last < n - 1:  # the first draw covers n but with probability ~1e-9
        # gaps by inversion, floor(log(U) / log(1 - p)) + 1 with U in (0, 1]: three vectorised passes,
        # where torch's geometric_ takes a scalar log per draw, three times as long
        u = torch.rand(int(mean + 6 * math.sqrt(mean) + 16)).neg_().add_(1.0)
        chunks.append(u.log_().mul_(scale).long().add_(1).cumsum_(0).add_(last))
        last = int(chunks[-1][-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[:int(torch.searchsorted(positions, n))]


def drop_inputs(x2: Tensor, drop: Tensor) -> Tensor:
    """A copy of x2 (N, d) with the elements ``drop`` names (see :func:`dropout_positions`) zeroed."""
    if drop.dtype == torch.bool:
        return x2.masked_fill(drop, 0.0)
    out = x2.clone()
    out.view(-1).index_fill_(0, drop, 0.0)
    return out


def zero_dropped_(t: Tensor, drop: Tensor) -> Tensor:
    """Zero, in place, the elements of the contiguous t (N, d) that ``drop`` names."""
    if drop.dtype == torch.bool:
        return t.masked_fill_(drop, 0.0)
    t.view(-1).index_fill_(0, drop, 0.0)
    return t
