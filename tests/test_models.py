"""Models: variant sizes, sin-cos table, tubelet embedding, packed == per-sequence computation, init, key names."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import VARIANTS, Packing, Predictor, PredictorLayout, VisionTransformer
from models.attention import packed_attention
from models.blocks import Block
from models.pos_embed import sincos_3d


# spec 1.1 (encoder incl. patch embed, trainable) and spec 2 (predictor at 224 px, 16 frames)
@pytest.mark.parametrize("name, encoder_m, predictor_m", [
    ("vit_tiny", 5.6, None), ("vit_small", 21.9, None), ("vit_base", 86.2, None),
    ("vit_large", 303.9, 22.1), ("vit_huge", 631.6, 22.3), ("vit_giant", 1012.2, None)])
def test_variant_parameter_counts(name, encoder_m, predictor_m):
    v = VARIANTS[name]
    with torch.device("meta"):
        enc = VisionTransformer(v)
        pred = Predictor(v.dim, enc.grid, num_heads=v.heads)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6  # noqa: E731
    assert count(enc) == pytest.approx(encoder_m, abs=0.06)
    if predictor_m is not None:
        assert count(pred) == pytest.approx(predictor_m, abs=0.06)
    assert enc.pos_embed.shape == (1, 1568, v.dim) and not enc.pos_embed.requires_grad


def test_giant_mlp_hidden():
    assert VARIANTS["vit_giant"].mlp_hidden == 6144 and VARIANTS["vit_huge"].mlp_hidden == 5120


def _sincos_by_hand(dim, grid):
    """Element by element from the formula in spec 1.3 (uniform power), independent of the vectorised code."""
    d = 2 * math.ceil(dim / 6)
    rows = []
    for t in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                row = []
                for p in (t, h, w):
                    freqs = [10000 ** (-k / (d / 2)) for k in range(d // 2)]
                    row += [math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs]
                rows.append(row[:dim])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("dim, grid", [(12, (2, 3, 4)), (20, (3, 2, 2)), (1024, (1, 2, 2))])
def test_sincos_table_against_formula(dim, grid):
    torch.testing.assert_close(sincos_3d(dim, grid), _sincos_by_hand(dim, grid), atol=1e-6, rtol=0)


def test_sincos_drops_trailing_columns_for_1024():
    table = sincos_3d(1024, (2, 2, 2))
    assert table.shape == (8, 1024)
    # 3 x 342 = 1026 columns: the last kept one is the second-to-last w-cosine; token 0 has all cosines 1
    assert torch.all(table[0, 342 - 171:342] == 1) and torch.all(table[0, :171] == 0)


@pytest.mark.parametrize("b, f, h, w, t, p", [(2, 4, 15, 10, 2, 5), (1, 6, 9, 9, 3, 3), (3, 2, 7, 14, 1, 7)])
def test_tubelet_embed_equals_conv3d(b, f, h, w, t, p):
    torch.manual_seed(0)
    enc = VisionTransformer(VARIANTS["vit_tiny"], img_size=h, num_frames=f, patch_size=p, tubelet_size=t)
    embed = enc.patch_embed
    video = torch.randn(b, 3, f, h, w)  # non-square: TubeletEmbed reads the grid from the video's own shape
    ref = F.conv3d(video, embed.proj.weight, embed.proj.bias, stride=(t, p, p)).flatten(2).transpose(1, 2)
    n = ref.shape[1]
    index = torch.tensor(sorted({0, 1, n - 1, n, b * n - 1, (b * n) // 2}))
    index = index[index < b * n]
    out = embed(video, index)
    torch.testing.assert_close(out, ref.reshape(b * n, -1)[index], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert embed.proj.weight.grad is not None and torch.isfinite(embed.proj.weight.grad).all()


def _naive_attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    att = torch.einsum("qhd,khd->hqk", q, k) * scale
    return torch.einsum("hqk,khd->qhd", att.softmax(-1), v)


@pytest.mark.parametrize("lengths", [[1, 7, 3, 7, 13], [5], [4, 4, 4], [2, 1]])
def test_packed_attention_matches_per_sequence_softmax(lengths):
    torch.manual_seed(1)
    total, heads, dh = sum(lengths), 3, 8
    qkv = torch.randn(total, 3, heads, dh, requires_grad=True)
    packing = Packing.from_seqlens(lengths)
    out = packed_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], packing)
    ref, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        ref.append(_naive_attention(qkv[s, 0], qkv[s, 1], qkv[s, 2]))
        start += n
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, g)
    (grad_ref,) = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


class _BackwardOps(TorchDispatchMode):
    """The aten ops a backward pass runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lengths", [[6, 6, 6], [1, 7, 3, 7, 13]])
