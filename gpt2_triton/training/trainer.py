"""The trainer: build the model, optimizer and loaders of a run, then loop to max_steps with evaluation,
samples and checkpoints; Ctrl-C and SIGTERM save before stopping. `training_session(cfg)` sets up
processes, the run folder and the data around it; `train(cfg)` is a whole run in this process."""
import contextlib
import gc
import re
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt2_triton import data as gpt2_data
from gpt2_triton import hellaswag
from gpt2_triton.atomic import OutOfSpaceError, sigterm_raises, write_json_atomic
from gpt2_triton.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    newest_verified_checkpoint,
    prune_checkpoints,
    remove_checkpoint,
    rng_state,
    run_artifacts,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
    sharded_checkpoint_path,
)
from gpt2_triton.messages import one_line
from gpt2_triton.model import GPT
from gpt2_triton.tokenizer import get_encoding
from gpt2_triton.training.config import (
    TrainConfig,
    check_config,
    config_warnings,
    kernel_choice,
    model_config_of,
    resolve_config,
    resume_problems,
    with_init_shape,
)
from gpt2_triton.training.distributed import (
    DistContext,
    all_reduce_mean,
    broadcast,
    gather,
    is_collective_failure,
    on_rank0,
    setup_distributed,
)
from gpt2_triton.training.errors import ConfigError, NonFiniteError, RunError
from gpt2_triton.training.memory import check_memory, plan_line
from gpt2_triton.training.metrics import (
    MetricsLog,
    cosine_lr,
    device_peak_flops,
    mfu,
    peak_memory_mb,
    plot_metrics,
)
from gpt2_triton.training.report import Report, fallback_line, header_lines, summary_lines
from gpt2_triton.training.run_dir import claim_run_dir
from gpt2_triton.training.sharding import (
    file_state,
    load_file_state,
    load_sharded_state,
    make_optimizer,
    shard_model,
    sharded_state,
    wrap_ddp,
)
from gpt2_triton.training.sinks import open_sinks
from gpt2_triton.training.step import StepSettings, autocast_context, model_loss, train_step, weights_finite


