"""The profile: compile every case with each triton, trace the bytes and launches, write JSON + markdown."""
import datetime
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from gpt2_triton.bench.common import git_commit
from gpt2_triton.bench.static import cases as cases_mod
from gpt2_triton.bench.static import predict
from gpt2_triton.bench.static.native import compile_many
from gpt2_triton.bench.static.trace import H100_SMS, H100_TARGET
from gpt2_triton.devices import SM90_LIMITS
from gpt2_triton.kernels.autotune import max_configs

# H100 SXM (sm_90) per-SM limits used for CTAs per SM (devices.SM90_LIMITS), with its SM count.
H100 = {"sms": H100_SMS, **SM90_LIMITS}
assert H100["smem_per_block"] == H100_TARGET["smem_per_block"]


def ctas_per_sm(regs, num_warps, shared) -> int:
    """Resident CTAs per H100 SM allowed by registers, shared memory and warps (the occupancy
    calculator's rules: registers allocated per warp in units of 256, 1 KB of shared memory reserved
    per CTA)."""
    if regs is None or shared is None:
        return None
    if shared > H100["smem_per_block"]:
        return 0
    regs_per_warp = math.ceil(max(regs, 1) * 32 / H100["reg_alloc_unit"]) * H100["reg_alloc_unit"]
    by_regs = (H100["regs_per_sm"] // regs_per_warp) // num_warps
    by_smem = H100["smem_per_sm"] // (shared + H100["smem_reserved_per_block"])
    by_warps = H100["max_warps_per_sm"] // num_warps
    return min(by_regs, by_smem, by_warps, H100["max_ctas_per_sm"])


def compile_all(cases, pythons, jobs=1, log=print) -> dict:
    """{triton version: {case id: result}} for every case, with `jobs` workers per python, each compile
    cold (an empty Triton cache), so that `compile_s` is what a first launch pays."""
    specs = [c.spec() for c in cases]
    out = {}
    for python in pythons:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="gpt2_triton_static_cache") as cache_dir:
            version, results = compile_many(specs, python, jobs, cache_dir=cache_dir)
        out[version] = results
        for res in results.values():
            if not res["ok"]:
                log(f"  FAIL {res['id']} (triton {version}): {res['error'][:300]}")
        log(f"  triton {version}: {len(specs)} compiles in {time.time() - t0:.0f} s ({python or 'this python'})")
    return out


def run(out_dir, pythons=(None,), quick=False, jobs=1, batch=16, only=(), log=print) -> dict:
    """The whole profile; `quick`: first autotune candidate only; `only`: cases whose id contains one
    of these strings."""
    t_start = time.time()
    timing = {}
    t = time.time()
    all_cases = cases_mod.gpt2_cases(batch)
    if quick:  # the hand-picked (first) candidate of each launch only
        all_cases = [c for c in all_cases if c.first_candidate]
    if only:
        all_cases = [c for c in all_cases if any(s in c.id for s in only)]
    timing["trace_launches_s"] = time.time() - t
    log(f"{len(all_cases)} compile cases (kernel x autotune candidate) at GPT-2 shapes (124M, and the larger "
        "models' widths)")
    t = time.time()
    compiled = compile_all(all_cases, pythons, jobs, log)
    timing["compile_s"] = time.time() - t
    t = time.time()
    ops = cases_mod.op_traffic((4, batch), wide_batch=batch)
    traces = cases_mod.step_traces(batch)
    step = cases_mod.step_summary(batch, traces)
    timing["traffic_s"] = time.time() - t
    prediction = predict.predict(traces, batch)

    kernels = []
    for c in all_cases:
        row = {"id": c.id, "kernel": c.launch.fn.__name__, "module": c.launch.module,
               "config": cases_mod.config_id(c.config) if c.config is not None else None,
               "first_candidate": c.first_candidate, "first_contact": c.first_contact,
               "in_step": any(" x" in site for site in c.sites), "tuning_keys": c.tuning_keys,
               "sites": list(c.sites), "programs": c.programs, "num_warps": c.num_warps, "results": {}}
        for version, results in compiled.items():
            r = dict(results.get(c.id, {"ok": False, "error": "not compiled"}))
            if r.get("ok"):
                r["ctas_per_sm"] = ctas_per_sm(r.get("regs"), r.get("num_warps", c.num_warps), r.get("shared"))
                if r["ctas_per_sm"]:
                    r["waves"] = round(c.programs / (H100["sms"] * r["ctas_per_sm"]), 2)
            row["results"][version] = r
        kernels.append(row)
    timing["total_s"] = time.time() - t_start
    profile = {
        "env": {"torch": torch.__version__, "tritons": sorted(compiled), "git_commit": git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "cpus": os.cpu_count(), "quick": quick},
        "shapes": {"B": batch, "T": cases_mod.T, "C": cases_mod.C, "H": cases_mod.N_HEAD,
                   "D": cases_mod.C // cases_mod.N_HEAD,
                   "V": cases_mod.VOCAB, "dtype": "bf16 autocast, fp32 parameters",
                   "wider": [f"{preset} (C={w.n_embd}, H={w.n_head})"
                             for preset, w in zip(cases_mod.LARGER_PRESETS, cases_mod.LARGER_WIDTHS)]},
        "h100": H100, "kernels": kernels, "ops": ops, "micro_step": step, "prediction": prediction, "timing": timing,
        "cold_start": cold_start(kernels, sorted(compiled)),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "static.json").write_text(json.dumps(profile, indent=1, default=str))
    (out_dir / "static.md").write_text(markdown(profile))
    log(f"wrote {out_dir / 'static.json'} and {out_dir / 'static.md'} ({timing['total_s']:.0f} s)")
    return profile


