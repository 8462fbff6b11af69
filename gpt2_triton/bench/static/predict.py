"""Predicted training throughput per GPU from the traced micro-step (a roofline per device op; not a
measurement).

Each device op of the trace (a Triton launch, or an aten op that moves bytes) takes
    max(FLOPs / (peak · e_compute[class]), bytes / (bandwidth · e_memory), launch_floor)
with class one of cublas_gemm (aten mm / addmm / matmul), triton_gemm (our matmul kernels),
attention_fwd / attention_bwd (our attention kernels), sdpa_attention_fwd / _bwd (eager's SDPA),
memory (everything else: 0 FLOPs). A host sync costs host_sync_s. The efficiencies are fractions of the
GPU's dense bf16 peak and HBM bandwidth (`gpt2_triton.devices`), one dict per band (`BANDS`), each value
with its source. Attention rates are H100 TFLOP/s, used as the same fraction of peak on the other GPUs.
MI300X and MI355X take the same fractions of their own peak and bandwidth (the sources are NVIDIA
figures; nothing here is measured on AMD) and the sm_90 trace: a prediction of the same step, not of
the AMD tiles' speed.

An optimizer step of gradient accumulation is the first micro-step (grads created), grad_accum - 1
steady micro-steps (grads accumulated) and the optimizer phase of `train_step` on the fp32 parameters:
clip_grad_norm_ (read the grads for the norm, then scale them in place) and fused AdamW (read param,
grad, m, v; write param, m, v). tok/s = tokens per optimizer step / its time; MFU uses
`GPT.flops_per_token` (6N + the non-causal attention term, nanoGPT's convention, as training reports).

Rows: kernels="triton" (ours), kernels="torch" (eager, same trace machinery) and "llm.c-style": our
trace with every GEMM at cuBLAS efficiency and attention at cuDNN rates (llm.c runs its matmuls on
cuBLAS(Lt) and its attention on cuDNN, with the fusions our trace already has).
"""
import collections
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from gpt2_triton.bench.static import cases
from gpt2_triton.bench.static.flops import ATTENTION_BWD_KERNELS, ATTENTION_FWD_KERNELS, ATTENTION_OPS, GEMM_OPS
from gpt2_triton.bench.static.trace import Event
from gpt2_triton.devices import GPUS, H100
from gpt2_triton.model import GPT

TOKENS_PER_STEP = 524288  # 2**19, the GPT-2 124M batch of train.py's gpt2 preset
PREDICT_GPUS = ("H100", "H200", "B200", "MI300X", "MI355X")
KERNEL_ROWS = ("triton", "torch", "llm.c-style")


def _tflops(x: float) -> float:
    return x * 1e12 / H100.bf16_flops


_FA3 = ("the FlashAttention-3 paper's (Shah et al. 2024) H100 SXM5 bf16 forward figure, head dim 64, sequence 1k, "
        "non-causal, read off approximately: Triton ~380, cuDNN ~370, FlashAttention-2 ~300 TFLOP/s")
SOURCES = {
    "cublas_gemm": "estimate: cuBLAS bf16 on GPT-2 small's GEMMs (one dimension 768), below its large-GEMM rate",
    "triton_gemm": "estimate: a tuned Triton GEMM at ~90% of cuBLAS",
    "attention_fwd": "estimate for our causal kernel, against " + _FA3,
    "attention_bwd": "estimate: ~2/3 of the forward rate (2.5x-forward FLOPs convention)",
    "cudnn_attention_fwd": "estimate: as our Triton attention (cuDNN within a few % of Triton in that figure)",
    "cudnn_attention_bwd": "estimate: as our Triton attention backward",
    "sdpa_attention_fwd": "estimate: torch SDPA's FlashAttention-2 backend at ~0.8x Triton, as in that figure",
    "sdpa_attention_bwd": "estimate: ~0.8x our Triton attention backward",
    "memory": "estimate: fraction of HBM bandwidth an elementwise or reduction pass sustains",
    "launch_floor_s": "estimate: shortest device time of one kernel, with the gap to the next",
    "host_sync_s": "estimate: a device-to-host round trip that drains the launch queue",
}


def _band(**values) -> dict:
    return {k: (v, SOURCES[k]) for k, v in values.items()}


