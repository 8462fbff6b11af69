"""Variable-length and document-masked flash attention kernels (forward and backward), their launchers
and custom ops.

`flash_attention_varlen_fwd/bwd` take sequences packed one after another along the token axis, as
`flash_attn_varlen_func` does: q (total_q, H, D), k and v (total_k, H, D), sequence i holding rows
cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v (only
the first seqused_k[i] of those keys where seqused_k is given, as a KV cache's filled part). With
causal, query j of a sequence sees keys up to j + len_k - len_q (aligned bottom-right: the last
query sees every key); a query that sees no key returns 0 (its logsumexp is +inf).
`flash_attention_qkv_documents_fwd/bwd` run the same kernels on the (B, T, 3C) QKV projection with
document masks (DOCS): each (B, T) row is one sequence, and `documents` (B, 2, T) int32, from
`document_bounds`, gives each position the [start, end) of its document within the row; a query
sees only keys of its own document. Key tiles wholly outside a query tile's documents are skipped.

Programs are scheduled over (sequence, tile): sequence s owns programs cu[s] // BLOCK + s + j for
j < cdiv(len_s, BLOCK), disjoint ranges that grow with s, so a grid of total // BLOCK + n_seqs
programs covers every tile and a program finds its sequence by binary search of cu_seqlens
(at most one program per sequence finds no tile and exits). No tile is spent on padding and no row
outside a sequence is read: pointer loads are masked at the sequence's end, and fp16/bf16 tiles come
through TMA descriptors made per sequence (rows past its end read as 0). Each program walks its key
(or query) tiles in three stages: those that need the per-row mask, the fully visible ones without
any mask, then the masked ones again. The loops over tiles are core.py's, given each query row's key
window: backward in two launches (dQ, which also writes the row statistics, then dK/dV), no atomics,
so every result is deterministic.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.attention.core import (
    LN2,
    LOG2E,
    autotuned_tiles,
    bwd_dkdv_inner,
    bwd_dkdv_options,
    bwd_dkdv_tiles,
    bwd_dq_inner,
    bwd_dq_options,
    bwd_dq_tiles,
    default_scale,
    doc_bound,
    fwd_inner,
    fwd_tiles,
    input_precision,
    launch,
    load_row_stat,
    load_tile,
    positive_scale,
    row_tiles,
    row_windows,
    slice_base,
    store_tile,
    tile_offsets,
    tile_ptrs,
)
from gpt2_triton.kernels.autotune import bucket
from gpt2_triton.kernels.utils import split_heads


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _seq_of_program(cu_ptr, n_seqs, n_steps, seq_len, BLOCK: tl.constexpr, DOCS: tl.constexpr):
    """(sequence, first row of the tile of program pid = program_id(0) within it, the sequence's first
    packed row, its length).
    DOCS: sequences are the rows of a (B, seq_len) batch, cdiv(seq_len, BLOCK) programs each. Else
    sequence s owns programs cu[s] // BLOCK + s + j: the last s with cu[s] // BLOCK + s <= pid, in
    n_steps = ceil(log2(n_seqs)) halvings. The tile start may lie past the length (no tile: exit)."""
    pid = tl.program_id(0)
    if DOCS:
        n_tiles = tl.cdiv(seq_len, BLOCK)
        seq = pid // n_tiles
        return seq, (pid - seq * n_tiles) * BLOCK, seq * seq_len, seq_len
    else:
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + n_seqs
        for _ in range(n_steps):
            mid = (lo + hi) // 2
            go = tl.load(cu_ptr + mid) // BLOCK + mid <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        row0 = tl.load(cu_ptr + lo)
        return lo, (pid - row0 // BLOCK - lo) * BLOCK, row0, tl.load(cu_ptr + lo + 1) - row0


@triton.jit
def _seq_rows(cu_ptr, used_ptr, seq, HAS_USED: tl.constexpr):
    """(first packed row, length) of sequence seq in cu_seqlens (length: used[seq] when HAS_USED)."""
    row0 = tl.load(cu_ptr + seq)
    if HAS_USED:
        return row0, tl.load(used_ptr + seq)
    else:
        return row0, tl.load(cu_ptr + seq + 1) - row0


@triton.jit
def _stages(lo, b, c, hi, BLOCK: tl.constexpr):
    """Clamp the stage edges lo <= b <= c <= hi, lo rounded down to a tile; b and c are tile edges
    (b rounded up, c down, by the caller)."""
    lo = tl.maximum(lo, 0) // BLOCK * BLOCK
    hi = tl.maximum(hi, lo)
    b = tl.minimum(tl.maximum(b, lo), hi)
    c = tl.minimum(tl.maximum(c, b), hi)
    return lo, b, c, hi


@triton.jit
def _key_stages(bounds_ptr, start_m, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, DOCS: tl.constexpr):
    """Key tiles of the query tile at start_m: [lo, b) masked, [b, c) visible to every row, [c, hi) masked
    (sequence-local, multiples of BLOCK_N but hi)."""
    last = tl.minimum(start_m + BLOCK_M, len_q) - 1  # last query row of the tile
    if DOCS:
        lo = doc_bound(bounds_ptr, start_m, len_q, False)
        b = doc_bound(bounds_ptr, last, len_q, False)
        if CAUSAL:
            hi = last + 1
            c = start_m + 1
        else:
            hi = doc_bound(bounds_ptr, last, len_q, True)
            c = doc_bound(bounds_ptr, start_m, len_q, True)
    else:
        lo = tl.full([], 0, tl.int32)
        b = lo
        if CAUSAL:
            hi = last + 1 + len_k - len_q
            c = start_m + 1 + len_k - len_q
        else:
            hi = len_k
            c = len_k
    return _stages(lo, tl.cdiv(b, BLOCK_N) * BLOCK_N, tl.maximum(c, 0) // BLOCK_N * BLOCK_N, hi, BLOCK_N)


@triton.jit
def _query_stages(bounds_ptr, start_n, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, DOCS: tl.constexpr):
    """Query tiles that see the key tile at start_n: [lo, b) masked, [b, c) seeing every key of it, [c, hi)
    masked (sequence-local)."""
    last = tl.minimum(start_n + BLOCK_N, len_k) - 1  # last key row of the tile
    if DOCS:
        hi = doc_bound(bounds_ptr, last, len_k, True)
        c = doc_bound(bounds_ptr, start_n, len_k, True)
        if CAUSAL:
            lo = start_n
            b = last
        else:
            lo = doc_bound(bounds_ptr, start_n, len_k, False)
            b = doc_bound(bounds_ptr, last, len_k, False)
    else:
        hi = len_q
        c = len_q
        if CAUSAL:
            lo = start_n - (len_k - len_q)
            b = last - (len_k - len_q)
        else:
            lo = tl.full([], 0, tl.int32)
            b = lo
    return _stages(lo, tl.cdiv(tl.maximum(b, 0), BLOCK_M) * BLOCK_M, c // BLOCK_M * BLOCK_M, hi, BLOCK_M)


@triton.jit
def _partner_rows(seq, row0, length, cu_ptr, used_ptr, HAS_USED: tl.constexpr, DOCS: tl.constexpr):
    """(first packed row, length) of sequence seq on the other side: its keys for a query tile, its
    queries for a key tile (cu_ptr, and used_ptr where HAS_USED); DOCS: the same rows as this side's."""
    if DOCS:
        return row0, length
    else:
        return _seq_rows(cu_ptr, used_ptr, seq, HAS_USED)


