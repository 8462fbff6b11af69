"""Train GPT-2 on CPU, one GPU, or several with DDP (build-nanogpt's recipe).

    python train.py                               # demo on CPU, gpt2-124m on a GPU
    python train.py --preset demo --max-steps 50
    torchrun --nproc_per_node=8 train.py --preset gpt2-124m --micro-batch 32
    python train.py --preset demo --resume        # continue from the latest checkpoint in the run folder

Every TrainConfig field is a flag (`--micro-batch 8`, `--no-compile`, ...); a preset is a partial
override of the defaults, and flags override the preset.

A run folder belongs to one run: a new run refuses a folder that holds one (continue it with
--resume, or start over with --overwrite), and a second train.py refuses a folder in use.
Ctrl-C or SIGTERM: finish the step, save a checkpoint, exit 130 / 143.
"""
import argparse
import gc
import json
import math
import operator
import os
import re
import signal
import sys
import threading
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from gpt2 import data as gpt2_data
from gpt2 import hellaswag
from gpt2.atomic import FolderLock, remove_stale_temps
from gpt2.checkpoint import (
    RUN_LOCK,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    run_artifacts,
    save_checkpoint,
    set_rng_state,
)
from gpt2.config import PRESETS as MODEL_PRESETS
from gpt2.config import GPTConfig
from gpt2.model import GPT
from gpt2.ops import parse_kernels_arg, resolve_kernels
from gpt2.tokenizer import get_encoding
from gpt2.train_utils import MetricsLog, cosine_lr, device_peak_flops, format_step, mfu, peak_memory_mb, plot_metrics

SAMPLE_PROMPT = "Hello, I'm a language model,"


