"""Train GPT-2 on CPU, one GPU, or several with DDP (build-nanogpt's recipe).

    python train.py                               # demo on CPU, gpt2-124m on a GPU
    python train.py --preset demo --max-steps 50
    torchrun --nproc_per_node=8 train.py --preset gpt2-124m --micro-batch 32
    python train.py --preset demo --resume        # continue from the latest checkpoint in the run folder

Every TrainConfig field is a flag (`--micro-batch 8`, `--no-compile`, ...); a preset is a partial
override of the defaults, and flags override the preset.
"""
import argparse
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import data as gpt2_data
from gpt2 import hellaswag
from gpt2.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, rng_state,
                             save_checkpoint, set_rng_state)
from gpt2.config import GPTConfig
from gpt2.model import GPT
from gpt2.ops import parse_kernels_arg, resolve_kernels
from gpt2.tokenizer import get_encoding
from gpt2.train_utils import MetricsLog, cosine_lr, device_peak_flops, format_step, mfu, peak_memory_mb, plot_metrics

SAMPLE_PROMPT = "Hello, I'm a language model,"


@dataclass(frozen=True)
class TrainConfig:
    preset: str | None = None  # demo | gpt2-124m; None: demo on CPU, gpt2-124m on a GPU
    # model: a GPTConfig preset, with optional overrides (None keeps the preset's value)
    model: str = "gpt2"
    block_size: int | None = None
    vocab_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    pad_vocab_to: int = 128  # 50257 -> 50304
    kernels: str = "torch"  # torch | triton | op=impl,op=impl
    # data
    data: str = "fineweb-edu"  # pystdlib | fineweb-edu | text:PATH
    data_dir: str | None = None  # None: gpt2.data.default_data_dir(data)
    seq_len: int = 1024
    micro_batch: int = 64  # sequences per forward, per process
    total_batch: int | None = 524288  # tokens per optimizer step; None: one micro-batch per process
    # optimisation
    max_steps: int = 19073
    lr_decay_steps: int | None = None  # cosine ends here; None: max_steps (set it to stop early on the same schedule)
    warmup_steps: int = 715
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    fused_adamw: bool | None = None  # None: fused on CUDA
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 on CPU) | bfloat16 | float32
    compile: bool | None = None  # None: on for CUDA, off on CPU
    seed: int = 1337
    # evaluation, logging, checkpoints (an interval of 0 turns it off; the last step always counts)
    val_every: int = 250
    val_steps: int = 20
    hellaswag_every: int = 250
    hellaswag: str | None = None  # hellaswag_val.jsonl; None: the cached file if present
    hellaswag_limit: int | None = None
    sample_every: int = 250
    sample_count: int = 4
    sample_tokens: int = 32
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    run_dir: str | None = None  # None: runs/<preset>
    resume: str | None = None  # "latest" (bare --resume) or a checkpoint path
    peak_flops: float | None = None  # per-device bf16 peak for MFU; None: from the GPU table
    plot: bool = True


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


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/inf."""


# --- configuration --------------------------------------------------------------------------------
def _field_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), _field_type(hints[f.name])
        if f.name == "preset":
            parser.add_argument(flag, choices=sorted(PRESETS), default=argparse.SUPPRESS)
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=argparse.SUPPRESS,
                                help="latest checkpoint in the run folder (no value) or a checkpoint path")
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"default: {f.default}")
    return parser


def make_config(preset: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig defaults <- preset <- overrides. preset None: demo on CPU, gpt2-124m on CUDA."""
    if preset is None:
        preset = "gpt2-124m" if _wants_cuda(overrides.get("device", "auto")) else "demo"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
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


def check_triton_usable(kernels: str, device_type: str) -> None:
    """Triton kernels on a CPU need the interpreter: fail early and clearly instead of deep inside."""
    choice = resolve_kernels(parse_kernels_arg(kernels))
    triton_ops = [op for op, impl in choice.items() if impl == "triton"]
    if triton_ops and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
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
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
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


