"""The production LoRAMoE maths equals the plain loop over experts, in outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from loramoe.functional import drop_inputs, dropout_positions, lora_delta, lora_delta_weight, loramoe_delta
from loramoe.fused import Member, inference_plan, loramoe_group, loramoe_group_inference
from loramoe.reference import loramoe_delta_loop
from loramoe.router import router_gates


def _random_loramoe(e=6, r=4, d_in=24, d_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, d_in, generator=g)
    router = torch.randn(e, d_in, generator=g)
    a = torch.randn(e, r, d_in, generator=g) / d_in**0.5
    b = torch.randn(e, d_out, r, generator=g) / r**0.5  # outputs of order 1, as in a model
    return x, router, a, b


def _fp32_close(got, want) -> bool:
    """Equal up to fp32 rounding: the same products summed in another order (one concatenated
    matmul against one expert at a time, another BLAS kernel or thread split on another machine)
    differ by a few ulps of the largest entry (fp32 unit roundoff 6e-8). The outputs here reach
    30 (scale 8), where an absolute 1e-5 is only 5 ulps and was exceeded on other seeds and BLAS
    paths; 1e-5 of the size (at least 1) is ~100 ulps, while a wrong gate or scale moves entries
    by order 1."""
    return bool((got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("e,r", [(1, 1), (2, 8), (6, 4), (16, 16)])
def test_concatenated_form_equals_loop_reference(e, r):
    x, router, a, b = _random_loramoe(e=e, r=r)
    leaves = [t.clone().requires_grad_(True) for t in (x, router, a, b)]
    leaves_ref = [t.clone().requires_grad_(True) for t in (x, router, a, b)]
    out = loramoe_delta(leaves[0], router_gates(leaves[0], leaves[1]), leaves[2], leaves[3], scale=8.0)
    ref = loramoe_delta_loop(*leaves_ref, scale=8.0)
    assert _fp32_close(out, ref)
    upstream = torch.randn_like(out)  # a loss that averages over tokens and features, as LM losses do
    (out * upstream).mean().backward()
    (ref * upstream).mean().backward()
    for name, got, want in zip(["x", "router", "lora_A", "lora_B"], leaves, leaves_ref):
        assert _fp32_close(got.grad, want.grad), name


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


def _group_case(k, e, r, d_in=24, d_outs=(40, 40, 16), bias=False, seed=0):
    """x and k members (base weight, bias, router, A, B) with random weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, d_in, generator=g)
    members = []
    for d_out in d_outs[:k]:
        members.append((torch.randn(d_out, d_in, generator=g) / d_in**0.5,
                        torch.randn(d_out, generator=g) if bias else None,
                        torch.randn(e, d_in, generator=g),
                        torch.randn(e, r, d_in, generator=g) / d_in**0.5,
                        torch.randn(e, d_out, r, generator=g) / (8 * r**0.5)))  # delta of order 1 at scale 8
    return x, members


