"""Where the balancing constraint and the routing objective lead a router when minimised alone.

A free router: one learnable logit vector per token of 8 typed samples (two types alternating, 5
tokens each) over 6 experts in the groups {knowledge: 3, task: 3}, trained with Adam on one loss
only. Nothing else pulls on it, so where it settles is the loss's own fixed point. The learning
rate is annealed to 0: at a constant rate Adam keeps circling the fixed point (over the last 300 of
3000 steps L_lbc went up to 5e-6 and the within-group spread to 0.01), so the last step's value
would depend on the last bits of the arithmetic, that is on the machine.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from loramoe.balance import (
    UNTYPED,
    balancing_loss,
    group_routing_loss,
    sample_importance,
)

TYPES = torch.tensor([0, 1] * 4)
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
SAMPLES, TOKENS, EXPERTS, GROUP_SIZE = 8, 5, 6, 3
DELTA = 0.1


def _importance(logits: Tensor, mode: str = "mean") -> Tensor:
    """(samples, E) importance of per-token router logits (samples, tokens, E), no padding."""
    return sample_importance(torch.softmax(logits, -1).sum(1), torch.full((len(logits),), float(TOKENS)), mode)


def _minimise(loss_of, logits: Tensor, steps: int = 3000, lr: float = 0.05) -> Tensor:
    logits = logits.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(_importance(logits)).backward()
        optimizer.step()
        schedule.step()
    return logits.detach()


def _own_share(importance: Tensor) -> Tensor:
    """Per sample, the share of its gate mass on the group that serves its type."""
    per_group = importance.view(SAMPLES, 2, GROUP_SIZE).sum(-1)
    return per_group[torch.arange(SAMPLES), TYPES] / per_group.sum(-1)


def _lbc(importance: Tensor) -> Tensor:
    return balancing_loss(importance, TYPES, GROUPS, DELTA)


def _specialised(own: float) -> Tensor:
    """Router logits that put ``own`` of every sample's gate mass on its own group, evenly."""
    logits = torch.zeros(SAMPLES, TOKENS, EXPERTS)
    for m, t in enumerate(TYPES.tolist()):
        logits[m, :, t * GROUP_SIZE:(t + 1) * GROUP_SIZE] = math.log(own / (1 - own))
    return logits


def test_the_constraint_alone_settles_at_45_percent_on_the_own_group():
    """cv^2(I * Q) is 0 when every entry of Z is equal, so Q goes as 1 / I: the own group's share
    is (1 - delta) / (1 - delta + 1 + delta) = 0.45, slightly *less* than an even split."""
    torch.manual_seed(0)
    importance = _importance(_minimise(_lbc, torch.randn(SAMPLES, TOKENS, EXPERTS)))
    own = _own_share(importance)
    within = importance.view(SAMPLES, 2, GROUP_SIZE)
    spread = ((within - within.mean(-1, keepdim=True)).abs() / within.mean(-1, keepdim=True)).max()
    print(f"L_lbc {_lbc(importance).item():.2e}, own-group share {own.min():.4f}..{own.max():.4f}, "
          f"within-group relative spread {spread:.2e}")
    assert _lbc(importance).item() < 1e-6
    assert (own - (1 - DELTA) / 2).abs().max() < 0.01
    assert spread < 0.01  # every expert of a group carries the same mass


def test_the_constraint_pulls_a_specialised_router_back_to_45_percent():
    start = _specialised(0.88)
    assert torch.allclose(_own_share(_importance(start)), torch.full((SAMPLES,), 0.88))
    torch.manual_seed(0)
    own = _own_share(_importance(_minimise(_lbc, start + 0.1 * torch.randn_like(start))))
    print(f"from 0.88: own-group share {own.min():.4f}..{own.max():.4f}")
    assert (own - (1 - DELTA) / 2).abs().max() < 0.01


@pytest.mark.parametrize("target", [0.9, 0.7])
def test_the_routing_objective_alone_settles_at_its_target(target):
    torch.manual_seed(0)
    logits = _minimise(lambda q: group_routing_loss(q, TYPES, GROUPS, 2, target),
                       torch.randn(SAMPLES, TOKENS, EXPERTS))
    own = _own_share(_importance(logits))
    print(f"target {target}: own-group share {own.min():.4f}..{own.max():.4f}")
    assert (own - target).abs().max() < 0.01


def test_summed_importance_lets_length_into_the_constraint_and_the_mean_does_not():
    """Two samples of the same type, 2 and 6 tokens long, whose tokens all have the gates that are
    the constraint's optimum per sample (Q as 1 / I)."""
    lengths = torch.tensor([2.0, 6.0])
    mask = (torch.arange(6) < lengths.unsqueeze(1)).float()  # (2, 6), right padding
    types, groups = torch.tensor([0, 0]), torch.tensor([0, 0, 1, 1])
    optimum = -torch.log(torch.tensor([1 + DELTA, 1 + DELTA, 1 - DELTA, 1 - DELTA]))

    def run(per_token: Tensor, sample_types: Tensor, mode: str) -> tuple[Tensor, float, Tensor]:
        logits = per_token.expand(2, 6, 4).clone().requires_grad_(True)
        importance = sample_importance((torch.softmax(logits, -1) * mask.unsqueeze(-1)).sum(1), lengths, mode)
        loss = balancing_loss(importance, sample_types, groups, DELTA)
        loss.backward()
        return importance.detach(), loss.item(), logits.grad[:, 0]  # the first token is real in both

    q_sum, loss_sum, grad_sum = run(optimum, types, "sum")
    q_mean, loss_mean, grad_mean = run(optimum, types, "mean")
    cosine = torch.nn.functional.cosine_similarity(grad_sum[0], grad_sum[1], dim=0).item()
    print(f"sum: L_lbc {loss_sum:.4f}, cosine of the two samples' token gradients {cosine:.4f}; "
          f"mean: L_lbc {loss_mean:.1e}")
    assert torch.allclose(q_sum[1], 3 * q_sum[0])  # columns in proportion to length
    assert loss_sum > 0.1 and grad_sum.abs().min() > 1e-3
    assert cosine < -0.99  # the short and the long sample are pushed opposite ways
    assert torch.allclose(q_mean[0], q_mean[1])
    assert loss_mean < 1e-10 and grad_mean.abs().max() < 1e-6

    # even gates on untyped samples: "sum" leaves a loss the router cannot move (zero gradient)
    even, untyped = torch.zeros(4), torch.full((2,), UNTYPED)
    _, loss_sum, grad_sum = run(even, untyped, "sum")
    _, loss_mean, _ = run(even, untyped, "mean")
    assert loss_sum > 0.1 and grad_sum.abs().max() < 1e-7 and loss_mean < 1e-10
