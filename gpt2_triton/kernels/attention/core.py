"""What the dense and the varlen attention kernels share: the loops over tiles, key windows, tile loads
(pointers or TMA), the candidate tiles, the input checks and the one launch helper.

Names here have no leading underscore: they are the package's own interface (dense.py, varlen.py and
api.py import them), not the library's.

The loops over tiles (`fwd_inner`, `bwd_dq_inner`, `bwd_dkdv_inner`) mask by each query row's key
window, [lo_m, hi_m] (`row_windows`): in dense causal attention keys 0..i for query i; varlen.py runs
the same loops with q and k of different lengths (causal aligned bottom-right) and with document
bounds (DOCS). The forward keeps a running max and sum (online softmax, fp32, exp2; the scale is
folded into one FMA after the row max); the backward recomputes the probabilities from the saved
logsumexp. fp16/bf16 tiles that a hot loop walks are read through TMA descriptors made in the kernel
(rows past the end read as 0; an input whose layout TMA cannot read is copied to a contiguous one
first); fp32 tiles through pointers.
"""
import math
from collections.abc import Callable
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.autotune import autotuned
from gpt2_triton.kernels.utils import (
    asserts_on_device,
    check_device,
    check_float,
    check_same_dtype,
    device_guard,
    dot_precision,
    tma_hardware,
    with_fallbacks,
)

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); host code uses LOG2E.value
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / log2(e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_BATCH_HEADS = 65535  # dense grid axis 1 holds B * H
MAX_HEADS = 65535  # varlen grid axis 1 holds H
INT32_LIMIT = 2**31  # varlen in-sequence offsets (row * stride) are int32


# ----------------------------------------------------------------------------------------------
# Kernel preambles and tile loads
# ----------------------------------------------------------------------------------------------
@triton.jit
def tile_offsets(start, BLOCK: tl.constexpr, STEP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(rows start..start + BLOCK - 1 of the program's own tile, 0..STEP - 1 of the walked tiles, 0..HEAD_DIM - 1)."""
    return start + tl.arange(0, BLOCK), tl.arange(0, STEP), tl.arange(0, HEAD_DIM)


@triton.jit
def slice_base(ptr, off_a, off_h, stride_a, stride_h):
    """The (rows, D) matrix of one slice of a tensor: (batch, head) of a (B, H, T, D) one, or (first
    row, head) of a packed (total, H, D) one (then stride_a is the row stride)."""
    return ptr + off_a * stride_a + off_h * stride_h


@triton.jit
def tile_ptrs(base, offs_t, offs_d, stride_t, stride_d):
    """Pointers to the (len(offs_t), len(offs_d)) tile of the matrix at base."""
    return base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d


@triton.jit
def load_tile(ptrs, offs_t, T, MASK: tl.constexpr):
    """A (len(offs_t), D) tile at ptrs; MASK: rows at or past T read as 0."""
    if MASK:
        return tl.load(ptrs, mask=offs_t[:, None] < T, other=0.0)
    return tl.load(ptrs)


@triton.jit
def store_tile(ptrs, x, offs_t, T, MASK: tl.constexpr):
    """Store the (len(offs_t), D) tile x at ptrs; MASK: not the rows at or past T."""
    if MASK:
        tl.store(ptrs, x, mask=offs_t[:, None] < T)
    else:
        tl.store(ptrs, x)


@triton.jit
def load_row_stat(ptrs, offs_t, T, MASK: tl.constexpr):
    """(len(offs_t),) fp32 per-row statistic (lse, delta); MASK: rows past T read as 0."""
    if MASK:
        return tl.load(ptrs, mask=offs_t < T, other=0.0)
    return tl.load(ptrs)


@triton.jit
def row_tiles(base, stride_t, stride_d, T, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Where a hot loop reads (BLOCK, HEAD_DIM) row tiles of the (T, HEAD_DIM) matrix at base from:
    a TMA descriptor (rows past T read as 0; needs stride_d == 1 and 16-byte aligned rows), or the
    pointers to rows 0..BLOCK-1, which the loop advances."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, [T, HEAD_DIM], [stride_t, 1], [BLOCK, HEAD_DIM])
    else:
        return base + tl.arange(0, BLOCK)[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :] * stride_d


@triton.jit
def next_tile(src, start, offs_t, T, MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows offs_t = start + arange(BLOCK) from a row_tiles source (pointers: already at row start).
    MASK: rows at or past T read as 0 (TMA does that by itself)."""
    if USE_TMA:
        return src.load([start, 0])
    else:
        return load_tile(src, offs_t, T, MASK)


@triton.jit
def advance_sources(a_src, b_src, rows, stride_a, stride_b, USE_TMA: tl.constexpr):
    """Two row_tiles sources moved on by rows rows: pointers advance; a TMA descriptor stays as it is (its
    loads name their row)."""
    if not USE_TMA:
        a_src += rows * stride_a
        b_src += rows * stride_b
    return a_src, b_src


@triton.jit
def next_stats(src, start, offs_t, T, stride_s, MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """(lse2, delta) at entries offs_t = start + arange(BLOCK) of the per-row statistics at src, rows of
    a (2, T) matrix with row stride stride_s: a TMA descriptor of it ([2, BLOCK] blocks), or src itself
    (MASK: entries past T read as 0)."""
    if USE_TMA:
        return tl.split(tl.permute(src.load([0, start]), (1, 0)))
    else:
        return (load_row_stat(src + offs_t, offs_t, T, MASK),
                load_row_stat(src + stride_s + offs_t, offs_t, T, MASK))


# ----------------------------------------------------------------------------------------------
# Key windows. Query row i of a sequence sees the keys lo_m[i]..hi_m[i] (inclusive, sequence-local).
# ----------------------------------------------------------------------------------------------
@triton.jit
def doc_bound(bounds_ptr, offs, length, END: tl.constexpr):
    """Row-local document start (END: end, exclusive) at positions offs of one row's (2, length) bounds;
    positions at or past length read as 0."""
    if END:
        bounds_ptr += length
    return tl.load(bounds_ptr + offs, mask=offs < length, other=0)


@triton.jit
def row_windows(bounds_ptr, offs_m, len_q, len_k, CAUSAL: tl.constexpr, DOCS: tl.constexpr):
    """The keys query rows offs_m may see, [lo_m, hi_m] per row (inclusive, sequence-local).
    Causal: up to offs_m + len_k - len_q; DOCS: within the row's document (bounds_ptr unused otherwise)."""
    if DOCS:
        lo_m = doc_bound(bounds_ptr, offs_m, len_q, False)
        if CAUSAL:
            hi_m = offs_m
        else:
            hi_m = doc_bound(bounds_ptr, offs_m, len_q, True) - 1
    else:
        lo_m = tl.zeros_like(offs_m)
        if CAUSAL:
            hi_m = offs_m + (len_k - len_q)
        else:
            hi_m = tl.zeros_like(offs_m) + (len_k - 1)
    return lo_m, hi_m


@triton.jit
def visible(offs_n, lo_m, hi_m, DOCS: tl.constexpr):
    """(len(lo_m), len(offs_n)): key offs_n lies in the window [lo_m, hi_m] of the query (DOCS: the lower
    bound is checked too; otherwise it is 0)."""
    ok = offs_n[None, :] <= hi_m[:, None]
    if DOCS:
        ok = ok & (offs_n[None, :] >= lo_m[:, None])
    return ok


@triton.jit
def visible_t(offs_n, lo_m, hi_m, DOCS: tl.constexpr):
    """visible transposed: (len(offs_n), len(lo_m))."""
    ok = offs_n[:, None] <= hi_m[None, :]
    if DOCS:
        ok = ok & (offs_n[:, None] >= lo_m[None, :])
    return ok


# ----------------------------------------------------------------------------------------------
# The loops over tiles
# ----------------------------------------------------------------------------------------------
@triton.jit
def fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, len_k, qk_scale,
              lo, hi, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
              MAYBE_EMPTY: tl.constexpr, LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi). Scores stay unscaled until one FMA folds in qk_scale
    (> 0, log2 units): max(s * qk) = s * max(qk). MASK: each row keeps only the keys of its window
    [lo_m, hi_m] (visible); LOAD_MASK: K/V rows at or past len_k may be read (they read as 0);
    MAYBE_EMPTY: a row may have kept no key yet, so its max is still -inf: exp2 then runs against 0."""
    k_src, v_src = advance_sources(k_src, v_src, lo, stride_kt, stride_vt, USE_TMA)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = next_tile(k_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)  # (BLOCK_N, D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASK:
            qk = tl.where(visible(offs_n, lo_m, hi_m, DOCS), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MAYBE_EMPTY:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = next_tile(v_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)  # (BLOCK_N, D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        if not USE_TMA:
            k_src += BLOCK_N * stride_kt
            v_src += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, len_k,
                 qk_scale, lo, hi, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
                 LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Accumulate dq (BLOCK_M, D) over key tiles [lo, hi); lse2 is the logsumexp in log2 units (+inf for
    a row that sees no key). MASK: each row keeps only its window. Keys past len_k need no score mask:
    they read as 0 (LOAD_MASK), so k = 0 adds nothing to dq."""
    k_src, v_src = advance_sources(k_src, v_src, lo, stride_kt, stride_vt, USE_TMA)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = next_tile(k_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)  # (BLOCK_N, D)
        v = next_tile(v_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(visible(offs_n, lo_m, hi_m, DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            k_src += BLOCK_N * stride_kt
            v_src += BLOCK_N * stride_vt
    return dq


@triton.jit
def bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s, bounds_ptr,
                   offs_n, offs_m0, len_q, len_k, qk_scale, lo, hi,
                   BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
                   LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr, STATS_TMA: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """Accumulate dk, dv (BLOCK_N, D) over query tiles [lo, hi), on transposed scores (BLOCK_N, BLOCK_M).
    MASK: keep the pairs in each query's window (row_windows of CAUSAL, DOCS). Query rows past len_q
    need no score mask: q, do and delta read as 0 there (LOAD_MASK) and add nothing."""
    q_src, do_src = advance_sources(q_src, do_src, lo, stride_qt, stride_dot, USE_TMA)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q = next_tile(q_src, start_m, offs_m, len_q, LOAD_MASK, USE_TMA)  # (BLOCK_M, D)
        lse2, delta = next_stats(stats_src, start_m, offs_m, len_q, stride_s, LOAD_MASK, STATS_TMA)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASK:
            lo_m, hi_m = row_windows(bounds_ptr, offs_m, len_q, len_k, CAUSAL, DOCS)
            p_t = tl.where(visible_t(offs_n, lo_m, hi_m, DOCS), p_t, 0.0)
        do = next_tile(do_src, start_m, offs_m, len_q, LOAD_MASK, USE_TMA)  # (BLOCK_M, D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            q_src += BLOCK_M * stride_qt
            do_src += BLOCK_M * stride_dot
    return dk, dv


# ----------------------------------------------------------------------------------------------
# Candidate tiles and autotuners (no hardware probing: TRITON_INTERPRET and the problem decide)
# ----------------------------------------------------------------------------------------------
def input_precision(dtype: torch.dtype, device: Optional[torch.device] = None) -> str:
    """tl.dot's input_precision on `device` (utils.dot_precision: "tf32" for fp16/bf16 only where the
    architecture accepts it; gfx950's triton rejects it)."""
    return dot_precision(dtype, device)


# Candidate tiles per head dim and dtype, (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages),
# the hand-picked one first; the dense and the varlen kernels take the same. Not timed here (the
# autotuner picks on the GPU). Every candidate compiled with ptxas for sm_90 on triton 3.6 and 3.9 at
# T = 1024 (fp16/bf16 at D = 16, 32, 64, 128 causal and D = 64 full; fp32 at D = 16..128 causal):
# fp16/bf16 (TMA loads) spill-free everywhere; fp32 (pointer loads) spills in the forward 64x64 at
# D = 64 (0.5 KB), 32x32 at D = 128 (0.3 KB), 64x32 at D = 32 (3.6: 8 B) and in dK/dV 16x16 at D = 128
# (3.9: 4 B). Not listed because they spilled 0.6-1.8 KB on 3.6: fp32 forward 128x32 and, at D=128,
# 64x32, 32x32 w4, 32x16; fp32 dK/dV 32x64, 32x32 and, at D=128, 16x64, 16x32 w4.
def fwd_tiles(head_dim: int, dtype: torch.dtype) -> list:
    """Forward. Constraint: BLOCK_M % BLOCK_N == 0."""
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory and registers
        if head_dim <= 64:
            return [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)]
        return [(32, 32, 8, 2), (16, 16, 4, 2)]
    # fp16 / bf16: 128 x 64 is known-good on Hopper for D = 64; D = 128 needs 8 warps for its accumulator.
    if head_dim <= 64:
        return [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]
    return [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]


# AMD (gfx942 / gfx950), fp16/bf16 dK/dV at D <= 64 (triton 3.9, T = 1024 causal, pointer loads): 16 x 128
# with 8 warps at 2 stages compiles without scratch for the dense kernel (gfx950: 110 VGPRs) and the
# varlen one with documents (gfx942 / gfx950: 150 / 140 VGPRs); 32 x 128 w8 spills at 3 and 5 stages on
# gfx942 (50 / 71 spills), at 2 stages in the varlen kernels (gfx942: 36-196 B) and on gfx950 (12 B);
# 32 x 64 w4 s2 spills in the varlen one (17-20 VGPR spills); 16 x 64 w4 s2 is spill-free everywhere.
_AMD_DKDV_TILES = [(16, 128, 8, 2), (16, 64, 4, 2), (32, 128, 8, 2)]


def _amd(arch: Optional[str]) -> bool:
    return arch is not None and arch.startswith("gfx")


def bwd_dkdv_tiles(head_dim: int, dtype: torch.dtype, arch: Optional[str] = None) -> list:
    """dK/dV: BLOCK_M queries per step, BLOCK_N keys per program. Constraint: BLOCK_N % BLOCK_M == 0."""
    if _amd(arch) and dtype != torch.float32 and head_dim <= 64:
        return list(_AMD_DKDV_TILES)
    if dtype == torch.float32:
        if head_dim <= 64:
            return [(16, 64, 8, 2), (16, 32, 4, 2)]
        return [(16, 32, 8, 2), (16, 16, 4, 2)]
    if head_dim <= 64:
        return [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)]
    return [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (16, 64, 4, 2)]


def dense_bwd_dkdv_tiles(head_dim: int, dtype: torch.dtype, arch: Optional[str] = None) -> list:
    """dK/dV of the dense kernel: bwd_dkdv_tiles, with the first fp16/bf16 tile at D = 64 run at 5 stages and
    at most 128 registers. Compiled for sm_90 at T = 1024 causal, 32 x 128 with 8 warps takes 127 / 132 / 132
    registers (triton 3.6 / 3.8 / 3.9) at 3 stages, 127 / 135 / 128 at 5: 1 CTA/SM above 128. maxnreg=128 at
    5 stages: 127 / 128 / 128, no spills, 2 CTAs/SM on all three (3.8's loops 5 and 3 instructions longer,
    the others unchanged); at 3 stages it spills 16 B on 3.9. At D = 16 and 32 the 5-stage loops are longer on
    3.9; the varlen kernel keeps 3 stages (142-155 registers, 1 CTA/SM; at 5 stages up to 171 on 3.6).
    maxnreg is NVIDIA's: AMD takes bwd_dkdv_tiles' own."""
    tiles = bwd_dkdv_tiles(head_dim, dtype, arch)
    if head_dim == 64 and dtype != torch.float32 and not _amd(arch):
        return [(32, 128, 8, 5, 128), *tiles[1:]]
    return tiles


def bwd_dq_tiles(head_dim: int, dtype: torch.dtype) -> list:
    """dQ: BLOCK_M queries per program, BLOCK_N keys per step. Constraint: BLOCK_M % BLOCK_N == 0."""
    if dtype == torch.float32:
        if head_dim <= 64:
            return [(64, 16, 8, 2), (32, 16, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)]
        return [(32, 16, 8, 2), (32, 16, 4, 2), (64, 16, 8, 2)]
    if head_dim <= 64:
        return [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)]
    return [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 16, 4, 2)]


# Triton's autotuner adds every tensor argument's dtype to the key. Benchmarking re-runs a kernel on
# the same arguments: each one overwrites all of its outputs (plain stores, no accumulation into
# global memory, no atomics; the dQ kernels rewrite their row statistics with the same values; the
# varlen dK/dV rows of unused keys are never written), so nothing needs reset_to_zero / restore_value.
VARIANTS = [(d, dt) for d in SUPPORTED_HEAD_DIMS for dt in (torch.float16, torch.float32)]  # bf16 tiles = fp16's


# AMD backend options (autotune.BACKEND_OPTIONS) of the hand-picked fp16/bf16 tiles at D <= 64, compiled with
# triton 3.9 at D = 64, T = 1024 causal (dense kernels; VGPRs arch + AGPRs, waves per SIMD, instructions per
# iteration of the hot loops), kept only where they measurably help:
# - dK/dV 16 x 128 w8 s2, matrix_instr_nonkdim=16 (every dot on 16x16 MFMA): gfx942 132 -> 122 VGPRs, 2 -> 4
#   waves, loops 183 / 173 -> 172 / 159; gfx950 110 -> 117 VGPRs, 4 waves either way, loops 112 / 96 -> 101 / 88.
#   (kpack=2 on gfx942: 118 VGPRs, 4 waves, loops 185 / 172.)
# - dQ 128 x 32 w8 s3, matrix_instr_nonkdim=16: gfx942 155 -> 134 VGPRs, LDS 24 -> 16 KB, 2 waves either way,
#   loops 268 / 317 -> 179 / 205; gfx950 163 + 35 -> 182 + 54 VGPRs, 2 waves, loop 154 -> 108.
# - forward 128 x 64 w4 s3, waves_per_eu=3 on gfx950 only, dense kernel only: 172 -> 158 + 74 VGPRs, 2 -> 3
#   waves, no scratch, loop 246 -> 257 (the varlen forward spills 20-72 B of scratch with it). On gfx942
#   waves_per_eu=3 spills (68 B scratch), waves_per_eu=2 and kpack=2 keep 2 waves (loop 406 -> 402 / 405),
#   matrix_instr_nonkdim=16 lengthens the loop (406 -> 494; gfx950 246 -> 292).
_AMD_DQ_TILE, _AMD_FWD_TILE = (128, 32, 8, 3), (128, 64, 4, 3)


def fwd_options(tile: tuple, arch: Optional[str]) -> dict:
    return {"waves_per_eu": 3} if arch == "gfx950" and tile == _AMD_FWD_TILE else {}


def bwd_dq_options(tile: tuple, arch: Optional[str]) -> dict:
    return {"matrix_instr_nonkdim": 16} if _amd(arch) and tile == _AMD_DQ_TILE else {}


def bwd_dkdv_options(tile: tuple, arch: Optional[str]) -> dict:
    return {"matrix_instr_nonkdim": 16} if _amd(arch) and tile == _AMD_DKDV_TILES[0] else {}


def autotuned_tiles(kernel, tiles: Callable[..., list], interpreter_tile: tuple, key: list,
                    options: Optional[Callable[[tuple, Optional[str]], dict]] = None):
    """An attention kernel autotuned over `tiles` (BLOCK_M, BLOCK_N, num_warps, num_stages) for the
    launch's head dim and dtype; options: (tile, arch) -> its backend options there."""
    return autotuned(kernel, names=("BLOCK_M", "BLOCK_N"), candidates=tiles, key=key,
                     variants=VARIANTS, variant_of=lambda args: (args["HEAD_DIM"], args["q_ptr"].dtype),
                     interpreter_tile=interpreter_tile, options=options)


# ----------------------------------------------------------------------------------------------
# TMA and the launch helper
# ----------------------------------------------------------------------------------------------
def use_tma(dtype: torch.dtype, device: Optional[torch.device] = None) -> bool:
    """fp16/bf16 on an architecture with a TMA unit (utils.tma_hardware): the hot loops read their tiles
    through TMA descriptors. fp32 keeps pointer loads: its products are not wgmma ones, and with TMA most
    fp32 candidates spilled (up to 7.7 KB, triton 3.6)."""
    return dtype in (torch.float16, torch.bfloat16) and tma_hardware(device)


def tma_ok(t: torch.Tensor) -> bool:
    """A (B, H, T, D) tensor a TMA descriptor can read (T, D) slices of: unit stride along D, positive
    16-byte aligned row stride, 16-byte aligned base and batch/head strides (qkv's views qualify)."""
    size = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) > 0 and (t.stride(2) * size) % 16 == 0
            and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for s, n in zip(t.stride()[:2], t.shape[:2]) if n > 1))