def test_attention_backward_writes_the_qkv_gradient_in_one_piece(lengths):
    """Splitting qkv into q, k, v (and a ragged batch into its length groups) must not cost a zeroed full-size
    gradient per piece: select and slice backwards fill one each, unbind and split backwards write one stack / cat."""
    torch.manual_seed(0)
    blk = Block(24, 3, 48)
    x = torch.randn(sum(lengths), 24, requires_grad=True)
    out = blk(x, Packing.from_seqlens(lengths))
    audit = _BackwardOps()
    with audit:
        out.sum().backward()
    assert not audit.ops & {"select_backward", "slice_backward"}, audit.ops
    assert "stack" in audit.ops  # dq, dk, dv in one write
    assert x.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0


def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    from models import Variant
    return VisionTransformer(Variant(24, 2, 3), img_size=12, num_frames=4, patch_size=4, tubelet_size=2)


def test_packed_encoder_equals_per_sequence_dense():
    enc = _tiny_encoder()
    n = enc.num_tokens  # 2 * 3 * 3 = 18
    video = torch.randn(3, 3, 4, 12, 12)
    seqs = [torch.tensor([0, 4, 17]), torch.arange(n, 2 * n), torch.tensor([2 * n + 5]), torch.tensor([3, 8, 9, 10])]
    index = torch.cat(seqs)
    packed = enc(video, index, Packing.from_seqlens([len(s) for s in seqs]))
    single = torch.cat([enc(video, s, Packing.uniform(1, len(s))) for s in seqs])
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)
    dense = enc.forward_dense(video)
    torch.testing.assert_close(packed[3:3 + n], dense[1], atol=1e-5, rtol=1e-5)


def _reference_predictor_sequence(pred, z, ctx_n, tgt_n, g):
    """One (generator, clip) sequence the way the reference builds it: [ctx + pos ; mask token g + pos]."""
    pos = pred.predictor_pos_embed[0]
    x = pred.predictor_embed(z) + pos[ctx_n]
    t = pred.mask_tokens[g][0].expand(len(tgt_n), -1) + pos[tgt_n]
    seq = torch.cat([x, t])
    for blk in pred.predictor_blocks:
        seq = blk(seq, Packing.uniform(1, len(seq)))
    return pred.predictor_proj(pred.predictor_norm(seq))[len(ctx_n):]