class TrainingInterrupted(Exception):
    """A SIGINT/SIGTERM stopped the run after a completed step, which was saved."""

    def __init__(self, signum: int, step: int, checkpoint, history: list):
        self.signum, self.step, self.checkpoint, self.history = signum, step, checkpoint, history
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}; "
                         f"continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports a death by signal


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, resume_from: Path | None = None,
                 kernel_fallbacks: dict | None = None, init_model=None):
        """`kernel_fallbacks`: where --kernels auto chose cfg.kernels, {op: why it runs torch} (may be empty).
        `init_model`: the GPT --init loaded, whose weights a new run starts from (a resumed one has its own)."""
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.kernel_fallbacks = kernel_fallbacks
        self.report = Report(ctx.is_main, cfg.quiet, cfg.log_every)
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float32": None}[cfg.dtype]
        self.run_dir = Path(cfg.run_dir)
        self.grad_accum = cfg.total_batch // (cfg.micro_batch * cfg.seq_len * ctx.world_size)
        self.settings = StepSettings(self.device, self.amp_dtype, self.grad_accum, cfg.grad_clip, cfg.doc_mask,
                                     ctx)  # how train_step and validate call the model
        self.stop_signal = 0  # set by StopOnSignals: SIGINT / SIGTERM
        self.step = 0
        self.best_val_loss = self.last_val_loss = None
        self.resumed_from, self.resume_changes = None, {}
        self.last_saved = self.saved_step = None
        self.metrics, self.sinks = None, []
        self.updating = self.saving = False  # in an optimizer update / in save(): an error then saves nothing
        self.completed = None  # (step, loader state, RNG states) right after the last completed update

        # the memory plan per GPU, for the header (train() has refused a run it does not fit)
        self.memory_plan, self.device_bytes = check_memory(cfg, ctx.world_size, self.device)
        torch.manual_seed(cfg.seed)
        self.model_config = model_config_of(cfg)
        self.shard = cfg.shard if ctx.is_ddp else "none"  # one process has nothing to share
        self.raw_model = GPT(self.model_config, kernels=cfg.kernels, recompute=cfg.recompute).to(self.device)
        if init_model is not None and resume_from is None:
            self.load_init(init_model)  # before sharding: the weights are whole here
        shard_model(self.raw_model, self.shard, self.amp_dtype)
        self.optimizer = make_optimizer(self.raw_model, self.shard, ctx, cfg.weight_decay, cfg.max_lr,
                                        (cfg.beta1, cfg.beta2), cfg.adam_eps, cfg.fused_adamw)
        self.optimizer.register_step_pre_hook(lambda *_: setattr(self, "updating", True))
        self.optimizer.register_step_post_hook(self.update_done)
        data_dir, pin = Path(cfg.data_dir), self.device.type == "cuda"
        try:
            self.data = gpt2_data.data_fingerprint(data_dir)
            self.train_loader = gpt2_data.DataLoader(data_dir, "train", cfg.micro_batch, cfg.seq_len, rank=ctx.rank,
                                                     world_size=ctx.world_size, seed=cfg.seed, pin_memory=pin)
            self.val_loader = None if not cfg.val_every else gpt2_data.DataLoader(  # no val split needed without
                data_dir, "val", cfg.micro_batch, cfg.seq_len, rank=ctx.rank, world_size=ctx.world_size,
                seed=cfg.seed, pin_memory=pin)
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
        if resume_from is not None:
            self.restore(resume_from)
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.model = wrap_ddp(self.model, self.shard, ctx)
        self.hellaswag_examples = self.load_hellaswag()
        self.flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.peak_flops)

    def load_init(self, source):
        """The weights of `source` (same shape) into the model; the padded vocabulary rows, which no id
        reaches, keep their initial values where the two pad to different sizes."""
        ours, theirs, vocab = self.raw_model.state_dict(), source.state_dict(), self.model_config.vocab_size
        with torch.no_grad():
            for name, tensor in ours.items():
                if tensor.shape == theirs[name].shape:
                    tensor.copy_(theirs[name])
                else:  # transformer.wte.weight and the lm_head tied to it: (padded vocab, C)
                    tensor[:vocab].copy_(theirs[name][:vocab])

    def begin(self):
        """Rank 0, once everything has been checked: start over (--overwrite), write train_config.json and
        open metrics.jsonl for appending (a resume adds a "resume" record)."""
        if not self.ctx.is_main:
            return
        if self.cfg.overwrite:
            old = run_artifacts(self.run_dir)
            for path in old:
                remove_checkpoint(path)
            if old:
                self.print(f"--overwrite: deleted the previous run in {self.run_dir} ({len(old)} files)")
        write_json_atomic(self.run_dir / "train_config.json", asdict(self.cfg))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.sinks = open_sinks(self.cfg.log_to, self.run_dir, asdict(self.cfg))
        if self.cfg.init and self.resumed_from is None:
            self.log("init", source=self.cfg.init, model_config=self.model_config.to_dict())
        if self.kernel_fallbacks:  # --kernels auto gave some op to torch on a GPU
            self.log("kernels", requested="auto", choice=self.raw_model.kernels, fallbacks=self.kernel_fallbacks)
        if self.resumed_from is not None:
            self.log("resume", step=self.step, checkpoint=str(self.resumed_from), changed=self.resume_changes)

    def log(self, kind, **fields):
        if self.metrics is not None:
            record = self.metrics.log(kind, **fields)
            for sink in self.sinks:
                sink.log(record)

    def print(self, text: str):
        self.report.print(text)

    # --- checkpoints ---
    def checkpoint_state(self, weights: bool = True) -> dict | None:
        """The full training state (all ranks call: loader positions and RNGs are gathered, ZeRO's AdamW state
        consolidated); None off rank 0. weights=False: all but the weights and AdamW state (a sharded save)."""
        loaders, rngs = gather(self.train_loader.state_dict(), self.ctx), gather(rng_state(), self.ctx)
        whole = file_state(self.raw_model, self.optimizer) if weights else None  # (model, optimizer) on rank 0
        if not self.ctx.is_main:
            return None
        return {
            **(dict(zip(("model", "optimizer"), whole)) if weights else {}),
            "shard": self.shard,
            "step": self.step,
            "loader": loaders,  # one per rank
            "rng": rngs,  # one per rank
            "world_size": self.ctx.world_size,
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.cfg),
            "kernels": self.raw_model.kernels,
            "data": self.data,  # the data fingerprint: a resume on other data is refused
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
        }

    def save(self) -> Path | None:
        if not weights_finite(self.raw_model.parameters(), self.ctx):  # never save bad weights
            raise NonFiniteError(f"step {self.step}: the weights are not finite; not saving them")
        self.saving = True  # stays set if this save fails: it is not tried again after the error
        sharded = self.shard == "full"
        state = self.checkpoint_state(weights=not sharded)
        try:
            if sharded:  # every rank writes its shard
                path = save_sharded_checkpoint(sharded_checkpoint_path(self.run_dir, self.step), state,
                                               sharded_state(self.raw_model, self.optimizer), self.ctx.rank,
                                               self.ctx.world_size)
            elif state is not None:
                path = save_checkpoint(checkpoint_path(self.run_dir, self.step), state)
        except OutOfSpaceError as e:
            raise RunError(f"step {self.step}: {e}; the previous checkpoints are intact") from None
        if state is None:
            self.saving = False
            return None
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)  # never the newest one that verifies
        self.saving = False
        self.last_saved, self.saved_step = path, self.step
        self.report.event(self.step, f"saved checkpoint {path}")
        return path

    def update_done(self, *_):
        """Optimizer post-step hook: what a save after a later error restores (see `saving_on_error`)."""
        self.updating = False
        if not self.ctx.is_ddp:  # under DDP an error ends every rank without a save
            self.completed = (self.step + 1, self.train_loader.state_dict(), rng_state())

    def save_last_completed(self) -> Path | None:
        """After an error mid-step: save the last completed step (the loader and RNGs as they were right
        after its update), unless it is saved already; None when that cannot be done safely (under DDP
        the other ranks wait in a collective; during an update the weights are half-written; a failed
        save is not retried)."""
        if self.ctx.is_ddp or self.updating or self.saving or self.completed is None:
            return None
        step, loader, rng = self.completed
        if step == self.saved_step:
            return self.last_saved
        self.step = step
        self.train_loader.load_state_dict(loader)
        set_rng_state(rng)
        return self.save()

    @contextlib.contextmanager
    def saving_on_error(self):
        """An error that ends the run mid-way saves the last completed step first, as SIGTERM does. Data
        and disk errors then end the run in one line (RunError); anything else keeps its traceback."""
        try:
            yield
        except (NonFiniteError, TrainingInterrupted):
            raise
        except Exception as e:
            self.report.close()  # end the progress bar's line before the save and the error are printed
            saved = self.save_last_completed()
            note = (f"saved step {self.step} to {saved}; fix it and continue with --resume" if saved else
                    f"last good checkpoint: {newest_verified_checkpoint(self.run_dir)}")
            if isinstance(e, (RunError, gpt2_data.DataError, OSError)):
                raise RunError(f"{e} ({note})") from None
            print(f"error after step {self.step} ({note}):", file=sys.stderr, flush=True)
            raise

    def restore(self, path: Path):
        try:
            state = load_checkpoint(path, map_location=self.device)
        except (OSError, CheckpointError) as e:
            raise ConfigError(f"--resume: {e}") from None
        self.check_resumable(path, state)
        if "sharded" in state:  # a --shard full folder, resharded into this run's mode and world size
            load_sharded_state(self.raw_model, self.optimizer, path)
        else:
            load_file_state(self.raw_model, self.optimizer, state["model"], state["optimizer"])
        # the loader's position is the same on every rank and for any world size (loader.state_dict); a rank
        # the checkpoint had not takes rank 0's RNG states
        self.train_loader.load_state_dict(state["loader"][0])
        set_rng_state(state["rng"][self.ctx.rank if self.ctx.rank < len(state["rng"]) else 0])
        self.step = state["step"]
        self.best_val_loss, self.last_val_loss = state["best_val_loss"], state["last_val_loss"]
        self.resumed_from = path
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.resume_changes.items())
        self.print(f"resumed from {path} at step {self.step}" + (f" (changed: {changed})" if changed else ""))

    def check_resumable(self, path: Path, state: dict):
        """The checkpoint was written by this same run: same model, data, batch and optimizer settings,
        as many processes, and it has steps left to take. Records which changeable fields changed."""
        needed = ("model", "optimizer", "step", "loader", "rng", "world_size", "model_config")
        missing = [k for k in needed if k not in state and not ("sharded" in state and k in ("model", "optimizer"))]
        if missing:
            raise ConfigError(f"--resume: {path} is not a training checkpoint (it lacks {', '.join(missing)})")
        model_now = self.model_config.to_dict()
        if state["model_config"] != model_now:
            diff = {k: (v, model_now.get(k)) for k, v in state["model_config"].items() if v != model_now.get(k)}
            raise ConfigError(f"--resume: {path} holds another model: " +
                              ", ".join(f"{k} {a} (now {b})" for k, (a, b) in diff.items()))
        if state.get("data", self.data)["fingerprint"] != self.data["fingerprint"]:
            then, now = state["data"], self.data
            raise ConfigError(
                f"--resume: {path.name} was trained on other data than {self.cfg.data_dir} holds now (then: train "
                f"{then['train']}, val {then['val']}; now: train {now['train']}, val {now['val']}; fingerprint "
                f"{then['fingerprint']} vs {now['fingerprint']}). Resume on the data it was trained on (prepared "
                f"with the same options), or start a new run")
        saved, now = state.get("train_config", {}), asdict(self.cfg)
        problem, self.resume_changes = resume_problems(saved, now, path.name)
        if problem:
            raise ConfigError(f"--resume: {problem}")
        if state["step"] >= self.cfg.max_steps:
            raise ConfigError(f"--resume: {path.name} is at step {state['step']}, and --max-steps is "
                              f"{self.cfg.max_steps}: nothing left to train (raise --max-steps to go on)")

    # --- evaluation ---
    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in tqdm(range(self.cfg.val_steps), desc="val", leave=False,
                      disable=None if self.ctx.is_main and not self.cfg.quiet else True):
            total += model_loss(self.model, *self.val_loader.next_batch(), self.settings).detach() / self.cfg.val_steps
        self.model.train()
        val_loss = all_reduce_mean(total, self.ctx).item()
        self.last_val_loss = val_loss
        self.best_val_loss = val_loss if self.best_val_loss is None else min(self.best_val_loss, val_loss)
        self.report.event(self.step, f"val loss {val_loss:.4f} (best {self.best_val_loss:.4f})")
        self.log("val", step=self.step, val_loss=val_loss)
        return val_loss

    def load_hellaswag(self):
        if not self.cfg.hellaswag_every:
            return None
        path = Path(self.cfg.hellaswag) if self.cfg.hellaswag else hellaswag.default_path()
        if not path.is_file():
            if self.cfg.hellaswag:
                raise ConfigError(f"--hellaswag: {path} does not exist")
            self.print(f"HellaSwag: no data at {path}; skipping it (python -m gpt2_triton.hellaswag caches it)")
            return None
        try:
            return hellaswag.load_examples(path, self.cfg.hellaswag_limit)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def eval_hellaswag(self):
        result = hellaswag.evaluate_hellaswag(self.raw_model, self.hellaswag_examples, self.device,
                                              self.ctx.rank, self.ctx.world_size, self.amp_dtype)
        self.report.event(self.step, f"HellaSwag acc_norm {result['acc_norm']:.4f}, acc {result['acc']:.4f} "
                                     f"({result['n']} examples)")
        self.log("hellaswag", step=self.step, **result)

    def sample(self) -> list[str]:
        """Rank 0, uncompiled module, fixed seed: the same prompt each time."""
        enc = get_encoding()
        prompt = torch.tensor([enc.encode(self.cfg.sample_prompt)] * self.cfg.sample_count, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(42)
        self.raw_model.eval()
        with autocast_context(self.device, self.amp_dtype):
            out = self.raw_model.generate(prompt, self.cfg.sample_tokens, temperature=1.0, top_k=50,
                                          generator=generator)
        self.raw_model.train()
        texts = [enc.decode(row.tolist()) for row in out]
        for i, text in enumerate(texts):
            self.report.event(self.step, f"sample {i}: {text!r}", detail=True)
        self.log("sample", step=self.step, text=texts)
        return texts

    def due(self, every: int) -> bool:
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.max_steps)

    # --- training ---
    def train_step(self) -> dict:
        """One optimizer step (`step.train_step`, the same on every rank) and its record."""
        cfg = self.cfg
        t0 = time.time()
        lr = cosine_lr(self.step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps,
                       cfg.lr_decay_steps)
        loss, grad_norm = train_step(self.model, self.optimizer, self.train_loader.next_batch, self.settings, lr,
                                     self.step + 1)
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
        whole = self.shard != "full"  # sharded weights: evaluate and sample the saved checkpoint instead
        if whole and self.hellaswag_examples and self.due(cfg.hellaswag_every):
            self.eval_hellaswag()
        if whole and self.ctx.is_main and cfg.sample_count and self.due(cfg.sample_every):
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
        for line in config_warnings(cfg):
            self.print(line)
        if cfg.init and self.step == 0:
            self.print(f"init: weights from {cfg.init}; a new run from step 1")
        if self.kernel_fallbacks:
            self.print(fallback_line(self.kernel_fallbacks))
        if self.shard == "full" and ((self.hellaswag_examples and cfg.hellaswag_every) or
                                     (cfg.sample_count and cfg.sample_every)):
            self.print("--shard full: no HellaSwag or samples during training (each rank holds a shard of the "
                       "weights); run python -m gpt2_triton.hellaswag / sample on a checkpoint folder")
        if cfg.shard != "none" and not self.ctx.is_ddp:
            self.print(f"--shard {cfg.shard}: one process holds everything; nothing to shard")
        for line in header_lines(cfg, self.raw_model.num_params(), self.raw_model.kernels, self.grad_accum,
                                 self.ctx.world_size, int(self.train_loader.sizes.sum()), self.step,
                                 kernels_auto=self.kernel_fallbacks is not None,
                                 memory=plan_line(self.memory_plan, self.device_bytes)):
            self.print(line)
        self.report.start(self.step, cfg.max_steps)
        if self.step == 0 and cfg.val_every:
            self.validate()
        history = []
        saved_at, stop = (self.step if self.resumed_from else None), 0
        while self.step < cfg.max_steps:
            try:
                record = self.train_step()
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; last good checkpoint: {newest_verified_checkpoint(self.run_dir)}") from None
            history.append(record)
            self.report.step(record)
            self.log("train", **record)
            self.after_step()
            if self.due(cfg.checkpoint_every):
                saved_at = self.step
            if self.step < cfg.max_steps and (stop := self.stop_signal_all_ranks()):
                self.print(f"{signal.Signals(stop).name}: saving step {self.step} and stopping")
                break
        self.report.close()
        if saved_at != self.step:
            self.save()
        plot = self.run_dir / "loss.png" if cfg.plot else None
        if self.ctx.is_main:
            if plot:
                plot_metrics(self.run_dir / "metrics.jsonl", plot)
            for line in summary_lines(cfg, history, self.report.elapsed(), self.last_saved, plot,
                                      signal.Signals(stop).name if stop else None):
                self.print(line)
        if stop:
            raise TrainingInterrupted(stop, self.step, latest_checkpoint(self.run_dir), history)
        return history


