"""What gets profiled: GPT-2 124M training scenarios traced on fake tensors, the launches they make,
and the compile specs (kernel x autotune candidate) built from those launches.

Shapes: B x T = B x 1024 tokens, C = 768, H = 12 heads of D = 64, V = 50257 (embedding padded to 50304,
`GPTConfig.from_preset("gpt2", pad_vocab_to=128)`), fp32 parameters under bf16 autocast, as
`train.py --preset gpt2-124m` runs them. Specialization follows `JITFunction.run`: 16-byte aligned
pointers and ints % 16 == 0 get tt.divisibility=16, ints == 1 become constexpr 1, do_not_specialize is
honoured. A tensor is 16-byte aligned when its storage offset is (fresh CUDA allocations are).
"""
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from gpt2_triton.bench.static.trace import (
    DescriptorMeta,
    Launch,
    TensorMeta,
    capture,
    param_info,
    summarize,
    tensor_bytes,
)
from gpt2_triton.kernels import compat
from gpt2_triton.kernels.autotune import BACKEND_OPTIONS, Tuner, max_configs
from gpt2_triton.kernels.mlp import linear_gelu
from gpt2_triton.model import GPT, GPTConfig
from gpt2_triton.model.ops import build_ops
from gpt2_triton.training.step import StepSettings, accumulate_gradients, autocast_context

T, C, N_HEAD, VOCAB = 1024, 768, 12, 50257
TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                   torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


# ----------------------------------------------------------------------------------------------
# Specialization and compile specs
# ----------------------------------------------------------------------------------------------
def is_aligned(t) -> bool:
    return (t.storage_offset() * t.element_size()) % 16 == 0


def specialize(launch: Launch, config=None):
    """signature / constexprs / attrs as JITFunction.run would build them for these arguments."""
    fn = launch.fn
    arg_names, constexpr_names, no_spec = param_info(fn)
    args = dict(launch.args)
    if config is not None:
        args.update(config.kwargs)
    missing = [n for n in arg_names if n not in args]
    if missing:
        raise AssertionError(f"{fn.__name__}: launch did not pass {missing}")
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(arg_names):
        v = args[name]
        if name in constexpr_names or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, TensorMeta):
            sig[name] = "*" + TORCH_TO_TRITON[v.dtype]
            if is_aligned(v):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, DescriptorMeta):  # host TMA descriptor (triton.tools.tensor_descriptor)
            sig[name] = f"tensordesc<{TORCH_TO_TRITON[v.base.dtype]}{list(v.block_shape)}>"
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1 and name not in no_spec:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
            if v % 16 == 0 and name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, consts, attrs


def compile_options(launch: Launch, config=None) -> dict:
    opts = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages", "num_ctas")}
    if config is not None:
        fields = compat.config_fields(config)
        opts.update(num_warps=fields["num_warps"], num_stages=fields["num_stages"])
        if fields["num_ctas"] not in (None, 1):
            opts["num_ctas"] = fields["num_ctas"]
        if fields["maxnreg"] is not None:
            opts["maxnreg"] = fields["maxnreg"]
        opts.update({k: v for k, v in config.kwargs.items() if k in BACKEND_OPTIONS})
    return opts


