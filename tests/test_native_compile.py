"""Native compile of every Triton kernel in kernels/ for Hopper (sm_90), without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run on CPU) never lowers a kernel to
PTX / SASS, so codegen errors (layouts, dtype mismatches in tl.dot, ptxas failures, register and
shared-memory blow-ups) only show up on a GPU. Here each kernel is compiled ahead of time with
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`,
which runs the whole NVIDIA pipeline down to a cubin (ptxas included) and needs no driver.

What gets compiled is taken from the launchers themselves: each scenario below calls the real
launcher (custom op / helper) on small GPT-2-shaped CPU tensors with `is_interpreter()` patched to
False in the kernels modules (so the GPU configs are chosen), `check_device` to a no-op, and every
kernel replaced by a recorder. A recorded launch gives the kernel, its arguments (tensor dtypes and
strides, ints, None pointers, constexprs) and num_warps / num_stages; the signature, constexprs and
divisibility attributes are then built the way `JITFunction.run` specializes a launch (16-aligned
pointers and ints % 16 == 0 get tt.divisibility=16, ints == 1 become constexpr 1,
do_not_specialize honoured). Autotuned kernels (the matmul, the three attention kernels) are
compiled for the GPU configs of their module's `<kernel>_configs()` (e.g. `_matmul_configs()`),
narrowed by the autotuner's early_config_prune for the launch when it has one. Config and launcher
changes are followed without editing this file.

The compiles run in a worker subprocess without TRITON_INTERPRET: with TRITON_INTERPRET=1 set
before triton is imported (tests/conftest.py does, without a GPU) every @triton.jit function,
triton.language's own (tl.sum, tl.max, ...) included, is an InterpretedFunction, which ASTSource
cannot compile; nothing in this process is switched out of interpreter mode.

Register spills: CompiledKernel.n_spills is only set when the cubin is loaded on a device (triton
3.6 and 3.9), so spills come from `ptxas -v` run on the compiled PTX with the ptxas and flags
Triton uses. Asserted zero for the GPT-2 hot path where that holds now (see CRITICAL below).

Works with triton 3.6 (the GPU machine) and 3.9. The default run compiles one autotune config per
matmul use and dtype (rotating through the list) and every attention candidate for bf16 at D=64
causal; other sizes, head dims, the non-causal masks and the full bf16 matmul autotune sweep are
marked slow.
    python -m pytest tests/test_native_compile.py -q -m "not slow"   # default subset
    python -m pytest tests/test_native_compile.py -q                 # everything
    python tests/test_native_compile.py                              # table: regs / spills / smem
"""
import contextlib
import functools
import importlib
import inspect
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
_nv = pytest.importorskip("triton.backends.nvidia.compiler",
                          reason="triton's NVIDIA backend is not available: cannot compile for sm_90")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _ptxas_path() -> Optional[str]:
    try:
        return _nv.get_ptxas(90).path  # the ptxas Triton itself runs for sm_90 (3.6: 12.8, 3.9: 13.x)
    except Exception:  # noqa: BLE001 - any failure means "no usable ptxas"
        return None


