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
import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from gpt2_triton.bench import e2e
from gpt2_triton.bench.common import (
    COMPILE_BASELINES,
    MAX_ERR_NOTE,
    SHORT_OP_MS,
    Row,
    check_rows,
    cpu_note,
    environment,
    err_text,
    has_cuda,
    nvidia_smi,
    out_dir_for,
    ratio_bars,
    session,
)
from gpt2_triton.bench.layer_norm import device_bandwidth
from gpt2_triton.devices import gpu_named
from gpt2_triton.kernels import KERNEL_MODULES
from gpt2_triton.kernels.autotune import accounting, tuning_record
from gpt2_triton.kernels.utils import (
    FEATURES,
    failed_features,
    is_interpreter,
    mark_feature_failed,
    override_target,
)
from gpt2_triton.training.metrics import device_peak_flops

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/ lives beside the package
RESULTS, SUMMARY, ENV, PYTEST_LOG, RUN_LOG = "results.jsonl", "summary.md", "env.json", "pytest.log", "run.log"
KERNELS_PNG, E2E_PNG = "kernels.png", "e2e.png"
OUTPUTS = (RESULTS, SUMMARY, ENV, PYTEST_LOG, RUN_LOG, KERNELS_PNG, E2E_PNG)
STAGE_SHARES = {"preflight": 0.12, "pytest": 0.13, "kernels": 0.40, "e2e": 0.35}
SUMMARY_RESERVE_S = 10.0  # kept back from the stages for the summary and plots
SOFT_DEADLINE = 0.8  # fraction of a job's time after which it starts no new measurement
OURS = "triton"  # providers whose name starts with this are ours; every other provider is a baseline


# --- what runs: shapes and jobs ------------------------------------------------------------------
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


def _dtype():
    return torch.bfloat16 if has_cuda() else torch.float32  # the interpreter mis-loads bf16


def _kernel_job(*runs):
    """Run bench.<module>.run at sizes(quick)[key] for each (module, key), in order."""
    def run(ctx):
        for module_name, size_key in runs:
            module = importlib.import_module(f"gpt2_triton.bench.{module_name}")
            module.run(_dtype(), quick=ctx.quick, **sizes(ctx.quick)[size_key])
    return run


def _e2e_job(stack):
    def run(ctx):
        warmup, reps = (1, 1) if ctx.quick else (2, 6)
        e2e.run(quick=ctx.quick, batch_sizes=[sizes(ctx.quick)["e2e_batch"]], stacks=[stack], warmup=warmup, reps=reps)
    return run


