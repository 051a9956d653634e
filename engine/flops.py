"""Model FLOPs of a V-JEPA training step, counted from the real per-sequence lengths.

Conventions (performance_anchors.md section 7):

* A matmul of ``[m, k] @ [k, n]`` costs ``2*m*n*k`` FLOPs; only matmuls are counted (norms, softmax, GELU,
  residual adds and the loss are left out, as in every MFU figure we compare against).
* One pre-LN ViT block of width ``d``, MLP hidden ``h`` over a sequence of ``n`` tokens costs
  ``2*n*(3*d*d + d*d + 2*d*h)`` for the QKV, output-projection and MLP GEMMs plus ``4*n*n*d`` for the
  non-causal ``Q @ K^T`` and ``P @ V``.
* Attention is counted per sequence (sum of ``n_s**2``). Padding to a common length is an implementation cost,
  not model work, so it never enters these numbers; a padded kernel therefore shows up as a lower MFU.
* Backward is taken as twice the forward, so a trained module costs ``3x`` its forward. This is the convention of
  the anchors document; activation recomputation is hardware work, not model work, and is not added.

All results are exact Python ints, so sums over many layers and steps never lose precision.
"""

from collections.abc import Sequence
from dataclasses import dataclass

# Forward + backward of a trained module, with backward ~= 2x forward (anchors doc section 7.1).
TRAIN_MULTIPLIER = 3


@dataclass(frozen=True)
class TransformerDims:
    """Shape of a ViT trunk: width, number of blocks and MLP hidden width."""

    dim: int
    depth: int
    mlp_hidden: int


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step, split by network."""

    target: int  # target-encoder forward (no grad)
    context: int  # context-encoder forward + backward
    predictor: int  # predictor forward + backward

    @property
    def total(self) -> int:
        """Sum of the three parts."""
        return self.target + self.context + self.predictor


def _lengths(seqlens: Sequence[int]) -> list[int]:
    """Coerce lengths to Python ints (numpy / torch scalars would overflow or round in long sums) and check them."""
    lengths = [int(n) for n in seqlens]
    if any(n < 0 for n in lengths):
        raise ValueError(f"sequence lengths must be non-negative, got {lengths}")
    return lengths


def block_flops(seqlens: Sequence[int], dim: int, mlp_hidden: int) -> int:
    """Forward FLOPs of one pre-LN transformer block applied to every sequence in ``seqlens``.

    Args:
        seqlens: token count of each sequence (no padding).
        dim: model width ``d``.
        mlp_hidden: MLP hidden width ``h``.

    Returns:
        ``sum_s 2*n_s*(4*d*d + 2*d*h) + 4*n_s**2*d``.
    """
    lengths = _lengths(seqlens)
    tokens = sum(lengths)
    gemm = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * mlp_hidden)
    attention = 4 * dim * sum(n * n for n in lengths)
    return gemm + attention


def encoder_flops(seqlens: Sequence[int], dims: TransformerDims, patch_features: int) -> int:
    """Forward FLOPs of a ViT encoder: tubelet embedding plus ``dims.depth`` blocks.

    Args:
        seqlens: kept tokens of each sequence; the tubelet projection is applied only to kept tokens.
        dims: encoder trunk shape.
        patch_features: inputs per tubelet, ``C*t*p*p`` (1536 for 3 x 2 x 16 x 16).
    """
    tokens = sum(_lengths(seqlens))
    embed = 2 * tokens * patch_features * dims.dim
    return embed + dims.depth * block_flops(seqlens, dims.dim, dims.mlp_hidden)


def predictor_flops(
    context_seqlens: Sequence[int], target_seqlens: Sequence[int], enc_dim: int, dims: TransformerDims
) -> int:
    """Forward FLOPs of the predictor, one sequence of ``ctx_s + tgt_s`` tokens per (generator, sample).

    Counts the ``enc_dim -> dims.dim`` embedding of context tokens (mask tokens are added, not projected),
    ``dims.depth`` blocks over the concatenated sequences, and the ``dims.dim -> enc_dim`` projection of target
    rows only (the reference drops the context rows before projecting).

    Args:
        context_seqlens: context tokens of each predictor sequence.
        target_seqlens: target (mask-token) count of each predictor sequence, aligned with ``context_seqlens``.
        enc_dim: encoder width, the predictor's input and output width.
        dims: predictor trunk shape.
    """
    ctx = _lengths(context_seqlens)
    tgt = _lengths(target_seqlens)
    if len(ctx) != len(tgt):
        raise ValueError(f"{len(ctx)} context sequences but {len(tgt)} target sequences")
    embed = 2 * sum(ctx) * enc_dim * dims.dim
    blocks = dims.depth * block_flops([c + t for c, t in zip(ctx, tgt)], dims.dim, dims.mlp_hidden)
    proj = 2 * sum(tgt) * dims.dim * enc_dim
    return embed + blocks + proj


def step_flops(
    num_tokens: int,
    batch_size: int,
    context_seqlens: Sequence[int],
    target_seqlens: Sequence[int],
    encoder: TransformerDims,
    predictor: TransformerDims,
    patch_features: int,
) -> StepFlops:
    """Model FLOPs of one V-JEPA training step.

    The target encoder runs forward only over ``batch_size`` full clips of ``num_tokens`` tokens. The context
    encoder and the predictor run forward and backward, counted as ``3x`` their forward (backward ~= 2x forward,
    the anchors-doc convention).

    Args:
        num_tokens: tokens per full clip ``N``.
        batch_size: clips in the step ``B``.
        context_seqlens: kept context tokens of every (generator, sample) sequence, ``s = g*B + b``.
        target_seqlens: predicted tokens of the same sequences, aligned with ``context_seqlens``.
        encoder: encoder trunk shape (shared by the context and target encoders).
        predictor: predictor trunk shape.
        patch_features: inputs per tubelet, ``C*t*p*p``.
    """
    target = encoder_flops([num_tokens] * batch_size, encoder, patch_features)
    context = TRAIN_MULTIPLIER * encoder_flops(context_seqlens, encoder, patch_features)
    pred = TRAIN_MULTIPLIER * predictor_flops(context_seqlens, target_seqlens, encoder.dim, predictor)
    return StepFlops(target=target, context=context, predictor=pred)