# --- the trainer ----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float32": None}[cfg.dtype]
        self.run_dir = Path(cfg.run_dir)
        self.grad_accum = cfg.total_batch // (cfg.micro_batch * cfg.seq_len * ctx.world_size)
        self.stop_requested = False
        self.step = 0
        self.best_val_loss = self.last_val_loss = None

        torch.manual_seed(cfg.seed)
        self.model_config = GPTConfig.from_preset(cfg.model, **{
            k: getattr(cfg, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to")
            if getattr(cfg, k) is not None})
        if cfg.seq_len > self.model_config.block_size:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's block_size {self.model_config.block_size}")
        self.raw_model = GPT(self.model_config, kernels=parse_kernels_arg(cfg.kernels)).to(self.device)
        self.optimizer = self.raw_model.configure_optimizer(
            cfg.weight_decay, cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=cfg.fused_adamw)
        data_dir = Path(cfg.data_dir)
        self.train_loader = gpt2_data.DataLoader(data_dir, "train", cfg.micro_batch, cfg.seq_len,
                                                 rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
        self.val_loader = gpt2_data.DataLoader(data_dir, "val", cfg.micro_batch, cfg.seq_len,
                                               rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
        if cfg.resume:
            self.restore(cfg.resume)
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if ctx.is_ddp:
            self.model = DDP(self.model, device_ids=[ctx.local_rank] if self.device.type == "cuda" else None)
        self.hellaswag_examples = self.load_hellaswag()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if cfg.resume else None) \
            if ctx.is_main else None
        self.flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.peak_flops)

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
        state = self.checkpoint_state()
        if state is None:
            return None
        path = save_checkpoint(checkpoint_path(self.run_dir, self.step), state)
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        self.print(f"saved checkpoint {path}")
        return path

    def restore(self, resume: str):
        path = latest_checkpoint(self.run_dir) if resume == "latest" else Path(resume)
        if path is None:
            raise FileNotFoundError(f"--resume: no ckpt_<step>.pt in {self.run_dir}")
        state = load_checkpoint(path, map_location=self.device)
        if state["model_config"] != self.model_config.to_dict():
            raise ValueError(f"--resume: {path} holds model {state['model_config']}, "
                             f"but this run builds {self.model_config.to_dict()}")
        if state["world_size"] != self.ctx.world_size:
            raise ValueError(f"--resume: {path} was written by {state['world_size']} processes; "
                             f"resume with the same number (now {self.ctx.world_size})")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["loader"][self.ctx.rank])
        set_rng_state(state["rng"][self.ctx.rank])
        self.step = state["step"]
        self.best_val_loss, self.last_val_loss = state["best_val_loss"], state["last_val_loss"]
        self.print(f"resumed from {path} at step {self.step}")

    # --- evaluation ---
    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.val_steps):
            x, y = self.val_loader.next_batch()
            with autocast_context(self.device, self.amp_dtype):
                _, loss = self.model(x.to(self.device), y.to(self.device))
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
                raise FileNotFoundError(f"--hellaswag: {path} does not exist")
            self.print(f"HellaSwag: no data at {path}; skipping it (python -m gpt2.hellaswag caches it)")
            return None
        return hellaswag.load_examples(path, self.cfg.hellaswag_limit)

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
                raise NonFiniteError(f"step {self.step + 1}: {name} is {value}; stopping without saving this state")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        dt = time.time() - t0
        tokens_per_s = self.grad_accum * cfg.micro_batch * cfg.seq_len * self.ctx.world_size / dt
        return dict(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                    step_ms=1000 * dt, mfu=mfu(self.flops_per_token, tokens_per_s, self.peak_flops, self.ctx.world_size),
                    peak_mem_mb=peak_memory_mb(self.device))

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

    def interrupted(self) -> bool:
        """True when any rank got Ctrl-C (all ranks agree, so they stop at the same step)."""
        if not self.ctx.is_ddp:
            return self.stop_requested
        flag = torch.tensor([int(self.stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> list[dict]:
        cfg = self.cfg
        self.print(f"model: {self.raw_model.num_params():,} parameters, kernels {self.raw_model.kernels}")
        self.print(f"{self.grad_accum} micro-steps of {cfg.micro_batch}x{cfg.seq_len} x {self.ctx.world_size} "
                   f"process(es) = {cfg.total_batch:,} tokens per step")
        if self.step == 0 and cfg.val_every:
            self.validate()
        history = []
        saved_at = None
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
            if self.interrupted():
                self.print(f"interrupted: saving step {self.step} and stopping")
                break
        if saved_at != self.step:
            self.save()
        if self.ctx.is_main and cfg.plot:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return history


# --- entry points ---------------------------------------------------------------------------------
def resolve_config(cfg: TrainConfig, ctx: DistContext) -> TrainConfig:
    """Every "auto"/None that depends on the machine made concrete: this is what gets printed and saved."""
    on_cuda = ctx.device.type == "cuda"
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be auto, bfloat16 or float32; got {cfg.dtype!r}")
    tokens_per_micro_step = cfg.micro_batch * cfg.seq_len * ctx.world_size
    total = cfg.total_batch or tokens_per_micro_step
    if total % tokens_per_micro_step:
        raise ValueError(f"total_batch {total} must be a multiple of micro_batch x seq_len x processes "
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


def prepare_data(cfg: TrainConfig, ctx: DistContext) -> None:
    """Rank 0 prepares the dataset if needed; the others wait at a barrier."""
    if ctx.is_main and not gpt2_data.is_prepared(cfg.data_dir, source=cfg.data):
        print(f"preparing {cfg.data} into {cfg.data_dir} ...", flush=True)
        gpt2_data.prepare(cfg.data, out_dir=cfg.data_dir)
    if ctx.is_ddp:
        dist.barrier()
    if not gpt2_data.is_prepared(cfg.data_dir):
        raise RuntimeError(f"data folder {cfg.data_dir} is not prepared")


class _StopOnSigint:
    """First Ctrl-C: finish the current step, checkpoint it, stop. Second Ctrl-C: KeyboardInterrupt."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def train(cfg: TrainConfig) -> list[dict]:
    """Run training in this process (or as one torchrun rank); returns this run's per-step records."""
    device_type = "cuda" if _wants_cuda(cfg.device) else "cpu"
    check_triton_usable(cfg.kernels, device_type)
    ctx = setup_distributed(cfg.device)
    try:
        cfg = resolve_config(cfg, ctx)
        if ctx.is_main:
            print("config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        if ctx.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        prepare_data(cfg, ctx)
        trainer = Trainer(cfg, ctx)
        with _StopOnSigint(trainer):
            history = trainer.run()
        if ctx.is_ddp:
            dist.barrier()  # every rank is done before any tears down
        return history
    finally:
        trainer = None  # free DDP's reducer before its process group: gloo aborts at exit otherwise
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> list[dict]:
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except NonFiniteError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
