"""Triton kernels for GPT-2, one module per op; this package only hands the public ops on.

    from gpt2_triton.kernels import (flash_attention, flash_attention_qkv, flash_attention_varlen, layer_norm,
                                     add_layer_norm, gelu_mlp, linear_gelu, cross_entropy, linear_cross_entropy,
                                     linear, embedding, document_bounds)

Names resolve on first use, so `import gpt2_triton.kernels.reference` (plain PyTorch) never imports triton.
Modules: attention (a package: dense, packed and document-masked attention), norm (LayerNorm, and the residual
add fused into it), mlp (GELU-MLP), loss (cross-entropy), projection (linear: the attention projections on
cuBLAS, fp32 weight grads into .grad), embeddings (token + position); grads (parameter grads straight into
.grad, and the reduction of per-program partials), reference (PyTorch), autotune, utils and compat (every
triton internal the package touches, one test each in tests/test_compat.py).
"""
import importlib

# public op -> the module it is imported from
OP_MODULES = {
    "flash_attention": "gpt2_triton.kernels.attention",
    "flash_attention_qkv": "gpt2_triton.kernels.attention",
    "flash_attention_varlen": "gpt2_triton.kernels.attention",
    "layer_norm": "gpt2_triton.kernels.norm",
    "add_layer_norm": "gpt2_triton.kernels.norm",
    "gelu_mlp": "gpt2_triton.kernels.mlp",
    "linear_gelu": "gpt2_triton.kernels.mlp",
    "cross_entropy": "gpt2_triton.kernels.loss",
    "linear_cross_entropy": "gpt2_triton.kernels.loss",
    "linear": "gpt2_triton.kernels.projection",
    "embedding": "gpt2_triton.kernels.embeddings",
}
KERNEL_MODULES = (  # the modules that define Triton kernels (tests/test_kernels_package.py checks the list)
    "gpt2_triton.kernels.attention.core", "gpt2_triton.kernels.attention.dense", "gpt2_triton.kernels.attention.varlen",
    "gpt2_triton.kernels.norm", "gpt2_triton.kernels.mlp", "gpt2_triton.kernels.loss", "gpt2_triton.kernels.embeddings",
    "gpt2_triton.kernels.grads",
)
HELPERS = {"document_bounds": "gpt2_triton.kernels.utils"}  # plain PyTorch: no triton import

__all__ = list(OP_MODULES) + list(HELPERS)


def __getattr__(name):
    if name in OP_MODULES or name in HELPERS:
        op = getattr(importlib.import_module({**OP_MODULES, **HELPERS}[name]), name)
        globals()[name] = op
        return op
    raise AttributeError(f"module 'gpt2_triton.kernels' has no attribute {name!r}")