@triton.jit
def _load_rows(ptr, row0, off_h, stride_t, stride_h, stride_d, offs_t, offs_d, length):
    """The (len(offs_t), len(offs_d)) tile at rows offs_t of head off_h of the sequence whose first packed row
    is row0; rows at or past length read as 0."""
    return load_tile(tile_ptrs(slice_base(ptr, row0, off_h, stride_t, stride_h), offs_t, offs_d, stride_t,
                               stride_d), offs_t, length, True)


@triton.jit
def _rows_source(ptr, row0, off_h, stride_t, stride_h, stride_d, length, BLOCK: tl.constexpr,
                 HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """row_tiles of head off_h of the sequence whose first packed row is row0 (length rows)."""
    return row_tiles(slice_base(ptr, row0, off_h, stride_t, stride_h), stride_t, stride_d, tl.maximum(length, 1),
                     BLOCK, HEAD_DIM, USE_TMA)


@triton.jit
def _own_tile(seq, start, row0, length, ptr, stride_t, stride_h, stride_d, cu_ptr, used_ptr, bounds_ptr,
              BLOCK: tl.constexpr, STEP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_USED: tl.constexpr,
              DOCS: tl.constexpr):
    """A program's own tile (rows start..start + BLOCK - 1 of sequence seq, first packed row row0, length
    rows, in ptr) and what the kernel needs besides: (the tile, head of the program, first packed row of
    this side and of the other side (int64), the other side's length (_partner_rows), the document bounds
    of the sequence's row (DOCS), tile_offsets(start, BLOCK, STEP, HEAD_DIM))."""
    other_row0, other_length = _partner_rows(seq, row0, length, cu_ptr, used_ptr, HAS_USED, DOCS)
    off_h = tl.program_id(1).to(tl.int64)
    row0 = row0.to(tl.int64)
    other_row0 = other_row0.to(tl.int64)
    if DOCS:
        bounds_ptr += row0 * 2
    offs, offs0, offs_d = tile_offsets(start, BLOCK, STEP, HEAD_DIM)
    tile = _load_rows(ptr, row0, off_h, stride_t, stride_h, stride_d, offs, offs_d, length)
    return tile, off_h, row0, other_row0, other_length, bounds_ptr, offs, offs0, offs_d


@triton.jit(do_not_specialize=["n_seqs", "n_steps", "seq_len", "Q_BUCKET", "K_BUCKET"])
def _varlen_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, used_k_ptr, bounds_ptr,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od, stride_lh,
        n_seqs, n_steps, seq_len, Q_BUCKET, K_BUCKET, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        DOCS: tl.constexpr, HAS_USED: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """q, o: (total_q, H, HEAD_DIM), k, v: (total_k, H, HEAD_DIM), any strides (USE_TMA: k, v with
    stride_d 1 and 16-byte aligned rows); lse: (H, total_q) fp32 with row stride stride_lh, natural log.
    cu_q, cu_k: (n_seqs + 1,) int32; used_k: (n_seqs,) int32 keys used (HAS_USED). DOCS: the
    sequences are the rows of a (B, seq_len) batch (cu_* unused) and bounds (B, 2, seq_len) int32
    holds each position's document [start, end). Grid: (programs, H), see _seq_of_program.
    qk_scale = scale * log2(e) > 0. Q_BUCKET, K_BUCKET (powers of two of the longest sequences) are the
    autotuner's key."""
    seq, start_m, q_row0, len_q = _seq_of_program(cu_q_ptr, n_seqs, n_steps, seq_len, BLOCK_M, DOCS)
    if start_m >= len_q:
        return
    q, off_h, q_row0, k_row0, len_k, bounds_ptr, offs_m, offs_n0, offs_d = _own_tile(seq, start_m, q_row0, len_q, q_ptr,
        stride_qt, stride_qh, stride_qd, cu_k_ptr, used_k_ptr, bounds_ptr, BLOCK_M, BLOCK_N, HEAD_DIM, HAS_USED, DOCS)
    k_src = _rows_source(k_ptr, k_row0, off_h, stride_kt, stride_kh, stride_kd, len_k, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _rows_source(v_ptr, k_row0, off_h, stride_vt, stride_vh, stride_vd, len_k, BLOCK_N, HEAD_DIM, USE_TMA)
    lo_m, hi_m = row_windows(bounds_ptr, offs_m, len_q, len_k, CAUSAL, DOCS)
    lo, b, c, hi = _key_stages(bounds_ptr, start_m, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL, DOCS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if DOCS:  # keys of earlier documents than the last row's (otherwise b == lo)
        acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0,
                                  lo_m, hi_m, len_k, qk_scale, lo, b,
                                  BLOCK_N, True, DOCS, True, True, USE_TMA, INPUT_PRECISION)
    acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0,
                              lo_m, hi_m, len_k, qk_scale, b, c,
                              BLOCK_N, False, DOCS, False, False, USE_TMA, INPUT_PRECISION)
    acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0,
                              lo_m, hi_m, len_k, qk_scale, c, hi,
                              BLOCK_N, True, DOCS, True, True, USE_TMA, INPUT_PRECISION)

    seen = l_i > 0  # rows that saw no key: output 0, logsumexp +inf (their backward probabilities are 0)
    o = (acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]).to(o_ptr.dtype.element_ty)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    tl.store(lse_ptr + off_h * stride_lh + q_row0 + offs_m, lse, mask=offs_m < len_q)
    store_tile(tile_ptrs(slice_base(o_ptr, q_row0, off_h, stride_ot, stride_oh), offs_m, offs_d, stride_ot,
                         stride_od), o, offs_m, len_q, True)


