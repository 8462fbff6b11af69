"""Fused GELU-MLP: a tiled Triton matmul with bias / tanh-GELU / GELU-gradient epilogues.

gelu_mlp(x) = c_proj(gelu_tanh(c_fc(x))) with nn.Linear weights: fc (H, C), proj (C, H).

One matmul kernel serves every product (forward and backward); what differs is the epilogue:
    EPI_NONE       out = a @ b (+ bias)
    EPI_GELU       pre = a @ b (+ bias); out = gelu(pre); optionally also store pre
    EPI_GELU_GRAD  out = (a @ b) * gelu'(pre), pre loaded; optionally also store gelu(pre)

Dtype rule (autocast): x may be fp16/bf16 while the parameters are fp32 (or all share x's dtype).
Matmuls run in x's dtype (weights are cast once per call, as autocast does), accumulate in fp32,
and the outputs come back in x's dtype; weight and bias grads are written straight from the fp32
accumulator in each parameter's own dtype (so fp32 master weights get fp32-accumulated grads).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels.utils import check_device, check_float, is_interpreter

EPI_NONE, EPI_GELU, EPI_GELU_GRAD = 0, 1, 2

# c_proj and the weight-grad / dx products have no epilogue worth fusing, so cuBLAS (torch.matmul)
# could run them as well or better. We cannot time both on a GPU this session, so the Triton
# kernel is the default; flip this to route those plain products through torch instead.
PLAIN_MATMUL_BACKEND = "triton"  # "triton" | "torch"


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
def _matmul_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, aux_in_ptr, aux_out_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_outm, stride_outn,
    stride_auxm, stride_auxn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) = epilogue(a (M, K) @ b (K, N)). Any strides; masked tails in M, N and K.

    bias (N,) any float dtype; aux_in (M, N) strides stride_aux*: the saved pre-activation (EPI_GELU_GRAD);
    aux_out (M, N) with out's strides: pre (EPI_GELU) or gelu(pre) (EPI_GELU_GRAD) when STORE_AUX.
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)  # int64: row * stride can pass 2^31
    cols = offs_n.to(tl.int64)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    mask_out = mask_m[:, None] & mask_n[None, :]
    out_offs = rows[:, None] * stride_outm + cols[None, :] * stride_outn
    if EPILOGUE == 1:  # EPI_GELU
        if STORE_AUX:
            tl.store(aux_out_ptr + out_offs, acc.to(aux_out_ptr.dtype.element_ty), mask=mask_out)
        acc = _gelu_tanh(acc)
    elif EPILOGUE == 2:  # EPI_GELU_GRAD
        aux_offs = rows[:, None] * stride_auxm + cols[None, :] * stride_auxn
        pre = tl.load(aux_in_ptr + aux_offs, mask=mask_out, other=0.0).to(tl.float32)
        acc = acc * _gelu_tanh_grad(pre)
        if STORE_AUX:
            tl.store(aux_out_ptr + out_offs, _gelu_tanh(pre).to(aux_out_ptr.dtype.element_ty), mask=mask_out)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


def _matmul_configs():
    """One small config under the interpreter; known-good Hopper/Ampere tiles on GPU (autotuned).

    Configs whose shared memory does not fit (e.g. the large tiles with fp32 inputs) are skipped
    by the autotuner.
    """
    if is_interpreter():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 3),
        (64, 256, 32, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 32, 32, 4, 4),
        (64, 32, 32, 2, 5),
        (32, 64, 32, 2, 5),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]


_matmul = triton.autotune(configs=_matmul_configs(), key=["M", "N", "K", "EPILOGUE", "HAS_BIAS"])(_matmul_kernel)


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
# Plain launchers (no autograd). Internal helpers write into outputs they are handed; the
# registered launchers below always allocate fresh outputs and never mutate their inputs.
# ----------------------------------------------------------------------------------------------
def _launch_matmul(a, b, out, bias=None, epilogue=EPI_NONE, aux_in=None, aux_out=None):
    """out (M, N) <- epilogue(a (M, K) @ b (K, N)); a and b share a dtype, any strides."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    assert aux_out is None or aux_out.stride() == out.stride()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    aux_strides = aux_in.stride() if aux_in is not None else (0, 0)
    _matmul[grid](
        a, b, out, bias, aux_in, aux_out,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), aux_strides[0], aux_strides[1],
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, STORE_AUX=aux_out is not None,
        IEEE_FP32=a.dtype == torch.float32,
    )
    return out


