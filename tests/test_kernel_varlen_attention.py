"""varlen_attention: the Triton flash kernel (interpreted on CPU) against the per-sequence reference: output and
dq, dk, dv on ragged length sets, every head dim V-JEPA uses, strided views of a qkv projection."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import dispatch
from kernels.varlen_attention import head_align, head_dim_split, varlen_attention, varlen_attention_ref


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(total, heads, head_dim, seed):
    """q, k, v as the model produces them: strided views into one (T, 3, H, Dh) projection output."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, 3, heads, head_dim, generator=g).requires_grad_()
    return qkv, (qkv[:, 0], qkv[:, 1], qkv[:, 2])


CASES = {
    # name: (sequence lengths, heads, head dim)
    "predictor_v1_ragged": ((1, 7, 13), 2, 24),
    "predictor_v2_primes": ((11, 3, 17), 3, 32),
    "vitl_dense": ((19, 19), 4, 64),
    "vith_one_long": ((53,), 1, 80),
    "vitg_ragged": ((17, 1, 5), 2, 88),
    "wide_heads": ((9, 23), 1, 128),
}


@pytest.mark.parametrize("case", CASES)
def test_output_and_gradients_match_reference(case):
    lengths, heads, head_dim = CASES[case]
    qkv, (q, k, v) = _qkv(sum(lengths), heads, head_dim, seed=head_dim)
    cu = _cu(lengths)
    before = {n: dispatch.launches[n] for n in ("varlen_attention_fwd", "varlen_attention_bwd_dkdv",
                                               "varlen_attention_bwd_dq")}
    out = varlen_attention(q, k, v, cu, max(lengths), impl="triton")
    ref = varlen_attention_ref(q, k, v, cu, max(lengths))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(ref, qkv, grad)
    for i, name in enumerate("qkv"):
        torch.testing.assert_close(got[:, i], want[:, i], atol=1e-5, rtol=1e-5, msg=lambda m: f"[d{name}] {m}")
    assert all(dispatch.launches[n] == c + 1 for n, c in before.items())  # the kernels ran, no fallback


def test_scale_argument_and_separate_tensors():
    g = torch.Generator().manual_seed(1)
    lengths = (6, 2, 31)
    q, k, v = (torch.randn(sum(lengths), 2, 40, generator=g).requires_grad_() for _ in range(3))
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, 31, scale=0.37, impl="triton")
    ref = varlen_attention_ref(q, k, v, cu, 31, scale=0.37)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sequences_never_see_each_other():
    """Changing one sequence's keys leaves every other sequence's output unchanged."""
    lengths = (4, 9, 3)
    _, (q, k, v) = _qkv(sum(lengths), 2, 24, seed=3)
    q, k, v = (x.detach().clone() for x in (q, k, v))
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, 9, impl="triton")
    k[4:13] += 5.0
    out2 = varlen_attention(q, k, v, cu, 9, impl="triton")
    torch.testing.assert_close(out2[:4], out[:4])
    torch.testing.assert_close(out2[13:], out[13:])
    assert not torch.allclose(out2[4:13], out[4:13])


@pytest.mark.parametrize("head_dim,split", [(24, (16, 16)), (32, (32, 0)), (64, (64, 0)), (80, (64, 16)),
                                            (88, (64, 32)), (128, (128, 0)), (8, (16, 0))])
def test_head_dim_split_pays_less_than_the_next_power_of_two(head_dim, split):
    assert head_dim_split(head_dim) == split


def test_bad_inputs_name_the_problem():
    q = torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, q, q, torch.tensor([0, 5]), 5, impl="triton")
    with pytest.raises(ValueError, match=r"\(T, H, Dh\)"):
        varlen_attention(q, q[:4], q, _cu((5,)), 5, impl="triton")
    with pytest.raises(ValueError, match="contiguous head dim"):
        varlen_attention(q, q, torch.randn(5, 16, 2).transpose(1, 2), _cu((5,)), 5, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (the interpreter is fp32 only)")
@pytest.mark.parametrize("heads,head_dim,lengths", [(16, 24, (1568,) * 4), (12, 32, (1568,) * 4),
                                                    (16, 80, (4608,) * 2), (16, 64, (600, 311, 1, 977))])
def test_bf16_error_within_twice_the_references(heads, head_dim, lengths):
    torch.manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device="cuda").bfloat16().requires_grad_()
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = _cu(lengths).cuda()
    qkv_exact = qkv.detach().double().requires_grad_()  # its own leaf: gradients stay in float64
    exact = varlen_attention_ref(qkv_exact[:, 0], qkv_exact[:, 1], qkv_exact[:, 2], cu, max(lengths))
    ours = varlen_attention(q, k, v, cu, max(lengths), impl="triton")
    # the bf16 error of flash attention, which rounds the probabilities and their gradients to bf16 as ours does
    # (a 3-D SDPA call would take the math path, which computes in fp32 and rounds once: a stricter bar than flash's)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        theirs = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(x[s:e].transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1)
            for s, e in zip(cu.tolist()[:-1], cu.tolist()[1:])])
    assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max()
    grad = torch.randn_like(exact)
    g_exact = torch.autograd.grad(exact, qkv_exact, grad)[0]
    g_ours, g_theirs = (torch.autograd.grad(o, qkv, grad.to(o.dtype))[0].double() for o in (ours, theirs))
    assert (g_ours - g_exact).abs().max() <= 2 * (g_theirs - g_exact).abs().max()


@pytest.mark.parametrize("head_dim,align", [(24, 8), (32, 16), (80, 16), (88, 8), (12, 4), (7, 1)])
def test_head_offset_hint_divides_every_head_stride(head_dim, align):
    """The kernels' HEAD_ALIGN (tl.multiple_of on a head's offset) is what the strides of q, k, v as views of the qkv
    projection guarantee; kernels.aot compiles head dims 24 and 88 with their 8."""
    qkv = torch.empty(5, 3 * 2 * head_dim)
    q, k, v = qkv.view(5, 3, 2, head_dim).unbind(1)
    assert head_align(q, k, v) == align
