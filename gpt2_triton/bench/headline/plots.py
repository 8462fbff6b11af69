"""kernels.png and e2e.png: ours against the fastest baseline per kernel case, tokens/s per e2e stack."""
from pathlib import Path

from gpt2_triton.bench.common import cpu_note, ratio_bars
from gpt2_triton.bench.headline.environment import on_gpu
from gpt2_triton.bench.headline.jobs import JOBS
from gpt2_triton.bench.headline.records import E2E_PNG, KERNELS_PNG, OURS, Rows


def write_plots(out, records, env):
    from matplotlib.figure import Figure

    rows = Rows(records)
    note = cpu_note(on_gpu(env))
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
