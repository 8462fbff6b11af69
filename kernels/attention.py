"""Tiled flash attention (forward and backward) in Triton.

q, k, v are (B, H, T, D) tensors with any strides (the model passes strided views of its QKV
projection); the (T, T) score matrix is never built. The forward keeps a running max and sum
(online softmax, fp32, exp2 with log2(e) folded into the scale) and saves the fp32 logsumexp per
row; the backward recomputes the probabilities from it. No atomics: dK/dV run one program per key
tile, dQ one program per query tile. On the GPU the tiles of these three kernels are autotuned per
(power-of-two bucket of T, D, causal, dtype); under the interpreter one small config runs.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.utils import check_device, check_float, check_same_dtype, is_interpreter

LOG2E = 1.4426950408889634  # log2(e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_BATCH_HEADS = 65535  # grid axis 1 holds B * H


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, offs_t, stride_t, offs_d, T, MASK: tl.constexpr):
    """Rows offs_t of a (T, D) matrix at base -> (len(offs_t), D); offs_d holds the column offsets
    (times their stride). MASK: rows past T read as 0."""
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :]
    if MASK:
        return tl.load(ptrs, mask=offs_t[:, None] < T, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _keep_scores(offs_m, offs_n, T, CAUSAL: tl.constexpr):
    """(BLOCK_M queries, BLOCK_N keys): keys inside T and, if causal, not after their query."""
    keep = offs_n[None, :] < T
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return keep


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_kd, offs_vd,
                    offs_m, T, qk_scale, lo, hi,
                    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi). MASK: apply the causal and T-bound masks."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base, offs_n, stride_kt, offs_kd, T, MASK)  # (BLOCK_N, D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            qk = tl.where(_keep_scores(offs_m, offs_n, T, CAUSAL), qk, float("-inf"))
        # Every row sees at least one unmasked key in its first tile, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, stride_vt, offs_vd, T, MASK)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
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
        CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """q, k, v, o: (B, H, T, HEAD_DIM) with any strides; lse: (B, H, T) fp32 contiguous, natural log.
    Grid: (cdiv(T, BLOCK_M), B * H). qk_scale = scale * log2(e). Needs BLOCK_M % BLOCK_N == 0.
    T_BUCKET (next power of two of T) is unused here: it is the autotuner's key."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    o_base = o_ptr + off_b * stride_ob + off_h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(q_base, offs_m, stride_qt, offs_d * stride_qd, T, True)  # (BLOCK_M, D)
    offs_kd = offs_d * stride_kd
    offs_vd = offs_d * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        # Tiles left of the diagonal block: no mask. Then the diagonal block(s): causal + bound mask.
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                        offs_kd, offs_vd, offs_m, T, qk_scale, 0, start_m,
                                        BLOCK_N, False, CAUSAL, INPUT_PRECISION)
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                        offs_kd, offs_vd, offs_m, T, qk_scale,
                                        start_m, tl.minimum(start_m + BLOCK_M, T),
                                        BLOCK_N, True, CAUSAL, INPUT_PRECISION)
    else:
        t_full = (T // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                        offs_kd, offs_vd, offs_m, T, qk_scale, 0, t_full,
                                        BLOCK_N, False, CAUSAL, INPUT_PRECISION)
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                        offs_kd, offs_vd, offs_m, T, qk_scale, t_full, T,
                                        BLOCK_N, True, CAUSAL, INPUT_PRECISION)

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    row_ok = offs_m < T
    tl.store(lse_ptr + off_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["T"])
