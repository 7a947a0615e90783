"""The localized balancing constraint of LoRAMoE (arXiv 2312.09979), and an opt-in routing
objective beyond the paper, as pure tensor functions.

Per LoRAMoE layer, with ``Q[n, m]`` the importance of expert n for sample m and ``I[n, m]`` =
1 + delta when expert n's group serves sample m's type, 1 - delta when it serves another type, and
1 for samples whose type no group claims (untyped ones included)::

    Z = I * Q,    L_lbc = var(Z) / mean(Z)^2        (squared coefficient of variation)

``var`` is the unbiased sample variance over all E*M entries and ``mean(Z)^2`` gets an epsilon of
1e-10, as in the reference code; the paper prints var/mean, the authors confirmed var/mean^2. The
training loss adds ``beta * sum over layers of L_lbc``. The reference code fixes two equal groups
(type 1 -> first half of the experts); here any groups of any sizes.

What it does: L_lbc is 0 exactly when every entry of Z is equal, i.e. when Q goes as 1 / I. With
two equal groups a typed sample then puts (1 - delta) / 2 of its gate mass (45 % at delta = 0.1)
on its own group: the constraint balances the experts and leans each sample slightly *away* from
its own group; it does not make groups specialise. :func:`group_routing_loss` (not in the paper)
is a separate objective whose minimum does send each typed sample's gate mass to its own group.

Q is each sample's gate sum over its non-padding tokens, divided by their count by default
(:func:`sample_importance`, mode ``"mean"``). The raw sum (``"sum"``) makes each column of Q total
the sample's length, a spread the router cannot remove that the constraint then penalises; the
reference code avoids it by summing over padded positions too, so every column totals the padded
length. ``"mean"`` gives every column the same total without counting padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loramoe.errors import UsageError

EPS = 1e-10
UNTYPED = -1
IMPORTANCE_MODES = ("mean", "sum")
"""How a sample's gate sums become its importance: divided by its token count, or as they are."""
SHARE_FLOOR = 1e-6
"""Smallest group share the routing objective takes the log of, so a starved group stays finite."""


def sample_importance(gate_sums: Tensor, token_counts: Tensor, mode: str) -> Tensor:
    """Per-sample importance (..., M, E) from gate sums over non-padding tokens (..., M, E) and
    the samples' token counts (M,): ``"mean"`` divides by the count (a sample without tokens
    stays 0), ``"sum"`` returns the sums."""
    if mode == "sum":
        return gate_sums
    if mode != "mean":
        raise UsageError(f"importance mode must be one of {IMPORTANCE_MODES}, got {mode!r}")
    return gate_sums / token_counts.to(gate_sums.dtype).clamp(min=1).unsqueeze(-1)


def content_importance(gates: list[Tensor], attention_mask: Tensor, content_start: Tensor, mode: str) -> Tensor:
    """(layers, M, E) importance over each sample's own tokens only, from per-layer gates
    (M, seq, E), the (M, seq) attention mask and each sample's ``content_start``: the positions
    before it are the chat template's opening, the same tokens in every record. No router can send
    those by type, and in a whole-sample mean they pull every short record towards the majority
    type (a knowledge question in SmolLM2's template is two thirds template), so the routing
    objective reads the rest. The constraint keeps the paper's whole-sample importance."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    mask = (attention_mask > 0) & (positions[None, :] >= content_start.to(positions.device)[:, None])
    sums = torch.stack([(g * mask[:, -g.shape[1]:, None].to(g.dtype)).sum(-2) for g in gates])
    return sample_importance(sums, mask.sum(-1), mode)


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
    """``L_lbc`` of one layer. importance: (M, E) per-sample importance (:func:`sample_importance`);
    sample_types: (M,) group index per sample (``UNTYPED`` = -1); expert_groups: (E,) group index
    per expert. Returns a float32 scalar."""
    q = importance.float().T  # (E, M)
    coeff = balance_coefficients(sample_types.to(q.device), expert_groups.to(q.device), delta)
    return cv_squared(coeff * q)


def group_mass(importance: Tensor, expert_groups: Tensor, num_groups: int) -> Tensor:
    """Per sample, the gate mass each group's experts received: importance (..., E), expert_groups
    (E,) -> (..., G). Experts without a group (``UNTYPED``) count for group 0, the one pool."""
    onehot = torch.nn.functional.one_hot(expert_groups.to(importance.device).clamp(min=0), num_groups)
    return importance.float() @ onehot.float()


def group_shares(importance: Tensor, sample_types: Tensor, expert_groups: Tensor,
                 num_groups: int) -> Tensor:
    """Router balance: ``S[t, g]`` = share of the gate mass of samples of type t that went to
    group g's experts, (num_groups, num_groups); a type with no samples gets a row of NaN."""
    per_sample_group = group_mass(importance, expert_groups, num_groups)  # (M, G)
    shares = torch.full((num_groups, num_groups), float("nan"), device=importance.device)
    for t in range(num_groups):
        rows = per_sample_group[sample_types == t]
        if len(rows):
            shares[t] = rows.sum(0) / rows.sum()
    return shares


def group_routing_loss(importance: Tensor, sample_types: Tensor, expert_groups: Tensor, num_groups: int,
                       target: float) -> Tensor:
    """An objective beyond the paper that routes each typed sample to its own group. For a sample
    of type t (a group index), ``s`` is its gate mass per group normalised to sum 1 and the target
    ``p`` is ``target`` on group t and ``(1 - target) / (num_groups - 1)`` on every other group;
    the loss is the mean over typed samples of the cross-entropy ``-sum_g p_g log s_g``, smallest
    where s = p. importance: (M, E); sample_types: (M,), ``UNTYPED`` or a type no group has is
    skipped; expert_groups: (E,). A batch without a typed sample gives a zero that keeps the graph.
    Returns a float32 scalar."""
    if num_groups < 2:
        raise UsageError(f"group_routing_loss needs at least 2 groups, got {num_groups}")
    sample_types = sample_types.to(importance.device)
    typed = (sample_types >= 0) & (sample_types < num_groups)
    per_group = group_mass(importance, expert_groups, num_groups)  # (M, G)
    shares = (per_group / per_group.sum(-1, keepdim=True).clamp(min=EPS)).clamp(min=SHARE_FLOOR)
    own = torch.nn.functional.one_hot(torch.where(typed, sample_types, 0), num_groups).bool()
    wanted = torch.where(own, target, (1.0 - target) / (num_groups - 1))
    cross_entropy = -(wanted * shares.log()).sum(-1)  # (M,); untyped rows are masked out below
    # a mask rather than indexing: no host sync, and an all-untyped batch still gives a zero in the graph
    return (cross_entropy * typed).sum() / typed.sum().clamp(min=1)