@triton.jit(do_not_specialize=["n_seqs", "n_steps", "seq_len", "Q_BUCKET", "K_BUCKET"])
def _varlen_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, stats_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, used_k_ptr, bounds_ptr,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod, stride_dqt, stride_dqh, stride_dqd,
        stride_lh, stride_sh, n_seqs, n_steps, seq_len, Q_BUCKET, K_BUCKET, scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        DOCS: tl.constexpr, HAS_USED: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per (sequence, query tile): the row statistics the dK/dV kernel reads (lse2 = lse in
    log2 units, delta = rowsum(o * do)) into stats (H, 2, total_q) fp32 (head stride stride_sh, lse2 |
    delta rows total_q apart), then dq. Layouts as in _varlen_fwd_kernel; do, dq like q."""
    seq, start_m, q_row0, len_q = _seq_of_program(cu_q_ptr, n_seqs, n_steps, seq_len, BLOCK_M, DOCS)
    if start_m >= len_q:
        return
    q, off_h, q_row0, k_row0, len_k, bounds_ptr, offs_m, offs_n0, offs_d = _own_tile(seq, start_m, q_row0, len_q, q_ptr,
        stride_qt, stride_qh, stride_qd, cu_k_ptr, used_k_ptr, bounds_ptr, BLOCK_M, BLOCK_N, HEAD_DIM, HAS_USED, DOCS)
    do = _load_rows(do_ptr, q_row0, off_h, stride_dot, stride_doh, stride_dod, offs_m, offs_d, len_q)
    o = _load_rows(o_ptr, q_row0, off_h, stride_ot, stride_oh, stride_od, offs_m, offs_d, len_q)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    lse2 = load_row_stat(lse_ptr + off_h * stride_lh + q_row0 + offs_m, offs_m, len_q, True) * LOG2E
    total_q = stride_sh // 2
    stats_ptrs = stats_ptr + off_h * stride_sh + q_row0 + offs_m
    tl.store(stats_ptrs, lse2, mask=offs_m < len_q)
    tl.store(stats_ptrs + total_q, delta, mask=offs_m < len_q)

    k_src = _rows_source(k_ptr, k_row0, off_h, stride_kt, stride_kh, stride_kd, len_k, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _rows_source(v_ptr, k_row0, off_h, stride_vt, stride_vh, stride_vd, len_k, BLOCK_N, HEAD_DIM, USE_TMA)
    lo_m, hi_m = row_windows(bounds_ptr, offs_m, len_q, len_k, CAUSAL, DOCS)
    lo, b, c, hi = _key_stages(bounds_ptr, start_m, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL, DOCS)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if DOCS:
        dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                          len_k, qk_scale, lo, b, BLOCK_N, True, DOCS, True, USE_TMA, INPUT_PRECISION)
    dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                      len_k, qk_scale, b, c, BLOCK_N, False, DOCS, False, USE_TMA, INPUT_PRECISION)
    dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                      len_k, qk_scale, c, hi, BLOCK_N, True, DOCS, True, USE_TMA, INPUT_PRECISION)
    dq = (dq * scale).to(dq_ptr.dtype.element_ty)
    store_tile(tile_ptrs(slice_base(dq_ptr, q_row0, off_h, stride_dqt, stride_dqh), offs_m, offs_d, stride_dqt,
                         stride_dqd), dq, offs_m, len_q, True)


@triton.jit(do_not_specialize=["n_seqs", "n_steps", "seq_len", "Q_BUCKET", "K_BUCKET"])
def _varlen_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr, used_k_ptr, bounds_ptr,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
        stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
        stride_sh, n_seqs, n_steps, seq_len, Q_BUCKET, K_BUCKET, scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        DOCS: tl.constexpr, HAS_USED: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per (sequence, key tile): dk, dv like k, v (USE_TMA: q, do with stride_d 1 and
    16-byte aligned rows). stats from the dQ kernel. Keys past used_k get no program (their grads
    stay as the caller made them: zeros). Grid: (programs over cu_k, H)."""
    seq, start_n, k_row0, len_k = _seq_of_program(cu_k_ptr, n_seqs, n_steps, seq_len, BLOCK_N, DOCS)
    if HAS_USED:
        len_k = tl.load(used_k_ptr + seq)
    if start_n >= len_k:
        return
    k, off_h, k_row0, q_row0, len_q, bounds_ptr, offs_n, offs_m0, offs_d = _own_tile(seq, start_n, k_row0, len_k, k_ptr,
        stride_kt, stride_kh, stride_kd, cu_q_ptr, used_k_ptr, bounds_ptr, BLOCK_N, BLOCK_M, HEAD_DIM, False, DOCS)
    v = _load_rows(v_ptr, k_row0, off_h, stride_vt, stride_vh, stride_vd, offs_n, offs_d, len_k)
    q_src = _rows_source(q_ptr, q_row0, off_h, stride_qt, stride_qh, stride_qd, len_q, BLOCK_M, HEAD_DIM, USE_TMA)
    do_src = _rows_source(do_ptr, q_row0, off_h, stride_dot, stride_doh, stride_dod, len_q, BLOCK_M, HEAD_DIM,
                          USE_TMA)
    stats_src = stats_ptr + off_h * stride_sh + q_row0  # this sequence's lse2; its delta total_q further on
    total_q = stride_sh // 2
    lo, b, c, hi = _query_stages(bounds_ptr, start_n, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL, DOCS)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if DOCS or CAUSAL:  # query tiles that see only part of the key tile (otherwise b == lo)
        dk, dv = bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, total_q,
                                bounds_ptr, offs_n, offs_m0, len_q, len_k, qk_scale, lo, b,
                                BLOCK_M, True, CAUSAL, DOCS, True, USE_TMA, False, INPUT_PRECISION)
    dk, dv = bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, total_q,
                            bounds_ptr, offs_n, offs_m0, len_q, len_k, qk_scale, b, c,
                            BLOCK_M, False, CAUSAL, DOCS, False, USE_TMA, False, INPUT_PRECISION)
    dk, dv = bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, total_q,
                            bounds_ptr, offs_n, offs_m0, len_q, len_k, qk_scale, c, hi,
                            BLOCK_M, True, CAUSAL, DOCS, True, USE_TMA, False, INPUT_PRECISION)
    dk = (dk * scale).to(dk_ptr.dtype.element_ty)
    dv = dv.to(dv_ptr.dtype.element_ty)
    store_tile(tile_ptrs(slice_base(dk_ptr, k_row0, off_h, stride_dkt, stride_dkh), offs_n, offs_d, stride_dkt,
                         stride_dkd), dk, offs_n, len_k, True)
    store_tile(tile_ptrs(slice_base(dv_ptr, k_row0, off_h, stride_dvt, stride_dvh), offs_n, offs_d, stride_dvt,
                         stride_dvd), dv, offs_n, len_k, True)


