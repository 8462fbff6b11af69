"""Fused LayerNorm: one program per row forward, one-pass dx backward, deterministic dweight/dbias.

x (..., N) in fp32/fp16/bf16; weight/bias (N,) may have another float dtype (e.g. fp32 master weights
with bf16 activations under autocast). Statistics and arithmetic are fp32. The output has x's dtype, or
fp32 under CUDA autocast (as F.layer_norm, on that autocast's fp32 list), or `out_dtype` when given: the
dtype the consumer wants, written in the same pass (e.g. bf16 for the matmul after it, from an fp32
residual).
The backward takes dy in the output's dtype and returns dx in x's dtype.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.utils import (
    FLOAT_DTYPES,
    autocast_disabled,
    autocast_dtype,
    check_device,
    check_float,
    device_guard,
    is_interpreter,
    sm_count,
)

MAX_FEAT_DIM = 16384  # one row lives in registers: BLOCK_N = next_power_of_2(N) <= MAX_FEAT_DIM


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (M, N)
    weight_ptr,  # (N,)
    bias_ptr,  # (N,) or dummy when HAS_BIAS is False
    y_ptr,  # (M, N)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    stride_xm, stride_ym,
    feat_dim, eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < feat_dim
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / feat_dim
    x_centered = tl.where(mask, x - mean, 0.0)  # padded lanes stay out of the variance
    var = tl.sum(x_centered * x_centered, axis=0) / feat_dim
    # An overflowed variance (|x| beyond ~1e19) gives NaN, not the zeros 1 / sqrt(inf) would make.
    rstd = tl.where(var == float("inf"), float("nan"), 1.0 / tl.sqrt(var + eps))
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x_centered * rstd * weight
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # (M, N)
    x_ptr,  # (M, N)
    weight_ptr,  # (N,)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, N)
    dweight_partial_ptr,  # (num_programs, N) fp32
    dbias_partial_ptr,  # (num_programs, N) fp32
    stride_dym, stride_xm, stride_dxm,
    num_rows, feat_dim, rows_per_program,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < feat_dim
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    # Row pointers advance by the stride (64-bit pointer math: row * stride never overflows int32).
    x_row_ptr = x_ptr + row_start.to(tl.int64) * stride_xm
    dy_row_ptr = dy_ptr + row_start.to(tl.int64) * stride_dym
    dx_row_ptr = dx_ptr + row_start.to(tl.int64) * stride_dxm
    for row in range(row_start, row_end):
        x = tl.load(x_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        w_dy = weight * dy  # zero on padded lanes
        c1 = tl.sum(x_hat * w_dy, axis=0) / feat_dim
        c2 = tl.sum(w_dy, axis=0) / feat_dim
        dx = (w_dy - (x_hat * c1 + c2)) * rstd
        tl.store(dx_row_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dweight_acc += dy * x_hat
        dbias_acc += dy
        x_row_ptr += stride_xm
        dy_row_ptr += stride_dym
        dx_row_ptr += stride_dxm
    partial_offset = pid.to(tl.int64) * feat_dim + cols
    tl.store(dweight_partial_ptr + partial_offset, dweight_acc, mask=mask)
    tl.store(dbias_partial_ptr + partial_offset, dbias_acc, mask=mask)


def _fwd_config(feat_dim: int):
    """(BLOCK_N, num_warps) for one row of feat_dim features."""
    block_n = triton.next_power_of_2(feat_dim)
    if is_interpreter():
        return block_n, 1
    return block_n, min(max(block_n // 256, 1), 16)


def _bwd_num_programs(num_rows: int, device: torch.device) -> int:
    """Programs for the backward; fixed by (num_rows, device) so the dweight/dbias sums are reproducible."""
    num_sms = None if is_interpreter() else sm_count(device)
    return max(min(num_rows, 4 * num_sms if num_sms else 4), 1)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("gpt2_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, N), weight/bias (N,) -> y (M, N) in out_dtype (default x's dtype), mean (M,) fp32, rstd (M,) fp32."""
    with autocast_disabled(x.device.type):
        x = _row_major(x)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        num_rows, feat_dim = x.shape
        y = torch.empty((num_rows, feat_dim), dtype=out_dtype or x.dtype, device=x.device)
        mean = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
        rstd = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return y, mean, rstd
    block_n, num_warps = _fwd_config(feat_dim)
    with device_guard(x.device):
        _layer_norm_fwd_kernel[(num_rows,)](
            x, weight, bias if bias is not None else weight, y, mean, rstd,
            x.stride(0), y.stride(0), feat_dim, eps,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    num_rows, feat_dim = x.shape
    return (x.new_empty((num_rows, feat_dim), dtype=out_dtype or x.dtype),
            x.new_empty((num_rows,), dtype=torch.float32),
            x.new_empty((num_rows,), dtype=torch.float32))


@torch.library.custom_op("gpt2_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (M, N) any float dtype, x (M, N), weight (N,), mean/rstd (M,) fp32 -> dx (M, N) in x's dtype,
    dweight (N,) and dbias (N,) in weight's dtype. dweight/dbias are sums of fixed per-program fp32
    partials: bit-reproducible."""
    with autocast_disabled(x.device.type):
        dy, x = _row_major(dy), _row_major(x)
        weight = weight.contiguous()
        num_rows, feat_dim = x.shape
        dx = torch.empty((num_rows, feat_dim), dtype=x.dtype, device=x.device)
        num_programs = _bwd_num_programs(num_rows, x.device)
        # Every program writes its whole row of partials (zeros when it gets no rows): no memset needed.
        dweight_partial = torch.empty((num_programs, feat_dim), dtype=torch.float32, device=x.device)
        dbias_partial = torch.empty((num_programs, feat_dim), dtype=torch.float32, device=x.device)
        if num_rows > 0:
            rows_per_program = triton.cdiv(num_rows, num_programs)
            block_n, num_warps = _fwd_config(feat_dim)
            with device_guard(x.device):
                _layer_norm_bwd_kernel[(num_programs,)](
                    dy, x, weight, mean, rstd, dx, dweight_partial, dbias_partial,
                    dy.stride(0), x.stride(0), dx.stride(0),
                    num_rows, feat_dim, rows_per_program,
                    BLOCK_N=block_n, num_warps=num_warps)
        else:
            dweight_partial.zero_()
            dbias_partial.zero_()
        dweight = dweight_partial.sum(0).to(weight.dtype)
        dbias = dbias_partial.sum(0).to(weight.dtype)
    return dx, dweight, dbias


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd):
    num_rows, feat_dim = x.shape
    return (x.new_empty((num_rows, feat_dim)),
            weight.new_empty((feat_dim,)),
            weight.new_empty((feat_dim,)))


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])  # (M, N)
        y, mean, rstd = layer_norm_fwd(x2d, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = layer_norm_bwd(dy.reshape(x2d.shape), x2d, weight, mean, rstd)
        dbias = dbias.to(ctx.bias_dtype) if ctx.has_bias else None
        return dx.view(dy.shape), dweight, dbias, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None):
    """LayerNorm over the last dim: x (..., N), weight/bias (N,) (bias may be None) -> (..., N).

    Computes in fp32. Returns out_dtype when given; otherwise the dtype F.layer_norm returns: fp32 under
    CUDA autocast (its fp32 list), x's dtype elsewhere (CPU autocast leaves layer_norm alone).
    dx comes back in x's dtype, dweight/dbias in the parameters' dtypes.
    """
    op = "layer_norm"
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if bias is not None:
        check_float(op, "bias", bias)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be torch.float32, float16 or bfloat16 (or None); got {out_dtype}")
    check_device(op, x=x, weight=weight, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim (..., N); got a 0-dim tensor")
    feat_dim = x.shape[-1]
    if feat_dim == 0 or feat_dim > MAX_FEAT_DIM:
        raise ValueError(f"{op}: feature dim N must be in [1, {MAX_FEAT_DIM}]; got N={feat_dim}")
    if weight.shape != (feat_dim,):
        raise ValueError(f"{op}: weight must have shape (N,) = ({feat_dim},); got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (feat_dim,):
        raise ValueError(f"{op}: bias must have shape (N,) = ({feat_dim},); got {tuple(bias.shape)}")
    if out_dtype is None and x.device.type == "cuda" and autocast_dtype("cuda") is not None:
        out_dtype = torch.float32  # CUDA autocast runs F.layer_norm in fp32 (CPU autocast leaves it alone)
    return LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype)
