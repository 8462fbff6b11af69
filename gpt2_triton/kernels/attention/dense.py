"""Dense flash attention kernels (forward and backward), their launchers and custom ops.

q, k, v are (B, H, T, D) tensors with any strides (the model passes strided views of its QKV
projection); the (T, T) score matrix is never built. The forward saves the fp32 logsumexp per row;
the backward recomputes the probabilities from it in two launches, no atomics: dQ (one program per
query tile, which also writes delta = rowsum(o * do) and the log2 logsumexp), then dK/dV (one program
per key tile). Causal loops run in two stages, the tiles left of the diagonal block without any mask;
with T a multiple of 128 (EVEN_T) no load or store is masked. The loops over tiles are core.py's.
`flash_attention_qkv_fwd/bwd` take the (B, T, 3C) QKV projection itself and return (B, T, C); the
backward writes dq | dk | dv straight into one (B, T, 3C) buffer. On the GPU the tiles of the three
kernels are autotuned per (power-of-two bucket of T, D, causal, EVEN_T, dtype); under the interpreter
one small config runs.
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
    bwd_dq_inner,
    bwd_dq_options,
    bwd_dq_tiles,
    default_scale,
    dense_bwd_dkdv_tiles,
    fwd_inner,
    fwd_options,
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
# EVEN_T (a constexpr) means T is a multiple of TILE_MULTIPLE, hence of every tile: no load is masked.
TILE_MULTIPLE = tl.constexpr(128)


@triton.jit
def _program_tile(H, BLOCK: tl.constexpr, STEP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The program's place in a (cdiv(T, BLOCK), B * H) grid, its own tile BLOCK rows and the walked ones
    STEP (BLOCK % STEP == 0, both dividing TILE_MULTIPLE): (first row of its tile, its (batch, head)
    index, batch, head (the last two int64), tile_offsets(start, BLOCK, STEP, HEAD_DIM))."""
    tl.static_assert(BLOCK % STEP == 0)
    tl.static_assert(TILE_MULTIPLE % BLOCK == 0)
    start = tl.program_id(0) * BLOCK
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs, offs0, offs_d = tile_offsets(start, BLOCK, STEP, HEAD_DIM)
    return start, off_bh, off_b, off_h, offs, offs0, offs_d


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
    start_m, off_bh, off_b, off_h, offs_m, offs_n0, offs_d = _program_tile(H, BLOCK_M, BLOCK_N, HEAD_DIM)
    q = load_tile(tile_ptrs(slice_base(q_ptr, off_b, off_h, stride_qb, stride_qh), offs_m, offs_d, stride_qt,
                            stride_qd), offs_m, T, not EVEN_T)  # (BLOCK_M, D)
    k_src = row_tiles(slice_base(k_ptr, off_b, off_h, stride_kb, stride_kh), stride_kt, stride_kd, T,
                      BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = row_tiles(slice_base(v_ptr, off_b, off_h, stride_vb, stride_vh), stride_vt, stride_vd, T,
                      BLOCK_N, HEAD_DIM, USE_TMA)

    lo_m, hi_m = row_windows(lse_ptr, offs_m, T, T, CAUSAL, False)  # causal: hi_m = offs_m (lse_ptr: unused)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Every row keeps at least one key of its first tile, so no row's max stays -inf (MAYBE_EMPTY False).
    if CAUSAL:
        # Key tiles left of the diagonal block: no mask at all. Then the diagonal block: the causal
        # mask only (a key past T is visible only to query rows past T, which are never stored).
        acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                                  T, qk_scale, 0, start_m,
                                  BLOCK_N, False, False, False, False, USE_TMA, INPUT_PRECISION)
        hi = start_m + BLOCK_M if EVEN_T else tl.minimum(start_m + BLOCK_M, T)
        acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                                  T, qk_scale, start_m, hi,
                                  BLOCK_N, True, False, False, not EVEN_T, USE_TMA, INPUT_PRECISION)
    else:
        t_full = T if EVEN_T else (T // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m,
                                  T, qk_scale, 0, t_full,
                                  BLOCK_N, False, False, False, False, USE_TMA, INPUT_PRECISION)
        if not EVEN_T:  # the last, partial key tile: keys past T masked (hi_m = T - 1)
            acc, m_i, l_i = fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m,
                                      hi_m, T, qk_scale, t_full, T,
                                      BLOCK_N, True, False, False, True, USE_TMA, INPUT_PRECISION)

    inv_l = 1.0 / l_i
    lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log
    lse_ptrs = lse_ptr + off_bh.to(tl.int64) * T + offs_m
    o_ptrs = tile_ptrs(slice_base(o_ptr, off_b, off_h, stride_ob, stride_oh), offs_m, offs_d, stride_ot, stride_od)
    o = (acc * inv_l[:, None]).to(o_ptr.dtype.element_ty)
    if EVEN_T:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < T)
    store_tile(o_ptrs, o, offs_m, T, not EVEN_T)


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
    start_m, off_bh, off_b, off_h, offs_m, offs_n0, offs_d = _program_tile(H, BLOCK_M, BLOCK_N, HEAD_DIM)
    q = load_tile(tile_ptrs(slice_base(q_ptr, off_b, off_h, stride_qb, stride_qh), offs_m, offs_d, stride_qt,
                            stride_qd), offs_m, T, not EVEN_T)  # (BLOCK_M, D)
    do = load_tile(tile_ptrs(slice_base(do_ptr, off_b, off_h, stride_dob, stride_doh), offs_m, offs_d, stride_dot,
                             stride_dod), offs_m, T, not EVEN_T)
    o = load_tile(tile_ptrs(slice_base(o_ptr, off_b, off_h, stride_ob, stride_oh), offs_m, offs_d, stride_ot,
                            stride_od), offs_m, T, not EVEN_T)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,); padded rows: 0
    lse2 = load_row_stat(lse_ptr + off_bh.to(tl.int64) * T + offs_m, offs_m, T, not EVEN_T) * LOG2E
    stats_ptrs = stats_ptr + off_bh.to(tl.int64) * 2 * stride_s + offs_m
    if EVEN_T:
        tl.store(stats_ptrs, lse2)
        tl.store(stats_ptrs + stride_s, delta)
    else:
        tl.store(stats_ptrs, lse2, mask=offs_m < T)
        tl.store(stats_ptrs + stride_s, delta, mask=offs_m < T)

    k_src = row_tiles(slice_base(k_ptr, off_b, off_h, stride_kb, stride_kh), stride_kt, stride_kd, T,
                      BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = row_tiles(slice_base(v_ptr, off_b, off_h, stride_vb, stride_vh), stride_vt, stride_vd, T,
                      BLOCK_N, HEAD_DIM, USE_TMA)
    lo_m, hi_m = row_windows(lse_ptr, offs_m, T, T, CAUSAL, False)  # causal: hi_m = offs_m (lse_ptr: unused)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, T,
                          qk_scale, 0, start_m, BLOCK_N, False, False, False, USE_TMA, INPUT_PRECISION)
        hi = start_m + BLOCK_M if EVEN_T else tl.minimum(start_m + BLOCK_M, T)
        dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, T,
                          qk_scale, start_m, hi, BLOCK_N, True, False, not EVEN_T, USE_TMA, INPUT_PRECISION)
    else:
        t_full = T if EVEN_T else (T // BLOCK_N) * BLOCK_N
        dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m, hi_m, T,
                          qk_scale, 0, t_full, BLOCK_N, False, False, False, USE_TMA, INPUT_PRECISION)
        if not EVEN_T:
            dq = bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt, offs_n0, lo_m,
                              hi_m, T, qk_scale, t_full, T, BLOCK_N, False, False, True, USE_TMA,
                              INPUT_PRECISION)

    dq_ptrs = tile_ptrs(slice_base(dq_ptr, off_b, off_h, stride_dqb, stride_dqh), offs_m, offs_d, stride_dqt,
                        stride_dqd)
    store_tile(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), offs_m, T, not EVEN_T)