def tma_readable(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy with standard contiguous strides where its layout does not qualify: a
    (B, H, T, D) tensor read as (T, D) slices, or a packed (total, H, D) one read as (rows, D) slices
    per head (as its (1, H, total, D) view)."""
    if t.dim() == 3:
        return tma_readable(t.transpose(0, 1).unsqueeze(0))[0].transpose(0, 1)
    return t if tma_ok(t) else t.clone(memory_format=torch.contiguous_format)


def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    # Triton launches on CUDA's current device, which the launch helper sets to the tensors' (device_guard).
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def ensure_scratch_allocator(device: torch.device) -> None:
    """TMA descriptors made inside a kernel live in per-program global scratch, which Triton asks the
    allocator of `triton.set_allocator` for at launch (per context, so also on autograd's threads), on
    the current device: the launch's own (device_guard). Install a torch one where none is set; a
    caller's own allocator is left alone."""
    if device.type != "cuda":
        return
    from gpt2_triton.kernels import compat
    if compat.allocator_unset():
        triton.set_allocator(_torch_scratch)


def launch(run: Callable[..., None], q: torch.Tensor, *walked: torch.Tensor) -> None:
    """run(use_tma, *walked) on q's CUDA device. fp16/bf16: through TMA (use_tma True, the tensors whose
    tiles a hot loop walks made TMA-readable, the scratch allocator installed), falling back to pointer
    loads (use_tma False, the tensors as given) where TMA fails in this process (feature "tma"); fp32:
    pointer loads."""
    def attempt(tma: bool) -> None:
        if tma:
            ensure_scratch_allocator(q.device)
            run(True, *(tma_readable(t) for t in walked))
        else:
            run(False, *walked)

    with device_guard(q.device):
        if use_tma(q.dtype, q.device):
            with_fallbacks([("tma", lambda: attempt(True))], lambda: attempt(False))
        else:
            attempt(False)


def positive_scale(q: torch.Tensor, scale: float) -> tuple:
    """(q, scale) with the same scale * q.k and scale > 0: the kernels fold the scale into one FMA after
    the row max, which needs scale > 0. scale * q.k equals |scale| * (-q).k, and 0 * q.k equals 1 * 0.k."""
    if scale > 0:
        return q, scale
    return (q.neg(), -scale) if scale < 0 else (torch.zeros_like(q), 1.0)


# ----------------------------------------------------------------------------------------------
# Input checks (the public ops in api.py call them; errors name the op and the problem)
# ----------------------------------------------------------------------------------------------
def check_bhtd(op: str, B: int, H: int, T: int, D: int, shape_text: str) -> None:
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D must be one of {SUPPORTED_HEAD_DIMS}; got D={D} ({shape_text})")
    if T == 0 or B == 0 or H == 0:
        raise ValueError(f"{op}: empty input, need B, H, T >= 1; got {shape_text}")
    if B * H > MAX_BATCH_HEADS:
        raise ValueError(f"{op}: B * H must be at most {MAX_BATCH_HEADS}; got B={B}, H={H}")


def check_qkv_floats(op: str, *tensors) -> None:
    """q, k, v (named so in errors): float tensors."""
    for name, t in zip("qkv", tensors):
        check_float(op, name, t)


def check_inputs(op: str, q, k, v) -> None:
    check_qkv_floats(op, q, k, v)
    check_same_dtype(op, q=q, k=k, v=v)
    check_device(op, q=q, k=k, v=v)
    if q.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D (B, H, T, D); got q.shape={tuple(q.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{op}: q, k, v must have the same shape (B, H, T, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_bhtd(op, *q.shape, shape_text=f"(B, H, T, D)={tuple(q.shape)}")


def check_qkv(op: str, qkv, n_head) -> None:
    check_float(op, "qkv", qkv)
    check_device(op, qkv=qkv)
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise TypeError(f"{op}: n_head must be a positive int; got {n_head!r}")
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be 3-D (B, T, 3 * C); got qkv.shape={tuple(qkv.shape)}")
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head):
        raise ValueError(f"{op}: qkv's last dim must be 3 * n_head * D (q | k | v, heads side by side); "
                         f"got {C3} with n_head={n_head}")
    check_bhtd(op, B, n_head, T, C3 // (3 * n_head), shape_text=f"qkv {tuple(qkv.shape)}, n_head={n_head}")


def check_causal(op: str, causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool; got {type(causal).__name__}")


def default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def resolve_scale(op: str, scale, head_dim: int) -> float:
    if scale is None:
        return default_scale(scale, head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite; got {scale}")
    return float(scale)


def _check_int32_vector(op: str, name: str, t, n: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32 (as flash_attn_varlen_func takes it); got {t.dtype}")
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{op}: {name} must have shape ({n},); got {tuple(t.shape)}")


def check_max_seqlen(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{op}: {name} must be an int >= 0; got {value!r}")
    return value


def check_seqlen_values(op: str, cu_q, cu_k, seqused_k, total_q: int, total_k: int, max_q: int,
                        max_k: int) -> None:
    """The values of cu_seqlens_q/k (and seqused_k): on the CPU each problem is a ValueError naming it;
    on a GPU one asynchronous device-side assert (no host sync) covers them all. Skipped while
    torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    len_q, len_k = cu_q.diff(), cu_k.diff()
    used = len_k if seqused_k is None else seqused_k
    checks = [
        ("cu_seqlens_q must start at 0", cu_q[0] == 0),
        ("cu_seqlens_k must start at 0", cu_k[0] == 0),
        ("cu_seqlens_q must be non-decreasing", (len_q >= 0).all()),
        ("cu_seqlens_k must be non-decreasing", (len_k >= 0).all()),
        (f"cu_seqlens_q must end at total_q = q.shape[0] = {total_q}", cu_q[-1] == total_q),
        (f"cu_seqlens_k must end at total_k = k.shape[0] = {total_k}", cu_k[-1] == total_k),
        (f"max_seqlen_q = {max_q} is smaller than a sequence of q", (len_q <= max_q).all()),
        (f"max_seqlen_k = {max_k} is smaller than a sequence of k", (used <= max_k).all()),
    ]
    if seqused_k is not None:
        checks.append(("seqused_k must lie in [0, cu_seqlens_k[i + 1] - cu_seqlens_k[i]]",
                       ((seqused_k >= 0) & (seqused_k <= len_k)).all()))
    if asserts_on_device(cu_q.device):
        ok = torch.stack([c for _, c in checks]).all()
        torch._assert_async(ok, f"{op}: bad cu_seqlens: " + "; ".join(text for text, _ in checks))
        return
    for text, ok in checks:
        if not bool(ok):
            raise ValueError(f"{op}: {text}; got cu_seqlens_q={cu_q.tolist()}, cu_seqlens_k={cu_k.tolist()}"
                             + ("" if seqused_k is None else f", seqused_k={seqused_k.tolist()}"))


def check_varlen(op: str, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k) -> None:
    check_qkv_floats(op, q, k, v)
    check_same_dtype(op, q=q, k=k, v=v)
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("seqused_k", seqused_k)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    check_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused_k)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{op}: q, k, v must be 3-D packed (total_tokens, H, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"{op}: q (total_q, H, D) and k, v (total_k, H, D) must share H and D; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    total_q, H, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D must be one of {SUPPORTED_HEAD_DIMS}; got D={D}")
    if not 1 <= H <= MAX_HEADS:
        raise ValueError(f"{op}: need 1 <= H <= {MAX_HEADS} heads; got H={H}")
    if cu_q.dim() != 1 or cu_q.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens_q must have shape (N + 1,) for N >= 1 sequences; got "
                         f"{tuple(cu_q.shape)}")
    n_seqs = cu_q.numel() - 1
    _check_int32_vector(op, "cu_seqlens_q", cu_q, n_seqs + 1)
    _check_int32_vector(op, "cu_seqlens_k", cu_k, n_seqs + 1)  # "q/k counts that disagree"
    if seqused_k is not None:
        _check_int32_vector(op, "seqused_k", seqused_k, n_seqs)
    for name, t, longest in (("q", q, max_q), ("k", k, max_k), ("v", v, max_k)):
        if max(longest, 1) * max(abs(t.stride(0)), 1) >= INT32_LIMIT:
            raise ValueError(f"{op}: max_seqlen * {name}.stride(0) must stay below 2**31 (in-sequence "
                             f"offsets are int32); got {longest} * {t.stride(0)}")


def check_documents(op: str, documents, B: int, T: int, device: torch.device) -> None:
    """documents as `document_bounds` returns it for a (B, T) batch."""
    if not isinstance(documents, torch.Tensor):
        raise TypeError(f"{op}: documents must be a torch.Tensor from document_bounds; got "
                        f"{type(documents).__name__}")
    if documents.dtype != torch.int32 or documents.shape != (B, 2, T) or not documents.is_contiguous():
        raise ValueError(f"{op}: documents must be the contiguous (B, 2, T) = ({B}, 2, {T}) int32 tensor "
                         f"document_bounds returns; got {documents.dtype} {tuple(documents.shape)}")
    if documents.device != device:
        raise ValueError(f"{op}: documents is on {documents.device}, qkv on {device}")
