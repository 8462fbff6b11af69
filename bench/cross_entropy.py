"""Fused cross-entropy vs eager F.cross_entropy / torch.compile, and linear+CE vs F.linear + CE (memory)."""
import torch
import torch.nn.functional as F

from bench.common import has_cuda, kernel_providers, matmul_flops, measure, plot_scaling, run_modes
from kernels.cross_entropy import cross_entropy, linear_cross_entropy

MODES = ("fwd", "bwd", "fwd+bwd")


def eager_ce(logits, targets):
    return F.cross_entropy(logits, targets)


def eager_linear_ce(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight).float(), targets)


def shapes(quick):
    if quick:
        return {"ce": [(16, 97), (8, 1000)], "linear_ce": [(40, 32, 300)]}
    return {"ce": [(16384, 50304), (16384, 8192), (16384, 32768), (8192, 65536), (8192, 131072)],
            "linear_ce": [(16384, 768, 50304), (4096, 768, 50304)]}


def run(dtype, quick=False, sizes=None):
    """sizes: {"ce": [(M, V)], "linear_ce": [(M, C, V)]} to run instead of shapes(quick)."""
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    device = "cuda" if has_cuda() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = sizes or shapes(quick)
    for M, V in sizes["ce"]:
        logits = torch.randn(M, V, device=device, dtype=dtype, generator=gen).requires_grad_()
        targets = torch.randint(0, V, (M,), device=device, generator=gen)
        case = f"cross_entropy M{M}-V{V}"
        nbytes = {"fwd": M * V * logits.element_size(), "bwd": 2 * M * V * logits.element_size()}
        nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
        for name, fn in kernel_providers(cross_entropy, eager_ce).items():
            for mode, call in run_modes(lambda fn=fn: fn(logits, targets), [logits], MODES).items():
                rows.append(measure("cross_entropy", case, name, mode, call, {"M": M, "V": V}, dtype_name,
                                    nbytes=nbytes[mode], grad_to_none=[logits], quick=quick))
    for M, C, V in sizes["linear_ce"]:
        x = torch.randn(M, C, device=device, dtype=dtype, generator=gen).requires_grad_()
        weight = (0.02 * torch.randn(V, C, device=device, generator=gen)).to(dtype).requires_grad_()
        targets = torch.randint(0, V, (M,), device=device, generator=gen)
        case = f"linear_cross_entropy M{M}-C{C}-V{V}"
        flops = {"fwd": matmul_flops(M, V, C), "bwd": 2 * matmul_flops(M, V, C), "fwd+bwd": 3 * matmul_flops(M, V, C)}
        for name, fn in kernel_providers(linear_cross_entropy, eager_linear_ce).items():
            for mode, call in run_modes(lambda fn=fn: fn(x, weight, targets), [x, weight], MODES).items():
                rows.append(measure("cross_entropy", case, name, mode, call, {"M": M, "C": C, "V": V},
                                    dtype_name, flops=flops[mode], grad_to_none=[x, weight], quick=quick))
    return rows


def plots(rows, out_dir, title):
    ce = [r for r in rows if r.case.startswith("cross_entropy") and r.shape.get("M") == rows[0].shape.get("M")]
    plot_scaling(ce, out_dir / "cross_entropy_scaling.png", "V", f"cross-entropy vs vocab {title}",
                 y="gbps", ylabel="GB/s")
