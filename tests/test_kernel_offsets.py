"""Row offsets past 2^31 elements: the kernels widen row numbers to int64 before multiplying by a row stride
(kernels/offsets.py); int32 products wrap to negative addresses (an evaluation chunk of ViT-H features on a large
GPU)."""

import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

from kernels.offsets import row_starts

from .conftest import ROOT


@triton.jit
def _row_starts_kernel(OUT, first, stride, BLOCK: tl.constexpr):
    rows = first + tl.arange(0, BLOCK)
    tl.store(OUT + tl.arange(0, BLOCK), row_starts(rows, stride))


def test_row_starts_past_2_31():
    first, stride = 205 * 8192 - 2, 1280  # rows of 205 clips x 8192 tokens of ViT-H features (the last ones)
    out = torch.empty(4, dtype=torch.int64)
    _row_starts_kernel[(1,)](out, first, stride, BLOCK=4)
    assert out.tolist() == [(first + i) * stride for i in range(4)]
    assert out.max() > 2 ** 31


# A fp16 pred whose 9 rows lie 2^28 elements apart (the 4 GiB buffer is virtual: only the touched pages are real).
# In a subprocess: the unwidened kernel reads below the buffer and the interpreter dies of a segmentation fault.
_FAR_ROWS = """
import torch
from kernels.l1_loss import masked_l1_loss, masked_l1_loss_ref
buf = torch.empty(8 * 2 ** 28 + 16, dtype=torch.float16)
pred = buf.as_strided((9, 16), (2 ** 28, 1))
pred.copy_(torch.randn(9, 16, generator=torch.Generator().manual_seed(0)).half())
target, index = torch.randn(9, 16, generator=torch.Generator().manual_seed(1)), torch.arange(9)
print(float(masked_l1_loss(pred, target, index, impl="triton")), float(masked_l1_loss_ref(pred, target, index)))
"""


def test_loss_reads_rows_past_2_31_elements():
    run = subprocess.run([sys.executable, "-c", _FAR_ROWS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    ours, ref = (float(v) for v in run.stdout.split())
    assert abs(ours - ref) <= 1e-5 * abs(ref)