_PTXAS = _ptxas_path()
if _PTXAS is None or not os.path.isfile(_PTXAS):
    pytest.skip("ptxas (bundled with triton's NVIDIA backend) not found: cannot compile for sm_90",
                allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = GPUTarget("cuda", 90, 32)
H100_SMEM_BYTES = 232448  # max shared memory per block on sm_90 (227 KiB)
KERNEL_MODULES = ("kernels.layer_norm", "kernels.cross_entropy", "kernels.attention", "kernels.mlp")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                    torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
COMPILE_TIMEOUT_S = 600

# Critical cases (GPT-2 hot path, bf16: LayerNorm N=768, attention D=64 causal and matmul without
# epilogue, every autotune config) must not spill. Exceptions, with the most spill-store bytes
# allowed, for the ones that spill a little now. Measured (ptxas -v, sm_90a):
#   attn_fwd-bf16-D64-causal-128x64-w4s3       triton 3.6: 4 B (255 regs)   triton 3.9: 0 (237 regs)
#   attn_bwd_dkdv-bf16-D64-causal-64x128-w8s2  triton 3.6: 4 B (255 regs)   triton 3.9: 0 (218 regs)
#   matmul-bf16-none-bias-NT-32x64x32-w2s5     triton 3.6: 8 B (80 regs)    triton 3.9: 0 (87 regs)
# Not critical (not asserted) and spilling now: the GELU / GELU-gradient matmul epilogues with the
# large tiles (bf16 up to ~6 KB on 3.6), LayerNorm backward at N=16384, fp32 attention at D=128
# (forward 32x32, ~600 B), fp32 forward 64x64 at D=64 (3.9: ~500 B), fp16/bf16 dK/dV 64x64 at
# D=128 (3.6: 28 B).
SPILL_BUDGET_BYTES = {
    "attn_fwd-bf16-D64-causal-128x64-w4s3": 16,
    "attn_bwd_dkdv-bf16-D64-causal-64x128-w8s2": 16,
    "matmul-bf16-none-bias-NT-32x64x32-w2s5": 16,
}


# ----------------------------------------------------------------------------------------------
# Kernel objects: JITFunction (native), InterpretedFunction (TRITON_INTERPRET=1), Autotuner
# ----------------------------------------------------------------------------------------------
def _is_kernel(obj) -> bool:
    return isinstance(obj, (JITFunction, triton.runtime.Autotuner)) or type(obj).__name__ == "InterpretedFunction"


def _raw(obj):
    """The JITFunction / InterpretedFunction under an Autotuner (or the object itself)."""
    return obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj


def _param_info(fn):
    """(arg names, constexpr arg names, do_not_specialize arg names) of a JITFunction or an
    InterpretedFunction, read from the Python function (same rules as JITFunction's KernelParam)."""
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    constexprs = {n for n, p in params.items()
                  if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}
    if isinstance(fn, JITFunction):
        no_spec = {p.name for p in fn.params if p.do_not_specialize}
    else:
        no_spec = {names[x] if isinstance(x, int) else x for x in (fn.kwargs.get("do_not_specialize") or ())}
    return names, constexprs, no_spec


# ----------------------------------------------------------------------------------------------
# Launch capture: run the real launchers with every kernel replaced by a recorder
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    module: str
    name: str  # attribute name of the launched kernel (e.g. "_matmul" for the autotuner)
    fn: Any  # raw kernel object (JITFunction or InterpretedFunction)
    args: dict  # kernel arg name -> value, as passed (tensors, ints, floats, None, constexprs)
    options: dict  # num_warps / num_stages passed at launch
    configs: Optional[list] = None  # triton.Config list when the kernel is autotuned
    tags: tuple = field(default_factory=tuple)


class _Recorder:
    def __init__(self, module, name, kernel, sink):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = _raw(self.kernel)
            names = _param_info(fn)[0]
            bound = dict(zip(names, args))
            opts = {}
            for k, v in kwargs.items():
                (bound if k in names else opts)[k] = v
            configs = None
            if isinstance(self.kernel, triton.runtime.Autotuner):
                configs = _gpu_autotune_configs(self.module, self.name)
                prune = self.kernel.early_config_prune
                if prune is not None:  # what the autotuner would benchmark for this launch
                    configs = prune(configs, dict(zip(names, args)), **kwargs)
            self.sink.append(Launch(self.module, self.name, fn, bound, opts, configs))
        return launch


def _gpu_autotune_configs(module_name, name):
    """The autotuner's configs as on GPU. They are built at import time (under the interpreter: the
    one small interpreter config), so rebuild them with the module's config function when it has one."""
    mod = importlib.import_module(module_name)
    tuner = getattr(mod, name) if not isinstance(getattr(mod, name), _Recorder) else getattr(mod, name).kernel
    fn = _raw(tuner)
    getter = getattr(mod, fn.__name__.removesuffix("_kernel") + "_configs", None)
    return list(getter()) if getter is not None else list(tuner.configs)


@contextlib.contextmanager
def _gpu_launch_capture():
    """In each kernels module: is_interpreter() -> False (the GPU configs), check_device -> no-op (the
    tensors are on CPU), every kernel -> a recorder. All undone on exit; kernels.utils is not touched."""
    sink = []
    saved = []
    try:
        for mod_name in KERNEL_MODULES:
            mod = importlib.import_module(mod_name)
            for name, v in list(vars(mod).items()):
                if name == "is_interpreter":
                    new = lambda: False  # noqa: E731
                elif name == "check_device":
                    new = lambda *args, **kwargs: None  # noqa: E731
                elif _is_kernel(v):
                    new = _Recorder(mod_name, name, v, sink)
                else:
                    continue
                saved.append((mod, name, v))
                setattr(mod, name, new)
        yield sink
    finally:
        for mod, name, v in reversed(saved):
            setattr(mod, name, v)


# ----------------------------------------------------------------------------------------------
# Scenarios: GPT-2-shaped calls of the launchers on small CPU tensors
# ----------------------------------------------------------------------------------------------
def _attn_qkv(B, H, T, D, dtype):
    """q, k, v as the model passes them: (B, H, T, D) views of the (B, T, 3C) QKV projection."""
    qkv = torch.empty((B, T, 3 * H * D), dtype=dtype)
    q, k, v = qkv.split(H * D, dim=2)
    return [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]


def _run_layer_norm(dtype, N, bias=True, param_dtype=torch.float32):
    ln = importlib.import_module("kernels.layer_norm")
    M = 64
    x = torch.empty((M, N), dtype=dtype)
    w = torch.empty((N,), dtype=param_dtype)
    b = torch.empty((N,), dtype=param_dtype) if bias else None
    y, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-5)
    ln.layer_norm_bwd(torch.empty_like(x), x, w, mean, rstd)