# Cold start: what the first training micro-step on a machine with empty caches compiles and tunes.
DEVICE_HOST_CORES = 16  # CPU cores of the lent H100 / H200 machines
BENCH_S_PER_CONFIG = 0.2  # an estimate of timing one candidate at one key (do_bench: 25 ms warm-up, 100 ms of
#                           reps, its first calls); tuning is not measured without a GPU


def makespan(seconds, workers: int) -> float:
    """Wall seconds of independent jobs on `workers` processes, longest first to the least loaded."""
    loads = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)


def cold_start(kernels, versions) -> dict:
    """Per kernel and in all, for a cold GPT-2 training micro-step (B as profiled, kernels="triton"): the
    compiles it triggers (each launch's first-contact candidates; the cases are compiled cold, so their
    compile_s is what a first launch pays on this CPU), their seconds one after the other (the JIT) and
    on DEVICE_HOST_CORES processes (a parallel precompile), and the tunings (key x candidate) with an
    estimate of their seconds."""
    step = [k for k in kernels if k["in_step"] and k["first_contact"]]
    per_kernel = {}
    by_launch = {}
    for k in step:
        by_launch.setdefault(launch_base(k), []).append(k)
    for ks in by_launch.values():
        row = per_kernel.setdefault(ks[0]["kernel"], {"launches": 0, "compiles": 0, "tunings": 0,
                                                      "compile_s": {v: 0.0 for v in versions}})
        row["launches"] += 1
        row["compiles"] += len(ks)
        row["tunings"] += ks[0]["tuning_keys"] * len(ks) if len(ks) > 1 else 0
        for v in versions:
            row["compile_s"][v] += sum(k["results"][v].get("compile_s") or 0.0 for k in ks)
    total = {"compiles": len(step), "tunings": sum(r["tunings"] for r in per_kernel.values()),
             "compile_s": {v: round(sum(k["results"][v].get("compile_s") or 0.0 for k in step), 1)
                           for v in versions},
             "compile_s_parallel": {v: round(makespan([k["results"][v].get("compile_s") or 0.0 for k in step],
                                                      DEVICE_HOST_CORES), 1) for v in versions}}
    total["tune_s_estimate"] = round(total["tunings"] * BENCH_S_PER_CONFIG, 1)
    for row in per_kernel.values():
        row["compile_s"] = {v: round(x, 2) for v, x in row["compile_s"].items()}
    return {"first_contact_configs": max_configs(), "cores": DEVICE_HOST_CORES,
            "bench_s_per_config": BENCH_S_PER_CONFIG, "kernels": per_kernel, "total": total}


