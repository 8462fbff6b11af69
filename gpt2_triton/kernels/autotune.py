"""Autotune plumbing shared by the kernels: candidate tiles -> triton.Configs, one small config under the
interpreter, the static rule and the first-contact bound on what a launch tries, persisted tuning, and
the compile / tuning accounting.

A kernel module lists its candidate tiles per variant (e.g. head dim and dtype) with the hand-picked tile
first, and wraps its kernel once:

    _fwd = autotuned(_fwd_kernel, names=("BLOCK_M", "BLOCK_N"), candidates=_fwd_tiles,
                     variants=[(d, dt) for d in (16, 32, 64, 128) for dt in DTYPES],
                     variant_of=lambda args: (args["HEAD_DIM"], args["q_ptr"].dtype),
                     interpreter_tile=(32, 16, 4, 1), key=[...])

A tile is (*values of `names`, num_warps, num_stages). A tile function that takes `arch` lists them per
architecture (utils.gpu_arch at launch: "sm_90", "sm_100", "gfx942", "gfx950"; None, an architecture not in
devices.ARCHS, takes sm_90's). A tile's config may carry backend options on an architecture (`options`:
(tile, arch) -> e.g. {"waves_per_eu": 2}, the HIP backend's BACKEND_OPTIONS; an architecture's configs carry
only its own, so CUDA's JIT, which rejects unknown keywords, never sees AMD's). `gpu_configs(tuner)` rebuilds
the configs a GPU would try (the union over the architectures; the static profile asks for them on a CPU,
where the autotuner itself holds the interpreter's).

What a launch tries the first time it meets a tuning key (`Tuner.candidates`), in the listed order:
1. its variant's tiles (`variant_of`);
2. the static rule, from what the static profile measures per target and needs no compile: a candidate
   whose shared memory / LDS (the kernel's `smem` estimate for the architecture) exceeds the device's
   per-program limit (and its architecture's, devices.ARCHS) would fail to launch; one whose grid leaves
   SMs idle (fewer programs than SMs) loses to any candidate that fills them;
3. the first `max_configs()` of those (FIRST_CONTACT_CONFIGS, or `override_target(max_configs=...)`).
A result tuned before on this device, torch and triton, for this kernel source and key, is used
without tuning (TuningStore, under Triton's cache dir), if the static rule still admits it.
The candidates tried are compiled before any is timed, so that the compile and benchmark seconds are
told apart (`accounting()`).
"""
import builtins
import contextlib
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import triton

from gpt2_triton.kernels import compat
from gpt2_triton.kernels.utils import gpu_arch, is_interpreter, known_arch, sm_count, smem_per_block, target

# Candidates a launch tries on first contact with a tuning key: the hand-picked one and the next one the
# static rule admits. A cold GPT-2 training step then compiles 26 kernels (the static profile's cold start);
# the headline's kernel benchmarks ask for more (override_target(max_configs=4)).
FIRST_CONTACT_CONFIGS = 2

# Options of triton's HIP backend (HIPOptions) a config may carry as a keyword: waves per execution unit the
# register allocator aims for, the MFMA instruction's non-K dimension (16 or 32), and the operand K packing.
BACKEND_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")


def max_configs() -> int:
    """Candidates a launch tries on first contact (0: every candidate the static rule admits)."""
    n = target().max_configs
    return FIRST_CONTACT_CONFIGS if n is None else n


