"""The budgeted runner: each job in its own process for at most its part of its stage's time, and the job
process itself (rows, tunings, compile costs and fallbacks straight to results.jsonl)."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpt2_triton.bench.common import has_cuda, session
from gpt2_triton.bench.headline.jobs import JOBS, JOBS_BY_NAME, ROOT, STAGE_SHARES, JobContext
from gpt2_triton.bench.headline.records import PYTEST_LOG, RESULTS, RUN_LOG, Results, preflight_failures, row_record
from gpt2_triton.bench.headline.summary import write_summary
from gpt2_triton.kernels.autotune import accounting, tuning_record
from gpt2_triton.kernels.utils import failed_features, mark_feature_failed, override_target

SUMMARY_RESERVE_S = 10.0  # kept back from the stages for the summary and plots
SOFT_DEADLINE = 0.8  # fraction of a job's time after which it starts no new measurement


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


def launch(job, allowance, args, out):
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
            event, reason = launch(job, allowance, args, out)
        elapsed = time.monotonic() - start
        results.write("job", stage=stage, job=job.name, event=event, reason=reason,
                      allowance_s=round(allowance, 1), elapsed_s=round(elapsed, 1))
        log(f"  {job.name}: {event} in {elapsed:.0f} s of {allowance:.0f} s" + (f" ({reason})" if reason else ""))
        write_summary(out, results.read(), env, budget)
    results.write("stage", stage=stage, event="end", elapsed_s=round(time.monotonic() - stage_start, 1))
