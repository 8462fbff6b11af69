"""python -m gpt2_triton.bench headline: the headline table from one command, inside a time budget.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m gpt2_triton.bench headline --out DIR --budget-s 420
    TRITON_INTERPRET=1 python -m gpt2_triton.bench headline --quick --out DIR --budget-s 120   # CPU: tiny sizes

Stages, in order; everything is written the moment it exists, so a kill keeps what was finished:
  1. env        GPU, SMs, clocks, driver, torch/triton/CUDA versions, commit, autotuners  -> env.json
  2. preflight  precompile: every kernel the later stages launch, compiled into Triton's cache by one
                process per CPU core (bench/precompile.py); preflight: the C toolchain Triton builds
                launchers with, and one tiny launch of every kernel through every path, each checked
                against the reference (bench/preflight.py). A path that fails is recorded and the
                later jobs take its fallback from their start: one broken feature costs one row.
  3. pytest     `pytest -m gpu` over tests/ under a time cap, GPT-2-sized tests first     -> pytest.log
  4. kernels    each kernel at its GPT-2 124M training shape against every baseline, fwd/bwd/fwd+bwd
  5. e2e        one GPT-2 124M training step at B=16, T=1024 for the five stacks (with what the first
                step compiled and tuned), one step profiled per kernel, and the step at grad_accum 4
                (ms per micro-step and of the optimizer step apart)
  6. summary    the goals beside the measurements, compile and tuning cost, and plots
                                                                     -> summary.md, kernels.png, e2e.png
Every row, test outcome, preflight row, compile/tuning record and stage event goes to results.jsonl
(one JSON object a line, `kind` says which); the jobs' output goes to run.log.

Budget: after env, stages preflight / pytest / kernels / e2e get 12% / 13% / 40% / 35% of what is left
(time a stage does not use rolls over to the next), and each job of a stage a weighted part of its
stage's time. A job whose part is below what it needs at minimum skips itself with the reason. Each job
runs in its own process (a hang or a CUDA error in one cannot take the next down): after 80% of its part
it starts no new measurement, at 100% it is killed. Compiling and autotuning happen inside the jobs, so
they are part of the budget: each autotuned launch tries at most the first --max-configs candidates the
static rule admits (gpt2_triton.kernels.autotune; pytest and the preflight: the hand-picked one), a
result tuned in an earlier job or run on this machine is reused (persisted under Triton's cache dir),
and the summary gives each kernel's compiles, compile seconds and tuning seconds.
"""
from gpt2_triton.bench.headline.cli import default_out, main, parse_args, strict_problems
from gpt2_triton.bench.headline.environment import NVIDIA_SMI_FIELDS, collect_env, find_autotuners, on_gpu
from gpt2_triton.bench.headline.goals import GOALS, Goal, evaluate, verdict
from gpt2_triton.bench.headline.jobs import JOBS, JOBS_BY_NAME, ROOT, STAGE_SHARES, STAGES, Job, JobContext, sizes
from gpt2_triton.bench.headline.plots import write_plots
from gpt2_triton.bench.headline.pytest_record import pytest_job, pytest_text
from gpt2_triton.bench.headline.records import (
    E2E_PNG,
    ENV,
    KERNELS_PNG,
    OURS,
    OUTPUTS,
    PYTEST_LOG,
    RESULTS,
    RUN_LOG,
    SUMMARY,
    Results,
    Rows,
    job_reason,
    preflight_failures,
    row_record,
)
from gpt2_triton.bench.headline.runner import SOFT_DEADLINE, SUMMARY_RESERVE_S, Budget, launch, run_job, run_stage
from gpt2_triton.bench.headline.summary import PREDICTED_STACKS, write_summary

__all__ = [
    "default_out", "main", "parse_args", "strict_problems", "NVIDIA_SMI_FIELDS", "collect_env", "find_autotuners",
    "on_gpu", "GOALS", "Goal", "evaluate", "verdict", "JOBS", "JOBS_BY_NAME", "ROOT", "STAGE_SHARES", "STAGES", "Job",
    "JobContext", "sizes", "write_plots", "pytest_job", "pytest_text", "E2E_PNG", "ENV", "KERNELS_PNG", "OURS",
    "OUTPUTS", "PYTEST_LOG", "RESULTS", "RUN_LOG", "SUMMARY", "Results", "Rows", "job_reason", "preflight_failures",
    "row_record", "SOFT_DEADLINE", "SUMMARY_RESERVE_S", "Budget", "launch", "run_job", "run_stage",
    "PREDICTED_STACKS", "write_summary",
]
