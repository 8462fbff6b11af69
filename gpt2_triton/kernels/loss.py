"""Fused cross-entropy (online logsumexp over V-blocks) and linear + cross-entropy (chunked with
grads, one fused kernel without).

The loss is the mean over rows whose target is not `ignore_index` (0 when every row is ignored), in fp32.
The count of such rows stays a device tensor: nothing here syncs with the host except the optional,
documented target range check of the public ops (`check_targets=True`).

Row statistics are kept as (max, log Σ exp(x − max)) in fp32, and the softmax is recomputed as
exp((x − max) − log_norm), the rounding of PyTorch's log_softmax: exp(x − lse) rounds lse at its own
magnitude first, which at large logits (×10) was measurably further from an fp64 reference.

Padded vocabularies: logits (M, V) and weight (V, C) may carry rows/columns past the real classes
(GPT-2's 50257 padded to 50304, so every row starts 16-byte aligned and the loads vectorize).
`num_classes` names the real ones: the others are -inf inside the kernel, so they add nothing to the
loss and get zero gradient; targets must be < num_classes.

linear_cross_entropy = cross_entropy(x @ weight.T) without the (M, V) logits. Estimate at GPT-2 124M
training (M = B·1024 rows, C = 768, V = 50304, bf16; H100 ~800 TFLOP/s bf16 dense, ~3 TB/s; one
2·M·V·C product is 1.27 TFLOP ≈ 1.6 ms at B = 16; bytes from a fwd+bwd trace of every op's tensors):
- eager lm_head + F.cross_entropy under autocast: 3 products (logits, dx, dW) and the logits in bf16
  and fp32 several times over: 42 GB at B = 16 (≈ 14 ms of traffic), 11 GB at B = 4; peak 9.3 / 2.4 GiB.
- CCE-style, fully fused (logits never in memory): forward 1 product, but a deterministic backward
  (no atomics; CCE itself uses them for dx and dW) recomputes the logits for dx and again for dW, and a
  (BLOCK, 768) fp32 accumulator does not fit in registers, so C is split and the logits recomputed per
  split: ~7-9 products (≥ 11 ms at B = 16) against eager's 3.
- training here: eager's 3 products (cuBLAS) over a few large row chunks; the Triton kernel writes
  loss and d(loss)/d(logits) into each chunk's logits in place, dx rows go straight into grad_x, and
  dW is summed in fp32 (bf16 products with an fp32 output, never rounded per chunk). ~5 passes over
  each chunk's logits (10·V bytes a row) plus ~12·V·C bytes per chunk (W read twice, the fp32 dW read
  and written): 11.3 GB at B = 16 (4 chunks), 4.3 GB at B = 4 (3 chunks); peak 0.65 / 0.36 GiB. So
  ≈ 4.8 ms of products and ≈ 1.1 ms for the Triton kernel (3.3 GB). Chunk size: `default_chunk_size`.
- no grad (evaluation): the CCE forward, one fused kernel (tl.dot tiles folded into an online
  logsumexp), 1 product and no logits in memory.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.autotune import autotuned, bucket
from gpt2_triton.kernels.grads import GradSinks, matmul_into, sum_partials
from gpt2_triton.kernels.utils import (
    autocast_disabled,
    autocast_dtype,
    cast_floats,
    cast_weight,
    check_device,
    check_float,
    device_guard,
    dot_precision,
    is_interpreter,
    known_arch,
    row_major,
)


@triton.jit
def _load_block(row_ptr, offs, num_cols, num_classes, TAIL: tl.constexpr):
    """x[offs] in fp32. TAIL: the blocks past the last whole block of classes, where columns
    >= num_classes are -inf; the others load unmasked (every column a class)."""
    if TAIL:
        # masked on num_cols (the padded, 16-divisible width) so the loads stay vectorized
        x = tl.load(row_ptr + offs, mask=offs < num_cols, other=float("-inf")).to(tl.float32)
        return tl.where(offs < num_classes, x, float("-inf"))
    return tl.load(row_ptr + offs).to(tl.float32)


@triton.jit
def _lse_block(row_ptr, offs, running_max, running_sum, num_cols, num_classes, TAIL: tl.constexpr):
    """One online-logsumexp step over a V-block: (max, sum exp(x - max)) updated, in fp32."""
    x = _load_block(row_ptr, offs, num_cols, num_classes, TAIL)
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
    return new_max, running_sum


@triton.jit
def _grad_block(row_ptr, grad_row_ptr, offs, target, row_max, log_norm, scale, num_cols, num_classes,
                TAIL: tl.constexpr):
    """grad[offs] = (softmax - one_hot(target)) * scale, softmax = exp((x - row_max) - log_norm);
    0 past num_classes (exp(-inf))."""
    x = _load_block(row_ptr, offs, num_cols, num_classes, TAIL)
    grad = tl.exp((x - row_max) - log_norm) - tl.where(offs == target, 1.0, 0.0)
    grad = (grad * scale).to(grad_row_ptr.dtype.element_ty)
    if TAIL:
        tl.store(grad_row_ptr + offs, grad, mask=offs < num_cols)
    else:
        tl.store(grad_row_ptr + offs, grad)


@triton.jit
def _store_grad_row(logits_row_ptr, grad_row_ptr, target, row_max, log_norm, scale, num_cols, num_classes,
                    BLOCK_V: tl.constexpr):
    """The grad row over V-blocks: whole blocks of classes unmasked, then the tail. scale is 0 for
    ignored rows."""
    cols = tl.arange(0, BLOCK_V)
    num_whole = (num_classes // BLOCK_V) * BLOCK_V
    for start in range(0, num_whole, BLOCK_V):
        _grad_block(logits_row_ptr, grad_row_ptr, start + cols, target, row_max, log_norm, scale,
                    num_cols, num_classes, False)
    for start in range(num_whole, num_cols, BLOCK_V):
        _grad_block(logits_row_ptr, grad_row_ptr, start + cols, target, row_max, log_norm, scale,
                    num_cols, num_classes, True)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (M, V), V = num_cols >= num_classes
    targets_ptr,  # (M,) int64
    loss_ptr,  # (M,) fp32, per-row loss (0 for ignored rows)
    stats_ptr,  # (M, 2) fp32: row max, log sum exp(x - max) over the classes
    grad_ptr,  # (M, V), written only when COMPUTE_GRAD; may be logits_ptr itself (in place)
    grad_scale_ptr,  # (1,) fp32: d(loss)/d(row loss) = upstream grad / count; read only when COMPUTE_GRAD
    stride_lm, stride_gm,
    num_cols, num_classes, ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_lm  # int64: row * stride passes 2^31 at GPT-2 sizes
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    is_valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)  # never read outside the row, even for bad targets

    # Online logsumexp over V-blocks, in fp32: whole blocks of classes, then the tail (padding -inf).
    running_max = float("-inf")
    running_sum = 0.0
    num_whole = (num_classes // BLOCK_V) * BLOCK_V
    for start in range(0, num_whole, BLOCK_V):
        running_max, running_sum = _lse_block(logits_row_ptr, start + cols, running_max, running_sum,
                                              num_cols, num_classes, False)
    for start in range(num_whole, num_cols, BLOCK_V):
        running_max, running_sum = _lse_block(logits_row_ptr, start + cols, running_max, running_sum,
                                              num_cols, num_classes, True)
    log_norm = tl.log(running_sum)

    target_logit = tl.load(logits_row_ptr + target, mask=is_valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(is_valid, log_norm - (target_logit - running_max), 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + 2 * row, running_max)
    tl.store(stats_ptr + 2 * row + 1, log_norm)

    if COMPUTE_GRAD:
        scale = tl.where(is_valid, tl.load(grad_scale_ptr).to(tl.float32), 0.0)
        _store_grad_row(logits_row_ptr, grad_ptr + row * stride_gm, target, running_max, log_norm, scale,
                        num_cols, num_classes, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,  # (M, V)
    targets_ptr,  # (M,) int64
    stats_ptr,  # (M, 2) fp32, from the forward
    grad_ptr,  # (M, V) output
    grad_scale_ptr,  # (1,) fp32: upstream grad / count
    stride_lm, stride_gm,
    num_cols, num_classes, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    scale = tl.where(target != ignore_index, tl.load(grad_scale_ptr).to(tl.float32), 0.0)
    _store_grad_row(logits_ptr + row * stride_lm, grad_ptr + row * stride_gm, target,
                    tl.load(stats_ptr + 2 * row), tl.load(stats_ptr + 2 * row + 1), scale,
                    num_cols, num_classes, BLOCK_V)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_cross_entropy_lse_kernel(
    x_ptr,  # (M, C)
    w_ptr,  # (V, C); rows >= num_classes are never read
    targets_ptr,  # (M,) int64
    part_ptr,  # (S, M, 3) fp32 out: per V-split and row, max, sum exp(logit - max), target logit (0 elsewhere)
    M, C, num_classes, M_BUCKET,
    stride_xm, stride_wv,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Logits of x @ w.T tile by tile (fp32 accumulator over C) folded into an online logsumexp per
    row over this program's share of the classes; the logits never reach memory.
    Grid (cdiv(M, BLOCK_M), S). M_BUCKET (next power of two of M) is the autotuner's key, unused here."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols_per_split = tl.cdiv(tl.cdiv(num_classes, tl.num_programs(1)), BLOCK_V) * BLOCK_V
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, num_classes)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + offs_v
        col_ok = cols < v_end
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv  # (1, BLOCK_V)
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k_start in range(0, C, BLOCK_K):
            k = k_start + offs_k
            k_ok = k < C
            a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            b = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_V)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], acc, 0.0), axis=1)

    out = part_ptr + (pid_s.to(tl.int64) * M + rows) * 3
    tl.store(out, row_max, mask=row_ok)
    tl.store(out + 1, row_sum, mask=row_ok)
    tl.store(out + 2, target_logit, mask=row_ok)


def _config(num_cols: int):
    """(BLOCK_V, num_warps) for a row of `num_cols` logits, walked in BLOCK_V blocks."""
    if is_interpreter():
        return min(triton.next_power_of_2(num_cols), 512), 1
    block_v = min(triton.next_power_of_2(num_cols), 4096)
    return block_v, max(min(block_v // 256, 8), 1)


def _num_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Count of non-ignored rows as a (1,) fp32 device tensor, at least 1 (all ignored -> loss 0, not NaN)."""
    return (targets != ignore_index).sum().clamp(min=1).to(torch.float32).reshape(1)


