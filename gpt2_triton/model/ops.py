"""The one switch for the hot ops: picks each op's implementation ("torch" or "triton") once.

`resolve_kernels("triton")`, `resolve_kernels({"attention": "triton"})`, `resolve_kernels("attention=triton")`
-> {op: impl} for every op;
`build_ops(...)` -> an `Ops` bundle of functions the model's modules keep. Nothing else in the
library decides which implementation runs.
"""
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2_triton import kernels as triton_kernels
from gpt2_triton.kernels import reference
from gpt2_triton.kernels.utils import document_bounds, is_interpreter, merge_heads, split_heads

OP_NAMES = ("layer_norm", "attention", "gelu_mlp", "cross_entropy", "linear", "embedding")
IMPLS = ("torch", "triton")
# op -> the public functions that serve it (each implemented in torch below and in gpt2_triton.kernels)
OP_FUNCTIONS = {
    "layer_norm": ("layer_norm", "add_layer_norm"),
    "attention": ("flash_attention", "flash_attention_qkv", "flash_attention_varlen"),
    "gelu_mlp": ("gelu_mlp",),
    "cross_entropy": ("cross_entropy", "linear_cross_entropy"),
    "linear": ("linear",),
    "embedding": ("embedding",),
}


# --- the "torch" implementations: plain PyTorch, the fast eager baseline -------------------------
def torch_layer_norm(x, weight, bias, eps=1e-5, out_dtype=None):
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def torch_add_layer_norm(x, branch, branch_bias, weight, bias, eps=1e-5, out_dtype=None):
    residual = x if branch is None else x + branch if branch_bias is None else x + branch + branch_bias
    return residual, torch_layer_norm(residual, weight, bias, eps, out_dtype)


def torch_embedding(idx, wte, wpe, pos=None):
    positions = wpe[: idx.shape[-1]] if pos is None else F.embedding(pos, wpe)
    return F.embedding(idx, wte) + positions