@dataclass(frozen=True)
class Candidates:
    names: tuple  # the tile's meta-parameters, in tile order (num_warps and num_stages follow them)
    tiles: Callable[..., list]  # variant -> candidate tiles, the hand-picked one first
    variants: tuple  # every variant a launch may have (the GPU configs are the union of their tiles)
    variant_of: Optional[Callable[[dict], tuple]]  # a launch's arguments -> its variant; None: one variant
    interpreter_tile: tuple
    extra: dict  # meta-parameters every config carries (e.g. GROUP_M)
    smem: Optional[Callable[[triton.Config, dict], int]] = None  # shared memory (bytes) of a config at a launch
    options: Optional[Callable[[tuple, Optional[str]], dict]] = None  # (tile, arch) -> its BACKEND_OPTIONS there

    def options_for(self, tile: tuple, arch: Optional[str]) -> dict:
        return self.options(tile, arch) if self.options is not None and arch is not None else {}

    def config(self, tile, arch: Optional[str] = None) -> triton.Config:
        """(*meta-parameters, num_warps, num_stages[, maxnreg]) -> its triton.Config on `arch` (with the backend
        options `options` gives it there)."""
        values, (num_warps, num_stages, *maxnreg) = tile[:len(self.names)], tile[len(self.names):]
        return triton.Config({**dict(zip(self.names, values)), **self.extra, **self.options_for(tile, arch)},
                             num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg[0] if maxnreg else None)

    def tile(self, config: triton.Config) -> tuple:
        maxnreg = compat.config_fields(config)["maxnreg"]
        return (*(config.kwargs[n] for n in self.names), config.num_warps, config.num_stages,
                *((maxnreg,) if maxnreg else ()))

    def identity(self, config: triton.Config) -> tuple:
        """A config's tile and its backend options: two architectures' configs of one tile differ by these."""
        return self.tile(config), tuple(sorted((k, v) for k, v in config.kwargs.items() if k in BACKEND_OPTIONS))

    def tiles_for(self, variant: tuple, arch: Optional[str]) -> list:
        """The variant's candidate tiles on `arch` (a tile function without `arch`: the same everywhere)."""
        if "arch" in inspect.signature(self.tiles).parameters:
            return self.tiles(*variant, arch=arch)
        return self.tiles(*variant)

    def gpu_configs(self) -> list:
        """Every candidate of every variant on every architecture (sm_90's first), each once."""
        from gpt2_triton.devices import ARCHS
        configs = {}
        for arch in (None, *ARCHS):
            for variant in self.variants:
                for t in self.tiles_for(variant, arch):
                    config = self.config(t, arch)
                    configs.setdefault(self.identity(config), config)
        return list(configs.values())

    def configs(self) -> list:
        """What the autotuner holds: under the interpreter one small config (CPU tests stay fast and the
        autotuner runs it without benchmarking), on a GPU every candidate."""
        if is_interpreter():
            return [self.config(self.interpreter_tile)]
        return self.gpu_configs()

    def prune(self, configs, named_args, **kwargs) -> list:
        """The launch's own candidates, in their order (all configs for one variant)."""
        if self.variant_of is None:
            return configs
        by_identity = {self.identity(c): c for c in configs}
        args = {**named_args, **kwargs}
        arch = gpu_arch(_device_of(args))
        wanted = [self.identity(self.config(t, arch)) for t in self.tiles_for(self.variant_of(args), arch)]
        return [by_identity[w] for w in wanted if w in by_identity] or configs


def _device_of(args: dict) -> Optional[torch.device]:
    return next((v.device for v in args.values() if isinstance(v, torch.Tensor)), None)


def programs(grid, args: dict, config: triton.Config) -> int:
    """Programs (CTAs) of a launch with `config`'s meta-parameters."""
    if callable(grid):
        grid = grid({**args, **config.kwargs})
    return math.prod(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))


def static_rule(spec: Candidates, configs: list, args: dict, grid) -> list:
    """`configs` without those the static rule drops (see the module docstring), in order; never empty."""
    device = _device_of(args)
    limit = smem_per_block(device) if device is not None else None
    arch = known_arch(device)
    if arch is not None:
        limit = arch.smem_per_block if limit is None else min(limit, arch.smem_per_block)
    kept = configs
    if limit is not None and spec.smem is not None:
        kept = [c for c in kept if spec.smem(c, args) <= limit] or kept[:1]
    sms = sm_count(device) if device is not None else None
    if sms and grid is not None:
        full = [c for c in kept if programs(grid, args, c) >= sms]
        kept = full or kept
    return kept


# ----------------------------------------------------------------------------------------------
# Accounting: compiles (every kernel, through Triton's JIT hooks) and tunings (Tuner)
# ----------------------------------------------------------------------------------------------
@dataclass
class Tuning:
    kernel: str
    key: str
    candidates: int  # what the variant and the static rule admit
    tried: int  # what was compiled and timed (0: a persisted result was used)
    cached: bool  # a persisted result was used
    compile_s: float
    bench_s: float
    best: str
    timings_ms: dict = field(default_factory=dict)


@dataclass
class Accounting:
    """What compiled and what tuned while `accounting()` was active, per kernel."""
    compiles: list = field(default_factory=list)  # (kernel, seconds)
    tunings: list = field(default_factory=list)  # Tuning
    on_tuning: Optional[Callable[[Tuning], None]] = None

    def per_kernel(self) -> dict:
        out = {}

        def row(name):
            return out.setdefault(name, {"compiles": 0, "compile_s": 0.0, "tunings": 0, "cached_tunings": 0,
                                         "configs_tried": 0, "tune_s": 0.0})
        for name, seconds in self.compiles:
            r = row(name)
            r["compiles"] += 1
            r["compile_s"] += seconds
        for t in self.tunings:
            r = row(t.kernel)
            r["tunings"] += 1
            r["cached_tunings"] += t.cached
            r["configs_tried"] += t.tried
            r["tune_s"] += t.bench_s
        return {k: {n: round(v, 3) if isinstance(v, float) else v for n, v in r.items()} for k, r in out.items()}