def test_packed_predictor_equals_per_sequence_dense():
    torch.manual_seed(0)
    n, b = 18, 2
    pred = Predictor(24, (2, 3, 3), pred_dim=16, depth=2, num_heads=2, num_mask_tokens=2)
    with torch.no_grad():
        for tok in pred.mask_tokens:
            tok.normal_()  # zero-initialised by default: make the generators distinguishable
    rng = np.random.default_rng(0)
    ctx, tgt = [], []
    for g in range(2):
        for clip in range(b):
            perm = rng.permutation(n)
            k = int(rng.integers(1, n))
            ctx.append(np.sort(perm[:k]) + clip * n)
            tgt.append(np.sort(perm[k:]) + clip * n)
    layout = PredictorLayout.build([len(c) for c in ctx], [len(t) for t in tgt], b)
    assert layout.packing.seqlens == (n,) * 4 and layout.packing.is_uniform
    ctx_index, tgt_index = torch.from_numpy(np.concatenate(ctx)), torch.from_numpy(np.concatenate(tgt))
    z = torch.randn(len(ctx_index), 24)
    out = pred(z, ctx_index, tgt_index, layout)
    ref, start = [], 0
    for s, (c, t) in enumerate(zip(ctx, tgt)):
        ref.append(_reference_predictor_sequence(pred, z[start:start + len(c)], torch.from_numpy(c % n),
                                                 torch.from_numpy(t % n), s // b))
        start += len(c)
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    params = [*pred.mask_tokens, pred.predictor_embed.weight]
    for grad, grad_ref in zip(torch.autograd.grad(out, params, upstream), torch.autograd.grad(ref, params, upstream)):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


class _IndexAdds(TorchDispatchMode):
    """The index tensors of every index_add (a gather's backward) a pass runs."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in ("index_add", "index_add_"):
            self.indices.append(args[2].clone())
        return func(*args, **(kwargs or {}))


def test_predictor_backward_adds_no_row_twice():
    """On CUDA an index_add adds atomically in any order: with repeated indices (a mask token gathered into every
    target row of its generator) the sum changes from run to run. Every gather's backward in the predictor must write
    each row at most once (then the order cannot matter); the mask tokens' gradient is a broadcast's fixed-order sum."""
    torch.manual_seed(0)
    pred = Predictor(24, (2, 3, 3), pred_dim=16, depth=1, num_heads=2, num_mask_tokens=2)
    ctx_lens, tgt_lens = [3, 5, 2, 7], [15, 13, 16, 11]  # generator 0: clips 0, 1; generator 1: clips 0, 1
    layout = PredictorLayout.build(ctx_lens, tgt_lens, batch_size=2)
    assert layout.target_counts == (28, 27)
    ctx_index = torch.randint(0, 36, (sum(ctx_lens),))
    tgt_index = torch.randint(0, 36, (sum(tgt_lens),))
    z = torch.randn(sum(ctx_lens), 24, requires_grad=True)
    out = pred(z, ctx_index, tgt_index, layout)
    audit = _IndexAdds()
    with audit:
        out.square().sum().backward()
    assert audit.indices, "the packing's gathers have a backward"
    for index in audit.indices:
        assert index.unique().numel() == index.numel(), index
    assert all(token.grad is not None and token.grad.abs().sum() > 0 for token in pred.mask_tokens)


def test_predictor_layout_by_hand():
    # two sequences: ctx lengths (2, 1), tgt lengths (1, 3); packed input = [c0 c1 | t0 | c2 | t1 t2 t3]
    layout = PredictorLayout.build([2, 1], [1, 3], batch_size=1)
    assert layout.order.tolist() == [0, 1, 3, 2, 4, 5, 6]  # cat([c0 c1 c2, t0 t1 t2 t3]) rows
    assert layout.target_rows.tolist() == [2, 4, 5, 6]
    assert layout.target_counts == (1, 3)  # target rows of generator 0 (one clip per generator), of 1
    assert layout.packing.seqlens == (3, 4)


def test_init_v1_vs_v2_depth_rescale():
    from models import Variant
    v = Variant(24, 3, 3)
    torch.manual_seed(0)
    v1 = VisionTransformer(v, img_size=8, num_frames=2, patch_size=4)
    torch.manual_seed(0)
    v2 = VisionTransformer(v, img_size=8, num_frames=2, patch_size=4, rescale_init_by_depth=True)
    for i, (a, b) in enumerate(zip(v1.blocks, v2.blocks), start=1):
        torch.testing.assert_close(b.mlp.fc2.weight * math.sqrt(2 * i), a.mlp.fc2.weight)
        torch.testing.assert_close(b.attn.proj.weight * math.sqrt(2 * i), a.attn.proj.weight)
        torch.testing.assert_close(b.attn.qkv.weight, a.attn.qkv.weight)
    assert float(v1.blocks[0].attn.qkv.bias.detach().abs().sum()) == 0.0
    assert v1.blocks[0].attn.qkv.weight.detach().std().item() == pytest.approx(0.02, rel=0.15)


def test_state_dict_keys_follow_the_reference():
    enc = _tiny_encoder()
    keys = set(enc.state_dict())
    assert {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
            "blocks.0.norm2.bias", "norm.weight"} <= keys
    assert enc.patch_embed.proj.weight.shape == (24, 3, 2, 4, 4)
    pred = Predictor(24, (2, 3, 3), pred_dim=16, depth=1, num_heads=2)
    pkeys = set(pred.state_dict())
    assert {"predictor_embed.weight", "mask_tokens.0", "mask_tokens.1", "predictor_pos_embed",
            "predictor_blocks.0.attn.qkv.weight", "predictor_norm.weight", "predictor_proj.bias"} <= pkeys
    assert all(float(t.detach().abs().sum()) == 0 for t in pred.mask_tokens) and pred.mask_tokens[0].shape == (1, 1, 16)