# ----------------------------------------------------------------------------------------------
# Budgets for tests/test_static.py, from a profile
# ----------------------------------------------------------------------------------------------
def spill_budget(measured: int) -> int:
    return measured + 16


def loop_budget(measured: int) -> int:
    return measured + max(2, math.ceil(0.02 * measured))


def ratio_budget(measured: float) -> float:
    return math.ceil(measured * 1.02 * 100) / 100


def count_budget(measured: int) -> int:
    return measured + math.ceil(0.02 * measured)


def _dict_text(d: dict) -> str:
    def lit(x):
        return "(" + ", ".join(json.dumps(e) for e in x) + ")" if isinstance(x, tuple) else json.dumps(x)
    return "{\n" + "".join(f"    {lit(k)}: {lit(v)},\n" for k, v in d.items()) + "}"


def budgets(profile: dict) -> str:
    """tests/test_static.py's budget tables (today's measurements with its margins) as Python text."""
    out = []
    for version in profile["env"]["tritons"]:
        key = ".".join(version.split(".")[:2])
        res = [(k, k["results"][version]) for k in profile["kernels"]]
        spills = {k["id"]: spill_budget(r["spill_stores"]) for k, r in res if r.get("ok") and r["spill_stores"]}
        loops = {k["id"]: [loop_budget(loop["instructions"]) for loop in r["sass"]["loops"]]
                 for k, r in res if r.get("ok") and k["first_candidate"]}
        not_wgmma = sorted(k["id"] for k, r in res if r.get("ok") and r["dots"]["wgmma"] != r["dots"]["dots"])
        out.append(f"# triton {version}")
        out.append(f'SPILL_BUDGET_BYTES["{key}"] = {_dict_text(spills)}')
        out.append(f'HOT_LOOP_BUDGET["{key}"] = {_dict_text(loops)}')
        out.append(f"# not wgmma: {not_wgmma}")
    ratios = {(r["op"], r["B"]): ratio_budget(r["triton"]["bytes"] / r["min_bytes"]) for r in profile["ops"]}
    out.append(f"BYTES_RATIO_BUDGET = {_dict_text(ratios)}")
    step = profile["micro_step"]["triton"]
    out.append(f'STEP_BUDGET = {{"triton_launches": {count_budget(step["triton_launches"])}, '
               f'"device_ops": {count_budget(step["device_ops"])}, "host_syncs": {step["host_syncs"]}}}')
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _gb(b):
    return f"{b / 1e9:.2f}"


def _counts(d) -> str:
    return ", ".join(f"{k.removeprefix('aten.')} {n}" for k, n in d.items())


def _cell(values):
    """'a / b' over triton versions ('-' for a missing value)."""
    return " / ".join("-" if v is None else str(v) for v in values)


def _loop_counts(loop):
    c, ops = loop["classes"], loop["opcodes"]
    ldg = loop.get("ldg_bits", {})
    ldg_txt = str(c.get("ldg", 0)) + (" (" + ", ".join(f"{n}x{b}b" for b, n in ldg.items()) + ")" if ldg else "")
    return [loop["instructions"], c.get("hgmma", 0) + c.get("hmma", 0), c.get("mufu", 0), ops.get("FFMA", 0),
            ops.get("FMUL", 0), ops.get("ISETP", 0), c.get("int", 0), ldg_txt, c.get("lds", 0) + c.get("ldgsts", 0)
            + c.get("tma", 0)]


def launch_base(k) -> str:
    return k["id"] if k["config"] is None else k["id"][: -len(k["config"]) - 1]


