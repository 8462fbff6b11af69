"""summary.md: the goals beside the measurements, then one section per stage's results (rewritten after
every job). `write_summary` composes the sections; each section is one function of the records."""
from dataclasses import fields
from pathlib import Path

from gpt2_triton.bench.common import COMPILE_BASELINES, MAX_ERR_NOTE, SHORT_OP_MS, Row, check_rows, err_text
from gpt2_triton.bench.headline.environment import on_gpu
from gpt2_triton.bench.headline.goals import GOALS, evaluate, verdict
from gpt2_triton.bench.headline.jobs import JOBS
from gpt2_triton.bench.headline.pytest_record import pytest_text
from gpt2_triton.bench.headline.records import (
    E2E_PNG,
    ENV,
    KERNELS_PNG,
    OURS,
    PYTEST_LOG,
    RESULTS,
    RUN_LOG,
    SUMMARY,
    Rows,
    job_reason,
    preflight_failures,
)
from gpt2_triton.devices import gpu_named
from gpt2_triton.kernels.utils import FEATURES


def write_summary(out, records, env, budget=None):
    """summary.md: goals beside the measurements, then the tables (rewritten after every job)."""
    rows = Rows(records)
    sections = [
        _header(env, budget),
        _section("Preflight", _preflight_text(records)),
        _goals(rows, env),
        _kernels(rows),
        _e2e(rows),
        _section("Predicted vs measured per kernel (one training step)", _prediction_text(rows, env)),
        _section("Sanity checks", _sanity_text(rows, on_gpu(env))),
        _section("Correctness: `pytest -m gpu`", pytest_text(records)),
        _section("Compiling and autotuning", _cost_text(records, env)),
        _stages(records),
        _files(),
    ]
    md = sections[0]
    for section in sections[1:]:
        md += ["", *section]
    (Path(out) / SUMMARY).write_text("\n".join(md) + "\n")


def _section(title, text):
    return [f"## {title}", "", text]


def _fmt(x, digits=1, unit=""):
    return "–" if x is None else f"{x:,.{digits}f}{unit}"


def _header(env, budget):
    """The device and versions, the command and its budget, and on a CPU that nothing is judged."""
    smi = env.get("nvidia_smi", {})
    md = [f"# GPT-2 124M headline on {env.get('device')}", ""]
    facts = [f"torch {env.get('torch')}", f"triton {env.get('triton')}", f"CUDA {env.get('cuda')}",
             f"driver {env.get('driver')}", f"commit {env.get('git_commit')}", env.get("date", "")]
    if on_gpu(env):
        facts[:0] = [f"{env.get('sm_count')} SMs", f"{env.get('memory_gib')} GiB",
                     f"SM clock {smi.get('clocks.sm', '?')}/{smi.get('clocks.max.sm', '?')} MHz (now/max)"]
    md.append("; ".join(facts) + ".")
    used = f"{budget.elapsed():.0f} s of " if budget else ""
    used += f"a {env.get('budget_s'):g} s budget"
    quick = " --quick" if env.get("quick") else ""
    md.append(f"`python -m gpt2_triton.bench headline --budget-s {env.get('budget_s'):g}{quick}`: "
              f"{used}; each autotuned launch tries at most {env.get('max_configs') or 'all'} candidates "
              f"(pytest and preflight: {env.get('pytest_max_configs') or 'all'}); dtype {env.get('dtype')}.")
    if not on_gpu(env):
        md += ["", "**CPU run: tiny sizes through Triton's interpreter. This checks that every stage runs; "
                   "the numbers are not kernel performance and no goal is judged.**"]
    return md


def _goals(rows, env):
    md = ["## Goals", "", "| goal | case | measured | verdict |", "|---|---|---|---|"]
    for goal in GOALS:
        for case, text, value, reason in evaluate(goal, rows, env):
            md.append(f"| {goal.text} | {case} | {text or reason} | {verdict(value, goal, on_gpu(env))} |")
    return md