@dataclass
class Case:
    """One compile: a launch (one specialization of a kernel) with one autotune config."""
    id: str
    launch: Launch
    config: Any = None  # triton.Config for autotuned kernels
    critical: bool = False  # for tests: must not spill
    sites: tuple = ()  # custom ops making this launch, and how often per micro-step ("gelu_mlp_bwd x12")
    tuning_keys: int = 0  # autotune keys its launches in one micro-step tune (each tries the first-contact configs)
    aliases: tuple = ()  # ids (without the tile) of other widths' launches with this specialization

    def spec(self, usage=True, sass=True) -> dict:
        """JSON-able compile spec for gpt2_triton.bench.static.native (any triton version)."""
        sig, consts, attrs = specialize(self.launch, self.config)
        return {"id": self.id, "module": self.launch.module, "kernel": self.launch.fn.__name__,
                "signature": sig, "constexprs": consts, "attrs": [[list(k), v] for k, v in attrs.items()],
                "options": compile_options(self.launch, self.config), "usage": usage, "sass": sass}

    def launch_spec(self) -> dict:
        """The launch itself for gpt2_triton.bench.static.native's warmup_spec: every argument in order
        (tensors by dtype and 16-byte alignment), the config's values filled in, and the launch options."""
        arg_names, _, _ = param_info(self.launch.fn)
        values = {**self.launch.args, **(self.config.kwargs if self.config is not None else {})}
        args = []
        for name in arg_names:
            v = values[name]
            if isinstance(v, TensorMeta):
                args.append(["tensor", str(v.dtype).removeprefix("torch."), is_aligned(v)])
            elif isinstance(v, DescriptorMeta):
                raise TypeError(f"{self.id}: host TMA descriptor arguments are not described")
            else:
                args.append(["none"] if v is None else ["value", v])
        return {"id": self.id, "module": self.launch.module, "kernel": self.launch.fn.__name__, "args": args,
                "options": compile_options(self.launch, self.config)}

    @property
    def num_warps(self) -> int:
        return compile_options(self.launch, self.config).get("num_warps", 4)

    @property
    def first_candidate(self) -> bool:
        """Not autotuned, or the first (hand-picked) autotune config."""
        return self.config is None or self.config is self.launch.configs[0]

    @property
    def first_contact(self) -> bool:
        """Not autotuned, or among the candidates its autotuner tries the first time it meets a tuning key
        (the first `max_configs()` it admits)."""
        if self.config is None:
            return True
        n = max_configs()
        return n <= 0 or next(i for i, c in enumerate(self.launch.configs) if c is self.config) < n

    @property
    def programs(self) -> int:
        return self.launch.programs(self.config)


def signature_key(launch: Launch):
    sig, consts, attrs = specialize(launch, launch.configs[0] if launch.configs else None)
    return (launch.fn.__name__, tuple(sig.items()), tuple((k, repr(v)) for k, v in consts.items()), repr(attrs),
            tuple(sorted(launch.options.items())))


def short_name(name: str) -> str:
    return name.lstrip("_").removesuffix("_kernel").replace("flash_attention", "attn")


_OPTION_TAGS = {"waves_per_eu": "e", "matrix_instr_nonkdim": "m", "kpack": "k"}  # config_id's backend option parts


def config_id(cfg) -> str:
    kw = cfg.kwargs
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    maxnreg = compat.config_fields(cfg)["maxnreg"]
    options = "".join(f"{_OPTION_TAGS[k]}{v}" for k, v in cfg.kwargs.items() if k in BACKEND_OPTIONS)
    return f"{blocks}-w{cfg.num_warps}s{cfg.num_stages}" + (f"r{maxnreg}" if maxnreg else "") + options


