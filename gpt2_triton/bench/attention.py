"""Flash attention vs every SDPA backend, the math reference, eager and torch.compile.

Two families: (B, H, T, D) q, k, v (flash_attention), and the model's step from the (B, T, 3C) QKV
projection to c_proj's (B, T, C) input (flash_attention_qkv vs the same step on head views)."""
import functools

import torch
import torch.nn.functional as F

from gpt2_triton.bench.common import (
    Reference,
    attention_flops,
    has_cuda,
    kernel_providers,
    measure,
    plot_scaling,
    run_modes,
    sizes_text,
)
from gpt2_triton.kernels import reference
from gpt2_triton.kernels.attention import flash_attention, flash_attention_qkv

MODES = ("fwd", "bwd", "fwd+bwd")


def sdpa_backends():
    """{provider: backend} for the SDPA backends this torch knows (the device may still refuse one)."""
    from torch.nn.attention import SDPBackend
    names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
             "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
    return {p: getattr(SDPBackend, n) for p, n in names.items() if hasattr(SDPBackend, n)}


def sdpa_with(backend, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def providers(quick):
    out = kernel_providers(flash_attention, functools.partial(reference.flash_attention, upcast=False), quick)
    out.update({name: functools.partial(sdpa_with, backend) for name, backend in sdpa_backends().items()})
    if not has_cuda():  # CPU (--quick): only the math backend runs here
        out = {k: v for k, v in out.items() if k in ("triton", "eager", "sdpa-math", "compile-max-autotune")}
    return out


def on_head_views(attention):
    """attention(q, k, v, causal=...) on (B, H, T, D) views -> the model's step qkv (B, T, 3C) -> (B, T, C)."""
    def step(qkv, n_head, causal=True):
        B, T, C3 = qkv.shape
        q, k, v = (t.unflatten(2, (n_head, C3 // (3 * n_head))).transpose(1, 2)
                   for t in qkv.split(C3 // 3, dim=2))
        return attention(q, k, v, causal=causal).transpose(1, 2).reshape(B, T, C3 // 3)
    return step


def qkv_providers(quick=False):
    """flash_attention_qkv ("triton") vs the step on head views: flash_attention ("triton-views", its
    backward concatenates dq, dk, dv), every SDPA backend, the reference eager and compiled."""
    out = kernel_providers(flash_attention_qkv, functools.partial(reference.flash_attention_qkv, upcast=False),
                           quick)
    out["triton-views"] = on_head_views(flash_attention)
    out.update({name: on_head_views(functools.partial(sdpa_with, backend))
                for name, backend in sdpa_backends().items()})
    if not has_cuda():
        out = {k: v for k, v in out.items()
               if k in ("triton", "triton-views", "eager", "sdpa-math", "compile-max-autotune")}
    return out


LARGER_GPT2_HEADS = (16, 20, 25)  # GPT-2 medium, large, XL: 1024, 1280, 1600 wide in heads of 64


def qkv_shapes(quick):
    """(B, T, n_head, D): the training micro-batch of GPT-2 124M, then of medium, large and XL."""
    return [(1, 64, 2, 16)] if quick else [(16, 1024, H, 64) for H in (12, *LARGER_GPT2_HEADS)]


def shapes(quick):
    if quick:
        return [(1, 2, 64, 16), (1, 2, 32, 16)]
    # GPT-2 124M's training shape first, T = 512 ... 8192 at the same B*T tokens, then the larger GPT-2s' heads
    return ([(16, 12, 1024, 64)] + [(16384 // T, 12, T, 64) for T in (512, 2048, 4096, 8192)]
            + [(16, H, 1024, 64) for H in LARGER_GPT2_HEADS])


def run(dtype, quick=False, sizes=None, qkv_sizes=None):
    """sizes: (B, H, T, D) list to run instead of shapes(quick); qkv_sizes: (B, T, n_head, D) list of the
    QKV-projection family instead of qkv_shapes(quick) ([]: none)."""
    rows = []
    dtype_name = str(dtype).removeprefix("torch.")
    device = "cuda" if has_cuda() else "cpu"
    for B, H, T, D in sizes or shapes(quick):
        shape = {"B": B, "H": H, "T": T, "D": D, "causal": True}
        case = f"attention B{B}-H{H}-T{T}-D{D} causal"
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        ref = Reference(functools.partial(reference.flash_attention, causal=True), [q, k, v])
        for name, fn in providers(quick).items():
            errors = ref.errors(lambda fn=fn: fn(q, k, v, causal=True), [q, k, v])
            try:
                fns = run_modes(lambda fn=fn: fn(q, k, v, causal=True), [q, k, v], MODES)
            except Exception as e:  # an SDPA backend this device / dtype does not support
                if name == "triton":
                    raise
                fns = {m: functools.partial(_raise, e) for m in MODES}
            for mode, call in fns.items():
                rows.append(measure("attention", case, name, mode, call, shape, dtype_name,
                                    flops=attention_flops(B, H, T, D, True, mode), grad_to_none=[q, k, v],
                                    quick=quick, max_err=errors))
            if has_cuda():
                torch.cuda.empty_cache()
    for B, T, H, D in qkv_shapes(quick) if qkv_sizes is None else qkv_sizes:
        shape = {"B": B, "H": H, "T": T, "D": D, "causal": True}
        case = f"attention-qkv B{B}-T{T}-C{H * D}-H{H} causal"
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype, generator=gen).requires_grad_()
        ref = Reference(lambda qkv: reference.flash_attention_qkv(qkv, H, causal=True), [qkv])
        for name, fn in qkv_providers(quick).items():
            errors = ref.errors(lambda fn=fn: fn(qkv, H, causal=True), [qkv])
            try:
                fns = run_modes(lambda fn=fn: fn(qkv, H, causal=True), [qkv], MODES)
            except Exception as e:
                if name == "triton":
                    raise
                fns = {m: functools.partial(_raise, e) for m in MODES}
            for mode, call in fns.items():
                rows.append(measure("attention", case, name, mode, call, shape, dtype_name,
                                    flops=attention_flops(B, H, T, D, True, mode), grad_to_none=[qkv],
                                    quick=quick, max_err=errors))
            if has_cuda():
                torch.cuda.empty_cache()
    return rows


def _raise(e):
    raise e


def plots(rows, out_dir, title):
    rows = [r for r in rows if not r.case.startswith("attention-qkv")]  # the (B, H, T, D) family
    heads = rows[0].shape["H"] if rows else None
    rows = [r for r in rows if r.shape["H"] == heads]  # against T: the first case's head count only
    sizes = f"{sizes_text(rows, ('H', 'D'))}, {sizes_text(rows, ('B', 'T'))}, causal"
    plot_scaling(rows, out_dir / "attention_scaling.png", "T", f"attention vs T ({sizes}) {title}",
                 fallback=("median_ms", "median ms"))
    plot_scaling(rows, out_dir / "attention_memory.png", "T", f"attention peak memory ({sizes}) {title}",
                 y="peak_mb", ylabel="peak MB")
