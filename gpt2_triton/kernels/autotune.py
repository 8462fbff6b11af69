"""Autotune plumbing shared by the kernels: candidate tiles -> triton.Configs, one small config under the
interpreter, pruning to the launch's own candidates, and power-of-two buckets of sizes that vary at run time.

A kernel module lists its candidate tiles per variant (e.g. head dim and dtype) with the hand-picked tile
first, and wraps its kernel once:

    _fwd = autotuned(_fwd_kernel, names=("BLOCK_M", "BLOCK_N"), candidates=_fwd_tiles,
                     variants=[(d, dt) for d in (16, 32, 64, 128) for dt in DTYPES],
                     variant_of=lambda args: (args["HEAD_DIM"], args["q_ptr"].dtype),
                     interpreter_tile=(32, 16, 4, 1), key=[...])

A tile is (*values of `names`, num_warps, num_stages). `gpu_configs(tuner)` rebuilds the configs a GPU
would try (the static profile asks for them on a CPU, where the autotuner itself holds the interpreter's).
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import triton

from gpt2_triton.kernels.utils import is_interpreter


@dataclass(frozen=True)
class Candidates:
    names: tuple  # the tile's meta-parameters, in tile order (num_warps and num_stages follow them)
    tiles: Callable[..., list]  # variant -> candidate tiles, the hand-picked one first
    variants: tuple  # every variant a launch may have (the GPU configs are the union of their tiles)
    variant_of: Optional[Callable[[dict], tuple]]  # a launch's arguments -> its variant; None: one variant
    interpreter_tile: tuple
    extra: dict  # meta-parameters every config carries (e.g. GROUP_M)

    def config(self, tile) -> triton.Config:
        *values, num_warps, num_stages = tile
        return triton.Config({**dict(zip(self.names, values)), **self.extra},
                             num_warps=num_warps, num_stages=num_stages)

    def tile(self, config: triton.Config) -> tuple:
        return (*(config.kwargs[n] for n in self.names), config.num_warps, config.num_stages)

    def gpu_configs(self) -> list:
        """Every candidate of every variant, each once."""
        tiles = dict.fromkeys(t for v in self.variants for t in self.tiles(*v))
        return [self.config(t) for t in tiles]

    def configs(self) -> list:
        """What the autotuner holds: under the interpreter one small config (CPU tests stay fast and the
        autotuner runs it without benchmarking), on a GPU every candidate."""
        if is_interpreter():
            return [self.config(self.interpreter_tile)]
        return self.gpu_configs()

    def prune(self, configs, named_args, **kwargs) -> list:
        """early_config_prune: the launch's own candidates, in their order (all configs for one variant)."""
        if self.variant_of is None:
            return configs
        by_tile = {self.tile(c): c for c in configs}
        wanted = self.tiles(*self.variant_of({**named_args, **kwargs}))
        return [by_tile[t] for t in wanted if t in by_tile] or configs


_CANDIDATES = {}  # Autotuner -> its Candidates


def autotuned(kernel, *, names: Sequence[str], candidates: Callable[..., list], key: list,
              variants: Sequence[tuple] = ((),), variant_of: Optional[Callable[[dict], tuple]] = None,
              interpreter_tile: tuple, extra: Optional[dict] = None):
    """`triton.autotune` over the candidate tiles, pruned to the launch's variant."""
    spec = Candidates(tuple(names), candidates, tuple(variants), variant_of, tuple(interpreter_tile), extra or {})
    tuner = triton.autotune(configs=spec.configs(), key=key,
                            prune_configs_by={"early_config_prune": spec.prune})(kernel)
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