# ----------------------------------------------------------------------------------------------
# Autotuners: core.py's candidate tiles, keyed on buckets of the longest sequences
# ----------------------------------------------------------------------------------------------
# USE_TMA is in the key: where TMA fails in a process (feature "tma"), the pointer-load variant is tuned
# on its own.
_AUTOTUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL", "DOCS", "HAS_USED", "USE_TMA"]
_varlen_fwd = autotuned_tiles(_varlen_fwd_kernel, fwd_tiles, (32, 16, 4, 1), _AUTOTUNE_KEY)
_varlen_bwd_dq = autotuned_tiles(_varlen_bwd_dq_kernel, bwd_dq_tiles, (32, 16, 4, 1), _AUTOTUNE_KEY,
                               bwd_dq_options)
_varlen_bwd_dkdv = autotuned_tiles(_varlen_bwd_dkdv_kernel, bwd_dkdv_tiles, (16, 32, 4, 1), _AUTOTUNE_KEY,
                                 bwd_dkdv_options)


# ----------------------------------------------------------------------------------------------
# Launch helpers (autocast off around them)
# ----------------------------------------------------------------------------------------------
def _search_steps(n_seqs: int) -> int:
    """Halvings of the binary search over n_seqs sequences: ceil(log2(n_seqs))."""
    return max(n_seqs - 1, 0).bit_length()


