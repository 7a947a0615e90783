"""The router is one unit: its forward/backward pair is the softmax's, and every path (the plain
layer, the fused op's forward, backward and generation path, the loop reference) goes through
it, so one edit to :mod:`loramoe.router` changes them all alike."""

from __future__ import annotations

import pytest
import torch

from loramoe import router
from loramoe.functional import loramoe_delta
from loramoe.fused import Member, inference_plan, loramoe_group, loramoe_group_inference
from loramoe.reference import loramoe_delta_loop

SCALE = 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gates_and_their_backward_equal_autograd_of_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 3, 6, generator=g) * 3).to(dtype)
    grad_gates = torch.randn(7, 3, 6, generator=g)
    leaf = logits.float().requires_grad_(True)
    want = torch.softmax(leaf, dim=-1)
    want.backward(grad_gates)
    gates = router.gates_from_logits(logits)
    assert gates.dtype == torch.float32 and torch.equal(gates, want.detach())
    torch.testing.assert_close(gates.sum(-1), torch.ones(7, 3))
    grad = router.logits_grad(gates, grad_gates)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-6)


def _case(k=2, e=4, r=3, d_in=16, d_out=20):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d_in, generator=g)
    members = [Member(torch.randn(d_out, d_in, generator=g) / d_in**0.5, None, torch.randn(e, d_in, generator=g),
                      torch.randn(e, r, d_in, generator=g) / d_in**0.5, torch.randn(e, d_out, r, generator=g) / r**0.5)
               for _ in range(k)]
    return x, members


def _leaves(x, members):
    return x.clone().requires_grad_(True), [Member(m.weight, None, *(t.clone().requires_grad_(True) for t in m[2:]))
                                            for m in members]


def _plain(x, members):
    """Each member's output and the gates (..., K, E) by the plain path: router_gates, then loramoe_delta."""
    gates = [router.router_gates(x, m.router) for m in members]
    outs = [x @ m.weight.T + loramoe_delta(x, gk, m.lora_A, m.lora_B, SCALE) for m, gk in zip(members, gates)]
    return outs, torch.stack(gates, dim=-2)


def _grads(x, members, outs, gates):
    """The gradients of x and of every router, A and B, under a loss on the outputs and on the gates."""
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss = loss + (gates * torch.randn(gates.shape, generator=g)).sum()  # as the balancing constraint puts one
    return torch.autograd.grad(loss, [x, *(t for m in members for t in m[2:])])


def test_one_edit_to_the_router_changes_every_path(monkeypatch):
    x, members = _case()
    with torch.no_grad():
        softmax_gates = _plain(x, members)[1]
    temperature = 0.25
    forward, backward = router.gates_from_logits, router.logits_grad
    monkeypatch.setattr(router, "gates_from_logits", lambda logits: forward(logits / temperature))
    monkeypatch.setattr(router, "logits_grad", lambda gates, grad: backward(gates, grad) / temperature)

    plain_x, plain_members = _leaves(x, members)
    plain_outs, plain_gates = _plain(plain_x, plain_members)
    logits = torch.stack([x @ m.router.T for m in members], dim=-2)
    torch.testing.assert_close(plain_gates, torch.softmax(logits / temperature, dim=-1))
    assert (plain_gates - softmax_gates).abs().max() > 0.1  # the edit reached the plain path

    fused_x, fused_members = _leaves(x, members)
    fused_outs, fused_gates = loramoe_group(fused_x, fused_members, SCALE)
    with torch.no_grad():
        generated_outs, generated_gates = loramoe_group_inference(x, inference_plan(members, x.dtype, SCALE))
        loop_outs = [x @ m.weight.T + loramoe_delta_loop(x, m.router, m.lora_A, m.lora_B, SCALE) for m in members]
    for outs, gates in [(fused_outs, fused_gates), (generated_outs, generated_gates), (loop_outs, None)]:
        for got, want in zip(outs, plain_outs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if gates is not None:
            torch.testing.assert_close(gates, plain_gates)
    # the fused op's hand-written backward took the edit too: it agrees with autograd through the plain path.
    # The losses sum (not average), so gradient entries reach ~70 and each is a sum of such terms that cancel:
    # the two backward passes differ by a few fp32 ulps of that size (up to 3e-6 of the largest entry with one
    # thread, which broke rtol 1e-5 on a small entry), so the tolerance is 1e-4 of the largest entry; the edit
    # itself scales the logits' gradient by 4.
    for got, want in zip(_grads(fused_x, fused_members, fused_outs, fused_gates),
                         _grads(plain_x, plain_members, plain_outs, plain_gates)):
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-4 * want.abs().max().item())
