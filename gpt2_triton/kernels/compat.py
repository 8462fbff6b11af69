"""Every triton internal this package touches, each behind a name of its own: a new triton release that
moves one fails its named test in tests/test_compat.py, not a launch deep in training.

Checked against triton 3.6.0, 3.8.0 and 3.9.0. Triton's public API (triton.jit / autotune / Config's
kwargs, num_warps and num_stages / cdiv / next_power_of_2 / set_allocator / testing.do_bench / __version__,
triton.language) is used directly elsewhere. The in-kernel `tl.make_tensor_descriptor` is called inside
@triton.jit code (attention core and dense) and is named here only by its test.

Touch points (the user in brackets):
- AutotunerBase: triton.runtime.autotuner.Autotuner's constructor, its state (configs, keys, arg_names,
  cache, early_config_prune, fn, nargs, best_config, configs_timings), its one-config run, its candidate
  timing (_bench, the do_bench(kernel_call, quantiles) hook it calls, the list it returns) and the
  restore_value pre/post hooks that timing runs [kernels/autotune.py]
- config_fields, config_meta: triton.Config's num_ctas, maxnreg and all_kwargs() [autotune, bench/static/cases]
- the kernel objects: JITFunction, InterpretedFunction, Autotuner and Heuristics, the Python function
  they wrap (.fn), JITFunction.params / InterpretedFunction.kwargs (do_not_specialize), JITFunction.cache_key
  [autotune, bench/static/trace, bench/static/native]
- jit_hooks / set_jit_hooks: knobs.runtime.jit_cache_hook / jit_post_compile_hook and the key= / fn= (.name)
  they are called with; cache_dir: knobs.cache.dir [autotune]
- max_shared_mem: driver.active.utils.get_device_properties(i)["max_shared_mem"] [kernels/utils]
- allocator_unset: triton.runtime._allocation._allocator and NullAllocator [attention/core]
- descriptor_parts: triton.tools.tensor_descriptor.TensorDescriptor's base and block_shape [bench/static/trace]
- gpu_target, compile_source, target_only_driver, build_launcher: triton.backends.compiler.GPUTarget,
  triton.compiler.ASTSource + triton.compile, the driver slot (driver._active / set_active and the methods
  the JIT asks a driver for), driver.active.launcher_cls(src, metadata) [bench/static/native, bench/precompile]
- ptxas_path, make_cubin_source, nvidia_bin_dir, PTXAS_LOG_ENV: the NVIDIA backend's get_ptxas(arch).path,
  CUDABackend.make_cubin, its bin folder (nvdisasm, cuobjdump) and knobs.nvidia.dump_ptxas_log's variable
  [bench/static/native]
- build_extension: triton.runtime.build.compile_module_from_src [bench/preflight]
- dot_input_precisions: triton.backends.backends[...].compiler(target).parse_options({}) and its
  allowed_dot_input_precisions [tests/test_compat.py, which checks devices.ARCHS' tf32 column with it]
"""
import contextlib
import os

from gpt2_triton import versions

versions.require("triton")  # an untested triton fails here, in one line, before any internal is looked up

import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The autotuner
# ----------------------------------------------------------------------------------------------