class _Layout:
    """How the packed rows form sequences, as the kernels take it: varlen (cu_seqlens, optional used
    keys) or DOCS (B rows of seq_len positions with document bounds)."""

    def __init__(self, cu_q, cu_k, used_k, max_q, max_k, bounds=None, seq_len=0):
        self.cu_q, self.cu_k, self.used_k, self.bounds = cu_q, cu_k, used_k, bounds
        self.docs = bounds is not None
        self.n_seqs = bounds.shape[0] if self.docs else cu_q.numel() - 1
        self.seq_len, self.max_q, self.max_k = seq_len, max_q, max_k

    def args(self) -> tuple:
        """Pointer arguments (cu_q, cu_k, used_k, bounds); the kernel never reads the unused ones, which
        get a stand-in tensor."""
        stand_in = self.bounds if self.docs else self.cu_q
        return tuple(stand_in if t is None else t for t in (self.cu_q, self.cu_k, self.used_k, self.bounds))

    def scalars(self) -> tuple:
        return self.n_seqs, _search_steps(self.n_seqs), self.seq_len, bucket(self.max_q), bucket(self.max_k)

    def programs(self, total: int, block: int) -> int:
        if self.docs:
            return self.n_seqs * triton.cdiv(self.seq_len, block)
        return total // block + self.n_seqs

    def constexprs(self, causal: bool) -> dict:
        return dict(CAUSAL=causal, DOCS=self.docs, HAS_USED=self.used_k is not None)


