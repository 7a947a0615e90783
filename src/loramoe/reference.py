"""The paper's per-expert loop: LoRAMoE in the slow, plain form of its reference code, which the
fused op (:mod:`loramoe.fused`), the plain layer (:mod:`loramoe.functional`) and the benchmarks
are checked against. Written for clarity rather than speed; not used in training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from loramoe.router import router_gates


def loramoe_delta_loop(x: Tensor, router_weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                       dropout: float = 0.0, training: bool = False, drop: Tensor | None = None) -> Tensor:
    """LoRAMoE as the paper's code computes it: the router's gates, then one expert at a time, each
    with its own dropout mask, each output weighted by its gate and added up. ``drop``, a bool
    (..., d_in) of the inputs to zero, replaces the drawn masks with one given mask for every
    expert (scaled by 1/(1-dropout)), to compare with the shared-mask form on the same mask."""
    # the router's own oracle is torch.softmax's autograd (tests/test_router.py); this loop checks the
    # expert mixture, so it takes the shared gates, and a router change (top-k, temperature) reaches it too
    gates = router_gates(x, router_weight)  # (..., E) float32
    out = torch.zeros(*x.shape[:-1], lora_B.shape[1], dtype=x.dtype, device=x.device)
    for i in range(lora_A.shape[0]):
        dropped = F.dropout(x, dropout, training) if drop is None else x * ~drop / (1 - dropout)
        h = dropped @ lora_A[i].T @ lora_B[i].T  # (..., d_out)
        out = out + gates[..., i : i + 1].to(x.dtype) * h * scale
    return out
