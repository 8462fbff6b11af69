"""One test per triton internal that gpt2_triton.kernels.compat names: each asserts the internal exists and
behaves as the package assumes, so a new triton release fails the named test of what moved.

Kernels run through explicit InterpretedFunction objects on CPU tensors; the JIT touch points compile a
one-line kernel for sm_90 under compat.target_only_driver (no GPU needed, the wheel's ptxas)."""
import contextvars
import inspect
import os
import re

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from gpt2_triton.kernels import compat

SM90 = ("cuda", 90, 32)


def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def _add_two(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 2, mask=mask)


def _interpreted():
    return InterpretedFunction(_add_one)


def _configs():
    return [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)]


def _no_bench(kernel_call, quantiles):
    raise AssertionError("do_bench called")


LAUNCH = {"grid": (1,), "warmup": False}


# ----------------------------------------------------------------------------------------------
# The autotuner
# ----------------------------------------------------------------------------------------------
def test_autotuner_init_takes_the_arguments_we_pass():
    params = inspect.signature(Autotuner.__init__).parameters
    for name in ("fn", "arg_names", "configs", "key", "reset_to_zero", "restore_value", "prune_configs_by",
                 "do_bench"):
        assert name in params, name
    assert list(params)[1:5] == ["fn", "arg_names", "configs", "key"]
    compat.AutotunerBase(_interpreted(), _configs(), ["n"], restore=["x_ptr"], prune=lambda c, a: c,
                         do_bench=_no_bench)


def test_autotuner_state_we_read():
    fn, configs = _interpreted(), _configs()
    tuner = compat.AutotunerBase(fn, configs, ["n"])
    assert tuner.fn is fn
    assert tuner.held_configs() == configs
    assert tuner.key_names() == ["n"]
    assert tuner.param_names() == ["x_ptr", "n", "BLOCK"] == fn.arg_names
    assert tuner.cached(("k",)) is None
    tuner.remember(("k",), configs[1])
    assert tuner.cached(("k",)) is configs[1] and tuner.cache == {("k",): configs[1]}


def test_autotuner_early_config_prune():
    seen = []

    def prune(configs, named_args, **kwargs):
        seen.append((list(configs), dict(named_args)))
        return configs[1:]

    configs = _configs()
    tuner = compat.AutotunerBase(_interpreted(), configs, ["n"], prune=prune)
    assert tuner.early_config_prune is prune
    assert tuner.prune_early(configs, {"n": 5}) == configs[1:] and seen == [(configs, {"n": 5})]
    assert compat.AutotunerBase(_interpreted(), configs, ["n"]).prune_early(configs, {}) == configs


def test_autotuner_run_with_one_config_launches_without_timing():
    x = torch.zeros(8)
    tuner = compat.AutotunerBase(_interpreted(), _configs()[:1], ["n"], do_bench=_no_bench)
    tuner.run_untuned(x, 8, **LAUNCH)
    tuner[(1,)](x, 8)
    assert (x == 2).all() and tuner.best_config is tuner.held_configs()[0]


def test_autotuner_timing_calls_do_bench_with_quantiles():
    calls = []

    def fake_bench(kernel_call, quantiles):
        calls.append(tuple(quantiles))
        kernel_call()
        return [1.5, 1.0, 2.0]

    x = torch.zeros(8)
    tuner = compat.AutotunerBase(_interpreted(), _configs(), ["n"], do_bench=fake_bench)
    with tuner.launching((x, 8)) as nargs:
        assert tuner.nargs is nargs and nargs == {"x_ptr": x, "n": 8}
        timing = tuner.time_config(tuner.held_configs()[0], (x, 8), LAUNCH)
    assert tuner.nargs is None
    assert compat.median_ms(timing) == 1.5 and calls[0][0] == 0.5 and (x == 1).all()


def test_autotuner_restore_value_puts_tensors_back_after_timing():
    def fake_bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        return [1.0, 1.0, 1.0]

    x = torch.full((8,), 3.0)
    tuner = compat.AutotunerBase(_interpreted(), _configs(), ["n"], restore=["x_ptr"], do_bench=fake_bench)
    with tuner.launching((x, 8)):
        tuner.time_config(tuner.held_configs()[1], (x, 8), LAUNCH)
    assert (x == 3).all()
    # the hooks themselves: pre_hook saves, post_hook puts back
    tuner.pre_hook({"x_ptr": x})
    x += 5
    tuner.post_hook({"x_ptr": x}, exception=None)
    assert (x == 3).all()