def opt(default, help: str, **check):
    """A TrainConfig field: its default, its --help text and its valid range
    (ge / gt / le / lt bounds, `choices`, `inf_ok` for floats that may be inf)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass(frozen=True)
class TrainConfig:
    preset: str | None = opt(None, "demo | gpt2-124m; none given: demo on a CPU, gpt2-124m on a GPU")
    # model: a GPTConfig preset, with optional overrides (None keeps the preset's value)
    model: str = opt("gpt2", "GPTConfig preset the model starts from", choices=tuple(MODEL_PRESETS))
    block_size: int | None = opt(None, "context length (learned position embeddings); none: the model preset's", ge=1)
    vocab_size: int | None = opt(None, "vocabulary size; none: the model preset's (50257)", ge=1)
    n_layer: int | None = opt(None, "transformer blocks; none: the model preset's", ge=1)
    n_head: int | None = opt(None, "attention heads; none: the model preset's", ge=1)
    n_embd: int | None = opt(None, "model width; none: the model preset's", ge=1)
    pad_vocab_to: int = opt(128, "round the embedding table up to a multiple of this (50257 -> 50304)", ge=1)
    kernels: str = opt("torch", "torch | triton | op=impl,... (ops: attention, layer_norm, gelu_mlp, cross_entropy)")
    # data
    data: str = opt("fineweb-edu", "pystdlib | fineweb-edu | text:PATH (a .txt/.jsonl file or a folder of them); "
                                   "with --data-dir, the source named in its manifest")
    data_dir: str | None = opt(None, "token shards (prepared here if missing), or an llm.c shard folder; "
                                     "none: $GPT2_DATA_DIR/<data>, i.e. data/<data>")
    seq_len: int = opt(1024, "tokens per sequence", ge=1)
    micro_batch: int = opt(64, "sequences per forward pass, per process", ge=1)
    total_batch: int | None = opt(524288, "tokens per optimizer step, by gradient accumulation; "
                                          "none: one micro-batch per process", ge=1)
    # optimisation
    max_steps: int = opt(19073, "optimizer steps to train for", ge=1)
    lr_decay_steps: int | None = opt(None, "the cosine decay ends at this step (more than max_steps: stop early "
                                           "on a longer schedule); none: max_steps", ge=1)
    warmup_steps: int = opt(715, "linear learning-rate warmup steps", ge=0)
    max_lr: float = opt(6e-4, "peak learning rate", gt=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of max_lr", ge=0, le=1)
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)", ge=0)
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (inf: no clipping)", gt=0, inf_ok=True)
    fused_adamw: bool | None = opt(None, "fused AdamW; none: on CUDA")
    # runtime
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = opt("auto", "auto (bfloat16 autocast on CUDA, float32 on CPU) | bfloat16 | float32",
                     choices=("auto", "bfloat16", "float32"))
    compile: bool | None = opt(None, "torch.compile the model; none: on CUDA, off on CPU")
    seed: int = opt(1337, "seed of the initial weights, the data order and the samples", ge=0)
    # evaluation, logging, checkpoints (an interval of 0 turns it off; the last step always counts)
    val_every: int = opt(250, "validate every N steps (0: never)", ge=0)
    val_steps: int = opt(20, "micro-batches per validation", ge=1)
    hellaswag_every: int = opt(250, "HellaSwag every N steps (0: never)", ge=0)
    hellaswag: str | None = opt(None, "hellaswag_val.jsonl; none: the cached file if present")
    hellaswag_limit: int | None = opt(None, "score only the first N HellaSwag examples; none: all", ge=1)
    sample_every: int = opt(250, "print samples every N steps (0: never)", ge=0)
    sample_count: int = opt(4, "samples each time", ge=0)
    sample_tokens: int = opt(32, "new tokens per sample", ge=1)
    checkpoint_every: int = opt(5000, "save a checkpoint every N steps (0: only at the end)", ge=0)
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints", ge=1)
    run_dir: str | None = opt(None, "run folder (config, metrics, plot, checkpoints); none: runs/<preset>")
    resume: str | None = opt(None, "continue a run: the latest checkpoint in the run folder (no value) "
                                   "or a checkpoint path")
    overwrite: bool = opt(False, "start a new run in a run folder that holds one, deleting its checkpoints, "
                                 "metrics and config")
    peak_flops: float | None = opt(None, "bf16 peak FLOP/s of one device, for MFU; none: from the table of "
                                         "known GPUs", gt=0)
    plot: bool = opt(True, "write loss.png at the end")


PRESETS = {
    "gpt2-124m": dict(  # build-nanogpt: 10B tokens of FineWeb-Edu in 19,073 steps of 0.5M tokens
        model="gpt2", pad_vocab_to=128, data="fineweb-edu", seq_len=1024, micro_batch=64, total_batch=524288,
        max_steps=19073, warmup_steps=715, max_lr=6e-4, min_lr_ratio=0.1, weight_decay=0.1,
        val_every=250, val_steps=20, hellaswag_every=250, sample_every=250, checkpoint_every=5000,
    ),
    "demo": dict(  # ~3 minutes on 2 CPU cores, data prep included
        model="gpt2", block_size=128, n_layer=4, n_head=4, n_embd=128, data="pystdlib", seq_len=128,
        micro_batch=8, total_batch=None, max_steps=200, warmup_steps=20, max_lr=3e-3,
        val_every=50, val_steps=5, hellaswag_every=0, sample_every=100, sample_count=2, sample_tokens=32,
        checkpoint_every=100,
    ),
}
MODEL_FIELDS = ("model", "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to")
# What a resumed run may change; every other field must equal the checkpoint's (the model's via its GPTConfig).
RESUME_MAY_CHANGE = (
    "max_steps", "lr_decay_steps", "kernels", "data_dir", "fused_adamw", "device", "dtype", "compile",
    "val_every", "val_steps", "hellaswag_every", "hellaswag", "hellaswag_limit", "sample_every", "sample_count",
    "sample_tokens", "checkpoint_every", "keep_checkpoints", "peak_flops", "plot",
)
RESUME_IGNORED = ("preset", "run_dir", "resume", "overwrite")  # how the run is named and started


class ConfigError(ValueError):
    """A problem with the configuration, the data or the run folder: reported in one line, no traceback."""


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN/inf."""


class TrainingInterrupted(Exception):
    """A SIGINT/SIGTERM stopped the run after a completed step, which was saved."""

    def __init__(self, signum: int, step: int, checkpoint, history: list):
        self.signum, self.step, self.checkpoint, self.history = signum, step, checkpoint, history
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}; "
                         f"continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports a death by signal


# --- configuration --------------------------------------------------------------------------------
def _field_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


# A field's range in its metadata: key -> (test, how --help and errors write it).
BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


