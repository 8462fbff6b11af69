"""Plain PyTorch references for every public op, same signatures as the Triton versions.

By default each computes in fp32 (`upcast=True`) and returns the input's dtype (losses stay fp32).
`upcast=False` computes in the input's own dtype: that is "PyTorch's own error in that dtype",
the yardstick for the low-precision tolerances in the tests.
"""
import math

import torch
import torch.nn.functional as F

from gpt2_triton.kernels.utils import merge_heads, split_heads


def _maybe_upcast(upcast, *tensors):
    return tuple(t.float() if upcast and t is not None else t for t in tensors)


def layer_norm(x, weight, bias, eps=1e-5, out_dtype=None, *, upcast=True):
    """x (..., N), weight/bias (N,) -> (..., N) in out_dtype (default x's dtype)."""
    xf, wf, bf = _maybe_upcast(upcast, x, weight, bias)
    return F.layer_norm(xf, (x.shape[-1],), wf, bf, eps).to(out_dtype or x.dtype)


def flash_attention(q, k, v, causal=True, scale=None, *, upcast=True):
    """q, k, v (B, H, T, D) -> (B, H, T, D); materialises the (T, T) scores on purpose."""
    dtype = q.dtype
    q, k, v = _maybe_upcast(upcast, q, k, v)
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(dtype)


def _masked_attention(q, k, v, mask, scale, upcast):
    """softmax(scale * q @ k^T) @ v over the keys `mask` keeps (bool, broadcast against the scores); a
    query that keeps no key gets 0."""
    dtype = q.dtype
    q, k, v = _maybe_upcast(upcast, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seen = mask.any(dim=-1, keepdim=True)  # rows without a key attend to all, then are zeroed: no NaN
    scores = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~(mask | ~seen), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v * seen).to(dtype)


def document_mask(documents, causal=True):
    """(B, 1, T, T) bool: query t sees key s of its own document (and s <= t if causal); documents
    (B, 2, T) from `document_bounds`."""
    T = documents.shape[-1]
    s = torch.arange(T, device=documents.device)
    start, end = documents[:, 0, :, None], documents[:, 1, :, None]  # (B, T, 1)
    mask = (s >= start) & (s <= (s[:, None] if causal else end - 1))  # (B, T, T)
    return mask[:, None]


def flash_attention_qkv(qkv, n_head, causal=True, scale=None, documents=None, *, upcast=True):
    """qkv (B, T, 3C) as c_attn returns it (q | k | v, heads side by side) -> y (B, T, C), heads side by side.
    documents (B, 2, T) from `document_bounds`: each query sees only keys of its own document."""
    q, k, v = split_heads(qkv, n_head)  # (B, H, T, D) each
    if documents is None:
        return merge_heads(flash_attention(q, k, v, causal, scale, upcast=upcast))
    return merge_heads(_masked_attention(q, k, v, document_mask(documents, causal), scale, upcast))


def varlen_mask(cu_seqlens_q, cu_seqlens_k, causal=True, seqused_k=None):
    """(total_q, total_k) bool: block-diagonal over the packed sequences, bottom-right causal."""
    total_q, total_k = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    device = cu_seqlens_q.device
    len_q, len_k = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
    used = len_k if seqused_k is None else seqused_k.long()
    seq_q = torch.repeat_interleave(torch.arange(len_q.numel(), device=device), len_q)  # (total_q,)
    seq_k = torch.repeat_interleave(torch.arange(len_k.numel(), device=device), len_k)  # (total_k,)
    i = torch.arange(total_q, device=device) - cu_seqlens_q[:-1].long()[seq_q]  # position in its sequence
    j = torch.arange(total_k, device=device) - cu_seqlens_k[:-1].long()[seq_k]
    mask = (seq_q[:, None] == seq_k[None, :]) & (j[None, :] < used[seq_k][None, :])
    if causal:
        mask &= j[None, :] <= (i + used[seq_q] - len_q[seq_q])[:, None]
    return mask


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           scale=None, *, seqused_k=None, check_seqlens=True, upcast=True):
    """Packed q (total_q, H, D), k, v (total_k, H, D) -> (total_q, H, D), through the dense
    (total_q, total_k) mask of `varlen_mask`."""
    mask = varlen_mask(cu_seqlens_q, cu_seqlens_k, causal, seqused_k)
    out = _masked_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale, upcast)
    return out.transpose(0, 1)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def linear_gelu(x, weight, bias, *, upcast=True):
    """gelu_tanh(x @ weight.T + bias); weight (N, K) in nn.Linear layout."""
    dtype = x.dtype
    x, weight, bias = _maybe_upcast(upcast, x, weight, bias)
    return gelu_tanh(F.linear(x, weight, bias)).to(dtype)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, *, upcast=True):
    """c_proj(gelu_tanh(c_fc(x))): x (..., C), fc (4C, C), proj (C, 4C) -> (..., C)."""
    dtype = x.dtype
    x, fc_weight, fc_bias, proj_weight, proj_bias = _maybe_upcast(
        upcast, x, fc_weight, fc_bias, proj_weight, proj_bias)
    hidden = gelu_tanh(F.linear(x, fc_weight, fc_bias))
    return F.linear(hidden, proj_weight, proj_bias).to(dtype)


def cross_entropy(logits, targets, ignore_index=-100, *, num_classes=None, upcast=True):
    """logits (M, V), targets (M,) int64 -> mean loss over non-ignored rows, fp32 scalar.

    Only the first num_classes columns (default all) are classes. All rows ignored gives 0
    (F.cross_entropy gives NaN there).
    """
    (logits,) = _maybe_upcast(upcast, logits)
    if num_classes is not None:
        logits = logits[:, :num_classes]
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    count = (targets != ignore_index).sum().clamp(min=1)
    return (losses.sum() / count).float()


def linear_cross_entropy(x, weight, targets, ignore_index=-100, *, num_classes=None, upcast=True):
    """cross_entropy(x @ weight.T, targets): x (M, C), weight (V, C) as wte.weight is; only its first
    num_classes rows (default all) are classes."""
    xf, wf = _maybe_upcast(upcast, x, weight)
    if num_classes is not None:
        wf = wf[:num_classes]
    return cross_entropy(xf @ wf.T, targets, ignore_index, upcast=upcast)