def _plain_matmul(a, b, out, bias=None):
    """out <- a @ b (+ bias) with no activation: Triton by default, cuBLAS if PLAIN_MATMUL_BACKEND says so."""
    if PLAIN_MATMUL_BACKEND == "torch":
        res = a @ b if bias is None else torch.addmm(bias.to(a.dtype), a, b)
        return out.copy_(res)
    return _launch_matmul(a, b, out, bias=bias)


def _gelu_bwd(dout, pre):
    """dpre = dout * gelu'(pre); dout, pre (M, N) -> (M, N) in pre's dtype."""
    M, N = pre.shape
    dpre = torch.empty((M, N), dtype=pre.dtype, device=pre.device)
    if M == 0 or N == 0:
        return dpre
    block_n = min(1024, triton.next_power_of_2(N))
    _gelu_bwd_kernel[(M, triton.cdiv(N, block_n))](
        dout, pre, dpre, N,
        dout.stride(0), dout.stride(1), pre.stride(0), pre.stride(1), dpre.stride(0),
        BLOCK_N=block_n,
    )
    return dpre


def _bias_grad(grad, like):
    """Column sums of grad (M, N) in fp32, returned in like's dtype."""
    return grad.sum(0, dtype=torch.float32).to(like.dtype)


@torch.library.custom_op("gpt2_triton::fused_matmul", mutates_args=())
def fused_matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 apply_gelu: bool = False) -> torch.Tensor:
    """a (M, K) @ b (K, N) (+ bias (N,)), then tanh-GELU if apply_gelu -> (M, N) in a's dtype.

    a and b share one float dtype and may have any strides (transposed views need no copy).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fused_matmul: need a (M, K) and b (K, N); got {tuple(a.shape)} and {tuple(b.shape)}")
    if bias is not None and tuple(bias.shape) != (b.shape[1],):
        raise ValueError(f"fused_matmul: bias must have shape ({b.shape[1]},); got {tuple(bias.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"fused_matmul: a and b must share one dtype; got {a.dtype} and {b.dtype}")
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return _launch_matmul(a, b, out, bias=bias, epilogue=EPI_GELU if apply_gelu else EPI_NONE)


@fused_matmul.register_fake
def _(a, b, bias=None, apply_gelu=False):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("gpt2_triton::gelu_mlp_fwd", mutates_args=())
def gelu_mlp_fwd(x2d: torch.Tensor, fc_weight: torch.Tensor, fc_bias: Optional[torch.Tensor],
                 proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor],
                 save_pre: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """x2d (M, C) -> (y (M, C), pre (M, H)), both in x2d's dtype.

    fc_weight (H, C), fc_bias (H,) or None, proj_weight (C, H), proj_bias (C,) or None; parameters
    in x2d's dtype or fp32. pre = x2d @ fc_weight.T + fc_bias is written only when save_pre
    (otherwise pre is an empty (0,) tensor). We save pre alone for backward and recompute
    gelu(pre) there: one (M, 4C) tensor kept per layer instead of two (pre and h).
    """
    M, H, C = x2d.shape[0], fc_weight.shape[0], fc_weight.shape[1]
    dtype = x2d.dtype
    h = torch.empty((M, H), dtype=dtype, device=x2d.device)  # gelu(pre), only lives until c_proj
    pre = torch.empty((M, H) if save_pre else (0,), dtype=dtype, device=x2d.device)
    _launch_matmul(x2d, fc_weight.to(dtype).t(), h, bias=fc_bias, epilogue=EPI_GELU,
                   aux_out=pre if save_pre else None)
    y = torch.empty((M, C), dtype=dtype, device=x2d.device)
    _plain_matmul(h, proj_weight.to(dtype).t(), y, bias=proj_bias)
    return y, pre


@gelu_mlp_fwd.register_fake
def _(x2d, fc_weight, fc_bias, proj_weight, proj_bias, save_pre):
    M, H = x2d.shape[0], fc_weight.shape[0]
    return x2d.new_empty((M, fc_weight.shape[1])), x2d.new_empty((M, H) if save_pre else (0,))


@torch.library.custom_op("gpt2_triton::gelu_mlp_bwd", mutates_args=())
def gelu_mlp_bwd(dy: torch.Tensor, x2d: torch.Tensor, pre: torch.Tensor, fc_weight: torch.Tensor,
                 proj_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    """Grads of gelu_mlp: dy (M, C), x2d (M, C), pre (M, H) from gelu_mlp_fwd, weights as in the fwd.

    Returns dx (M, C) in x2d's dtype; dfc_w (H, C), dfc_b (H,) in fc_weight's dtype;
    dproj_w (C, H), dproj_b (C,) in proj_weight's dtype (fp32-accumulated).
    """
    dtype = x2d.dtype
    dy = dy.to(dtype)
    M, C, H = x2d.shape[0], x2d.shape[1], pre.shape[1]
    # d(pre) = (dy @ W_proj) * gelu'(pre), and h = gelu(pre) recomputed in the same epilogue.
    dpre = torch.empty((M, H), dtype=dtype, device=x2d.device)
    h = torch.empty((M, H), dtype=dtype, device=x2d.device)
    _launch_matmul(dy, proj_weight.to(dtype), dpre, epilogue=EPI_GELU_GRAD, aux_in=pre, aux_out=h)
    dproj_w = torch.empty((C, H), dtype=proj_weight.dtype, device=x2d.device)
    _plain_matmul(dy.t(), h, dproj_w)  # (C, M) @ (M, H)
    dfc_w = torch.empty((H, C), dtype=fc_weight.dtype, device=x2d.device)
    _plain_matmul(dpre.t(), x2d, dfc_w)  # (H, M) @ (M, C)
    dx = torch.empty((M, C), dtype=dtype, device=x2d.device)
    _plain_matmul(dpre, fc_weight.to(dtype), dx)  # (M, H) @ (H, C)
    return dx, dfc_w, _bias_grad(dpre, fc_weight), dproj_w, _bias_grad(dy, proj_weight)


@gelu_mlp_bwd.register_fake
def _(dy, x2d, pre, fc_weight, proj_weight):
    H, C = fc_weight.shape
    return (x2d.new_empty(x2d.shape), fc_weight.new_empty((H, C)), fc_weight.new_empty((H,)),
            proj_weight.new_empty((C, H)), proj_weight.new_empty((C,)))


@torch.library.custom_op("gpt2_triton::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    save_pre: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """x2d (M, K), weight (N, K), bias (N,) or None -> (gelu(pre) (M, N), pre (M, N) or empty (0,)).

    Outputs in x2d's dtype; parameters in x2d's dtype or fp32.
    """
    M, N = x2d.shape[0], weight.shape[0]
    dtype = x2d.dtype
    out = torch.empty((M, N), dtype=dtype, device=x2d.device)
    pre = torch.empty((M, N) if save_pre else (0,), dtype=dtype, device=x2d.device)
    _launch_matmul(x2d, weight.to(dtype).t(), out, bias=bias, epilogue=EPI_GELU,
                   aux_out=pre if save_pre else None)
    return out, pre


@linear_gelu_fwd.register_fake
def _(x2d, weight, bias, save_pre):
    M, N = x2d.shape[0], weight.shape[0]
    return x2d.new_empty((M, N)), x2d.new_empty((M, N) if save_pre else (0,))


@torch.library.custom_op("gpt2_triton::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(dout: torch.Tensor, x2d: torch.Tensor, pre: torch.Tensor,
                    weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (M, N), x2d (M, K), pre (M, N), weight (N, K) -> dx (M, K) in x2d's dtype,
    dw (N, K) and db (N,) in weight's dtype (fp32-accumulated)."""
    dtype = x2d.dtype
    dpre = _gelu_bwd(dout.to(dtype), pre)  # (M, N)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x2d.device)
    _plain_matmul(dpre.t(), x2d, dw)  # (N, M) @ (M, K)
    dx = torch.empty(x2d.shape, dtype=dtype, device=x2d.device)
    _plain_matmul(dpre, weight.to(dtype), dx)  # (M, N) @ (N, K)
    return dx, dw, _bias_grad(dpre, weight)