def _launch_fwd(logits, targets, loss_rows, stats, grad, grad_scale, ignore_index, num_classes):
    """Runs the forward kernel on (m, V) logits; grad/grad_scale None -> loss and stats only."""
    num_rows, num_cols = logits.shape
    if num_rows == 0:
        return
    block_v, num_warps = _config(num_cols)
    compute_grad = grad is not None
    with device_guard(logits.device):
        _cross_entropy_fwd_kernel[(num_rows,)](
            logits, targets, loss_rows, stats,
            grad if compute_grad else logits, grad_scale if compute_grad else stats,
            logits.stride(0), grad.stride(0) if compute_grad else 0,
            num_cols, num_classes, ignore_index,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps)


@torch.library.custom_op("gpt2_triton::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (M, V) fp32/fp16/bf16, targets (M,) int64 -> loss () fp32 (mean over non-ignored rows),
    stats (M, 2) fp32: per row the max and log Σ exp(x − max) over the first num_classes columns
    (default all; their sum is the logsumexp). No host sync."""
    with autocast_disabled(logits.device.type):
        logits, targets = row_major(logits), targets.contiguous()
        num_rows, num_cols = logits.shape
        loss_rows = torch.empty((num_rows,), dtype=torch.float32, device=logits.device)
        stats = torch.empty((num_rows, 2), dtype=torch.float32, device=logits.device)
        _launch_fwd(logits, targets, loss_rows, stats, None, None, ignore_index,
                    num_cols if num_classes is None else num_classes)
        loss = loss_rows.sum() / _num_valid(targets, ignore_index)[0]
    return loss, stats


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, num_classes=None):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((logits.shape[0], 2), dtype=torch.float32)


@torch.library.custom_op("gpt2_triton::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, ignore_index: int,
    num_classes: Optional[int] = None,
) -> torch.Tensor:
    """grad_loss () upstream grad of the mean loss, logits (M, V), targets (M,), stats (M, 2) fp32 from
    cross_entropy_fwd -> grad_logits (M, V) in logits' dtype, a new tensor: (softmax - one_hot) * grad_loss
    / count, 0 in the columns past num_classes."""
    with autocast_disabled(logits.device.type):
        logits, targets = row_major(logits), targets.contiguous()
        num_rows, num_cols = logits.shape
        grad_logits = torch.empty((num_rows, num_cols), dtype=logits.dtype, device=logits.device)
        if num_rows == 0:
            return grad_logits
        grad_scale = grad_loss.to(torch.float32).reshape(1) / _num_valid(targets, ignore_index)
        block_v, num_warps = _config(num_cols)
        with device_guard(logits.device):
            _cross_entropy_bwd_kernel[(num_rows,)](
                logits, targets, stats, grad_logits, grad_scale,
                logits.stride(0), grad_logits.stride(0),
                num_cols, num_cols if num_classes is None else num_classes, ignore_index,
                BLOCK_V=block_v, num_warps=num_warps)
    return grad_logits


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, targets, stats, ignore_index, num_classes=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# linear + cross-entropy
# ----------------------------------------------------------------------------------------------
def default_chunk_size(num_rows: int, vocab: int, hidden: int, elem_size: int = 2) -> int:
    """Rows per chunk of linear_cross_entropy for x (M, C), weight (V, C), matmuls in elem_size bytes.

    Memory target: one chunk's (m, V) logits take a quarter of the whole (M, V) logits (so the op
    stays ≥ 4x below lm_head + eager cross-entropy, which holds all of them, in fp32 too), but at
    least as much as the fp32 weight gradient the op holds anyway (V·C·4 bytes: fewer, larger chunks
    cut the ~12·V·C bytes of weight traffic each chunk costs) and at most 8x that. The rows are then
    spread evenly over the chunks, rounded up to a multiple of 64. V cancels out: at GPT-2 sizes in
    bf16 that is m = clamp(M/4, 2C, 16C): M = 4096 -> 3 chunks of 1408, 16384 -> 4 of 4096.
    """
    num_rows, vocab, hidden = max(num_rows, 1), max(vocab, 1), max(hidden, 1)
    grad_weight_bytes = vocab * hidden * 4
    budget = min(max(num_rows * vocab * elem_size // 4, grad_weight_bytes), 8 * grad_weight_bytes)
    rows = max(budget // (vocab * elem_size), 1)
    rows = triton.cdiv(num_rows, triton.cdiv(num_rows, rows))  # even chunks
    return min(triton.cdiv(rows, 64) * 64, num_rows)


# Fused no-grad linear + cross-entropy: candidate tiles (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages),
# the hand-picked one first; the autotuner picks on the GPU (not timed here).
def _lse_tiles(dtype: torch.dtype) -> list:
    if dtype == torch.float32:
        return [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]
    return [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4)]


def _lse_options(tile: tuple, arch: Optional[str]) -> dict:
    """AMD backend options (autotune.BACKEND_OPTIONS) of the hand-picked bf16 tile, compiled with triton 3.9 at
    GPT-2's lm_head shape: on gfx942 kpack=2 takes 168 -> 156 VGPRs and the hot loop 989 -> 954 instructions (2
    waves per SIMD either way); gfx950 ignores kpack, and neither waves_per_eu=2 (no change), waves_per_eu=3
    (12 B scratch) nor matrix_instr_nonkdim=16 (loop 1020 -> 1110) helps there, nor nonkdim=16 on gfx942
    (989 -> 1065)."""
    return {"kpack": 2} if arch == "gfx942" and tile == _lse_tiles(torch.float16)[0] else {}


def _lse_smem(config, args) -> int:
    """Shared memory of a candidate on sm_90: num_stages x (BLOCK_M + BLOCK_V) x BLOCK_K operand elements
    (ptxas, triton 3.6 and 3.9, bf16); on AMD num_stages - 1 buffers (as the matmul's LDS, mlp._matmul_smem)."""
    kw = config.kwargs
    arch = known_arch(getattr(args["x_ptr"], "device", None))  # the static profile passes TensorMeta
    buffers = config.num_stages - 1 if arch is not None and arch.vendor == "amd" else config.num_stages
    return buffers * (kw["BLOCK_M"] + kw["BLOCK_V"]) * kw["BLOCK_K"] * args["x_ptr"].element_size()


# Every launch overwrites all of its outputs (no accumulation), so benchmarking needs no reset.
_linear_cross_entropy_lse = autotuned(
    _linear_cross_entropy_lse_kernel, names=("BLOCK_M", "BLOCK_V", "BLOCK_K"), candidates=_lse_tiles,
    key=["M_BUCKET", "C", "num_classes"], variants=[(torch.float16,), (torch.float32,)],
    variant_of=lambda args: (torch.float32 if args["x_ptr"].dtype == torch.float32 else torch.float16,),
    interpreter_tile=(16, 32, 16, 1, 1), smem=_lse_smem, options=_lse_options)  # tl.dot needs 16


def _lse_splits(num_rows: int, num_classes: int) -> int:
    """V-splits S of the fused loss: about 1024 programs at 128 rows each, at least 512 classes a split."""
    return max(1, min(triton.cdiv(1024, triton.cdiv(num_rows, 128)), triton.cdiv(num_classes, 512)))


def _linear_cross_entropy_rows(x, weight, targets, ignore_index, num_classes):
    """Per-row losses (M,) fp32 of cross_entropy(x @ weight[:num_classes].T) by the fused kernel
    (no logits in memory); x (M, C) and weight (V, C) row-major in one dtype."""
    num_rows, hidden = x.shape
    splits = _lse_splits(num_rows, num_classes)
    part = torch.empty((splits, num_rows, 3), dtype=torch.float32, device=x.device)
    if num_rows > 0:
        grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), splits)  # noqa: E731
        with device_guard(x.device):
            _linear_cross_entropy_lse[grid](
                x, weight, targets, part, num_rows, hidden, num_classes, bucket(num_rows),
                x.stride(0), weight.stride(0),
                INPUT_PRECISION=dot_precision(x.dtype, x.device))
    row_max = part[..., 0].amax(dim=0)  # (M,)
    log_norm = torch.log((part[..., 1] * torch.exp(part[..., 0] - row_max)).sum(dim=0))
    loss_rows = log_norm - (part[..., 2].sum(dim=0) - row_max)
    return torch.where(targets != ignore_index, loss_rows, 0.0)