def _flash_attention_bwd_preprocess_kernel(
        o_ptr, do_ptr, delta_ptr,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_dob, stride_doh, stride_dot, stride_dod,
        H, T,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, t] = sum_d o * do, fp32. o, do: (B, H, T, D) any strides; delta (B, H, T) contiguous."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(o_ptr + off_b * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                         stride_qt, stride_dot, offs_qd, offs_dod, offs_n,
                         T, qk_scale, lo, hi,
                         BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    """Accumulate dk, dv (BLOCK_N, D) over query tiles [lo, hi). Works on transposed scores (BLOCK_N, BLOCK_M)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(q_base, offs_m, stride_qt, offs_qd, T, MASK)  # (BLOCK_M, D)
        do = _load_rows(do_base, offs_m, stride_dot, offs_dod, T, MASK)
        if MASK:
            row_ok = offs_m < T
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,), log2 units below
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t - lse[None, :] * 1.4426950408889634)
        if MASK:
            keep = offs_m[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _flash_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dkb, stride_dkh, stride_dkt, stride_dkd,
        stride_dvb, stride_dvh, stride_dvt, stride_dvd,
        H, T, T_BUCKET, scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per key tile: dk, dv (B, H, T, D). lse, delta: (B, H, T) fp32 contiguous.
    Grid: (cdiv(T, BLOCK_N), B * H). Needs BLOCK_N % BLOCK_M == 0. T_BUCKET: the autotuner's key."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
    lse_base = lse_ptr + off_bh.to(tl.int64) * T
    delta_base = delta_ptr + off_bh.to(tl.int64) * T

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = _load_rows(k_ptr + off_b * stride_kb + off_h * stride_kh, offs_n, stride_kt, offs_d * stride_kd,
                   T, True)  # (BLOCK_N, D)
    v = _load_rows(v_ptr + off_b * stride_vb + off_h * stride_vh, offs_n, stride_vt, offs_d * stride_vd, T, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    offs_qd = offs_d * stride_qd
    offs_dod = offs_d * stride_dod

    # Query tiles: [diag] masked (causal only), then full tiles unmasked, then the T tail masked.
    t_full = (T // BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag_hi = tl.minimum(start_n + BLOCK_N, T)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      stride_qt, stride_dot, offs_qd, offs_dod, offs_n,
                                      T, qk_scale, start_n, diag_hi,
                                      BLOCK_M, True, CAUSAL, INPUT_PRECISION)
        full_lo = start_n + BLOCK_N
    else:
        full_lo = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                  stride_qt, stride_dot, offs_qd, offs_dod, offs_n,
                                  T, qk_scale, full_lo, t_full,
                                  BLOCK_M, False, CAUSAL, INPUT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                  stride_qt, stride_dot, offs_qd, offs_dod, offs_n,
                                  T, qk_scale, tl.maximum(full_lo, t_full), T,
                                  BLOCK_M, True, CAUSAL, INPUT_PRECISION)

    dk = dk * scale
    tl.store(dk_ptr + off_b * stride_dkb + off_h * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + off_b * stride_dvb + off_h * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                       offs_kd, offs_vd, offs_m, T, qk_scale, lo, hi,
                       BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """Accumulate dq (BLOCK_M, D) over key tiles [lo, hi). lse is in log2 units here."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base, offs_n, stride_kt, offs_kd, T, MASK)  # (BLOCK_N, D)
        v = _load_rows(v_base, offs_n, stride_vt, offs_vd, T, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            p = tl.where(_keep_scores(offs_m, offs_n, T, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _flash_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        H, T, T_BUCKET, scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per query tile: dq (B, H, T, D). Grid: (cdiv(T, BLOCK_M), B * H).
    Needs BLOCK_M % BLOCK_N == 0. T_BUCKET: the autotuner's key."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = _load_rows(q_ptr + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qt, offs_d * stride_qd,
                   T, True)  # (BLOCK_M, D)
    do = _load_rows(do_ptr + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d * stride_dod,
                    T, True)
    lse = tl.load(lse_ptr + off_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + off_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offs_kd = offs_d * stride_kd
    offs_vd = offs_d * stride_vd

    if CAUSAL:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                                offs_kd, offs_vd, offs_m, T, qk_scale, 0, start_m,
                                BLOCK_N, False, CAUSAL, INPUT_PRECISION)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                                offs_kd, offs_vd, offs_m, T, qk_scale,
                                start_m, tl.minimum(start_m + BLOCK_M, T),
                                BLOCK_N, True, CAUSAL, INPUT_PRECISION)
    else:
        t_full = (T // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                                offs_kd, offs_vd, offs_m, T, qk_scale, 0, t_full,
                                BLOCK_N, False, CAUSAL, INPUT_PRECISION)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                                offs_kd, offs_vd, offs_m, T, qk_scale, t_full, T,
                                BLOCK_N, True, CAUSAL, INPUT_PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + off_b * stride_dqb + off_h * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Configs and autotuners (no hardware probing: TRITON_INTERPRET and the problem decide)
# ----------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products on the GPU (tf32 would break fp32 tolerances).
    # The option is ignored for fp16/bf16, where "tf32" is Triton's default.
    return "ieee" if dtype == torch.float32 else "tf32"


# Candidate tiles per head dim and dtype, (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages),
# the hand-picked one first. Not timed here (the autotuner picks on the GPU); all compiled with
# ptxas for sm_90 on triton 3.6 and 3.9 (tests/test_native_compile.py) and spill-free except:
# fp16/bf16 D<=64 forward 128x64 and dK/dV 64x128 (3.6: 4 B), fp16/bf16 D=128 dK/dV 64x64 (3.6: 28 B),
# fp32 D<=64 forward 64x64 (3.9: ~500 B), fp32 D=128 forward 32x32 (~600 B) and dQ 64x16, 32x16 w4
# (3.9: 16-20 B). Candidates that spilled 0.6-1.8 KB on 3.6 were dropped (fp32 forward 128x32 and,
# at D=128, 64x32, 32x32 w4, 32x16; fp32 dK/dV 32x64, 32x32 and, at D=128, 16x64, 16x32 w4).
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


def _config(tile) -> triton.Config:
    block_m, block_n, num_warps, num_stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _tile(config: triton.Config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _autotune_configs(tiles, interpreter_tile) -> list:
    """Under the interpreter: one small config (CPU tests stay fast; the autotuner then runs it
    without benchmarking). On GPU: every candidate of every head dim and dtype; early_config_prune
    (_keep_candidates) narrows them to the launch's."""
    if is_interpreter():
        return [_config(interpreter_tile)]
    candidates = dict.fromkeys(t for d in SUPPORTED_HEAD_DIMS for dt in (torch.float16, torch.float32)
                               for t in tiles(d, dt))
    return [_config(t) for t in candidates]


def _flash_attention_fwd_configs() -> list:
    return _autotune_configs(_fwd_tiles, (32, 16, 4, 1))


def _flash_attention_bwd_dkdv_configs() -> list:
    return _autotune_configs(_bwd_dkdv_tiles, (16, 32, 4, 1))


def _flash_attention_bwd_dq_configs() -> list:
    return _autotune_configs(_bwd_dq_tiles, (32, 16, 4, 1))


def _keep_candidates(tiles):
    """early_config_prune: keep the configs that `tiles` lists for the launch's HEAD_DIM and dtype."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        by_tile = {_tile(c): c for c in configs}
        return [by_tile[t] for t in tiles(args["HEAD_DIM"], args["q_ptr"].dtype)]
    return prune


def _t_bucket(T: int) -> int:
    """The autotuner's view of T: generation with a growing T retunes once per power of two."""
    return triton.next_power_of_2(T)


def _bwd_preprocess_block(head_dim: int, dtype: torch.dtype) -> int:
    """delta = rowsum(o * do) rows per program (fixed, not autotuned)."""
    if is_interpreter():
        return 32
    return 128 if dtype != torch.float32 and head_dim <= 64 else 64


# Triton's autotuner adds every tensor argument's dtype to the key. Benchmarking re-runs a kernel on
# the same arguments: each one overwrites all of its outputs (plain stores, no accumulation into
# global memory, no atomics), so nothing needs reset_to_zero / restore_value.
_AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL"]
_flash_attention_fwd = triton.autotune(
    configs=_flash_attention_fwd_configs(), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _keep_candidates(_fwd_tiles)},
)(_flash_attention_fwd_kernel)
_flash_attention_bwd_dkdv = triton.autotune(
    configs=_flash_attention_bwd_dkdv_configs(), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _keep_candidates(_bwd_dkdv_tiles)},
)(_flash_attention_bwd_dkdv_kernel)
_flash_attention_bwd_dq = triton.autotune(
    configs=_flash_attention_bwd_dq_configs(), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _keep_candidates(_bwd_dq_tiles)},
)(_flash_attention_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
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
    B, H, T, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D must be one of {SUPPORTED_HEAD_DIMS}; got D={D}")
    if T == 0 or B == 0 or H == 0:
        raise ValueError(f"{op}: empty input, need B, H, T >= 1; got (B, H, T, D)={tuple(q.shape)}")
    if B * H > MAX_BATCH_HEADS:
        raise ValueError(f"{op}: B * H must be at most {MAX_BATCH_HEADS}; got B={B}, H={H}")


def _resolve_scale(op: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite; got {scale}")
    return float(scale)


def _empty_bhtd(B: int, H: int, T: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A fresh (B, H, T, D) tensor stored as (B, T, H, D): the model's transpose(1, 2).contiguous() is then free."""
    return like.new_empty((B, T, H, D)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Launchers (registered custom ops: torch.compile calls them without graph breaks)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("gpt2_triton::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward.

    q, k, v: (B, H, T, D), any strides, fp32/fp16/bf16, D in {16, 32, 64, 128}.
    Returns o (B, H, T, D) in q's dtype (a transposed view of a fresh (B, T, H, D) buffer) and
    lse (B, H, T) fp32, the natural-log logsumexp of each row of scale * q @ k^T (masked if causal).
    """
    op = "flash_attention_fwd"
    _check_inputs(op, q, k, v)
    B, H, T, D = q.shape
    scale = _resolve_scale(op, scale, D)
    o = _empty_bhtd(B, H, T, D, q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _flash_attention_fwd[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, T, _t_bucket(T), scale * LOG2E,
        HEAD_DIM=D, CAUSAL=causal, INPUT_PRECISION=_input_precision(q.dtype))
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

    do, q, k, v, o: (B, H, T, D), any strides (do is cast to q's dtype if it differs);
    lse: (B, H, T) fp32 from flash_attention_fwd. Returns dq, dk, dv (B, H, T, D) in q's dtype.
    """
    op = "flash_attention_bwd"
    _check_inputs(op, q, k, v)
    B, H, T, D = q.shape
    check_float(op, "do", do)
    check_float(op, "o", o)
    check_device(op, q=q, do=do, o=o, lse=lse)
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"{op}: do and o must have q's shape {tuple(q.shape)}; "
                         f"got do {tuple(do.shape)}, o {tuple(o.shape)}")
    if lse.shape != (B, H, T) or lse.dtype != torch.float32:
        raise ValueError(f"{op}: lse must be fp32 of shape {(B, H, T)}; got {lse.dtype} {tuple(lse.shape)}")
    scale = _resolve_scale(op, scale, D)
    do = do.to(q.dtype)
    lse = lse.contiguous()
    precision = _input_precision(q.dtype)

    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # rowsum(do * o)
    block_pre = _bwd_preprocess_block(D, q.dtype)
    _flash_attention_bwd_preprocess_kernel[(triton.cdiv(T, block_pre), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T,
        HEAD_DIM=D, BLOCK_M=block_pre, num_warps=4)

    dq, dk, dv = (_empty_bhtd(B, H, T, D, q) for _ in range(3))
    grid_dkdv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731  one program per key tile
    _flash_attention_bwd_dkdv[grid_dkdv](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, T, _t_bucket(T), scale, scale * LOG2E,
        HEAD_DIM=D, CAUSAL=causal, INPUT_PRECISION=precision)
    grid_dq = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731  one program per query tile
    _flash_attention_bwd_dq[grid_dq](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, T, _t_bucket(T), scale, scale * LOG2E,
        HEAD_DIM=D, CAUSAL=causal, INPUT_PRECISION=precision)
    return dq, dk, dv


@flash_attention_bwd.register_fake
def _flash_attention_bwd_fake(do, q, k, v, o, lse, causal=True, scale=None):
    B, H, T, D = q.shape
    return tuple(_empty_bhtd(B, H, T, D, q) for _ in range(3))


# ----------------------------------------------------------------------------------------------
# Autograd and the public op
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


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * q @ k^T [causal mask]) @ v without building the (T, T) matrix.

    q, k, v: (B, H, T, D), any strides (e.g. transposed views of the QKV projection), one float dtype,
    D in {16, 32, 64, 128}, T >= 1. scale defaults to 1/sqrt(D). Returns (B, H, T, D) in q's dtype,
    stored as (B, T, H, D) so that `y.transpose(1, 2).contiguous()` costs nothing.
    """
    op = "flash_attention"
    _check_inputs(op, q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool; got {type(causal).__name__}")
    scale = _resolve_scale(op, scale, q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, scale)