BANDS = {  # fractions of dense bf16 peak / HBM bandwidth; attention in H100 TFLOP/s; floors in seconds
    "pessimistic": _band(cublas_gemm=0.60, triton_gemm=0.50, attention_fwd=_tflops(220), attention_bwd=_tflops(140),
                         cudnn_attention_fwd=_tflops(220), cudnn_attention_bwd=_tflops(140),
                         sdpa_attention_fwd=_tflops(180), sdpa_attention_bwd=_tflops(110),
                         memory=0.70, launch_floor_s=5e-6, host_sync_s=20e-6),
    "realistic": _band(cublas_gemm=0.72, triton_gemm=0.65, attention_fwd=_tflops(300), attention_bwd=_tflops(200),
                       cudnn_attention_fwd=_tflops(300), cudnn_attention_bwd=_tflops(200),
                       sdpa_attention_fwd=_tflops(240), sdpa_attention_bwd=_tflops(160),
                       memory=0.80, launch_floor_s=3e-6, host_sync_s=10e-6),
    "optimistic": _band(cublas_gemm=0.80, triton_gemm=0.75, attention_fwd=_tflops(380), attention_bwd=_tflops(260),
                        cudnn_attention_fwd=_tflops(380), cudnn_attention_bwd=_tflops(260),
                        sdpa_attention_fwd=_tflops(300), sdpa_attention_bwd=_tflops(210),
                        memory=0.90, launch_floor_s=2e-6, host_sync_s=5e-6),
}
GROUP = {"cublas_gemm": "gemm", "triton_gemm": "gemm", "attention_fwd": "attention", "attention_bwd": "attention",
         "cudnn_attention_fwd": "attention", "cudnn_attention_bwd": "attention", "sdpa_attention_fwd": "attention",
         "sdpa_attention_bwd": "attention", "memory": "memory"}
SPLIT = ("gemm", "attention", "memory", "launch_floor", "host_sync")
_LLMC = {"triton_gemm": "cublas_gemm", "attention_fwd": "cudnn_attention_fwd",
         "attention_bwd": "cudnn_attention_bwd"}


def event_class(e: Event, style: str = "triton") -> Optional[str]:
    """The efficiency class of an event; None for one that runs no kernel (a view, an allocation)."""
    if e.kind == "sync":
        return "host_sync"
    if e.kind == "launch":
        c = ("attention_fwd" if e.name in ATTENTION_FWD_KERNELS else "attention_bwd"
             if e.name in ATTENTION_BWD_KERNELS else "triton_gemm" if e.flops else "memory")
    elif not (e.read or e.written or e.flops):
        return None
    else:
        packet = getattr(torch.ops.aten, e.name.split(".")[1], None) if e.name.startswith("aten.") else None
        c = ("cublas_gemm" if packet in GEMM_OPS else
             ("sdpa_attention_bwd" if "backward" in e.name else "sdpa_attention_fwd")
             if packet in ATTENTION_OPS else "memory")
    return _LLMC.get(c, c) if style == "llm.c-style" else c


@dataclass
class Timed:
    event: Event
    cls: str
    seconds: float
    bound: str  # "compute" | "memory" | "launch_floor" | "host_sync"


def event_time(e: Event, cls: str, gpu, band: dict) -> Timed:
    if cls == "host_sync":
        return Timed(e, cls, band["host_sync_s"][0], "host_sync")
    compute = e.flops / (gpu.bf16_flops * band[cls][0]) if e.flops else 0.0
    memory = (e.read + e.written) / (gpu.hbm_bytes_per_s * band["memory"][0])
    floor = band["launch_floor_s"][0]
    seconds = max(compute, memory, floor)
    bound = "launch_floor" if seconds == floor else "compute" if compute >= memory else "memory"
    return Timed(e, cls, seconds, bound)


def timed(events, gpu, band: dict, style: str = "triton") -> list:
    out = []
    for e in events:
        cls = event_class(e, style)
        if cls is not None:
            out.append(event_time(e, cls, gpu, band))
    return out


def optimizer_events(n_params: int) -> list:
    """The optimizer phase of one step on fp32 parameters, as memory-bound passes."""
    return [Event("aten", "clip_grad_norm_ (norm of the grads)", 4 * n_params, 0),
            Event("aten", "clip_grad_norm_ (grads scaled in place)", 4 * n_params, 4 * n_params),
            Event("aten", "fused AdamW", 16 * n_params, 12 * n_params)]


def split(ts) -> dict:
    out = dict.fromkeys(SPLIT, 0.0)
    for t in ts:
        out[t.bound if t.bound in ("launch_floor", "host_sync") else GROUP[t.cls]] += t.seconds
    return out


def _model_numbers() -> tuple:
    with torch.device("meta"):
        model = GPT(cases.gpt2_config())
    return model.flops_per_token(), sum(p.numel() for p in model.parameters())


