"""A benchmark's results as files and text: JSON lines, a markdown table, the printed table and their
notes, and where results go."""
import json
from dataclasses import asdict
from pathlib import Path

from gpt2_triton.bench.env import device_slug, has_cuda
from gpt2_triton.bench.plots import speedup_figure
from gpt2_triton.bench.rows import ratio_text

RESULTS_ROOT = Path("bench") / "results"  # under the current folder: bench/results/<device>/


def speedup_text(rows, ours="triton"):
    """Row -> "baseline ms / ours ms" as text for each baseline row that has an ours to compare."""
    ours_ms = {r.key: r.median_ms for r in rows if r.provider == ours and r.median_ms}
    return lambda r: (ratio_text(r.median_ms / ours_ms[r.key])
                      if r.key in ours_ms and r.provider != ours and r.median_ms else "")


def cpu_columns_note() -> str:
    """Why TFLOP/s, GB/s and peak MB are blank on a CPU ("" with CUDA)."""
    if has_cuda():
        return ""
    return ("CPU: TFLOP/s, GB/s and peak MB are left blank (tiny sizes, triton rows run in Triton's interpreter: "
            "a rate means nothing here; peak memory is measured on CUDA only).")


def sanity_notes(rows) -> list[str]:
    """Every failed sanity check of `rows` (check_rows), under a heading line; [] when none failed."""
    failed = [f"{r.case} | {r.mode} | {r.provider}: {text}" for r in rows for text in r.sanity or ()]
    return [f"sanity check failed ({len(failed)}):"] + [f"  {text}" for text in failed] if failed else []


def _check_mark(r) -> str:
    return "" if r.sanity is None else "FAILED" if r.sanity else "ok"


def format_table(rows, ours="triton"):
    lines = [f"{'case':<46} {'mode':<8} {'provider':<20} {'median ms':>10} {'p20-p80':>17} "
             f"{'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>9} {'max err':>9} {'ours x':>7} {'check':>6}"]
    ratio_of = speedup_text(rows, ours)
    for r in rows:
        if r.error:
            lines.append(f"{r.case:<46} {r.mode:<8} {r.provider:<20} not measured: {r.error[:60]}")
            continue
        ratio = ratio_of(r)
        lines.append(
            f"{r.case:<46} {r.mode:<8} {r.provider:<20} {r.median_ms:>10.3f} "
            f"{f'{r.p20_ms:.3f}-{r.p80_ms:.3f}':>17} {_fmt(r.tflops, 1):>8} {_fmt(r.gbps, 0):>8} "
            f"{_fmt(r.peak_mb, 1):>9} {err_text(r.max_err):>9} {ratio:>7} {_check_mark(r):>6}")
    return "\n".join(lines + sanity_notes(rows))


MAX_ERR_NOTE = ("max err: the largest absolute difference from the fp32 reference (gpt2_triton.kernels.reference) "
                "on the timed inputs, computed once apart from the timing: fwd rows the output, bwd and fwd+bwd rows "
                "the output and every input gradient (one seeded incoming gradient for all providers).")


def err_text(x) -> str:
    """A max abs error as text: 2 significant digits ("3.1e-03"), "0" when exact, "" when not computed."""
    return "" if x is None else "0" if x == 0 else f"{x:.1e}"


def _fmt(x, digits):
    return "" if x is None else f"{x:.{digits}f}"


def write_results(rows, out_dir, name, env):
    """Write the JSON lines, the markdown table and the PNG plot of one benchmark."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.jsonl", "w") as f:
        for r in rows:
            r.env = env
            f.write(json.dumps(asdict(r)) + "\n")
    md = [f"# {name}", "", f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, driver {env['driver']}; commit {env['git_commit']}; {env['date']}", ""]
    if not has_cuda():
        md += ["**CPU run (`--quick`): tiny sizes through Triton's interpreter. These numbers check "
               "that the code runs; they are not kernel performance.**", ""]
    md += ["| case | mode | provider | median ms | p20-p80 ms | TFLOP/s | GB/s | peak MB | max err | speedup of ours "
           "| check |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    ratio_of = speedup_text(rows)
    for r in rows:
        if r.error:
            md.append(f"| {r.case} | {r.mode} | {r.provider} | not measured: {r.error[:80]} | | | | | | | |")
            continue
        ratio = ratio_of(r)
        ratio = f"{ratio}x" if ratio else ""
        md.append(f"| {r.case} | {r.mode} | {r.provider} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | "
                  f"{_fmt(r.tflops, 1)} | {_fmt(r.gbps, 0)} | {_fmt(r.peak_mb, 1)} | {err_text(r.max_err)} | {ratio} | "
                  f"{_check_mark(r)} |")
    md += ["", MAX_ERR_NOTE, "", cpu_columns_note()] + [f"- {note.strip()}" if note.startswith("  ") else note
                                                        for note in sanity_notes(rows)]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    speedup_figure(rows, title=f"{name} on {env['device']}").savefig(out_dir / f"{name}.png", dpi=120)
    return out_dir



def out_dir_for(base, device=None):
    """Where results go: `base` when given, else bench/results/<device> under the current folder (the
    device's name, e.g. nvidia-h100-80gb-hbm3 or cpu; or a fixed name such as "static")."""
    return Path(base) if base else RESULTS_ROOT / (device or device_slug())