def _fwd_into(q, k, v, o, lse, layout: _Layout, causal: bool, scale: float) -> None:
    """o (total_q, H, D) and lse (H, total_q) fp32 <- attention forward of packed q, k, v."""
    total_q, H, D = q.shape
    q, scale = positive_scale(q, scale)
    grid = lambda meta: (layout.programs(total_q, meta["BLOCK_M"]), H)  # noqa: E731

    def run(use_tma, k, v):  # the loop reads k, v tiles
        _varlen_fwd[grid](
            q, k, v, o, lse, *layout.args(),
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), lse.stride(0),
            *layout.scalars(), scale * LOG2E.value,
            HEAD_DIM=D, **layout.constexprs(causal), USE_TMA=use_tma,
            INPUT_PRECISION=input_precision(q.dtype, q.device))

    launch(run, q, k, v)


def _bwd_into(do, q, k, v, o, lse, dq, dk, dv, layout: _Layout, causal: bool, scale: float) -> None:
    """dq, dk, dv <- attention backward (dk, dv rows of unused keys are left as they are). Two launches:
    dQ (which also writes the row statistics), then dK/dV (which reads them)."""
    total_q, H, D = q.shape
    total_k = k.shape[0]
    stats = torch.empty((H, 2, total_q), dtype=torch.float32, device=q.device)  # lse2 | delta
    grid_dq = lambda meta: (layout.programs(total_q, meta["BLOCK_M"]), H)  # noqa: E731
    grid_dkdv = lambda meta: (layout.programs(total_k, meta["BLOCK_N"]), H)  # noqa: E731

    def run(use_tma, q, k, v, do):  # the dQ loop reads k, v tiles; the dK/dV loop q, do tiles
        common = dict(HEAD_DIM=D, **layout.constexprs(causal), USE_TMA=use_tma,
                      INPUT_PRECISION=input_precision(q.dtype, q.device))
        _varlen_bwd_dq[grid_dq](
            q, k, v, o, do, lse, stats, dq, *layout.args(),
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
            lse.stride(0), stats.stride(0), *layout.scalars(), scale, scale * LOG2E.value, **common)
        _varlen_bwd_dkdv[grid_dkdv](
            q, k, v, do, stats, dk, dv, *layout.args(),
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            stats.stride(0), *layout.scalars(), scale, scale * LOG2E.value, **common)

    launch(run, q, q, k, v, do)