def torch_attention(q, k, v, causal=True, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def torch_attention_qkv(qkv, n_head, causal=True, scale=None, documents=None):
    """The (B, T, 3C) QKV projection -> (B, T, C), heads side by side, through SDPA; with documents (from
    `torch_document_mask`) through FlexAttention's block mask or SDPA's dense mask."""
    q, k, v = split_heads(qkv, n_head)  # (B, nh, T, hs) each
    if documents is None:
        return merge_heads(torch_attention(q, k, v, causal, scale))
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


def torch_document_mask(starts):
    """(B, T) bool document starts -> the causal document mask torch_attention_qkv takes, built once per
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


class _VarlenPlan:
    """What torch_attention_varlen needs besides q, k, v for one set of cu_seqlens: gather indices that pad
    each sequence to (max_seqlen_q | max_seqlen_k) rows, the (N, 1, max_q, max_k) SDPA mask, and where each
    packed query sits in the padded output. Built with device ops only (no host sync)."""

    def __init__(self, cu_q, cu_k, used_k, max_q, max_k, total_q, total_k, causal):
        self.key = (cu_q, cu_k, used_k, max_q, max_k, total_q, total_k, causal)
        device, n = cu_q.device, cu_q.numel() - 1
        max_q, max_k = max(max_q, 1), max(max_k, 1)
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

    def matches(self, *key) -> bool:
        return all(a is b if isinstance(a, torch.Tensor) or a is None else a == b for a, b in zip(key, self.key))


_last_varlen_plan = None  # a model's layers call with the same cu_seqlens tensors: build the plan once


def torch_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None,
                           *, seqused_k=None, check_seqlens=True):
    """flash_attention_varlen through SDPA: each sequence gathered into a padded (N, H, max_len, D) batch,
    one mask, the real queries gathered back."""
    global _last_varlen_plan
    total_q, H, D = q.shape
    if total_q == 0:
        return q.new_empty(q.shape)
    key = (cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, total_q, k.shape[0], causal)
    plan = _last_varlen_plan
    if plan is None or not plan.matches(*key):
        plan = _last_varlen_plan = _VarlenPlan(*key)
    n, max_q, max_k = plan.shape
    qp = q.index_select(0, plan.rows_q).view(n, max_q, H, D).transpose(1, 2)
    kp, vp = (t.index_select(0, plan.rows_k).view(n, max_k, H, D).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.mask, scale=scale)  # (N, H, max_q, D)
    out = out.transpose(1, 2) * plan.seen[..., None]  # (N, max_q, H, D)
    return out.reshape(n * max_q, H, D).index_select(0, plan.out_rows)


def torch_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    return reference.gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, upcast=False)


TORCH_OPS = {
    "layer_norm": torch_layer_norm,
    "add_layer_norm": torch_add_layer_norm,
    "linear": F.linear,
    "embedding": torch_embedding,
    "flash_attention": torch_attention,
    "flash_attention_qkv": torch_attention_qkv,
    "flash_attention_varlen": torch_attention_varlen,
    "gelu_mlp": torch_gelu_mlp,
    "cross_entropy": reference.cross_entropy,
    "linear_cross_entropy": reference.linear_cross_entropy,
}


def resolve_kernels(kernels="torch") -> dict:
    """{op: impl} for every op, from "torch" | "triton" | {op: impl} | the CLI form "op=impl,op=impl"
    (ops left out run torch)."""
    if isinstance(kernels, str) and "=" in kernels:
        pairs = [item.split("=", 1) for item in kernels.split(",") if item]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"kernels: expected op=impl pairs separated by commas; got {kernels!r}")
        kernels = {op.strip(): impl.strip() for op, impl in pairs}
    if isinstance(kernels, str):
        if kernels not in IMPLS:
            raise ValueError(f"kernels must be one of {IMPLS}, op=impl pairs or a dict {{op: impl}}; got {kernels!r}")
        return {op: kernels for op in OP_NAMES}
    if not isinstance(kernels, dict):
        raise TypeError(f"kernels must be a str or a dict; got {type(kernels).__name__}")
    choice = {op: "torch" for op in OP_NAMES}
    for op, impl in kernels.items():
        if op == "linear_cross_entropy":
            op = "cross_entropy"  # one choice covers both cross-entropy ops
        if op not in OP_NAMES:
            raise ValueError(f"kernels: unknown op {op!r}; ops are {OP_NAMES}")
        if impl not in IMPLS:
            raise ValueError(f"kernels: op {op!r} must be 'torch' or 'triton'; got {impl!r}")
        choice[op] = impl
    return choice


def triton_unusable(kernels, device_type: str) -> str | None:
    """Why `kernels` cannot run on `device_type` ("cuda" or "cpu"), or None: Triton kernels on a CPU need
    the interpreter, which must be chosen (TRITON_INTERPRET=1) before triton is first imported."""
    triton_ops = [op for op, impl in resolve_kernels(kernels).items() if impl == "triton"]
    if not triton_ops or device_type == "cuda" or is_interpreter():
        return None
    return (f"Triton kernels ({', '.join(triton_ops)}) need a CUDA GPU, and there is none. To run them on the CPU "
            f"through Triton's interpreter (slow), set TRITON_INTERPRET=1; or use --kernels torch.")


def triton_op_problem(op: str, config) -> str | None:
    """Why `op`'s Triton path cannot serve a model of GPTConfig `config` on a CUDA GPU, or None: triton does
    not import, or the model's shape is outside what the kernel takes."""
    try:
        _load_triton(op)
    except (ImportError, RuntimeError, OSError) as e:
        return f"triton does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if op == "attention":
        from gpt2_triton.kernels.attention import SUPPORTED_HEAD_DIMS
        if config.head_size not in SUPPORTED_HEAD_DIMS:
            return f"head dim {config.head_size} is not one of {SUPPORTED_HEAD_DIMS}"
    if op == "layer_norm":
        from gpt2_triton.kernels.norm import MAX_FEAT_DIM
        if config.n_embd > MAX_FEAT_DIM:
            return f"n_embd {config.n_embd} exceeds the kernel's {MAX_FEAT_DIM}"
    return None


def auto_kernels(config, device_type: str) -> tuple[dict, dict]:
    """What kernels="auto" runs for a model of GPTConfig `config` on `device_type`: ({op: impl}, {op: why
    it runs torch}). On CUDA every op runs Triton unless `triton_op_problem` names a reason; on a CPU every
    op runs torch (the interpreter is for tests: ask for it with kernels="triton")."""
    if device_type != "cuda":
        return {op: "torch" for op in OP_NAMES}, {}
    fallbacks = {op: problem for op in OP_NAMES if (problem := triton_op_problem(op, config))}
    return {op: "torch" if op in fallbacks else "triton" for op in OP_NAMES}, fallbacks


def kernels_spec(choice: dict) -> str:
    """{op: impl} as a --kernels value: "triton" or "torch" where every op agrees, else "op=impl,..."."""
    impls = set(choice.values())
    return impls.pop() if len(impls) == 1 else ",".join(f"{op}={impl}" for op, impl in choice.items())


def device_problem(device: str, kernels="torch") -> str | None:
    """Why a model with `kernels` cannot run on `device` (no such device, no CUDA, Triton on a CPU
    without the interpreter), or None: for tools to say before they load anything."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"--device {device}: not a device (cpu, cuda or cuda:N)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine; use --device cpu"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    try:
        problem = triton_unusable(kernels, dev.type)
    except (ValueError, TypeError) as e:
        return f"--kernels {kernels}: {e}"
    return f"--kernels {kernels}: {problem}" if problem else None


def _load_triton(op: str) -> dict:
    """The op's Triton functions; importing them imports triton, so only when a Triton op is chosen."""
    return {name: getattr(triton_kernels, name) for name in OP_FUNCTIONS[op]}


@dataclass(frozen=True)
class Ops:
    layer_norm: Callable
    add_layer_norm: Callable  # (x, branch, branch_bias, weight, bias, eps, out_dtype) -> (x + branch + bias, ln)
    linear: Callable  # (x, weight, bias=None): the attention projections
    embedding: Callable  # (idx, wte, wpe, pos=None) -> wte[idx] + wpe[pos]
    attention: Callable  # (q, k, v) (B, nh, T, hs) each -> (B, nh, T, hs)
    attention_qkv: Callable  # (qkv (B, T, 3C), n_head, documents=None) -> (B, T, C)
    attention_varlen: Callable  # packed (total, nh, hs) q, k, v, cu_seqlens, ... -> (total_q, nh, hs)
    document_mask: Callable  # (B, T) bool document starts -> what attention_qkv's `documents` takes
    gelu_mlp: Callable
    cross_entropy: Callable
    linear_cross_entropy: Callable
    choice: dict  # {op: "torch" | "triton"}

    @property
    def bias_in_norm(self) -> bool:
        """True when a projection's bias before a residual add is added by the LayerNorm after it (Triton's
        add_layer_norm, in the same pass as the add); else by the projection's matmul, as nn.Linear does."""
        return self.choice["layer_norm"] == "triton"

    @property
    def fused_lm_head_loss(self) -> bool:
        """True when the loss is computed without ever materialising the (B, T, V) logits."""
        return self.choice["cross_entropy"] == "triton"


def build_ops(kernels="torch") -> Ops:
    choice = resolve_kernels(kernels)
    fns = {}
    for op, impl in choice.items():
        if impl == "torch":
            fns.update({name: TORCH_OPS[name] for name in OP_FUNCTIONS[op]})
        else:
            for name, fn in _load_triton(op).items():
                if op == "cross_entropy":  # the model checks target ids itself, without a second sync
                    fn = functools.partial(fn, check_targets=False)
                if name == "flash_attention_varlen":  # the model builds its cu_seqlens itself
                    fn = functools.partial(fn, check_seqlens=False)
                fns[name] = fn  # each public op applies the autocast policy itself (kernels/utils.py)
    document_mask = document_bounds if choice["attention"] == "triton" else torch_document_mask
    return Ops(layer_norm=fns["layer_norm"], add_layer_norm=fns["add_layer_norm"], linear=fns["linear"],
               embedding=fns["embedding"], attention=fns["flash_attention"],
               attention_qkv=fns["flash_attention_qkv"], attention_varlen=fns["flash_attention_varlen"],
               document_mask=document_mask, gelu_mlp=fns["gelu_mlp"],
               cross_entropy=fns["cross_entropy"], linear_cross_entropy=fns["linear_cross_entropy"],
               choice=choice)
