"""The attention projections (c_attn, c_proj): the vendor's matmul (cuBLAS) with the glue around it fused.

linear(x, weight, bias) = x @ weight.T + bias, as F.linear under autocast: activations and the product in
the autocast dtype (or x's), with
- the weight and bias read through `cast_weight`: fp32 master weights cast once per optimizer step, not
  once per micro-step and again in the backward;
- the weight gradient summed by the matmul itself into the fp32 `.grad` (`grads.matmul_into`: addmm with
  an fp32 output and beta=1), never rounded to bf16 and never added in a pass of its own;
- the bias gradient, the column sums of dy, summed in fp32 into `.grad`.
No Triton kernel here: the products are cuBLAS's (the GELU-MLP's matmuls are ours, mlp.py).
"""
from collections.abc import Sequence
from typing import Optional

import torch

from gpt2_triton.kernels.grads import GradSinks, bias_grad_into, matmul_into
from gpt2_triton.kernels.utils import (
    autocast_disabled,
    autocast_dtype,
    cast_floats,
    cast_weight,
    check_float,
)


@torch.library.custom_op("gpt2_triton::linear_fwd", mutates_args=())
def linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2d (M, K), weight (N, K), bias (N,) or None -> (M, N) in x2d's dtype; weight and bias read in that
    dtype through cast_weight."""
    dtype = x2d.dtype
    with autocast_disabled(x2d.device.type):
        w = cast_weight(weight, dtype)
        if bias is None:
            return torch.mm(x2d, w.t())
        return torch.addmm(cast_weight(bias, dtype), x2d, w.t())


@linear_fwd.register_fake
def _(x2d, weight, bias):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


@torch.library.custom_op("gpt2_triton::linear_bwd", mutates_args=("dweight", "dbias"))
def linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, dweight: Optional[torch.Tensor],
               dbias: Optional[torch.Tensor], accumulate: Sequence[bool], need_dx: bool) -> torch.Tensor:
    """dy (M, N), x2d (M, K), weight (N, K) -> dx (M, K) in x2d's dtype (an empty (0,) tensor unless need_dx);
    writes dweight (N, K) and dbias (N,) (None: not wanted), adding to what they hold where `accumulate`
    says so, summed in their dtype (fp32 for fp32 parameters) by the matmul itself."""
    dtype = x2d.dtype
    with autocast_disabled(x2d.device.type):
        dy = dy.to(dtype)
        if dweight is not None:
            matmul_into(dweight, dy.t(), x2d, accumulate[0])  # (N, M) @ (M, K)
        if dbias is not None:
            bias_grad_into(dy, dbias, accumulate[1])
        return torch.mm(dy, cast_weight(weight, dtype)) if need_dx else x2d.new_empty((0,))


@linear_bwd.register_fake
def _(dy, x2d, weight, dweight, dbias, accumulate, need_dx):
    return x2d.new_empty(x2d.shape if need_dx else (0,))


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2d = x.reshape(-1, x.shape[-1])  # (M, K)
        out = linear_fwd(x2d, weight, bias)
        ctx.save_for_backward(x2d, weight)
        ctx.sinks = GradSinks((weight, bias), ctx.needs_input_grad[1:3])
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight = ctx.saved_tensors
        dw, db = ctx.sinks.buffers(ctx.needs_input_grad[1:3])
        dx = linear_bwd(dy.reshape(-1, dy.shape[-1]), x2d, weight, dw.tensor, db.tensor,
                        (dw.accumulate, db.accumulate), ctx.needs_input_grad[0])
        return (dx.view(*dy.shape[:-1], x2d.shape[1]) if ctx.needs_input_grad[0] else None, dw.returned(),
                db.returned())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias: x (..., K), weight (N, K), bias (N,) or None -> (..., N), as F.linear.

    Under autocast x is cast to the autocast dtype and the parameters are read in it (cast once per version
    of their values); otherwise weight and bias have x's dtype. The result has that dtype; the parameter
    grads come in their own dtype, summed in it by the matmul (fp32 for fp32 master weights)."""
    op = "linear"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(op, name, t)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x must be (..., K) and weight (N, K); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape (N,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on the same device; got {sorted(map(str, devices))}")
    cast_to = autocast_dtype(x.device.type)
    (x,) = cast_floats(cast_to, x)
    if cast_to is None and any(t is not None and t.dtype != x.dtype for t in (weight, bias)):
        raise TypeError(f"{op}: weight and bias must have x's dtype ({x.dtype}) outside autocast; got weight "
                        f"{weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))
    return LinearFunction.apply(x, weight, bias)
