"""ema_: the multi-tensor kernel (interpreted on CPU) against the foreach reference."""

import pytest
import torch

from kernels import dispatch, ema_
from kernels.ema import ema_ref_

SHAPES = [(1,), (7,), (129, 3), (0,), (5, 1, 13)]


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES], [torch.randn(s, generator=g) for s in SHAPES]


@pytest.mark.parametrize("momentum", [0.998, 0.5, 1.0])
def test_matches_foreach_reference(momentum):
    target, online = _pairs()
    expected = [t.clone() for t in target]
    ema_ref_(expected, online, momentum)
    before = dispatch.launches["ema_"]
    ema_(target, online, momentum, impl="triton")
    assert dispatch.launches["ema_"] == before + 1  # one launch for every tensor of one dtype
    for t, e in zip(target, expected):
        torch.testing.assert_close(t, e, atol=1e-7, rtol=1e-6)


def test_repeated_calls_reuse_the_plan_and_new_tensors_get_a_new_one():
    target, online = _pairs(1)
    expected = [t.clone() for t in target]
    for m in (0.9, 0.99):
        ema_ref_(expected, online, m)
        ema_(target, online, m, impl="triton")
    other_t, other_o = _pairs(2)
    other_expected = [t.clone() for t in other_t]
    ema_ref_(other_expected, other_o, 0.7)
    ema_(other_t, other_o, 0.7, impl="triton")
    for t, e in zip(target + other_t, expected + other_expected):
        torch.testing.assert_close(t, e, atol=1e-7, rtol=1e-6)


def test_module_parameters_in_place():
    """What the step does: the target module's own parameter storage is updated, no copy."""
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    storage = [p.data_ptr() for p in a.parameters()]
    expected = [0.9 * p.detach() + 0.1 * q.detach() for p, q in zip(a.parameters(), b.parameters())]
    ema_(list(a.parameters()), list(b.parameters()), 0.9, impl="triton")
    assert [p.data_ptr() for p in a.parameters()] == storage
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_bad_lists_name_the_problem():
    with pytest.raises(ValueError, match="2 target tensors and 1"):
        ema_([torch.zeros(2), torch.zeros(3)], [torch.zeros(2)], 0.9, impl="triton")
    with pytest.raises(ValueError, match="pair 0"):
        ema_([torch.zeros(2)], [torch.zeros(3)], 0.9, impl="triton")
    with pytest.raises(ValueError, match="contiguous"):
        ema_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_fp32_and_bf16_targets():
    torch.manual_seed(0)
    shapes = [(1,), (7,), (129, 3), (1024, 1024), (3 * 4096 + 5,)]
    for t_dtype in (torch.float32, torch.bfloat16):
        target = [torch.randn(s, device="cuda").to(t_dtype) for s in shapes]
        online = [torch.randn(s, device="cuda") for s in shapes]
        exact = [0.998 * t.double() + 0.002 * o.double() for t, o in zip(target, online)]
        ema_(target, online, 0.998, impl="triton")
        for t, e in zip(target, exact):
            # one rounding to the target dtype: 2^-8 relative in bf16, below the update itself (0.002 |o - t|), so a
            # kernel that skips the update, rounds the momentum or computes in bf16 fails
            rtol, atol = (1e-6, 1e-6) if t_dtype == torch.float32 else (5e-3, 1e-6)
            torch.testing.assert_close(t.double(), e, atol=atol, rtol=rtol)
