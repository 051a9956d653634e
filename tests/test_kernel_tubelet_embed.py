"""masked_tubelet_embed: the Triton kernel (interpreted on CPU) against conv3d, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from kernels import dispatch, masked_tubelet_embed
from kernels.tubelet_embed import masked_tubelet_embed_ref


def _conv3d_rows(video, weight, bias, pos, index):
    """The specification: conv3d, flattened to (B*N, D), plus the position table, rows `index`."""
    d = weight.shape[0]
    out = F.conv3d(video, weight, bias, stride=weight.shape[2:]).flatten(2).transpose(1, 2).reshape(-1, d)
    if pos is not None:
        out = out + pos.reshape(-1, d).repeat(video.shape[0], 1)
    return out[index]


def _inputs(b, c, f, h, w, t, p, d, *, bias=True, pos=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (f // t) * (h // p) * (w // p)
    video = torch.randn(b, c, f, h, w, generator=g).requires_grad_()
    weight = (torch.randn(d, c, t, p, p, generator=g) / (c * t * p * p) ** 0.5).requires_grad_()
    b_ = torch.randn(d, generator=g).requires_grad_() if bias else None
    pos_ = torch.randn(1, n, d, generator=g).requires_grad_() if pos else None
    return video, weight, b_, pos_, n


def _kept(b, n, counts, seed=0):
    """Sorted kept ids per clip (clip-major), `counts[i]` tokens of clip i: the encoder's packed layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([i * n + torch.randperm(n, generator=g)[:k].sort().values for i, k in enumerate(counts)])


CASES = {
    # name: (B, C, F, H, W, tubelet, patch, D, kept per clip)
    "prime_sizes_ragged": (3, 3, 6, 15, 20, 3, 5, 37, (5, 11, 2)),
    "one_kept_token": (2, 3, 4, 16, 16, 2, 8, 33, (1, 0)),
    "all_kept": (2, 3, 4, 24, 16, 2, 8, 70, None),
    "single_channel_wide_d": (1, 1, 2, 14, 21, 1, 7, 97, (5,)),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_conv3d(case):
    b, c, f, h, w, t, p, d, counts = CASES[case]
    video, weight, bias, pos, n = _inputs(b, c, f, h, w, t, p, d)
    index = torch.arange(b * n) if counts is None else _kept(b, n, counts)
    before = dict(dispatch.launches)
    out = masked_tubelet_embed(video, weight, bias, pos, index, impl="triton")
    ref = _conv3d_rows(video, weight, bias, pos, index)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    inputs = (video, weight, bias, pos)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for name, g_, w_ in zip(("video", "weight", "bias", "pos_embed"), got, want):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5, msg=lambda m: f"[{name}.grad] {m}")
    # the kernels really ran: no silent fallback to the reference
    assert dispatch.launches["masked_tubelet_embed_fwd"] == before.get("masked_tubelet_embed_fwd", 0) + 1
    assert dispatch.launches["masked_tubelet_embed_dw"] == before.get("masked_tubelet_embed_dw", 0) + 1


def _matches_conv3d_with_video_and_weight_gradients(video, weight, bias, pos, index):
    out = masked_tubelet_embed(video, weight, bias, pos, index, impl="triton")
    ref = _conv3d_rows(video, weight, bias, pos, index)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    for g_, w_ in zip(torch.autograd.grad(out, (video, weight), grad), torch.autograd.grad(ref, (video, weight), grad)):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)


def test_repeated_ids_without_bias_or_position():
    """Ids may repeat (every mask generator of a step embeds the same clip); no bias, no position table."""
    video, weight, _, _, n = _inputs(2, 3, 4, 16, 24, 2, 8, 19, bias=False, pos=False)
    _matches_conv3d_with_video_and_weight_gradients(video, weight, None, None,
                                                    torch.tensor([3, 3, n + 5, 0, n + 5, 2 * n - 1]))