def summary_rows(p) -> list:
    """One markdown row per launch: its first candidate, and how many of its candidates spill."""
    versions = p["env"]["tritons"]
    by_launch = {}
    for k in p["kernels"]:
        by_launch.setdefault(launch_base(k), []).append(k)
    rows = []
    for base, ks in by_launch.items():
        first = next(k for k in ks if k["first_candidate"])
        rs = [first["results"][v] for v in versions]
        spilling = []
        for v in versions:
            sp = [k["results"][v].get("spill_stores") or 0 for k in ks if k["results"][v].get("ok")]
            n = sum(1 for x in sp if x)
            spilling.append(f"{n} of {len(sp)}" + (f" (max {max(sp)})" if n else ""))
        loops = _cell([", ".join(str(loop["instructions"]) for loop in r["sass"]["loops"]) or "no loop"
                       if r.get("ok") else "FAIL" for r in rs])
        dots = _cell(["{wgmma}/{dots}".format(**r["dots"]) if r.get("ok") else "FAIL" for r in rs])
        rows.append(f"| {base} | {first['config'] or '-'} | {', '.join(first['sites'])} | "
                    f"{_cell([r.get('regs') for r in rs])} | {_cell([r.get('spill_stores') for r in rs])} | "
                    f"{' / '.join(spilling)} | {_cell([r.get('ctas_per_sm') for r in rs])} | {dots} | {loops} |")
    return rows