def test_autotuner_launch_with_a_config():
    x = torch.zeros(40)
    tuner = compat.AutotunerBase(_interpreted(), _configs(), ["n"])
    config = tuner.held_configs()[1]
    tuner.launch_with(config, (x, 40), {"grid": (2,), "warmup": False})
    assert (x == 1).all() and tuner.best_config is config


def test_autotuner_run_keeps_what_we_keep():
    """Autotuner.run itself sets nargs, best_config and configs_timings: the Tuner sets the same ones."""
    src = inspect.getsource(Autotuner.run)
    for attr in ("self.nargs", "self.best_config", "self.configs_timings"):
        assert attr in src, attr
    tuner = compat.AutotunerBase(_interpreted(), _configs(), ["n"])
    tuner.keep_timings({tuner.held_configs()[0]: [1.0, 1.0, 1.0]})
    assert list(tuner.configs_timings) == tuner.held_configs()[:1]


def test_median_of_a_timing():
    assert compat.median_ms([2.0, 1.0, 3.0]) == 2.0 and compat.median_ms(4.0) == 4.0
    assert compat.median_ms([float("inf")] * 3) == float("inf")


def test_config_fields_and_launch_kwargs():
    config = triton.Config({"BLOCK": 16}, num_warps=2, num_stages=3)
    assert compat.config_fields(config) == {"kwargs": {"BLOCK": 16}, "num_warps": 2, "num_stages": 3,
                                            "num_ctas": 1, "maxnreg": None}
    meta = compat.config_meta(config)
    assert meta["BLOCK"] == 16 and meta["num_warps"] == 2 and meta["num_stages"] == 3


# ----------------------------------------------------------------------------------------------
# Kernel objects
# ----------------------------------------------------------------------------------------------
def test_kernel_object_kinds_and_unwrapping():
    jit = JITFunction(_add_one)
    heuristics = triton.heuristics({"BLOCK": lambda args: 16})(jit)
    tuner = triton.autotune(configs=_configs(), key=["n"])(heuristics)
    assert isinstance(heuristics, Heuristics) and isinstance(tuner, Autotuner)
    assert compat.is_jit_function(jit) and not compat.is_jit_function(_interpreted())
    assert compat.is_interpreted_function(_interpreted())
    assert compat.is_autotuner(tuner) and not compat.is_autotuner(jit)
    assert all(compat.is_kernel(k) for k in (jit, _interpreted(), tuner))
    assert not compat.is_kernel(heuristics) and not compat.is_kernel(_add_one)
    assert compat.is_plain_jit(jit) and compat.is_plain_jit(_interpreted()) and not compat.is_plain_jit(tuner)
    assert compat.unwrap_autotuner(tuner) is heuristics and compat.unwrap_autotuner(jit) is jit
    assert compat.base_kernel(tuner) is jit
    assert compat.autotuners_in(tuner) == [tuner] and compat.autotuners_in(heuristics) == []
    assert compat.autotuners_in(triton.heuristics({"BLOCK": lambda args: 16})(tuner)) == [tuner]


def test_python_function_of_a_kernel():
    assert compat.python_function(JITFunction(_add_one)) is _add_one
    assert compat.python_function(_interpreted()) is _add_one


@pytest.mark.parametrize("cls", [JITFunction, InterpretedFunction])
@pytest.mark.parametrize("given", [["n"], [1]])
def test_do_not_specialize(cls, given):
    names = ["x_ptr", "n", "BLOCK"]
    assert compat.do_not_specialize(cls(_add_one, do_not_specialize=given), names) == {"n"}
    assert compat.do_not_specialize(cls(_add_one), names) == set()


