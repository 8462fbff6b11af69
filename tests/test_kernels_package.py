"""`gpt2_triton.kernels` as a library: the public ops import from the package; plain-PyTorch imports stay
triton-free."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_public_ops_import_from_package():
    import gpt2_triton.kernels as kernels
    from gpt2_triton.kernels import (
        cross_entropy,
        flash_attention,
        gelu_mlp,
        layer_norm,
        linear_cross_entropy,
        linear_gelu,
    )
    from gpt2_triton.kernels.attention import flash_attention as attention_op
    from gpt2_triton.kernels.loss import linear_cross_entropy as lce_op
    from gpt2_triton.kernels.mlp import linear_gelu as linear_gelu_op

    assert flash_attention is attention_op and linear_cross_entropy is lce_op and linear_gelu is linear_gelu_op
    for fn in (cross_entropy, gelu_mlp, layer_norm):
        assert fn.__module__.startswith("gpt2_triton.kernels.") and callable(fn)
    from gpt2_triton.kernels import flash_attention_qkv
    from gpt2_triton.kernels.attention import flash_attention_qkv as attention_qkv_op
    assert flash_attention_qkv is attention_qkv_op
    from gpt2_triton.kernels import document_bounds, flash_attention_varlen
    from gpt2_triton.kernels.attention import flash_attention_varlen as varlen_op
    from gpt2_triton.kernels.utils import document_bounds as bounds_helper
    assert flash_attention_varlen is varlen_op and document_bounds is bounds_helper
    from gpt2_triton.kernels import add_layer_norm, embedding, linear
    from gpt2_triton.kernels.embeddings import embedding as embedding_op
    from gpt2_triton.kernels.norm import add_layer_norm as add_layer_norm_op
    from gpt2_triton.kernels.projection import linear as linear_op
    assert add_layer_norm is add_layer_norm_op and embedding is embedding_op and linear is linear_op
    assert set(kernels.__all__) == {"flash_attention", "flash_attention_qkv", "flash_attention_varlen", "layer_norm",
                                    "add_layer_norm", "gelu_mlp", "linear_gelu", "cross_entropy",
                                    "linear_cross_entropy", "linear", "embedding", "document_bounds"}
    with pytest.raises(ImportError, match="no_such_op"):
        from gpt2_triton.kernels import no_such_op  # noqa: F401


def test_torch_only_imports_do_not_import_triton():
    code = ("import sys, gpt2_triton.data, gpt2_triton.kernels, gpt2_triton.kernels.reference\n"
            "from gpt2_triton import GPT, GPTConfig\n"
            "GPT(GPTConfig.from_preset('tiny'))\n"
            "from gpt2_triton.kernels import document_bounds\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "from gpt2_triton.kernels import layer_norm\n"
            "assert 'triton' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_kernel_modules_lists_every_module_with_kernels():
    """KERNEL_MODULES (what the static profile and the headline scan) names every module, in subpackages too,
    that defines a Triton kernel (a @triton.jit function of its own source, autotuned or not)."""
    import pkgutil

    import triton

    import gpt2_triton.kernels as kernels

    def defined_in(v) -> str:
        while isinstance(v, triton.runtime.Autotuner):
            v = v.fn
        is_kernel = isinstance(v, triton.runtime.JITFunction) or type(v).__name__ == "InterpretedFunction"
        return v.fn.__module__ if is_kernel else None

    defining = set()
    for info in pkgutil.walk_packages(kernels.__path__, "gpt2_triton.kernels."):
        module = importlib.import_module(info.name)
        if any(defined_in(v) == info.name for v in vars(module).values()):
            defining.add(info.name)
    assert defining == set(kernels.KERNEL_MODULES)