@linear_gelu_bwd.register_fake
def _(dout, x2d, pre, weight):
    return x2d.new_empty(x2d.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


# ----------------------------------------------------------------------------------------------
# Autograd and public ops
# ----------------------------------------------------------------------------------------------
class GeluMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias, save_pre):
        x2d = x.reshape(-1, x.shape[-1])  # (M, C)
        y, pre = gelu_mlp_fwd(x2d, fc_weight, fc_bias, proj_weight, proj_bias, save_pre)
        ctx.save_for_backward(x2d, pre, fc_weight, proj_weight)
        ctx.has_bias = (fc_bias is not None, proj_bias is not None)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, pre, fc_weight, proj_weight = ctx.saved_tensors
        dx, dfc_w, dfc_b, dproj_w, dproj_b = gelu_mlp_bwd(
            dy.reshape(-1, dy.shape[-1]), x2d, pre, fc_weight, proj_weight)
        return (dx.view(dy.shape), dfc_w, dfc_b if ctx.has_bias[0] else None,
                dproj_w, dproj_b if ctx.has_bias[1] else None, None)


class LinearGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, save_pre):
        x2d = x.reshape(-1, x.shape[-1])  # (M, K)
        out, pre = linear_gelu_fwd(x2d, weight, bias, save_pre)
        ctx.save_for_backward(x2d, pre, weight)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2d, pre, weight = ctx.saved_tensors
        dx, dw, db = linear_gelu_bwd(dout.reshape(-1, dout.shape[-1]), x2d, pre, weight)
        return dx.view(*dout.shape[:-1], x2d.shape[1]), dw, db if ctx.has_bias else None, None


