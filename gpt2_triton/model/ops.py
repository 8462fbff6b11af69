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

from gpt2_triton import kernels as triton_kernels
from gpt2_triton import versions
from gpt2_triton.kernels.utils import document_bounds, is_interpreter
from gpt2_triton.model import torch_ops

OP_NAMES = ("layer_norm", "attention", "gelu_mlp", "cross_entropy", "linear", "embedding")
IMPLS = ("torch", "triton")
# op -> the public functions that serve it (each in gpt2_triton.model.torch_ops and gpt2_triton.kernels)
OP_FUNCTIONS = {
    "layer_norm": ("layer_norm", "add_layer_norm"),
    "attention": ("flash_attention", "flash_attention_qkv", "flash_attention_varlen"),
    "gelu_mlp": ("gelu_mlp",),
    "cross_entropy": ("cross_entropy", "linear_cross_entropy"),
    "linear": ("linear",),
    "embedding": ("embedding",),
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
    if triton_ops and (untested := versions.problem("triton")):
        return untested
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
    varlen_plan: Callable | None  # (cu_seqlens..., total_q, total_k, causal, seqused_k) -> attention_varlen's
    #                               `plan=` for layers sharing cu_seqlens (torch); None: the op takes none
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
            fns.update({name: torch_ops.OPS[name] for name in OP_FUNCTIONS[op]})
        else:
            for name, fn in _load_triton(op).items():
                if op == "cross_entropy":  # the model checks target ids itself, without a second sync
                    fn = functools.partial(fn, check_targets=False)
                if name == "flash_attention_varlen":  # the model builds its cu_seqlens itself
                    fn = functools.partial(fn, check_seqlens=False)
                fns[name] = fn  # each public op applies the autocast policy itself (kernels/utils.py)
    torch_attention = choice["attention"] == "torch"
    document_mask = torch_ops.document_mask if torch_attention else document_bounds
    return Ops(layer_norm=fns["layer_norm"], add_layer_norm=fns["add_layer_norm"], linear=fns["linear"],
               embedding=fns["embedding"], attention=fns["flash_attention"],
               attention_qkv=fns["flash_attention_qkv"], attention_varlen=fns["flash_attention_varlen"],
               document_mask=document_mask, varlen_plan=torch_ops.VarlenPlan if torch_attention else None,
               gelu_mlp=fns["gelu_mlp"],
               cross_entropy=fns["cross_entropy"], linear_cross_entropy=fns["linear_cross_entropy"],
               choice=choice)
