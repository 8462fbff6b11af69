"""FLOPs of one traced event: an aten op (torch.utils.flop_counter's formulas) or a Triton launch (a rule
per kernel, from the launch's arguments).

Conventions, those of the attention papers (FlashAttention-2/-3) and of `GPT.flops_per_token`: a GEMM is
2·M·N·K; attention forward is 4·B·H·T²·D, halved when causal; the backward is 2.5× the forward (its five
T×T×D products), whatever a kernel recomputes. Our backward runs as two kernels that both recompute the
scores: each is given the share of the 2.5× that its products are of the seven they run (dQ: QKᵀ, dO·Vᵀ,
dS·K = 3; dK/dV: KQᵀ, P̃ᵀ·dO, V·dOᵀ, dS̃ᵀ·Q = 4). Any kernel not in `LAUNCH_FLOPS` is memory-bound and
has 0 FLOPs, and so has varlen attention: a trace holds no values, so its cu_seqlens are unknown.
"""
import math

import torch
from torch.utils.flop_counter import flop_registry

from gpt2_triton.bench.common import attention_flops, matmul_flops

aten = torch.ops.aten

CAUSAL_FRACTION = 0.5  # of the T×T score matrix a causal mask keeps (the diagonal counted half)
ATTENTION_BWD_RATIO = 2.5
DQ_SHARE, DKDV_SHARE = 3 / 7, 4 / 7


def _matmul_flops(a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """torch.matmul's product, batch dimensions broadcast; a 1-D operand is a vector."""
    a, b = list(a_shape), list(b_shape)
    if len(a) == 1:
        a = [1, *a]
    if len(b) == 1:
        b = [*b, 1]
    batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return 2 * math.prod(batch) * a[-2] * a[-1] * b[-1]


def _shapes(f):
    def formula(*args, out_val=None, **kwargs):
        shapes = [a.shape if isinstance(a, torch.Tensor) else a for a in args]
        return f(*shapes)
    return formula


# aten ops the trace sees that flop_counter's registry has no entry for: torch.matmul reaching the dispatch
# inside our custom ops, and the CPU names of the flash SDPA, which stand for the CUDA ones in a trace.
_EXTRA = {
    aten.matmul: _shapes(_matmul_flops),
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[aten._scaled_dot_product_flash_attention_backward],
}
_RAW = {packet for packet, f in flop_registry.items() if not hasattr(f, "__wrapped__")}
ATTENTION_OPS = {packet for packet in (*flop_registry, *_EXTRA) if "attention" in str(packet)}
GEMM_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten._scaled_mm}


def _is_causal(func, args, kwargs) -> bool:
    names = [a.name for a in func._schema.arguments]
    if "is_causal" in kwargs:
        return bool(kwargs["is_causal"])
    return "is_causal" in names and names.index("is_causal") < len(args) and bool(args[names.index("is_causal")])


def aten_flops(func, args, kwargs, out) -> int:
    """FLOPs of an aten op: flop_counter's formula for its overload packet (0 when it has none)."""
    packet = func.overloadpacket
    formula = _EXTRA.get(packet) or flop_registry.get(packet)
    if formula is None:
        return 0
    if packet in _RAW:
        n = formula(*args, **kwargs, out_val=out)
    else:  # the shape formulas take the tensor arguments first; scalars such as out_dtype would collide
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        n = formula(*tensors, out_val=out)
    if packet in ATTENTION_OPS and _is_causal(func, args, kwargs):
        n *= CAUSAL_FRACTION
    return int(n)


def _bhtd(launch) -> tuple:
    q = launch.args["q_ptr"]
    return q.shape[0], launch.args["H"], launch.args["T"], launch.args["HEAD_DIM"]


def _attention(launch, mode: str) -> float:
    return attention_flops(*_bhtd(launch), bool(launch.args["CAUSAL"]), mode)


LAUNCH_FLOPS = {
    "_matmul_kernel": lambda launch: matmul_flops(launch.args["M"], launch.args["N"], launch.args["K"]),
    "_linear_cross_entropy_lse_kernel":
        lambda launch: matmul_flops(launch.args["M"], launch.args["num_classes"], launch.args["C"]),
    "_flash_attention_fwd_kernel": lambda launch: _attention(launch, "fwd"),
    "_flash_attention_bwd_dq_kernel": lambda launch: _attention(launch, "bwd") * DQ_SHARE,
    "_flash_attention_bwd_dkdv_kernel": lambda launch: _attention(launch, "bwd") * DKDV_SHARE,
}
ATTENTION_FWD_KERNELS = {"_flash_attention_fwd_kernel"}
ATTENTION_BWD_KERNELS = {"_flash_attention_bwd_dq_kernel", "_flash_attention_bwd_dkdv_kernel"}


def launch_flops(launch) -> int:
    """FLOPs of a recorded Triton launch by `LAUNCH_FLOPS` (0: memory-bound)."""
    rule = LAUNCH_FLOPS.get(launch.fn.__name__)
    return int(rule(launch)) if rule is not None else 0