def predict_row(traces: dict, style: str, gpu, band: dict, batch: int, flops_per_token: int, n_params: int) -> dict:
    steady, first = traces["torch" if style == "torch" else "triton"]
    tokens = batch * cases.T
    grad_accum = TOKENS_PER_STEP // tokens
    t_steady, t_first = timed(steady, gpu, band, style), timed(first, gpu, band, style)
    t_opt = timed(optimizer_events(n_params), gpu, band, style)
    parts = {k: (grad_accum - 1) * a + b + c for k, a, b, c in
             zip(SPLIT, split(t_steady).values(), split(t_first).values(), split(t_opt).values())}
    step_s = sum(parts.values())
    tok_s = grad_accum * tokens / step_s
    return {"kernels": style, "gpu": gpu.key, "tok_s": tok_s, "mfu": tok_s * flops_per_token / gpu.bf16_flops,
            "ms_per_micro_step": 1e3 * step_s / grad_accum,
            "split_ms": {k: 1e3 * v / grad_accum for k, v in parts.items()},
            "optimizer_ms_per_micro_step": 1e3 * sum(t.seconds for t in t_opt) / grad_accum,
            "steady_micro_step_ms": 1e3 * sum(t.seconds for t in t_steady),
            "flops_per_micro_step": sum(e.flops for e in steady)}


def top_ops(events, gpu, band: dict, n: int = 10) -> list:
    """Device ops of a micro-step grouped by (enclosing custom op, kernel or aten op), longest first."""
    groups = collections.defaultdict(list)
    for t in timed(events, gpu, band):
        groups[(t.event.op, t.event.name)].append(t)
    rows = []
    for (op, name), ts in groups.items():
        bounds = collections.Counter()
        for t in ts:
            bounds[t.bound] += t.seconds
        rows.append({"op": op, "name": name, "class": ts[0].cls, "count": len(ts),
                     "ms": 1e3 * sum(t.seconds for t in ts), "bound": bounds.most_common(1)[0][0],
                     "gflop": sum(t.event.flops for t in ts) / 1e9,
                     "gb": sum(t.event.read + t.event.written for t in ts) / 1e9})
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def predict(traces: Optional[dict] = None, batch: int = 16) -> dict:
    """The prediction dict (static.json's "prediction"); traces: {kernels: (steady, first) events} as
    `cases.step_traces` gives, traced here when None."""
    traces = traces or cases.step_traces(batch)
    flops_per_token, n_params = _model_numbers()
    gpus = [next(g for g in GPUS if g.key == key) for key in PREDICT_GPUS]
    rows = [{**predict_row(traces, style, gpu, BANDS[band], batch, flops_per_token, n_params), "band": band}
            for style in KERNEL_ROWS for gpu in gpus for band in BANDS]
    return {
        "note": "a prediction from the traced micro-step and an optimizer-step bytes model, not a measurement",
        "B": batch, "T": cases.T, "tokens_per_step": TOKENS_PER_STEP,
        "grad_accum": TOKENS_PER_STEP // (batch * cases.T),
        "flops_per_token": flops_per_token, "optimizer_params": n_params,
        "gpus": {g.key: {"bf16_flops": g.bf16_flops, "hbm_bytes_per_s": g.hbm_bytes_per_s, "sms": g.sms} for g in gpus},
        "bands": {b: {k: {"value": v, "source": s} for k, (v, s) in p.items()} for b, p in BANDS.items()},
        "rows": rows,
        "top_ops_h100_realistic": top_ops(traces["triton"][0], H100, BANDS["realistic"]),
    }


def _param_text(key: str, value: float) -> str:
    if key.endswith("_s"):
        return f"{value * 1e6:g} µs"
    if "attention" in key:
        return f"{value * H100.bf16_flops / 1e12:.0f} TFLOP/s"
    return f"{value:.0%}"