def test_source_key_is_the_jit_cache_key():
    one, two = JITFunction(_add_one), JITFunction(_add_two)
    assert isinstance(compat.source_key(one), str) and compat.source_key(one) == one.cache_key
    assert compat.source_key(one) != compat.source_key(two)
    assert compat.source_key(JITFunction(_add_one)) == compat.source_key(one)
    assert compat.source_key(_interpreted()) is None


# ----------------------------------------------------------------------------------------------
# The JIT: hooks, the driver slot, warmup and the compiled kernel
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warmed():
    """A warmup compile for sm_90 of a fresh JITFunction through AutotunerBase.compile_with, with JIT
    hooks recording their keyword arguments: (CompiledKernel, [("before"|"after", kwargs)])."""
    calls = []
    previous = compat.jit_hooks()
    compat.set_jit_hooks(lambda *a, **kw: calls.append(("before", kw)) and None,
                         lambda *a, **kw: calls.append(("after", kw)) and None)
    try:
        tuner = compat.AutotunerBase(JITFunction(_add_one), _configs(), ["n"])
        with compat.target_only_driver(SM90):
            kernel = tuner.compile_with(tuner.held_configs()[1], (torch.empty(4), 16), {"grid": (1,)})
    finally:
        compat.set_jit_hooks(*previous)
    return kernel, calls


def test_jit_hooks_called_with_key_and_fn(warmed):
    from triton import knobs
    assert hasattr(knobs.runtime, "jit_cache_hook") and hasattr(knobs.runtime, "jit_post_compile_hook")
    _, calls = warmed
    assert [c[0] for c in calls] == ["before", "after"]
    for _, kwargs in calls:
        assert kwargs["fn"].name.endswith("_add_one") and kwargs["key"] is not None
    assert str(calls[0][1]["key"]) == str(calls[1][1]["key"])


def test_warmup_compiles_under_target_only_driver(warmed):
    kernel, _ = warmed
    assert kernel is not None and isinstance(compat.kernel_asm(kernel).get("cubin"), bytes)


def test_compiled_kernel_asm_and_resources(warmed):
    kernel, _ = warmed
    asm = compat.kernel_asm(kernel)
    assert {"ttgir", "ptx", "cubin"} <= set(asm) and ".target sm_90" in asm["ptx"]
    resources = compat.kernel_resources(kernel)
    assert resources["num_warps"] == 2 and isinstance(resources["shared"], int)


def test_target_only_driver_answers_what_the_jit_asks():
    from triton.runtime import driver
    src = inspect.getsource(inspect.getmodule(JITFunction))
    asked = set(re.findall(r"driver\.active\.(\w+)", src))
    assert asked and asked <= set(compat.DRIVER_METHODS), asked
    assert hasattr(driver, "_active") and callable(driver.set_active)
    before = driver._active
    with compat.target_only_driver(SM90):
        target = driver.active.get_current_target()
        assert (target.backend, target.arch, target.warp_size) == SM90
        assert all(callable(getattr(driver.active, m)) for m in compat.DRIVER_METHODS)
    assert driver._active is before


def test_gpu_target_fields():
    target = compat.gpu_target(*SM90)
    assert (target.backend, target.arch, target.warp_size) == SM90


