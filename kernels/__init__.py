"""Triton kernels for GPT-2. Each op lives in its own module; this package only hands names on.

    from kernels import (flash_attention, flash_attention_qkv, layer_norm, gelu_mlp, linear_gelu,
                         cross_entropy, linear_cross_entropy)

Names resolve on first use, so `import kernels.reference` (plain PyTorch) never imports triton.
`kernels.layer_norm` and `kernels.cross_entropy` are the ops, not the modules of the same name:
reach those with `importlib.import_module("kernels.layer_norm")` or `from kernels.layer_norm import ...`.
"""
import importlib
import sys
import types

# public op -> module under kernels/
_OPS = {
    "flash_attention": "kernels.attention",
    "flash_attention_qkv": "kernels.attention",
    "layer_norm": "kernels.layer_norm",
    "gelu_mlp": "kernels.mlp",
    "linear_gelu": "kernels.mlp",
    "cross_entropy": "kernels.cross_entropy",
    "linear_cross_entropy": "kernels.cross_entropy",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        op = getattr(importlib.import_module(_OPS[name]), name)
        globals()[name] = op
        return op
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing kernels.layer_norm binds the submodule to `kernels.layer_norm`; the op keeps the name.
        if name in _OPS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
