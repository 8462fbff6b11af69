"""Fused GELU-MLP vs cuBLAS (F.linear) + F.gelu eager and torch.compile; the Triton matmul vs cuBLAS."""
import torch
import torch.nn.functional as F

from bench.common import has_cuda, kernel_providers, matmul_flops, measure, run_modes
from kernels import reference
from kernels.mlp import fused_matmul, gelu_mlp, linear_gelu

MODES = ("fwd", "bwd", "fwd+bwd")


def eager_mlp(x, fc_w, fc_b, proj_w, proj_b):
    return reference.gelu_mlp(x, fc_w, fc_b, proj_w, proj_b, upcast=False)


def eager_linear_gelu(x, w, b):
    return F.gelu(torch.addmm(b, x, w.t()), approximate="tanh")


def shapes(quick):
    return [(48, 32, 128), (37, 40, 200)] if quick else [(16384, 768, 3072), (4096, 768, 3072), (16384, 1024, 4096)]


def run(dtype, quick=False, sizes=None):
    """sizes: (M, C, hidden) list to run instead of shapes(quick)."""
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    device = "cuda" if has_cuda() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def param(*shape, scale=0.02):
        return (scale * torch.randn(*shape, device=device, generator=gen)).to(dtype).requires_grad_()

    for M, C, Hd in sizes or shapes(quick):
        x = torch.randn(M, C, device=device, dtype=dtype, generator=gen).requires_grad_()
        fc_w, fc_b, proj_w, proj_b = param(Hd, C), param(Hd), param(C, Hd), param(C)
        shape = {"M": M, "C": C, "hidden": Hd}
        mlp_flops = 2 * matmul_flops(M, Hd, C)
        flops = {"fwd": mlp_flops, "bwd": 2 * mlp_flops, "fwd+bwd": 3 * mlp_flops}
        params = [x, fc_w, fc_b, proj_w, proj_b]
        for name, fn in kernel_providers(gelu_mlp, eager_mlp).items():
            for mode, call in run_modes(lambda fn=fn: fn(*params), params, MODES).items():
                rows.append(measure("gelu_mlp", f"gelu_mlp M{M}-C{C}-H{Hd}", name, mode, call, shape,
                                    dtype_name, flops=flops[mode], grad_to_none=params, quick=quick))
        lg_flops = {"fwd": matmul_flops(M, Hd, C), "bwd": 2 * matmul_flops(M, Hd, C),
                    "fwd+bwd": 3 * matmul_flops(M, Hd, C)}
        for name, fn in kernel_providers(linear_gelu, eager_linear_gelu).items():
            for mode, call in run_modes(lambda fn=fn: fn(x, fc_w, fc_b), [x, fc_w, fc_b], MODES).items():
                rows.append(measure("gelu_mlp", f"linear_gelu M{M}-C{C}-H{Hd}", name, mode, call, shape,
                                    dtype_name, flops=lg_flops[mode], grad_to_none=[x, fc_w, fc_b], quick=quick))
        # the plain matmul alone (c_fc shape), ours vs cuBLAS
        a, b = x.detach(), fc_w.detach().t()
        case = f"matmul M{M}-K{C}-N{Hd}"
        for name, fn in {"triton": lambda: fused_matmul(a, b), "cublas": lambda: a @ b}.items():
            rows.append(measure("gelu_mlp", case, name, "fwd", fn, {"M": M, "K": C, "N": Hd}, dtype_name,
                                flops=matmul_flops(M, Hd, C), quick=quick))
    return rows
