"""Fused cross-entropy vs eager F.cross_entropy / torch.compile, and linear+CE vs F.linear + CE.

Each provider gets the problem the way the model hands it over: ours the padded vocab (rows of
lm_head up to 50304, `num_classes=50257`), eager PyTorch the sliced, contiguous 50257 classes.
linear_cross_entropy runs as in training: fp32 x and master weight under autocast (dtype), for both.
"""
import contextlib

import torch
import torch.nn.functional as F

from gpt2_triton.bench.common import (
    Reference,
    has_cuda,
    kernel_providers,
    matmul_flops,
    measure,
    plot_scaling,
    run_modes,
    sizes_text,
)
from gpt2_triton.kernels import reference
from gpt2_triton.kernels.loss import cross_entropy, linear_cross_entropy

MODES = ("fwd", "bwd", "fwd+bwd")


def eager_ce(logits, targets):
    return F.cross_entropy(logits, targets)


def eager_linear_ce(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight), targets)


def shapes(quick):
    """ce: (M, V columns, classes); linear_ce: (M, C, V rows of the weight, classes)."""
    if quick:
        return {"ce": [(16, 97, 97), (8, 1024, 1000)], "linear_ce": [(40, 32, 320, 300)]}
    return {"ce": [(16384, 50304, 50257), (16384, 50257, 50257), (16384, 8192, 8192), (16384, 32768, 32768),
                   (8192, 65536, 65536), (8192, 131072, 131072)],
            "linear_ce": [(16384, 768, 50304, 50257), (4096, 768, 50304, 50257), (16384, 1600, 50304, 50257)]}


def _case(name, dims, num_classes, padded):
    return f"{name} {dims}" + (f"-classes{num_classes}" if padded != num_classes else "")


def run(dtype, quick=False, sizes=None):
    """sizes: {"ce": [(M, V, classes)], "linear_ce": [(M, C, V, classes)]} to run instead of shapes(quick)."""
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    device = "cuda" if has_cuda() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = sizes or shapes(quick)
    for M, V, nc in sizes["ce"]:
        padded = torch.randn(M, V, device=device, dtype=dtype, generator=gen).requires_grad_()
        real = padded.detach()[:, :nc].contiguous().requires_grad_()  # what the eager model computes
        targets = torch.randint(0, nc, (M,), device=device, generator=gen)
        case = _case("cross_entropy", f"M{M}-V{V}", nc, V)
        size = M * nc * padded.element_size()
        nbytes = {"fwd": size, "bwd": 2 * size, "fwd+bwd": 3 * size}
        calls = kernel_providers(lambda t: cross_entropy(padded, t, check_targets=False, num_classes=nc),
                                 lambda t: eager_ce(real, t), quick)
        ref = Reference(reference.cross_entropy, [real, targets])  # ours' padded columns: its grads cut to nc
        for name, fn in calls.items():
            leaf = padded if name == "triton" else real
            cut = (lambda g: [g[0][:, :nc]]) if leaf is padded else None
            errors = ref.errors(lambda fn=fn: fn(targets), [leaf], cut)
            for mode, call in run_modes(lambda fn=fn: fn(targets), [leaf], MODES).items():
                rows.append(measure("cross_entropy", case, name, mode, call, {"M": M, "V": V, "classes": nc},
                                    dtype_name, nbytes=nbytes[mode], grad_to_none=[leaf], quick=quick,
                                    max_err=errors))
    amp = dtype != torch.float32
    for M, C, V, nc in sizes["linear_ce"]:
        x = torch.randn(M, C, device=device, generator=gen).requires_grad_()
        weight = (0.02 * torch.randn(V, C, device=device, generator=gen)).requires_grad_()  # fp32 master
        targets = torch.randint(0, nc, (M,), device=device, generator=gen)
        case = _case("linear_cross_entropy", f"M{M}-C{C}-V{V}", nc, V)
        flops = {"fwd": matmul_flops(M, nc, C), "bwd": 2 * matmul_flops(M, nc, C),
                 "fwd+bwd": 3 * matmul_flops(M, nc, C)}
        calls = kernel_providers(
            lambda: linear_cross_entropy(x, weight, targets, check_targets=False, num_classes=nc),
            lambda: eager_linear_ce(x, weight[:nc], targets), quick)  # the model's eager lm_head slices the weight

        def under_autocast(fn):
            def forward():
                with torch.autocast(device, dtype=dtype) if amp else contextlib.nullcontext():
                    return fn()
            return forward

        ref = Reference(lambda x, w, t: reference.linear_cross_entropy(x, w, t, num_classes=nc), [x, weight, targets])
        for name, fn in calls.items():
            errors = ref.errors(under_autocast(fn), [x, weight])
            for mode, call in run_modes(under_autocast(fn), [x, weight], MODES).items():
                rows.append(measure("cross_entropy", case, name, mode, call, {"M": M, "C": C, "V": V, "classes": nc},
                                    dtype_name, flops=flops[mode], grad_to_none=[x, weight], quick=quick,
                                    extra={"autocast": dtype_name if amp else None}, max_err=errors))
    return rows


def plots(rows, out_dir, title):
    ce = [r for r in rows if r.case.startswith("cross_entropy") and r.shape.get("M") == rows[0].shape.get("M")
          and r.shape.get("V") == r.shape.get("classes")]
    plot_scaling(ce, out_dir / "cross_entropy_scaling.png", "V", f"cross-entropy vs vocab ({sizes_text(ce, ('M',))}) "
                 f"{title}", y="gbps", ylabel="GB/s", fallback=("median_ms", "median ms"))
