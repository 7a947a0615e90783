"""The production LoRAMoE maths equals the plain loop over experts, in outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from loramoe.functional import (dropout_drop_mask, loramoe_inplace, lora_delta, lora_delta_weight, loramoe_delta,
                                router_gates)
from tests.reference import loramoe_delta_loop


def _random_loramoe(e=6, r=4, d_in=24, d_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, d_in, generator=g)
    router = torch.randn(e, d_in, generator=g)
    a = torch.randn(e, r, d_in, generator=g) / d_in**0.5
    b = torch.randn(e, d_out, r, generator=g) / r**0.5  # outputs of order 1, as in a model
    return x, router, a, b


@pytest.mark.parametrize("e,r", [(1, 1), (2, 8), (6, 4), (16, 16)])
def test_concatenated_form_equals_loop_reference(e, r):
    x, router, a, b = _random_loramoe(e=e, r=r)
    leaves = [t.clone().requires_grad_(True) for t in (x, router, a, b)]
    leaves_ref = [t.clone().requires_grad_(True) for t in (x, router, a, b)]
    out = loramoe_delta(leaves[0], router_gates(leaves[0], leaves[1]), leaves[2], leaves[3], scale=8.0)
    ref = loramoe_delta_loop(*leaves_ref, scale=8.0)
    assert (out - ref).abs().max() <= 1e-5
    upstream = torch.randn_like(out)  # a loss that averages over tokens and features, as LM losses do
    (out * upstream).mean().backward()
    (ref * upstream).mean().backward()
    for name, got, want in zip(["x", "router", "lora_A", "lora_B"], leaves, leaves_ref):
        assert (got.grad - want.grad).abs().max() <= 1e-5, name


def test_router_softmax_is_float32_for_half_inputs():
    x, router, a, b = _random_loramoe()
    gates = router_gates(x.bfloat16(), router)
    assert gates.dtype == torch.float32
    assert torch.allclose(gates.sum(-1), torch.ones(3, 5))
    out = loramoe_delta(x.bfloat16(), gates, a.bfloat16(), b.bfloat16(), 8.0)
    assert out.dtype == torch.bfloat16


def test_dropout_applies_only_in_training():
    x, router, a, b = _random_loramoe()
    gates = router_gates(x, router)
    torch.manual_seed(0)
    eval_out = loramoe_delta(x, gates, a, b, 8.0, dropout=0.5, training=False)
    assert torch.equal(eval_out, loramoe_delta(x, gates, a, b, 8.0))
    assert not torch.allclose(loramoe_delta(x, gates, a, b, 8.0, dropout=0.5, training=True), eval_out)


def test_lora_delta_equals_dense_update():
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(4, 10, generator=g), torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g)
    assert torch.allclose(lora_delta(x, a, b, 2.0), x @ lora_delta_weight(a, b, 2.0).T, atol=1e-5)


def _fused_vs_reference(e, r, dropout=0.0, dtype=torch.float32, rel=0.0, tol=1e-5):
    x, router, a, b = _random_loramoe(e=e, r=r)
    base_w = torch.randn(b.shape[1], x.shape[-1], generator=torch.Generator().manual_seed(5)) / x.shape[-1] ** 0.5
    leaves = [t.clone().to(dtype).requires_grad_(True) for t in (x, router, a, b)]
    ref_leaves = [t.clone().to(dtype).requires_grad_(True) for t in (x, router, a, b)]
    torch.manual_seed(7)
    keep = ~dropout_drop_mask(x.shape, dropout, x.device)
    torch.manual_seed(7)  # loramoe_inplace draws the same mask: one for all experts
    xs, rw, aa, bb = leaves
    out, fused_gates = loramoe_inplace(xs @ base_w.to(dtype).T, xs, rw.float(), aa, bb, scale=8.0,
                                       dropout=dropout, training=dropout > 0)
    xr, rr, ar, br = ref_leaves
    dropped = xr * keep / (1 - dropout)
    gates = router_gates(xr, rr)  # the router sees x without dropout
    ref = xr @ base_w.to(dtype).T + sum(gates[..., i:i + 1].to(dtype) * (dropped @ ar[i].T @ br[i].T) * 8.0
                                         for i in range(e))

    def close(got, want):
        return (got.float() - want.float()).abs().max() <= tol + rel * want.float().abs().max()

    assert close(out, ref) and close(fused_gates, gates)
    upstream = torch.randn_like(out)
    on_gates = torch.randn_like(gates)  # a loss on the gates too, as the balancing constraint is
    ((out * upstream).mean() + (fused_gates * on_gates).sum()).backward()
    ((ref * upstream).mean() + (gates * on_gates).sum()).backward()
    for name, got, want in zip(["x", "router", "lora_A", "lora_B"], leaves, ref_leaves):
        assert close(got.grad, want.grad), name


@pytest.mark.parametrize("e,r", [(1, 1), (6, 4), (16, 16)])
def test_fused_inplace_op_equals_loop_reference(e, r):
    _fused_vs_reference(e, r)
    x, router, a, b = _random_loramoe(e=e, r=r)
    fused, _ = loramoe_inplace(torch.zeros(3, 5, b.shape[1]), x, router, a, b, 8.0)
    assert (fused - loramoe_delta_loop(x, router, a, b, 8.0)).abs().max() <= 1e-5


def test_fused_op_with_dropout_uses_one_mask_for_all_experts():
    _fused_vs_reference(6, 4, dropout=0.25)


def test_fused_op_in_bfloat16():
    _fused_vs_reference(6, 4, dtype=torch.bfloat16, rel=0.02, tol=0.0)  # a few bf16 ulps


def test_keep_mask_rate_reproducibility_and_independence():
    torch.manual_seed(0)
    mask = ~dropout_drop_mask((512, 1024), 0.05, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(mask, ~dropout_drop_mask((512, 1024), 0.05, torch.device("cpu")))
    assert mask.dtype == torch.bool and abs((~mask).float().mean().item() - 0.05) < 0.002
    lanes = (~mask).view(-1, 4).float()  # the four 16-bit lanes of each random word
    assert all(abs(lanes[:, i].mean().item() - 0.05) < 0.003 for i in range(4))
    both = (lanes[:, 0] * lanes[:, 1]).mean().item()
    assert abs(both - 0.05 ** 2) < 0.001  # lanes are independent
    assert not dropout_drop_mask((7,), 0.0, torch.device("cpu")).any()
