"""Fused GELU-MLP: a tiled Triton matmul with bias / tanh-GELU / GELU-gradient epilogues.

gelu_mlp(x) = c_proj(gelu_tanh(c_fc(x))) with nn.Linear weights: fc (H, C), proj (C, H).

One matmul kernel serves every product (forward and backward); what differs is the epilogue:
    EPI_NONE       out = a @ b (+ bias)
    EPI_GELU       pre = a @ b (+ bias); out = gelu(pre); optionally also store pre
    EPI_GELU_GRAD  out = (a @ b) * gelu'(pre), pre loaded; optionally also store gelu(pre)

The weight-grad products (small outputs, K = B·T) split K over several programs on a GPU (fp32
partials summed in a fixed order: no atomics).

`linear_gelu(x, weight, bias)` is the first half alone, gelu_tanh(x @ weight.T + bias): a drop-in for
`F.gelu(F.linear(x, w, b), approximate="tanh")` in models whose MLP goes on differently after the
activation (BERT's intermediate layer, a ViT MLP with other layers in between).

Dtypes and autocast: without autocast the parameters share one dtype, x's or fp32 with fp16/bf16 x.
Under autocast the public ops cast x to the autocast dtype themselves (autocast cannot see custom
kernels) and read the parameters (any one float dtype) as they are. Matmuls run in the activation
dtype (weights cast once per call, as autocast does) and accumulate in fp32, biases are added in
fp32, outputs come in the activation dtype; weight and bias grads are written from the fp32
accumulator in each parameter's own dtype (fp32 master weights get fp32-accumulated grads).
"""
import functools
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.autotune import autotuned, bucket, candidates_of
from gpt2_triton.kernels.grads import GradSinks, bias_grad_into, sum_partials
from gpt2_triton.kernels.utils import (
    autocast_disabled,
    autocast_dtype,
    cast_floats,
    cast_weight,
    check_device,
    check_float,
    device_guard,
    is_interpreter,
    known_arch,
    sm_count,
    with_fallbacks,
)

# The matmul kernel's epilogues: constexprs the kernel compares against (host code passes `.value`).
EPI_NONE, EPI_GELU, EPI_GELU_GRAD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# ----------------------------------------------------------------------------------------------
# GELU (tanh approximation), fp32 in, fp32 out.
# 0.5·x·(1 + tanh(u)) == x·sigmoid(2u), u = sqrt(2/pi)·(x + 0.044715·x³). The sigmoid is built
# from e = exp(-|2u|) <= 1, so nothing overflows for any |x|. Beyond |x| = 20 the sigmoid is
# exactly 0 or 1 in fp32, so u is computed from x clamped to [-20, 20] (keeps x³ finite).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gelu_sigmoid_parts(x):
    xc = tl.minimum(tl.maximum(x, -20.0), 20.0)
    z = 1.5957691216057308 * (xc + 0.044715 * xc * xc * xc)  # 2u; 1.59576... = 2·sqrt(2/pi)
    e = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + e)
    s = tl.where(z >= 0, inv, e * inv)  # sigmoid(2u) = 0.5·(1 + tanh(u))
    return xc, s, e * inv * inv  # s·(1 - s) = e / (1 + e)²


@triton.jit
def _gelu_tanh(x):
    xc, s, s_1ms = _gelu_sigmoid_parts(x)
    return x * s


