"""Row offsets in 64-bit integers.

A program's row numbers (`pid * BLOCK + arange`) and the row strides Triton receives are int32, so their product wraps
past 2^31 elements: a (T, D) tensor with T * D >= 2^31 (ViT-H's 1280 features over 205 clips of 8192 tokens, an
evaluation chunk a 141 GB GPU holds) would be read and written at wrapped, negative addresses. Widening the rows
first costs one int64 multiply per row, nothing per element.
"""

import triton
import triton.language as tl


@triton.jit
def row_starts(rows, stride):
    """`rows * stride` as int64: the element offset of each row's start."""
    return rows.to(tl.int64) * stride
