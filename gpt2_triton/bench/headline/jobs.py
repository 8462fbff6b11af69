"""What the headline runs: the shapes, the job table (stage, weight, minimum time, what it runs) and the
context a job sees in its process."""
import importlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gpt2_triton.bench import e2e
from gpt2_triton.bench.common import COMPILE_BASELINES, has_cuda
from gpt2_triton.bench.headline.pytest_record import pytest_job
from gpt2_triton.bench.headline.records import Results

ROOT = Path(__file__).resolve().parents[3]  # the checkout: tests/ lives beside the package
STAGE_SHARES = {"preflight": 0.12, "pytest": 0.13, "kernels": 0.40, "e2e": 0.35}


def sizes(quick: bool) -> dict:
    """Keyword arguments of each bench module's run(): GPT-2 124M training shapes (B=16, T=1024: 16384
    tokens); tiny ones for the CPU interpreter."""
    if quick:
        return {"attention": {"sizes": [(1, 2, 32, 16)]},
                "attention-T2048": {"sizes": [(1, 2, 64, 16)], "qkv_sizes": []},
                "layer_norm": {"sizes": [(33, 96)]},
                "cross_entropy": {"sizes": {"ce": [(16, 128, 97), (16, 97, 97)], "linear_ce": []}},
                "linear_cross_entropy": {"sizes": {"ce": [], "linear_ce": [(24, 32, 128, 97)]}},
                "gelu_mlp": {"sizes": [(37, 40, 160)]}, "e2e_batch": 2}
    return {"attention": {"sizes": [(16, 12, 1024, 64)]},
            "attention-T2048": {"sizes": [(8, 12, 2048, 64)], "qkv_sizes": []},  # the QKV case ran at T=1024
            "layer_norm": {"sizes": [(16384, 768)]},
            "cross_entropy": {"sizes": {"ce": [(16384, 50304, 50257), (16384, 50257, 50257)], "linear_ce": []}},
            "linear_cross_entropy": {"sizes": {"ce": [], "linear_ce": [(16384, 768, 50304, 50257)]}},
            "gelu_mlp": {"sizes": [(16384, 768, 3072)]}, "e2e_batch": 16}


@dataclass
class JobContext:
    """What a job sees in its process."""
    stage: str
    job: str
    quick: bool
    deadline: float  # time.monotonic() after which no new measurement starts
    results: "Results"
    max_configs: int = 0  # autotune candidates a launch tries on first contact
    tests: Path = ROOT / "tests"  # what the pytest job collects

    def write(self, kind, **record):
        self.results.write(kind, stage=self.stage, job=self.job, **record)


@dataclass(frozen=True)
class Job:
    stage: str
    name: str
    weight: float  # its part of the stage's time, relative to the stage's other jobs
    min_s: float  # on a GPU, skip when less time than this is left for it (start-up, compile, timing)
    run: Callable[[JobContext], None]
    select: Optional[Callable[[str, str], bool]] = None  # which (case, provider) of its modules to measure
    needs_cuda: bool = False  # torch.compile on CPU is not run here


def bench_dtype():
    return torch.bfloat16 if has_cuda() else torch.float32  # the interpreter mis-loads bf16


def _kernel_job(*runs):
    """Run bench.<module>.run at sizes(quick)[key] for each (module, key), in order."""
    def run(ctx):
        for module_name, size_key in runs:
            module = importlib.import_module(f"gpt2_triton.bench.{module_name}")
            module.run(bench_dtype(), quick=ctx.quick, **sizes(ctx.quick)[size_key])
    return run


def _e2e_job(stack):
    def run(ctx):
        warmup, reps = (1, 1) if ctx.quick else (2, 6)
        e2e.run(quick=ctx.quick, batch_sizes=[sizes(ctx.quick)["e2e_batch"]], stacks=[stack], warmup=warmup, reps=reps)
    return run


