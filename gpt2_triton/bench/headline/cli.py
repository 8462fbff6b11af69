"""python -m gpt2_triton.bench headline: the command line, the stages in order, and what --strict fails on."""
import argparse
import json
import sys
from pathlib import Path

from gpt2_triton.bench.common import has_cuda, out_dir_for
from gpt2_triton.bench.headline.environment import collect_env, find_autotuners
from gpt2_triton.bench.headline.jobs import STAGES
from gpt2_triton.bench.headline.plots import write_plots
from gpt2_triton.bench.headline.records import ENV, OUTPUTS, RESULTS, SUMMARY, Results
from gpt2_triton.bench.headline.runner import SUMMARY_RESERVE_S, Budget, run_job, run_stage
from gpt2_triton.bench.headline.summary import write_summary
from gpt2_triton.kernels.utils import is_interpreter


def default_out():
    return out_dir_for(None) / "headline"


def parse_args(argv):
    from gpt2_triton.bench import headline  # the package's docstring is the command's description

    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gpt2_triton.bench headline",
                                description=headline.__doc__,
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
