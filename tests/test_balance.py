"""The balancing constraint against hand-computed values and the reference code's 2-group form,
and the routing objective beyond the paper (their fixed points: test_balance_fixed_points.py)."""

from __future__ import annotations

import math

import pytest
import torch

from loramoe.balance import (
    UNTYPED,
    balance_coefficients,
    balancing_loss,
    content_importance,
    cv_squared,
    group_routing_loss,
    group_shares,
    sample_importance,
)


def test_hand_computed_two_experts_two_samples():
    # Q[n, m]: expert 0 got 3 from sample 0 and 1 from sample 1; expert 1 got 1 and 3
    importance = torch.tensor([[3.0, 1.0], [1.0, 3.0]])  # (M, E)
    types = torch.tensor([0, 1])
    groups = torch.tensor([0, 1])
    # Z = [[3*1.5, 1*0.5], [1*0.5, 3*1.5]] = [4.5, 0.5, 0.5, 4.5]: mean 2.5, unbiased var 16/3*... by hand:
    # deviations +-2 -> sum of squares 16, / (4 - 1) = 16/3; cv^2 = (16/3) / 6.25
    loss = balancing_loss(importance, types, groups, delta=0.5)
    assert loss.item() == pytest.approx((16 / 3) / 6.25, rel=1e-6)


def test_untyped_samples_weight_every_expert_one():
    coeff = balance_coefficients(torch.tensor([0, UNTYPED, 7]), torch.tensor([0, 0, 1]), delta=0.1)
    assert torch.allclose(coeff, torch.tensor([[1.1, 1.0, 1.0], [1.1, 1.0, 1.0], [0.9, 1.0, 1.0]]))


def test_unequal_groups():
    importance = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # 2 samples, 3 experts
    groups = torch.tensor([0, 1, 1])  # group 0 has one expert, group 1 two
    types = torch.tensor([1, 0])
    z = torch.tensor([[1 * 0.8, 4 * 1.2], [2 * 1.2, 5 * 0.8], [3 * 1.2, 6 * 0.8]])
    want = z.var() / z.mean() ** 2
    assert balancing_loss(importance, types, groups, 0.2).item() == pytest.approx(want.item(), rel=1e-6)


def _reference_two_groups(route_weight_sum: torch.Tensor, task_types: torch.Tensor, num_experts: int,
                          alpha: float) -> torch.Tensor:
    """The reference code's formula, restated: type 1 samples favour the first half of the experts,
    type 0 samples the second half; cv^2 with an epsilon on mean^2."""
    t = task_types.view(-1, 1)
    favoured = torch.cat([(t == 1).repeat(1, num_experts // 2), (t == 0).repeat(1, num_experts // 2)], dim=-1)
    z = (route_weight_sum * torch.where(favoured, 1.0 + alpha, 1.0 - alpha)).flatten()
    return z.float().var() / (z.float().mean() ** 2 + 1e-10)


def test_matches_the_reference_code_for_two_equal_groups():
    torch.manual_seed(0)
    importance = torch.rand(8, 6) * 10  # (M, E)
    ref_types = torch.randint(0, 2, (8,))  # reference: 1 = world knowledge
    # ours: groups {"knowledge": 3, "task": 3} -> experts 0-2 are group 0 (knowledge)
    ours = balancing_loss(importance, torch.where(ref_types == 1, 0, 1), torch.tensor([0, 0, 0, 1, 1, 1]), 0.1)
    assert ours.item() == pytest.approx(_reference_two_groups(importance, ref_types, 6, 0.1).item(), rel=1e-6)


def test_balanced_importance_gives_zero_and_gradients_flow():
    q = torch.full((4, 6), 2.0, requires_grad=True)
    loss = balancing_loss(q, torch.full((4,), UNTYPED), torch.zeros(6, dtype=torch.long), 0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    q2 = torch.rand(4, 6, requires_grad=True)
    balancing_loss(q2, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 1, 1]), 0.1).backward()
    assert q2.grad.abs().sum() > 0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def test_group_shares_per_type():
    importance = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    shares = group_shares(importance, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), num_groups=2)
    assert torch.allclose(shares[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(shares[1], torch.tensor([3 / 6, 3 / 6]))


def test_sample_importance_divides_by_the_token_count():
    sums = torch.tensor([[[2.0, 4.0], [3.0, 3.0], [0.0, 0.0]]])  # (layers, M, E)
    counts = torch.tensor([2.0, 6.0, 0.0])
    assert torch.equal(sample_importance(sums, counts, "sum"), sums)
    assert torch.equal(sample_importance(sums, counts, "mean"), torch.tensor([[[1.0, 2.0], [0.5, 0.5], [0.0, 0.0]]]))
    with pytest.raises(ValueError, match="importance mode must be one of"):
        sample_importance(sums, counts, "median")


def test_group_routing_loss_hand_computed():
    # sample 0 (type 0): groups get 3 and 1 -> shares (0.75, 0.25); sample 1 (type 1): 1 and 1
    importance = torch.tensor([[2.0, 1.0, 1.0], [0.5, 0.5, 1.0], [5.0, 0.0, 0.0]])
    groups = torch.tensor([0, 0, 1])
    types = torch.tensor([0, 1, UNTYPED])  # the untyped sample has no say
    want = (-(0.8 * math.log(0.75) + 0.2 * math.log(0.25)) - (0.2 * math.log(0.5) + 0.8 * math.log(0.5))) / 2
    assert group_routing_loss(importance, types, groups, 2, 0.8).item() == pytest.approx(want, rel=1e-6)


def test_group_routing_loss_spreads_the_rest_over_the_other_groups():
    importance = torch.tensor([[0.6, 0.2, 0.2]], requires_grad=True)
    groups, types = torch.tensor([0, 1, 2]), torch.tensor([0])
    loss = group_routing_loss(importance, types, groups, 3, 0.6)
    entropy = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))  # the minimum: shares equal the target
    assert loss.item() == pytest.approx(entropy, rel=1e-6)
    loss.backward()
    assert importance.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_routing_loss(importance, types, torch.zeros(3, dtype=torch.long), 1, 0.6)


def test_group_routing_loss_without_typed_samples_is_a_zero_in_the_graph():
    importance = torch.rand(3, 4, requires_grad=True)
    loss = group_routing_loss(importance, torch.full((3,), UNTYPED), torch.tensor([0, 0, 1, 1]), 2, 0.9)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(importance.grad, torch.zeros(3, 4))


def test_content_importance_is_the_mean_gate_over_each_samples_own_tokens():
    torch.manual_seed(0)
    gates = [torch.rand(3, 6, 4).softmax(-1) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    start = torch.tensor([2, 1, 4])
    out = content_importance(gates, mask, start, "mean")
    for layer, g in enumerate(gates):
        for m in range(3):
            own = [p for p in range(6) if mask[m, p] and p >= start[m]]
            assert torch.allclose(out[layer, m], g[m, own].mean(0))
    changed = [g.clone() for g in gates]
    for g in changed:
        g[0, :2] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # the shared template's tokens: routed anywhere
    assert torch.equal(content_importance(changed, mask, start, "mean"), out)
    assert torch.allclose(content_importance(gates, mask, start, "sum")[0, 2], gates[0][2, 4])