def _kernels(rows):
    """Each of our kernel rows beside its fastest baseline, then what the torch.compile baselines took to compile."""
    md = ["## Kernels (ours vs the fastest baseline)", "",
          f"Per call: median of `do_bench` (L2 flushed before each call); ops under {SHORT_OP_MS} ms also "
          "timed back to back (many calls between two events: launch overhead hidden). " + MAX_ERR_NOTE, "",
          "| case | mode | ours ms | TFLOP/s | GB/s | ours peak MB | ours max err | fastest baseline | its ms | "
          "its max err | ours × | its peak / ours | first call s |",
          "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in [r for r in rows.rows if r["stage"] == "kernels" and r["provider"] == OURS]:
        md.append(_kernel_line(r, rows.best_baseline(r["case"], r["mode"])))
    for provider in COMPILE_BASELINES:
        compiled = {}
        for r in rows.rows:
            if r["stage"] == "kernels" and r["provider"] == provider and r["extra"].get("first_call_s") is not None:
                compiled[r["case"]] = compiled.get(r["case"], 0.0) + r["extra"]["first_call_s"]
        if compiled:
            md += ["", f"torch.compile baselines ({provider}), first calls of fwd, bwd and fwd+bwd together "
                   "(compilation): " + ", ".join(f"{case} {s:.0f} s" for case, s in compiled.items()) + "."]
    return md


def _kernel_line(r, base):
    if not r["median_ms"]:
        return f"| {r['case']} | {r['mode']} | {r['error']} | | | | | | | | | | |"
    speed = f"{base['median_ms'] / r['median_ms']:.2f}" if base else "–"
    mem = (f"{base['peak_mb'] / r['peak_mb']:.1f}" if base and base["peak_mb"] and r["peak_mb"] else "–")
    base_err = err_text(base.get("max_err")) if base else ""
    b2b = r["extra"].get("back_to_back_ms")
    ours_ms = f"{r['median_ms']:.3f}" + (f" (back to back {b2b[0]:.3f})" if b2b else "")
    return (f"| {r['case']} | {r['mode']} | {ours_ms} | {_fmt(r['tflops'])} | {_fmt(r['gbps'], 0)} | "
            f"{_fmt(r['peak_mb'])} | {err_text(r.get('max_err'))} | {base['provider'] if base else '–'} | "
            f"{_fmt(base['median_ms'] if base else None, 3)} | {base_err} | "
            f"{speed} | {mem} | "
            f"{_fmt(r['extra'].get('first_call_s'), 2)} |")


def _e2e(rows):
    """One training step per stack, then the same step at grad_accum > 1."""
    md = ["## End to end: one training step (fwd + bwd + AdamW, bf16 autocast on CUDA)", "",
          "| stack | case | ms/step (p20-p80) | tokens/s | MFU | peak MB | first step s | compile s | "
          "cold start s | first step: Triton compiles, s / tunings, s |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for job in [j.name for j in JOBS if j.stage == "e2e"]:
        r = rows.e2e(job)
        if r is None or not r["median_ms"]:
            md.append(f"| {job} | | {r['error'] if r else job_reason(rows.records, job)} | | | | | | | |")
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
    return md + ["", "### Gradient accumulation: `train_step` at grad_accum > 1", "", _accumulation_text(rows)]


def _stages(records):
    """Each stage's and job's time allowed and taken, and how it ended."""
    md = ["## Stages", "", "| stage / job | time allowed s | took s | status |", "|---|---:|---:|---|"]
    for r in records:
        if r["kind"] == "stage" and r["event"] == "start":
            md.append(f"| **{r['stage']}** | {r['allowance_s']:.0f} | | |")
        elif r["kind"] == "job":
            status = r["event"] + (f": {r['reason']}" if r["reason"] else "")
            md.append(f"| {r['job']} | {r['allowance_s']:.0f} | {r['elapsed_s']:.0f} | {status} |")
        elif r["kind"] == "stage" and r["event"] == "skip":
            md.append(f"| **{r['stage']}** | | | skipped: {r['reason']} |")
    return md


def _files():
    return [f"![kernels]({KERNELS_PNG}) ![e2e]({E2E_PNG})", "",
            f"Every row (all providers, p20/p80, peak memory, first-call times) is in `{RESULTS}`; "
            f"the environment in `{ENV}`; job output in `{RUN_LOG}` and `{PYTEST_LOG}`."]


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
            reason = (r["error"] or "no accumulation timing in the row") if r else job_reason(rows.records, job)
            md.append(f"| {job} | | {reason} | | | | |")
            continue
        (micro, m20, m80), (opt, o20, o80) = a["micro_step_ms"], a["optimizer_step_ms"]
        md.append(f"| {job} | {r['case']} | {a['micro_steps']} x {a['steps']} | {micro:.2f} ({m20:.2f}-{m80:.2f}) | "
                  f"{opt:.2f} ({o20:.2f}-{o80:.2f}) | {a['step_ms'][0]:.1f} | {a['tokens_per_s']:,} |")
    return "\n".join(md)


PREDICTED_STACKS = (("triton", "triton"), ("eager-sdpa", "torch"))  # e2e job, kernels= of the static trace


def _prediction_text(rows, env):
    """The static profile's prediction (realistic band) beside the e2e job's step under torch.profiler."""
    if not on_gpu(env):
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


def _sanity_text(rows, gpu_run: bool):
    """check_rows over every measured row (the timing order where the run had a GPU): each failure, or that all
    passed."""
    names = {f.name for f in fields(Row)}
    problems = check_rows([Row(**{k: v for k, v in r.items() if k in names}) for r in rows.rows],
                          timing_order=gpu_run)
    if not problems:
        return ("Every measured row passed (a fwd+bwd is not faster than its fwd or bwd alone; TFLOP/s stay "
                "under the device's peak)." if gpu_run else
                "Every measured row passed (a positive time; on a CPU the timings are not performance, so their "
                "order is not checked).")
    return "\n".join(f"- FAILED {text}" for text in problems)


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
        return f"Not run: {job_reason(records, 'preflight')}." if job else "Not run yet."
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
