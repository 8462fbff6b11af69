"""bench/precompile.py: what the headline compiles ahead, and that a precompiled spec is the very compile a
launch would make (the launch then reads Triton's cache). Checked without a GPU: Triton's JIT is driven
by a stand-in driver for an sm_90 target (compiling needs no device), in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import require_sm90_compiler

triton = require_sm90_compiler()
import torch  # noqa: E402

from gpt2_triton.bench import precompile  # noqa: E402
from gpt2_triton.bench.static import cases as static_cases  # noqa: E402
from gpt2_triton.bench.static.native import SM90, compile_many  # noqa: E402
from gpt2_triton.bench.static.trace import TensorMeta, capture  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
ROOT = Path(__file__).resolve().parent.parent

# Drives Triton's JIT for sm_90 without a GPU: JITFunction.warmup compiles a launch's specialization as its
# first launch would, under accounting() (which counts compiles through Triton's JIT hooks).
_JIT_WARMUP = """
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class SM90Driver:
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device): return 0
    def get_active_torch_device(self): return torch.device("cpu")

driver.set_active(SM90Driver())
from gpt2_triton.kernels import norm
from gpt2_triton.kernels.autotune import accounting

launch = json.loads(sys.argv[1])
args = [torch.empty(8, dtype=getattr(torch, a[1])) if a[0] == "tensor" else a[1] for a in launch["args"]]
with accounting() as acct:
    norm._layer_norm_fwd_kernel.warmup(*args, grid=(1,), **launch["options"])
print(json.dumps({"compiles": [name for name, _ in acct.compiles]}))
"""


def _layer_norm_launch():
    """The launch layer_norm_fwd makes for a (64, 768) bf16 input with fp32 parameters, traced."""
    from gpt2_triton.kernels import norm
    with capture() as trace:
        x = torch.empty((64, 768), dtype=torch.bfloat16)
        norm.layer_norm_fwd(x, torch.empty(768), torch.empty(768), 1e-5)
    (launch,) = trace.launches
    return launch


def test_a_precompiled_spec_is_the_launch_compile(tmp_path):
    """The precompile worker fills Triton's cache; the JIT's compile of the launch as the launcher makes it (real
    tensors, a fresh process) then adds nothing to it: the spec carried every argument that specializes."""
    launch = _layer_norm_launch()
    (case,) = static_cases.cases_from_launches([launch])
    spec = {**case.launch_spec(), "analyze": False, "target": list(SM90)}
    cache = tmp_path / "cache"
    _, results = compile_many([spec], cache_dir=str(cache), ptxas_log=False)
    assert results[spec["id"]]["ok"], results
    entries = sorted(p.name for p in cache.iterdir())
    assert entries
    described = {"args": [["tensor", str(v.dtype).removeprefix("torch.")] if isinstance(v, TensorMeta) else ["value", v]
                          for v in launch.args.values()], "options": launch.options}  # as the launcher passes them
    script = tmp_path / "jit_warmup.py"
    script.write_text(textwrap.dedent(_JIT_WARMUP))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), json.dumps(described)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"compiles": ["_layer_norm_fwd_kernel"]}
    assert sorted(p.name for p in cache.iterdir()) == entries, "the launch compiled anew: the keys differ"


def test_precompile_covers_the_training_step_and_the_preflight():
    """Every launch of a GPT-2 micro-step (each with its first-contact candidates) and every preflight
    path are among the specs, each once."""
    specs = precompile.specs(max_configs=2)
    ids = [s["id"] for s in specs]
    assert len(ids) == len(set(ids))
    step = [c.id for c in static_cases.gpt2_cases(precompile.BATCH) if any(" x" in s for s in c.sites)
            and c.first_contact]
    assert set(step) <= set(ids)
    kernels = {s["kernel"] for s in specs}
    assert {"_flash_attention_fwd_kernel", "_matmul_kernel", "_gelu_bwd_kernel", "_cross_entropy_bwd_kernel",
            "_linear_cross_entropy_lse_kernel", "_layer_norm_bwd_kernel"} <= kernels
    assert all(s["target"] == list(SM90) and not s["analyze"] for s in specs)
