"""Token + position embedding: GPT-2's first op, x = wte[idx] + wpe[pos], one pass forward; the backward
adds the rows' gradient straight into the tables' `.grad` (grads.py).

Forward: one program per row, the sum in fp32, written in wte's dtype (fp32 master weights: the fp32
residual stream). Backward: wpe's gradient for positions 0..T-1 of every row is the sum over the batch,
one `sum_partials` launch (rows summed in a fixed order); wte's is a scatter-add of the rows into their
tokens' rows (`index_put_(accumulate=True)`: sorted by token on CUDA, one row after another on CPU, so
deterministic on both). GPT-2 ties wte to lm_head: the loss's weight gradient and this one add into one
`.grad`, with no (V, C) sum of the two made first.
"""
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.grads import GradSinks, sum_partials
from gpt2_triton.kernels.utils import autocast_disabled, check_device, check_float, device_guard, is_interpreter


@triton.jit
def _embedding_fwd_kernel(
    idx_ptr,  # (M,) int64 / int32 token ids
    pos_ptr,  # (M,) positions when HAS_POS, else row % T
    wte_ptr,  # (V, N)
    wpe_ptr,  # (P, N)
    out_ptr,  # (M, N)
    T, feat_dim, stride_wte, stride_wpe, stride_out,
    HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < feat_dim
    token = tl.load(idx_ptr + row).to(tl.int64)
    if HAS_POS:
        position = tl.load(pos_ptr + row).to(tl.int64)
    else:
        position = row % T
    x = tl.load(wte_ptr + token * stride_wte + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(wpe_ptr + position * stride_wpe + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, x.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("gpt2_triton::embedding_fwd", mutates_args=())
def embedding_fwd(idx: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, T: int,
                  pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """idx (M,) ids, wte (V, N), wpe (P, N) -> (M, N) in wte's dtype: wte[idx] + wpe[pos], pos (M,) or, when
    None, the position in a row of T (row % T)."""
    num_rows, feat_dim = idx.shape[0], wte.shape[1]
    with autocast_disabled(idx.device.type):
        out = torch.empty((num_rows, feat_dim), dtype=wte.dtype, device=idx.device)
    if num_rows == 0:
        return out
    block_n = triton.next_power_of_2(feat_dim)
    with device_guard(idx.device):
        _embedding_fwd_kernel[(num_rows,)](
            idx, pos, wte, wpe, out, T, feat_dim, wte.stride(0), wpe.stride(0), out.stride(0),
            HAS_POS=pos is not None, BLOCK_N=block_n, num_warps=1 if is_interpreter() else max(block_n // 256, 1))
    return out


@embedding_fwd.register_fake
def _(idx, wte, wpe, T, pos=None):
    return wte.new_empty((idx.shape[0], wte.shape[1]))


@torch.library.custom_op("gpt2_triton::embedding_bwd", mutates_args=("dwte", "dwpe"))
def embedding_bwd(dout: torch.Tensor, idx: torch.Tensor, T: int, pos: Optional[torch.Tensor],
                  dwte: Optional[torch.Tensor], dwpe: Optional[torch.Tensor], accumulate: Sequence[bool]) -> None:
    """dout (M, N) -> the tables' grads: dwte (V, N) and dwpe (P, N) (contiguous; None: not wanted), added to
    what they hold where `accumulate` (one flag each) says so. Rows never indexed get 0 (or keep theirs)."""
    with autocast_disabled(dout.device.type):
        if dwte is not None:
            if not accumulate[0]:
                dwte.zero_()
            dwte.index_put_((idx,), dout.to(dwte.dtype), accumulate=True)
        if dwpe is not None:
            if pos is not None:
                if not accumulate[1]:
                    dwpe.zero_()
                dwpe.index_put_((pos,), dout.to(dwpe.dtype), accumulate=True)
            else:  # every row of T positions: wpe[t]'s grad is the sum over the rows at position t
                rows, feat_dim = dout.shape[0] // T, dout.shape[1]
                if not accumulate[1] and T < dwpe.shape[0]:
                    dwpe[T:].zero_()
                sum_partials([(dout.reshape(rows, T * feat_dim), dwpe[:T], accumulate[1])])


class EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, wte, wpe, pos):
        T = idx.shape[-1]
        flat_idx = idx.reshape(-1)
        flat_pos = pos.reshape(-1) if pos is not None else None
        out = embedding_fwd(flat_idx, wte, wpe, T, flat_pos)
        ctx.save_for_backward(flat_idx, flat_pos)
        ctx.T = T
        ctx.sinks = GradSinks((wte, wpe), ctx.needs_input_grad[1:3])
        return out.view(*idx.shape, wte.shape[1])

    @staticmethod
    def backward(ctx, dout):
        flat_idx, flat_pos = ctx.saved_tensors
        dwte, dwpe = ctx.sinks.buffers(ctx.needs_input_grad[1:3])
        embedding_bwd(dout.reshape(flat_idx.shape[0], -1), flat_idx, ctx.T, flat_pos, dwte.tensor, dwpe.tensor,
                      (dwte.accumulate, dwpe.accumulate))
        return None, dwte.returned(), dwpe.returned(), None


def embedding(idx: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, pos: Optional[torch.Tensor] = None):
    """wte[idx] + wpe[pos]: idx (..., T) int64 or int32 token ids, wte (V, N), wpe (P, N) of one float dtype,
    pos of idx's shape or None (positions 0..T-1 along the last dim) -> (..., T, N) in wte's dtype, summed in
    fp32. The ids and positions must index their tables (the model checks them once, without a host sync:
    `gpt2_triton.model.gpt.check_token_ids`); an id outside them reads another row."""
    op = "embedding"
    for name, t in (("idx", idx), ("pos", pos)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32)):
            raise TypeError(f"{op}: {name} must be an int64 or int32 tensor; got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    check_float(op, "wte", wte)
    check_float(op, "wpe", wpe)
    if idx.dim() < 1 or idx.numel() == 0:
        raise ValueError(f"{op}: idx must be non-empty (..., T) ids; got shape {tuple(idx.shape)}")
    if wte.dim() != 2 or wpe.dim() != 2 or wte.shape[1] != wpe.shape[1] or wte.dtype != wpe.dtype:
        raise ValueError(f"{op}: wte (V, N) and wpe (P, N) must share N and dtype; got wte {tuple(wte.shape)} "
                         f"{wte.dtype}, wpe {tuple(wpe.shape)} {wpe.dtype}")
    if pos is None and idx.shape[-1] > wpe.shape[0]:
        raise ValueError(f"{op}: {idx.shape[-1]} positions exceed wpe's {wpe.shape[0]} rows")
    if pos is not None and pos.shape != idx.shape:
        raise ValueError(f"{op}: pos must have idx's shape {tuple(idx.shape)}; got {tuple(pos.shape)}")
    check_device(op, idx=idx, wte=wte, wpe=wpe, pos=pos)
    return EmbeddingFunction.apply(idx, wte, wpe, pos)