def cold_start_lines(p) -> list:
    cs = p.get("cold_start")
    if not cs:
        return []
    versions = p["env"]["tritons"]
    vs = " / ".join(versions)
    total = cs["total"]
    lines = [
        f"## Cold start: the first training micro-step (B={p['shapes']['B']}) with empty caches",
        "",
        f"Each autotuned launch tries its first {cs['first_contact_configs']} candidates the static rule admits "
        "(`gpt2_triton.kernels.autotune`); each case is compiled cold for sm_90 on this CPU "
        f"({p['env']['cpus']} cores). Compile s: triton {vs}, one after the other as the JIT compiles them. "
        f"Tunings: (tuning key, candidate) pairs timed, about {cs['bench_s_per_config']} s each on a GPU "
        "(an estimate: nothing is timed here).",
        "",
        "| kernel | launches | compiles | compile s | tunings |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in sorted(cs["kernels"].items()):
        lines.append(f"| {name} | {r['launches']} | {r['compiles']} | {_cell([r['compile_s'][v] for v in versions])} "
                     f"| {r['tunings']} |")
    lines += [f"| **all** | {sum(r['launches'] for r in cs['kernels'].values())} | **{total['compiles']}** | "
              f"**{_cell([total['compile_s'][v] for v in versions])}** | {total['tunings']} |",
              "",
              f"On {cs['cores']} cores (a parallel precompile, longest first): "
              f"{_cell([total['compile_s_parallel'][v] for v in versions])} s of compiling; tuning about "
              f"{total['tune_s_estimate']} s."]
    return lines


def markdown(p) -> str:
    """static.md: one section per part of the profile, a blank line between sections."""
    sections = [_header(p), _summary(p), cold_start_lines(p), _kernels(p), _hot_loops(p), _op_bytes(p),
                _micro_step(p)]
    lines = []
    for section in (s for s in sections if s):
        lines += ([""] if lines else []) + section
    lines.append("")
    if "prediction" in p:
        lines += ["", predict.markdown(p["prediction"])]
    return "\n".join(lines)


def _header(p) -> list:
    vs = " / ".join(p["env"]["tritons"])
    s = p["shapes"]
    return [
        "# Static profile: GPT-2 124M training shapes, sm_90 (H100)",
        "",
        f"`python -m gpt2_triton.bench.static` | commit {p['env']['git_commit']} | torch {p['env']['torch']} | "
        f"triton {vs} | "
        f"{p['env']['date']} | {p['timing']['total_s']:.0f} s on {p['env']['cpus']} CPUs"
        + (" | --quick (first candidate only)" if p["env"]["quick"] else ""),
        "",
        f"Shapes: B={s['B']}, T={s['T']}, C={s['C']}, H={s['H']}, D={s['D']}, V={s['V']}, {s['dtype']}. "
        "Nothing ran on a GPU: compiled for sm_90 with each triton's ptxas; bytes and launches traced on "
        "fake tensors (see bench/static/__init__.py for the method).",
        "",
        f"Larger models: the LayerNorm, attention, MLP and lm_head + loss of "
        f"{' / '.join(s.get('wider', []))} (B={s['B']}) are traced too; a launch whose specialization "
        "124M's launches lack is a case of its own, its id tagged with the width (e.g. `-C1024`), and the "
        "op-bytes table has a row per width.",
    ]


def _summary(p) -> list:
    vs = " / ".join(p["env"]["tritons"])
    return [
        "## Summary: each launch, its first (hand-picked) autotune candidate",
        "",
        f"Cells: triton {vs}, in that order. Spilling candidates: of all candidates the autotuner may pick for "
        "this launch, how many spill and the most spill-store bytes. Loops: SASS instructions per iteration "
        "of each loop, in address order.",
        "",
        "| kernel (launch) | candidate | used by | regs | spill B | spilling candidates | CTAs/SM | dots wgmma/all "
        "| loops: instructions per iteration |",
        "|---|---|---|---:|---:|---|---:|---:|---|",
        *summary_rows(p),
    ]


def _kernels(p) -> list:
    """Every launch and autotune candidate: resources, dots, TMA, pipelining and compile time per triton."""
    versions = p["env"]["tritons"]
    vs = " / ".join(versions)
    lines = [
        "## Kernels: every launch and autotune candidate",
        "",
        f"Cells: triton {vs}, in that order. First contact: among the candidates its autotuner tries the first "
        "time it meets a tuning key. CTAs: grid size of the launch. CTAs/SM: resident per H100 SM "
        "(registers, shared memory, warps). dots: wgmma of all tl.dot. Pipelined: asynchronous copies "
        "(cp.async / TMA) issued ahead of use in the TTGIR. Compile s: cold, on this CPU.",
        "",
        "| kernel (launch) | candidate | first contact | used by | CTAs | warps | regs | spill st B | smem KB "
        "| CTAs/SM | dots wgmma/all | TMA | pipelined | compile s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for k in p["kernels"]:
        rs = [k["results"][v] for v in versions]

        def get(key, fmt=None, rs=rs):
            return _cell([(fmt(r[key]) if fmt else r[key]) if r.get("ok") and r.get(key) is not None else
                          ("FAIL" if not r.get("ok") else None) for r in rs])
        dots = _cell([f"{r['dots']['wgmma']}/{r['dots']['dots']}" if r.get("ok") else "FAIL" for r in rs])
        tma = _cell(["yes" if r.get("tma") else "no" for r in rs if r.get("ok")])
        piped = _cell(["yes" if r.get("pipeline", {}).get("pipelined") else "no" for r in rs if r.get("ok")])
        lines.append(f"| {launch_base(k)} | {k['config'] or '-'} | {'yes' if k.get('first_contact', True) else 'no'} | "
                     f"{', '.join(k['sites'])} | {k['programs']} | "
                     f"{k['num_warps']} | {get('regs')} | {get('spill_stores')} | "
                     f"{get('shared', lambda b: round(b / 1024, 1))} | {get('ctas_per_sm')} | {dots} | {tma} | "
                     f"{piped} | {get('compile_s', lambda x: round(x, 2))} |")
    return lines


def _hot_loops(p) -> list:
    """Each loop of each launch's first candidate: SASS instructions per iteration by opcode class."""
    lines = [
        "## Hot loops (SASS instructions per iteration), first candidate of each launch",
        "",
        "One row per loop and triton version; `line`: the kernel source line the loop comes from. "
        "MMA: HGMMA + HMMA; int: integer/address math (IMAD, IADD3, LEA, SHF, LOP3, ...); "
        "LDG: global loads (count x width); smem: LDS/LDSM + LDGSTS + TMA.",
        "",
        "| kernel (launch) | candidate | triton | loop (line) | instr | MMA | MUFU | FFMA | FMUL | ISETP | int "
        "| LDG | smem |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for k in p["kernels"]:
        if not k["first_candidate"]:
            continue
        base = launch_base(k)
        for v in p["env"]["tritons"]:
            r = k["results"][v]
            if not r.get("ok"):
                continue
            for i, loop in enumerate(r["sass"]["loops"]):
                cells = " | ".join(str(x) for x in _loop_counts(loop))
                lines.append(f"| {base} | {k['config'] or '-'} | {v} | {i + 1} ({loop['site']}) | {cells} |")
    return lines


def _op_bytes(p) -> list:
    """HBM bytes per op call, ours and eager, against the op's minimum."""
    lines = [
        "## HBM bytes per op call (forward + backward), traced",
        "",
        "Ours: `gpt2_triton.model.ops.build_ops(\"triton\")`, eager: `build_ops(\"torch\")`, called as GPT-2 "
        "calls them under bf16 autocast. Minimum: the op's inputs read once and output written once in the "
        "forward; the output's grad and the inputs read once and the inputs' grads written once in the backward. "
        "Triton launches count each tensor argument once (tile re-reads assumed to hit L2).",
        "",
        "| op | B | minimum GB | ours GB | ours / min | eager GB | eager / min | ours / eager "
        "| ours: launches + other ops | eager: ops |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in p["ops"]:
        m, o, e = r["min_bytes"], r["triton"]["bytes"], r["torch"]["bytes"]
        lines.append(f"| {r['op']} | {r['B']} | {_gb(m)} | {_gb(o)} | {o / m:.2f} | {_gb(e)} | {e / m:.2f} | "
                     f"{o / e:.2f} | {r['triton']['triton_launches']} + {r['triton']['device_ops']} | "
                     f"{r['torch']['device_ops']} |")
    return lines


def _micro_step(p) -> list:
    """One micro-step of each stack: launches, other device ops, host syncs and where the bytes go."""
    st = p["micro_step"]
    tri, eag = st["triton"], st["torch"]
    lines = [
        f"## One training micro-step, B={st['B']} (steady state of gradient accumulation)",
        "",
        "`gpt2_triton.training.step.accumulate_gradients` on GPT-2 124M (gpt2 preset, pad_vocab_to=128), bf16 "
        "autocast, traced with kernels recorded (nothing runs); the second of two micro-steps (grads accumulate "
        "into .grad).",
        "",
        "| | kernels=\"triton\" | kernels=\"torch\" |",
        "|---|---:|---:|",
        f"| Triton launches | {tri['triton_launches']} | {eag['triton_launches']} |",
        f"| other device ops | {tri['device_ops']} | {eag['device_ops']} |",
        f"| host syncs | {tri['host_syncs']} | {eag['host_syncs']} |",
        f"| HBM GB traced | {_gb(tri['bytes'])} | {_gb(eag['bytes'])} |",
        f"| HBM GB, first micro-step | {_gb(tri['first_micro_step_bytes'])} | {_gb(eag['first_micro_step_bytes'])} |",
        "",
        "Triton launches (kernels=\"triton\"): " + _counts(tri["launches"]),
        "",
        "Other device ops (kernels=\"triton\"): " + _counts(tri["ops"]),
        "",
        "Other device ops (kernels=\"torch\"): " + _counts(eag["ops"]),
        "",
        "Host syncs: kernels=\"triton\": " + _counts(tri["syncs"]) + "; kernels=\"torch\": " + _counts(eag["syncs"]),
        "",
        "Where the bytes go (GB; inside one of our custom ops: the op, else the aten op):",
        "",
        "| kernels=\"triton\" | GB | kernels=\"torch\" | GB |",
        "|---|---:|---|---:|",
    ]
    top_t, top_e = list(tri["bytes_by_source"].items())[:12], list(eag["bytes_by_source"].items())[:12]
    for i in range(max(len(top_t), len(top_e))):
        a = top_t[i] if i < len(top_t) else ("", None)
        b = top_e[i] if i < len(top_e) else ("", None)
        lines.append(f"| {a[0].removeprefix('aten.')} | {_gb(a[1]) if a[1] is not None else ''} | "
                     f"{b[0].removeprefix('aten.')} | {_gb(b[1]) if b[1] is not None else ''} |")
    return lines