def launch_tag(launch: Launch) -> str:
    """Readable id part for a launch: the constexprs that tell launches of one kernel apart."""
    a = launch.args
    parts = []
    if "HEAD_DIM" in a:
        parts.append(f"D{a['HEAD_DIM']}")
    if "CAUSAL" in a:
        parts.append("causal" if a["CAUSAL"] else "full")
    if a.get("DOCS"):
        parts.append("docs")
    if a.get("HAS_USED"):
        parts.append("seqused")
    if "EPILOGUE" in a:
        parts.append(["none", "gelu", "geluGrad"][a["EPILOGUE"]])
        parts.append("bias" if a["HAS_BIAS"] else "nobias")
        if a["STORE_AUX"]:
            parts.append("aux")
        sa, sb = (a["stride_am"], a["stride_ak"]), (a["stride_bk"], a["stride_bn"])
        parts.append(("T" if sa[0] == 1 else "N") + ("T" if sb[0] == 1 else "N"))
    if "HAS_BIAS" in a and "EPILOGUE" not in a and not a["HAS_BIAS"]:
        parts.append("nobias")
    if "COMPUTE_GRAD" in a:
        parts.append("grad" if a["COMPUTE_GRAD"] else "nograd")
    flags = {"HAS_BRANCH": "branch", "HAS_BRANCH_BIAS": "branchbias", "HAS_DRESIDUAL": "dres",
             "HAS_DBRANCH": "dbranch", "ACCUMULATE": "acc", "HAS_SCALE": "scaled", "HAS_POS": "pos"}
    parts += [tag for name, tag in flags.items() if a.get(name)]
    if a.get("COLSUM_ROWS"):
        parts.append(f"colsum{a['COLSUM_ROWS']}")
    if a.get("NUM_PARTIALS", 2) != 2:
        parts.append(f"{a['NUM_PARTIALS']}partials")
    if "NUM_PAIRS" in a:
        parts.append(f"{a['NUM_PAIRS']}pairs")
    if launch.tag:
        parts.append(launch.tag)
    return "-".join(parts)


def first_dtype(launch: Launch) -> str:
    for v in launch.args.values():
        if isinstance(v, TensorMeta) and v.is_floating_point():
            return TORCH_TO_TRITON[v.dtype]
    return ""


def base_id(launch: Launch) -> str:
    """A case id without its tile: `kernel-dtype-tags`."""
    return "-".join(p for p in (short_name(launch.fn.__name__), first_dtype(launch), launch_tag(launch)) if p)


def dedup_launches(launches):
    """[(launch, [launches with its specialization])], one per specialization, in first-seen order."""
    seen = {}
    for launch in launches:
        seen.setdefault(signature_key(launch), (launch, []))[1].append(launch)
    return list(seen.values())


def _sites(same, in_step) -> tuple:
    """'op xN' per custom op launching it N times per micro-step, or 'op (not in a micro-step)'."""
    counts = {}
    for launch in same:
        counts.setdefault(launch.op or "?", [0])[0] += id(launch) in in_step
    return tuple(f"{op} x{n}" if n else f"{op} (not in a micro-step)" for op, (n,) in counts.items())


def cases_from_launches(launches, in_step=()) -> list:
    """One Case per distinct launch and autotune candidate, ids `kernel-dtype-tags[-config]`;
    in_step: ids (id()) of the launches made by one training micro-step, for the sites."""
    cases, ids = [], set()
    in_step = set(in_step)
    for launch, same in dedup_launches(launches):
        base = base_id(launch)
        aliases = tuple(dict.fromkeys(base_id(other) for other in same if other.tag != launch.tag))
        n = 2
        while base in ids:
            base = f"{base.rsplit('#', 1)[0]}#{n}"
            n += 1
        ids.add(base)
        sites = _sites(same, in_step)
        tuner = getattr(importlib.import_module(launch.module), launch.name, None)
        keys = {tuner.tuning_key(other.args) for other in same if id(other) in in_step} \
            if isinstance(tuner, Tuner) else set()
        for cfg in launch.configs or [None]:
            cid = base if cfg is None else f"{base}-{config_id(cfg)}"
            cases.append(Case(cid, launch, cfg, sites=sites, tuning_keys=len(keys), aliases=aliases))
    return cases


# ----------------------------------------------------------------------------------------------
# GPT-2 124M scenarios (run inside gpt2_triton.bench.static.trace.capture())
# ----------------------------------------------------------------------------------------------
def gpt2_config():
    return GPTConfig.from_preset("gpt2", pad_vocab_to=128)


