"""The public attention ops and their autograd Functions: `flash_attention` (q, k, v as (B, H, T, D)),
`flash_attention_qkv` (the model's op: the (B, T, 3C) QKV projection in, (B, T, C) out, optionally
document-masked) and `flash_attention_varlen` (sequences packed along the token axis). Each op
validates its input here, the one place that raises errors in words, and runs the custom ops of
dense.py or varlen.py with autocast off.
"""
from typing import Optional

import torch

from gpt2_triton.kernels.attention.core import (
    check_causal,
    check_documents,
    check_inputs,
    check_max_seqlen,
    check_qkv,
    check_qkv_floats,
    check_seqlen_values,
    check_varlen,
    resolve_scale,
)
from gpt2_triton.kernels.attention.dense import (
    flash_attention_bwd,
    flash_attention_fwd,
    flash_attention_qkv_bwd,
    flash_attention_qkv_fwd,
)
from gpt2_triton.kernels.attention.varlen import (
    flash_attention_qkv_documents_bwd,
    flash_attention_qkv_documents_fwd,
    flash_attention_varlen_bwd,
    flash_attention_varlen_fwd,
)
from gpt2_triton.kernels.utils import autocast_disabled, autocast_dtype, cast_floats, check_float


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = flash_attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


class FlashAttentionQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head, causal, scale):
        y, lse = flash_attention_qkv_fwd(qkv, n_head, causal, scale)
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head, ctx.causal, ctx.scale = n_head, causal, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        qkv, y, lse = ctx.saved_tensors
        return flash_attention_qkv_bwd(dy, qkv, y, lse, ctx.n_head, ctx.causal, ctx.scale), None, None, None


class FlashAttentionQKVDocumentsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, documents, n_head, causal, scale):
        y, lse = flash_attention_qkv_documents_fwd(qkv, documents, n_head, causal, scale)
        ctx.save_for_backward(qkv, documents, y, lse)
        ctx.n_head, ctx.causal, ctx.scale = n_head, causal, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        qkv, documents, y, lse = ctx.saved_tensors
        dqkv = flash_attention_qkv_documents_bwd(dy, qkv, documents, y, lse, ctx.n_head, ctx.causal, ctx.scale)
        return dqkv, None, None, None, None


class FlashAttentionVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, seqused_k):
        o, lse = flash_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            causal, scale, seqused_k)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, seqused_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, seqused_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, causal, scale = ctx.args
        dq, dk, dv = flash_attention_varlen_bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, causal, scale, seqused_k)
        return dq, dk, dv, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The public ops
# ----------------------------------------------------------------------------------------------
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * q @ k^T [causal mask]) @ v without building the (T, T) matrix.

    q, k, v: (B, H, T, D), any strides (e.g. transposed views of the QKV projection), one float dtype,
    D in {16, 32, 64, 128}, T >= 1. scale defaults to 1/sqrt(D). Returns (B, H, T, D) in q's dtype,
    stored as (B, T, H, D) so that `y.transpose(1, 2).contiguous()` costs nothing. Under autocast
    q, k, v are cast to the autocast dtype (the output is in that dtype; grads flow back to the
    original dtypes), as for F.scaled_dot_product_attention.
    """
    op = "flash_attention"
    check_qkv_floats(op, q, k, v)  # before the autocast cast reads .device and .dtype
    device_type = q.device.type
    q, k, v = cast_floats(autocast_dtype(device_type), q, k, v)
    check_inputs(op, q, k, v)
    check_causal(op, causal)
    scale = resolve_scale(op, scale, q.shape[-1])
    with autocast_disabled(device_type):
        return FlashAttentionFunction.apply(q, k, v, causal, scale)


def flash_attention_qkv(qkv: torch.Tensor, n_head: int, causal: bool = True,
                        scale: Optional[float] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention straight from the QKV projection's output, back to c_proj's input.

    qkv: (B, T, 3C) as nn.Linear(C, 3C) returns it (q | k | v along the last dim, heads side by side,
    C = n_head * D, D in {16, 32, 64, 128}), any strides. Returns y (B, T, C), heads side by side.
    Its gradient dqkv (B, T, 3C) is written by the kernels straight into one buffer in qkv's layout.
    Same math as flash_attention on the head views of qkv; same autocast rule (qkv is cast).
    documents: (B, 2, T) int32 from `document_bounds` (rows packed with several documents): each query
    sees only keys of its own document, and key tiles wholly outside its documents are skipped
    (varlen.py's kernels; without documents dense.py's).
    """
    op = "flash_attention_qkv"
    check_float(op, "qkv", qkv)
    device_type = qkv.device.type
    (qkv,) = cast_floats(autocast_dtype(device_type), qkv)
    check_qkv(op, qkv, n_head)
    check_causal(op, causal)
    scale = resolve_scale(op, scale, qkv.shape[-1] // (3 * n_head))
    if documents is not None:
        check_documents(op, documents, qkv.shape[0], qkv.shape[1], qkv.device)
        with autocast_disabled(device_type):
            return FlashAttentionQKVDocumentsFunction.apply(qkv, documents, n_head, causal, scale)
    with autocast_disabled(device_type):
        return FlashAttentionQKVFunction.apply(qkv, n_head, causal, scale)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: Optional[float] = None, *, seqused_k: Optional[torch.Tensor] = None,
                           check_seqlens: bool = True) -> torch.Tensor:
    """Attention over sequences packed along the token axis, as flash_attn_varlen_func takes them.

    q: (total_q, H, D); k, v: (total_k, H, D); one float dtype, any strides, D in {16, 32, 64, 128}.
    cu_seqlens_q, cu_seqlens_k: (N + 1,) int32, starting at 0, non-decreasing, ending at total_q /
    total_k: sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] against k, v[cu_seqlens_k[i]:
    cu_seqlens_k[i + 1]] (empty sequences allowed). max_seqlen_q/k: ints >= every length (the autotune
    key). causal: query j of a sequence sees keys up to j + len_k - len_q (bottom-right aligned); a
    query that sees no key gets 0. seqused_k (N,) int32: sequence i uses only its first seqused_k[i]
    keys (a KV cache's filled part; the other rows get zero grads). scale defaults to 1/sqrt(D).
    Returns (total_q, H, D) in q's dtype; under autocast q, k, v are cast to the autocast dtype, as
    for F.scaled_dot_product_attention. check_seqlens: check the values of cu_seqlens (and seqused_k):
    a ValueError on CPU, one device-side assert (no host sync) on a GPU.
    """
    op = "flash_attention_varlen"
    check_qkv_floats(op, q, k, v)
    device_type = q.device.type
    q, k, v = cast_floats(autocast_dtype(device_type), q, k, v)
    max_seqlen_q = check_max_seqlen(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = check_max_seqlen(op, "max_seqlen_k", max_seqlen_k)
    check_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    check_causal(op, causal)
    scale = resolve_scale(op, scale, q.shape[-1])
    if check_seqlens:
        check_seqlen_values(op, cu_seqlens_q, cu_seqlens_k, seqused_k, q.shape[0], k.shape[0], max_seqlen_q,
                            max_seqlen_k)
    with autocast_disabled(device_type):
        return FlashAttentionVarlenFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  causal, scale, seqused_k)
