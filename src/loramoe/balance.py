"""The localized balancing constraint of LoRAMoE (arXiv 2312.09979), as pure tensor functions.

Per LoRAMoE layer, with ``Q[n, m]`` the importance of expert n for sample m (its gate weights
summed over the sample's non-padding tokens) and ``I[n, m]`` = 1 + delta when expert n's group
serves sample m's type, 1 - delta when it serves another type, and 1 for samples whose type no
group claims (untyped ones included)::

    Z = I * Q,    L_lbc = var(Z) / mean(Z)^2        (squared coefficient of variation)

``var`` is the unbiased sample variance over all E*M entries and ``mean(Z)^2`` gets an epsilon of
1e-10, as in the reference code; the paper prints var/mean, the authors confirmed var/mean^2. The
training loss adds ``beta * sum over layers of L_lbc``. The reference code fixes two equal groups
(type 1 -> first half of the experts) and counts padding; here any groups of any sizes, no padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-10
UNTYPED = -1


def balance_coefficients(sample_types: Tensor, expert_groups: Tensor, delta: float) -> Tensor:
    """``I`` of shape (E, M) from per-sample group indices (M,) and per-expert group indices (E,);
    a sample type of ``UNTYPED`` (or a group no expert has) weights every expert 1."""
    claimed = (expert_groups.unsqueeze(1) == sample_types.unsqueeze(0))  # (E, M)
    typed = claimed.any(dim=0, keepdim=True)  # (1, M): some group serves this sample's type
    coeff = torch.where(claimed, 1.0 + delta, 1.0 - delta)
    return torch.where(typed, coeff, torch.ones_like(coeff))


def cv_squared(z: Tensor) -> Tensor:
    """Squared coefficient of variation of all entries; 0 for a single entry."""
    z = z.float().flatten()
    if z.numel() < 2:
        return z.new_zeros(())
    return z.var() / (z.mean() ** 2 + EPS)


def balancing_loss(importance: Tensor, sample_types: Tensor, expert_groups: Tensor, delta: float) -> Tensor:
    """``L_lbc`` of one layer. importance: (M, E) per-sample gate sums over non-padding tokens;
    sample_types: (M,) group index per sample (``UNTYPED`` = -1); expert_groups: (E,) group index
    per expert. Returns a float32 scalar."""
    q = importance.float().T  # (E, M)
    coeff = balance_coefficients(sample_types.to(q.device), expert_groups.to(q.device), delta)
    return cv_squared(coeff * q)


def group_shares(importance: Tensor, sample_types: Tensor, expert_groups: Tensor,
                 num_groups: int) -> Tensor:
    """Router balance: ``S[t, g]`` = share of the gate mass of samples of type t that went to
    group g's experts, (num_groups, num_groups); a type with no samples gets a row of NaN."""
    q = importance.float()  # (M, E)
    onehot_groups = torch.nn.functional.one_hot(expert_groups.clamp(min=0), num_groups).float()  # (E, G)
    per_sample_group = q @ onehot_groups  # (M, G)
    shares = torch.full((num_groups, num_groups), float("nan"), device=q.device)
    for t in range(num_groups):
        rows = per_sample_group[sample_types == t]
        if len(rows):
            shares[t] = rows.sum(0) / rows.sum()
    return shares