@triton.jit
def _gelu_tanh_grad(x):
    # d/dx [x·sigmoid(2u)] = s + 2·x·u'·s(1 - s), u' = sqrt(2/pi)·(1 + 3·0.044715·x²)
    xc, s, s_1ms = _gelu_sigmoid_parts(x)
    du = 0.7978845608028654 * (1.0 + 0.134145 * xc * xc)
    return s + 2.0 * xc * du * s_1ms


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, offs_n, M, N, stride_outm,
              stride_outn, stride_colsum, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr,
              ACCUMULATE: tl.constexpr, COLSUM_ROWS: tl.constexpr):
    """Bias, activation and stores for a block of a tile: acc (len(offs_m), len(offs_n)) fp32.

    out_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr and bias_ptr point at the tile's first element (row and
    column; colsum_ptr: its first partial row); offs_m / offs_n are int32 row / column indices inside the
    tile; M / N are the rows / columns left from the tile's first one (those past them are masked).
    ACCUMULATE: out += result (out's old values read). COLSUM_ROWS > 0: the result's column sums over each
    COLSUM_ROWS rows of the tile go to consecutive partial rows (row stride stride_colsum) at colsum_ptr.
    """
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += bias[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m[:, None] * stride_outm + offs_n[None, :] * stride_outn  # in-tile: fits int32 (launcher)
    if EPILOGUE == EPI_GELU:
        if STORE_AUX:
            tl.store(aux_out_ptr + offs, acc.to(aux_out_ptr.dtype.element_ty), mask=mask)
        acc = _gelu_tanh(acc)
    elif EPILOGUE == EPI_GELU_GRAD:
        pre = tl.load(aux_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_tanh_grad(pre)
        if STORE_AUX:
            tl.store(aux_out_ptr + offs, _gelu_tanh(pre).to(aux_out_ptr.dtype.element_ty), mask=mask)
    if COLSUM_ROWS > 0:
        ROWS: tl.constexpr = acc.shape[0]
        PIECES: tl.constexpr = ROWS // COLSUM_ROWS
        WIDTH: tl.constexpr = acc.shape[1]
        sums = tl.sum(tl.reshape(tl.where(mask, acc, 0.0), (PIECES, COLSUM_ROWS, WIDTH)), axis=1)  # (PIECES, WIDTH)
        piece = tl.arange(0, PIECES)
        tl.store(colsum_ptr + piece[:, None] * stride_colsum + offs_n[None, :], sums,
                 mask=(piece * COLSUM_ROWS < M)[:, None] & (offs_n < N)[None, :])
    if ACCUMULATE:
        acc += tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_cols(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """x (ROWS, 2 * HALF) -> its left and right halves (ROWS, HALF)."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, HALF)), (0, 2, 1)))


@triton.jit
def _epilogue_halves(acc, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, first_col, M, N,
                     stride_outm, stride_outn, stride_colsum, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                     STORE_AUX: tl.constexpr, ACCUMULATE: tl.constexpr, COLSUM_ROWS: tl.constexpr,
                     ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """_epilogue on the left, then the right half of acc (ROWS, WIDTH), the tile's columns from first_col."""
    HALF: tl.constexpr = WIDTH // 2
    lo, hi = _split_cols(acc, ROWS, HALF)
    _epilogue(lo, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, first_col + tl.arange(0, HALF), M,
              N, stride_outm, stride_outn, stride_colsum, HAS_BIAS, EPILOGUE, STORE_AUX, ACCUMULATE, COLSUM_ROWS)
    _epilogue(hi, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m,
              first_col + HALF + tl.arange(0, HALF), M, N, stride_outm, stride_outn, stride_colsum, HAS_BIAS,
              EPILOGUE, STORE_AUX, ACCUMULATE, COLSUM_ROWS)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr,
    M, N, K, K_SPLIT,
    M_BUCKET, K_BUCKET,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_outm, stride_outn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr, IEEE_FP32: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, ACCUMULATE: tl.constexpr,
    COLSUM_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr,
):
    """out (M, N) = epilogue(a (M, K) @ b (K, N)); a and b any strides.

    bias (N,) any float dtype; aux_in (M, N) with out's strides: the saved pre-activation (EPI_GELU_GRAD);
    aux_out (M, N) with out's strides: pre (EPI_GELU) or gelu(pre) (EPI_GELU_GRAD) when STORE_AUX.
    colsum (cdiv(M, COLSUM_ROWS), N) fp32 when COLSUM_ROWS > 0: per COLSUM_ROWS rows of out, the column sums
    of the result (a bias gradient's partials; COLSUM_ROWS divides every candidate's BLOCK_M, so every row
    is written whatever config runs). ACCUMULATE: out += result.
    M_BUCKET / K_BUCKET: only the autotune key (M and K rounded up to powers of two).
    UPCAST_OPERANDS: the a / b tiles go to tl.dot as fp32 (exact for bf16); set only under the interpreter,
    whose tl.dot on bf16 operands is wrong (triton 3.9).
    EVEN_K: K_SPLIT and K are multiples of BLOCK_K (the K loop needs no mask).
    SPLIT_K > 1: program (tile, s) sums k in [s * K_SPLIT, min((s + 1) * K_SPLIT, K)) and writes its fp32
    partial to out + s * M * N (out is a contiguous (SPLIT_K, M, N) workspace; no bias, no epilogue).
    SUBTILE (1, 2, 4): the epilogue runs on that many column slices of the tile (fewer live registers).
    Offsets inside a tile are int32 (the launcher checks BLOCK * stride < 2^31); tile bases are int64.
    """
    # Grouped program order: GROUP_M row-blocks sweep the column-blocks together so the b tiles
    # they share stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    if SPLIT_K > 1:
        k_lo = tl.program_id(1) * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
    else:
        k_lo = 0
        k_hi = K

    # The K loop has no M / N masks: rows past M (columns past N) of the last tiles wrap onto the tile's
    # valid ones, whose extra results the masked stores drop. Each load is a scalar int64 base, advanced
    # once per step, plus loop-invariant int32 offsets inside the tile.
    offs_k = tl.arange(0, BLOCK_K)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rows = tl.arange(0, BLOCK_M) % (M - row0)
    cols = tl.arange(0, BLOCK_N) % (N - col0)
    a_base = a_ptr + row0.to(tl.int64) * stride_am + tl.cast(k_lo, tl.int64) * stride_ak
    b_base = b_ptr + col0.to(tl.int64) * stride_bn + tl.cast(k_lo, tl.int64) * stride_bk
    a_offs = rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_offs = offs_k[:, None] * stride_bk + cols[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_base + a_offs)
            b = tl.load(b_base + b_offs)
        else:
            a = tl.load(a_base + a_offs, mask=offs_k[None, :] < k_hi - k0, other=0.0)
            b = tl.load(b_base + b_offs, mask=offs_k[:, None] < k_hi - k0, other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_FP32 or UPCAST_OPERANDS:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_base += a_step
        b_base += b_step

    # Epilogue: int64 tile bases, int32 offsets inside the tile.
    tile = row0.to(tl.int64) * stride_outm + col0.to(tl.int64) * stride_outn
    if SPLIT_K > 1:
        tile += tl.program_id(1).to(tl.int64) * M * N
    out_ptr += tile
    if HAS_BIAS:
        bias_ptr += col0
    if EPILOGUE == EPI_GELU_GRAD:
        aux_in_ptr += tile
    if STORE_AUX:
        aux_out_ptr += tile
    if COLSUM_ROWS > 0:
        colsum_ptr += (row0 // COLSUM_ROWS).to(tl.int64) * N + col0
    rows_left, cols_left = M - row0, N - col0
    offs_m = tl.arange(0, BLOCK_M)
    if SUBTILE == 4 and BLOCK_N >= 64:
        lo, hi = _split_cols(acc, BLOCK_M, BLOCK_N // 2)
        _epilogue_halves(lo, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, 0, rows_left, cols_left,
                         stride_outm, stride_outn, N, HAS_BIAS, EPILOGUE, STORE_AUX, ACCUMULATE, COLSUM_ROWS,
                         BLOCK_M, BLOCK_N // 2)
        _epilogue_halves(hi, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, BLOCK_N // 2, rows_left,
                         cols_left, stride_outm, stride_outn, N, HAS_BIAS, EPILOGUE, STORE_AUX, ACCUMULATE,
                         COLSUM_ROWS, BLOCK_M, BLOCK_N // 2)
    elif SUBTILE >= 2 and BLOCK_N >= 32:
        _epilogue_halves(acc, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, 0, rows_left,
                         cols_left, stride_outm, stride_outn, N, HAS_BIAS, EPILOGUE, STORE_AUX, ACCUMULATE,
                         COLSUM_ROWS, BLOCK_M, BLOCK_N)
    else:
        _epilogue(acc, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr, colsum_ptr, offs_m, tl.arange(0, BLOCK_N),
                  rows_left, cols_left, stride_outm, stride_outn, N, HAS_BIAS, EPILOGUE, STORE_AUX, ACCUMULATE,
                  COLSUM_ROWS)


def matmul_tiles(dtype: torch.dtype, arch: Optional[str] = None) -> list:
    """Hopper tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), the hand-picked one first. fp16/bf16:
    all with 4 or 8 warps, so every dot lowers to wgmma on sm_90 (2-warp programs fall back to mma.sync).
    fp32 (IEEE products on FMA units): the tiles that spill on neither triton 3.6 nor 3.9 (ptxas -v, sm_90;
    128x256x64 spilled 0.4-2.4 KB on 3.6 and 5.7-45 KB on 3.9, 64x256x32 and 128x128x32 0.1-0.3 KB).
    AMD (gfx942 / gfx950), fp16/bf16: 2 stages (LDS holds num_stages - 1 buffers there); compiled for gfx942
    (triton 3.9, GPT-2's NT matmul) 256x128x64 w8 takes 186 VGPRs and 48 KB LDS, 128x128x64 w8 118 VGPRs and
    32 KB, 256x256x64 w8 256 VGPRs and 64 KB, none spills; 128x256x64 at 3 stages needs 96 KB > 64 KB."""
    if dtype != torch.float32 and arch is not None and arch.startswith("gfx"):
        return [(256, 128, 64, 8, 2), (128, 128, 64, 8, 2), (128, 256, 64, 8, 2), (256, 256, 64, 8, 2),
                (128, 128, 64, 4, 2), (128, 64, 64, 4, 2), (64, 64, 64, 4, 2)]
    if dtype == torch.float32:
        return [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                (64, 64, 32, 4, 5), (64, 32, 32, 4, 5)]
    return [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 32, 4, 4),
            (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 32, 32, 4, 4),
            (64, 64, 32, 4, 5), (64, 32, 32, 4, 5)]


def _matmul_smem(config, args) -> int:
    """Shared memory of a matmul config on sm_90: buffers x (BLOCK_M x BLOCK_K + BLOCK_K x BLOCK_N) operand
    elements, buffers = num_stages for fp16/bf16 (wgmma) and num_stages - 1 for fp32 (what ptxas reports for
    every candidate, triton 3.6 and 3.9); on AMD num_stages - 1 for every dtype (the LDS of gfx942's
    compiles, triton 3.9: 128x128x64 at 2 / 3 stages 32 / 64 KB)."""
    kw = config.kwargs
    size = args["a_ptr"].element_size()
    arch = known_arch(getattr(args["a_ptr"], "device", None))  # the static profile passes TensorMeta
    buffers = config.num_stages - 1 if size == 4 or (arch is not None and arch.vendor == "amd") else config.num_stages
    return buffers * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * size


# Keyed on M and K rounded up to powers of two (M_BUCKET, K_BUCKET): evaluation and generation, whose M
# changes with every batch, tune once per bucket instead of once per length.
_matmul = autotuned(
    _matmul_kernel, names=("BLOCK_M", "BLOCK_N", "BLOCK_K"), candidates=matmul_tiles,
    key=["M_BUCKET", "N", "K_BUCKET", "EPILOGUE", "HAS_BIAS", "STORE_AUX", "EVEN_K", "SPLIT_K", "ACCUMULATE",
         "COLSUM_ROWS"],
    variants=[(torch.float16,), (torch.float32,)],
    variant_of=lambda args: (torch.float32 if args["a_ptr"].dtype == torch.float32 else torch.float16,),
    interpreter_tile=(32, 64, 32, 4, 3), extra={"GROUP_M": 8}, smem=_matmul_smem, restore=["out_ptr"])
_MATMUL_CANDIDATES = candidates_of(_matmul)


@triton.jit
def _gelu_bwd_kernel(
    dout_ptr, pre_ptr, dpre_ptr, n_cols,
    stride_doutm, stride_doutn, stride_prem, stride_pren, stride_dprem,
    BLOCK_N: tl.constexpr,
):
    """dpre (M, N) = dout (M, N) * gelu'(pre (M, N)); one program per (row, column block)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dout = tl.load(dout_ptr + row * stride_doutm + cols * stride_doutn, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + row * stride_prem + cols * stride_pren, mask=mask, other=0.0).to(tl.float32)
    dpre = dout * _gelu_tanh_grad(pre)
    tl.store(dpre_ptr + row * stride_dprem + cols, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Plain launchers (no autograd). Internal helpers write into outputs they are handed; the registered
# launchers below allocate their activations and write parameter grads into the buffers they are given.
# ----------------------------------------------------------------------------------------------
@functools.cache
def _block_bounds(interpreter: bool) -> dict:
    """(smallest, largest) BLOCK_M / BLOCK_N / BLOCK_K among the configs the autotuner may pick."""
    configs = _MATMUL_CANDIDATES.configs()
    return {name: (min(cfg.kwargs[name] for cfg in configs), max(cfg.kwargs[name] for cfg in configs))
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}


def _max_block(name):
    return _block_bounds(is_interpreter())[name][1]


def colsum_rows() -> int:
    """Rows of out per column-sum partial (COLSUM_ROWS): the smallest BLOCK_M, which divides every other."""
    return _block_bounds(is_interpreter())["BLOCK_M"][0]


# Epilogue column slices, by epilogue: fewer live registers where the GELU math spills the tiles with
# 128 accumulator registers per thread (ptxas -v, sm_90, bf16, triton 3.9: the GELU gradient spills
# 1.9-2.2 KB with one slice, 1.1-1.6 KB with two, nothing with four; the GELU 40-80 B with one slice).
# Adding into out (accumulate) reads an fp32 tile beside the accumulator: two slices (one spilled 192 B
# at 64x256x32 and 128x128x32 with 4 warps, 255 registers).
_EPILOGUE_SUBTILES = {EPI_NONE.value: 1, EPI_GELU.value: 2, EPI_GELU_GRAD.value: 4}


def launch_matmul(a, b, out, bias=None, epilogue=EPI_NONE, aux_in=None, aux_out=None, split_k=1,
                   accumulate=False, colsum=None):
    """out (M, N) <- epilogue(a (M, K) @ b (K, N)), or out += a @ b with accumulate (EPI_NONE, no bias);
    a and b share a dtype, any strides.

    aux_in / aux_out share out's strides. colsum: (cdiv(M, colsum_rows()), N) fp32 <- the column sums of
    the result per colsum_rows() rows. split_k > 1 (no bias, no epilogue): out is a contiguous (split_k', M, N)
    fp32 workspace, split_k' = cdiv(K, K_SPLIT) of `_k_split`, for the K ranges' partial products (the
    caller sums them).
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    for t in (aux_in, aux_out):
        assert t is None or t.stride() == out.stride(), "aux tensors must share out's strides"
    assert split_k == 1 or (bias is None and epilogue == EPI_NONE and not accumulate and colsum is None)
    bm, bn, bk = _max_block("BLOCK_M"), _max_block("BLOCK_N"), _max_block("BLOCK_K")
    for name, t, (b0, b1) in (("a", a, (bm, bk)), ("b", b, (bk, bn)), ("out", out, (bm, bn))):
        if b0 * t.stride(-2) + b1 * t.stride(-1) >= 2**31:
            raise ValueError(f"matmul: {name} strides {t.stride()} are too large for the kernel's int32 "
                             f"offsets inside a tile (need {b0}·stride(0) + {b1}·stride(1) < 2^31)")
    k_split = _k_split(K, split_k)
    bias = bias.contiguous() if bias is not None else None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                         triton.cdiv(K, k_split))
    with device_guard(a.device):
        _matmul[grid](
            a, b, out, bias, aux_in, aux_out, colsum,
            M, N, K, k_split,
            bucket(M), bucket(K),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(-2), out.stride(-1),
            HAS_BIAS=bias is not None, EPILOGUE=epilogue.value, STORE_AUX=aux_out is not None,
            IEEE_FP32=a.dtype == torch.float32, UPCAST_OPERANDS=is_interpreter() and a.dtype == torch.bfloat16,
            EVEN_K=K % bk == 0, SPLIT_K=split_k, ACCUMULATE=accumulate,
            COLSUM_ROWS=colsum_rows() if colsum is not None else 0,
            SUBTILE=max(_EPILOGUE_SUBTILES[epilogue.value], 2 if accumulate else 1),
        )
    return out


def _k_split(K: int, split_k: int) -> int:
    """K elements per split (K_SPLIT): a multiple of the largest BLOCK_K, so that every split but the last
    is whole and no split needs a K mask when K is a multiple of BLOCK_K (EVEN_K)."""
    bk = _max_block("BLOCK_K")
    return max(triton.cdiv(triton.cdiv(K, split_k), bk), 1) * bk


# The weight-grad products dW_fc = d(pre).T @ x (H x C, K = M) and dW_proj = dy.T @ h (C x H, K = M) make
# 72 tiles of the hand-picked 128x256 tile at GPT-2 124M size (M = B·T = 16384, C = 768, H = 3072): 0.55 waves
# on an H100's 132 SMs. They split K (split_k_for: 3 splits, 216 programs, 1.64 waves).
SPLITS = (1, 2, 3, 4, 6, 8)


def split_k_for(M: int, N: int, K: int, num_sms: int, tile: tuple) -> int:
    """K splits for an (M, N) output with a long K, from a simple time model of the hand-picked tile
    (BLOCK_M, BLOCK_N), one program per SM at a time: waves of num_sms tiles, each 2·BLOCK_M·BLOCK_N·K/S
    FLOPs, plus the fp32 partials written and read (8·S·M·N bytes) at 300 FLOP per byte (an H100's bf16
    peak over its memory bandwidth)."""
    block_m, block_n = tile
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)

    def cost(s):
        programs = tiles * triton.cdiv(K, _k_split(K, s))
        compute = triton.cdiv(programs, num_sms) * num_sms * 2 * block_m * block_n * _k_split(K, s)
        return compute + (8 * s * M * N * 300 if s > 1 else 0)

    return min(SPLITS, key=cost)


def split_matmul(a, b, out, split_k, accumulate=False, pairs=()):
    """out (+)= a @ b over split_k K ranges: their fp32 partial products summed into out (contiguous, any
    float dtype) in a fixed order, with `pairs` (more sum_partials pairs) in the same launch."""
    M, K = a.shape
    N = b.shape[1]
    splits = triton.cdiv(K, _k_split(K, split_k))
    pieces = torch.empty((splits, M, N), dtype=torch.float32, device=out.device)
    launch_matmul(a, b, pieces, split_k=split_k)
    sum_partials([(pieces.view(splits, M * N), out, accumulate), *pairs])


def _weight_grad(a, b, out, accumulate=False, pairs=()):
    """out (+)= a @ b for a weight gradient (K = the M rows of the batch; out contiguous, any float dtype),
    split over K on a GPU (without the split where split-K has failed in this process: feature "split_k");
    `pairs` (sum_partials pairs: bias-grad partials) are summed in the same launch as the split-K pieces."""
    M, K = a.shape
    N = b.shape[1]
    num_sms = sm_count(a.device)
    split_k = split_k_for(M, N, K, num_sms, matmul_tiles(a.dtype)[0][:2]) if num_sms else 1

    def unsplit():
        launch_matmul(a, b, out, accumulate=accumulate)
        if pairs:
            sum_partials(pairs)

    if split_k == 1 or M == 0 or N == 0:
        return unsplit()
    return with_fallbacks([("split_k", lambda: split_matmul(a, b, out, split_k, accumulate, pairs))], unsplit)


def _gelu_bwd(dout, pre):
    """dpre = dout * gelu'(pre); dout, pre (M, N) -> (M, N) in pre's dtype."""
    M, N = pre.shape
    dpre = torch.empty((M, N), dtype=pre.dtype, device=pre.device)
    if M == 0 or N == 0:
        return dpre
    block_n = min(1024, triton.next_power_of_2(N))
    with device_guard(pre.device):
        _gelu_bwd_kernel[(M, triton.cdiv(N, block_n))](
            dout, pre, dpre, N,
            dout.stride(0), dout.stride(1), pre.stride(0), pre.stride(1), dpre.stride(0),
            BLOCK_N=block_n,
        )
    return dpre


def _colsum_partials(M: int, N: int, device) -> torch.Tensor:
    """The (cdiv(M, colsum_rows()), N) fp32 column-sum partials a COLSUM epilogue writes (every row)."""
    return torch.empty((triton.cdiv(M, colsum_rows()), N), dtype=torch.float32, device=device)


@torch.library.custom_op("gpt2_triton::gelu_mlp_fwd", mutates_args=())
def gelu_mlp_fwd(x2d: torch.Tensor, fc_weight: torch.Tensor, fc_bias: Optional[torch.Tensor],
                 proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor],
                 save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d (M, C) -> (y (M, C), pre (M, H)), both in x2d's dtype.

    fc_weight (H, C), fc_bias (H,) or None, proj_weight (C, H), proj_bias (C,) or None; weights of another
    float dtype are read through `cast_weight` (a parameter is cast once per optimizer step), biases are
    added in fp32. pre = x2d @ fc_weight.T + fc_bias is written only when save_pre (otherwise pre is an
    empty (0,) tensor). We save pre alone for backward and recompute gelu(pre) there: one (M, 4C) tensor
    kept per layer instead of two (pre and h).
    """
    dtype = x2d.dtype
    with autocast_disabled(x2d.device.type):
        h, pre = _fc_gelu(x2d, fc_weight, fc_bias, save_pre)  # h = gelu(pre) only lives until c_proj
        y = torch.empty((x2d.shape[0], fc_weight.shape[1]), dtype=dtype, device=x2d.device)
        launch_matmul(h, cast_weight(proj_weight, dtype).t(), y, bias=proj_bias)
    return y, pre


def _fc_gelu(x2d, fc_weight, fc_bias, save_pre):
    """(gelu(pre), pre or an empty (0,) tensor) for pre = x2d @ fc_weight.T + fc_bias, in x2d's dtype."""
    M, H = x2d.shape[0], fc_weight.shape[0]
    h = torch.empty((M, H), dtype=x2d.dtype, device=x2d.device)
    pre = torch.empty((M, H) if save_pre else (0,), dtype=x2d.dtype, device=x2d.device)
    launch_matmul(x2d, cast_weight(fc_weight, x2d.dtype).t(), h, bias=fc_bias, epilogue=EPI_GELU,
                   aux_out=pre if save_pre else None)
    return h, pre


@gelu_mlp_fwd.register_fake
def _(x2d, fc_weight, fc_bias, proj_weight, proj_bias, save_pre):
    M, H = x2d.shape[0], fc_weight.shape[0]
    return x2d.new_empty((M, fc_weight.shape[1])), x2d.new_empty((M, H) if save_pre else (0,))


@torch.library.custom_op("gpt2_triton::gelu_mlp_pre", mutates_args=())
def gelu_mlp_pre(x2d: torch.Tensor, fc_weight: torch.Tensor, fc_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """pre (M, H) of gelu_mlp_fwd, recomputed for a backward that did not keep it: the same launch as the
    forward's (same tile, same accumulation order), so the same bits."""
    with autocast_disabled(x2d.device.type):
        return _fc_gelu(x2d, fc_weight, fc_bias, True)[1]


@gelu_mlp_pre.register_fake
def _(x2d, fc_weight, fc_bias):
    return x2d.new_empty((x2d.shape[0], fc_weight.shape[0]))


@torch.library.custom_op("gpt2_triton::gelu_mlp_bwd", mutates_args=("dfc_w", "dfc_b", "dproj_w", "dproj_b"))
def gelu_mlp_bwd(dy: torch.Tensor, x2d: torch.Tensor, pre: torch.Tensor, fc_weight: torch.Tensor,
                 proj_weight: torch.Tensor, dfc_w: Optional[torch.Tensor], dfc_b: Optional[torch.Tensor],
                 dproj_w: Optional[torch.Tensor], dproj_b: Optional[torch.Tensor],
                 accumulate: Sequence[bool]) -> torch.Tensor:
    """Grads of gelu_mlp: dy (M, C), x2d (M, C), pre (M, H) from gelu_mlp_fwd, weights as in the fwd.

    Returns dx (M, C) in x2d's dtype. Writes the parameter grads into dfc_w (H, C), dfc_b (H,), dproj_w
    (C, H), dproj_b (C,) (contiguous, any float dtype; None: not wanted), adding to what they hold where
    `accumulate` (one flag each, in that order) says so; fp32-accumulated throughout (split-K pieces and
    the fc bias's per-tile column sums of d(pre) summed in fp32, in a fixed order).
    """
    dtype = x2d.dtype
    M, C, H = x2d.shape[0], x2d.shape[1], pre.shape[1]
    acc_fc_w, acc_fc_b, acc_proj_w, acc_proj_b = accumulate
    with autocast_disabled(x2d.device.type):
        dy, pre = dy.to(dtype), pre.contiguous()
        # d(pre) = (dy @ W_proj) * gelu'(pre), h = gelu(pre) recomputed and d(fc_b)'s partials, one epilogue.
        dpre = torch.empty((M, H), dtype=dtype, device=x2d.device)
        h = torch.empty((M, H), dtype=dtype, device=x2d.device)
        colsum = _colsum_partials(M, H, x2d.device) if dfc_b is not None else None
        launch_matmul(dy, cast_weight(proj_weight, dtype), dpre, epilogue=EPI_GELU_GRAD, aux_in=pre, aux_out=h,
                       colsum=colsum)
        if dproj_w is not None:
            _weight_grad(dy.t(), h, dproj_w, acc_proj_w)  # (C, M) @ (M, H)
        bias_pairs = [(colsum, dfc_b, acc_fc_b)] if dfc_b is not None else []
        if dfc_w is not None:
            _weight_grad(dpre.t(), x2d, dfc_w, acc_fc_w, bias_pairs)  # (H, M) @ (M, C)
        elif bias_pairs:
            sum_partials(bias_pairs)
        if dproj_b is not None:
            bias_grad_into(dy, dproj_b, acc_proj_b)
        dx = torch.empty((M, C), dtype=dtype, device=x2d.device)
        launch_matmul(dpre, cast_weight(fc_weight, dtype), dx)  # (M, H) @ (H, C)
        return dx


@gelu_mlp_bwd.register_fake
def _(dy, x2d, pre, fc_weight, proj_weight, dfc_w, dfc_b, dproj_w, dproj_b, accumulate):
    return x2d.new_empty(x2d.shape)


@torch.library.custom_op("gpt2_triton::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d (M, K), weight (N, K), bias (N,) or None -> (gelu(pre) (M, N), pre (M, N) or empty (0,)).

    Outputs in x2d's dtype; the weight is read through `cast_weight`, the bias is added in fp32.
    """
    M, N = x2d.shape[0], weight.shape[0]
    dtype = x2d.dtype
    with autocast_disabled(x2d.device.type):
        out = torch.empty((M, N), dtype=dtype, device=x2d.device)
        pre = torch.empty((M, N) if save_pre else (0,), dtype=dtype, device=x2d.device)
        launch_matmul(x2d, cast_weight(weight, dtype).t(), out, bias=bias, epilogue=EPI_GELU,
                       aux_out=pre if save_pre else None)
    return out, pre


@linear_gelu_fwd.register_fake
def _(x2d, weight, bias, save_pre):
    M, N = x2d.shape[0], weight.shape[0]
    return x2d.new_empty((M, N)), x2d.new_empty((M, N) if save_pre else (0,))


@torch.library.custom_op("gpt2_triton::linear_gelu_bwd", mutates_args=("dw", "db"))
def linear_gelu_bwd(dout: torch.Tensor, x2d: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor,
                    dw: Optional[torch.Tensor], db: Optional[torch.Tensor], accumulate: Sequence[bool]) -> torch.Tensor:
    """dout (M, N), x2d (M, K), pre (M, N), weight (N, K) -> dx (M, K) in x2d's dtype; writes dw (N, K) and
    db (N,) (None: not wanted), adding to what they hold where `accumulate` says (fp32-accumulated)."""
    dtype = x2d.dtype
    with autocast_disabled(x2d.device.type):
        dpre = _gelu_bwd(dout.to(dtype), pre)  # (M, N)
        if dw is not None:
            _weight_grad(dpre.t(), x2d, dw, accumulate[0])  # (N, M) @ (M, K)
        if db is not None:
            bias_grad_into(dpre, db, accumulate[1])
        dx = torch.empty(x2d.shape, dtype=dtype, device=x2d.device)
        launch_matmul(dpre, cast_weight(weight, dtype), dx)  # (M, N) @ (N, K)
        return dx


@linear_gelu_bwd.register_fake
def _(dout, x2d, pre, weight, dw, db, accumulate):
    return x2d.new_empty(x2d.shape)


# ----------------------------------------------------------------------------------------------
# Autograd and public ops
# ----------------------------------------------------------------------------------------------
class GeluMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias, save_pre, recompute):
        """recompute: keep only x for backward and compute pre again there (4C fewer values kept per row)."""
        x2d = x.reshape(-1, x.shape[-1])  # (M, C)
        y, pre = gelu_mlp_fwd(x2d, fc_weight, fc_bias, proj_weight, proj_bias, save_pre and not recompute)
        ctx.save_for_backward(x2d, pre, fc_weight, fc_bias, proj_weight)
        ctx.recompute = recompute
        ctx.sinks = GradSinks((fc_weight, fc_bias, proj_weight, proj_bias), ctx.needs_input_grad[1:5])
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, pre, fc_weight, fc_bias, proj_weight = ctx.saved_tensors
        if ctx.recompute:
            pre = gelu_mlp_pre(x2d, fc_weight, fc_bias)  # (M, H)
        buffers = ctx.sinks.buffers(ctx.needs_input_grad[1:5])
        dx = gelu_mlp_bwd(dy.reshape(-1, dy.shape[-1]), x2d, pre, fc_weight, proj_weight,
                          *(b.tensor for b in buffers), tuple(b.accumulate for b in buffers))
        return (dx.view(dy.shape), *(b.returned() for b in buffers), None, None)


class LinearGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, save_pre):
        x2d = x.reshape(-1, x.shape[-1])  # (M, K)
        out, pre = linear_gelu_fwd(x2d, weight, bias, save_pre)
        ctx.save_for_backward(x2d, pre, weight)
        ctx.sinks = GradSinks((weight, bias), ctx.needs_input_grad[1:3])
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2d, pre, weight = ctx.saved_tensors
        dw, db = ctx.sinks.buffers(ctx.needs_input_grad[1:3])
        dx = linear_gelu_bwd(dout.reshape(-1, dout.shape[-1]), x2d, pre, weight, dw.tensor, db.tensor,
                             (dw.accumulate, db.accumulate))
        return dx.view(*dout.shape[:-1], x2d.shape[1]), dw.returned(), db.returned(), None


def _check_params(op, x, params, cast_to):
    """params: (name, tensor or None, expected shape). Raises on bad dtype/shape/device.

    cast_to: the autocast dtype x is about to be cast to, or None (no autocast).
    """
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., C); got a 0-d tensor")
    param_dtypes = set()
    for name, t, shape in params:
        if t is None:
            continue
        check_float(op, name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}; got {tuple(t.shape)}")
        param_dtypes.add(t.dtype)
    if len(param_dtypes) > 1:
        found = ", ".join(f"{n} {t.dtype}" for n, t, _ in params if t is not None)
        raise TypeError(f"{op}: weights and biases must share one dtype; got {found}")
    (param_dtype,) = param_dtypes
    if cast_to is None and param_dtype != x.dtype and param_dtype != torch.float32:
        raise TypeError(f"{op}: parameters must be in x's dtype ({x.dtype}) or float32 (or run under "
                        f"autocast); got {param_dtype}")
    check_device(op, x=x, **{name: t for name, t, _ in params})


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, *, recompute=False):
    """c_proj(gelu_tanh(c_fc(x))): x (..., C), fc_weight (H, C), fc_bias (H,) or None,
    proj_weight (C, H), proj_bias (C,) or None -> (..., C). recompute: backward keeps only x and
    recomputes the (..., H) pre-activation (one more x @ fc_weight.T); same outputs and grads.

    Without autocast the parameters share one dtype, x's or fp32 (with fp16/bf16 x), and the result has
    x's dtype. Under autocast x is cast to the autocast dtype, the parameters (any one float dtype) are
    read as they are, and the result has the autocast dtype. Parameter grads come in the parameters' dtype.
    """
    op = "gelu_mlp"
    check_float(op, "fc_weight", fc_weight)
    if fc_weight.dim() != 2:
        raise ValueError(f"{op}: fc_weight must be 2-D (H, C); got shape {tuple(fc_weight.shape)}")
    H, C = fc_weight.shape
    cast_to = autocast_dtype(x.device.type)
    _check_params(op, x, [("fc_weight", fc_weight, (H, C)), ("fc_bias", fc_bias, (H,)),
                          ("proj_weight", proj_weight, (C, H)), ("proj_bias", proj_bias, (C,))], cast_to)
    if x.shape[-1] != C:
        raise ValueError(f"{op}: x must have shape (..., C) with C = fc_weight.shape[1] = {C}; "
                         f"got {tuple(x.shape)}")
    (x,) = cast_floats(cast_to, x)
    save_pre = _needs_grad(x, fc_weight, fc_bias, proj_weight, proj_bias)
    return GeluMLPFunction.apply(x, fc_weight, fc_bias, proj_weight, proj_bias, save_pre, recompute)


def linear_gelu(x, weight, bias):
    """gelu_tanh(x @ weight.T + bias): x (..., K), weight (N, K), bias (N,) or None -> (..., N).

    Dtypes and autocast as gelu_mlp: x's dtype, or the autocast dtype under autocast.
    """
    op = "linear_gelu"
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (N, K); got shape {tuple(weight.shape)}")
    N, K = weight.shape
    cast_to = autocast_dtype(x.device.type)
    _check_params(op, x, [("weight", weight, (N, K)), ("bias", bias, (N,))], cast_to)
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x must have shape (..., K) with K = weight.shape[1] = {K}; got {tuple(x.shape)}")
    (x,) = cast_floats(cast_to, x)
    save_pre = _needs_grad(x, weight, bias)
    return LinearGeluFunction.apply(x, weight, bias, save_pre)