def micro_step(batch: int, kernels: str, target_fields=None):
    """Events of one steady-state training micro-step (B x 1024 tokens, bf16 autocast, grads already
    there from a previous micro-step, as in gradient accumulation) of `train.accumulate_gradients`.
    Returns (events of the second micro-step, events of the first)."""
    with capture(target_fields) as trace:
        model = GPT(gpt2_config(), kernels=kernels)
        x = torch.zeros((batch, T), dtype=torch.int64)
        y = torch.zeros((batch, T), dtype=torch.int64)
        settings = StepSettings(torch.device("cpu"), torch.bfloat16)
        first = trace.mark()
        accumulate_gradients(model, lambda: (x, y), settings)
        second = trace.mark()
        accumulate_gradients(model, lambda: (x, y), settings)
        return trace.since(second), trace.events[first:second]


def eval_step(batch: int, target_fields=None) -> list:
    """Events of one validation forward (`Trainer.validate`: no grad, bf16 autocast, targets given):
    the loss is the fused no-grad linear + cross-entropy kernel."""
    with capture(target_fields) as trace:
        model = GPT(gpt2_config(), kernels="triton")
        x = torch.zeros((batch, T), dtype=torch.int64)
        start = trace.mark()
        with torch.no_grad(), autocast_context(torch.device("cpu"), torch.bfloat16):
            model(x, x)
        return trace.since(start)


@dataclass(frozen=True)
class Width:
    """The model width an op call is traced at: n_embd channels in n_head heads of 64."""
    n_embd: int = C
    n_head: int = N_HEAD

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def tag(self) -> str:
        """"" at GPT-2 124M's width, else e.g. "C1024" (case ids and op rows name it)."""
        return "" if self.n_embd == C else f"C{self.n_embd}"


GPT2_WIDTH = Width()
# GPT-2 medium / large / XL (the gpt2-350m / 774m / 1558m recipes): 1024 / 1280 / 1600 wide, 16 / 20 / 25 heads
LARGER_PRESETS = ("gpt2-medium", "gpt2-large", "gpt2-xl")
LARGER_WIDTHS = tuple(Width(cfg.n_embd, cfg.n_head) for cfg in map(GPTConfig.from_preset, LARGER_PRESETS))


@dataclass
class OpCall:
    """One op as the model calls it, forward + backward, under bf16 autocast, at one model width."""
    base: str
    make: Callable  # (batch, width) -> (fn(ops) -> output, [input tensors], [tensors whose grads are produced])
    width: Width = GPT2_WIDTH

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.base, self.width.tag) if p)

    def at(self, width: Width) -> "OpCall":
        return dataclasses.replace(self, width=width)


def _leaf(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype).requires_grad_()


def _layer_norm(batch, w):
    x, g, b = _leaf(batch, T, w.n_embd), _leaf(w.n_embd), _leaf(w.n_embd)  # the fp32 residual stream, parameters
    return (lambda ops: ops.layer_norm(x, g, b, 1e-5)), [x, g, b], [x, g, b]


def _attention(batch, w):
    c = w.n_embd
    qkv = _leaf(batch, T, 3 * c, dtype=torch.bfloat16)  # c_attn's output under autocast

    def run(ops):  # CausalSelfAttention.forward between c_attn and c_proj
        q, k, v = qkv.split(c, dim=2)
        q, k, v = (t.view(batch, T, w.n_head, w.head_dim).transpose(1, 2) for t in (q, k, v))
        y = ops.attention(q, k, v, causal=True)
        return y.transpose(1, 2).contiguous().view(batch, T, c)
    return run, [qkv], [qkv]


def _attention_documents(batch, w):
    """The model's attention with document masking (train.py --doc-mask); the trace sees no values, so the
    document starts only shape the masks."""
    qkv = _leaf(batch, T, 3 * w.n_embd, dtype=torch.bfloat16)
    starts = torch.zeros((batch, T), dtype=torch.bool)
    return (lambda ops: ops.attention_qkv(qkv, w.n_head, causal=True, documents=ops.document_mask(starts))), \
        [qkv], [qkv]


DOCUMENTS_PER_ROW = 2  # packed sequences per 1024 tokens in the varlen op call