def prepare_data(cfg: TrainConfig) -> None:
    """(Rank 0.) Use the data folder as it is when it holds cfg.data's shards or llm.c-format shards;
    prepare cfg.data into it when it holds no complete dataset; never overwrite another dataset."""
    data_dir = Path(cfg.data_dir)
    swept = gpt2_data.sweep_data_dir(data_dir)
    if swept:
        print(f"removed {len(swept)} staging folder(s)/temp file(s) left in {data_dir} by killed prepares", flush=True)
    try:
        found = gpt2_data.load_manifest(data_dir)["source"]
    except FileNotFoundError:
        found = None
    except (ValueError, OSError) as e:
        raise ConfigError(f"data folder {data_dir}: {e}") from None
    if found == gpt2_data.LLMC_SOURCE:
        print(f"data: llm.c-format shards in {data_dir} (no manifest.json)", flush=True)
        return
    if found is not None and found != cfg.data:
        raise ConfigError(f"data folder {data_dir} holds {found!r} data, not {cfg.data!r}: pass --data {found}, "
                          f"or another --data-dir for {cfg.data!r}")
    try:
        gpt2_data.ensure_prepared(cfg.data, data_dir)
    except (ValueError, OSError, RuntimeError) as e:
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
    """A whole run in this process (or as one torchrun rank): check, set up processes, claim the run
    folder, prepare the data, build the Trainer and loop to max_steps; returns this run's per-step
    records. Raises ConfigError for bad settings, data or run folder (before anything is written),
    NonFiniteError on NaN/inf, RunError when bad data, a full disk or a stuck process ends the run
    mid-way, TrainingInterrupted after saving when a signal stopped the run."""
    init_model = None
    if cfg.init:  # its weights decide the model's shape, which check_config needs (context vs --seq-len)
        try:
            init_model = load_model(cfg.init, kernels="torch", device="cpu")
        except (OSError, ValueError, ImportError) as e:
            raise ConfigError(f"--init {cfg.init}: {e}") from None
        cfg = with_init_shape(cfg, init_model.config)
    check_config(cfg)
    ctx = setup_distributed(cfg.device, cfg.dist_timeout)
    lock = data_lock = trainer = None
    try:
        fallbacks = kernel_choice(cfg, ctx.device.type)[1]  # None: --kernels named them, not "auto"
        cfg = resolve_config(cfg, ctx.device, ctx.world_size)
        check_memory(cfg, ctx.world_size, ctx.device)  # the memory plan: refuses a run that cannot fit this GPU
        with sigterm_raises():  # until the loop's own handlers: SIGTERM cleans up as Ctrl-C does
            lock, resume_from = on_rank0(ctx, lambda: claim_run_dir(cfg)) or (None, None)
            resume_from = broadcast(resume_from, ctx)
            if ctx.device.type == "cuda":
                torch.set_float32_matmul_precision("high")
            on_rank0(ctx, lambda: prepare_data(cfg))
            try:
                data_lock = gpt2_data.read_lock(cfg.data_dir)  # prepare refuses the folder while this run reads it
            except ValueError as e:
                raise ConfigError(str(e)) from None
            trainer = Trainer(cfg, ctx, resume_from, fallbacks, init_model)
            init_model = None  # its weights are in the trainer's model now
            trainer.begin()
        with StopOnSignals(trainer, repeat_quits=not ctx.is_ddp), trainer.saving_on_error():
            history = trainer.run()
        if ctx.is_ddp:
            dist.barrier()  # every rank is done before any tears down
        return history
    except Exception as e:
        if ctx.is_ddp and is_collective_failure(e):
            cause = re.sub(r"^\[[^\]]*\] ", "", one_line(e, 200))  # gloo prefixes its source file and line
            error = RunError(
                f"rank {ctx.rank}: a collective with the other processes failed ({cause}): one of them froze (no "
                f"answer within --dist-timeout {cfg.dist_timeout:g} s) or died. Last good checkpoint: "
                f"{newest_verified_checkpoint(cfg.run_dir) if cfg.run_dir else None}; continue with --resume")
            # said before the teardown below: once one rank has failed, torchrun ends the others with a SIGTERM,
            # which can come during it
            print(f"error: {error}", file=sys.stderr, flush=True)
            error.reported = True
            raise error from None
        raise
    finally:
        if trainer is not None:
            trainer.report.close()  # an error ends the progress bar's line before it is printed
            for sink in trainer.sinks:
                sink.close()
        trainer = None  # free DDP's reducer before its process group: gloo aborts at exit otherwise
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        for held in (lock, data_lock):
            if held is not None:
                held.release()


@contextlib.contextmanager
def exit_on_errors():
    """The command line's endings: errors in the settings, data or run folder and NaN/inf stops are one
    line (exit 1); a signal exits 128 + its number after saving (130 Ctrl-C, 143 SIGTERM)."""
    try:
        yield
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except RunError as e:
        raise SystemExit(1 if e.reported else f"error: {e}") from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