@triton.jit
def _stats_source(base, T, stride_s, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Where a hot loop reads the per-row fp32 statistics (lse2 | delta, rows of a (2, T) matrix at base
    with row stride stride_s) of one (batch, head) from: a TMA descriptor (past T reads as 0; base and
    stride_s 16-byte aligned), or base itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, [2, T], [stride_s, 1], [2, BLOCK])
    else:
        return base


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
    start_n, off_bh, off_b, off_h, offs_n, offs_m0, offs_d = _program_tile(H, BLOCK_N, BLOCK_M, HEAD_DIM)
    k = load_tile(tile_ptrs(slice_base(k_ptr, off_b, off_h, stride_kb, stride_kh), offs_n, offs_d, stride_kt,
                            stride_kd), offs_n, T, not EVEN_T)  # (BLOCK_N, D)
    v = load_tile(tile_ptrs(slice_base(v_ptr, off_b, off_h, stride_vb, stride_vh), offs_n, offs_d, stride_vt,
                            stride_vd), offs_n, T, not EVEN_T)
    q_src = row_tiles(slice_base(q_ptr, off_b, off_h, stride_qb, stride_qh), stride_qt, stride_qd, T,
                      BLOCK_M, HEAD_DIM, USE_TMA)
    do_src = row_tiles(slice_base(do_ptr, off_b, off_h, stride_dob, stride_doh), stride_dot, stride_dod, T,
                       BLOCK_M, HEAD_DIM, USE_TMA)
    stats_src = _stats_source(stats_ptr + off_bh.to(tl.int64) * 2 * stride_s, T, stride_s, BLOCK_M, USE_TMA)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query tiles: the diagonal block (causal only, masked), the full tiles, then the partial last one.
    t_full = T if EVEN_T else (T // BLOCK_M) * BLOCK_M
    # stats_ptr stands in for the document bounds, which dense attention has none of (DOCS False).
    if CAUSAL:
        diag_hi = start_n + BLOCK_N if EVEN_T else tl.minimum(start_n + BLOCK_N, T)
        dk, dv = bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s,
                                stats_ptr, offs_n, offs_m0, T, T, qk_scale, start_n, diag_hi,
                                BLOCK_M, True, True, False, not EVEN_T, USE_TMA, USE_TMA, INPUT_PRECISION)
        mid_lo = start_n + BLOCK_N
    else:
        mid_lo = 0
    dk, dv = bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s,
                            stats_ptr, offs_n, offs_m0, T, T, qk_scale, mid_lo, t_full,
                            BLOCK_M, False, CAUSAL, False, False, USE_TMA, USE_TMA, INPUT_PRECISION)
    if not EVEN_T:
        dk, dv = bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, stats_src, stride_qt, stride_dot, stride_s,
                                stats_ptr, offs_n, offs_m0, T, T, qk_scale, tl.maximum(mid_lo, t_full), T,
                                BLOCK_M, False, CAUSAL, False, True, USE_TMA, USE_TMA, INPUT_PRECISION)

    dk_ptrs = tile_ptrs(slice_base(dk_ptr, off_b, off_h, stride_dkb, stride_dkh), offs_n, offs_d, stride_dkt,
                        stride_dkd)
    dv_ptrs = tile_ptrs(slice_base(dv_ptr, off_b, off_h, stride_dvb, stride_dvh), offs_n, offs_d, stride_dvt,
                        stride_dvd)
    dk = (dk * scale).to(dk_ptr.dtype.element_ty)
    dv = dv.to(dv_ptr.dtype.element_ty)
    store_tile(dk_ptrs, dk, offs_n, T, not EVEN_T)
    store_tile(dv_ptrs, dv, offs_n, T, not EVEN_T)


