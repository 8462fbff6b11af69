"""Parameter gradients written straight into `.grad`, and the deterministic sum of per-program partials.

Autograd adds each new parameter gradient to an existing `.grad` in a pass of its own (`grad += new`: the
gradient read twice and written once more). The fused backwards instead write into `.grad` themselves:
`GradSinks` tells a backward, per parameter, where its gradient goes:
- into the parameter's `.grad` (accumulating in the kernel that computes it; made, unfilled, and set as
  `.grad` when there is none), when this backward pass accumulates into `.grad` (a `.backward()`, not
  `torch.autograd.grad`) and the tensor is an nn.Parameter (not a view of one) without tensor hooks
  (which would expect to see the gradient); the backward returns None for it, so autograd adds nothing;
- otherwise into a fresh tensor the backward returns (`torch.autograd.grad`, or a `.grad` of another
  layout or dtype, which autograd then adds to).
A weight two ops share (GPT-2's tied wte: the loss and the embedding) gets both contributions added into
one `.grad`, with no sum of the two made first.
DDP's reducer reads `.grad` in its post-accumulate hook, which runs whether or not the backward returned
a gradient: gradient accumulation under `no_sync` and the all-reduce of the last micro-step see the same
`.grad` as without the fusion. Under torch.compile (traced code) nothing is written in place.

`sum_partials` adds per-program fp32 partials (LayerNorm weight/bias grads, bias grads from a matmul
epilogue, split-K weight-grad pieces) into their gradients in one launch, rows summed in a fixed order:
the same bits on every run.
"""
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from gpt2_triton import versions
from gpt2_triton.kernels.utils import device_guard, fp32_out_matmul_kind, is_interpreter, with_fallbacks

versions.require("triton")  # as kernels/compat.py does, for the modules that import this one and not it