_accounting: list = []  # the active Accountings, outermost first (nested blocks each get every record)


@contextlib.contextmanager
def accounting(on_tuning: Optional[Callable[[Tuning], None]] = None):
    """`with accounting() as acct:` every kernel compile (Triton's JIT, this process) and every tuning
    inside the block is recorded in acct; on_tuning(tuning) is called as each tuning ends. Blocks nest."""
    acct = Accounting(on_tuning=on_tuning)
    started = {}
    previous = compat.jit_hooks()

    def before(*args, **kwargs):
        started[str(kwargs.get("key"))] = time.perf_counter()
        return previous[0](*args, **kwargs) if previous[0] else None

    def after(*args, **kwargs):
        begun = started.pop(str(kwargs.get("key")), None)
        if begun is not None:
            acct.compiles.append((kwargs["fn"].name, time.perf_counter() - begun))
        return previous[1](*args, **kwargs) if previous[1] else None

    compat.set_jit_hooks(before, after)
    _accounting.append(acct)
    try:
        yield acct
    finally:
        compat.set_jit_hooks(*previous)
        _accounting.remove(acct)


def _record(tuning: Tuning) -> None:
    for acct in _accounting:
        acct.tunings.append(tuning)
        if acct.on_tuning is not None:
            acct.on_tuning(tuning)


# ----------------------------------------------------------------------------------------------
# Persisted tuning
# ----------------------------------------------------------------------------------------------
def _source_key(fn) -> str:
    """The kernel source's identity: JITFunction.cache_key (its source and what it calls), else a hash
    of its Python source (the interpreter's function)."""
    fn = compat.base_kernel(fn)
    return compat.source_key(fn) or hashlib.sha256(inspect.getsource(compat.python_function(fn)).encode()).hexdigest()


def _device_name(device: Optional[torch.device]) -> str:
    if device is not None and device.type == "cuda" and not is_interpreter():
        return torch.cuda.get_device_name(device)
    return "cpu (interpreter)" if is_interpreter() else str(device)


