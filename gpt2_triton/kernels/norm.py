"""Fused LayerNorm: one program per row forward, one-pass dx backward, deterministic dweight/dbias;
`add_layer_norm` also does the residual add before it (forward) and the residual gradient's add (backward).

x (..., N) in fp32/fp16/bf16; weight/bias (N,) may have another float dtype (e.g. fp32 master weights
with bf16 activations under autocast). Statistics and arithmetic are fp32. The output has x's dtype, or
fp32 under CUDA autocast (as F.layer_norm, on that autocast's fp32 list), or `out_dtype` when given: the
dtype the consumer wants, written in the same pass (e.g. bf16 for the matmul after it, from an fp32
residual).
The backward takes dy in the output's dtype and returns dx in x's dtype. Weight and bias grads (and
add_layer_norm's branch-bias grad, the sum of the rows' dx) are per-program fp32 partials summed into the
parameters' `.grad` (grads.py).
"""
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.grads import GradSinks, sum_partials
from gpt2_triton.kernels.utils import (
    FLOAT_DTYPES,
    autocast_disabled,
    autocast_dtype,
    check_device,
    check_float,
    device_guard,
    is_interpreter,
    row_major,
    sm_count,
)

MAX_FEAT_DIM = 16384  # one row lives in registers: BLOCK_N = next_power_of_2(N) <= MAX_FEAT_DIM


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (M, N)
    branch_ptr,  # (M, N), added to x first when HAS_BRANCH
    branch_bias_ptr,  # (N,), added with the branch when HAS_BRANCH_BIAS
    residual_ptr,  # (M, N): x + branch (+ branch_bias), written when HAS_BRANCH
    weight_ptr,  # (N,)
    bias_ptr,  # (N,) or dummy when HAS_BIAS is False
    y_ptr,  # (M, N)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    stride_xm, stride_bm, stride_rm, stride_ym,
    feat_dim, eps,
    HAS_BIAS: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BRANCH_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < feat_dim
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:  # the residual add: in fp32, in the order (x + branch) + branch_bias
        x += tl.load(branch_ptr + row * stride_bm + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BRANCH_BIAS:
            x += tl.load(branch_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(residual_ptr.dtype.element_ty)  # normalise what is stored (rounded, for bf16 x)
        tl.store(residual_ptr + row * stride_rm + cols, x, mask=mask)
        x = x.to(tl.float32)
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
    x_ptr,  # (M, N): the normalised input (x + branch (+ bias) of the forward)
    weight_ptr,  # (N,)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dresidual_ptr,  # (M, N): grad of the forward's residual output, added to dx when HAS_DRESIDUAL
    dx_ptr,  # (M, N)
    dbranch_ptr,  # (M, N): dx again, in the branch's dtype, when HAS_DBRANCH
    partial_ptr,  # (NUM_PARTIALS, num_programs, N) fp32: per-program sums of dy * x_hat, dy, (dx)
    stride_dym, stride_xm, stride_drm, stride_dxm, stride_dbm,
    num_rows, feat_dim, rows_per_program,
    HAS_DRESIDUAL: tl.constexpr, HAS_DBRANCH: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per row: dx = rstd * (w * dy - (x_hat * mean(x_hat * w * dy) + mean(w * dy))) (+ dresidual). Per
    program, over its rows: the partial sums of dy * x_hat (weight grad), dy (bias grad) and, with 3
    partials, dx (the grad of the branch's bias, which the forward added)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < feat_dim
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dweight_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbranch_bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    # Row pointers advance by the stride (64-bit pointer math: row * stride never overflows int32).
    x_row_ptr = x_ptr + row_start.to(tl.int64) * stride_xm
    dy_row_ptr = dy_ptr + row_start.to(tl.int64) * stride_dym
    dx_row_ptr = dx_ptr + row_start.to(tl.int64) * stride_dxm
    if HAS_DRESIDUAL:
        dresidual_ptr += row_start.to(tl.int64) * stride_drm
    if HAS_DBRANCH:
        dbranch_ptr += row_start.to(tl.int64) * stride_dbm
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
        if HAS_DRESIDUAL:
            dx += tl.load(dresidual_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            dresidual_ptr += stride_drm
        tl.store(dx_row_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DBRANCH:
            tl.store(dbranch_ptr + cols, dx.to(dbranch_ptr.dtype.element_ty), mask=mask)
            dbranch_ptr += stride_dbm
        dweight_acc += dy * x_hat
        dbias_acc += dy
        if NUM_PARTIALS == 3:
            dbranch_bias_acc += dx
        x_row_ptr += stride_xm
        dy_row_ptr += stride_dym
        dx_row_ptr += stride_dxm
    partial_offset = pid.to(tl.int64) * feat_dim + cols
    partial_stride = tl.num_programs(0).to(tl.int64) * feat_dim
    tl.store(partial_ptr + partial_offset, dweight_acc, mask=mask)
    tl.store(partial_ptr + partial_stride + partial_offset, dbias_acc, mask=mask)
    if NUM_PARTIALS == 3:
        tl.store(partial_ptr + 2 * partial_stride + partial_offset, dbranch_bias_acc, mask=mask)


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


@torch.library.custom_op("gpt2_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None, branch: Optional[torch.Tensor] = None,
    branch_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, N), weight/bias (N,) -> y (M, N) in out_dtype (default x's dtype), mean (M,) fp32, rstd (M,)
    fp32, residual. With branch (M, N) (and branch_bias (N,)) the rows normalised are residual = x +
    branch (+ branch_bias), summed in fp32 and written in x's dtype; otherwise x itself (residual is an
    empty (0,) tensor)."""
    with autocast_disabled(x.device.type):
        x = row_major(x)
        branch = row_major(branch) if branch is not None else None
        num_rows, feat_dim = x.shape
        y = torch.empty((num_rows, feat_dim), dtype=out_dtype or x.dtype, device=x.device)
        mean = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
        rstd = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
        residual = torch.empty((num_rows, feat_dim) if branch is not None else (0,), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return y, mean, rstd, residual
    block_n, num_warps = _fwd_config(feat_dim)
    with device_guard(x.device):
        _layer_norm_fwd_kernel[(num_rows,)](
            x, branch, branch_bias, residual if branch is not None else None,
            weight.contiguous(), bias.contiguous() if bias is not None else None, y, mean, rstd,
            x.stride(0), branch.stride(0) if branch is not None else 0,
            residual.stride(0) if branch is not None else 0, y.stride(0), feat_dim, eps,
            HAS_BIAS=bias is not None, HAS_BRANCH=branch is not None, HAS_BRANCH_BIAS=branch_bias is not None,
            BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd, residual


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype=None, branch=None, branch_bias=None):
    num_rows, feat_dim = x.shape
    return (x.new_empty((num_rows, feat_dim), dtype=out_dtype or x.dtype),
            x.new_empty((num_rows,), dtype=torch.float32),
            x.new_empty((num_rows,), dtype=torch.float32),
            x.new_empty((num_rows, feat_dim) if branch is not None else (0,)))


@torch.library.custom_op("gpt2_triton::layer_norm_bwd", mutates_args=("dweight", "dbias", "dbranch_bias"))
def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    dweight: Optional[torch.Tensor], dbias: Optional[torch.Tensor], accumulate: Sequence[bool],
    dresidual: Optional[torch.Tensor] = None, branch_dtype: Optional[torch.dtype] = None,
    dbranch_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, N) any float dtype, x (M, N) the rows the forward normalised, weight (N,), mean/rstd (M,) fp32.
    Returns dx (M, N) in x's dtype (plus dresidual (M, N), the grad of the forward's residual output, when
    given) and, with branch_dtype, dx again in that dtype (else an empty (0,) tensor). Writes the weight
    grads into dweight, dbias (None: not wanted) and dbranch_bias (the sum of dx over rows: the grad of the
    bias the forward added with the branch; None: not wanted), each (N,), adding to what they hold where
    `accumulate` (one flag each, in that order) says so. Sums of fixed per-program fp32 partials:
    bit-reproducible."""
    with autocast_disabled(x.device.type):
        dy, x = row_major(dy), row_major(x)
        dresidual = row_major(dresidual) if dresidual is not None else None
        num_rows, feat_dim = x.shape
        dx = torch.empty((num_rows, feat_dim), dtype=x.dtype, device=x.device)
        dbranch = torch.empty((num_rows, feat_dim) if branch_dtype is not None else (0,),
                              dtype=branch_dtype or x.dtype, device=x.device)
        num_programs = _bwd_num_programs(num_rows, x.device)
        num_partials = 3 if dbranch_bias is not None else 2
        # Every program writes its whole rows of partials (zeros when it gets no rows): no memset needed.
        partials = torch.empty((num_partials, num_programs, feat_dim), dtype=torch.float32, device=x.device)
    if num_rows > 0:
        block_n, num_warps = _fwd_config(feat_dim)
        with device_guard(x.device):
            _layer_norm_bwd_kernel[(num_programs,)](
                dy, x, weight.contiguous(), mean, rstd, dresidual, dx, dbranch if branch_dtype is not None else None,
                partials, dy.stride(0), x.stride(0), dresidual.stride(0) if dresidual is not None else 0,
                dx.stride(0), dbranch.stride(0) if branch_dtype is not None else 0,
                num_rows, feat_dim, triton.cdiv(num_rows, num_programs),
                HAS_DRESIDUAL=dresidual is not None, HAS_DBRANCH=branch_dtype is not None,
                NUM_PARTIALS=num_partials, BLOCK_N=block_n, num_warps=num_warps)
    else:
        partials.zero_()
    pairs = [(partials[i], out, acc) for i, (out, acc) in enumerate(zip((dweight, dbias, dbranch_bias), accumulate))
             if out is not None]
    sum_partials(pairs)
    return dx, dbranch


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dweight, dbias, accumulate, dresidual=None, branch_dtype=None, dbranch_bias=None):
    num_rows, feat_dim = x.shape
    return (x.new_empty((num_rows, feat_dim)),
            x.new_empty((num_rows, feat_dim) if branch_dtype is not None else (0,), dtype=branch_dtype or x.dtype))


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x); with_residual: (residual, y) = (x + branch (+ branch_bias), layer_norm(residual)), or
    (x, layer_norm(x)) without a branch (x itself returned: its two uses' grads are added in the backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, branch, branch_bias, with_residual):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])  # (M, N)
        branch2d = branch.reshape(x2d.shape) if branch is not None else None
        y, mean, rstd, residual = layer_norm_fwd(x2d, weight, bias, eps, out_dtype, branch2d, branch_bias)
        ctx.save_for_backward(residual if branch is not None else x2d, weight, mean, rstd)
        ctx.sinks = GradSinks((weight, bias, branch_bias), [ctx.needs_input_grad[i] for i in (1, 2, 6)])
        ctx.branch_dtype = branch.dtype if branch is not None else None
        ctx.with_residual = with_residual
        ctx.set_materialize_grads(False)
        if not with_residual:
            return y.view(shape)
        return (residual.view(shape) if branch is not None else x), y.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        x2d, weight, mean, rstd = ctx.saved_tensors
        dresidual, dy = grads if ctx.with_residual else (None, grads[0])
        shape = (dy if dy is not None else dresidual).shape
        dy = torch.zeros_like(x2d) if dy is None else dy.reshape(x2d.shape)
        needs = ctx.needs_input_grad
        dw, db, dbb = ctx.sinks.buffers((needs[1], needs[2], needs[6]))
        dx, dbranch = layer_norm_bwd(
            dy, x2d, weight, mean, rstd, dw.tensor, db.tensor, (dw.accumulate, db.accumulate, dbb.accumulate),
            dresidual.reshape(x2d.shape) if dresidual is not None else None,
            ctx.branch_dtype if needs[5] else None, dbb.tensor)
        return (dx.view(shape), dw.returned(), db.returned(), None, None,
                dbranch.view(shape) if needs[5] else None, dbb.returned(), None)


def _check(op, x, weight, bias, out_dtype, **others):
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    for name, t in (("bias", bias), *others.items()):
        if t is not None:
            check_float(op, name, t)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be torch.float32, float16 or bfloat16 (or None); got {out_dtype}")
    check_device(op, x=x, weight=weight, bias=bias, **others)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim (..., N); got a 0-dim tensor")
    feat_dim = x.shape[-1]
    if feat_dim == 0 or feat_dim > MAX_FEAT_DIM:
        raise ValueError(f"{op}: feature dim N must be in [1, {MAX_FEAT_DIM}]; got N={feat_dim}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (feat_dim,):
            raise ValueError(f"{op}: {name} must have shape (N,) = ({feat_dim},); got {tuple(t.shape)}")
    if out_dtype is None and x.device.type == "cuda" and autocast_dtype("cuda") is not None:
        out_dtype = torch.float32  # CUDA autocast runs F.layer_norm in fp32 (CPU autocast leaves it alone)
    return out_dtype


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None):
    """LayerNorm over the last dim: x (..., N), weight/bias (N,) (bias may be None) -> (..., N).

    Computes in fp32. Returns out_dtype when given; otherwise the dtype F.layer_norm returns: fp32 under
    CUDA autocast (its fp32 list), x's dtype elsewhere (CPU autocast leaves layer_norm alone).
    dx comes back in x's dtype, dweight/dbias in the parameters' dtypes.
    """
    out_dtype = _check("layer_norm", x, weight, bias, out_dtype)
    return LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype, None, None, False)


def add_layer_norm(x: torch.Tensor, branch: Optional[torch.Tensor], branch_bias: Optional[torch.Tensor],
                   weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None):
    """A residual add and the LayerNorm after it in one pass: returns (residual, layer_norm(residual)) with
    residual = x + branch (+ branch_bias), as a Pre-LN block's `x = x + f(x); h = ln(x)`. Without a branch
    (the first block's ln_1) residual is x itself, and the backward adds the gradient of its other use.

    x (..., N) (the residual stream, e.g. fp32), branch (..., N) (any float dtype, e.g. a bf16 projection
    output), branch_bias (N,) or None (the projection's bias, added here instead of in the projection),
    weight/bias (N,). The sum is taken in fp32 in the order (x + branch) + branch_bias and returned in x's
    dtype; the normalised output as `layer_norm`'s (out_dtype). The backward adds the residual output's
    gradient to the LayerNorm's and writes it in x's dtype and the branch's (one pass), with the grads of
    weight, bias and branch_bias.
    """
    op = "add_layer_norm"
    out_dtype = _check(op, x, weight, bias, out_dtype, branch=branch, branch_bias=branch_bias)
    if branch is None and branch_bias is not None:
        raise ValueError(f"{op}: branch_bias needs a branch")
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"{op}: branch must have x's shape {tuple(x.shape)}; got {tuple(branch.shape)}")
    if branch_bias is not None and branch_bias.shape != (x.shape[-1],):
        raise ValueError(f"{op}: branch_bias must have shape (N,) = ({x.shape[-1]},); got {tuple(branch_bias.shape)}")
    return LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype, branch, branch_bias, True)