def _attention_varlen(batch, w):
    """flash_attention_varlen on batch x 1024 tokens packed as 2 * batch sequences (self-attention)."""
    q, k, v = (_leaf(batch * T, w.n_head, w.head_dim, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.zeros((DOCUMENTS_PER_ROW * batch + 1,), dtype=torch.int32)
    return (lambda ops: ops.attention_varlen(q, k, v, cu, cu, T, T, causal=True)), [q, k, v], [q, k, v]


def _gelu_mlp(batch, w):
    c = w.n_embd
    x = _leaf(batch, T, c)  # ln_2's fp32 output
    fc_w, fc_b, pr_w, pr_b = _leaf(4 * c, c), _leaf(4 * c), _leaf(c, 4 * c), _leaf(c)
    params = [x, fc_w, fc_b, pr_w, pr_b]
    return (lambda ops: ops.gelu_mlp(*params)), params, params


def _cross_entropy(batch, w):
    logits = _leaf(batch * T, VOCAB, dtype=torch.bfloat16)  # lm_head's output under autocast
    targets = torch.zeros((batch * T,), dtype=torch.int64)
    return (lambda ops: ops.cross_entropy(logits, targets)), [logits, targets], [logits]


def _linear_cross_entropy(batch, w):
    x = _leaf(batch * T, w.n_embd)  # ln_f's fp32 output, flattened
    wte = _leaf(gpt2_config().padded_vocab_size, w.n_embd)
    weight = wte[:VOCAB]  # as GPT.forward passes lm_head.weight
    targets = torch.zeros((batch * T,), dtype=torch.int64)
    return (lambda ops: ops.linear_cross_entropy(x, weight, targets)), [x, weight, targets], [x, weight]


OP_CALLS = [OpCall("layer_norm", _layer_norm), OpCall("attention", _attention),
            OpCall("attention_documents", _attention_documents), OpCall("attention_varlen", _attention_varlen),
            OpCall("gelu_mlp", _gelu_mlp), OpCall("cross_entropy", _cross_entropy),
            OpCall("linear_cross_entropy", _linear_cross_entropy)]
# The larger models' shapes: each width's LayerNorm, attention, MLP and lm_head + loss (the ops whose shapes
# change with the width; the cross-entropy over the logits and the attention variants' masks do not)
WIDE_OP_CALLS = [call.at(w) for w in LARGER_WIDTHS for call in OP_CALLS
                 if call.base in ("layer_norm", "attention", "gelu_mlp", "linear_cross_entropy")]


def minimum_bytes(inputs, output, grads) -> int:
    """Forward: inputs read once, output written once. Backward: the output's grad and the inputs read
    once, the inputs' grads written once (in their dtype)."""
    fwd = sum(tensor_bytes(t) for t in inputs) + tensor_bytes(output)
    bwd = tensor_bytes(output) + sum(tensor_bytes(t) for t in inputs) + sum(tensor_bytes(t) for t in grads)
    return fwd + bwd


def trace_op(call: OpCall, batch: int, kernels: str, target_fields=None):
    """(events fwd+bwd, minimum bytes) of one op call with the `kernels` implementation."""
    with capture(target_fields) as trace:
        ops = build_ops(kernels)
        run, inputs, grads = call.make(batch, call.width)
        start = trace.mark()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(ops)
        events = trace.since(start)
        grad_out = torch.empty_like(out)  # made outside the traced part: not the op's traffic
        start = trace.mark()
        out.backward(grad_out)
        return events + trace.since(start), minimum_bytes(inputs, out, grads)


def linear_gelu_launches(batch: int, target_fields=None):
    """gpt2_triton.kernels.mlp.linear_gelu (not used by GPT-2) at the MLP's shapes, for its kernels' compile cases."""
    with capture(target_fields) as trace:
        x = _leaf(batch * T, C, dtype=torch.bfloat16)
        w, b = _leaf(4 * C, C), _leaf(4 * C)
        out = linear_gelu(x, w, b)
        out.backward(torch.empty_like(out))
        return trace.launches


def decode_launches(batch: int, target_fields=None):
    """GPT.generate's decode step at GPT-2 shapes: one query per sequence against a KV cache of block_size
    positions per sequence (half filled), through flash_attention_varlen."""
    with capture(target_fields) as trace:
        model = GPT(gpt2_config(), kernels="triton")
        cache = model.new_kv_cache(batch, "cpu")
        cache.lengths = [T // 2] * batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.extend(torch.zeros((batch,), dtype=torch.int64), [1] * batch, cache)
        return [launch for launch in trace.launches if "varlen" in launch.fn.__name__]


def gpt2_launches(batch: int = 16, target_fields=None) -> tuple:
    """(launches, those of the micro-step): every launch of a GPT-2 training micro-step with
    kernels="triton", of a validation forward, of each op's fwd+bwd and of a generation decode step's
    attention, plus those of linear_gelu (not used by GPT-2) whose kernel none of them launches. These are
    what the profile compiles."""
    step = [e.launch for e in micro_step(batch, "triton", target_fields)[0] if e.kind == "launch"]
    launches = list(step)
    launches += [e.launch for e in eval_step(batch, target_fields) if e.kind == "launch"]
    for call in OP_CALLS:
        launches += [e.launch for e in trace_op(call, batch, "triton", target_fields)[0] if e.kind == "launch"]
    launches += decode_launches(batch, target_fields)
    for call in WIDE_OP_CALLS:  # only their specializations that 124M's launches lack become cases
        launches += [dataclasses.replace(e.launch, tag=call.width.tag)
                     for e in trace_op(call, batch, "triton", target_fields)[0] if e.kind == "launch"]
    seen = {launch.fn.__name__ for launch in launches}
    launches += [launch for launch in linear_gelu_launches(batch, target_fields) if launch.fn.__name__ not in seen]
    return launches, step


def gpt2_cases(batch: int = 16) -> list:
    launches, step = gpt2_launches(batch)
    return cases_from_launches(launches, [id(launch) for launch in step])


def op_traffic(batches=(4, 16), wide_batch: Optional[int] = 16) -> list:
    """Per op and batch: bytes moved (ours, eager) against the minimum, and what each side ran; the larger
    models' widths (WIDE_OP_CALLS) at `wide_batch` only (None: not traced)."""
    rows = []
    calls = [(call, batches) for call in OP_CALLS]
    calls += [(call, (wide_batch,)) for call in WIDE_OP_CALLS] if wide_batch else []
    for call, call_batches in calls:
        for batch in call_batches:
            row = {"op": call.name, "B": batch}
            for kernels in ("triton", "torch"):
                events, minimum = trace_op(call, batch, kernels)
                s = summarize(events)
                row[kernels] = s
                row["min_bytes"] = minimum
            rows.append(row)
    return rows


def step_traces(batch: int = 16) -> dict:
    """{kernels: (steady, first) micro-step events} for kernels="triton" and "torch" (`micro_step`)."""
    return {kernels: micro_step(batch, kernels) for kernels in ("triton", "torch")}


def step_summary(batch: int = 16, traces: Optional[dict] = None) -> dict:
    """Micro-step launches, device ops, host syncs and bytes for kernels="triton" and "torch"; traces: those
    of `step_traces(batch)`, traced here when None."""
    out = {"B": batch}
    for kernels, (steady, first) in (traces or step_traces(batch)).items():
        out[kernels] = summarize(steady)
        out[kernels]["first_micro_step_bytes"] = summarize(first)["bytes"]
    return out


def find_launch(launches, kernel_name: str, pred: Optional[Callable] = None):
    for launch in launches:
        if launch.fn.__name__ == kernel_name and (pred is None or pred(launch)):
            return launch
    raise LookupError(kernel_name)