def _pytest_job(ctx):
    """`pytest -m gpu` over the whole tests folder: the marker chooses the tests. A module that fails to
    import is a failure with its message (collection goes on past it); one that needs a declared
    dependency this machine lacks is skipped with that reason (tests/conftest.py)."""
    import pytest
    rc = pytest.main(["-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                      str(ctx.tests)], plugins=[_PytestRecorder(ctx)])
    ctx.write("pytest-exit", rc=int(rc))


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
    Job("pytest", "pytest", 1.0, 30, _pytest_job),
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


# --- results.jsonl -------------------------------------------------------------------------------
class Results:
    """results.jsonl: one JSON object a line, appended and flushed as soon as it exists."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, kind, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **record}, default=str) + "\n")

    def read(self) -> list:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
        return records


def row_record(row) -> dict:
    record = asdict(row)
    record.pop("env", None)  # env.json has it once
    return record


# --- autotuners ---------------------------------------------------------------------------------
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


# --- pytest --------------------------------------------------------------------------------------
class _PytestRecorder:
    """pytest plugin: GPT-2-sized tests first, each outcome to results.jsonl, stop at the deadline."""

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.session = None

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_collection_modifyitems(self, items):
        items.sort(key=lambda item: "gpt2_size" not in item.name)  # stable: keeps the order otherwise

    def pytest_collection_finish(self, session):
        self.ctx.write("collected", tests=[item.nodeid for item in session.items])

    def pytest_collectreport(self, report):
        """A module that failed to import is a failed row with its error; one skipped whole (a missing
        declared dependency) a skipped row with the reason."""
        if report.failed or report.skipped:
            self.ctx.write("test", test=report.nodeid, outcome="failed" if report.failed else "skipped",
                           when="collect", duration_s=0.0, message=_pytest_message(report))

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.ctx.write("test", test=report.nodeid, outcome=report.outcome, when=report.when,
                           duration_s=round(report.duration, 2), message=_pytest_message(report))

    def pytest_runtest_logfinish(self, nodeid, location):
        if time.monotonic() > self.ctx.deadline and self.session is not None and not self.session.shouldstop:
            self.session.shouldstop = "bench headline: the pytest time cap was reached"
            self.ctx.write("pytest-stop", reason="the time cap was reached")


def _pytest_message(report) -> str:
    if report.outcome == "passed":
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    lines = str(report.longreprtext).splitlines()
    errors = [line for line in lines if line.startswith("E ")]
    return "\n".join(errors[:6] or [line for line in lines if line.strip()][-3:])[:600]


# --- the job process -----------------------------------------------------------------------------
def run_job(name, out, deadline_epoch, quick, max_configs, pytest_max_configs, tests=None):
    """Run one job in this process, every record straight to results.jsonl: its rows, each tuning as it
    ends, and at the end what it compiled and tuned per kernel and any feature that fell back."""
    job = JOBS_BY_NAME[name]
    results = Results(Path(out) / RESULTS)
    limit = pytest_max_configs if job.stage in ("pytest", "preflight") and job.name != "precompile" else max_configs
    ctx = JobContext(job.stage, job.name, quick, time.monotonic() + max(0.0, deadline_epoch - time.time()), results,
                     limit, Path(tests) if tests else ROOT / "tests")
    for feature, reason in preflight_failures(results.read()).items():  # broken here: straight to its fallback
        mark_feature_failed(feature, f"preflight: {reason}")

    def sink(row):
        ctx.write("row", **row_record(row))

    def on_tuning(tuning):
        ctx.write("autotune", **tuning_record(tuning))

    with override_target(max_configs=limit), accounting(on_tuning) as acct, \
            session(sink=sink, deadline=ctx.deadline, select=job.select):
        try:
            job.run(ctx)
        finally:
            if acct.per_kernel():
                ctx.write("compile-cost", kernels=acct.per_kernel())
            for feature, reason in failed_features().items():
                if not reason.startswith("preflight: "):
                    ctx.write("fallback", feature=feature, reason=reason)


def preflight_failures(records) -> dict:
    """{feature: why} for each feature whose preflight row failed."""
    return {r["feature"]: r["error"] for r in records
            if r["kind"] == "preflight" and r.get("feature") and not r["ok"]}


class Budget:
    def __init__(self, total_s, reserve_s):
        self.start = time.monotonic()
        self.total_s = total_s
        self.reserve_s = reserve_s

    def elapsed(self):
        return time.monotonic() - self.start

    def left(self):
        """Seconds the stages may still use."""
        return max(0.0, self.total_s - self.elapsed() - self.reserve_s)


def _launch(job, allowance, args, out):
    """Run a job in a child process for at most `allowance` s: (event, reason)."""
    cmd = [sys.executable, "-m", "gpt2_triton.bench.headline", "--job", job.name, "--out", str(out),
           "--deadline", f"{time.time() + SOFT_DEADLINE * allowance:.3f}",
           "--max-configs", str(args.max_configs), "--pytest-max-configs", str(args.pytest_max_configs)]
    if args.quick:
        cmd.append("--quick")
    if args.tests:
        cmd += ["--tests", str(args.tests)]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    log_path = out / (PYTEST_LOG if job.stage == "pytest" else RUN_LOG)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {job.stage}/{job.name}: up to {allowance:.0f} s =====\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: compile workers too
        try:
            rc = proc.wait(timeout=allowance)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return "killed", f"time cap: stopped after {allowance:.0f} s; what it wrote before is kept"
    if rc != 0:
        with open(log_path, "rb") as log:
            log.seek(offset)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
        return "crashed", f"exit code {rc}: " + " | ".join(tail)[-400:]
    return "done", ""


def _stop(proc):
    """SIGTERM the job's process group, then SIGKILL whatever of it is left."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)


def _min_s(job):
    return job.min_s if has_cuda() else 2.0


def run_stage(stage, stages, budget, args, out, results, env, log):
    """Run a stage's jobs, each in its part of the stage's time, rewriting the summary after each."""
    later = sum(STAGE_SHARES[s] for s in stages[stages.index(stage):])
    stage_s = budget.left() * STAGE_SHARES[stage] / later
    stage_end = time.monotonic() + stage_s
    stage_start = time.monotonic()
    results.write("stage", stage=stage, event="start", allowance_s=round(stage_s, 1))
    log(f"{stage}: up to {stage_s:.0f} s")
    jobs = [job for job in JOBS if job.stage == stage]
    runnable = [job for job in jobs if has_cuda() or not job.needs_cuda]
    for job in jobs:
        allowance = 0.0
        if job in runnable:
            left = max(0.0, min(stage_end - time.monotonic(), budget.left()))
            allowance = left * job.weight / sum(j.weight for j in runnable[runnable.index(job):])
        start = time.monotonic()
        if job not in runnable:
            event, reason = "skipped", "needs CUDA: torch.compile runs on the GPU only here"
        elif allowance < _min_s(job):
            event, reason = "skipped", (f"budget: {allowance:.0f} s left for it, it needs about "
                                        f"{_min_s(job):.0f} s")
        else:
            event, reason = _launch(job, allowance, args, out)
        elapsed = time.monotonic() - start
        results.write("job", stage=stage, job=job.name, event=event, reason=reason,
                      allowance_s=round(allowance, 1), elapsed_s=round(elapsed, 1))
        log(f"  {job.name}: {event} in {elapsed:.0f} s of {allowance:.0f} s" + (f" ({reason})" if reason else ""))
        write_summary(out, results.read(), env, budget)
    results.write("stage", stage=stage, event="end", elapsed_s=round(time.monotonic() - stage_start, 1))


# --- environment ---------------------------------------------------------------------------------
NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                     "clocks.applications.graphics", "power.limit", "temperature.gpu", "pstate", "memory.total",
                     "persistence_mode", "ecc.mode.current")


def collect_env(args, tuners) -> dict:
    env = environment()
    if args.commit:
        env["git_commit"] = args.commit
    env.update(python=platform.python_version(), quick=args.quick, budget_s=args.budget_s,
               stages=list(args.stages), max_configs=args.max_configs, pytest_max_configs=args.pytest_max_configs,
               dtype=str(_dtype()).removeprefix("torch."),
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


# --- summary -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    text: str
    job: str
    op: Optional[str]  # first word of the case ("cross_entropy"); None: every case of the job
    mode: str
    metric: str  # "speedup" (baseline ms / ours ms), "memory" (baseline peak / ours peak), "tflops",
    #              "bandwidth" (fraction of HBM), "tokens" (e2e tokens/s ratio)
    target: float
    baseline: Optional[str] = None  # provider, or prefix ending in "-" for the fastest of a family


GOALS = (
    Goal("attention fwd ≥ 1.0× the fastest SDPA backend", "attention", "attention", "fwd", "speedup", 1.0, "sdpa-"),
    Goal("attention fwd ≥ 300 TFLOP/s", "attention", "attention", "fwd", "tflops", 300.0),
    Goal("attention fwd+bwd ≥ 1.0× the fastest SDPA backend", "attention", "attention", "fwd+bwd", "speedup", 1.0,
         "sdpa-"),
    Goal("layer_norm fwd+bwd ≥ 1.0× torch.compile", "layer_norm", "layer_norm", "fwd+bwd", "speedup", 1.0,
         "compile"),
    Goal("layer_norm fwd+bwd ≥ 80% of HBM bandwidth", "layer_norm", "layer_norm", "fwd+bwd", "bandwidth", 0.8),
    Goal("cross_entropy fwd+bwd ≥ 2× eager", "cross_entropy", "cross_entropy", "fwd+bwd", "speedup", 2.0, "eager"),
    Goal("cross_entropy fwd+bwd ≥ 4× less peak memory than eager", "cross_entropy", "cross_entropy", "fwd+bwd",
         "memory", 4.0, "eager"),
    Goal("linear_cross_entropy fwd+bwd ≥ 4× less peak memory than lm_head + eager CE", "linear_cross_entropy",
         "linear_cross_entropy", "fwd+bwd", "memory", 4.0, "eager"),
    Goal("linear_cross_entropy fwd+bwd time ≤ 1.0× lm_head + eager CE", "linear_cross_entropy",
         "linear_cross_entropy", "fwd+bwd", "speedup", 1.0, "eager"),
    Goal("gelu_mlp fwd+bwd ≥ 1.0× torch.compile of the eager MLP", "gelu_mlp", "gelu_mlp", "fwd+bwd", "speedup", 1.0,
         "compile"),
    Goal("e2e ours compiled ≥ 1.05× compile+SDPA tokens/s", "e2e", None, "step", "tokens", 1.05, "compile-sdpa"),
)


def _is_ours(provider):
    return provider.startswith(OURS)


def _matches(provider, baseline):
    return provider.startswith(baseline) if baseline.endswith("-") else provider == baseline


def _fmt(x, digits=1, unit=""):
    return "–" if x is None else f"{x:,.{digits}f}{unit}"


def _job_reason(records, job):
    """Why a job left no measurement: its skip/kill/crash reason, or its rows' errors."""
    events = [r for r in records if r["kind"] == "job" and r.get("job") == job]
    if not events:
        return "not run yet"
    event = events[-1]
    if event["event"] != "done":
        return f"{event['event']}: {event['reason']}"
    return "its rows have errors or are missing"


class Rows:
    """The measurement rows of results.jsonl, looked up by job, case and mode."""

    def __init__(self, records):
        self.records = records
        self.rows = [r for r in records if r["kind"] == "row"]

    def cases(self, job, op=None):
        return list(dict.fromkeys(r["case"] for r in self.rows
                                  if r["job"] == job and (op is None or r["case"].split()[0] == op)))

    def get(self, case, mode):
        return [r for r in self.rows if r["case"] == case and r["mode"] == mode]

    def ours(self, case, mode):
        mine = [r for r in self.get(case, mode) if r["provider"] == OURS]
        return mine[0] if mine else None

    def best_baseline(self, case, mode, baseline=None):
        """The fastest measured baseline (or of those matching `baseline`), else None."""
        rows = [r for r in self.get(case, mode) if not _is_ours(r["provider"]) and r["median_ms"]
                and (baseline is None or _matches(r["provider"], baseline))]
        return min(rows, key=lambda r: r["median_ms"]) if rows else None

    def e2e(self, provider):
        rows = [r for r in self.rows if r["stage"] == "e2e" and r["provider"] == provider]
        return rows[-1] if rows else None


def evaluate(goal, rows, env):
    """[(case, measured text, value or None, reason)] for one goal."""
    on_gpu = _on_gpu(env)
    if goal.metric == "tokens":
        ours, base = rows.e2e("triton-compile"), rows.e2e(goal.baseline)
        for row, job in ((ours, "triton-compile"), (base, goal.baseline)):
            if row is None or not row["median_ms"]:
                reason = row["error"] if row else _job_reason(rows.records, job)
                return [("train step", "", None, f"{job}: {reason}")]
        ratio = ours["extra"]["tokens_per_s"] / base["extra"]["tokens_per_s"]
        text = (f"{ratio:.2f}× ({ours['extra']['tokens_per_s']:,} vs {base['extra']['tokens_per_s']:,} tok/s)")
        return [(ours["case"], text, ratio, "")]
    cases = rows.cases(goal.job, goal.op)
    if not cases:
        return [("", "", None, _job_reason(rows.records, goal.job))]
    out = []
    for case in cases:
        ours = rows.ours(case, goal.mode)
        if ours is None or not ours["median_ms"]:
            out.append((case, "", None, f"ours: {ours['error'] if ours else 'no row'}"))
            continue
        if goal.metric == "tflops":
            if ours["tflops"] is None:
                out.append((case, "", None, "no TFLOP/s: measured on CUDA only"))
            else:
                out.append((case, f"{ours['tflops']:.0f} TFLOP/s", ours["tflops"], ""))
            continue
        if goal.metric == "bandwidth":
            bandwidth = env.get("hbm_bandwidth_gbps")
            if not bandwidth or not ours["gbps"]:
                out.append((case, "", None, "HBM bandwidth of this device unknown" if ours["gbps"] else
                            "no GB/s: measured on CUDA only"))
                continue
            frac = ours["gbps"] / bandwidth
            out.append((case, f"{100 * frac:.0f}% ({ours['gbps']:.0f} of {bandwidth:.0f} GB/s)", frac, ""))
            continue
        base = rows.best_baseline(case, goal.mode, goal.baseline)
        if base is None:
            errors = [r["error"] for r in rows.get(case, goal.mode) if _matches(r["provider"], goal.baseline)]
            out.append((case, "", None, f"{goal.baseline}: {errors[0]}" if errors else
                        f"no `{goal.baseline}` baseline in this run" + ("" if on_gpu else " (CPU)")))
            continue
        if goal.metric == "speedup":
            ratio = base["median_ms"] / ours["median_ms"]
            out.append((case, f"{ratio:.2f}× ({ours['median_ms']:.3f} vs {base['provider']} "
                              f"{base['median_ms']:.3f} ms)", ratio, ""))
        else:  # memory
            if not ours["peak_mb"] or not base["peak_mb"]:
                out.append((case, "", None, "no peak memory measured" + ("" if on_gpu else " (CPU)")))
                continue
            ratio = base["peak_mb"] / ours["peak_mb"]
            out.append((case, f"{ratio:.1f}× less ({ours['peak_mb']:.0f} vs {base['provider']} "
                              f"{base['peak_mb']:.0f} MB)", ratio, ""))
    return out


def _on_gpu(env):
    return not str(env.get("device", "cpu")).startswith("cpu")


def _verdict(value, goal, on_gpu):
    if value is None:
        return "not measured"
    if not on_gpu:
        return "– (CPU: not performance)"
    if value >= goal.target:
        return "**met**"
    return f"missed by {100 * (1 - value / goal.target):.0f}%"


def write_summary(out, records, env, budget=None):
    """summary.md: goals beside the measurements, then the tables (rewritten after every job)."""
    rows = Rows(records)
    on_gpu = _on_gpu(env)
    smi = env.get("nvidia_smi", {})
    md = [f"# GPT-2 124M headline on {env.get('device')}", ""]
    facts = [f"torch {env.get('torch')}", f"triton {env.get('triton')}", f"CUDA {env.get('cuda')}",
             f"driver {env.get('driver')}", f"commit {env.get('git_commit')}", env.get("date", "")]
    if on_gpu:
        facts[:0] = [f"{env.get('sm_count')} SMs", f"{env.get('memory_gib')} GiB",
                     f"SM clock {smi.get('clocks.sm', '?')}/{smi.get('clocks.max.sm', '?')} MHz (now/max)"]
    md.append("; ".join(facts) + ".")
    used = f"{budget.elapsed():.0f} s of " if budget else ""
    used += f"a {env.get('budget_s'):g} s budget"
    quick = " --quick" if env.get("quick") else ""
    md.append(f"`python -m gpt2_triton.bench headline --budget-s {env.get('budget_s'):g}{quick}`: "
              f"{used}; each autotuned launch tries at most {env.get('max_configs') or 'all'} candidates "
              f"(pytest and preflight: {env.get('pytest_max_configs') or 'all'}); dtype {env.get('dtype')}.")
    if not on_gpu:
        md += ["", "**CPU run: tiny sizes through Triton's interpreter. This checks that every stage runs; "
                   "the numbers are not kernel performance and no goal is judged.**"]

    md += ["", "## Preflight", "", _preflight_text(records)]
    md += ["", "## Goals", "", "| goal | case | measured | verdict |", "|---|---|---|---|"]
    for goal in GOALS:
        for case, text, value, reason in evaluate(goal, rows, env):
            verdict = _verdict(value, goal, on_gpu)
            md.append(f"| {goal.text} | {case} | {text or reason} | {verdict} |")

    md += ["", "## Kernels (ours vs the fastest baseline)", "",
           f"Per call: median of `do_bench` (L2 flushed before each call); ops under {SHORT_OP_MS} ms also "
           "timed back to back (many calls between two events: launch overhead hidden). " + MAX_ERR_NOTE, "",
           "| case | mode | ours ms | TFLOP/s | GB/s | ours peak MB | ours max err | fastest baseline | its ms | "
           "its max err | ours × | its peak / ours | first call s |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in [r for r in rows.rows if r["stage"] == "kernels" and r["provider"] == OURS]:
        base = rows.best_baseline(r["case"], r["mode"])
        if not r["median_ms"]:
            md.append(f"| {r['case']} | {r['mode']} | {r['error']} | | | | | | | | | | |")
            continue
        speed = f"{base['median_ms'] / r['median_ms']:.2f}" if base else "–"
        mem = (f"{base['peak_mb'] / r['peak_mb']:.1f}" if base and base["peak_mb"] and r["peak_mb"] else "–")
        base_err = err_text(base.get("max_err")) if base else ""
        b2b = r["extra"].get("back_to_back_ms")
        ours_ms = f"{r['median_ms']:.3f}" + (f" (back to back {b2b[0]:.3f})" if b2b else "")
        md.append(f"| {r['case']} | {r['mode']} | {ours_ms} | {_fmt(r['tflops'])} | {_fmt(r['gbps'], 0)} | "
                  f"{_fmt(r['peak_mb'])} | {err_text(r.get('max_err'))} | {base['provider'] if base else '–'} | "
                  f"{_fmt(base['median_ms'] if base else None, 3)} | {base_err} | "
                  f"{speed} | {mem} | "
                  f"{_fmt(r['extra'].get('first_call_s'), 2)} |")
    for provider in COMPILE_BASELINES:
        compiled = {}
        for r in rows.rows:
            if r["stage"] == "kernels" and r["provider"] == provider and r["extra"].get("first_call_s") is not None:
                compiled[r["case"]] = compiled.get(r["case"], 0.0) + r["extra"]["first_call_s"]
        if compiled:
            md += ["", f"torch.compile baselines ({provider}), first calls of fwd, bwd and fwd+bwd together "
                   "(compilation): " + ", ".join(f"{case} {s:.0f} s" for case, s in compiled.items()) + "."]

    md += ["", "## End to end: one training step (fwd + bwd + AdamW, bf16 autocast on CUDA)", "",
           "| stack | case | ms/step (p20-p80) | tokens/s | MFU | peak MB | first step s | compile s | "
           "cold start s | first step: Triton compiles, s / tunings, s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for job in [j.name for j in JOBS if j.stage == "e2e"]:
        r = rows.e2e(job)
        if r is None or not r["median_ms"]:
            md.append(f"| {job} | | {r['error'] if r else _job_reason(records, job)} | | | | | | | |")
            continue
        x = r["extra"]
        mfu = f"{100 * x['mfu']:.1f}%" if x.get("mfu") is not None else "–"
        first = (f"{x['first_step_compiles']}, {x['first_step_compile_s']:.1f} / {x['first_step_tunings']}, "
                 f"{x['first_step_tune_s']:.1f}" if "first_step_compiles" in x else "–")
        md.append(f"| {job} | {r['case']} | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
                  f"{x['tokens_per_s']:,} | {mfu} | {_fmt(r['peak_mb'], 0)} | {_fmt(x.get('first_step_s'), 1)} | "
                  f"{_fmt(x.get('compile_s'), 1)} | {_fmt(x.get('cold_start_s'), 1)} | {first} |")
    md += ["", "Cold start: model built, optimizer made and the first training step done (in a job process "
               "after the preflight's precompile and the kernel jobs' tunings on this machine)."]
    md += ["", "### Gradient accumulation: `train_step` at grad_accum > 1", "", _accumulation_text(rows)]

    md += ["", "## Predicted vs measured per kernel (one training step)", "", _prediction_text(rows, env)]
    md += ["", "## Sanity checks", "", _sanity_text(rows, on_gpu)]
    md += ["", "## Correctness: `pytest -m gpu`", "", _pytest_text(records)]
    md += ["", "## Compiling and autotuning", "", _cost_text(records, env)]
    md += ["", "## Stages", "", "| stage / job | time allowed s | took s | status |", "|---|---:|---:|---|"]
    for r in records:
        if r["kind"] == "stage" and r["event"] == "start":
            md.append(f"| **{r['stage']}** | {r['allowance_s']:.0f} | | |")
        elif r["kind"] == "job":
            status = r["event"] + (f": {r['reason']}" if r["reason"] else "")
            md.append(f"| {r['job']} | {r['allowance_s']:.0f} | {r['elapsed_s']:.0f} | {status} |")
        elif r["kind"] == "stage" and r["event"] == "skip":
            md.append(f"| **{r['stage']}** | | | skipped: {r['reason']} |")
    md += ["", f"![kernels]({KERNELS_PNG}) ![e2e]({E2E_PNG})", "",
           f"Every row (all providers, p20/p80, peak memory, first-call times) is in `{RESULTS}`; "
           f"the environment in `{ENV}`; job output in `{RUN_LOG}` and `{PYTEST_LOG}`."]
    (Path(out) / SUMMARY).write_text("\n".join(md) + "\n")


def _accumulation_text(rows):
    """The e2e jobs' accumulation timing: ms per micro-step and of the optimizer step apart, tok/s of the step."""
    md = ["Each micro-step (same micro-batch) timed from its batch fetched to its last parameter gradient "
          "accumulated; the optimizer step (loss sync, grad clip, fused AdamW, finiteness checks) apart. "
          "tokens/s: all micro-steps' tokens over the whole step's median.", "",
          "| stack | case | micro-steps x steps | ms/micro-step (p20-p80) | optimizer step ms (p20-p80) | "
          "ms/step | tokens/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for job in [j.name for j in JOBS if j.stage == "e2e"]:
        r = rows.e2e(job)
        a = r["extra"].get("grad_accum") if r and r["median_ms"] else None
        if not a:
            reason = (r["error"] or "no accumulation timing in the row") if r else _job_reason(rows.records, job)
            md.append(f"| {job} | | {reason} | | | | |")
            continue
        (micro, m20, m80), (opt, o20, o80) = a["micro_step_ms"], a["optimizer_step_ms"]
        md.append(f"| {job} | {r['case']} | {a['micro_steps']} x {a['steps']} | {micro:.2f} ({m20:.2f}-{m80:.2f}) | "
                  f"{opt:.2f} ({o20:.2f}-{o80:.2f}) | {a['step_ms'][0]:.1f} | {a['tokens_per_s']:,} |")
    return "\n".join(md)


PREDICTED_STACKS = (("triton", "triton"), ("eager-sdpa", "torch"))  # e2e job, kernels= of the static trace


def _prediction_text(rows, env):
    """The static profile's prediction (realistic band) beside the e2e job's step under torch.profiler."""
    if not _on_gpu(env):
        return "– (CPU run: the profiled step's table holds aten ops, not GPU kernels; nothing to compare)"
    gpu = gpu_named(str(env.get("device")))
    if gpu is None:
        return f"– (no prediction for {env.get('device')}: not in gpt2_triton.devices)"
    from gpt2_triton.bench.static import cases, predict
    md = ["Predicted: the static profile's roofline (`gpt2_triton.bench.static.predict`, realistic band, "
          f"{gpu.key} datasheet peak and bandwidth) of one `train_step` at grad_accum 1 (grads created, clip, "
          "fused AdamW). Measured: the e2e job's same step once under torch.profiler, device time per kernel. "
          "A ratio far from 1 says which efficiency of the model to correct.", "",
          "| stack | kernel | predicted count | predicted µs | measured count | measured µs | measured / predicted |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for job, kernels in PREDICTED_STACKS:
        r = rows.e2e(job)
        table = r["extra"].get("kernel_table") if r else None
        if not table or r["shape"].get("T") != cases.T:
            md.append(f"| {job} | – ({'no profiled step' if not table else 'not at T=' + str(cases.T)}) | | | | | |")
            continue
        for c in predict.compare(table, predict.step_kernel_times(kernels, r["shape"]["B"], gpu.key)):
            ratio = f"{c['measured_us'] / c['predicted_us']:.2f}" if c["predicted_us"] and c["measured_us"] else "–"
            md.append(f"| {job} | {c['name']} | {c['predicted_count']} | {c['predicted_us']:,.0f} | "
                      f"{c['measured_count']} | {c['measured_us']:,.0f} | {ratio} |")
    return "\n".join(md)


def _sanity_text(rows, on_gpu: bool):
    """check_rows over every measured row (the timing order where the run had a GPU): each failure, or that all
    passed."""
    names = {f.name for f in fields(Row)}
    problems = check_rows([Row(**{k: v for k, v in r.items() if k in names}) for r in rows.rows],
                          timing_order=on_gpu)
    if not problems:
        return ("Every measured row passed (a fwd+bwd is not faster than its fwd or bwd alone; TFLOP/s stay "
                "under the device's peak)." if on_gpu else
                "Every measured row passed (a positive time; on a CPU the timings are not performance, so their "
                "order is not checked).")
    return "\n".join(f"- FAILED {text}" for text in problems)


def _pytest_text(records):
    pytest_records = [r for r in records if r.get("stage") == "pytest"]
    collected = next((r["tests"] for r in pytest_records if r["kind"] == "collected"), None)
    tests = [r for r in pytest_records if r["kind"] == "test" and r["when"] != "collect"]
    modules = [r for r in pytest_records if r["kind"] == "test" and r["when"] == "collect"]
    job = [r for r in records if r["kind"] == "job" and r.get("job") == "pytest"]
    if collected is None:
        return f"Not run: {_job_reason(records, 'pytest')}." if job else "Not run yet."
    outcome = {}
    for t in tests:  # a failing teardown after a passing call counts as failed
        if outcome.get(t["test"]) != "failed":
            outcome[t["test"]] = t["outcome"]
    counts = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "skipped")}
    not_run = len([t for t in collected if t not in outcome])
    text = (f"{len(collected)} `gpu` tests collected: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped, {not_run} not run")
    exit_rc = next((r["rc"] for r in pytest_records if r["kind"] == "pytest-exit"), None)
    if not_run:
        capped = any(r["kind"] == "pytest-stop" for r in pytest_records)
        why = ("the time cap was reached" if capped else _job_reason(records, "pytest") if exit_rc is None
               else f"pytest exited with code {exit_rc}")
        text += f" ({why})"
    broken = [m for m in modules if m["outcome"] == "failed"]
    if broken:
        text += f"; {len(broken)} test module{'s' if len(broken) > 1 else ''} did not import"
    lines = [text + "."]
    skipped = {t["message"] for t in tests if t["outcome"] == "skipped"}
    if skipped:
        lines.append("Skip reasons: " + "; ".join(sorted(skipped)) + ".")
    skipped_modules = [m for m in modules if m["outcome"] == "skipped"]
    if skipped_modules:
        lines.append("Test modules skipped whole: " + "; ".join(f"`{m['test']}` ({m['message']})"
                                                               for m in skipped_modules) + ".")
    for t in broken + [t for t in tests if t["outcome"] == "failed"]:
        lines.append(f"- FAILED `{t['test']}` ({t['when']}): " + t["message"].replace("\n", " ")[:300])
    return "\n".join(lines)


def _preflight_text(records):
    lines = []
    for r in (r for r in records if r["kind"] == "precompile"):
        processes = f"{r['workers']} process" + ("es" if r["workers"] > 1 else "")
        line = (f"Precompile (triton {r['triton']}, target {r['target']}): {r['compiled']} of {r['specs']} kernel "
                f"specs compiled by {processes} in {r['wall_s']:.0f} s ({r['compile_s']:.0f} s of "
                f"compiling, {r.get('launcher_s', 0):.0f} s of launcher builds, {r['trace_s']:.0f} s of tracing)")
        if r["not_reached"]:
            line += f"; {r['not_reached']} not reached before the deadline"
        if r["failed"]:
            line += "; failed: " + "; ".join(f"{k}: {v}" for k, v in list(r["failed"].items())[:5])
        lines.append(line + (f". {r['rehearsal']}." if r.get("rehearsal") else "."))
    for r in (r for r in records if r["kind"] == "toolchain"):
        lines.append(f"Toolchain for Triton's launchers: C compiler {r['cc'] or 'none found'}, Python.h "
                     f"{r['python_h'] or 'not found'}: " + ("builds." if r["ok"] else f"**fails**: {r['error']}"))
    rows = [r for r in records if r["kind"] == "preflight"]
    if rows:
        lines += ["", "| kernel | path | dtype | result | s |", "|---|---|---|---|---:|"]
        for r in rows:
            result = (f"skipped: {r['skipped']}" if r.get("skipped") else
                      f"works (rel. error {r['rel_err']:.1e})" if r["ok"] else f"**fails**: {r['error']}")
            lines.append(f"| {r['item']} | {r['path']} | {r['dtype']} | {result} | {_fmt(r['seconds'], 2)} |")
    fallbacks = preflight_failures(records)
    fallbacks.update({r["feature"]: r["reason"] for r in records if r["kind"] == "fallback"})
    if fallbacks:
        lines += [""] + [f"- fallback taken: **{feature}** ({FEATURES[feature]}): {why}"
                         for feature, why in fallbacks.items()]
    if not lines:
        job = [r for r in records if r["kind"] == "job" and r.get("stage") == "preflight"]
        return f"Not run: {_job_reason(records, 'preflight')}." if job else "Not run yet."
    return "\n".join(lines)


def _cost_text(records, env):
    """Per job and kernel: Triton compiles and their seconds, tunings (persisted ones reused) and their
    benchmark seconds; then every tuning."""
    costs = [r for r in records if r["kind"] == "compile-cost" and r["kernels"]]
    lines = []
    if costs:
        lines += ["| job | kernel | compiles | compile s | tunings (reused) | configs tried | tuning s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        total = [0, 0.0, 0, 0.0]
        for r in costs:
            for kernel, c in sorted(r["kernels"].items()):
                lines.append(f"| {r['job']} | {kernel} | {c['compiles']} | {c['compile_s']:.1f} | {c['tunings']} "
                             f"({c['cached_tunings']}) | {c['configs_tried']} | {c['tune_s']:.1f} |")
                total = [total[0] + c["compiles"], total[1] + c["compile_s"], total[2] + c["tunings"],
                         total[3] + c["tune_s"]]
        lines.append(f"| **all** | | {total[0]} | {total[1]:.1f} | {total[2]} | | {total[3]:.1f} |")
    tunings = [r for r in records if r["kind"] == "autotune"]
    if tunings:
        lines += ["", "| job | kernel | key | tried of admitted | compile s | benchmark s | chosen |",
                  "|---|---|---|---|---:|---:|---|"]
        for t in tunings:
            tried = "persisted result" if t["cached"] else f"{t['tried']} of {t['candidates']}"
            lines.append(f"| {t['job']} | {t['kernel']} | `{t['key']}` | {tried} | {t['compile_s']:.1f} | "
                         f"{t['bench_s']:.1f} | `{t['best']}` |")
    if not lines:
        counts = ", ".join(f"{k}: {v}" for k, v in env.get("autotuners", {}).items()) or "none found"
        return f"Nothing compiled or tuned in this run's jobs (configs per autotuner: {counts})."
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------
def write_plots(out, records, env):
    from matplotlib.figure import Figure

    rows = Rows(records)
    note = cpu_note(_on_gpu(env))
    pairs = []  # (label, speed-up, memory ratio); None where ours or every baseline was not measured
    for r in [r for r in rows.rows if r["stage"] == "kernels" and r["provider"] == OURS]:
        base = rows.best_baseline(r["case"], r["mode"])
        if base and r["median_ms"]:
            mem = base["peak_mb"] / r["peak_mb"] if base["peak_mb"] and r["peak_mb"] else None
            pairs.append((f"{r['case']}\n{r['mode']} vs {base['provider']}", base["median_ms"] / r["median_ms"], mem))
        else:
            pairs.append((f"{r['case']}\n{r['mode']}", None, None))
    fig = Figure(figsize=(max(8, 0.5 * len(pairs) + 4), 5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, idx, ylabel in ((axes[0], 1, "speedup (fastest baseline ms / ours ms)"),
                            (axes[1], 2, "peak memory ratio (baseline / ours)")):
        if pairs:
            ratio_bars(ax, [(p[0], p[idx]) for p in pairs], ylabel)
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
    fig.suptitle(f"kernels at GPT-2 124M shapes on {env.get('device')}{note}", fontsize=9)
    fig.savefig(Path(out) / KERNELS_PNG, dpi=110)

    stacks = [(job.name, rows.e2e(job.name)) for job in JOBS if job.stage == "e2e"]
    stacks = [(name, r) for name, r in stacks if r and r["median_ms"]]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    if stacks:
        ax.bar(range(len(stacks)), [r["extra"]["tokens_per_s"] for _, r in stacks], color="tab:blue")
        for i, (_, r) in enumerate(stacks):
            mfu = r["extra"].get("mfu")
            ax.text(i, r["extra"]["tokens_per_s"], f"{r['extra']['tokens_per_s']:,}"
                    + (f"\nMFU {100 * mfu:.1f}%" if mfu is not None else ""), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(stacks)))
        ax.set_xticklabels([name for name, _ in stacks], fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"one training step on {env.get('device')}{note}", fontsize=9)
    fig.savefig(Path(out) / E2E_PNG, dpi=110)


# --- entry ---------------------------------------------------------------------------------------
def default_out():
    return out_dir_for(None) / "headline"


def parse_args(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gpt2_triton.bench headline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>/headline)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default 420)")
    p.add_argument("--quick", action="store_true", help="tiny sizes; on CPU runs through the interpreter")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (env and summary always run)")
    p.add_argument("--max-configs", type=int, default=4,
                   help="autotuned launches try at most this many of the candidates the static rule admits, in "
                        "their listed order (0: all)")
    p.add_argument("--pytest-max-configs", type=int, default=1,
                   help="the same bound in pytest and the preflight (default 1: each kernel's hand-picked config)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a job crashed or was killed, a preflight row or a test failed, a test module "
                        "did not import, or pytest collected nothing (a rehearsal in CI)")
    p.add_argument("--commit", default=None, help="commit to record when the copy has no .git")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job in this process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tests", default=None, help=argparse.SUPPRESS)  # the folder pytest collects (tests)
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES and s not in ("env", "summary")]
    if unknown:
        p.error(f"unknown stage {unknown}; choose from {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in args.stages]
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.job:
        run_job(args.job, args.out, args.deadline, args.quick, args.max_configs, args.pytest_max_configs,
                args.tests)
        return None
    if not has_cuda():
        if not (is_interpreter() and args.quick):
            sys.exit("python -m gpt2_triton.bench headline: no CUDA GPU here; on CPU run it with "
                     "TRITON_INTERPRET=1 and --quick (tiny sizes through the interpreter, not performance)")
    budget = Budget(args.budget_s, min(SUMMARY_RESERVE_S, 0.1 * args.budget_s))
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # this run's files only; nothing else in the folder is touched
        (out / name).unlink(missing_ok=True)
    results = Results(out / RESULTS)

    def log(message):
        print(f"[{budget.elapsed():5.0f} s] {message}", flush=True)

    tuners = find_autotuners()
    env = collect_env(args, tuners)
    (out / ENV).write_text(json.dumps(env, indent=2, default=str) + "\n")
    results.write("env", stage="env", **env)
    log(f"env: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
        f"driver {env['driver']} | commit {env['git_commit']} | budget {args.budget_s:.0f} s -> {out}")
    write_summary(out, results.read(), env, budget)
    for stage in STAGES:
        if stage in args.stages:
            run_stage(stage, args.stages, budget, args, out, results, env, log)
        else:
            results.write("stage", stage=stage, event="skip", reason="not asked for (--stages)")
        if stage != "pytest":
            _plots(out, results, env, log)
    write_summary(out, results.read(), env, budget)
    log(f"done: {out / SUMMARY}")
    print((out / SUMMARY).read_text(), flush=True)
    if args.strict:
        problems = strict_problems(results.read())
        if problems:
            sys.exit("python -m gpt2_triton.bench headline --strict:\n  " + "\n  ".join(problems))
    return out


def strict_problems(records) -> list:
    """What makes a rehearsal fail: a job that crashed or was killed, a failed preflight row, a failed
    test or a test module that did not import, pytest collecting nothing."""
    problems = [f"job {r['job']}: {r['event']}: {r['reason']}" for r in records
                if r["kind"] == "job" and r["event"] in ("crashed", "killed")]
    problems += [f"preflight {r['item']} ({r['path']}): {r['error']}" for r in records
                 if r["kind"] == "preflight" and not r["ok"]]
    problems += [f"toolchain: {r['error']}" for r in records if r["kind"] == "toolchain" and not r["ok"]]
    problems += [f"test {r['test']} ({r['when']}): {r['message']}" for r in records
                 if r["kind"] == "test" and r["outcome"] == "failed"]
    collected = [r for r in records if r["kind"] == "collected"]
    ran = any(r["kind"] == "job" and r["job"] == "pytest" and r["event"] == "done" for r in records)
    if ran and not any(r["tests"] for r in collected):
        problems.append("pytest collected no `gpu` test")
    return problems


def _plots(out, results, env, log):
    try:
        write_plots(out, results.read(), env)
    except Exception as e:  # a plot must not cost the tables
        log(f"plots failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