class AutotunerBase(Autotuner):
    """triton's Autotuner with what a subclass uses of its internals behind methods."""

    def __init__(self, fn, configs: list, key: list, *, restore=(), prune=None, do_bench=None):
        """restore: argument names Autotuner saves before and puts back after each timed candidate;
        prune(configs, named_args, **kwargs): its early_config_prune."""
        Autotuner.__init__(self, fn, fn.arg_names, configs, key, reset_to_zero=None,
                           restore_value=list(restore) or None,
                           prune_configs_by={"early_config_prune": prune} if prune is not None else None,
                           do_bench=do_bench)

    def held_configs(self) -> list:
        return self.configs

    def key_names(self) -> list:
        return self.keys

    def param_names(self) -> list:
        return self.arg_names

    def prune_early(self, configs: list, args: dict) -> list:
        return configs if self.early_config_prune is None else self.early_config_prune(configs, args)

    def cached(self, key):
        """The config chosen for a tuning key, or None."""
        return self.cache.get(key)

    def remember(self, key, config) -> None:
        self.cache[key] = config

    def run_untuned(self, *args, **kwargs):
        """Autotuner.run itself (with one config it launches that one without timing)."""
        return Autotuner.run(self, *args, **kwargs)

    @contextlib.contextmanager
    def launching(self, args: tuple):
        """The launch's positional arguments by name (Autotuner.nargs), which timing and its hooks read."""
        self.nargs = dict(zip(self.arg_names, args))
        try:
            yield self.nargs
        finally:
            self.nargs = None

    def launch_with(self, config, args: tuple, kwargs: dict):
        self.best_config = config
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    def compile_with(self, config, args: tuple, kwargs: dict):
        """The JIT's compile of `config` for these arguments, nothing launched."""
        return self.fn.warmup(*args, **kwargs, **config.all_kwargs())

    def time_config(self, config, args: tuple, kwargs: dict):
        """Autotuner's timing of one candidate (inside `launching`): do_bench's result, inf if it failed."""
        return self._bench(*args, config=config, **kwargs)

    def keep_timings(self, timings: dict) -> None:
        """What Autotuner.run keeps of a tuning: {config: timing}."""
        self.configs_timings = timings


def median_ms(timing) -> float:
    """The median of one `time_config` result (do_bench's [median, p20, p80], or a bare float)."""
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def config_fields(config) -> dict:
    """A triton.Config's fields: kwargs, num_warps, num_stages, num_ctas, maxnreg."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}


def config_meta(config) -> dict:
    """A triton.Config as launch keyword arguments (its kwargs, num_warps, num_stages, ...)."""
    return config.all_kwargs()


# ----------------------------------------------------------------------------------------------
# Kernel objects
# ----------------------------------------------------------------------------------------------
def _jit_classes() -> tuple:
    """(JITFunction, InterpretedFunction, Heuristics)."""
    from triton.runtime.autotuner import Heuristics
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return JITFunction, InterpretedFunction, Heuristics


def is_jit_function(obj) -> bool:
    return isinstance(obj, _jit_classes()[0])


def is_interpreted_function(obj) -> bool:
    return isinstance(obj, _jit_classes()[1])


def is_autotuner(obj) -> bool:
    return isinstance(obj, Autotuner)


def is_plain_jit(obj) -> bool:
    """Exactly a JITFunction or an InterpretedFunction (no subclass of either)."""
    return type(obj) in _jit_classes()[:2]


def is_kernel(obj) -> bool:
    """A @triton.jit kernel (native or interpreted) or an autotuner over one."""
    jit, interpreted, _ = _jit_classes()
    return isinstance(obj, (jit, Autotuner, interpreted))


def unwrap_autotuner(obj):
    """The kernel under an Autotuner, else obj."""
    return obj.fn if isinstance(obj, Autotuner) else obj


def base_kernel(obj):
    """The JITFunction / InterpretedFunction under any Autotuner and Heuristics wrappers."""
    heuristics = _jit_classes()[2]
    while isinstance(obj, (Autotuner, heuristics)):
        obj = obj.fn
    return obj


def autotuners_in(obj) -> list:
    """The Autotuners in obj's chain of Autotuner / Heuristics wrappers, outermost first ([] for anything else)."""
    heuristics = _jit_classes()[2]
    found = []
    while isinstance(obj, (Autotuner, heuristics)):
        if isinstance(obj, Autotuner):
            found.append(obj)
        obj = obj.fn
    return found


def python_function(kernel):
    """The Python function a JITFunction or InterpretedFunction was made from."""
    return kernel.fn


def do_not_specialize(kernel, names: list) -> set:
    """The argument names a JITFunction / InterpretedFunction does not specialize on (names: its arguments)."""
    if is_jit_function(kernel):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return {names[x] if isinstance(x, int) else x for x in (kernel.kwargs.get("do_not_specialize") or ())}


def source_key(kernel):
    """JITFunction.cache_key (its source and what it calls), or None for another kind of kernel."""
    return kernel.cache_key if is_jit_function(kernel) else None


# ----------------------------------------------------------------------------------------------
# Knobs
# ----------------------------------------------------------------------------------------------
def jit_hooks() -> tuple:
    """(jit_cache_hook, jit_post_compile_hook): called before and after each JIT compile with key= and
    fn= (fn.name: the kernel's name) among their keyword arguments."""
    from triton import knobs
    return knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook


def set_jit_hooks(before, after) -> None:
    from triton import knobs
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after


def cache_dir() -> str:
    """Triton's cache folder (TRITON_CACHE_DIR, else its default)."""
    from triton import knobs
    return knobs.cache.dir


PTXAS_LOG_ENV = "TRITON_DUMP_PTXAS_LOG"  # =1: Triton prints each compile's ptxas -v log (knobs.nvidia.dump_ptxas_log)


# ----------------------------------------------------------------------------------------------
# Driver, allocator, descriptors
# ----------------------------------------------------------------------------------------------
def max_shared_mem(device_index: int) -> int:
    """What Triton itself checks a kernel's shared memory against on this CUDA device (bytes)."""
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def allocator_unset() -> bool:
    """No allocator has been given to triton.set_allocator in this context."""
    from triton.runtime import _allocation
    return isinstance(_allocation._allocator.get(), _allocation.NullAllocator)


def descriptor_parts(value):
    """(base tensor, block shape) of a host TensorDescriptor (triton.tools.tensor_descriptor), else None."""
    if type(value).__name__ == "TensorDescriptor" and hasattr(value, "base"):
        return value.base, tuple(value.block_shape)
    return None


def gpu_target(backend: str, arch, warp_size: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget(backend, arch, warp_size)


def dot_input_precisions(target: tuple) -> tuple:
    """The tl.dot input_precision values triton's backend accepts for target (backend, arch, warp size)."""
    from triton.backends import backends
    name = {"cuda": "nvidia", "hip": "amd"}[target[0]]
    return tuple(backends[name].compiler(gpu_target(*target)).parse_options({}).allowed_dot_input_precisions)


def compile_source(fn, signature: dict, constexprs: dict, attrs: dict, target: tuple, options: dict):
    """triton.compile of a JITFunction's specialization (signature {"x": "*fp16", "n": "i32", "B": "constexpr"},
    attrs {(index,): [["tt.divisibility", 16]]}) for target (backend, arch, warp size): a CompiledKernel."""
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=gpu_target(*target), options=options)


# The methods the JIT asks the active driver for when it compiles a launch (warmup)
DRIVER_METHODS = ("get_current_target", "get_current_device", "get_current_stream", "get_active_torch_device")


@contextlib.contextmanager
def target_only_driver(target: tuple):
    """Triton's JIT sees a device of `target` ((backend, arch, warp size)) and compiles for it; nothing
    is launched (the warmup path), so no GPU is needed."""
    import torch
    from triton.runtime import driver

    class TargetOnly:
        def get_current_target(self):
            return gpu_target(*target)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    previous = driver._active  # None until a driver is first asked for (none exists on a CPU machine)
    driver.set_active(TargetOnly())
    try:
        yield
    finally:
        driver.set_active(previous)


def kernel_asm(kernel) -> dict:
    """A CompiledKernel's code by stage ("ttgir", "ptx", "cubin", ...)."""
    return kernel.asm


def kernel_resources(kernel) -> dict:
    """A CompiledKernel's shared memory (bytes) and warps."""
    return {"shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps}


def build_launcher(kernel) -> None:
    """The C launcher this machine's driver builds for a CompiledKernel at its first launch."""
    from triton.runtime import driver
    driver.active.launcher_cls(kernel.src, kernel.metadata)


def build_extension(src: str, name: str):
    """A Python extension module built from C source the way Triton builds its launchers."""
    from triton.runtime.build import compile_module_from_src
    return compile_module_from_src(src, name)


# ----------------------------------------------------------------------------------------------
# The NVIDIA backend's tools
# ----------------------------------------------------------------------------------------------
def _nv():
    import triton.backends.nvidia.compiler as nv
    return nv


def ptxas_path(arch: int):
    """The ptxas Triton runs for sm_<arch> (raises when there is no NVIDIA backend)."""
    return _nv().get_ptxas(arch).path


def make_cubin_source() -> str:
    """The source of the NVIDIA backend's PTX -> cubin step (the ptxas flags it passes)."""
    import inspect
    return inspect.getsource(_nv().CUDABackend.make_cubin)


def nvidia_bin_dir() -> str:
    """The folder of the NVIDIA tools shipped in the triton wheel."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
