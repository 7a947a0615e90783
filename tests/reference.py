"""Plain reference implementations, written for clarity rather than speed, that the production
code is checked against (and that benchmarks/ measures as the paper's reference-code baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def loramoe_delta_loop(x: Tensor, router_weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                       dropout: float = 0.0, training: bool = False, drop: Tensor | None = None) -> Tensor:
    """LoRAMoE as the paper's code computes it: softmax router, then one expert at a time, each
    with its own dropout mask, each output weighted by its gate and added up. ``drop``, a bool
    (..., d_in) of the inputs to zero, replaces the drawn masks with one given mask for every
    expert (scaled by 1/(1-dropout)), to compare with the shared-mask form on the same mask."""
    gates = torch.softmax(x.float() @ router_weight.float().T, dim=-1)  # (..., E)
    out = torch.zeros(*x.shape[:-1], lora_B.shape[1], dtype=x.dtype, device=x.device)
    for i in range(lora_A.shape[0]):
        dropped = F.dropout(x, dropout, training) if drop is None else x * ~drop / (1 - dropout)
        h = dropped @ lora_A[i].T @ lora_B[i].T  # (..., d_out)
        out = out + gates[..., i : i + 1].to(x.dtype) * h * scale
    return out