def _check_params(op, x, params):
    """params: (name, tensor or None, expected shape). Raises on bad dtype/shape/device."""
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
    if param_dtype != x.dtype and param_dtype != torch.float32:
        raise TypeError(f"{op}: parameters must be in x's dtype ({x.dtype}) or float32; got {param_dtype}")
    check_device(op, x=x, **{name: t for name, t, _ in params})


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """c_proj(gelu_tanh(c_fc(x))): x (..., C), fc_weight (H, C), fc_bias (H,) or None,
    proj_weight (C, H), proj_bias (C,) or None -> (..., C) in x's dtype.

    Parameters share one dtype: x's, or fp32 with fp16/bf16 x (autocast): see the module docstring.
    """
    op = "gelu_mlp"
    check_float(op, "fc_weight", fc_weight)
    if fc_weight.dim() != 2:
        raise ValueError(f"{op}: fc_weight must be 2-D (H, C); got shape {tuple(fc_weight.shape)}")
    H, C = fc_weight.shape
    _check_params(op, x, [("fc_weight", fc_weight, (H, C)), ("fc_bias", fc_bias, (H,)),
                          ("proj_weight", proj_weight, (C, H)), ("proj_bias", proj_bias, (C,))])
    if x.shape[-1] != C:
        raise ValueError(f"{op}: x must have shape (..., C) with C = fc_weight.shape[1] = {C}; "
                         f"got {tuple(x.shape)}")
    save_pre = _needs_grad(x, fc_weight, fc_bias, proj_weight, proj_bias)
    return GeluMLPFunction.apply(x, fc_weight, fc_bias, proj_weight, proj_bias, save_pre)


def linear_gelu(x, weight, bias):
    """gelu_tanh(x @ weight.T + bias): x (..., K), weight (N, K), bias (N,) or None -> (..., N) in x's dtype."""
    op = "linear_gelu"
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (N, K); got shape {tuple(weight.shape)}")
    N, K = weight.shape
    _check_params(op, x, [("weight", weight, (N, K)), ("bias", bias, (N,))])
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x must have shape (..., K) with K = weight.shape[1] = {K}; got {tuple(x.shape)}")
    save_pre = _needs_grad(x, weight, bias)
    return LinearGeluFunction.apply(x, weight, bias, save_pre)
