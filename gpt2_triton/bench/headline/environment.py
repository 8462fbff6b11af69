"""env.json: the machine, the versions and every autotuner; and whether a run's env is a GPU's."""
import importlib
import platform

import torch

from gpt2_triton.bench.common import environment, has_cuda, nvidia_smi
from gpt2_triton.bench.headline.jobs import bench_dtype
from gpt2_triton.bench.layer_norm import device_bandwidth
from gpt2_triton.kernels import KERNEL_MODULES
from gpt2_triton.training.metrics import device_peak_flops


def find_autotuners() -> dict:
    """{"attention.dense._flash_attention_fwd": Autotuner, "mlp._matmul": ...}: every triton.autotune'd kernel
    that a kernels.* module holds (also under triton.heuristics), found by scanning, not by name."""
    from gpt2_triton.kernels import compat

    found, seen = {}, set()
    for module_name in sorted(KERNEL_MODULES):
        module = importlib.import_module(module_name)
        for attr, obj in sorted(vars(module).items()):
            for tuner in compat.autotuners_in(obj):
                if id(tuner) not in seen:
                    seen.add(id(tuner))
                    found[f"{module_name.removeprefix('gpt2_triton.kernels.')}.{attr}"] = tuner
    return found


NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                     "clocks.applications.graphics", "power.limit", "temperature.gpu", "pstate", "memory.total",
                     "persistence_mode", "ecc.mode.current")


def collect_env(args, tuners) -> dict:
    env = environment()
    if args.commit:
        env["git_commit"] = args.commit
    env.update(python=platform.python_version(), quick=args.quick, budget_s=args.budget_s,
               stages=list(args.stages), max_configs=args.max_configs, pytest_max_configs=args.pytest_max_configs,
               dtype=str(bench_dtype()).removeprefix("torch."),
               autotuners={name: len(tuner.configs) for name, tuner in tuners.items()})
    if has_cuda():
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", None)
        bandwidth, peak = device_bandwidth(), device_peak_flops("cuda")
        env.update(sm_count=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), l2_cache_mb=round(l2 / 2**20, 1) if l2 else None,
                   cudnn=torch.backends.cudnn.version(), nvidia_smi=nvidia_smi(NVIDIA_SMI_FIELDS),
                   hbm_bandwidth_gbps=bandwidth / 1e9 if bandwidth else None,
                   peak_bf16_tflops=peak / 1e12 if peak else None)
    return env


def on_gpu(env):
    return not str(env.get("device", "cpu")).startswith("cpu")