def _as_mask(drop, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[drop] = True
    return mask


def _fused_group_vs_loop(k, e, r, dropout=0.0, dtype=torch.float32, bias=False, conv1d=False, tol=1e-5, rel=1e-5,
                         as_mask=False):
    """The fused group op against each member computed alone by the loop reference with the same
    dropout mask, in outputs, gates and the gradients of x, every router, A and B (with a loss on
    the gates as well, as the balancing constraint puts one there). In fp32 each may differ by
    ``tol + rel * max |reference|``: 1e-5 of the size (at least 1), as in :func:`_fp32_close`."""
    x, members = _group_case(k, e, r, bias=bias)
    scale = 8.0
    torch.manual_seed(7)
    drop = dropout_positions(x.shape, dropout, x.device) if dropout else None  # flat indices on the CPU
    mask = None if drop is None else _as_mask(drop, x.shape)
    if as_mask:  # the representation used on GPUs
        drop = mask

    def leaves():
        return ([x.clone().to(dtype).requires_grad_(True)],
                [[None if t is None else t.clone().to(torch.float32 if j == 2 else dtype).requires_grad_(j >= 2)
                  for j, t in enumerate(m)] for m in members])

    (xf,), fused_params = leaves()
    fused_members = [Member(w.T.contiguous().T if conv1d else w, b, rw, a, bb) for w, b, rw, a, bb in fused_params]
    outs, gates = loramoe_group(xf, fused_members, scale, drop, 1 / (1 - dropout))
    (xr,), ref_params = leaves()
    ref_outs = [xr @ w.T + (0 if b is None else b) + loramoe_delta_loop(xr, rw, a, bb, scale, dropout, drop=mask)
                for w, b, rw, a, bb in ref_params]
    ref_gates = torch.stack([router_gates(xr, rw) for _, _, rw, _, _ in ref_params], dim=-2)

    def close(got, want):
        return (got.float() - want.float()).abs().max() <= tol + rel * want.float().abs().max()

    assert gates.shape == (3, 5, k, e) and gates.dtype == torch.float32 and close(gates, ref_gates)
    assert all(close(o, w) for o, w in zip(outs, ref_outs))
    upstream = [torch.randn_like(o) for o in outs]
    on_gates = torch.randn_like(gates)
    sum((o * u).mean() for o, u in zip(outs, upstream)).add((gates * on_gates).sum()).backward()
    sum((o * u).mean() for o, u in zip(ref_outs, upstream)).add((ref_gates * on_gates).sum()).backward()
    assert close(xf.grad, xr.grad), "x"
    for i, (got, want) in enumerate(zip(fused_params, ref_params)):
        for name, j in [("router", 2), ("lora_A", 3), ("lora_B", 4)]:
            assert got[j].grad.shape == want[j].grad.shape and close(got[j].grad, want[j].grad), f"member {i} {name}"


@pytest.mark.parametrize("k,e,r", [(1, 1, 1), (1, 6, 4), (2, 6, 4), (3, 16, 16)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_group_op_equals_loop_reference(k, e, r, dropout):
    _fused_group_vs_loop(k, e, r, dropout)


def test_fused_group_op_with_bias_and_transposed_base_weight():
    _fused_group_vs_loop(2, 6, 4, dropout=0.25, bias=True, conv1d=True)


def test_fused_group_op_with_a_bool_dropout_mask():
    _fused_group_vs_loop(2, 6, 4, dropout=0.25, as_mask=True)


def test_fused_group_op_in_bfloat16():
    # bf16 rounds to 8 bits (unit roundoff 2^-9). x's gradient sums 16 terms (2 members x base,
    # router and 6 experts): the loop reference rounds after each bf16 addition, the fused op after
    # each of its 4 matmuls (which accumulate in fp32), and each rounding moves the sum by up to
    # 2^-9 of a partial sum. 32 * 2^-9 = 0.0625 of the largest entry covers those 20 roundings with
    # partial sums up to 1.6 times its size. Measured: 0.017 here, at most 0.025 over seeds 0-29.
    _fused_group_vs_loop(2, 6, 4, dtype=torch.bfloat16, rel=32 * 2**-9, tol=0.0)


def test_inference_path_equals_the_autograd_op():
    x, members = _group_case(2, 6, 4, bias=True)
    members = [Member(*m) for m in members]
    outs, gates = loramoe_group(x, members, 8.0)
    fast_outs, fast_gates = loramoe_group_inference(x, inference_plan(members, x.dtype, 8.0))
    # A gate's relative error is the absolute error of its router logit. The fast path computes every
    # router and expert in one matmul: another summation of d_in = 24 products, on logits up to ~20
    # (ulp 2e-6), so a few ulps of 20 relative to the gate; rtol 1e-4 allows ~50 ulps (measured up to
    # 2.6e-6 over seeds 0-29 with MKL_CBWR=COMPATIBLE, 0 with this machine's default kernels).
    assert torch.allclose(fast_gates, gates, rtol=1e-4)
    assert all(torch.allclose(f, o, atol=1e-5) for f, o in zip(fast_outs, outs))


def test_dropout_positions_rate_reproducibility_and_independence():
    shape, p = (512, 1024), 0.05
    torch.manual_seed(0)
    drop = dropout_positions(shape, p, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(drop, dropout_positions(shape, p, torch.device("cpu")))
    assert drop.dtype == torch.long and bool((drop[1:] > drop[:-1]).all()) and 0 <= drop[0] and drop[-1] < 512 * 1024
    mask = _as_mask(drop, shape).float()
    assert abs(mask.mean().item() - p) < 0.002
    assert abs(mask[:, :512].mean().item() - mask[:, 512:].mean().item()) < 0.002  # no drift along the tensor
    neighbours = (mask.view(-1)[1:] * mask.view(-1)[:-1]).mean().item()
    assert abs(neighbours - p**2) < 0.0005  # adjacent elements are independent
    assert dropout_positions((7,), 0.0, torch.device("cpu")).numel() == 0
    assert set(dropout_positions((3,), 0.9, torch.device("cpu")).tolist()) <= {0, 1, 2}  # none past the end


def test_drop_inputs_by_index_or_mask():
    x = torch.randn(4, 6)
    drop = torch.tensor([0, 7, 23])
    want = x.clone()
    want.view(-1)[drop] = 0.0
    assert torch.equal(drop_inputs(x, drop), want) and torch.equal(drop_inputs(x, _as_mask(drop, x.shape)), want)
