"""The "torch" side of the switch: one plain-PyTorch function per public op of gpt2_triton.kernels, with that
op's signature (the fast eager baseline; kernels/reference.py holds the fp32 test oracles).

`OPS` maps each public op's name to its function here; model/ops.py picks between it and the Triton op.
"""
import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from gpt2_triton.kernels import reference
from gpt2_triton.kernels.utils import document_bounds, merge_heads, split_heads


def layer_norm(x, weight, bias, eps=1e-5, out_dtype=None):
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_layer_norm(x, branch, branch_bias, weight, bias, eps=1e-5, out_dtype=None):
    residual = x if branch is None else x + branch if branch_bias is None else x + branch + branch_bias
    return residual, layer_norm(residual, weight, bias, eps, out_dtype)


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def embedding(idx, wte, wpe, pos=None):
    positions = wpe[: idx.shape[-1]] if pos is None else F.embedding(pos, wpe)
    return F.embedding(idx, wte) + positions


def flash_attention(q, k, v, causal=True, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def flash_attention_qkv(qkv, n_head, causal=True, scale=None, documents=None):
    """The (B, T, 3C) QKV projection -> (B, T, C), heads side by side, through SDPA; with documents (from
    `document_mask`) through FlexAttention's block mask or SDPA's dense mask."""
    q, k, v = split_heads(qkv, n_head)  # (B, nh, T, hs) each
    if documents is None:
        return merge_heads(flash_attention(q, k, v, causal, scale))
    if not causal:
        raise ValueError("attention_qkv: the torch kernels' document masks are causal; got causal=False")
    if isinstance(documents, torch.Tensor):  # (B, 1, T, T) bool
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=documents, scale=scale))
    return merge_heads(_compiled_flex_attention()(q, k, v, block_mask=documents, scale=scale))


@functools.cache
def _compiled_flex_attention():
    """FlexAttention runs its fused kernels only compiled (eager it builds the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def document_mask(starts):
    """(B, T) bool document starts -> the causal document mask flash_attention_qkv takes, built once per
    forward: on CUDA a FlexAttention BlockMask (whole tiles across documents are skipped); elsewhere a
    dense (B, 1, T, T) bool mask for SDPA, since FlexAttention on CPU has no backward (torch 2.13) and
    its forward is slower than SDPA with the mask."""
    documents = document_bounds(starts)  # (B, 2, T)
    if starts.device.type != "cuda":
        return reference.document_mask(documents, causal=True)
    from torch.nn.attention.flex_attention import create_block_mask
    first = documents[:, 0]  # (B, T): where each token's document begins

    def causal_document(b, h, q_idx, kv_idx):
        return (kv_idx >= first[b, q_idx]) & (kv_idx <= q_idx)
    B, T = starts.shape
    return create_block_mask(causal_document, B, None, T, T, device=starts.device)


class VarlenPlan:
    """What flash_attention_varlen needs besides q, k, v for one set of cu_seqlens: gather indices that pad
    each sequence to (max_seqlen_q | max_seqlen_k) rows, the (N, 1, max_q, max_k) SDPA mask, and where each
    packed query sits in the padded output. Built with device ops only (no host sync)."""

    def __init__(self, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k, causal=True,
                 seqused_k=None):
        cu_q, cu_k, used_k = cu_seqlens_q, cu_seqlens_k, seqused_k
        device, n = cu_q.device, cu_q.numel() - 1
        max_q, max_k = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
        len_q = cu_q.diff().long()  # (N,)
        len_k = cu_k.diff().long() if used_k is None else used_k.long()
        iq, ik = torch.arange(max_q, device=device), torch.arange(max_k, device=device)
        self.rows_q = (cu_q[:-1, None].long() + iq).clamp(max=total_q - 1).flatten()  # (N * max_q,)
        self.rows_k = (cu_k[:-1, None].long() + ik).clamp(min=0, max=max(total_k - 1, 0)).flatten()
        mask = (ik < len_k[:, None])[:, None, :]  # (N, 1, max_k)
        if causal:
            mask = mask & (ik[None, None, :] <= (iq[None, :] + (len_k - len_q)[:, None])[:, :, None])
        mask = mask.expand(n, max_q, max_k)
        self.seen = mask.any(dim=-1, keepdim=True)  # (N, max_q, 1): a query without keys gets 0
        self.mask = (mask | ~self.seen)[:, None]  # (N, 1, max_q, max_k)
        seq = torch.searchsorted(cu_q[1:].long(), torch.arange(total_q, device=device), right=True)
        self.out_rows = seq * max_q + torch.arange(total_q, device=device) - cu_q[seq].long()  # (total_q,)
        self.shape = (n, max_q, max_k)
        self.sizes = (total_q, total_k, causal)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           scale=None, *, seqused_k=None, check_seqlens=True, plan=None):
    """Packed q (total_q, H, D), k, v (total_k, H, D) through SDPA: each sequence gathered into a padded
    (N, H, max_len, D) batch, one mask, the real queries gathered back. `plan`: a VarlenPlan of these
    cu_seqlens, built once by the caller for the layers that share them (else built here)."""
    total_q, H, D = q.shape
    if total_q == 0:
        return q.new_empty(q.shape)
    if plan is None:
        plan = VarlenPlan(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, k.shape[0], causal,
                          seqused_k)
    elif plan.sizes != (total_q, k.shape[0], causal):
        raise ValueError(f"flash_attention_varlen: the plan is for (total_q, total_k, causal) {plan.sizes}; "
                         f"got {(total_q, k.shape[0], causal)}")
    n, max_q, max_k = plan.shape
    qp = q.index_select(0, plan.rows_q).view(n, max_q, H, D).transpose(1, 2)
    kp, vp = (t.index_select(0, plan.rows_k).view(n, max_k, H, D).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.mask, scale=scale)  # (N, H, max_q, D)
    out = out.transpose(1, 2) * plan.seen[..., None]  # (N, max_q, H, D)
    return out.reshape(n * max_q, H, D).index_select(0, plan.out_rows)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, *, recompute=False):
    """recompute: c_fc and the GELU run again in backward (torch.utils.checkpoint), so the GELU's input,
    the (..., 4C) c_fc output, is not kept; c_proj still keeps the GELU output it multiplies."""
    if not (recompute and torch.is_grad_enabled()):
        return reference.gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, upcast=False)
    hidden = torch.utils.checkpoint.checkpoint(_fc_gelu, x, fc_weight, fc_bias, use_reentrant=False)
    return F.linear(hidden, proj_weight, proj_bias).to(x.dtype)


def _fc_gelu(x, fc_weight, fc_bias):
    return reference.gelu_tanh(F.linear(x, fc_weight, fc_bias))


def cross_entropy(logits, targets, ignore_index=-100, *, num_classes=None):
    """F.cross_entropy on the logits in fp32 (as autocast runs it), mean over the rows not ignored."""
    return reference.cross_entropy(logits, targets, ignore_index, num_classes=num_classes)


def linear_cross_entropy(x, weight, targets, ignore_index=-100, *, num_classes=None):
    return reference.linear_cross_entropy(x, weight, targets, ignore_index, num_classes=num_classes)


OPS = {
    "layer_norm": layer_norm, "add_layer_norm": add_layer_norm, "linear": linear, "embedding": embedding,
    "flash_attention": flash_attention, "flash_attention_qkv": flash_attention_qkv,
    "flash_attention_varlen": flash_attention_varlen, "gelu_mlp": gelu_mlp, "cross_entropy": cross_entropy,
    "linear_cross_entropy": linear_cross_entropy,
}