def markdown(pred: dict) -> str:
    lines = [
        "## Predicted throughput (not measured)",
        "",
        f"A roofline of the traced micro-step (B={pred['B']}, T={pred['T']}), not a measurement: it stands until a "
        "GPU run confirms it. Per device op max(FLOPs / (peak x e_compute), bytes / (bandwidth x e_memory), launch "
        f"floor); one optimizer step = {pred['grad_accum']} micro-steps (the first creates the grads) + "
        f"clip_grad_norm_ + fused AdamW on {pred['optimizer_params']:,} fp32 parameters; MFU at "
        f"{pred['flops_per_token'] / 1e6:.1f} MFLOP/token (GPT.flops_per_token). llm.c-style: our trace with "
        "every GEMM at cuBLAS efficiency and attention at cuDNN rates. ms are per micro-step, the optimizer "
        "amortised. MI300X and MI355X take the same fractions of their own peak and bandwidth on the same "
        "(sm_90) trace: no AMD figure stands behind them.",
        "",
        "| kernels | GPU | band | tok/s | MFU | ms | GEMM | attention | memory-bound | launch floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in pred["rows"]:
        s = r["split_ms"]
        lines.append(f"| {r['kernels']} | {r['gpu']} | {r['band']} | {r['tok_s'] / 1e3:.0f}k | {r['mfu']:.1%} | "
                     f"{r['ms_per_micro_step']:.2f} | {s['gemm']:.2f} | {s['attention']:.2f} | {s['memory']:.2f} | "
                     f"{s['launch_floor'] + s['host_sync']:.2f} |")
    lines += ["", "Efficiencies (fractions of dense bf16 peak or HBM bandwidth; attention as H100 TFLOP/s, the same "
              "fraction of peak on the other GPUs):", "",
              "| parameter | " + " | ".join(pred["bands"]) + " | source |",
              "|---|" + "---:|" * len(pred["bands"]) + "---|"]
    for key in pred["bands"]["realistic"]:
        sources = list(dict.fromkeys(p[key]["source"] for p in pred["bands"].values()))
        lines.append(f"| {key} | " + " | ".join(_param_text(key, p[key]["value"]) for p in pred["bands"].values())
                     + " | " + "; ".join(sources) + " |")
    gpus = [f"{k} {g['bf16_flops'] / 1e12:.0f} TFLOP/s, {g['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
            for k, g in pred["gpus"].items()]
    lines += ["", "GPUs (datasheet values, dense bf16): " + "; ".join(gpus) + ".",
        "", "Top 10 device ops of the steady micro-step by predicted time, kernels=\"triton\", H100 realistic:", "",
        "| custom op | kernel / aten op | class | count | ms | bound by | GFLOP | GB |",
        "|---|---|---|---:|---:|---|---:|---:|"]
    for r in pred["top_ops_h100_realistic"]:
        lines.append(f"| {r['op'] or ''} | {r['name'].removeprefix('aten.')} | {r['class']} | {r['count']} | "
                     f"{r['ms']:.3f} | {r['bound']} | {r['gflop']:.1f} | {r['gb']:.2f} |")
    lines.append("")
    return "\n".join(lines)


# --- predicted vs measured per kernel (the headline's summary) -------------------------------------
OTHER_GROUPS = {"cublas_gemm": "GEMM (cuBLAS)", "sdpa_attention_fwd": "attention (SDPA)",
                "sdpa_attention_bwd": "attention (SDPA)"}
OTHER = "other device ops (elementwise, reductions, optimizer)"
_MEASURED_GROUPS = (("GEMM (cuBLAS)", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
                    ("attention (SDPA)", ("flash", "fmha", "attention", "cudnn")))


@functools.cache
def step_kernel_times(kernels: str, batch: int, gpu_key: str, band: str = "realistic") -> dict:
    """Predicted {row name: [count, µs]} of one `train_step` with grad_accum 1 (the first micro-step, grads
    created, and the optimizer phase): our Triton kernels by name, the rest by `OTHER_GROUPS` or OTHER."""
    gpu = next(g for g in GPUS if g.key == gpu_key)
    _, first = cases.micro_step(batch, kernels)
    out = collections.defaultdict(lambda: [0, 0.0])
    for t in timed(first, gpu, BANDS[band], kernels) + timed(optimizer_events(_model_numbers()[1]), gpu, BANDS[band]):
        key = t.event.name if t.event.kind == "launch" else OTHER_GROUPS.get(t.cls, OTHER)
        out[key][0] += 1
        out[key][1] += 1e6 * t.seconds
    return dict(out)


def measured_group(name: str, triton_kernels) -> str:
    """The row a profiled kernel's time goes to: its own for one of ours, else a group by its name."""
    if name in triton_kernels:
        return name
    low = name.lower()
    return next((group for group, words in _MEASURED_GROUPS if any(w in low for w in words)), OTHER)


def compare(measured: list, predicted: dict) -> list:
    """Rows {name, predicted_count, predicted_us, measured_count, measured_us} from a profiled step's
    kernel table ([{name, count, total_us}]) and `step_kernel_times`: our kernels (longest predicted
    first), then the groups, then the total."""
    groups = list(dict.fromkeys([*OTHER_GROUPS.values(), OTHER]))
    ours = {k for k in predicted if k not in groups}
    got = collections.defaultdict(lambda: [0, 0.0])
    for m in measured:
        g = got[measured_group(m["name"], ours)]
        g[0] += m["count"]
        g[1] += m["total_us"]
    names = sorted(ours, key=lambda k: -predicted[k][1]) + [g for g in groups if g in predicted or g in got]
    rows = [{"name": k, "predicted_count": predicted.get(k, (0, 0.0))[0], "predicted_us": predicted.get(k, (0, 0.0))[1],
             "measured_count": got[k][0] if k in got else 0, "measured_us": got[k][1] if k in got else 0.0}
            for k in names]
    rows.append({"name": "total", **{f: sum(r[f] for r in rows) for f in
                                     ("predicted_count", "predicted_us", "measured_count", "measured_us")}})
    return rows