@triton.jit
def _sum_rows_into(partial_ptr, out_ptr, scale_ptr, num_rows, row_len, stride_p, accumulate, col0,
                   HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[j] (+)= scale * sum_r partial[r, j] for the BLOCK_C columns j from col0: (BLOCK_R, BLOCK_C) tiles
    of rows added up in order, then summed over their rows (fp32, a fixed order)."""
    cols = col0 + tl.arange(0, BLOCK_C)
    col_ok = cols < row_len
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_R):
        ptrs = partial_ptr + (r0 + rows).to(tl.int64)[:, None] * stride_p + cols[None, :]
        ok = ((r0 + rows) < num_rows)[:, None] & col_ok[None, :]
        acc += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    if HAS_SCALE:
        total *= tl.load(scale_ptr).to(tl.float32)
    if accumulate:
        total += tl.load(out_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["rows0", "rows1", "rows2", "accumulate0", "accumulate1", "accumulate2"])
def _sum_partials_kernel(
    partial0_ptr, out0_ptr, rows0, len0, stride0, accumulate0,  # (rows0, len0) partials -> (len0,) out
    partial1_ptr, out1_ptr, rows1, len1, stride1, accumulate1,  # second pair (grid axis 1 >= 2)
    partial2_ptr, out2_ptr, rows2, len2, stride2, accumulate2,  # third pair (grid axis 1 == 3)
    scale_ptr,  # () fp32 factor on every sum when HAS_SCALE
    HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(longest len, BLOCK_C), pairs): program (i, p) sums the partial rows of pair p over columns
    [i * BLOCK_C, (i + 1) * BLOCK_C) into out_p, added to what out_p holds when accumulate_p. The pairs
    are runtime arguments (unused ones repeat the first): one compile serves 1 to 3 pairs."""
    col0 = tl.program_id(0).to(tl.int64) * BLOCK_C
    pair = tl.program_id(1)
    if pair == 0:
        _sum_rows_into(partial0_ptr, out0_ptr, scale_ptr, rows0, len0, stride0, accumulate0, col0, HAS_SCALE,
                       BLOCK_R, BLOCK_C)
    elif pair == 1:
        _sum_rows_into(partial1_ptr, out1_ptr, scale_ptr, rows1, len1, stride1, accumulate1, col0, HAS_SCALE,
                       BLOCK_R, BLOCK_C)
    else:
        _sum_rows_into(partial2_ptr, out2_ptr, scale_ptr, rows2, len2, stride2, accumulate2, col0, HAS_SCALE,
                       BLOCK_R, BLOCK_C)


def _sum_tile(max_rows: int) -> tuple:
    """(BLOCK_R, BLOCK_C) of a program step: the few wide rows of split-K pieces (or one scaled row) in 4 x 1024
    steps; the hundreds of short per-program rows (LayerNorm's, the column sums') in 64 x 32 steps, which
    spread GPT-2's 768 columns over 24 programs a pair. Two tiles: two compiles serve every call."""
    if is_interpreter():
        return 4, 64
    return (4, 1024) if max_rows <= 8 else (64, 32)


def sum_partials(pairs: Sequence[tuple], scale: Optional[torch.Tensor] = None) -> None:
    """For each (partials, out, accumulate) of 1 to 3 pairs: out (+)= scale * partials.sum(0), in one launch.

    partials: (S, L), any float dtype, unit column stride (S may be 0: a sum of nothing is 0); out: L
    contiguous elements (any float dtype, any shape), overwritten, or added to when accumulate. scale: ()
    fp32 on the device, or None. Rows are summed in a fixed order in fp32: bit-reproducible.
    """
    if not 1 <= len(pairs) <= 3:
        raise ValueError(f"sum_partials: 1 to 3 pairs; got {len(pairs)}")
    args = []
    for partials, out, accumulate in [*pairs, *[pairs[0]] * (3 - len(pairs))]:
        assert partials.dim() == 2 and partials.stride(1) == 1 and out.is_contiguous() \
            and out.numel() == partials.shape[1], "sum_partials: (S, L) partials and L contiguous outputs"
        args += [partials, out, partials.shape[0], partials.shape[1], partials.stride(0), bool(accumulate)]
    longest = max(p[0].shape[1] for p in pairs)
    if longest == 0:
        return
    block_r, block_c = _sum_tile(max(p[0].shape[0] for p in pairs))
    with device_guard(pairs[0][1].device):
        _sum_partials_kernel[(triton.cdiv(longest, block_c), len(pairs))](
            *args, scale, HAS_SCALE=scale is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


FP32_OUT_KINDS = ("addmm", "mm", "upcast")  # fastest first; each falls back to the next (features fp32_out_*)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b, for a weight gradient by the vendor's matmul: fp16/bf16 products summed
    into an fp32 out in fp32, never rounded to a's dtype (torch.addmm with out_dtype where this torch has
    it on this device, `fp32_out_matmul_kind`); the same dtypes throughout otherwise."""
    beta = 1 if accumulate else 0
    if out.dtype == a.dtype:
        out.addmm_(a, b, beta=beta)
        return

    def addmm():
        torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)

    def mm():
        product = torch.mm(a, b, out_dtype=torch.float32)
        out.add_(product) if accumulate else out.copy_(product)

    def upcast():
        out.addmm_(a.float(), b.float(), beta=beta)

    kinds = FP32_OUT_KINDS[FP32_OUT_KINDS.index(fp32_out_matmul_kind(a.device)):]
    attempts = [(f"fp32_out_{kind}", fn) for kind, fn in (("addmm", addmm), ("mm", mm)) if kind in kinds]
    with_fallbacks(attempts, upcast)


def bias_grad_into(grad: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= the column sums of grad (M, N), summed in fp32 (a bias gradient no fused kernel made)."""
    sums = grad.sum(0, dtype=torch.float32)
    out.add_(sums) if accumulate else out.copy_(sums)


class GradBuffer(NamedTuple):
    """Where a backward writes one parameter's gradient: `tensor` (None: not wanted), adding to what it holds
    when `accumulate`; `in_grad`: tensor is the parameter's `.grad` (the backward then returns None for it)."""
    tensor: Optional[torch.Tensor]
    accumulate: bool = False
    in_grad: bool = False

    def returned(self) -> Optional[torch.Tensor]:
        """What the backward returns for the parameter."""
        return None if self.in_grad else self.tensor


class GradSinks:
    """Made in a fused op's forward for its parameters (None entries allowed); its backward asks
    `buffers(...)` where each gradient goes, writes them, and returns each buffer's `returned()`."""

    def __init__(self, params: Sequence[Optional[torch.Tensor]], needed: Sequence[bool]):
        """params and, for each, whether the backward will compute its gradient (the forward's
        ctx.needs_input_grad for it)."""
        self.params = params
        self.nodes = [self._node(p) if need else None for p, need in zip(params, needed)]

    @staticmethod
    def _node(param):
        """The parameter's AccumulateGrad node where its gradient may go straight into .grad, else None."""
        if not isinstance(param, torch.nn.Parameter) or not param.requires_grad or not param.is_leaf \
                or torch.compiler.is_compiling() or param._backward_hooks:
            return None
        return torch.autograd.graph.get_gradient_edge(param).node

    def buffers(self, needed: Sequence[bool]) -> list:
        """Per parameter (None or not `needed`: GradBuffer(None)): its existing `.grad` to add into; where it
        has none, a new one set as its `.grad` now (another op of this backward pass, a tied weight, then
        adds into it); else (autograd.grad, a `.grad` of another layout) a fresh tensor returned to autograd."""
        out = []
        for param, node, need in zip(self.params, self.nodes, needed):
            if param is None or not need:
                out.append(GradBuffer(None))
                continue
            if node is not None and _accumulates(node):
                grad = param.grad
                if grad is None:
                    param.grad = grad = torch.empty_like(param, memory_format=torch.contiguous_format)
                    out.append(GradBuffer(grad, False, True))
                    continue
                if grad.layout == torch.strided and grad.shape == param.shape and grad.dtype == param.dtype \
                        and grad.device == param.device and grad.is_contiguous():
                    out.append(GradBuffer(grad, True, True))
                    continue
            out.append(GradBuffer(torch.empty(param.shape, dtype=param.dtype, device=param.device)))
        return out


def _accumulates(node) -> bool:
    """Whether the running backward pass runs this AccumulateGrad node (adds into `.grad`): True for
    `.backward()` (unless `inputs=` leaves the parameter out), False under `torch.autograd.grad`, which
    torch does not let one ask about a leaf (it raises: the gradient is then returned, never written)."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        return False
