"""Fused cross-entropy (online logsumexp over V-blocks) and chunked linear + cross-entropy.

The loss is the mean over rows whose target is not `ignore_index` (0 when every row is ignored), in fp32.
The count of such rows stays a device tensor: nothing here syncs with the host except the optional,
documented target range check of the public ops (`check_targets=True`).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.utils import check_device, check_float, is_interpreter


@triton.jit
def _store_grad_row(logits_row_ptr, grad_row_ptr, target, lse, scale, vocab, BLOCK_V: tl.constexpr):
    """grad row = (softmax - one_hot(target)) * scale, over V-blocks; scale is 0 for ignored rows."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        mask = offs < vocab
        x = tl.load(logits_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
        tl.store(grad_row_ptr + offs, (grad * scale).to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (M, V)
    targets_ptr,  # (M,) int64
    loss_ptr,  # (M,) fp32, per-row loss (0 for ignored rows)
    lse_ptr,  # (M,) fp32
    grad_ptr,  # (M, V), written only when COMPUTE_GRAD; may be logits_ptr itself (in place)
    grad_scale_ptr,  # (1,) fp32: d(loss)/d(row loss) = upstream grad / count; read only when COMPUTE_GRAD
    stride_lm, stride_gm,
    vocab, ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_lm  # int64: row * stride passes 2^31 at GPT-2 sizes
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    is_valid = target != ignore_index
    in_range = (target >= 0) & (target < vocab)  # never read outside the row, even for bad targets

    # Online logsumexp over V-blocks, in fp32.
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        x = tl.load(logits_row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    target_logit = tl.load(logits_row_ptr + target, mask=is_valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(is_valid, lse - target_logit, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        scale = tl.where(is_valid, tl.load(grad_scale_ptr).to(tl.float32), 0.0)
        _store_grad_row(logits_row_ptr, grad_ptr + row * stride_gm, target, lse, scale, vocab, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,  # (M, V)
    targets_ptr,  # (M,) int64
    lse_ptr,  # (M,) fp32, from the forward
    grad_ptr,  # (M, V) output
    grad_scale_ptr,  # (1,) fp32: upstream grad / count
    stride_lm, stride_gm,
    vocab, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    scale = tl.where(target != ignore_index, tl.load(grad_scale_ptr).to(tl.float32), 0.0)
    _store_grad_row(logits_ptr + row * stride_lm, grad_ptr + row * stride_gm, target,
                    tl.load(lse_ptr + row), scale, vocab, BLOCK_V)


def _config(vocab: int):
    """(BLOCK_V, num_warps) for a row of `vocab` logits, walked in BLOCK_V blocks."""
    if is_interpreter():
        return min(triton.next_power_of_2(vocab), 512), 1
    block_v = min(triton.next_power_of_2(vocab), 4096)
    return block_v, max(min(block_v // 256, 8), 1)


def _num_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Count of non-ignored rows as a (1,) fp32 device tensor, at least 1 (all ignored -> loss 0, not NaN)."""
    return (targets != ignore_index).sum().clamp(min=1).to(torch.float32).reshape(1)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(logits, targets, loss_rows, lse, grad, grad_scale, ignore_index):
    """Runs the forward kernel on (m, V) logits; grad/grad_scale None -> loss and lse only."""
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    block_v, num_warps = _config(vocab)
    compute_grad = grad is not None
    _cross_entropy_fwd_kernel[(num_rows,)](
        logits, targets, loss_rows, lse,
        grad if compute_grad else logits, grad_scale if compute_grad else lse,
        logits.stride(0), grad.stride(0) if compute_grad else 0,
        vocab, ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps)


@torch.library.custom_op("gpt2_triton::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (M, V) fp32/fp16/bf16, targets (M,) int64 -> loss () fp32 (mean over non-ignored rows),
    lse (M,) fp32 logsumexp per row. No host sync."""
    logits, targets = _row_major(logits), targets.contiguous()
    num_rows = logits.shape[0]
    loss_rows = torch.empty((num_rows,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((num_rows,), dtype=torch.float32, device=logits.device)
    _launch_fwd(logits, targets, loss_rows, lse, None, None, ignore_index)
    loss = loss_rows.sum() / _num_valid(targets, ignore_index)[0]
    return loss, lse


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.custom_op("gpt2_triton::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """grad_loss () upstream grad of the mean loss, logits (M, V), targets (M,), lse (M,) fp32
    -> grad_logits (M, V) in logits' dtype, a new tensor: (softmax - one_hot) * grad_loss / count."""
    logits, targets = _row_major(logits), targets.contiguous()
    num_rows, vocab = logits.shape
    grad_logits = torch.empty((num_rows, vocab), dtype=logits.dtype, device=logits.device)
    if num_rows == 0:
        return grad_logits
    grad_scale = grad_loss.to(torch.float32).reshape(1) / _num_valid(targets, ignore_index)
    block_v, num_warps = _config(vocab)
    _cross_entropy_bwd_kernel[(num_rows,)](
        logits, targets, lse, grad_logits, grad_scale,
        logits.stride(0), grad_logits.stride(0), vocab, ignore_index,
        BLOCK_V=block_v, num_warps=num_warps)
    return grad_logits


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, targets, lse, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def default_chunk_size(num_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk for linear_cross_entropy: chunk * V is about M * C (the size of x), i.e.
    next_power_of_2(cdiv(M, cdiv(V, C))), clamped to [16, 8192]."""
    chunk = triton.next_power_of_2(triton.cdiv(max(num_rows, 1), triton.cdiv(vocab, max(hidden, 1))))
    return max(16, min(chunk, 8192))


@torch.library.custom_op("gpt2_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_size: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cross_entropy(x @ weight.T, targets) without the (M, V) logits: x (M, C), weight (V, C), targets (M,).

    Rows go in chunks of `chunk_size`: logits (chunk, V) by matmul in x's dtype (weight is cast to x's
    dtype, as autocast would), then the Triton kernel writes loss and d(loss)/d(logits) over them in
    place. With compute_grad the grads of the (unscaled) loss are built here: grad_x (M, C) in x's dtype
    and grad_weight (V, C) in weight's dtype (accumulated over chunks in fp32); otherwise both are
    empty (0,) tensors. Returns (loss () fp32, grad_x, grad_weight). No host sync.
    """
    x, targets = _row_major(x), targets.contiguous()
    num_rows, hidden = x.shape
    vocab = weight.shape[0]
    weight_in = weight.to(x.dtype)  # (V, C); no copy when the dtypes already match
    count = _num_valid(targets, ignore_index)  # (1,) global count: right normalisation across chunks
    grad_scale = 1.0 / count
    loss_rows = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    lse = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    if compute_grad:
        grad_x = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
        grad_weight_acc = torch.zeros((vocab, hidden), dtype=torch.float32, device=x.device)
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        x_chunk = x[start:end]  # (m, C)
        logits = x_chunk @ weight_in.T  # (m, V), fresh: the kernel may overwrite it with its grad
        _launch_fwd(logits, targets[start:end], loss_rows[start:end], lse[start:end],
                    logits if compute_grad else None, grad_scale, ignore_index)
        if compute_grad:
            torch.matmul(logits, weight_in, out=grad_x[start:end])  # (m, C)
            if x.dtype == torch.float32:
                grad_weight_acc.addmm_(logits.T, x_chunk)  # (V, C)
            else:
                grad_weight_acc += logits.T @ x_chunk  # low-precision matmul, fp32 running sum
    loss = loss_rows.sum() / count[0]
    if not compute_grad:
        return loss, x.new_empty((0,)), weight.new_empty((0,))
    return loss, grad_x, grad_weight_acc.to(weight.dtype)


@linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index, chunk_size, compute_grad):
    loss = x.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, x.new_empty((0,)), weight.new_empty((0,))
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse = cross_entropy_fwd(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        return cross_entropy_bwd(grad_loss, logits, targets, lse, ctx.ignore_index), None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_size, compute_grad):
        loss, grad_x, grad_weight = linear_cross_entropy_fwd(
            x, weight, targets, ignore_index, chunk_size, compute_grad)
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x.numel() == 0 and grad_weight.numel() == 0:
            raise RuntimeError("linear_cross_entropy: forward ran without grads (compute_grad=False)")
        # A 0-dim fp32 grad_loss scales in fp32 and keeps each grad's dtype.
        grad_x = grad_x * grad_loss if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight * grad_loss if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None, None, None


def _check_targets(op: str, targets: torch.Tensor, num_rows: int):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor; got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64 class indices; got {targets.dtype}")
    if targets.shape != (num_rows,):
        raise ValueError(f"{op}: targets must have shape (M,) = ({num_rows},); got {tuple(targets.shape)}")


def _check_target_range(op: str, targets: torch.Tensor, vocab: int, ignore_index: int):
    """One host sync: raises if a target is outside [0, V) and not ignore_index. Skipped under torch.compile."""
    if torch.compiler.is_compiling():
        return
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= vocab)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: targets out of range [0, V) = [0, {vocab}) and not ignore_index={ignore_index}; "
                         f"e.g. targets[{first}] = {int(targets[first])}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  check_targets: bool = True) -> torch.Tensor:
    """Mean cross-entropy over rows whose target != ignore_index, like F.cross_entropy; fp32 scalar.

    logits (M, V) fp32/fp16/bf16, targets (M,) int64. All rows ignored gives 0 and zero grads.
    check_targets=True checks targets are in [0, V) (or ignore_index) with one host sync; pass False in
    a training loop to keep the op sync-free (the kernel never reads out of bounds either way, but a bad
    target then gives a wrong loss). The check is skipped while torch.compile traces.
    """
    op = "cross_entropy"
    check_float(op, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (M, V); got shape {tuple(logits.shape)}")
    _check_targets(op, targets, logits.shape[0])
    check_device(op, logits=logits, targets=targets)
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits need at least one class; got V=0")
    if check_targets:
        _check_target_range(op, targets, logits.shape[1], ignore_index)
    return CrossEntropyFunction.apply(logits, targets, int(ignore_index))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_size: Optional[int] = None, check_targets: bool = True) -> torch.Tensor:
    """cross_entropy(x @ weight.T, targets) without building the (M, V) logits (tied lm_head).

    x (M, C), weight (V, C) (as wte.weight), targets (M,) int64 -> fp32 scalar. Computed in chunks of
    rows (default `default_chunk_size(M, V, C)`), so the extra memory is about chunk_size * V logits.
    Gradients are computed in the forward when grad is enabled and x or weight requires grad.
    The matmuls run in x's dtype (weight is cast to it); grad_weight is returned in weight's dtype.
    check_targets: as in `cross_entropy`.
    """
    op = "linear_cross_entropy"
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: x must be (M, C) and weight (V, C); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x (M, C) and weight (V, C) must share C; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight needs at least one class; got V=0")
    _check_targets(op, targets, x.shape[0])
    check_device(op, x=x, weight=weight, targets=targets)
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], weight.shape[0], x.shape[1])
    elif chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int; got {chunk_size}")
    if check_targets:
        _check_target_range(op, targets, weight.shape[0], ignore_index)
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(x, weight, targets, int(ignore_index), int(chunk_size), compute_grad)
