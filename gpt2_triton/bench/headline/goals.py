"""The headline's goals and how each is judged from the rows."""
from dataclasses import dataclass
from typing import Optional

from gpt2_triton.bench.headline.environment import on_gpu
from gpt2_triton.bench.headline.records import job_reason, matches


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



def evaluate(goal, rows, env):
    """[(case, measured text, value or None, reason)] for one goal."""
    gpu_run = on_gpu(env)
    if goal.metric == "tokens":
        ours, base = rows.e2e("triton-compile"), rows.e2e(goal.baseline)
        for row, job in ((ours, "triton-compile"), (base, goal.baseline)):
            if row is None or not row["median_ms"]:
                reason = row["error"] if row else job_reason(rows.records, job)
                return [("train step", "", None, f"{job}: {reason}")]
        ratio = ours["extra"]["tokens_per_s"] / base["extra"]["tokens_per_s"]
        text = (f"{ratio:.2f}× ({ours['extra']['tokens_per_s']:,} vs {base['extra']['tokens_per_s']:,} tok/s)")
        return [(ours["case"], text, ratio, "")]
    cases = rows.cases(goal.job, goal.op)
    if not cases:
        return [("", "", None, job_reason(rows.records, goal.job))]
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
            errors = [r["error"] for r in rows.get(case, goal.mode) if matches(r["provider"], goal.baseline)]
            out.append((case, "", None, f"{goal.baseline}: {errors[0]}" if errors else
                        f"no `{goal.baseline}` baseline in this run" + ("" if gpu_run else " (CPU)")))
            continue
        if goal.metric == "speedup":
            ratio = base["median_ms"] / ours["median_ms"]
            out.append((case, f"{ratio:.2f}× ({ours['median_ms']:.3f} vs {base['provider']} "
                              f"{base['median_ms']:.3f} ms)", ratio, ""))
        else:  # memory
            if not ours["peak_mb"] or not base["peak_mb"]:
                out.append((case, "", None, "no peak memory measured" + ("" if gpu_run else " (CPU)")))
                continue
            ratio = base["peak_mb"] / ours["peak_mb"]
            out.append((case, f"{ratio:.1f}× less ({ours['peak_mb']:.0f} vs {base['provider']} "
                              f"{base['peak_mb']:.0f} MB)", ratio, ""))
    return out


def verdict(value, goal, gpu_run):
    if value is None:
        return "not measured"
    if not gpu_run:
        return "– (CPU: not performance)"
    if value >= goal.target:
        return "**met**"
    return f"missed by {100 * (1 - value / goal.target):.0f}%"
