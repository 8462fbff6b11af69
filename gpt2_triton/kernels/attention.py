"""Tiled flash attention (forward and backward) in Triton.

q, k, v are (B, H, T, D) tensors with any strides (the model passes strided views of its QKV
projection); the (T, T) score matrix is never built. The forward keeps a running max and sum
(online softmax, fp32, exp2; the scale is folded into one FMA after the row max) and saves the fp32
logsumexp per row; the backward recomputes the probabilities from it in two launches, no atomics:
dQ (one program per query tile, which also writes delta = rowsum(o * do) and the log2 logsumexp),
then dK/dV (one program per key tile). Causal loops run in two stages, the tiles left of the
diagonal block without any mask; with T a multiple of 128 (EVEN_T) no load or store is masked.
The loops over tiles mask by each query row's key window, so varlen.py runs the same loops for
packed sequences and document masks.
fp16/bf16 tiles that a hot loop walks are read through TMA descriptors made in the kernel (per
(batch, head) slice, rows past T read as 0; an input whose layout TMA cannot read is copied to a
contiguous one first); fp32 tiles through pointers.
`flash_attention_qkv` takes the (B, T, 3C) QKV projection itself and returns (B, T, C); its backward
writes dq | dk | dv straight into one (B, T, 3C) buffer. On the GPU the tiles of the three kernels
are autotuned per (power-of-two bucket of T, D, causal, EVEN_T, dtype); under the interpreter
one small config runs.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.autotune import autotuned, bucket
from gpt2_triton.kernels.utils import (
    autocast_disabled,
    autocast_dtype,
    cast_floats,
    check_device,
    check_float,
    check_same_dtype,
    device_guard,
    split_heads,
    with_fallbacks,
)

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); host code uses LOG2E.value
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / log2(e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_BATCH_HEADS = 65535  # grid axis 1 holds B * H


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# EVEN_T (a constexpr) means T is a multiple of TILE_MULTIPLE, hence of every tile: no load is masked.
TILE_MULTIPLE = tl.constexpr(128)


@triton.jit
def _load_tile(ptrs, offs_t, T, MASK: tl.constexpr):
    """A (len(offs_t), D) tile at ptrs; MASK: rows at or past T read as 0."""
    if MASK:
        return tl.load(ptrs, mask=offs_t[:, None] < T, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_row_stat(ptrs, offs_t, T, MASK: tl.constexpr):
    """(len(offs_t),) fp32 per-row statistic (lse, delta); MASK: rows past T read as 0."""
    if MASK:
        return tl.load(ptrs, mask=offs_t < T, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _row_tiles(base, stride_t, stride_d, T, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Where a hot loop reads (BLOCK, HEAD_DIM) row tiles of the (T, HEAD_DIM) matrix at base from:
    a TMA descriptor (rows past T read as 0; needs stride_d == 1 and 16-byte aligned rows), or the
    pointers to rows 0..BLOCK-1, which the loop advances."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, [T, HEAD_DIM], [stride_t, 1], [BLOCK, HEAD_DIM])
    else:
        return base + tl.arange(0, BLOCK)[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :] * stride_d


@triton.jit
def _next_tile(src, start, offs_t, T, MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows offs_t = start + arange(BLOCK) from a _row_tiles source (pointers: already at row start).
    MASK: rows at or past T read as 0 (TMA does that by itself)."""
    if USE_TMA:
        return src.load([start, 0])
    else:
        return _load_tile(src, offs_t, T, MASK)


# Key windows. Query row i of a sequence sees the keys lo_m[i]..hi_m[i] (inclusive, sequence-local): in
# dense causal attention keys 0..i. varlen.py runs the same inner loops with q and k of different lengths
# (causal aligned bottom-right) and with document bounds (DOCS).
@triton.jit
def _doc_bound(bounds_ptr, offs, length, END: tl.constexpr):
    """Row-local document start (END: end, exclusive) at positions offs of one row's (2, length) bounds;
    positions at or past length read as 0."""
    if END:
        bounds_ptr += length
    return tl.load(bounds_ptr + offs, mask=offs < length, other=0)


@triton.jit
def _row_windows(bounds_ptr, offs_m, len_q, len_k, CAUSAL: tl.constexpr, DOCS: tl.constexpr):
    """The keys query rows offs_m may see, [lo_m, hi_m] per row (inclusive, sequence-local).
    Causal: up to offs_m + len_k - len_q; DOCS: within the row's document (bounds_ptr unused otherwise)."""
    if DOCS:
        lo_m = _doc_bound(bounds_ptr, offs_m, len_q, False)
        if CAUSAL:
            hi_m = offs_m
        else:
            hi_m = _doc_bound(bounds_ptr, offs_m, len_q, True) - 1
    else:
        lo_m = tl.zeros_like(offs_m)
        if CAUSAL:
            hi_m = offs_m + (len_k - len_q)
        else:
            hi_m = tl.zeros_like(offs_m) + (len_k - 1)
    return lo_m, hi_m