def _run_cross_entropy(dtype, V, num_classes=None):
    ce = importlib.import_module("kernels.cross_entropy")
    M = 8
    logits = torch.empty((M, V), dtype=dtype)
    targets = torch.zeros((M,), dtype=torch.int64)
    loss, stats = ce.cross_entropy_fwd(logits, targets, -100, num_classes)
    ce.cross_entropy_bwd(torch.ones((), dtype=torch.float32), logits, targets, stats, -100, num_classes)
    # linear + CE, fp32 master weight: chunked with grads (the CE kernel writes the grad in place,
    # COMPUTE_GRAD=True), and without grads the fused matmul + logsumexp kernel (autotuned)
    x, w = torch.zeros((M, 768), dtype=dtype), torch.zeros((V, 768), dtype=torch.float32)
    ce.linear_cross_entropy_fwd(x, w, targets, -100, M, True, num_classes)
    ce.linear_cross_entropy_fwd(x, w, targets, -100, M, False, num_classes)


def _run_attention(dtype, D, causal=True):
    from kernels import attention as attn
    B, H, T = 1, 12, 1024
    q, k, v = _attn_qkv(B, H, T, D, dtype)
    o, lse = attn.flash_attention_fwd(q, k, v, causal)
    do = attn._empty_bhtd(B, H, T, D, q)
    attn.flash_attention_bwd(do, q, k, v, o, lse, causal)


def _run_mlp(dtype):
    """GPT-2 MLP training step (fc + gelu, proj, and their backward) plus linear_gelu; fp32 master
    weights with fp16/bf16 activations (autocast), as the model runs them."""
    from kernels import mlp
    M, C, H = 256, 768, 3072
    x = torch.zeros((M, C), dtype=dtype)
    fc_w, fc_b = torch.zeros((H, C)), torch.zeros((H,))
    pr_w, pr_b = torch.zeros((C, H)), torch.zeros((C,))
    y, pre = mlp.gelu_mlp_fwd(x, fc_w, fc_b, pr_w, pr_b, True)
    mlp.gelu_mlp_bwd(torch.zeros_like(y), x, pre, fc_w, pr_w)
    mlp.gelu_mlp_fwd(x, fc_w, None, pr_w, None, False)  # no biases, inference (no pre stored)
    out, pre = mlp.linear_gelu_fwd(x, fc_w, fc_b, True)
    mlp.linear_gelu_bwd(torch.zeros_like(out), x, pre, fc_w)


@dataclass(frozen=True)
class Case:
    id: str
    launch: Launch
    config: Any = None  # triton.Config for autotuned kernels
    critical: bool = False  # GPT-2 hot path: must not spill (SPILL_BUDGET_BYTES)


def _capture(run, *args, **kwargs):
    with _gpu_launch_capture() as sink:
        run(*args, **kwargs)
    return sink


def _signature_key(launch):
    sig, consts, attrs = _specialize(launch, launch.configs[0] if launch.configs else None)
    return launch.name, tuple(sig.items()), tuple((k, repr(v)) for k, v in consts.items()), repr(attrs), \
        tuple(sorted(launch.options.items()))