def _is_optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f) -> str:
    """The field's help, its range and its default (and each preset's value where it sets one)."""
    meta = f.metadata
    bounds = [f"{word} {meta[key]}" for key, _, word in BOUNDS if key in meta]
    default = [] if f.default is None else [f"default {f.default}"]  # the help says what None means
    default += [f"{name}: {preset[f.name]}" for name, preset in PRESETS.items()
                if f.name in preset and preset[f.name] != f.default]
    notes = "; ".join(filter(None, [", ".join(bounds)] + default))
    return f"{meta['help']} ({notes})" if notes else meta["help"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, kind = _flag(f.name), _field_type(hints[f.name])
        if f.name == "preset":
            parser.add_argument(flag, choices=sorted(PRESETS), default=argparse.SUPPRESS, help=f.metadata["help"])
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=argparse.SUPPRESS, metavar="CHECKPOINT",
                                help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=_help(f))
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                                help=_help(f))
    return parser


def make_config(preset: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig defaults <- preset <- overrides. preset None: demo on CPU, gpt2-124m on CUDA."""
    if preset is None:
        preset = "gpt2-124m" if _wants_cuda(overrides.get("device", "auto")) else "demo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(TrainConfig(), **{**PRESETS[preset], **overrides, "preset": preset})


def parse_config(argv=None) -> TrainConfig:
    given = vars(build_parser().parse_args(argv))
    preset = given.pop("preset", None)
    if preset is None:
        chosen = "gpt2-124m" if _wants_cuda(given.get("device", "auto")) else "demo"
        print(f"no --preset given: using {chosen!r} ({'CUDA found' if chosen == 'gpt2-124m' else 'no CUDA'})")
    return make_config(preset, **given)


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _range_problem(f, value, annotation) -> str | None:
    """Why `value` is not valid for field `f`, or None."""
    meta, flag = f.metadata, _flag(f.name)
    if value is None:
        return None if _is_optional(annotation) else f"{flag} needs a value"
    kind = _field_type(annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return f"{flag} must be {kind.__name__}; got {value!r}"
    if kind is float and not math.isfinite(value) and not (meta.get("inf_ok") and value == math.inf):
        return f"{flag} must be a finite number; got {value}"
    for key, op, word in BOUNDS:
        if key in meta and not op(value, meta[key]):
            return f"{flag} must be {word} {meta[key]}; got {value}"
    if "choices" in meta and value not in meta["choices"]:
        return f"{flag} must be one of {', '.join(meta['choices'])}; got {value!r}"
    return None


def model_config_of(cfg: TrainConfig) -> GPTConfig:
    return GPTConfig.from_preset(cfg.model, **{k: getattr(cfg, k) for k in MODEL_FIELDS[1:]
                                               if getattr(cfg, k) is not None})


def check_config(cfg: TrainConfig) -> None:
    """Every field in its range, and every combination that can be checked without data or devices.
    Raises ConfigError naming the flag; nothing has been written yet."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        problem = _range_problem(f, getattr(cfg, f.name), hints[f.name])
        if problem:
            raise ConfigError(problem)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(sorted(PRESETS))}; got {cfg.preset!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    preparable = cfg.data in ("pystdlib", "fineweb-edu") or (cfg.data.startswith("text:") and len(cfg.data) > 5)
    if not preparable and not (cfg.data_dir and cfg.data):  # with --data-dir: the name in its manifest
        raise ConfigError(f"--data must be pystdlib, fineweb-edu or text:PATH; got {cfg.data!r}")
    try:
        resolve_kernels(parse_kernels_arg(cfg.kernels))
        model_config = model_config_of(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if cfg.seq_len > model_config.block_size:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's block size {model_config.block_size}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in the run folder and --overwrite deletes it: pick one")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_file():
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file")
    if cfg.hellaswag and not Path(cfg.hellaswag).is_file():
        raise ConfigError(f"--hellaswag {cfg.hellaswag}: no such file")
    for name in ("run_dir", "data_dir"):
        folder = getattr(cfg, name)
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{_flag(name)} {folder}: not a folder")


def check_triton_usable(kernels: str, device_type: str) -> None:
    """Triton kernels on a CPU need the interpreter: fail early and clearly instead of deep inside."""
    choice = resolve_kernels(parse_kernels_arg(kernels))
    triton_ops = [op for op, impl in choice.items() if impl == "triton"]
    if triton_ops and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"--kernels {kernels}: Triton kernels ({', '.join(triton_ops)}) need a CUDA GPU, and there is none. "
            f"To run them on the CPU through Triton's interpreter (slow), set TRITON_INTERPRET=1; "
            f"or use --kernels torch.")


# --- distributed ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> DistContext:
    """Under torchrun (RANK set): init the process group (NCCL on GPU, gloo on CPU); else one process."""
    use_cuda = _wants_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if "RANK" not in os.environ:
        return DistContext(0, 0, 1, torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu")))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, local_rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.is_ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        t /= ctx.world_size
    return t


def gather(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.is_ddp:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(ctx: DistContext, fn):
    """fn() on rank 0 only (its result there; None elsewhere). If it fails every rank raises, so no rank
    waits forever at a collective for one that is gone: a ConfigError as a ConfigError, anything else
    as a RuntimeError naming rank 0's error (rank 0 re-raises its own, traceback and all)."""
    error, result = None, None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as e:
            error = e
    if ctx.is_ddp:
        box = [None if error is None else (isinstance(error, ConfigError), f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=0)
        if not ctx.is_main and box[0] is not None:
            is_config, text = box[0]
            if is_config:
                raise ConfigError(text.split(": ", 1)[1])
            raise RuntimeError(f"rank 0 failed: {text}")
    if error is not None:
        raise error
    return result


# --- one optimizer step ---------------------------------------------------------------------------
def autocast_context(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def accumulate_gradients(model, next_batch, grad_accum: int, device, amp_dtype=None) -> torch.Tensor:
    """Forward/backward over grad_accum micro-batches; the grads sum to those of their mean loss.
    Returns this process's mean loss (detached)."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if isinstance(model, DDP):  # all-reduce grads on the last micro-step only; decided before forward
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with autocast_context(device, amp_dtype):
            _, loss = model(x, y)
        loss = loss / grad_accum  # k micro-steps == one k-times bigger batch
        loss_accum += loss.detach()
        loss.backward()
    return loss_accum


def weights_finite(model: torch.nn.Module) -> bool:
    """True when every parameter is finite (by the norm of each; weights beyond ~1e19 count as inf)."""
    params = [p.detach() for p in model.parameters()]
    return bool(torch.stack([n.float() for n in torch._foreach_norm(params)]).isfinite().all())


# --- the run folder -------------------------------------------------------------------------------
def claim_run_dir(cfg: TrainConfig) -> FolderLock:
    """Rank 0, before anything is written: lock the run folder (a second train.py on it refuses while
    this one lives; the OS drops the lock when this process dies), sweep temp files left by killed
    saves, and check that this run may use the folder. Returns the held lock."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir / RUN_LOCK)
    if not lock.acquire():
        raise ConfigError(f"run folder {run_dir} is in use by another train.py ({lock.owner()}); wait for it "
                          f"to finish, or use another --run-dir")
    try:
        stale = remove_stale_temps(run_dir)
        if stale:
            print(f"removed {len(stale)} temp file(s) left in {run_dir} by killed saves: "
                  f"{', '.join(p.name for p in stale)}", flush=True)
        resume_checkpoint(cfg)  # raises if this resume would mix two runs
        existing = run_artifacts(run_dir)
        if existing and not cfg.resume and not cfg.overwrite:
            latest = latest_checkpoint(run_dir)
            where = f"up to {latest.name}" if latest else "no checkpoint yet"
            raise ConfigError(
                f"run folder {run_dir} already holds a run ({where}; {', '.join(p.name for p in existing[-3:])}). "
                f"Continue it with --resume, start it over with --overwrite (deletes it), "
                f"or pick a new --run-dir")
    except BaseException:
        lock.release()
        raise
    return lock


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run resumes from (None for a new run). Refuses a resume that would mix
    two runs in one folder: the checkpoint must be the folder's latest, or the folder must hold no run."""
    if not cfg.resume:
        return None
    run_dir = Path(cfg.run_dir)
    latest = latest_checkpoint(run_dir)
    if cfg.resume == "latest":
        if latest is None:
            held = run_artifacts(run_dir)
            raise ConfigError(f"--resume: no ckpt_<step>.pt in {run_dir}" + (
                " (the run there saved none: start it over with --overwrite)" if held else ""))
        return latest
    path = Path(cfg.resume)
    if run_artifacts(run_dir) and (latest is None or path.resolve() != latest.resolve()):
        raise ConfigError(
            f"--resume {path}: run folder {run_dir} holds another run's history (latest checkpoint: "
            f"{latest.name if latest else 'none'}); resuming here would mix the two. Resume into a new "
            f"--run-dir, or resume the folder's own latest checkpoint with a bare --resume")
    return path


# --- the trainer ----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float32": None}[cfg.dtype]
        self.run_dir = Path(cfg.run_dir)
        self.grad_accum = cfg.total_batch // (cfg.micro_batch * cfg.seq_len * ctx.world_size)
        self.stop_signal = 0  # set by StopOnSignals: SIGINT / SIGTERM
        self.step = 0
        self.best_val_loss = self.last_val_loss = None
        self.resumed_from, self.resume_changes = None, {}
        self.last_saved = None
        self.metrics = None

        torch.manual_seed(cfg.seed)
        self.model_config = model_config_of(cfg)
        self.raw_model = GPT(self.model_config, kernels=parse_kernels_arg(cfg.kernels)).to(self.device)
        self.optimizer = self.raw_model.configure_optimizer(
            cfg.weight_decay, cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=cfg.fused_adamw)
        data_dir, pin = Path(cfg.data_dir), self.device.type == "cuda"
        try:
            self.train_loader = gpt2_data.DataLoader(data_dir, "train", cfg.micro_batch, cfg.seq_len, rank=ctx.rank,
                                                     world_size=ctx.world_size, seed=cfg.seed, pin_memory=pin)
            self.val_loader = gpt2_data.DataLoader(data_dir, "val", cfg.micro_batch, cfg.seq_len, rank=ctx.rank,
                                                   world_size=ctx.world_size, seed=cfg.seed, pin_memory=pin)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        if cfg.resume:
            self.restore(resume_checkpoint(cfg))
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if ctx.is_ddp:
            self.model = DDP(self.model, device_ids=[ctx.local_rank] if self.device.type == "cuda" else None)
        self.hellaswag_examples = self.load_hellaswag()
        self.flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.peak_flops)

    def begin(self):
        """Rank 0, once everything has been checked: start over (--overwrite), write train_config.json and
        open metrics.jsonl for appending (a resume adds a "resume" record)."""
        if not self.ctx.is_main:
            return
        if self.cfg.overwrite:
            old = run_artifacts(self.run_dir)
            for path in old:
                path.unlink()
            if old:
                self.print(f"--overwrite: deleted the previous run in {self.run_dir} ({len(old)} files)")
        gpt2_data.write_json_atomic(self.run_dir / "train_config.json", asdict(self.cfg))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if self.resumed_from is not None:
            self.log("resume", step=self.step, checkpoint=str(self.resumed_from), changed=self.resume_changes)

    def log(self, kind, **fields):
        if self.metrics is not None:
            self.metrics.log(kind, **fields)

    def print(self, *args):
        if self.ctx.is_main:
            print(*args, flush=True)

    # --- checkpoints ---
    def checkpoint_state(self) -> dict | None:
        """The full training state (all ranks call: loader positions and RNGs are gathered); None off rank 0."""
        loaders, rngs = gather(self.train_loader.state_dict(), self.ctx), gather(rng_state(), self.ctx)
        if not self.ctx.is_main:
            return None
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "loader": loaders,  # one per rank
            "rng": rngs,  # one per rank
            "world_size": self.ctx.world_size,
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.cfg),
            "kernels": self.raw_model.kernels,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
        }

    def save(self) -> Path | None:
        if not weights_finite(self.raw_model):  # the step checks catch this first; never save bad weights
            raise NonFiniteError(f"step {self.step}: the weights are not finite; not saving them")
        state = self.checkpoint_state()
        if state is None:
            return None
        path = save_checkpoint(checkpoint_path(self.run_dir, self.step), state)
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        self.last_saved = path
        self.print(f"saved checkpoint {path}")
        return path

    def restore(self, path: Path):
        try:
            state = load_checkpoint(path, map_location=self.device)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"--resume: {e}") from None
        self.check_resumable(path, state)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["loader"][self.ctx.rank])
        set_rng_state(state["rng"][self.ctx.rank])
        self.step = state["step"]
        self.best_val_loss, self.last_val_loss = state["best_val_loss"], state["last_val_loss"]
        self.resumed_from = path
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.resume_changes.items())
        self.print(f"resumed from {path} at step {self.step}" + (f" (changed: {changed})" if changed else ""))

    def check_resumable(self, path: Path, state: dict):
        """The checkpoint was written by this same run: same model, data, batch and optimizer settings,
        as many processes, and it has steps left to take. Records which changeable fields changed."""
        missing = [k for k in ("model", "optimizer", "step", "loader", "rng", "world_size", "model_config")
                   if k not in state]
        if missing:
            raise ConfigError(f"--resume: {path} is not a training checkpoint (it lacks {', '.join(missing)})")
        model_now = self.model_config.to_dict()
        if state["model_config"] != model_now:
            diff = {k: (v, model_now.get(k)) for k, v in state["model_config"].items() if v != model_now.get(k)}
            raise ConfigError(f"--resume: {path} holds another model: " +
                              ", ".join(f"{k} {a} (now {b})" for k, (a, b) in diff.items()))
        if state["world_size"] != self.ctx.world_size:
            raise ConfigError(f"--resume: {path} was written by {state['world_size']} processes; "
                              f"resume with the same number (now {self.ctx.world_size})")
        saved, now = state.get("train_config", {}), asdict(self.cfg)
        fixed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE + RESUME_IGNORED + MODEL_FIELDS]
        differ = [k for k in fixed if saved[k] != now[k]]
        if differ:
            raise ConfigError(
                f"--resume: this run differs from {path.name} in " +
                ", ".join(f"{_flag(k)} ({saved[k]} in the checkpoint, {now[k]} now)" for k in differ) +
                f". A resumed run may change only {', '.join(_flag(k) for k in RESUME_MAY_CHANGE)}; "
                f"to train with other settings, start a new run in another --run-dir")
        if state["step"] >= self.cfg.max_steps:
            raise ConfigError(f"--resume: {path.name} is at step {state['step']}, and --max-steps is "
                              f"{self.cfg.max_steps}: nothing left to train (raise --max-steps to go on)")
        self.resume_changes = {k: (saved[k], now[k]) for k in RESUME_MAY_CHANGE if k in saved and saved[k] != now[k]}

    # --- evaluation ---
    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in tqdm(range(self.cfg.val_steps), desc="val", leave=False, disable=None if self.ctx.is_main else True):
            x, y = self.val_loader.next_batch()
            with autocast_context(self.device, self.amp_dtype):
                _, loss = self.model(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            total += loss.detach() / self.cfg.val_steps
        self.model.train()
        val_loss = all_reduce_mean(total, self.ctx).item()
        self.last_val_loss = val_loss
        self.best_val_loss = val_loss if self.best_val_loss is None else min(self.best_val_loss, val_loss)
        self.print(f"step {self.step:>6} | val loss {val_loss:.4f}")
        self.log("val", step=self.step, val_loss=val_loss)
        return val_loss

    def load_hellaswag(self):
        if not self.cfg.hellaswag_every:
            return None
        path = Path(self.cfg.hellaswag) if self.cfg.hellaswag else hellaswag.default_path()
        if not path.is_file():
            if self.cfg.hellaswag:
                raise ConfigError(f"--hellaswag: {path} does not exist")
            self.print(f"HellaSwag: no data at {path}; skipping it (python -m gpt2.hellaswag caches it)")
            return None
        try:
            return hellaswag.load_examples(path, self.cfg.hellaswag_limit)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def eval_hellaswag(self):
        result = hellaswag.evaluate_hellaswag(self.raw_model, self.hellaswag_examples, self.device,
                                              self.ctx.rank, self.ctx.world_size, self.amp_dtype)
        self.print(f"step {self.step:>6} | HellaSwag acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
                   f"({result['n']} examples)")
        self.log("hellaswag", step=self.step, **result)

    def sample(self) -> list[str]:
        """Rank 0, uncompiled module, fixed seed: the same prompt each time."""
        enc = get_encoding()
        prompt = torch.tensor([enc.encode(SAMPLE_PROMPT)] * self.cfg.sample_count, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(42)
        self.raw_model.eval()
        with autocast_context(self.device, self.amp_dtype):
            out = self.raw_model.generate(prompt, self.cfg.sample_tokens, temperature=1.0, top_k=50,
                                          generator=generator)
        self.raw_model.train()
        texts = [enc.decode(row.tolist()) for row in out]
        for text in texts:
            self.print(f"sample: {text!r}")
        self.log("sample", step=self.step, text=texts)
        return texts

    def due(self, every: int) -> bool:
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.max_steps)

    # --- training ---
    def train_step(self) -> dict:
        """One optimizer step. Loss and gradient norm are checked before the update and the weights after
        it, so a NonFiniteError leaves every saved checkpoint good (the same on every rank)."""
        cfg = self.cfg
        t0 = time.time()
        lr = cosine_lr(self.step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps,
                       cfg.lr_decay_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(self.model, self.train_loader.next_batch, self.grad_accum, self.device,
                                    self.amp_dtype)
        loss = all_reduce_mean(loss, self.ctx).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip).item()
        for name, value in (("loss", loss), ("grad norm", grad_norm)):
            if not math.isfinite(value):
                raise NonFiniteError(f"step {self.step + 1}: {name} is {value}; stopped before the update")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if not weights_finite(self.raw_model):
            raise NonFiniteError(f"step {self.step + 1}: the update made the weights non-finite (loss {loss:.4f}, "
                                 f"grad norm {grad_norm:.3g}, lr {lr:.3g}); they were not saved")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        dt = time.time() - t0
        tokens_per_s = self.grad_accum * cfg.micro_batch * cfg.seq_len * self.ctx.world_size / dt
        mfu_value = mfu(self.flops_per_token, tokens_per_s, self.peak_flops, self.ctx.world_size)
        return dict(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                    step_ms=1000 * dt, mfu=mfu_value, peak_mem_mb=peak_memory_mb(self.device))

    def after_step(self):
        cfg = self.cfg
        if self.due(cfg.val_every):
            self.validate()
        if self.hellaswag_examples and self.due(cfg.hellaswag_every):
            self.eval_hellaswag()
        if self.ctx.is_main and cfg.sample_count and self.due(cfg.sample_every):
            self.sample()
        if self.due(cfg.checkpoint_every):
            self.save()

    def stop_signal_all_ranks(self) -> int:
        """The stop signal any rank got (0: none); every rank gets the same answer, so all stop at the
        same step (SIGTERM wins over SIGINT)."""
        if not self.ctx.is_ddp:
            return self.stop_signal
        flag = torch.tensor([self.stop_signal], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def run(self) -> list[dict]:
        """Train to max_steps and return this run's per-step records. Raises TrainingInterrupted after
        saving when a SIGINT/SIGTERM stopped it early."""
        cfg = self.cfg
        self.print(f"model: {self.raw_model.num_params():,} parameters, kernels {self.raw_model.kernels}")
        self.print(f"{self.grad_accum} micro-steps of {cfg.micro_batch}x{cfg.seq_len} x {self.ctx.world_size} "
                   f"process(es) = {cfg.total_batch:,} tokens per step")
        if self.step == 0 and cfg.val_every:
            self.validate()
        history = []
        saved_at, stop = (self.step if self.resumed_from else None), 0
        while self.step < cfg.max_steps:
            try:
                record = self.train_step()
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; last good checkpoint: {latest_checkpoint(self.run_dir)}") from None
            history.append(record)
            self.print(format_step(self.step, cfg.max_steps, record["loss"], record["lr"], record["grad_norm"],
                                   record["step_ms"], record["tokens_per_s"], record["mfu"], record["peak_mem_mb"]))
            self.log("train", **record)
            self.after_step()
            if self.due(cfg.checkpoint_every):
                saved_at = self.step
            if self.step < cfg.max_steps and (stop := self.stop_signal_all_ranks()):
                self.print(f"{signal.Signals(stop).name}: saving step {self.step} and stopping")
                break
        if saved_at != self.step:
            self.save()
        if self.ctx.is_main and cfg.plot:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if stop:
            raise TrainingInterrupted(stop, self.step, latest_checkpoint(self.run_dir), history)
        return history


# --- entry points ---------------------------------------------------------------------------------
def resolve_config(cfg: TrainConfig, ctx: DistContext) -> TrainConfig:
    """Every "auto"/None that depends on the machine made concrete: this is what gets printed and saved."""
    on_cuda = ctx.device.type == "cuda"
    tokens_per_micro_step = cfg.micro_batch * cfg.seq_len * ctx.world_size
    total = cfg.total_batch or tokens_per_micro_step
    if total % tokens_per_micro_step:
        raise ConfigError(f"--total-batch {total} must be a multiple of micro_batch x seq_len x processes "
                          f"= {cfg.micro_batch} x {cfg.seq_len} x {ctx.world_size} = {tokens_per_micro_step}")
    return replace(
        cfg,
        device=str(ctx.device),
        dtype=cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_cuda else "float32"),
        compile=on_cuda if cfg.compile is None else cfg.compile,
        fused_adamw=on_cuda if cfg.fused_adamw is None else cfg.fused_adamw,
        total_batch=total,
        lr_decay_steps=cfg.lr_decay_steps or cfg.max_steps,
        run_dir=cfg.run_dir or str(Path("runs") / cfg.preset),
        data_dir=cfg.data_dir or str(gpt2_data.default_data_dir(cfg.data)),
    )


def prepare_data(cfg: TrainConfig) -> None:
    """(Rank 0.) Use the data folder as it is when it holds cfg.data's shards or llm.c-format shards;
    prepare cfg.data into it when it holds no complete dataset; never overwrite another dataset."""
    data_dir = Path(cfg.data_dir)
    try:
        found = gpt2_data.load_manifest(data_dir)["source"]
    except FileNotFoundError:
        found = None
    except ValueError as e:
        raise ConfigError(f"data folder {data_dir}: {e}") from None
    if found == gpt2_data.LLMC_SOURCE:
        print(f"data: llm.c-format shards in {data_dir} (no manifest.json)", flush=True)
        return
    if found is not None and found != cfg.data:
        raise ConfigError(f"data folder {data_dir} holds {found!r} data, not {cfg.data!r}: pass --data {found}, "
                          f"or another --data-dir for {cfg.data!r}")
    try:
        gpt2_data.ensure_prepared(cfg.data, data_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"data {cfg.data}: {e}") from None


class StopOnSignals:
    """SIGINT (Ctrl-C) or SIGTERM (schedulers, `kill`, torchrun): finish the current step, save it,
    stop; the run then exits 130 / 143. A second Ctrl-C quits at once (KeyboardInterrupt) and a
    second SIGTERM exits 143 at once, without saving. Under torchrun a repeat is ignored: the
    launcher forwards the signal it gets, so workers see Ctrl-C twice, and it kills them itself
    after its own timeout."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer: Trainer, repeat_quits: bool = True):
        self.trainer, self.repeat_quits = trainer, repeat_quits
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.trainer.stop_signal:
            if not self.repeat_quits:
                return
            print(f"\n{signal.Signals(signum).name} again: quitting without saving", file=sys.stderr, flush=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.trainer.stop_signal = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint"
              + (f" ({again} again to quit now)" if self.repeat_quits else ""), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def train(cfg: TrainConfig) -> list[dict]:
    """Run training in this process (or as one torchrun rank); returns this run's per-step records.
    Raises ConfigError for bad settings, data or run folder (before anything is written),
    NonFiniteError on NaN/inf, TrainingInterrupted after saving when a signal stopped the run."""
    check_config(cfg)
    check_triton_usable(cfg.kernels, "cuda" if _wants_cuda(cfg.device) else "cpu")
    ctx = setup_distributed(cfg.device)
    lock = trainer = None
    try:
        cfg = resolve_config(cfg, ctx)
        lock = on_rank0(ctx, lambda: claim_run_dir(cfg))
        if ctx.is_main:
            print("config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
        if ctx.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        on_rank0(ctx, lambda: prepare_data(cfg))
        trainer = Trainer(cfg, ctx)
        trainer.begin()
        with StopOnSignals(trainer, repeat_quits=not ctx.is_ddp):
            history = trainer.run()
        if ctx.is_ddp:
            dist.barrier()  # every rank is done before any tears down
        return history
    finally:
        trainer = None  # free DDP's reducer before its process group: gloo aborts at exit otherwise
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def main(argv=None) -> list[dict]:
    """The command line: errors in the settings, data or run folder are one line (exit 1); a signal
    exits 128 + its number after saving (130 Ctrl-C, 143 SIGTERM)."""
    try:
        return train(parse_config(argv))
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except (ConfigError, NonFiniteError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