@triton.jit
def _visible(offs_n, lo_m, hi_m, DOCS: tl.constexpr):
    """(len(lo_m), len(offs_n)): key offs_n lies in the window [lo_m, hi_m] of the query (DOCS: the lower
    bound is checked too; otherwise it is 0)."""
    ok = offs_n[None, :] <= hi_m[:, None]
    if DOCS:
        ok = ok & (offs_n[None, :] >= lo_m[:, None])
    return ok


@triton.jit
def _visible_t(offs_n, lo_m, hi_m, DOCS: tl.constexpr):
    """_visible transposed: (len(offs_n), len(lo_m))."""
    ok = offs_n[:, None] <= hi_m[None, :]
    if DOCS:
        ok = ok & (offs_n[:, None] >= lo_m[None, :])
    return ok


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, len_k, qk_scale,
                    lo, hi, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
                    MAYBE_EMPTY: tl.constexpr, LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi). Scores stay unscaled until one FMA folds in qk_scale
    (> 0, log2 units): max(s * qk) = s * max(qk). MASK: each row keeps only the keys of its window
    [lo_m, hi_m] (_visible); LOAD_MASK: K/V rows at or past len_k may be read (they read as 0);
    MAYBE_EMPTY: a row may have kept no key yet, so its max is still -inf: exp2 then runs against 0."""
    if not USE_TMA:
        k_src += lo * stride_kt
        v_src += lo * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _next_tile(k_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)  # (BLOCK_N, D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASK:
            qk = tl.where(_visible(offs_n, lo_m, hi_m, DOCS), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MAYBE_EMPTY:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _next_tile(v_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)  # (BLOCK_N, D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        if not USE_TMA:
            k_src += BLOCK_N * stride_kt
            v_src += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _flash_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        H, T, T_BUCKET, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, EVEN_T: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """q, k, v, o: (B, H, T, HEAD_DIM) with any strides (USE_TMA: k, v with stride_d 1 and 16-byte
    aligned rows); lse: (B, H, T) fp32 contiguous, natural log. Grid: (cdiv(T, BLOCK_M), B * H).
    qk_scale = scale * log2(e) > 0. T_BUCKET (next power of two of T) is the autotuner's key."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(TILE_MULTIPLE % BLOCK_M == 0)
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, offs_m, T, not EVEN_T)  # (BLOCK_M, D)
    k_src = _row_tiles(k_ptr + off_b * stride_kb + off_h * stride_kh, stride_kt, stride_kd, T,
                       BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _row_tiles(v_ptr + off_b * stride_vb + off_h * stride_vh, stride_vt, stride_vd, T,
                       BLOCK_N, HEAD_DIM, USE_TMA)

    lo_m, hi_m = _row_windows(lse_ptr, offs_m, T, T, CAUSAL, False)  # causal: hi_m = offs_m (lse_ptr: unused)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Every row keeps at least one key of its first tile, so no row's max stays -inf (MAYBE_EMPTY False).
    if CAUSAL:
        # Key tiles left of the diagonal block: no mask at all. Then the diagonal block: the causal
        # mask only (a key past T is visible only to query rows past T, which are never stored).
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                                        T, qk_scale, 0, start_m,
                                        BLOCK_N, False, False, False, False, USE_TMA, INPUT_PRECISION)
        hi = start_m + BLOCK_M if EVEN_T else tl.minimum(start_m + BLOCK_M, T)
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                                        T, qk_scale, start_m, hi,
                                        BLOCK_N, True, False, False, not EVEN_T, USE_TMA, INPUT_PRECISION)
    else:
        t_full = T if EVEN_T else (T // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                                        T, qk_scale, 0, t_full,
                                        BLOCK_N, False, False, False, False, USE_TMA, INPUT_PRECISION)
        if not EVEN_T:  # the last, partial key tile: keys past T masked (hi_m = T - 1)
            acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m,
                                            hi_m, T, qk_scale, t_full, T,
                                            BLOCK_N, True, False, False, True, USE_TMA, INPUT_PRECISION)

    inv_l = 1.0 / l_i
    lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log
    lse_ptrs = lse_ptr + off_bh.to(tl.int64) * T + offs_m
    o_ptrs = o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    o = (acc * inv_l[:, None]).to(o_ptr.dtype.element_ty)
    if EVEN_T:
        tl.store(lse_ptrs, lse)
        tl.store(o_ptrs, o)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < T)
        tl.store(o_ptrs, o, mask=offs_m[:, None] < T)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, len_k,
                       qk_scale, lo, hi, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOCS: tl.constexpr,
                       LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Accumulate dq (BLOCK_M, D) over key tiles [lo, hi); lse2 is the logsumexp in log2 units (+inf for
    a row that sees no key). MASK: each row keeps only its window. Keys past len_k need no score mask:
    they read as 0 (LOAD_MASK), so k = 0 adds nothing to dq."""
    if not USE_TMA:
        k_src += lo * stride_kt
        v_src += lo * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _next_tile(k_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)  # (BLOCK_N, D)
        v = _next_tile(v_src, start_n, offs_n, len_k, LOAD_MASK, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(_visible(offs_n, lo_m, hi_m, DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            k_src += BLOCK_N * stride_kt
            v_src += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _flash_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, stats_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        stride_s, H, T, T_BUCKET, scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, EVEN_T: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per query tile: the row statistics the dK/dV kernel reads (lse2 = lse in log2 units,
    delta = rowsum(o * do)), then dq. q, k, v, o, do, dq: (B, H, T, D), any strides (USE_TMA: k, v
    with stride_d 1 and 16-byte aligned rows); lse: (B, H, T) fp32 contiguous; stats: (B * H, 2, T)
    fp32 (lse2 | delta) with row stride stride_s. Grid: (cdiv(T, BLOCK_M), B * H). T_BUCKET: the
    autotuner's key."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(TILE_MULTIPLE % BLOCK_M == 0)
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None]
    cols = offs_d[None, :]
    q = _load_tile(q_ptr + off_b * stride_qb + off_h * stride_qh + rows * stride_qt + cols * stride_qd,
                   offs_m, T, not EVEN_T)  # (BLOCK_M, D)
    do = _load_tile(do_ptr + off_b * stride_dob + off_h * stride_doh + rows * stride_dot + cols * stride_dod,
                    offs_m, T, not EVEN_T)
    o = _load_tile(o_ptr + off_b * stride_ob + off_h * stride_oh + rows * stride_ot + cols * stride_od,
                   offs_m, T, not EVEN_T)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,); padded rows: 0
    lse2 = _load_row_stat(lse_ptr + off_bh.to(tl.int64) * T + offs_m, offs_m, T, not EVEN_T) * LOG2E
    stats_ptrs = stats_ptr + off_bh.to(tl.int64) * 2 * stride_s + offs_m
    if EVEN_T:
        tl.store(stats_ptrs, lse2)
        tl.store(stats_ptrs + stride_s, delta)
    else:
        tl.store(stats_ptrs, lse2, mask=offs_m < T)
        tl.store(stats_ptrs + stride_s, delta, mask=offs_m < T)

    k_src = _row_tiles(k_ptr + off_b * stride_kb + off_h * stride_kh, stride_kt, stride_kd, T,
                       BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _row_tiles(v_ptr + off_b * stride_vb + off_h * stride_vh, stride_vt, stride_vd, T,
                       BLOCK_N, HEAD_DIM, USE_TMA)
    lo_m, hi_m = _row_windows(lse_ptr, offs_m, T, T, CAUSAL, False)  # causal: hi_m = offs_m (lse_ptr: unused)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, T,
                                qk_scale, 0, start_m, BLOCK_N, False, False, False, USE_TMA, INPUT_PRECISION)
        hi = start_m + BLOCK_M if EVEN_T else tl.minimum(start_m + BLOCK_M, T)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, T,
                                qk_scale, start_m, hi, BLOCK_N, True, False, not EVEN_T, USE_TMA, INPUT_PRECISION)
    else:
        t_full = T if EVEN_T else (T // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, T,
                                qk_scale, 0, t_full, BLOCK_N, False, False, False, USE_TMA, INPUT_PRECISION)
        if not EVEN_T:
            dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m,
                                    hi_m, T, qk_scale, t_full, T, BLOCK_N, False, False, True, USE_TMA,
                                    INPUT_PRECISION)

    dq_ptrs = dq_ptr + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqt + cols * stride_dqd
    dq = (dq * scale).to(dq_ptr.dtype.element_ty)
    if EVEN_T:
        tl.store(dq_ptrs, dq)
    else:
        tl.store(dq_ptrs, dq, mask=rows < T)


@triton.jit
def _stats_source(base, T, stride_s, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Where a hot loop reads the per-row fp32 statistics (lse2 | delta, rows of a (2, T) matrix at base
    with row stride stride_s) of one (batch, head) from: a TMA descriptor (past T reads as 0; base and
    stride_s 16-byte aligned), or base itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, [2, T], [stride_s, 1], [2, BLOCK])
    else:
        return base


@triton.jit
def _next_stats(src, start, offs_t, T, stride_s, MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """(lse2, delta) at entries offs_t = start + arange(BLOCK) of a _stats_source (MASK, pointers: past T
    read as 0)."""
    if USE_TMA:
        return tl.split(tl.permute(src.load([0, start]), (1, 0)))
    else:
        return (_load_row_stat(src + offs_t, offs_t, T, MASK),
                _load_row_stat(src + stride_s + offs_t, offs_t, T, MASK))


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s, bounds_ptr,
                         offs_n, offs_m0, len_q, len_k, qk_scale, lo, hi,
                         BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
                         LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr, STATS_TMA: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    """Accumulate dk, dv (BLOCK_N, D) over query tiles [lo, hi), on transposed scores (BLOCK_N, BLOCK_M).
    MASK: keep the pairs in each query's window (_row_windows of CAUSAL, DOCS). Query rows past len_q
    need no score mask: q, do and delta read as 0 there (LOAD_MASK) and add nothing."""
    if not USE_TMA:
        q_src += lo * stride_qt
        do_src += lo * stride_dot
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q = _next_tile(q_src, start_m, offs_m, len_q, LOAD_MASK, USE_TMA)  # (BLOCK_M, D)
        lse2, delta = _next_stats(stats_src, start_m, offs_m, len_q, stride_s, LOAD_MASK, STATS_TMA)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASK:
            lo_m, hi_m = _row_windows(bounds_ptr, offs_m, len_q, len_k, CAUSAL, DOCS)
            p_t = tl.where(_visible_t(offs_n, lo_m, hi_m, DOCS), p_t, 0.0)
        do = _next_tile(do_src, start_m, offs_m, len_q, LOAD_MASK, USE_TMA)  # (BLOCK_M, D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            q_src += BLOCK_M * stride_qt
            do_src += BLOCK_M * stride_dot
    return dk, dv


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _flash_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,
        stride_dvb, stride_dvh, stride_dvt, stride_dvd,
        stride_s, H, T, T_BUCKET, scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, EVEN_T: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per key tile: dk, dv (B, H, T, D), any strides (USE_TMA: q, do with stride_d 1 and
    16-byte aligned rows). stats: (B * H, 2, T) fp32 (lse2 | delta) with row stride stride_s (16-byte
    aligned), from the dQ kernel.
    Grid: (cdiv(T, BLOCK_N), B * H). Needs BLOCK_N % BLOCK_M == 0."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    tl.static_assert(TILE_MULTIPLE % BLOCK_N == 0)
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_n[:, None]
    cols = offs_d[None, :]
    k = _load_tile(k_ptr + off_b * stride_kb + off_h * stride_kh + rows * stride_kt + cols * stride_kd,
                   offs_n, T, not EVEN_T)  # (BLOCK_N, D)
    v = _load_tile(v_ptr + off_b * stride_vb + off_h * stride_vh + rows * stride_vt + cols * stride_vd,
                   offs_n, T, not EVEN_T)
    q_src = _row_tiles(q_ptr + off_b * stride_qb + off_h * stride_qh, stride_qt, stride_qd, T,
                       BLOCK_M, HEAD_DIM, USE_TMA)
    do_src = _row_tiles(do_ptr + off_b * stride_dob + off_h * stride_doh, stride_dot, stride_dod, T,
                        BLOCK_M, HEAD_DIM, USE_TMA)
    stats_src = _stats_source(stats_ptr + off_bh.to(tl.int64) * 2 * stride_s, T, stride_s, BLOCK_M, USE_TMA)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query tiles: the diagonal block (causal only, masked), the full tiles, then the partial last one.
    t_full = T if EVEN_T else (T // BLOCK_M) * BLOCK_M
    # stats_ptr stands in for the document bounds, which dense attention has none of (DOCS False).
    if CAUSAL:
        diag_hi = start_n + BLOCK_N if EVEN_T else tl.minimum(start_n + BLOCK_N, T)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s,
                                      stats_ptr, offs_n, offs_m0, T, T, qk_scale, start_n, diag_hi,
                                      BLOCK_M, True, True, False, not EVEN_T, USE_TMA, USE_TMA, INPUT_PRECISION)
        mid_lo = start_n + BLOCK_N
    else:
        mid_lo = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s,
                                  stats_ptr, offs_n, offs_m0, T, T, qk_scale, mid_lo, t_full,
                                  BLOCK_M, False, CAUSAL, False, False, USE_TMA, USE_TMA, INPUT_PRECISION)
    if not EVEN_T:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s,
                                      stats_ptr, offs_n, offs_m0, T, T, qk_scale, tl.maximum(mid_lo, t_full), T,
                                      BLOCK_M, False, CAUSAL, False, True, USE_TMA, USE_TMA, INPUT_PRECISION)

    dk_ptrs = dk_ptr + off_b * stride_dkb + off_h * stride_dkh + rows * stride_dkt + cols * stride_dkd
    dv_ptrs = dv_ptr + off_b * stride_dvb + off_h * stride_dvh + rows * stride_dvt + cols * stride_dvd
    dk = (dk * scale).to(dk_ptr.dtype.element_ty)
    dv = dv.to(dv_ptr.dtype.element_ty)
    if EVEN_T:
        tl.store(dk_ptrs, dk)
        tl.store(dv_ptrs, dv)
    else:
        tl.store(dk_ptrs, dk, mask=rows < T)
        tl.store(dv_ptrs, dv, mask=rows < T)


# ----------------------------------------------------------------------------------------------
# Configs and autotuners (no hardware probing: TRITON_INTERPRET and the problem decide)
# ----------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products on the GPU (tf32 would break fp32 tolerances).
    # The option is ignored for fp16/bf16, where "tf32" is Triton's default.
    return "ieee" if dtype == torch.float32 else "tf32"


# Candidate tiles per head dim and dtype, (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages),
# the hand-picked one first. Not timed here (the autotuner picks on the GPU). Every candidate compiled
# with ptxas for sm_90 on triton 3.6 and 3.9 at T = 1024 (fp16/bf16 at D = 16, 32, 64, 128 causal and
# D = 64 full; fp32 at D = 16..128 causal): fp16/bf16 (TMA loads) spill-free everywhere; fp32 (pointer
# loads) spills in the forward 64x64 at D = 64 (0.5 KB), 32x32 at D = 128 (0.3 KB), 64x32 at D = 32
# (3.6: 8 B) and in dK/dV 16x16 at D = 128 (3.9: 4 B). Not listed because they spilled 0.6-1.8 KB on
# 3.6: fp32 forward 128x32 and, at D=128, 64x32, 32x32 w4, 32x16; fp32 dK/dV 32x64, 32x32 and, at
# D=128, 16x64, 16x32 w4.
def _fwd_tiles(head_dim: int, dtype: torch.dtype) -> list:
    """Forward. Constraint: BLOCK_M % BLOCK_N == 0."""
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory and registers
        if head_dim <= 64:
            return [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)]
        return [(32, 32, 8, 2), (16, 16, 4, 2)]
    # fp16 / bf16: 128 x 64 is known-good on Hopper for D = 64; D = 128 needs 8 warps for its accumulator.
    if head_dim <= 64:
        return [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]
    return [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]


def _bwd_dkdv_tiles(head_dim: int, dtype: torch.dtype) -> list:
    """dK/dV: BLOCK_M queries per step, BLOCK_N keys per program. Constraint: BLOCK_N % BLOCK_M == 0."""
    if dtype == torch.float32:
        if head_dim <= 64:
            return [(16, 64, 8, 2), (16, 32, 4, 2)]
        return [(16, 32, 8, 2), (16, 16, 4, 2)]
    if head_dim <= 64:
        return [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)]
    return [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (16, 64, 4, 2)]


def _bwd_dq_tiles(head_dim: int, dtype: torch.dtype) -> list:
    """dQ: BLOCK_M queries per program, BLOCK_N keys per step. Constraint: BLOCK_M % BLOCK_N == 0."""
    if dtype == torch.float32:
        if head_dim <= 64:
            return [(64, 16, 8, 2), (32, 16, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)]
        return [(32, 16, 8, 2), (32, 16, 4, 2), (64, 16, 8, 2)]
    if head_dim <= 64:
        return [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)]
    return [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 16, 4, 2)]


def _even_t(T: int) -> bool:
    """T is a multiple of every tile (TILE_MULTIPLE): the kernels then mask no load or store."""
    return T % TILE_MULTIPLE.value == 0


def _use_tma(dtype: torch.dtype) -> bool:
    """fp16/bf16: the hot loops read their tiles through TMA descriptors. fp32 keeps pointer loads: its
    products are not wgmma ones, and with TMA most fp32 candidates spilled (up to 7.7 KB, triton 3.6)."""
    return dtype in (torch.float16, torch.bfloat16)


def _tma_ok(t: torch.Tensor) -> bool:
    """A (B, H, T, D) tensor a TMA descriptor can read (T, D) slices of: unit stride along D, positive
    16-byte aligned row stride, 16-byte aligned base and batch/head strides (qkv's views qualify)."""
    size = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) > 0 and (t.stride(2) * size) % 16 == 0
            and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for s, n in zip(t.stride()[:2], t.shape[:2]) if n > 1))