def _dedup(launches):
    seen, out = set(), []
    for launch in launches:
        key = _signature_key(launch)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def _launch_tag(launch):
    """Readable id part for a launch: the constexprs that tell launches of one kernel apart."""
    a = launch.args
    parts = []
    if "EPILOGUE" in a:
        parts.append(["none", "gelu", "geluGrad"][a["EPILOGUE"]])
        parts.append("bias" if a["HAS_BIAS"] else "nobias")
        if a["STORE_AUX"]:
            parts.append("aux")
        sa, sb = (a["stride_am"], a["stride_ak"]), (a["stride_bk"], a["stride_bn"])
        parts.append(("T" if sa[0] == 1 else "N") + ("T" if sb[0] == 1 else "N"))
    if "HAS_BIAS" in a and "EPILOGUE" not in a and not a["HAS_BIAS"]:
        parts.append("nobias")
    if "COMPUTE_GRAD" in a:
        parts.append("grad" if a["COMPUTE_GRAD"] else "nograd")
    return "-".join(parts)


def _short(name):
    return name.lstrip("_").removesuffix("_kernel").replace("flash_attention", "attn")


def _config_id(cfg):
    kw = cfg.kwargs
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    return f"{blocks}-w{cfg.num_warps}s{cfg.num_stages}"


def _all_cases():
    """Every case, with its slow flag. Default (fast) subset, per dtype: LayerNorm N=768 and 16384,
    cross-entropy V=50257, attention D=64 causal (bf16: every autotune candidate of the three
    autotuned kernels, ~1 s each; fp32/fp16: one each, rotating through the list), and each matmul
    use (bf16: every epilogue/layout variant; fp32/fp16: one per epilogue) with one autotune config,
    rotating through the list so the default run still compiles every config. Slow: other sizes /
    head dims / non-causal (one autotune config each) and the full autotune list for every bf16
    matmul use."""
    cases = []  # (Case, slow)

    def add(run_id, launches, critical=False, slow=False):
        for launch in _dedup(launches):
            if launch.configs is not None:
                continue  # autotuned kernels: see add_autotuned
            base = "-".join(p for p in (_short(launch.fn.__name__), run_id, _launch_tag(launch)) if p)
            cases.append((Case(base, launch, None, critical), slow))

    def add_autotuned(run_id, launches, dt_index, sweep=False, sweep_is_slow=True, critical=False,
                      fast_all_variants=True, slow=False):
        """Autotuned kernels: one config per launch (per epilogue unless fast_all_variants), rotating
        through the list with the launch and dtype index; every config when `sweep` (the others
        slow if sweep_is_slow). The configs are those the autotuner would benchmark for the launch
        (its early_config_prune applied, see _Recorder)."""
        seen_epilogues = set()
        autotuned = [launch for launch in _dedup(launches) if launch.configs is not None]
        for j, launch in enumerate(autotuned):
            base = "-".join(p for p in (_short(launch.fn.__name__), run_id, _launch_tag(launch)) if p)
            # plain products (no epilogue): spill-free for every config (see SPILL_BUDGET_BYTES)
            launch_critical = critical and launch.args.get("EPILOGUE", 0) == 0
            epi = launch.args.get("EPILOGUE")
            fast_variant = not slow and (fast_all_variants or epi not in seen_epilogues)
            seen_epilogues.add(epi)
            n = len(launch.configs)
            pick = (j + 3 * dt_index) % n
            for i, cfg in enumerate(launch.configs):
                fast = fast_variant and (i == pick or (sweep and not sweep_is_slow))
                if fast or sweep or (slow and i == pick):
                    cases.append((Case(f"{base}-{_config_id(cfg)}", launch, cfg, launch_critical), not fast))

    def add_attention(run_id, dt_index, *args, sweep=False, critical=False, slow=False):
        launches = _capture(_run_attention, *args)
        add(run_id, launches, critical=critical, slow=slow)  # the preprocess kernel
        add_autotuned(run_id, launches, dt_index, sweep=sweep, sweep_is_slow=False, critical=critical, slow=slow)

    for d, (dt_name, dt) in enumerate(DTYPES.items()):
        bf16 = dt_name == "bf16"
        add(f"{dt_name}-N768", _capture(_run_layer_norm, dt, 768), critical=bf16)
        add(f"{dt_name}-N16384", _capture(_run_layer_norm, dt, 16384))
        ce_launches = _capture(_run_cross_entropy, dt, 50304, 50257)  # the model's padded lm_head
        add(f"{dt_name}-V50304-classes50257", ce_launches, critical=bf16)
        add_autotuned(f"{dt_name}-V50304-classes50257", ce_launches, d, sweep=bf16, sweep_is_slow=False,
                      critical=bf16)
        add_attention(f"{dt_name}-D64-causal", d, dt, 64, sweep=bf16, critical=bf16)
        mlp_launches = _capture(_run_mlp, dt)
        add(dt_name, mlp_launches)  # the GELU-gradient kernel
        add_autotuned(dt_name, mlp_launches, d, sweep=bf16, critical=bf16, fast_all_variants=bf16)
        for N in (1024, 1280, 1600, 4096):
            add(f"{dt_name}-N{N}", _capture(_run_layer_norm, dt, N), slow=True)
        add(f"{dt_name}-N768-w{dt_name}", _capture(_run_layer_norm, dt, 768, False, dt), slow=True)
        add(f"{dt_name}-V50257", _capture(_run_cross_entropy, dt, 50257), slow=True)
        for D in (16, 32, 128):
            add_attention(f"{dt_name}-D{D}-causal", d, dt, D, slow=True)
        add_attention(f"{dt_name}-D64-full", d, dt, 64, False, slow=True)
    ids = [c.id for c, _ in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ----------------------------------------------------------------------------------------------
# Specialization and compile
# ----------------------------------------------------------------------------------------------
def _specialize(launch: Launch, config=None):
    """signature / constexprs / attrs as JITFunction.run would build them for these arguments."""
    fn = launch.fn
    arg_names, constexpr_names, no_spec = _param_info(fn)
    args = dict(launch.args)
    if config is not None:
        args.update(config.kwargs)
    missing = [n for n in arg_names if n not in args]
    if missing:
        raise AssertionError(f"{fn.__name__}: launch did not pass {missing}")
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(arg_names):
        v = args[name]
        if name in constexpr_names or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1 and name not in no_spec:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
            if v % 16 == 0 and name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, consts, attrs


def _options(case: Case) -> dict:
    opts = {k: v for k, v in case.launch.options.items() if k in ("num_warps", "num_stages", "num_ctas")}
    if case.config is not None:
        opts.update(num_warps=case.config.num_warps, num_stages=case.config.num_stages)
        if getattr(case.config, "num_ctas", 1) not in (None, 1):
            opts["num_ctas"] = case.config.num_ctas
    return opts


def compile_case(case: Case):
    """triton.compile for sm_90. Only in a process without TRITON_INTERPRET (see the module doc)."""
    fn = case.launch.fn
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{fn.__name__} is a {type(fn).__name__}: compile outside the interpreter")
    sig, consts, attrs = _specialize(case.launch, case.config)
    src = triton.compiler.ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=TARGET, options=_options(case))