# ----------------------------------------------------------------------------------------------
# Launchers (registered custom ops). They assume input the public ops (api.py) have checked.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("gpt2_triton::flash_attention_varlen_fwd", mutates_args=())
def flash_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                               causal: bool = True, scale: Optional[float] = None,
                               seqused_k: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention forward. q (total_q, H, D), k, v (total_k, H, D), any strides; cu_seqlens_*
    (N + 1,) int32; seqused_k (N,) int32 or None. Returns o (total_q, H, D) contiguous in q's dtype and
    lse (H, total_q) fp32 (natural log; +inf for a query that sees no key)."""
    scale = default_scale(scale, q.shape[-1])
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    layout = _Layout(cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    _fwd_into(q, k, v, o, lse, layout, causal, scale)
    return o, lse


@flash_attention_varlen_fwd.register_fake
def _flash_attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     causal=True, scale=None, seqused_k=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("gpt2_triton::flash_attention_varlen_bwd", mutates_args=())
def flash_attention_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               o: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                               causal: bool = True, scale: Optional[float] = None,
                               seqused_k: Optional[torch.Tensor] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed attention backward: dq (like q), dk, dv (like k; zero for keys past seqused_k), contiguous,
    in q's dtype. do and o are cast to q's dtype if they differ."""
    scale = default_scale(scale, q.shape[-1])
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    new = torch.empty_like if seqused_k is None else torch.zeros_like
    dk, dv = (new(k, memory_format=torch.contiguous_format) for _ in range(2))
    layout = _Layout(cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    _bwd_into(do.to(q.dtype), q, k, v, o.to(q.dtype), lse, dq, dk, dv, layout, causal, scale)
    return dq, dk, dv


@flash_attention_varlen_bwd.register_fake
def _flash_attention_varlen_bwd_fake(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     causal=True, scale=None, seqused_k=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _qkv_packed(qkv: torch.Tensor, n_head: int):
    """(B, T, 3C) -> q, k, v as packed (B * T, n_head, D) views: no copy when qkv's rows are contiguous
    (as c_attn returns them)."""
    return (t.transpose(1, 2).flatten(0, 1) for t in split_heads(qkv, n_head))


@torch.library.custom_op("gpt2_triton::flash_attention_qkv_documents_fwd", mutates_args=())
def flash_attention_qkv_documents_fwd(qkv: torch.Tensor, documents: torch.Tensor, n_head: int,
                                      causal: bool = True, scale: Optional[float] = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-masked attention forward on the QKV projection's output. qkv (B, T, 3C); documents
    (B, 2, T) int32 from `document_bounds`. Returns y (B, T, C) contiguous in qkv's dtype and lse
    (n_head, B * T) fp32."""
    B, T, C3 = qkv.shape
    q, k, v = _qkv_packed(qkv, n_head)
    scale = default_scale(scale, q.shape[-1])
    y = qkv.new_empty((B, T, C3 // 3))
    lse = torch.empty((n_head, B * T), dtype=torch.float32, device=qkv.device)
    layout = _Layout(None, None, None, T, T, bounds=documents, seq_len=T)
    _fwd_into(q, k, v, y.view(B * T, n_head, -1), lse, layout, causal, scale)
    return y, lse


@flash_attention_qkv_documents_fwd.register_fake
def _flash_attention_qkv_documents_fwd_fake(qkv, documents, n_head, causal=True, scale=None):
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, T, C3 // 3)), qkv.new_empty((n_head, B * T), dtype=torch.float32)


@torch.library.custom_op("gpt2_triton::flash_attention_qkv_documents_bwd", mutates_args=())
def flash_attention_qkv_documents_bwd(dy: torch.Tensor, qkv: torch.Tensor, documents: torch.Tensor,
                                      y: torch.Tensor, lse: torch.Tensor, n_head: int, causal: bool = True,
                                      scale: Optional[float] = None) -> torch.Tensor:
    """Document-masked attention backward: dqkv (B, T, 3C) contiguous in qkv's dtype, written by the
    kernels in place (dq | dk | dv along the last dim, heads side by side)."""
    B, T, C3 = qkv.shape
    q, k, v = _qkv_packed(qkv, n_head)
    scale = default_scale(scale, q.shape[-1])
    dqkv = qkv.new_empty((B, T, C3))
    dq, dk, dv = _qkv_packed(dqkv, n_head)
    packed = (B * T, n_head, C3 // (3 * n_head))
    do, o = (t.to(qkv.dtype).reshape(packed) for t in (dy, y))
    layout = _Layout(None, None, None, T, T, bounds=documents, seq_len=T)
    _bwd_into(do, q, k, v, o, lse, dq, dk, dv, layout, causal, scale)
    return dqkv


@flash_attention_qkv_documents_bwd.register_fake
def _flash_attention_qkv_documents_bwd_fake(dy, qkv, documents, y, lse, n_head, causal=True, scale=None):
    return qkv.new_empty(qkv.shape)