def _tma_readable(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy with standard contiguous strides where its layout does not qualify."""
    return t if _tma_ok(t) else t.clone(memory_format=torch.contiguous_format)


def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    # Triton launches on CUDA's current device, which the launchers set to the tensors' (device_guard).
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def _ensure_scratch_allocator(device: torch.device) -> None:
    """TMA descriptors made inside a kernel live in per-program global scratch, which Triton asks the
    allocator of `triton.set_allocator` for at launch (per context, so also on autograd's threads), on
    the current device: the launch's own (device_guard). Install a torch one where none is set; a
    caller's own allocator is left alone."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


# Triton's autotuner adds every tensor argument's dtype to the key. Benchmarking re-runs a kernel on
# the same arguments: each one overwrites all of its outputs (plain stores, no accumulation into
# global memory, no atomics; the dQ kernel rewrites its row statistics with the same values), so nothing
# needs reset_to_zero / restore_value.
_AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "EVEN_T", "USE_TMA"]
_VARIANTS = [(d, dt) for d in SUPPORTED_HEAD_DIMS for dt in (torch.float16, torch.float32)]  # bf16 tiles = fp16's


def _autotuned(kernel, tiles, interpreter_tile, key=_AUTOTUNE_KEY):
    """An attention kernel autotuned over `tiles` for the launch's head dim and dtype (also varlen.py's)."""
    return autotuned(kernel, names=("BLOCK_M", "BLOCK_N"), candidates=tiles, key=key,
                     variants=_VARIANTS, variant_of=lambda args: (args["HEAD_DIM"], args["q_ptr"].dtype),
                     interpreter_tile=interpreter_tile)


_flash_attention_fwd = _autotuned(_flash_attention_fwd_kernel, _fwd_tiles, (32, 16, 4, 1))
_flash_attention_bwd_dq = _autotuned(_flash_attention_bwd_dq_kernel, _bwd_dq_tiles, (32, 16, 4, 1))
_flash_attention_bwd_dkdv = _autotuned(_flash_attention_bwd_dkdv_kernel, _bwd_dkdv_tiles, (16, 32, 4, 1))


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def _check_bhtd(op: str, B: int, H: int, T: int, D: int, shape_text: str) -> None:
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D must be one of {SUPPORTED_HEAD_DIMS}; got D={D} ({shape_text})")
    if T == 0 or B == 0 or H == 0:
        raise ValueError(f"{op}: empty input, need B, H, T >= 1; got {shape_text}")
    if B * H > MAX_BATCH_HEADS:
        raise ValueError(f"{op}: B * H must be at most {MAX_BATCH_HEADS}; got B={B}, H={H}")


def _check_inputs(op: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
    check_same_dtype(op, q=q, k=k, v=v)
    check_device(op, q=q, k=k, v=v)
    if q.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D (B, H, T, D); got q.shape={tuple(q.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{op}: q, k, v must have the same shape (B, H, T, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_bhtd(op, *q.shape, shape_text=f"(B, H, T, D)={tuple(q.shape)}")


def _check_qkv(op: str, qkv, n_head) -> None:
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
    _check_bhtd(op, B, n_head, T, C3 // (3 * n_head), shape_text=f"qkv {tuple(qkv.shape)}, n_head={n_head}")


def _check_causal(op: str, causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool; got {type(causal).__name__}")


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def _resolve_scale(op: str, scale, head_dim: int) -> float:
    if scale is None:
        return _default_scale(scale, head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite; got {scale}")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# Layouts: (B, H, T, D) views of the buffers the model keeps
# ----------------------------------------------------------------------------------------------
def _empty_bhtd(B: int, H: int, T: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A fresh (B, H, T, D) tensor stored as (B, T, H, D): the model's transpose(1, 2).contiguous() is then free."""
    return like.new_empty((B, T, H, D)).transpose(1, 2)


def _heads_view(y: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, D) view."""
    return y.unflatten(2, (n_head, y.shape[2] // n_head)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Launch helpers (write into given (B, H, T, D) views; autocast off around them)
# ----------------------------------------------------------------------------------------------
def _with_tma_fallback(dtype: torch.dtype, launch) -> None:
    """launch(use_tma) on the CUDA device of the call: through TMA for fp16/bf16 (falling back to pointer
    loads where TMA fails in this process: feature "tma"), pointer loads for fp32."""
    if _use_tma(dtype):
        with_fallbacks([("tma", lambda: launch(True))], lambda: launch(False))
    else:
        launch(False)


def _fwd_into(q, k, v, o, lse, causal: bool, scale: float) -> None:
    """o (B, H, T, D) and lse (B, H, T) fp32 contiguous <- attention forward of q, k, v."""
    B, H, T, D = q.shape
    if scale <= 0:
        # The kernel folds scale into one FMA after the row max (needs scale > 0): scale * q.k equals
        # |scale| * (-q).k, and 0 * q.k equals 1 * 0.k.
        q = q.neg() if scale < 0 else torch.zeros_like(q)
        scale = -scale if scale < 0 else 1.0
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731

    def launch(use_tma):
        k_, v_ = (_tma_readable(k), _tma_readable(v)) if use_tma else (k, v)
        if use_tma:
            _ensure_scratch_allocator(q.device)
        _flash_attention_fwd[grid](
            q, k_, v_, o, lse,
            *q.stride(), *k_.stride(), *v_.stride(), *o.stride(),
            H, T, bucket(T), scale * LOG2E.value,
            HEAD_DIM=D, CAUSAL=causal, EVEN_T=_even_t(T), USE_TMA=use_tma,
            INPUT_PRECISION=_input_precision(q.dtype))

    with device_guard(q.device):
        _with_tma_fallback(q.dtype, launch)


def _bwd_into(do, q, k, v, o, lse, dq, dk, dv, causal: bool, scale: float) -> None:
    """dq, dk, dv (B, H, T, D) views <- attention backward. Two launches: dQ (which also writes the
    row statistics delta = rowsum(o * do) and lse in log2 units), then dK/dV (which reads them)."""
    B, H, T, D = q.shape
    stride_s = triton.cdiv(T, 4) * 4  # 16-byte aligned rows: the dK/dV kernel reads them through TMA
    stats = torch.empty((B * H, 2, stride_s), dtype=torch.float32, device=q.device)  # lse2 | delta
    precision = _input_precision(q.dtype)
    even_t = _even_t(T)
    grid_dq = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731  one program per query tile
    grid_dkdv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731  one program per key tile

    def launch(use_tma):
        # TMA: the dQ loop reads k, v tiles; the dK/dV loop q, do tiles
        q_, k_, v_, do_ = (_tma_readable(t) for t in (q, k, v, do)) if use_tma else (q, k, v, do)
        if use_tma:
            _ensure_scratch_allocator(q.device)
        _flash_attention_bwd_dq[grid_dq](
            q_, k_, v_, o, do_, lse, stats, dq,
            *q_.stride(), *k_.stride(), *v_.stride(), *o.stride(), *do_.stride(), *dq.stride(),
            stride_s, H, T, bucket(T), scale, scale * LOG2E.value,
            HEAD_DIM=D, CAUSAL=causal, EVEN_T=even_t, USE_TMA=use_tma, INPUT_PRECISION=precision)
        _flash_attention_bwd_dkdv[grid_dkdv](
            q_, k_, v_, do_, stats, dk, dv,
            *q_.stride(), *k_.stride(), *v_.stride(), *do_.stride(), *dk.stride(), *dv.stride(),
            stride_s, H, T, bucket(T), scale, scale * LOG2E.value,
            HEAD_DIM=D, CAUSAL=causal, EVEN_T=even_t, USE_TMA=use_tma, INPUT_PRECISION=precision)

    with device_guard(q.device):
        _with_tma_fallback(q.dtype, launch)


# ----------------------------------------------------------------------------------------------
# Launchers (registered custom ops: torch.compile calls them without graph breaks). Private: they
# assume input the public ops below have checked.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("gpt2_triton::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward.

    q, k, v: (B, H, T, D), any strides, fp32/fp16/bf16, D in {16, 32, 64, 128}.
    Returns o (B, H, T, D) in q's dtype (a transposed view of a fresh (B, T, H, D) buffer) and
    lse (B, H, T) fp32, the natural-log logsumexp of each row of scale * q @ k^T (masked if causal).
    """
    B, H, T, D = q.shape
    scale = _default_scale(scale, D)
    o = _empty_bhtd(B, H, T, D, q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _fwd_into(q, k, v, o, lse, causal, scale)
    return o, lse


@flash_attention_fwd.register_fake
def _flash_attention_fwd_fake(q, k, v, causal=True, scale=None):
    B, H, T, D = q.shape
    return _empty_bhtd(B, H, T, D, q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("gpt2_triton::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                        scale: Optional[float] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward.

    do, q, k, v, o: (B, H, T, D), any strides (do and o are cast to q's dtype if they differ);
    lse: (B, H, T) fp32 from flash_attention_fwd. Returns dq, dk, dv (B, H, T, D) in q's dtype.
    """
    B, H, T, D = q.shape
    scale = _default_scale(scale, D)
    dq, dk, dv = (_empty_bhtd(B, H, T, D, q) for _ in range(3))
    _bwd_into(do.to(q.dtype), q, k, v, o.to(q.dtype), lse.contiguous(), dq, dk, dv, causal, scale)
    return dq, dk, dv


@flash_attention_bwd.register_fake
def _flash_attention_bwd_fake(do, q, k, v, o, lse, causal=True, scale=None):
    B, H, T, D = q.shape
    return tuple(_empty_bhtd(B, H, T, D, q) for _ in range(3))


@torch.library.custom_op("gpt2_triton::flash_attention_qkv_fwd", mutates_args=())
def flash_attention_qkv_fwd(qkv: torch.Tensor, n_head: int, causal: bool = True,
                            scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward on the QKV projection's output.

    qkv: (B, T, 3C), q | k | v along the last dim with heads side by side (C = n_head * D), any
    strides. Returns y (B, T, C) contiguous in qkv's dtype (heads side by side, as c_proj takes it)
    and lse (B, n_head, T) fp32 (natural log).
    """
    B, T, C3 = qkv.shape
    q, k, v = split_heads(qkv, n_head)
    scale = _default_scale(scale, q.shape[-1])
    y = qkv.new_empty((B, T, C3 // 3))
    lse = torch.empty((B, n_head, T), dtype=torch.float32, device=qkv.device)
    _fwd_into(q, k, v, _heads_view(y, n_head), lse, causal, scale)
    return y, lse


@flash_attention_qkv_fwd.register_fake
def _flash_attention_qkv_fwd_fake(qkv, n_head, causal=True, scale=None):
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, T, C3 // 3)), qkv.new_empty((B, n_head, T), dtype=torch.float32)


@torch.library.custom_op("gpt2_triton::flash_attention_qkv_bwd", mutates_args=())
def flash_attention_qkv_bwd(dy: torch.Tensor, qkv: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                            n_head: int, causal: bool = True, scale: Optional[float] = None) -> torch.Tensor:
    """Attention backward on the QKV projection's output.

    dy, y: (B, T, C), qkv: (B, T, 3C), any strides; lse from flash_attention_qkv_fwd. Returns dqkv
    (B, T, 3C) contiguous in qkv's dtype, written by the kernels in place: dq | dk | dv along the
    last dim, heads side by side, exactly qkv's layout (no concatenation follows).
    """
    B, T, C3 = qkv.shape
    q, k, v = split_heads(qkv, n_head)
    scale = _default_scale(scale, q.shape[-1])
    dqkv = qkv.new_empty((B, T, C3))
    dq, dk, dv = split_heads(dqkv, n_head)
    do = _heads_view(dy.to(qkv.dtype), n_head)
    o = _heads_view(y.to(qkv.dtype), n_head)
    _bwd_into(do, q, k, v, o, lse.contiguous(), dq, dk, dv, causal, scale)
    return dqkv


@flash_attention_qkv_bwd.register_fake
def _flash_attention_qkv_bwd_fake(dy, qkv, y, lse, n_head, causal=True, scale=None):
    return qkv.new_empty(qkv.shape)


# ----------------------------------------------------------------------------------------------
# Autograd and the public ops
# ----------------------------------------------------------------------------------------------
class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = flash_attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


class FlashAttentionQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head, causal, scale):
        y, lse = flash_attention_qkv_fwd(qkv, n_head, causal, scale)
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head, ctx.causal, ctx.scale = n_head, causal, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        qkv, y, lse = ctx.saved_tensors
        return flash_attention_qkv_bwd(dy, qkv, y, lse, ctx.n_head, ctx.causal, ctx.scale), None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * q @ k^T [causal mask]) @ v without building the (T, T) matrix.

    q, k, v: (B, H, T, D), any strides (e.g. transposed views of the QKV projection), one float dtype,
    D in {16, 32, 64, 128}, T >= 1. scale defaults to 1/sqrt(D). Returns (B, H, T, D) in q's dtype,
    stored as (B, T, H, D) so that `y.transpose(1, 2).contiguous()` costs nothing. Under autocast
    q, k, v are cast to the autocast dtype (the output is in that dtype; grads flow back to the
    original dtypes), as for F.scaled_dot_product_attention.
    """
    op = "flash_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)  # before the autocast cast reads .device and .dtype
    device_type = q.device.type
    q, k, v = cast_floats(autocast_dtype(device_type), q, k, v)
    _check_inputs(op, q, k, v)
    _check_causal(op, causal)
    scale = _resolve_scale(op, scale, q.shape[-1])
    with autocast_disabled(device_type):
        return FlashAttentionFunction.apply(q, k, v, causal, scale)
