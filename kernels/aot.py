"""Compile every kernel configuration for sm_90 (H100/H200) ahead of time, on any machine, and check it fits.

The interpreter that runs our tests on CPUs cannot see GPU-only failures: shared memory beyond the 227 KiB a block
may use, register spills, bf16 `tl.dot` lowering. Triton compiles for a GPU target without one being present, so
CI builds here exactly the configurations the launchers pick (same tile tables) in the dtypes training uses, and
reads shared memory from Triton's metadata and registers/spills from ptxas's own report.

    python -m kernels.aot [--json]     # exit status 1 if any configuration fails to compile, overflows or spills

Run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions by Python simulations).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import triton
import triton.backends.nvidia
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import dispatch, ema, l1_loss, tubelet_embed

# the package exports the op under its module's name, so `from . import varlen_attention` would give the function
_attention = importlib.import_module(".varlen_attention", __package__)


TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (opt-in maximum)


@dataclass
class Spec:
    name: str
    fn: Any
    signature: dict[str, str]  # argument -> triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    attrs: dict[tuple[int, ...], list] | None = None  # divisibility-by-16 hints, as the launcher derives them


@dataclass
class Report:
    name: str
    ok: bool
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0
    error: str = ""


def _sig(args: str, types: dict[str, str], constexprs: dict[str, Any],
         div16: str = "") -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    """Types of every argument of `args` (comma-separated): pointers from `types`, integers i32 unless listed, and
    the hints a launch specialises on: torch's allocations are 16-byte aligned and the integers named in `div16`
    (widths, frame strides) are multiples of 16 at the recipes' shapes. Unit strides are constexprs (as at launch:
    Triton specialises integers equal to 1), which is what lets loads along contiguous pixels vectorise."""
    names = [x.strip() for x in args.split(",")]
    sig = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    hinted = {a for a in names if sig[a].startswith("*")} | {x.strip() for x in div16.split(",") if x.strip()}
    return sig, {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in hinted}


def _spec(name: str, fn: Any, args: str, types: dict[str, str], const: dict[str, Any], num_warps: int,
          num_stages: int, div16: str = "") -> Spec:
    signature, attrs = _sig(args, types, const, div16)
    return Spec(name, fn, signature, const, num_warps, num_stages, attrs)


def embed_specs() -> list[Spec]:
    fwd_args = ("VIDEO, W, BIAS, POS, INDEX, OUT, T, D, K, N, GH, GW, s_vb, s_vc, s_vf, s_vh, s_vw, s_wd, s_pn, "
                "s_out, TUB, PATCH, HAS_BIAS, HAS_POS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K")
    dw_args = ("DY, VIDEO, INDEX, DW, DB, T, D, K, N, GH, GW, rows_per_split, s_dy, s_vb, s_vc, s_vf, s_vh, s_vw, "
               "TUB, PATCH, HAS_BIAS, DOT_PRECISION, BLOCK_D, BLOCK_K, BLOCK_T")
    div16 = "D, K, N, s_vb, s_vc, s_vf, s_vh, s_wd, s_pn, s_out, s_dy, rows_per_split"
    specs = []
    # (clip dtype, compute dtype): fp32 clips under bf16 autocast, bf16 clips, fp32 clips under fp16 autocast
    # (meta.dtype=float16), plain fp32
    for video, compute in (("fp32", "bf16"), ("bf16", "bf16"), ("fp32", "fp16"), ("fp32", "fp32")):
        bits = 32 if compute == "fp32" else 16
        precision = "ieee" if compute == "fp32" else "tf32"
        for has_pos in (True, False):
            cfg = tubelet_embed.FWD_CONFIGS[bits]
            const = dict(s_vw=1, TUB=2, PATCH=16, HAS_BIAS=True, HAS_POS=has_pos, DOT_PRECISION=precision,
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            types = dict(VIDEO=f"*{video}", W=f"*{compute}", BIAS="*fp32", POS="*fp32", INDEX="*i64",
                         OUT=f"*{compute}")
            specs.append(_spec(f"embed_fwd video={video} compute={compute} pos={has_pos}",
                               tubelet_embed._embed_fwd_kernel, fwd_args, types, const, cfg.num_warps,
                               cfg.num_stages, div16))
        cfg = tubelet_embed.DW_CONFIGS[bits]
        const = dict(s_vw=1, TUB=2, PATCH=16, HAS_BIAS=True, DOT_PRECISION=precision, BLOCK_D=cfg.block_m,
                     BLOCK_K=cfg.block_n, BLOCK_T=cfg.block_k)
        types = dict(DY=f"*{compute}", VIDEO=f"*{video}", INDEX="*i64", DW="*fp32", DB="*fp32")
        specs.append(_spec(f"embed_dw video={video} compute={compute}", tubelet_embed._embed_dw_kernel, dw_args,
                           types, const, cfg.num_warps, cfg.num_stages, div16))
    return specs


def l1_loss_specs() -> list[Spec]:
    args = ("PRED, TARGET, INDEX, GRAD, PARTIAL, SEG_END, SEG_SCALE, T, D, loss_exp, eps, s_pred, s_target, s_grad, "
            "NUM_SEGMENTS, EXP_IS_ONE, WRITE_GRAD, BLOCK_R, BLOCK_D")
    scale_args = "GRAD, OUT, SEG_END, SEG_SCALE, GRAD_LOSS, T, D, s_grad, s_out, NUM_SEGMENTS, BLOCK_R, BLOCK_D"
    specs = []
    # (pred, target): autocast's predictor output against the target encoder's, both 16-bit or the target in fp32
    for pred, target in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
        for d in (1024, 1280):  # ViT-L and ViT-H widths
            block_d = triton.next_power_of_2(d)
            block_r = l1_loss._block_rows(block_d)
            for exp_is_one in (True, False):
                grad = pred if exp_is_one else "fp32"  # the stored derivative (l1_loss._loss_forward)
                const = dict(NUM_SEGMENTS=2, EXP_IS_ONE=exp_is_one, WRITE_GRAD=True, BLOCK_R=block_r, BLOCK_D=block_d)
                types = dict(PRED=f"*{pred}", TARGET=f"*{target}", INDEX="*i64", GRAD=f"*{grad}", PARTIAL="*fp32",
                             SEG_END="*i32", SEG_SCALE="*fp32", loss_exp="fp32", eps="fp32")
                specs.append(_spec(f"l1_loss pred={pred} target={target} D={d} exp_is_one={exp_is_one}",
                                   l1_loss._l1_loss_kernel, args, types, const, l1_loss._num_warps(block_d), 1,
                                   "D, s_pred, s_target, s_grad"))
                if pred == target:  # the backward's row scale depends on pred's and the derivative's dtypes alone
                    types = dict(GRAD=f"*{grad}", OUT=f"*{pred}", SEG_END="*i32", SEG_SCALE="*fp32",
                                 GRAD_LOSS="*fp32")
                    specs.append(_spec(f"l1_loss_scale_rows dtype={pred} grad={grad} D={d}",
                                       l1_loss._scale_rows_kernel, scale_args, types,
                                       dict(NUM_SEGMENTS=2, BLOCK_R=block_r, BLOCK_D=block_d),
                                       l1_loss._num_warps(block_d), 1, "D, s_grad, s_out"))
    return specs


def ema_specs() -> list[Spec]:
    args = "TABLE, CHUNK_TENSOR, CHUNK_START, momentum, one_minus_momentum, TARGET_DTYPE, ONLINE_DTYPE, CHUNK, BLOCK"
    chunk, block = ema._chunk_size()
    specs = []
    # fp32 target of fp32 weights (the faithful default) or of bf16 weights (deepspeed.bf16), bf16 targets
    for t_dtype, o_dtype in ((tl.float32, tl.float32), (tl.float32, tl.bfloat16), (tl.bfloat16, tl.float32),
                             (tl.bfloat16, tl.bfloat16)):
        const = dict(TARGET_DTYPE=t_dtype, ONLINE_DTYPE=o_dtype, CHUNK=chunk, BLOCK=block)
        types = dict(TABLE="*i64", CHUNK_TENSOR="*i32", CHUNK_START="*i64", momentum="fp32",
                     one_minus_momentum="fp32")
        specs.append(_spec(f"ema target={t_dtype} online={o_dtype}", ema._ema_kernel, args, types, const,
                           ema.NUM_WARPS, 1))
    return specs


def attention_specs() -> list[Spec]:
    va = _attention
    fwd_args = ("Q, K, V, O, LSE, CU_SEQLENS, scale_log2, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_lt, "
                "HEAD_DIM, D_A, D_B, DOT_PRECISION, BLOCK_M, BLOCK_N, HEAD_ALIGN")
    bwd_args = ("Q, K, V, DO, LSE, DELTA, {out}, CU_SEQLENS, scale, scale_log2, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, "
                "s_gt, s_gh, s_lt, HEAD_DIM, D_A, D_B, DOT_PRECISION, BLOCK_M, BLOCK_N, HEAD_ALIGN")
    # token strides (3D of the qkv projection, D of the output) are multiples of 16 at every width; head strides are
    # the head dim, which a launch marks only when it is one too (24 and 88 are not: the kernels' HEAD_ALIGN hint,
    # varlen_attention.head_align, gives their 8)
    token_strides, head_strides = "s_qt, s_kt, s_vt, s_ot, s_gt", "s_qh, s_kh, s_vh, s_oh, s_gh"
    specs = []
    for dtype in ("bf16", "fp16"):  # 16-bit only on a GPU (see varlen_attention._check)
        precision = "tf32"
        for head_dim in (24, 32, 64, 80, 88, 128):
            d_a, d_b = va.head_dim_split(head_dim)
            div16 = token_strides + (", " + head_strides if head_dim % 16 == 0 else "")
            tensors = dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", O=f"*{dtype}", DO=f"*{dtype}",
                           DK=f"*{dtype}", DV=f"*{dtype}", DQ=f"*{dtype}", LSE="*fp32", DELTA="*fp32",
                           CU_SEQLENS="*i32", scale="fp32", scale_log2="fp32")
            for name, fn, args, cfg in (
                    ("attn_fwd", va._attn_fwd_kernel, fwd_args, va.fwd_config(head_dim)),
                    ("attn_bwd_dkdv", va._attn_bwd_dkdv_kernel, bwd_args.format(out="DK, DV"), va.bwd_config(head_dim)),
                    ("attn_bwd_dq", va._attn_bwd_dq_kernel, bwd_args.format(out="DQ"), va.bwd_config(head_dim))):
                const = dict(HEAD_DIM=head_dim, D_A=d_a, D_B=d_b, DOT_PRECISION=precision, BLOCK_M=cfg.block_m,
                             BLOCK_N=cfg.block_n, HEAD_ALIGN=min(16, head_dim & -head_dim))
                specs.append(_spec(f"{name} dtype={dtype} head_dim={head_dim}", fn, args, tensors, const,
                                   cfg.num_warps, cfg.num_stages, div16))
    return specs


def all_specs() -> list[Spec]:
    return embed_specs() + l1_loss_specs() + ema_specs() + attention_specs()


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) as ptxas reports them for sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def compile_spec(spec: Spec) -> Report:
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        kernel = triton.compile(src, target=TARGET,
                                options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        regs, spills = _ptxas_report(kernel.asm["ptx"])
    except Exception as e:  # report every configuration, not just the first failure
        return Report(spec.name, False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    shared = kernel.metadata.shared
    return Report(spec.name, shared <= SHARED_LIMIT and spills == 0, shared, regs, spills)


def _compile_index(i: int) -> Report:
    """Pool worker: specs hold kernel objects, so each process rebuilds the list and compiles entry i."""
    return compile_spec(all_specs()[i])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    if dispatch.interpreted():
        print("kernels.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    # ~50 configurations at seconds each: compile them on every core
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        reports = list(pool.map(_compile_index, range(len(all_specs()))))
    if args.json:
        print(json.dumps({"target": "sm_90", "shared_limit": SHARED_LIMIT, "triton": triton.__version__,
                          "kernels": [asdict(r) for r in reports]}, indent=1))
    else:
        for r in reports:
            status = "ok  " if r.ok else "FAIL"
            print(f"{status} {r.name:55s} shared {r.shared_bytes:7d} B  regs {r.registers:3d}  spills "
                  f"{r.spill_bytes:4d} B  {r.error}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