# ----------------------------------------------------------------------------------------------
# Autotuners
# ----------------------------------------------------------------------------------------------
_AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "EVEN_T", "USE_TMA"]
_flash_attention_fwd = autotuned_tiles(_flash_attention_fwd_kernel, fwd_tiles, (32, 16, 4, 1), _AUTOTUNE_KEY,
                                       fwd_options)
_flash_attention_bwd_dq = autotuned_tiles(_flash_attention_bwd_dq_kernel, bwd_dq_tiles, (32, 16, 4, 1),
                                          _AUTOTUNE_KEY, bwd_dq_options)
_flash_attention_bwd_dkdv = autotuned_tiles(_flash_attention_bwd_dkdv_kernel, dense_bwd_dkdv_tiles, (16, 32, 4, 1),
                                            _AUTOTUNE_KEY, bwd_dkdv_options)


# ----------------------------------------------------------------------------------------------
# Layouts: (B, H, T, D) views of the buffers the model keeps
# ----------------------------------------------------------------------------------------------
def _even_t(T: int) -> bool:
    """T is a multiple of every tile (TILE_MULTIPLE): the kernels then mask no load or store."""
    return T % TILE_MULTIPLE.value == 0


def _empty_bhtd(B: int, H: int, T: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """A fresh (B, H, T, D) tensor stored as (B, T, H, D): the model's transpose(1, 2).contiguous() is then free."""
    return like.new_empty((B, T, H, D)).transpose(1, 2)


def _heads_view(y: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, D) view."""
    return y.unflatten(2, (n_head, y.shape[2] // n_head)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Launch helpers (write into given (B, H, T, D) views; autocast off around them)
# ----------------------------------------------------------------------------------------------
def _fwd_into(q, k, v, o, lse, causal: bool, scale: float) -> None:
    """o (B, H, T, D) and lse (B, H, T) fp32 contiguous <- attention forward of q, k, v."""
    B, H, T, D = q.shape
    q, scale = positive_scale(q, scale)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731

    def run(use_tma, k, v):  # the loop reads k, v tiles
        _flash_attention_fwd[grid](
            q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T, bucket(T), scale * LOG2E.value,
            HEAD_DIM=D, CAUSAL=causal, EVEN_T=_even_t(T), USE_TMA=use_tma,
            INPUT_PRECISION=input_precision(q.dtype, q.device))

    launch(run, q, k, v)


def _bwd_into(do, q, k, v, o, lse, dq, dk, dv, causal: bool, scale: float) -> None:
    """dq, dk, dv (B, H, T, D) views <- attention backward. Two launches: dQ (which also writes the
    row statistics delta = rowsum(o * do) and lse in log2 units), then dK/dV (which reads them)."""
    B, H, T, D = q.shape
    stride_s = triton.cdiv(T, 4) * 4  # 16-byte aligned rows: the dK/dV kernel reads them through TMA
    stats = torch.empty((B * H, 2, stride_s), dtype=torch.float32, device=q.device)  # lse2 | delta
    precision = input_precision(q.dtype, q.device)
    even_t = _even_t(T)
    grid_dq = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731  one program per query tile
    grid_dkdv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731  one program per key tile

    def run(use_tma, q, k, v, do):  # the dQ loop reads k, v tiles; the dK/dV loop q, do tiles
        _flash_attention_bwd_dq[grid_dq](
            q, k, v, o, do, lse, stats, dq,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
            stride_s, H, T, bucket(T), scale, scale * LOG2E.value,
            HEAD_DIM=D, CAUSAL=causal, EVEN_T=even_t, USE_TMA=use_tma, INPUT_PRECISION=precision)
        _flash_attention_bwd_dkdv[grid_dkdv](
            q, k, v, do, stats, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            stride_s, H, T, bucket(T), scale, scale * LOG2E.value,
            HEAD_DIM=D, CAUSAL=causal, EVEN_T=even_t, USE_TMA=use_tma, INPUT_PRECISION=precision)

    launch(run, q, q, k, v, do)


# ----------------------------------------------------------------------------------------------
# Launchers (registered custom ops: torch.compile calls them without graph breaks). They assume input
# the public ops (api.py) have checked.
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
    scale = default_scale(scale, D)
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
    scale = default_scale(scale, D)
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
    scale = default_scale(scale, q.shape[-1])
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
    scale = default_scale(scale, q.shape[-1])
    dqkv = qkv.new_empty((B, T, C3))
    dq, dk, dv = split_heads(dqkv, n_head)
    do = _heads_view(dy.to(qkv.dtype), n_head)
    o = _heads_view(y.to(qkv.dtype), n_head)
    _bwd_into(do, q, k, v, o, lse.contiguous(), dq, dk, dv, causal, scale)
    return dqkv


@flash_attention_qkv_bwd.register_fake
def _flash_attention_qkv_bwd_fake(dy, qkv, y, lse, n_head, causal=True, scale=None):
    return qkv.new_empty(qkv.shape)
