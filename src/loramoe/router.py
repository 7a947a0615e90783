"""The LoRAMoE router, logits to gates, as one forward/backward pair that every path calls.

Contract:

- :func:`gates_from_logits`: logits (..., E) in any float dtype (the fused op computes them in the
  model's dtype, :func:`router_gates` in float32) -> gates (..., E), always float32, each row
  non-negative and summing to 1 over the E experts. Dense: every expert gets a gate (the paper's
  router; no top-k, no temperature, no noise).
- :func:`logits_grad`: the backward of :func:`gates_from_logits`, for the fused op's hand-written
  backward. From the saved gates g (..., E) float32 and the loss's gradient in them, dL/dg
  (..., E) float32, it returns dL/dlogits (..., E) float32; for the softmax that is
  ``g * (dL/dg - sum_j g_j dL/dg_j)``.
- :func:`router_gates`: a router weight W_g (E, d_in) applied to x (..., d_in) in float32 whatever
  x's dtype, then :func:`gates_from_logits`; the plain (autograd) path and the reference use it.

The plain path, the fused op's training forward and backward, its generation path and the loop
reference all route through these functions, looked up as attributes of this module at each
call, so a top-k, a temperature or router noise is one edit here (a forward and its backward)
plus one test in tests/test_router.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gates_from_logits(logits: Tensor) -> Tensor:
    """Dense softmax over the last dim, computed and returned in float32: (..., E) -> (..., E)."""
    # dtype= rather than .float(): the same values, without a separate cast kernel for half logits
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def logits_grad(gates: Tensor, grad_gates: Tensor) -> Tensor:
    """dL/dlogits from the gates (..., E) and dL/dgates (..., E), both float32: the softmax backward."""
    return gates * (grad_gates - (grad_gates * gates).sum(-1, keepdim=True))


def router_gates(x: Tensor, router_weight: Tensor) -> Tensor:
    """The gates (..., E) float32 of x (..., d_in) under the router weight (E, d_in)."""
    return gates_from_logits(F.linear(x.float(), router_weight.float()))
