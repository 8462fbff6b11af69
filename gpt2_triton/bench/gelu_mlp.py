"""Fused GELU-MLP vs cuBLAS (F.linear) + F.gelu eager and torch.compile; linear_gelu alone; and each
epilogue-free product of the MLP alone (our matmul launcher vs the vendor's: `matmul_provider`, cublas on
CUDA, the CPU's BLAS on a CPU)."""
import torch
import torch.nn.functional as F

from gpt2_triton.bench.common import (
    Reference,
    has_cuda,
    kernel_providers,
    matmul_flops,
    matmul_provider,
    measure,
    run_modes,
)
from gpt2_triton.kernels import mlp, reference
from gpt2_triton.kernels.mlp import gelu_mlp, linear_gelu

MODES = ("fwd", "bwd", "fwd+bwd")


def eager_mlp(x, fc_w, fc_b, proj_w, proj_b):
    return reference.gelu_mlp(x, fc_w, fc_b, proj_w, proj_b, upcast=False)


def eager_linear_gelu(x, w, b):
    return F.gelu(torch.addmm(b, x, w.t()), approximate="tanh")


def shapes(quick):
    """(M, C, hidden): GPT-2 124M at B*T = 16,384 and 4,096 tokens, then medium, large and XL at 16,384."""
    if quick:
        return [(48, 32, 128), (37, 40, 200)]
    return [(16384, 768, 3072), (4096, 768, 3072)] + [(16384, C, 4 * C) for C in (1024, 1280, 1600)]


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
        ref = Reference(reference.gelu_mlp, params)
        for name, fn in kernel_providers(gelu_mlp, eager_mlp, quick).items():
            errors = ref.errors(lambda fn=fn: fn(*params), params)
            for mode, call in run_modes(lambda fn=fn: fn(*params), params, MODES).items():
                rows.append(measure("gelu_mlp", f"gelu_mlp M{M}-C{C}-H{Hd}", name, mode, call, shape,
                                    dtype_name, flops=flops[mode], grad_to_none=params, quick=quick,
                                    max_err=errors))
        lg_flops = {"fwd": matmul_flops(M, Hd, C), "bwd": 2 * matmul_flops(M, Hd, C),
                    "fwd+bwd": 3 * matmul_flops(M, Hd, C)}
        ref = Reference(reference.linear_gelu, [x, fc_w, fc_b])
        for name, fn in kernel_providers(linear_gelu, eager_linear_gelu, quick).items():
            errors = ref.errors(lambda fn=fn: fn(x, fc_w, fc_b), [x, fc_w, fc_b])
            for mode, call in run_modes(lambda fn=fn: fn(x, fc_w, fc_b), [x, fc_w, fc_b], MODES).items():
                rows.append(measure("gelu_mlp", f"linear_gelu M{M}-C{C}-H{Hd}", name, mode, call, shape,
                                    dtype_name, flops=lg_flops[mode], grad_to_none=[x, fc_w, fc_b], quick=quick,
                                    max_err=errors))
        # The products alone, ours vs the vendor's (cuBLAS): c_fc's matmul (no epilogue), c_proj / dx (M x C,
        # K = H) and the weight grads (K = M): ours with the split-K the launcher picks on this device, without
        # split-K, and the vendor's (its bf16 result cast to the fp32 grad).
        a, b = x.detach(), fc_w.detach().t()
        h = torch.randn(M, Hd, device=device, dtype=dtype, generator=gen)
        dpre = torch.randn(M, Hd, device=device, dtype=dtype, generator=gen)
        w_grad = torch.empty(Hd, C, device=device, dtype=torch.float32)
        split = mlp.split_k_for(Hd, C, M, mlp.sm_count(a.device) or 1, mlp.matmul_tiles(dtype)[0][:2])
        fc_out, proj_out = torch.empty_like(h), torch.empty_like(a)
        vendor = matmul_provider()
        # each provider: (the timed call, what it computed: the output buffer it wrote or the product it returned)
        pw = proj_w.detach().t()
        products = [
            (f"matmul M{M}-K{C}-N{Hd}", (M, Hd, C), (a, b), {
                "triton": (lambda: mlp.launch_matmul(a, b, fc_out), lambda _: fc_out), vendor: (lambda: a @ b, None)}),
            (f"c_proj M{M}-K{Hd}-N{C}", (M, C, Hd), (h, pw), {
                "triton": (lambda: mlp.launch_matmul(h, pw, proj_out), lambda _: proj_out),
                vendor: (lambda: h @ pw, None)}),
            (f"dW_fc M{Hd}-K{M}-N{C} split{split}", (Hd, C, M), (dpre.t(), a), {
                "triton": (lambda: mlp.split_matmul(dpre.t(), a, w_grad, split) if split > 1
                           else mlp.launch_matmul(dpre.t(), a, w_grad), lambda _: w_grad),
                "triton-nosplit": (lambda: mlp.launch_matmul(dpre.t(), a, w_grad), lambda _: w_grad),
                vendor: (lambda: w_grad.copy_(dpre.t() @ a), None)}),
        ]
        for case, (pm, pn, pk), operands, providers in products:
            ref = Reference(torch.matmul, operands, grads=False)
            for name, (fn, result) in providers.items():
                errors = ref.errors(lambda fn=fn, result=result: result(fn()) if result else fn())
                rows.append(measure("gelu_mlp", case, name, "fwd", fn, {"M": pm, "N": pn, "K": pk}, dtype_name,
                                    flops=matmul_flops(pm, pn, pk), quick=quick, max_err=errors))
    return rows
