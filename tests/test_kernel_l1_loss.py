"""masked_l1_loss: the Triton kernel (interpreted on CPU) against the 4-op reference, loss and pred's gradient."""

import pytest
import torch

from kernels import dispatch, masked_l1_loss
from kernels.l1_loss import LN_EPS, masked_l1_loss_ref

CASES = {
    # name: (rows of target, D, rows of pred, segments)
    "prime_one_segment": (13, 37, 11, None),
    "two_generators": (29, 37, 17, (6, 11)),
    "one_row": (5, 8, 1, None),
    "wide_rows_three_segments": (41, 130, 23, (7, 7, 9)),
    "d_is_one": (7, 1, 4, (1, 3)),
}


@pytest.mark.parametrize("loss_exp", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_match_reference(case, loss_exp):
    rows, d, t, segments = CASES[case]
    g = torch.Generator().manual_seed(rows * d)
    target = torch.randn(rows, d, generator=g) * 3 + 0.5
    index = torch.randint(0, rows, (t,), generator=g)
    pred = torch.randn(t, d, generator=g).requires_grad_()
    before = dispatch.launches["masked_l1_loss"]
    loss = masked_l1_loss(pred, target, index, loss_exp=loss_exp, segments=segments, impl="triton")
    ref = masked_l1_loss_ref(pred, target, index, loss_exp=loss_exp, segments=segments)
    assert dispatch.launches["masked_l1_loss"] == before + 1  # the kernel ran, not the reference
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss * 3.0, pred)  # a non-unit upstream gradient
    (ref_grad,) = torch.autograd.grad(ref * 3.0, pred)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5)


def test_batched_target_layout_and_strided_pred():
    """target (B, N, D) is read as (B*N, D); pred may be a row-strided view (a slice of a wider buffer)."""
    torch.manual_seed(0)
    target = torch.randn(3, 10, 24)
    index = torch.tensor([0, 9, 10, 29, 15])
    wide = torch.randn(5, 40)
    pred = wide[:, 3:27]
    loss = masked_l1_loss(pred, target, index, impl="triton")
    torch.testing.assert_close(loss, masked_l1_loss_ref(pred, target.reshape(30, 24), index))


def test_strided_token_index_is_read_as_its_values():
    """Every other id of a longer index (a strided view): the kernel must see the view's ids, not memory order."""
    g = torch.Generator().manual_seed(11)
    target = torch.randn(23, 16, generator=g)
    index = torch.randint(0, 23, (18,), generator=g)[::2]
    pred = torch.randn(9, 16, generator=g).requires_grad_()
    loss = masked_l1_loss(pred, target, index, segments=(4, 5), impl="triton")
    ref = masked_l1_loss_ref(pred, target, index, segments=(4, 5))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(ref, pred)[0])


def test_generators_count_equally_whatever_their_size():
    """Rows [1, -1] normalise to about [1, -1]; pred [c, c] with c >= 1 then has mean |d| = c. Generator 0 (2 rows,
    c = 2) and generator 1 (3 rows, c = 5) average to 3.5; a row-weighted mean would give 3.8."""
    target = torch.tensor([[1.0, -1.0]]).repeat(5, 1)
    pred = torch.tensor([[2.0, 2.0]] * 2 + [[5.0, 5.0]] * 3)
    for impl in ("torch", "triton"):
        loss = masked_l1_loss(pred, target, torch.arange(5), segments=(2, 3), impl=impl)
        assert loss.item() == pytest.approx(3.5, abs=1e-4)
        # loss_exp 2: per row mean of d^2 / 2 = (c^2 + 1) / 2 -> ((5 / 2) + (26 / 2)) / 2 = 7.75
        loss = masked_l1_loss(pred, target, torch.arange(5), segments=(2, 3), loss_exp=2.0, impl=impl)
        assert loss.item() == pytest.approx(7.75, abs=1e-3)


def test_zero_difference_has_zero_gradient():
    """|d|' at 0 is 0, as torch's abs: a perfect prediction gets no push."""
    target = torch.tensor([[1.0, -1.0, 3.0, -3.0]])
    perfect = torch.nn.functional.layer_norm(target, (4,)).requires_grad_()
    (grad,) = torch.autograd.grad(masked_l1_loss(perfect, target, torch.tensor([0]), impl="triton"), perfect)
    assert torch.count_nonzero(grad) == 0