def _precompile_job(ctx):
    """On a GPU: every spec, one worker per CPU core, until the deadline. On CPU (the interpreter compiles
    nothing) a rehearsal: the whole trace, and one sm_90 compile into a throwaway cache."""
    from gpt2_triton.bench import precompile
    if has_cuda():
        done = precompile.run(ctx.max_configs, deadline=ctx.deadline)
    else:
        with tempfile.TemporaryDirectory() as cache:
            done = precompile.run(ctx.max_configs, jobs=1, limit=1, cache_dir=cache)
        done["rehearsal"] = "CPU: the interpreter compiles nothing; one spec compiled to check the way"
    ctx.write("precompile", **done)


def _preflight_job(ctx):
    from gpt2_triton.bench import preflight
    ctx.write("toolchain", **preflight.toolchain())
    preflight.run(torch.device("cuda" if has_cuda() else "cpu"), lambda row: ctx.write("preflight", **row))


def _without_compile(*ops):
    """Every provider but the torch.compile baselines, for cases whose first word is in ops (any if none)."""
    return lambda case, provider: provider not in COMPILE_BASELINES and (not ops or case.split()[0] in ops)


# Kernels are measured first without their torch.compile baselines (two graph compiles each), which
# then run together in one job, those that goals need first; attention at T=2048 comes next, and the
# mode="max-autotune" baselines (minutes of template benchmarking per graph) last.
JOBS = (
    Job("preflight", "precompile", 1.5, 15, _precompile_job),
    Job("preflight", "preflight", 1.0, 10, _preflight_job),
    Job("pytest", "pytest", 1.0, 30, pytest_job),
    Job("kernels", "attention", 2.0, 20, _kernel_job(("attention", "attention")), _without_compile()),
    Job("kernels", "layer_norm", 0.7, 10, _kernel_job(("layer_norm", "layer_norm")), _without_compile()),
    Job("kernels", "cross_entropy", 1.5, 15, _kernel_job(("cross_entropy", "cross_entropy")), _without_compile()),
    Job("kernels", "linear_cross_entropy", 1.2, 15, _kernel_job(("cross_entropy", "linear_cross_entropy")),
        _without_compile()),
    Job("kernels", "gelu_mlp", 1.5, 20, _kernel_job(("gelu_mlp", "gelu_mlp")), _without_compile("gelu_mlp", "matmul")),
    Job("kernels", "compile-baselines", 4.0, 30,
        _kernel_job(("layer_norm", "layer_norm"), ("gelu_mlp", "gelu_mlp"), ("attention", "attention"),
                    ("cross_entropy", "cross_entropy"), ("cross_entropy", "linear_cross_entropy")),
        lambda case, provider: provider == "compile" and case.split()[0] != "linear_gelu", needs_cuda=True),
    Job("kernels", "attention-T2048", 1.2, 15, _kernel_job(("attention", "attention-T2048")), _without_compile()),
    Job("kernels", "max-autotune-baselines", 3.0, 60,
        _kernel_job(("layer_norm", "layer_norm"), ("gelu_mlp", "gelu_mlp"), ("attention", "attention"),
                    ("cross_entropy", "cross_entropy"), ("cross_entropy", "linear_cross_entropy")),
        lambda case, provider: provider == "compile-max-autotune" and case.split()[0] != "linear_gelu",
        needs_cuda=True),
    Job("e2e", "eager-sdpa", 1.0, 12, _e2e_job("eager-sdpa")),
    Job("e2e", "triton", 1.5, 20, _e2e_job("triton")),
    Job("e2e", "compile-sdpa", 3.5, 45, _e2e_job("compile-sdpa"), needs_cuda=True),
    Job("e2e", "compile-max-autotune", 3.5, 90, _e2e_job("compile-max-autotune"), needs_cuda=True),
    Job("e2e", "triton-compile", 4.0, 55, _e2e_job("triton-compile"), needs_cuda=True),
)
JOBS_BY_NAME = {job.name: job for job in JOBS}
STAGES = tuple(STAGE_SHARES)
