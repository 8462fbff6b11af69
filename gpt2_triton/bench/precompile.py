"""Precompile: the kernels the headline's later stages launch, compiled before anything is timed, by one
process per CPU core, into Triton's cache. A job's first launch of such a kernel then reads the cache
instead of compiling: Triton keys its cache on the kernel source, the specialization, the options and the
target, which the spec compile and the launch share (tests/test_precompile.py checks the key).

What is compiled comes from the static profile's trace (gpt2_triton.bench.static): the GPT-2 124M
training micro-step, a validation forward and each op's fwd+bwd at B=16, and the preflight's tiny
launches, on fake tensors sized for this device (SMs, shared memory), each launch with the autotune
candidates its autotuner tries on first contact (the first `max_configs`), hand-picked candidates first. On
the GPU's machine each worker also builds the kernel's launcher (triton 3.6 compiles one in C per kernel
signature at its first launch), into the same cache.
"""
import os
import time
import warnings
from typing import Optional

import torch

from gpt2_triton.bench import preflight
from gpt2_triton.bench.static import cases as cases_mod
from gpt2_triton.bench.static.native import SM90, compile_many
from gpt2_triton.bench.static.trace import H100_TARGET, capture
from gpt2_triton.kernels.utils import (
    fp32_out_matmul_kind,
    isolated_features,
    override_target,
    sm_count,
    smem_per_block,
)

BATCH = 16


def device_target() -> tuple:
    """(fields of the kernels' Target the launches are sized for, (backend, arch, warp size) to compile for):
    this CUDA device's, else an H100's (a CPU rehearsal)."""
    if not torch.cuda.is_available():
        return dict(H100_TARGET), SM90
    device = torch.device("cuda", torch.cuda.current_device())
    with override_target(interpreter=False):
        fields = dict(interpreter=False, device_type="cuda", sm_count=sm_count(device),
                      smem_per_block=smem_per_block(device), fp32_out_matmul_kind=fp32_out_matmul_kind(device))
    major, minor = torch.cuda.get_device_capability(device)
    return fields, ("cuda", 10 * major + minor, 32)


def preflight_launches(target_fields) -> list:
    """The launches of the preflight's items (every path) at their tiny shapes."""
    with capture(target_fields) as trace, isolated_features(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the forced fallbacks
        for item in preflight.ITEMS:
            if preflight.not_here(item, torch.device("cpu")) is None:
                with override_target(fail_features=item.forced_off):
                    item.check(torch.device("cpu"), torch.bfloat16)
        return trace.launches


def specs(max_configs: int) -> list:
    """Compile specs of everything precompiled (see the module docstring), each once."""
    fields, gpu = device_target()
    fields = {**fields, "max_configs": max_configs}
    launches = cases_mod.gpt2_launches(BATCH, fields)[0] + preflight_launches(fields)
    with override_target(max_configs=max_configs):
        cases = [c for c in cases_mod.cases_from_launches(launches) if c.first_contact]
    # the hand-picked candidates first (what the preflight and pytest launch, and what every tuning starts
    # with): if the deadline comes first, the rest compile on demand
    cases.sort(key=lambda c: not c.first_candidate)
    # on the GPU's own machine the worker also builds each kernel's launcher (Triton's driver is there)
    return [{**case.launch_spec(), "analyze": False, "target": list(gpu), "launcher": torch.cuda.is_available()}
            for case in cases]


def run(max_configs: int, jobs: Optional[int] = None, deadline: Optional[float] = None, limit: Optional[int] = None,
        cache_dir: Optional[str] = None) -> dict:
    """Compile the specs with `jobs` worker processes (default: one per CPU core) until `deadline`
    (time.monotonic()); `limit`: only the first specs (a rehearsal). Returns what it did and what it cost."""
    start = time.monotonic()
    todo = specs(max_configs)
    traced_s = time.monotonic() - start
    chosen = todo[:limit] if limit is not None else todo
    jobs = jobs or os.cpu_count() or 1
    version, results = compile_many(chosen, jobs=min(jobs, max(1, len(chosen))), cache_dir=cache_dir,
                                    ptxas_log=False, deadline=deadline)
    failed = {r["id"]: r["error"][:300] for r in results.values() if not r["ok"]}
    return {"triton": version, "specs": len(todo), "compiled": sum(r["ok"] for r in results.values()),
            "failed": failed, "not_reached": len(chosen) - len(results), "workers": jobs,
            "compile_s": round(sum(r.get("compile_s") or 0.0 for r in results.values()), 1),
            "launcher_s": round(sum(r.get("launcher_s") or 0.0 for r in results.values()), 1),
            "trace_s": round(traced_s, 1), "wall_s": round(time.monotonic() - start, 1),
            "target": todo[0]["target"] if todo else None}