@torch.library.custom_op("gpt2_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_size: int,
    compute_grad: bool, num_classes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cross_entropy(x @ weight.T, targets) without the (M, V) logits: x (M, C), weight (V, C), targets (M,).

    The products run in x's dtype (weight is cast to it once); rows of weight past num_classes
    (default: none) are not classes. With compute_grad, rows go in chunks of `chunk_size`: logits
    (chunk, V) by matmul, then the Triton kernel writes loss and d(loss)/d(logits) over them in place;
    dx rows go straight into grad_x and dW is summed over the chunks in fp32. The grads of the
    (unscaled) loss come back: grad_x (M, C) in x's dtype and grad_weight (V, C) in fp32 (rounded to the
    weight's dtype once, where the backward scales it into the weight's gradient).
    Without compute_grad one fused kernel computes the loss with no logits in memory and both grads
    are empty (0,) tensors. Returns (loss () fp32, grad_x, grad_weight). No host sync.
    """
    with autocast_disabled(x.device.type):
        x, targets = row_major(x), targets.contiguous()
        num_rows, hidden = x.shape
        vocab = weight.shape[0]
        num_classes = vocab if num_classes is None else num_classes
        weight_in = row_major(cast_weight(weight, x.dtype))  # (V, C); a parameter is cast once per step
        count = _num_valid(targets, ignore_index)  # (1,) global count: right normalisation across chunks
        # The interpreter multiplies bf16 tl.dot tiles as their uint16 storage: there the bf16 loss
        # without grads goes through the chunks too.
        if not compute_grad and not (is_interpreter() and x.dtype == torch.bfloat16):
            loss_rows = _linear_cross_entropy_rows(x, weight_in, targets, ignore_index, num_classes)
            return loss_rows.sum() / count[0], x.new_empty((0,)), weight.new_empty((0,))

        grad_scale = 1.0 / count
        loss_rows = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
        stats = torch.empty((num_rows, 2), dtype=torch.float32, device=x.device)
        if compute_grad:
            grad_x = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
        # dW summed over the chunks in fp32, by the matmuls themselves (fp32 output, beta=1).
        if compute_grad:
            grad_weight = torch.empty((vocab, hidden), dtype=torch.float32, device=x.device)
            if num_rows == 0:
                grad_weight.zero_()
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            x_chunk = x[start:end]  # (m, C)
            logits = x_chunk @ weight_in.T  # (m, V), fresh: the kernel overwrites it with its grad
            _launch_fwd(logits, targets[start:end], loss_rows[start:end], stats[start:end],
                        logits if compute_grad else None, grad_scale, ignore_index, num_classes)
            if compute_grad:
                torch.matmul(logits, weight_in, out=grad_x[start:end])  # (m, C)
                matmul_into(grad_weight, logits.T, x_chunk, accumulate=start > 0)  # (V, C)
            del logits  # freed before the next chunk's logits are allocated
        loss = loss_rows.sum() / count[0]
        if not compute_grad:
            return loss, x.new_empty((0,)), weight.new_empty((0,))
    return loss, grad_x, grad_weight


@linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index, chunk_size, compute_grad, num_classes=None):
    loss = x.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, x.new_empty((0,)), weight.new_empty((0,))
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.custom_op("gpt2_triton::linear_cross_entropy_bwd", mutates_args=("dweight",))
def linear_cross_entropy_bwd(grad_loss: torch.Tensor, grad_x: torch.Tensor, grad_weight: torch.Tensor,
                             dweight: Optional[torch.Tensor], accumulate: bool, need_dx: bool) -> torch.Tensor:
    """The forward's grads (those of an upstream gradient of 1) for the upstream gradient grad_loss (): returns
    grad_x * grad_loss (an empty (0,) tensor unless need_dx) and writes grad_weight * grad_loss into dweight
    (V, C) (None: not wanted), added to what it holds when accumulate, in one pass (scaled in fp32)."""
    with autocast_disabled(grad_x.device.type):
        if dweight is not None:
            sum_partials([(grad_weight.view(1, -1), dweight, accumulate)],
                         scale=grad_loss.to(torch.float32).reshape(()))
        return grad_x * grad_loss if need_dx else grad_x.new_empty((0,))


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, grad_x, grad_weight, dweight, accumulate, need_dx):
    return grad_x.new_empty(grad_x.shape if need_dx else (0,))


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, num_classes):
        loss, stats = cross_entropy_fwd(logits, targets, ignore_index, num_classes)
        ctx.save_for_backward(logits, targets, stats)
        ctx.ignore_index, ctx.num_classes = ignore_index, num_classes
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, stats = ctx.saved_tensors
        grad = cross_entropy_bwd(grad_loss, logits, targets, stats, ctx.ignore_index, ctx.num_classes)
        return grad, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_size, compute_grad, num_classes):
        loss, grad_x, grad_weight = linear_cross_entropy_fwd(
            x, weight, targets, ignore_index, chunk_size, compute_grad, num_classes)
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.sinks = GradSinks((weight,), ctx.needs_input_grad[1:2])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x.numel() == 0 and grad_weight.numel() == 0:
            raise RuntimeError("linear_cross_entropy: forward ran without grads (compute_grad=False)")
        (dw,) = ctx.sinks.buffers(ctx.needs_input_grad[1:2])
        dx = linear_cross_entropy_bwd(grad_loss, grad_x, grad_weight, dw.tensor, dw.accumulate, ctx.needs_input_grad[0])
        return dx if ctx.needs_input_grad[0] else None, dw.returned(), None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def _check_targets(op: str, targets: torch.Tensor, num_rows: int):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor; got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64 class indices; got {targets.dtype}")
    if targets.shape != (num_rows,):
        raise ValueError(f"{op}: targets must have shape (M,) = ({num_rows},); got {tuple(targets.shape)}")


def _check_num_classes(op: str, num_classes, width: int, what: str) -> int:
    if num_classes is None:
        return width
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= width:
        raise ValueError(f"{op}: num_classes must be an int in [1, {what}] = [1, {width}]; got {num_classes!r}")
    return num_classes


def _check_target_range(op: str, targets: torch.Tensor, num_classes: int, ignore_index: int):
    """One host sync: raises if a target is outside [0, num_classes) and not ignore_index.
    Skipped under torch.compile."""
    if torch.compiler.is_compiling():
        return
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= num_classes)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: targets out of range [0, num_classes) = [0, {num_classes}) and not "
                         f"ignore_index={ignore_index}; e.g. targets[{first}] = {int(targets[first])}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  check_targets: bool = True, *, num_classes: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy over rows whose target != ignore_index, like F.cross_entropy; fp32 scalar.

    logits (M, V) fp32/fp16/bf16 (any row stride), targets (M,) int64. Computed in fp32 whatever the
    dtype (autocast's fp32 policy for losses; nothing is cast under autocast); the logits' gradient is
    a new tensor in their dtype. num_classes (default V): only the first num_classes columns are
    classes, the rest (padding) are ignored and get zero gradient. All rows ignored gives 0 and zero
    grads. check_targets=True checks targets are in [0, num_classes) (or ignore_index) with one host
    sync; pass False in a training loop to keep the op sync-free (the kernel never reads out of bounds
    either way, but a bad target then gives a wrong loss). The check is skipped while torch.compile traces.
    """
    op = "cross_entropy"
    check_float(op, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (M, V); got shape {tuple(logits.shape)}")
    _check_targets(op, targets, logits.shape[0])
    check_device(op, logits=logits, targets=targets)
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits need at least one class; got V=0")
    num_classes = _check_num_classes(op, num_classes, logits.shape[1], "V")
    if check_targets:
        _check_target_range(op, targets, num_classes, ignore_index)
    return CrossEntropyFunction.apply(logits, targets, int(ignore_index),
                                      None if num_classes == logits.shape[1] else num_classes)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_size: Optional[int] = None, check_targets: bool = True, *,
                         num_classes: Optional[int] = None) -> torch.Tensor:
    """cross_entropy(x @ weight.T, targets) without building the (M, V) logits (tied lm_head).

    x (M, C), weight (V, C) (as wte.weight, padded rows included), targets (M,) int64 -> fp32 scalar.
    num_classes (default V): rows of weight past it are padding, not classes (zero gradient).
    The products run in x's dtype, or in the autocast dtype under autocast (x is cast; the weight is
    read in its own dtype and cast once per call), losses in fp32. grad_x comes back in x's dtype and
    grad_weight in weight's dtype, summed over the chunks in fp32. Computed in chunks of rows (default
    `default_chunk_size`), so the extra memory is about chunk_size * V logits plus an fp32 (V, C)
    gradient. Gradients are computed in the forward when grad is enabled and x or weight requires grad.
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
    vocab = weight.shape[0]
    num_classes = _check_num_classes(op, num_classes, vocab, "V")
    (x,) = cast_floats(autocast_dtype(x.device.type), x)  # activations in the autocast dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], vocab, x.shape[1], x.element_size())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int; got {chunk_size!r}")
    if check_targets:
        _check_target_range(op, targets, num_classes, ignore_index)
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(x, weight, targets, int(ignore_index), int(chunk_size), compute_grad,
                                            None if num_classes == vocab else num_classes)