def test_bad_inputs_name_the_problem():
    target, pred, index = torch.randn(4, 6), torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="segments"):
        masked_l1_loss(pred, target, index, segments=(2, 2), impl="triton")
    with pytest.raises(ValueError, match="constant"):
        masked_l1_loss(pred, target.requires_grad_(), index, impl="triton")
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        masked_l1_loss(torch.randn(3, 5), torch.randn(4, 6), index, impl="triton")


def _float64_loss(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor, segments: tuple[int, ...]):
    """The reference's formula in float64 throughout (masked_l1_loss_ref computes in fp32, as the reference does)."""
    h = torch.nn.functional.layer_norm(target.double(), target.shape[-1:], eps=LN_EPS).index_select(0, index)
    err = (pred.double() - h).abs()
    return torch.stack([part.mean() for part in err.split(list(segments))]).mean()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (the interpreter is fp32 only)")
@pytest.mark.parametrize("d", [1024, 1280, 96])
def test_bf16_error_within_twice_the_references(d):
    torch.manual_seed(0)
    target = torch.randn(4 * 1568, d, device="cuda").bfloat16()
    index = torch.randperm(target.shape[0], device="cuda")[:3000]
    pred = torch.randn(3000, d, device="cuda").bfloat16().requires_grad_()
    pred_exact = pred.detach().double().requires_grad_()  # its own leaf: its gradient stays in float64
    exact = _float64_loss(pred_exact, target, index, (1000, 2000))
    ours = masked_l1_loss(pred, target, index, segments=(1000, 2000), impl="triton")
    theirs = masked_l1_loss_ref(pred, target, index, segments=(1000, 2000))
    assert (ours.double() - exact).abs() <= 2 * (theirs.double() - exact).abs() + 1e-6
    g_exact = torch.autograd.grad(exact, pred_exact)[0]
    g_ours, g_theirs = (torch.autograd.grad(x, pred)[0].double() for x in (ours, theirs))
    # the gradient is sign(d) * w: where |d| is within rounding of 0 either implementation may flip a sign (2w
    # apart), so compare mean errors, which a handful of such elements cannot move
    assert (g_ours - g_exact).abs().mean() <= 2 * (g_theirs - g_exact).abs().mean() + 1e-12


@pytest.mark.parametrize("upstream", [1.0 / 3.0, 65536.0])
def test_fp16_gradient_is_rounded_once_after_the_loss_scale(upstream):
    """pred's gradient is w_row * sign(d) * upstream rounded once to pred's dtype, as the reference's fp32 gradient
    cast back at `pred.float()`. With fp16 (numpy has it, so the interpreter runs it) a weight folded into the stored
    derivative would round w_row in forward and a cast upstream would round 1/3 (an accumulation of 3) and overflow
    GradScaler's 65536 to inf."""
    g = torch.Generator().manual_seed(7)
    target = torch.randn(31, 40, generator=g)
    index = torch.randint(0, 31, (19,), generator=g)
    pred = torch.randn(19, 40, generator=g).half().requires_grad_()
    loss = masked_l1_loss(pred, target, index, segments=(7, 12), impl="triton")
    ref = masked_l1_loss_ref(pred, target, index, segments=(7, 12))
    (grad,) = torch.autograd.grad(loss * upstream, pred)
    (ref_grad,) = torch.autograd.grad(ref * upstream, pred)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad, atol=0, rtol=2 ** -10)  # within one fp16 rounding of each other



@pytest.mark.parametrize("loss_exp", [1.5, 2.0])
def test_16bit_gradient_of_other_exponents_is_rounded_once(loss_exp):
    """p |d|^(p-1) sign(d) is not exact in 16 bits for p != 1: the kernel keeps it in fp32 until backward's row scale,
    so pred's gradient is the reference's (its fp32 gradient cast once at `pred.float()`) up to a rare tie; rounding
    the derivative to fp16 first and the product again moves about a third of the elements by one unit."""
    g = torch.Generator().manual_seed(3)
    target = torch.randn(57, 48, generator=g)
    index = torch.randint(0, 57, (41,), generator=g)
    pred = torch.randn(41, 48, generator=g).half().requires_grad_()
    loss = masked_l1_loss(pred, target, index, loss_exp=loss_exp, segments=(16, 25), impl="triton")
    ref = masked_l1_loss_ref(pred, target, index, loss_exp=loss_exp, segments=(16, 25))
    (grad,) = torch.autograd.grad(loss, pred)
    (ref_grad,) = torch.autograd.grad(ref, pred)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad, ref_grad, atol=0, rtol=2 ** -10)
    assert (grad != ref_grad).float().mean() < 0.02