def test_strided_clip_view_and_frozen_inputs():
    """A clip that is a view (unit last stride, padded rows) is read in place; frozen inputs get no gradient."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 3, 4, 16, 27, generator=g)
    video = full[..., 2:26]  # W = 24, row stride 27
    weight = (torch.randn(21, 3, 2, 8, 8, generator=g) / 384 ** 0.5).requires_grad_()
    bias = torch.randn(21, generator=g, requires_grad=True)
    pos = torch.randn(1, 2 * 2 * 3, 21, generator=g)
    index = _kept(2, 12, (7, 4))
    out = masked_tubelet_embed(video, weight, bias, pos, index, impl="triton")
    torch.testing.assert_close(out, _conv3d_rows(video, weight, bias, pos, index), atol=1e-5, rtol=1e-5)
    dw, db = torch.autograd.grad(out.sum(), (weight, bias))
    ref_dw, ref_db = torch.autograd.grad(_conv3d_rows(video, weight, bias, pos, index).sum(), (weight, bias))
    torch.testing.assert_close(dw, ref_dw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db, ref_db)


def test_strided_token_index_is_read_as_its_values():
    """Every other id of a longer index (a strided view): the kernels must see the view's ids, not memory order."""
    video, weight, bias, pos, n = _inputs(2, 3, 4, 16, 16, 2, 8, 19)
    index = _kept(2, n, (6, 8))[::2]
    assert index.stride(0) == 2
    _matches_conv3d_with_video_and_weight_gradients(video, weight, bias, pos, index)


def test_reference_equals_conv3d():
    """The PyTorch path (gather + Linear) is itself checked against the convolution it replaces."""
    video, weight, bias, pos, n = _inputs(2, 3, 6, 10, 15, 3, 5, 13)
    index = _kept(2, n, (4, 9))
    torch.testing.assert_close(masked_tubelet_embed_ref(video, weight, bias, pos, index),
                               _conv3d_rows(video, weight, bias, pos, index), atol=1e-5, rtol=1e-5)


def test_empty_index_gives_empty_rows():
    video, weight, bias, pos, _ = _inputs(1, 3, 2, 8, 8, 2, 8, 5)
    out = masked_tubelet_embed(video, weight, bias, pos, torch.zeros(0, dtype=torch.int64), impl="triton")
    assert out.shape == (0, 5)


def test_bad_shapes_name_the_problem():
    video, weight, bias, pos, _ = _inputs(1, 3, 4, 16, 16, 2, 8, 5)
    with pytest.raises(ValueError, match="does not tile"):
        masked_tubelet_embed(video[:, :, :3], weight, bias, pos, torch.tensor([0]), impl="triton")
    with pytest.raises(ValueError, match="int64"):
        masked_tubelet_embed(video, weight, bias, pos, torch.tensor([0], dtype=torch.int32), impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (the interpreter is fp32 only)")
@pytest.mark.parametrize("d,patch,kept", [(1024, 16, 0.3), (1280, 16, 1.0), (96, 8, 0.5)])
def test_bf16_error_within_twice_the_references(d, patch, kept):
    torch.manual_seed(0)
    b, f, size = 2, 16, 224 if patch == 16 else 64
    video = torch.randn(b, 3, f, size, size, device="cuda")
    weight = (torch.randn(d, 3, 2, patch, patch, device="cuda") * 0.02).requires_grad_()
    bias = torch.randn(d, device="cuda").requires_grad_()
    n = (f // 2) * (size // patch) ** 2
    pos = torch.randn(1, n, d, device="cuda")
    index = torch.randperm(b * n, device="cuda")[:int(kept * b * n)].sort().values
    exact = masked_tubelet_embed_ref(video.double(), weight.double(), bias.double(), pos.double(), index)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = masked_tubelet_embed(video, weight, bias, pos, index, impl="triton")
        theirs = masked_tubelet_embed_ref(video, weight, bias, pos, index)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    err, ref_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert err <= 2 * ref_err, (err, ref_err)
    grad = torch.randn_like(exact)
    exact_g = torch.autograd.grad(exact, (weight, bias), grad)
    ours_g = torch.autograd.grad(ours, (weight, bias), grad.to(ours.dtype))
    theirs_g = torch.autograd.grad(theirs, (weight, bias), grad.to(theirs.dtype))
    for o, t, e in zip(ours_g, theirs_g, exact_g):
        assert (o.double() - e).abs().max() <= 2 * (t.double() - e).abs().max() + 1e-6
