"""Fused LayerNorm vs eager F.layer_norm and torch.compile; GB/s against the device's bandwidth.

Also the model's case under autocast: an fp32 residual in, the next matmul's dtype out (`out_dtype`,
one pass) vs F.layer_norm in fp32 followed by a cast.
"""
import torch
import torch.nn.functional as F

from gpt2_triton.bench.common import Reference, has_cuda, kernel_providers, measure, run_modes
from gpt2_triton.devices import cuda_gpu
from gpt2_triton.kernels import reference
from gpt2_triton.kernels.norm import layer_norm

MODES = ("fwd", "bwd", "fwd+bwd")


def device_bandwidth():
    """HBM bytes/s of the current GPU (gpt2_triton.devices), None on CPU or an unknown GPU."""
    gpu = cuda_gpu()
    return gpu.hbm_bytes_per_s if gpu else None


def eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def eager_cast_to(dtype):
    return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5).to(dtype)


def shapes(quick):
    if quick:
        return [(64, 96), (33, 768)]
    return [(16384, 768), (16384, 1024), (16384, 1280), (16384, 1600), (16384, 4096), (4096, 8192)]


def run(dtype, quick=False, sizes=None):
    """sizes: (M, N) list to run instead of shapes(quick)."""
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    device = "cuda" if has_cuda() else "cpu"
    bandwidth = device_bandwidth()
    for M, N in sizes or shapes(quick):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, N, device=device, dtype=dtype, generator=gen).requires_grad_()
        w = (1 + 0.1 * torch.randn(N, device=device, generator=gen)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(N, device=device, generator=gen)).to(dtype).requires_grad_()
        elem = x.element_size()
        nbytes = {"fwd": 2 * M * N * elem, "bwd": 3 * M * N * elem, "fwd+bwd": 5 * M * N * elem}
        providers = kernel_providers(lambda x, w, b: layer_norm(x, w, b, 1e-5), eager, quick)
        rows += _measure_all(f"layer_norm M{M}-N{N}", providers, (x, w, b), {"M": M, "N": N}, dtype_name,
                             nbytes, bandwidth, quick)
        if dtype != torch.float32:  # fp32 residual and parameters in, `dtype` out
            x32 = x.detach().float().requires_grad_()
            w32, b32 = w.detach().float().requires_grad_(), b.detach().float().requires_grad_()
            # minimum traffic: fwd reads x (4 B) and writes y; bwd reads dy, x and writes dx (4 B)
            nbytes = {"fwd": M * N * (4 + elem), "bwd": M * N * (elem + 8), "fwd+bwd": M * N * (2 * elem + 12)}
            providers = kernel_providers(lambda x, w, b: layer_norm(x, w, b, 1e-5, out_dtype=dtype),
                                         eager_cast_to(dtype), quick)
            rows += _measure_all(f"layer_norm fp32->{dtype_name} M{M}-N{N}", providers, (x32, w32, b32),
                                 {"M": M, "N": N, "out_dtype": dtype_name}, "float32", nbytes, bandwidth, quick)
    return rows


def _measure_all(case, providers, inputs, shape, dtype_name, nbytes, bandwidth, quick):
    rows = []
    ref = Reference(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), inputs)
    for name, fn in providers.items():
        errors = ref.errors(lambda fn=fn: fn(*inputs), inputs)
        for mode, call in run_modes(lambda fn=fn: fn(*inputs), list(inputs), MODES).items():
            row = measure("layer_norm", case, name, mode, call, shape, dtype_name,
                          nbytes=nbytes[mode], grad_to_none=list(inputs), quick=quick, max_err=errors)
            if bandwidth and row.gbps:
                row.extra["pct_of_bandwidth"] = round(100 * row.gbps * 1e9 / bandwidth, 1)
            rows.append(row)
    return rows
