"""Tests for engine.flops: hand counts, the anchors-doc closed form, and per-sequence attention."""

import numpy as np
import pytest

from engine.flops import StepFlops, TransformerDims, block_flops, encoder_flops, predictor_flops, step_flops

PATCH_FEATURES = 3 * 2 * 16 * 16  # C * t * p * p of the 2x16x16 tubelet


def test_block_hand_count():
    # d=4, h=8, one block, sequences of 2 and 3 tokens (5 tokens in all), matmul = 2*m*n*k:
    #   QKV  [n,4]@[4,12]: 96n   proj [n,4]@[4,4]: 32n   fc1 [n,4]@[4,8]: 64n   fc2 [n,8]@[8,4]: 64n
    #   -> 256 per token, 256*5 = 1280
    #   QK^T [n,4]@[4,n]: 8n^2   PV [n,n]@[n,4]: 8n^2  -> 16*(2^2 + 3^2) = 16*13 = 208
    #   total 1280 + 208 = 1488
    assert block_flops([2, 3], dim=4, mlp_hidden=8) == 1488


def test_encoder_and_predictor_hand_count():
    # Encoder d=4, h=8, depth 2, 6 inputs per tubelet, sequences [2, 3]:
    #   embed 2*5*6*4 = 240, blocks 2*1488 = 2976 -> 3216
    enc = TransformerDims(dim=4, depth=2, mlp_hidden=8)
    assert encoder_flops([2, 3], enc, patch_features=6) == 3216

    # Predictor width 2, h=4, depth 1, enc_dim 4, context [1, 2], targets [2, 1] -> sequences [3, 3]:
    #   embed 2*(1+2)*4*2 = 48
    #   block: GEMMs 2*(3*4 + 4 + 2*2*4) = 64 per token * 6 = 384, attention 4*2*(9+9) = 144 -> 528
    #   projection of the 3 target rows 2*3*2*4 = 48
    #   total 48 + 528 + 48 = 624
    pred = TransformerDims(dim=2, depth=1, mlp_hidden=4)
    assert predictor_flops([1, 2], [2, 1], enc_dim=4, dims=pred) == 624

    # Step with N=4, B=1, two generators (context [1, 2], targets [2, 1]):
    #   target fwd over [4]: embed 2*4*6*4 = 192, block 256*4 + 16*16 = 1280, x2 = 2560 -> 2752
    #   context 3 x fwd over [1, 2]: embed 2*3*6*4 = 144, block 256*3 + 16*(1+4) = 848, x2 = 1696 -> 1840*3 = 5520
    #   predictor 3 x 624 = 1872
    flops = step_flops(4, 1, [1, 2], [2, 1], enc, pred, patch_features=6)
    assert flops == StepFlops(target=2752, context=5520, predictor=1872)
    assert flops.total == 10144


def _appendix_sample_flops(n: int, d: int, depth: int, keeps: list[float]) -> int:
    """performance_anchors.md appendix closed form, copied as an independent check (MLP ratio 4, predictor 384x12)."""

    def blk(n, d, mlp=4):
        return 2 * n * (4 * d * d + 2 * mlp * d * d) + 4 * n * n * d

    def enc(n, d, depth):
        return depth * blk(n, d) + 2 * n * 1536 * d

    def pred(nc, n, de, dp=384, lp=12):
        return 2 * nc * de * dp + lp * blk(n, dp) + 2 * (n - nc) * dp * de

    return enc(n, d, depth) + sum(3 * enc(int(k * n), d, depth) + 3 * pred(int(k * n), n, d) for k in keeps)


@pytest.mark.parametrize(
    "name, num_tokens, dim, depth, expected_tflop, digits",
    [("ViT-H/16-384", 4608, 1280, 32, 19.7, 1), ("ViT-L/16-224", 1568, 1024, 24, 2.92, 2)],
)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_anchor_closed_form(name, num_tokens, dim, depth, expected_tflop, digits, batch_size):
    encoder = TransformerDims(dim=dim, depth=depth, mlp_hidden=4 * dim)
    predictor = TransformerDims(dim=384, depth=12, mlp_hidden=4 * 384)
    keeps = [0.25, 0.10]
    # Sequence s = g*B + b; every sample of a generator keeps the same count, targets are the complement.
    context = [int(k * num_tokens) for k in keeps for _ in range(batch_size)]
    target = [num_tokens - c for c in context]

    flops = step_flops(num_tokens, batch_size, context, target, encoder, predictor, PATCH_FEATURES)

    assert flops.total == batch_size * _appendix_sample_flops(num_tokens, dim, depth, keeps)
    assert round(flops.total / batch_size / 1e12, digits) == expected_tflop, name


def test_vith_384_breakdown_matches_table():
    # Section 7.2 row "ViT-H/16, 384 px, 25% / 10%": target 9.30, context 6.86, predictor 3.55 TFLOP.
    n = 4608
    context = [int(0.25 * n), int(0.10 * n)]
    flops = step_flops(
        n,
        1,
        context,
        [n - c for c in context],
        TransformerDims(1280, 32, 5120),
        TransformerDims(384, 12, 1536),
        PATCH_FEATURES,
    )
    assert [round(x / 1e12, 2) for x in (flops.target, flops.context, flops.predictor)] == [9.30, 6.86, 3.55]


def test_attention_is_counted_per_sequence():
    d, h = 64, 256
    ragged = [5, 17, 30]
    tokens = sum(ragged)
    # Same tokens packed as one sequence: GEMMs are identical, attention differs by 4*d*(T^2 - sum n^2).
    assert block_flops([tokens], d, h) - block_flops(ragged, d, h) == 4 * d * (tokens**2 - sum(n * n for n in ragged))
    # Padded to the longest: the extra cost is exactly the GEMMs on pad tokens plus 4*d*(max^2 - n^2) per sequence.
    longest = max(ragged)
    pad_tokens = sum(longest - n for n in ragged)
    extra = 2 * pad_tokens * (4 * d * d + 2 * d * h) + 4 * d * sum(longest**2 - n * n for n in ragged)
    assert block_flops([longest] * len(ragged), d, h) - block_flops(ragged, d, h) == extra
    # Counting is additive over sequences and blind to their order; an empty sequence costs nothing.
    assert block_flops(ragged, d, h) == sum(block_flops([n], d, h) for n in ragged)
    assert block_flops(ragged[::-1] + [0], d, h) == block_flops(ragged, d, h)


def test_numpy_lengths_give_exact_python_int():
    lengths = np.array([4608] * 64, dtype=np.int64)
    dims = TransformerDims(1280, 32, 5120)
    result = encoder_flops(lengths, dims, PATCH_FEATURES)
    assert type(result) is int
    assert result == encoder_flops([4608] * 64, dims, PATCH_FEATURES)


def test_rejects_bad_lengths():
    dims = TransformerDims(8, 1, 32)
    with pytest.raises(ValueError):
        block_flops([3, -1], 8, 32)
    with pytest.raises(ValueError):
        predictor_flops([1, 2], [3], enc_dim=16, dims=dims)
