"""The benchmarks' figures: ratio bars on a log axis around 1x, speed-ups of ours per baseline, and
scaling lines per provider."""
import math

from gpt2_triton.bench.env import has_cuda
from gpt2_triton.bench.rows import ratio_text, speedups


def cpu_note(on_cuda: bool | None = None) -> str:
    """A plot title's warning for CPU results (on_cuda: where the rows were measured; default: here)."""
    return "" if (has_cuda() if on_cuda is None else on_cuda) else " - CPU interpreter, not performance"


def ratio_bars(ax, items, ylabel):
    """Bars of ratios on a log axis, drawn from 1x (above: ours ahead; below: behind), each labelled with
    its value; an item whose value is None is marked "not measured" instead of a bar of height 0."""
    values = [v for _, v in items if v]
    low, high = min(values + [1.0]) / 3, max(values + [1.0]) * 3
    for i, (_, v) in enumerate(items):
        if v:
            ax.bar(i, v - 1, bottom=1, color="tab:green" if v >= 1 else "tab:red")
            ax.annotate(f"{ratio_text(v)}x", (i, v), ha="center", va="bottom" if v >= 1 else "top", fontsize=6)
        else:
            ax.annotate("not measured", (i, math.sqrt(low * high)), ha="center", va="center", rotation=90,
                        fontsize=7, color="gray")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels([label for label, _ in items], rotation=75, ha="right", fontsize=6)
    ax.set_xlim(-0.6, len(items) - 0.4)
    ax.set_ylabel(ylabel, fontsize=8)


def speedup_figure(rows, title):
    """Bars: speedup of ours over each baseline, one per (case, mode, baseline), on a log axis."""
    from matplotlib.figure import Figure

    pairs = speedups(rows)
    fig = Figure(figsize=(max(6, 0.3 * len(pairs) + 2), 5), layout="constrained")
    ax = fig.add_subplot()
    if pairs:
        ratio_bars(ax, [(f"{base.case}\n{base.mode} vs {base.provider}", s) for _, base, s in pairs],
                   "speedup of ours (baseline ms / ours ms)")
    else:
        ax.text(0.5, 0.5, "no comparable results", ha="center", transform=ax.transAxes)
    ax.set_title(title + cpu_note(), fontsize=9)
    return fig


def sizes_text(rows, keys) -> str:
    """The sizes of `keys` that `rows` measured, for a title: "H12 D64" when each key has one value, else
    "B·T = 16,384" when their product has one, else every combination: "B x T = 1 x 32, 1 x 64"."""
    combos = sorted({tuple(r.shape[k] for k in keys) for r in rows})
    if len(combos) == 1:
        return " ".join(f"{k}{v}" for k, v in zip(keys, combos[0]))
    products = {math.prod(c) for c in combos}
    if len(products) == 1:
        return f"{'·'.join(keys)} = {products.pop():,}"
    return f"{' x '.join(keys)} = " + ", ".join(" x ".join(map(str, c)) for c in combos)


def scaling_figure(rows, x_key, title, y="tflops", ylabel="TFLOP/s", fallback=None):
    """Lines: one per provider, y against shape[x_key], one panel per mode. Where no row has y (TFLOP/s
    on a CPU) and `fallback` = (field, label) names another (("median_ms", "median ms")), that is drawn
    instead; a provider's sizes without a measurement are named in its legend entry."""
    from matplotlib.figure import Figure

    log_y = False
    if fallback and not any(getattr(r, y) is not None for r in rows):
        (y, ylabel), log_y = fallback, True  # times of ours (interpreter) and eager lie decades apart
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig = Figure(figsize=(5 * len(modes), 4), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in sorted({r.provider for r in rows}):
            mine = [r for r in rows if r.mode == mode and r.provider == provider]
            pts = sorted((r.shape[x_key], getattr(r, y)) for r in mine if getattr(r, y) is not None)
            missing = sorted({r.shape[x_key] for r in mine if getattr(r, y) is None})
            label = provider + (f" (not measured: {x_key}={', '.join(map(str, missing))})" if missing else "")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode}", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} measured on this device", ha="center", transform=ax.transAxes)
    fig.suptitle(title + cpu_note(), fontsize=9)
    return fig


def plot_scaling(rows, path, x_key, title, **kwargs):
    scaling_figure(rows, x_key, title, **kwargs).savefig(path, dpi=120)
