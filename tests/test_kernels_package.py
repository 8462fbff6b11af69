"""`kernels` as a library: the public ops import from the package; plain-PyTorch imports stay triton-free."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_public_ops_import_from_package():
    importlib.import_module("kernels.layer_norm")  # a submodule import must not shadow the op's name
    import kernels.cross_entropy  # noqa: F401
    from kernels import cross_entropy, flash_attention, gelu_mlp, layer_norm, linear_cross_entropy, linear_gelu
    from kernels.attention import flash_attention as attention_op
    from kernels.cross_entropy import linear_cross_entropy as lce_op
    from kernels.mlp import linear_gelu as linear_gelu_op

    assert flash_attention is attention_op and linear_cross_entropy is lce_op and linear_gelu is linear_gelu_op
    for fn in (cross_entropy, gelu_mlp, layer_norm):
        assert fn.__module__.startswith("kernels.") and callable(fn)
    from kernels import flash_attention_qkv
    from kernels.attention import flash_attention_qkv as attention_qkv_op
    assert flash_attention_qkv is attention_qkv_op
    assert set(kernels.__all__) == {"flash_attention", "flash_attention_qkv", "layer_norm", "gelu_mlp", "linear_gelu",
                                    "cross_entropy", "linear_cross_entropy"}
    with pytest.raises(ImportError, match="no_such_op"):
        from kernels import no_such_op  # noqa: F401


def test_torch_only_imports_do_not_import_triton():
    code = ("import sys, gpt2.data, kernels, kernels.reference\n"
            "from gpt2 import GPT, GPTConfig\n"
            "GPT(GPTConfig.from_preset('tiny'))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "from kernels import layer_norm\n"
            "assert 'triton' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