@functools.lru_cache(maxsize=None)
def _ptxas_extra_flags() -> tuple:
    """Flags Triton's make_cubin passes that change register allocation (3.9: --regAllocOptLevel=2)."""
    src = inspect.getsource(_nv.CUDABackend.make_cubin)
    return tuple(f for f in ("--regAllocOptLevel=2",) if f in src)


def ptxas_usage(ptx: str) -> dict:
    """registers / spill bytes of the PTX, from `ptxas -v` (the same ptxas and flags as Triton)."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_PTXAS, "-lineinfo", "-v", *_ptxas_extra_flags(), f"--gpu-name={arch}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def _compiled_spills(kernel):
    """CompiledKernel.n_spills where this triton fills it without a device; None otherwise (3.6 and
    3.9 set it only when the cubin is loaded on a GPU)."""
    return getattr(kernel, "n_spills", None)


def _compile_result(case: Case, usage: bool) -> dict:
    k = compile_case(case)
    cubin = k.asm.get("cubin")
    res = {"ok": True, "cubin_bytes": len(cubin) if isinstance(cubin, bytes) else 0,
           "shared": k.metadata.shared, "n_spills": _compiled_spills(k)}
    if usage:
        res.update(ptxas_usage(k.asm["ptx"]))
    return res


# ----------------------------------------------------------------------------------------------
# Worker: a subprocess without TRITON_INTERPRET that compiles cases by id
# ----------------------------------------------------------------------------------------------
def _worker_main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed (triton prints ptxas failures) goes to stderr, not the protocol
    cases = {c.id: c for c, _ in _all_cases()}
    for line in sys.stdin:
        case_id, _, flags = line.rstrip("\n").partition("\t")
        res = {"id": case_id}
        try:
            res.update(_compile_result(cases[case_id], usage="usage" in flags))
        except Exception as e:  # noqa: BLE001 - reported to the test
            res.update(ok=False, error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc()[-6000:])
        proto.write(json.dumps(res) + "\n")


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def _log_tail(self):
        self.log.seek(0)
        return self.log.read()[-4000:]

    def compile(self, case_id: str, usage: bool = False) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"compile worker exited ({self.proc.returncode}):\n{self._log_tail()}")
        self.proc.stdin.write(case_id + ("\tusage" if usage else "") + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], COMPILE_TIMEOUT_S)[0]:
            self.close()
            raise TimeoutError(f"{case_id}: no compile result in {COMPILE_TIMEOUT_S} s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"compile worker died ({self.proc.returncode}) on {case_id}:\n{self._log_tail()}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
_CASES = _all_cases()
FAST_CASES = [pytest.param(c, id=c.id) for c, slow in _CASES if not slow]
SLOW_CASES = [pytest.param(c, id=c.id, marks=pytest.mark.slow) for c, slow in _CASES if slow]


@pytest.fixture(scope="module")
def worker():
    w = _Worker()
    yield w
    w.close()


@pytest.mark.parametrize("case", FAST_CASES + SLOW_CASES)
def test_compiles_for_sm90(case, worker):
    res = worker.compile(case.id, usage=case.critical)
    if not res["ok"]:
        pytest.fail(f"{case.id}: sm_90 compile failed: {res['error'][:3000]}\n{res['traceback']}", pytrace=False)
    assert res["cubin_bytes"] > 0, f"{case.id}: no cubin"
    if case.config is None:  # autotuned configs that do not fit are skipped by the autotuner
        assert res["shared"] <= H100_SMEM_BYTES, (
            f"{case.id}: needs {res['shared']} bytes of shared memory; sm_90 has {H100_SMEM_BYTES}")
    if case.critical:
        # n_spills is None without a GPU (set when the cubin is loaded): count from ptxas -v instead.
        spills = res["n_spills"] if res["n_spills"] is not None else res["spill_stores"]
        assert spills <= SPILL_BUDGET_BYTES.get(case.id, 0), (f"{case.id}: register spills: {res['spill_stores']} bytes stored, "
                             f"{res['spill_loads']} bytes loaded ({res['regs']} registers)")


def test_every_kernel_is_covered():
    """Every @triton.jit kernel (not device helper) in kernels/*.py is compiled by a default case."""
    launched = {(p.values[0].launch.module, p.values[0].launch.fn.__name__) for p in FAST_CASES}
    found = set()
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for v in vars(mod).values():
            fn = _raw(v) if _is_kernel(v) else None
            if fn is not None and fn.fn.__module__ == mod_name and "tl.program_id" in inspect.getsource(fn.fn):
                found.add((mod_name, fn.__name__))
    assert found, "no kernels found"
    assert found <= launched, f"kernels never compiled here: {sorted(found - launched)}"


def test_capture_leaves_modules_untouched():
    """The launch capture restores is_interpreter / check_device / the kernels."""
    import kernels.utils
    from kernels import attention, mlp
    assert not isinstance(mlp._matmul, _Recorder)
    assert mlp.is_interpreter is kernels.utils.is_interpreter
    assert attention.check_device is kernels.utils.check_device
    assert kernels.utils.is_interpreter() == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


# ----------------------------------------------------------------------------------------------
# python tests/test_native_compile.py [--worker]: the table of every case (regs, spills, smem)
# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker_main()
        sys.exit(0)
    import time
    print(f"triton {triton.__version__}, torch {torch.__version__}, ptxas {_PTXAS}", flush=True)
    w = _Worker()
    failures = 0
    try:
        for case, slow in _CASES:
            t0 = time.time()
            r = w.compile(case.id, usage=True)
            dt = time.time() - t0
            if r["ok"]:
                print(f"ok   {case.id:62s} regs={r['regs']:4} spill_st={r['spill_stores']:6} "
                      f"spill_ld={r['spill_loads']:6} smem={r['shared']:7} {dt:5.1f}s{' slow' if slow else ''}",
                      flush=True)
            else:
                failures += 1
                print(f"FAIL {case.id}: {r['error'][:2000]}", flush=True)
    finally:
        w.close()
    sys.exit(1 if failures else 0)