class TuningStore:
    """One JSON file per (kernel source, tuning key, device, torch, triton): the config chosen and what
    each candidate measured. Written whole and renamed into place, so readers never see half a file."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @staticmethod
    def default() -> Optional["TuningStore"]:
        """The store `override_target(tuning_dir=...)` names, else one under Triton's cache dir
        (TRITON_CACHE_DIR); None when tuning_dir is ""."""
        directory = target().tuning_dir
        if directory == "":
            return None
        if directory is None:
            directory = os.path.join(compat.cache_dir(), "gpt2_triton_tuning")
        return TuningStore(Path(directory))

    def path(self, kernel: str, identity: list) -> Path:
        digest = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:24]
        return self.directory / f"{kernel}-{digest}.json"

    def get(self, kernel: str, identity: list) -> Optional[dict]:
        try:
            return json.loads(self.path(kernel, identity).read_text())
        except (OSError, ValueError):
            return None

    def put(self, kernel: str, identity: list, record: dict) -> None:
        path = self.path(kernel, identity)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"identity": identity, **record}, default=str, indent=1))
            os.replace(tmp, path)
        except OSError:  # a read-only cache dir costs a retune next time, nothing else
            pass


def _config_record(config: triton.Config) -> dict:
    return compat.config_fields(config)


def _same_config(config: triton.Config, record: dict) -> bool:
    return _config_record(config) == record


# ----------------------------------------------------------------------------------------------
# The autotuner
# ----------------------------------------------------------------------------------------------
class Tuner(compat.AutotunerBase):
    """triton.autotune's Autotuner that tries what `candidates` admits, reuses persisted results, compiles
    the candidates before timing them and reports each tuning (see the module docstring)."""

    def __init__(self, fn, configs, key, spec: Optional[Candidates] = None, do_bench=None,
                 restore: Sequence[str] = ()):
        prune = spec.prune if spec is not None and spec.variant_of is not None else None
        super().__init__(fn, configs, key, restore=restore, prune=prune, do_bench=do_bench)
        self.spec = spec
        self.name = getattr(fn, "__name__", None) or compat.python_function(fn).__name__

    def tuning_key(self, args: dict) -> tuple:
        """Triton's autotune key: the `key` arguments' values, then every tensor argument's dtype."""
        names = self.param_names()
        named = {k: v for k, v in args.items() if k in names}
        return (*(named[k] for k in self.key_names() if k in named),
                *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))

    def candidates(self, args: dict, grid=None, configs: Optional[list] = None) -> list:
        """What the static rule admits, of `configs` (default: the configs it holds), for a launch with
        these arguments and grid, in the listed order; the first `max_configs()` are tried."""
        configs = self.prune_early(list(self.held_configs() if configs is None else configs), args)
        if self.spec is None:
            return configs
        return static_rule(self.spec, configs, args, grid)

    def run(self, *args, **kwargs):
        if len(self.held_configs()) <= 1:
            return self.run_untuned(*args, **kwargs)
        with self.launching(args) as nargs:
            named = {**nargs, **kwargs}
            key = self.tuning_key(named)
            if self.cached(key) is None:
                self.remember(key, self._tune(key, args, kwargs, named))
            return self.launch_with(self.cached(key), args, kwargs)

    def _tune(self, key, args, kwargs, named) -> triton.Config:
        admitted = self.candidates(named, kwargs.get("grid"))
        device = _device_of(named)
        store = TuningStore.default()
        identity = [self.name, _source_key(self), repr(key), _device_name(device), torch.__version__,
                    triton.__version__]
        persisted = store.get(self.name, identity) if store is not None else None
        if persisted is not None:
            chosen = next((c for c in admitted if _same_config(c, persisted.get("config"))), None)
            if chosen is not None:
                _record(Tuning(self.name, repr(key), len(admitted), 0, True, 0.0, 0.0, str(chosen)))
                return chosen
        limit = max_configs()
        tried = admitted[:limit] if limit > 0 else admitted
        if len(tried) == 1:
            _record(Tuning(self.name, repr(key), len(admitted), 1, False, 0.0, 0.0, str(tried[0])))
            return tried[0]
        start = time.perf_counter()
        if not is_interpreter():  # compile every candidate first: compile and benchmark seconds apart
            launch_kwargs = {k: v for k, v in kwargs.items() if k != "warmup"}
            for config in tried:
                with contextlib.suppress(Exception):  # a candidate that cannot compile times as inf below
                    self.compile_with(config, args, launch_kwargs)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        timings = {config: self.time_config(config, args, kwargs) for config in tried}
        bench_s = time.perf_counter() - start
        self.keep_timings(timings)
        finite = {c: t for c, t in timings.items() if math.isfinite(compat.median_ms(t))}
        if not finite:
            raise RuntimeError(f"{self.name}: none of the {len(tried)} candidate configs ran for key {key}: "
                               f"{[str(c) for c in tried]}")
        best = builtins.min(finite, key=lambda c: compat.median_ms(finite[c]))
        timings_ms = {str(c): compat.median_ms(t) for c, t in timings.items()}
        if store is not None:
            store.put(self.name, identity, {"config": _config_record(best), "timings_ms": timings_ms,
                                            "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _record(Tuning(self.name, repr(key), len(admitted), len(tried), False, round(compile_s, 3),
                       round(bench_s, 3), str(best), timings_ms))
        return best


_CANDIDATES = {}  # Tuner -> its Candidates


def autotuned(kernel, *, names: Sequence[str], candidates: Callable[..., list], key: list,
              variants: Sequence[tuple] = ((),), variant_of: Optional[Callable[[dict], tuple]] = None,
              interpreter_tile: tuple, extra: Optional[dict] = None,
              smem: Optional[Callable[[triton.Config, dict], int]] = None, restore: Sequence[str] = (),
              options: Optional[Callable[[tuple, Optional[str]], dict]] = None) -> Tuner:
    """A Tuner over the candidate tiles, narrowed to the launch's variant and the static rule. restore: the
    tensor arguments a launch adds into (read and written), put back after each candidate is timed. options:
    (tile, arch) -> the BACKEND_OPTIONS the tile's config carries on that architecture."""
    spec = Candidates(tuple(names), candidates, tuple(variants), variant_of, tuple(interpreter_tile), extra or {},
                      smem, options)
    tuner = Tuner(kernel, spec.configs(), key, spec, restore=restore)
    _CANDIDATES[tuner] = spec
    return tuner


def candidates_of(tuner) -> Candidates:
    return _CANDIDATES[tuner]


def gpu_configs(tuner) -> list:
    """The configs `tuner` would hold on a GPU (whatever this process runs on)."""
    return candidates_of(tuner).gpu_configs()


def bucket(n: int) -> int:
    """The autotuner's view of a size that varies at run time (sequence length, rows): the next power of
    two, so evaluation and generation retune once per bucket, not once per length."""
    return triton.next_power_of_2(max(int(n), 1))


def tuning_record(tuning: Tuning) -> dict:
    return asdict(tuning)