def test_compile_source_takes_our_specialization():
    params = list(inspect.signature(triton.compiler.ASTSource.__init__).parameters)
    assert params[1:5] == ["fn", "signature", "constexprs", "attrs"]
    assert {"target", "options"} <= set(inspect.signature(triton.compile).parameters)
    kernel = compat.compile_source(JITFunction(_add_one), {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                                   {"BLOCK": 32}, {(0,): [["tt.divisibility", 16]]}, SM90, {"num_warps": 1})
    assert compat.kernel_resources(kernel)["num_warps"] == 1
    assert "tt.divisibility = 16" in compat.kernel_asm(kernel)["ttgir"]


def test_build_launcher_from_src_and_metadata():
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher
    assert list(inspect.signature(CudaLauncher.__init__).parameters) == ["self", "src", "metadata"]
    assert "self.launcher_cls = CudaLauncher" in inspect.getsource(CudaDriver)


def test_max_shared_mem_device_property():
    from triton.backends.nvidia import driver as nv_driver
    assert "self.get_device_properties = mod.get_device_properties" in inspect.getsource(nv_driver.CudaUtils)
    c_src = open(os.path.join(os.path.dirname(nv_driver.__file__), "driver.c")).read()
    assert '"max_shared_mem"' in c_src and '"get_device_properties"' in c_src
    if torch.cuda.is_available():
        assert compat.max_shared_mem(torch.cuda.current_device()) >= 48 * 1024


def test_build_extension_from_c_source():
    from triton.runtime.build import compile_module_from_src
    assert list(inspect.signature(compile_module_from_src).parameters)[:2] == ["src", "name"]


# ----------------------------------------------------------------------------------------------
# Knobs, allocator, descriptors, NVIDIA tools
# ----------------------------------------------------------------------------------------------
def test_cache_dir_knob(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert compat.cache_dir() == str(tmp_path)


def test_ptxas_log_knob(monkeypatch):
    from triton import knobs
    monkeypatch.setenv(compat.PTXAS_LOG_ENV, "1")
    assert knobs.nvidia.dump_ptxas_log is True
    monkeypatch.setenv(compat.PTXAS_LOG_ENV, "0")
    assert knobs.nvidia.dump_ptxas_log is False
    assert "knobs.nvidia.dump_ptxas_log" in compat.make_cubin_source()


def test_allocator_slot_defaults_to_null():
    from triton.runtime import _allocation

    def fresh():
        assert compat.allocator_unset()
        with pytest.raises(RuntimeError):
            _allocation._allocator.get()(16, 16, None)
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
        assert not compat.allocator_unset()

    contextvars.Context().run(fresh)  # an empty context: the slot's default, whatever this process set


def test_host_descriptor_parts():
    from triton.tools.tensor_descriptor import TensorDescriptor
    t = torch.empty(16, 16)
    base, block = compat.descriptor_parts(TensorDescriptor.from_tensor(t, [8, 8]))
    assert base is t and block == (8, 8)
    assert compat.descriptor_parts(t) is None


def test_in_kernel_tensor_descriptor():
    """attention core and dense build TMA descriptors inside their kernels."""
    assert callable(tl.make_tensor_descriptor)
    assert "block_shape" in inspect.signature(tl.make_tensor_descriptor).parameters


def test_nvidia_tools():
    assert os.path.isfile(compat.ptxas_path(90))
    assert os.path.isfile(os.path.join(compat.nvidia_bin_dir(), "nvdisasm"))
    assert "ptxas" in compat.make_cubin_source()


# ----------------------------------------------------------------------------------------------
# compat is the one place
# ----------------------------------------------------------------------------------------------
INTERNAL_MODULES = ("triton.runtime", "triton.backends", "triton.compiler", "triton.knobs", "triton.tools")
# modules that still reach triton internals themselves, and why
ALLOWED = {"gpt2_triton/kernels/compat.py": "the one place"}


def _internal_uses(path) -> list:
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "triton" else [])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "triton":
            names = [f"triton.{node.attr}"]
        found += [f"{path.name}:{node.lineno} {n}" for n in names if _internal(n)]
    return found


def _internal(name: str) -> bool:
    """triton.runtime & co., or a private name of triton (triton._C, not triton.__version__)."""
    return any(name == m or name.startswith(m + ".") for m in INTERNAL_MODULES) \
        or (name.startswith("triton._") and not name.startswith("triton.__"))


def test_no_module_but_compat_reaches_a_triton_internal():
    from pathlib import Path
    root = Path(compat.__file__).resolve().parents[2]
    found = [u for p in sorted((root / "gpt2_triton").rglob("*.py")) if str(p.relative_to(root)) not in ALLOWED
             for u in _internal_uses(p)]
    assert not found, found


@pytest.mark.parametrize("arch", ["sm_90", "sm_100", "gfx942", "gfx950"])
def test_dot_input_precisions_match_the_arch_table(arch):
    """devices.ARCHS' tf32 column is what triton's backend accepts for that target (gfx950: no tf32)."""
    from gpt2_triton.devices import ARCHS
    allowed = compat.dot_input_precisions(ARCHS[arch].target)
    assert "ieee" in allowed
    assert ("tf32" in allowed) == ARCHS[arch].tf32, (arch, allowed)
