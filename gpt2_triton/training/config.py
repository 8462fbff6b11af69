"""The training configuration: `TrainConfig` (every field is a `train.py` flag, its metadata the flag's
help and valid range), the presets, parsing and every check that needs neither data nor devices."""
import argparse
import json
import math
import operator
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

from gpt2_triton import data as gpt2_data
from gpt2_triton.atomic import folder_write_problem
from gpt2_triton.model.config import PRESETS as MODEL_PRESETS
from gpt2_triton.model.config import GPTConfig
from gpt2_triton.model.ops import auto_kernels, kernels_spec, resolve_kernels, triton_unusable
from gpt2_triton.training.distributed import wants_cuda
from gpt2_triton.training.errors import ConfigError
from gpt2_triton.training.sinks import sinks_problem

USAGE = """Train GPT-2 on CPU, one GPU, or several with DDP (build-nanogpt's recipe).

    python train.py                               # demo on CPU, gpt2-124m on a GPU
    python train.py --preset demo --max-steps 50
    torchrun --nproc_per_node=8 train.py --preset gpt2-124m --micro-batch 32
    python train.py --preset demo --resume        # continue from the latest checkpoint in the run folder
    python train.py --config run.toml --max-steps 50   # settings from a file; flags override it
    python train.py --init gpt2 --run-dir runs/ft      # fine-tune: a new run from GPT-2's weights

Every TrainConfig field is a flag (`--micro-batch 8`, `--no-compile`, ...); a preset is a partial
override of the defaults, a --config file (TOML, `micro_batch = 8`, or a run's own train_config.json, to
repeat that run) overrides the preset, and flags override the file.

A run folder belongs to one run: a new run refuses a folder that holds one (continue it with
--resume, or start over with --overwrite), and a second train.py refuses a folder in use.
Ctrl-C or SIGTERM: finish the step, save a checkpoint, exit 130 / 143.
"""


# What --resume does with a field: the policy every TrainConfig field declares (tests check that each does).
RESUME_POLICIES = {
    "model": "decides the model: checked through the checkpoint's GPTConfig",
    "fixed": "must equal the checkpoint's (the run would train otherwise than it did)",
    "may_change": "a resumed run may change it (length, evaluation, logging, how it runs)",
    "ignored": "how the run is named and started",
}


def opt(default, help: str, *, resume: str, **check):
    """A TrainConfig field: its default, its --help text, what a resume does with it (RESUME_POLICIES) and its
    valid range (ge / gt / le / lt bounds, `choices`, `inf_ok` for floats that may be inf)."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"opt: resume must be one of {', '.join(RESUME_POLICIES)}; got {resume!r}")
    return field(default=default, metadata={"help": help, "resume": resume, **check})


@dataclass(frozen=True)
class TrainConfig:
    preset: str | None = opt(None, "demo | gpt2-124m | gpt2-350m | gpt2-774m | gpt2-1558m; none given: demo on a "
                                   "CPU, gpt2-124m on a GPU", resume="ignored")
    # model: a GPTConfig preset, with optional overrides (None keeps the preset's value)
    model: str = opt("gpt2", "GPTConfig preset the model starts from", choices=tuple(MODEL_PRESETS), resume="model")
    block_size: int | None = opt(None, "context length (learned position embeddings); none: the model preset's",
                                 ge=1, resume="model")
    vocab_size: int | None = opt(None, "vocabulary size; none: the model preset's (50257)", ge=1, resume="model")
    n_layer: int | None = opt(None, "transformer blocks; none: the model preset's", ge=1, resume="model")
    n_head: int | None = opt(None, "attention heads; none: the model preset's", ge=1, resume="model")
    n_embd: int | None = opt(None, "model width; none: the model preset's", ge=1, resume="model")
    pad_vocab_to: int = opt(128, "round the embedding table up to a multiple of this (50257 -> 50304)", ge=1,
                            resume="model")
    init: str | None = opt(None, "start this new run from trained weights: an HF name (gpt2, gpt2-medium, ...), a "
                                 "save_pretrained folder, a checkpoint or a run folder (its newest good checkpoint); "
                                 "the model's shape (layers, heads, width, context, vocabulary) is theirs; "
                                 "none: random weights", resume="fixed")
    kernels: str = opt("auto", "auto (Triton on CUDA, each op whose Triton path cannot run there on torch; torch "
                               "on a CPU) | torch | triton | op=impl,... (ops: attention, layer_norm, gelu_mlp, "
                               "cross_entropy, linear, embedding)", resume="may_change")
    doc_mask: bool = opt(False, "document masking: a token attends only to earlier tokens of its own document "
                                "(documents begin at the EOT token), in training and validation", resume="fixed")
    # data
    data: str = opt("fineweb-edu", "pystdlib | fineweb-edu | text:PATH (a .txt/.jsonl file or a folder of them); "
                                   "with --data-dir, the source named in its manifest", resume="fixed")
    data_dir: str | None = opt(None, "token shards (prepared here if missing), or an llm.c shard folder; "
                                     "none: $GPT2_DATA_DIR/<data>, i.e. data/<data>", resume="may_change")
    seq_len: int = opt(1024, "tokens per sequence", ge=1, resume="fixed")
    micro_batch: int = opt(64, "sequences per forward pass, per process", ge=1, resume="fixed")
    total_batch: int | None = opt(524288, "tokens per optimizer step, by gradient accumulation; "
                                          "none: one micro-batch per process", ge=1, resume="fixed")
    # optimisation
    max_steps: int = opt(19073, "optimizer steps to train for", ge=1, resume="may_change")
    lr_decay_steps: int | None = opt(None, "the cosine decay ends at this step (more than max_steps: stop early "
                                           "on a longer schedule); none: max_steps", ge=1, resume="may_change")
    warmup_steps: int = opt(715, "linear learning-rate warmup steps", ge=0, resume="fixed")
    max_lr: float = opt(6e-4, "peak learning rate", gt=0, resume="fixed")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of max_lr", ge=0, le=1, resume="fixed")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)", ge=0, resume="fixed")
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1, resume="fixed")
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1, resume="fixed")
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0, resume="fixed")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (inf: no clipping)", gt=0, inf_ok=True,
                           resume="fixed")
    fused_adamw: bool | None = opt(None, "fused AdamW; none: on CUDA", resume="may_change")
    # runtime
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", resume="may_change")
    dtype: str = opt("auto", "auto (bfloat16 autocast on CUDA, float32 on CPU) | bfloat16 | float32",
                     choices=("auto", "bfloat16", "float32"), resume="may_change")
    compile: bool | None = opt(None, "torch.compile the model; none: on CUDA, off on CPU", resume="may_change")
    shard: str = opt("none", "none (DDP: every process holds all weights, grads and AdamW state) | optimizer "
                             "(ZeRO-1: AdamW state sharded over processes) | full (FSDP2: weights, grads and AdamW "
                             "state sharded per Block)", choices=("none", "optimizer", "full"), resume="may_change")
    recompute: str = opt("none", "activation recompute in backward: none | gelu (the MLP's GELU input) | block "
                                 "(each Block, by torch.utils.checkpoint)", choices=("none", "gelu", "block"),
                         resume="may_change")
    seed: int = opt(1337, "seed of the initial weights, the data order and the samples", ge=0, resume="fixed")
    dist_timeout: float = opt(300.0, "seconds a DDP process waits at a collective for the others before the run "
                                     "stops (a frozen or dead rank)", gt=0, le=86400, resume="may_change")
    # evaluation, logging, checkpoints (an interval of 0 turns it off; the last step always counts)
    val_every: int = opt(250, "validate every N steps (0: never)", ge=0, resume="may_change")
    val_steps: int = opt(20, "micro-batches per validation", ge=1, resume="may_change")
    hellaswag_every: int = opt(250, "HellaSwag every N steps (0: never)", ge=0, resume="may_change")
    hellaswag: str | None = opt(None, "hellaswag_val.jsonl; none: the cached file if present", resume="may_change")
    hellaswag_limit: int | None = opt(None, "score only the first N HellaSwag examples; none: all", ge=1,
                                      resume="may_change")
    sample_every: int = opt(250, "print samples every N steps (0: never)", ge=0, resume="may_change")
    sample_count: int = opt(4, "samples each time", ge=0, resume="may_change")
    sample_tokens: int = opt(32, "new tokens per sample", ge=1, resume="may_change")
    sample_prompt: str = opt("Hello, I'm a language model,", "the text every sample continues (the demo, trained "
                                                            "on Python code, starts a line of Python)",
                             resume="may_change")
    checkpoint_every: int = opt(5000, "save a checkpoint every N steps (0: only at the end)", ge=0, resume="may_change")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints", ge=1, resume="may_change")
    run_dir: str | None = opt(None, "run folder (config, metrics, plot, checkpoints); none: runs/<preset>",
                              resume="ignored")
    resume: str | None = opt(None, "continue a run: the latest checkpoint in the run folder (no value) "
                                   "or a checkpoint path", resume="ignored")
    overwrite: bool = opt(False, "start a new run in a run folder that holds one, deleting its checkpoints, "
                                 "metrics and config", resume="ignored")
    peak_flops: float | None = opt(None, "bf16 peak FLOP/s of one device, for MFU; none: from the table of "
                                         "known GPUs", gt=0, resume="may_change")
    plot: bool = opt(True, "write loss.png at the end", resume="may_change")
    log_every: int = opt(1, "print a step line every N steps, and this process's first and the last step "
                            "(on a terminal a progress bar shows every step)", ge=1, resume="may_change")
    quiet: bool = opt(False, "no step lines, progress bar or samples: only the header, evaluations, checkpoints "
                             "and the closing summary", resume="may_change")
    log_to: str = opt("", "also log every metrics.jsonl record to: tensorboard, wandb (comma-separated; each "
                          "must be installed; W&B offline unless WANDB_MODE=online)", resume="may_change")


PRESETS = {
    "gpt2-124m": dict(  # build-nanogpt: 10B tokens of FineWeb-Edu in 19,073 steps of 0.5M tokens
        model="gpt2", pad_vocab_to=128, data="fineweb-edu", seq_len=1024, micro_batch=64, total_batch=524288,
        max_steps=19073, warmup_steps=715, max_lr=6e-4, min_lr_ratio=0.1, weight_decay=0.1,
        val_every=250, val_steps=20, hellaswag_every=250, sample_every=250, checkpoint_every=5000,
    ),
    # llm.c's GPT-2 reproductions (scripts/run_gpt2_{350M,774M,1558M}.sh): -b micro_batch, -t seq_len,
    # -d total_batch, -l max_lr, -q min_lr_ratio, -u warmup_steps, -x max_steps, -c weight_decay, -n checkpoints
    "gpt2-350m": dict(  # 31.5B tokens in 60,000 steps of 0.5M tokens
        model="gpt2-medium", pad_vocab_to=128, data="fineweb-edu", seq_len=1024, micro_batch=64, total_batch=524288,
        max_steps=60000, warmup_steps=700, max_lr=3e-4, min_lr_ratio=0.0, weight_decay=0.1,
        val_every=250, val_steps=20, hellaswag_every=250, sample_every=250, checkpoint_every=2000,
    ),
    "gpt2-774m": dict(  # 150B tokens in 286,102 steps of 0.5M tokens
        model="gpt2-large", pad_vocab_to=128, data="fineweb-edu", seq_len=1024, micro_batch=32, total_batch=524288,
        max_steps=286102, warmup_steps=700, max_lr=2.5e-4, min_lr_ratio=0.0, weight_decay=0.1,
        val_every=250, val_steps=20, hellaswag_every=250, sample_every=250, checkpoint_every=4000,
    ),
    "gpt2-1558m": dict(  # 33.6B tokens in 32,000 steps of 1M tokens
        model="gpt2-xl", pad_vocab_to=128, data="fineweb-edu", seq_len=1024, micro_batch=16, total_batch=1048576,
        max_steps=32000, warmup_steps=700, max_lr=6e-4, min_lr_ratio=0.1, weight_decay=0.1,
        val_every=250, val_steps=20, hellaswag_every=250, sample_every=250, checkpoint_every=2000,
    ),
    "demo": dict(  # ~3 minutes on 2 CPU cores, data prep included
        model="gpt2", block_size=128, n_layer=4, n_head=4, n_embd=128, data="pystdlib", seq_len=128,
        micro_batch=8, total_batch=None, max_steps=200, warmup_steps=20, max_lr=3e-3,
        val_every=50, val_steps=5, hellaswag_every=0, sample_every=100, sample_count=2, sample_tokens=32,
        sample_prompt="def ",
        checkpoint_every=100, log_every=10,
    ),
}


def fields_resumed(policy: str) -> tuple:
    """The TrainConfig fields with this resume policy, in declaration order."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["resume"] == policy)


MODEL_FIELDS = fields_resumed("model")  # "model" (the preset) first, then its overrides
RESUME_MAY_CHANGE = fields_resumed("may_change")
INIT_SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")  # what --init's weights decide



# --- configuration --------------------------------------------------------------------------------
def _field_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


# A field's range in its metadata: key -> (test, how --help and errors write it).
BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


def _is_optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def flag_name(name: str) -> str:
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


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=USAGE, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="settings from a TOML file (TrainConfig field names: micro_batch = 8) or a run's "
                             "train_config.json; they override the preset, flags override them")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, kind = flag_name(f.name), _field_type(hints[f.name])
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
        preset = "gpt2-124m" if wants_cuda(overrides.get("device", "auto")) else "demo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(TrainConfig(), **{**PRESETS[preset], **overrides, "preset": preset})


def read_config_file(path) -> dict:
    """{field: value} from a TOML file or a run's train_config.json (keys are TrainConfig fields, `-` or `_`).
    ConfigError for a file that cannot be read or parsed, or a key that is no field."""
    path, is_json = Path(path), str(path).endswith(".json")
    if not is_json and tomllib is None:
        raise ConfigError(f"--config {path}: reading TOML needs Python 3.11 (tomllib); use a JSON file")
    try:
        text = path.read_text()
        settings = json.loads(text) if is_json else tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError
        raise ConfigError(f"--config {path}: not valid {'JSON' if is_json else 'TOML'} ({e})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--config {path}: expected a table of settings; got {type(settings).__name__}")
    settings = {key.replace("-", "_"): value for key, value in settings.items()}
    unknown = sorted(set(settings) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"--config {path}: {', '.join(map(repr, unknown))} "
                          f"{'is not a setting' if len(unknown) == 1 else 'are not settings'} (see train.py --help)")
    return settings


def parse_config(argv=None, prog: str = "train.py") -> TrainConfig:
    given = vars(build_parser(prog).parse_args(argv))
    config_file = given.pop("config", None)
    given = {**(read_config_file(config_file) if config_file else {}), **given}
    preset = given.pop("preset", None)
    if preset is None:
        device = given.get("device", "auto")
        chosen = "gpt2-124m" if wants_cuda(device) else "demo"
        why = f"--device {device}" if device != "auto" else "CUDA found" if chosen == "gpt2-124m" else "no CUDA"
        print(f"no --preset given: using {chosen!r} ({why})")
    return make_config(preset, **given)


def _range_problem(f, value, annotation) -> str | None:
    """Why `value` is not valid for field `f`, or None."""
    meta, flag = f.metadata, flag_name(f.name)
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


def resume_problems(saved: dict, now: dict, where: str = "the checkpoint") -> tuple:
    """(why settings `now` cannot resume a checkpoint trained with `saved`, in one line, or None; {field: (then,
    now)} of the fields the resume changes). Fields the checkpoint does not know (added since) pass."""
    policy = {f.name: f.metadata["resume"] for f in fields(TrainConfig)}
    differ = [k for k in now if k in saved and policy.get(k) == "fixed" and saved[k] != now[k]]
    changes = {k: (saved[k], now[k]) for k in now
               if k in saved and policy.get(k) == "may_change" and saved[k] != now[k]}
    if not differ:
        return None, changes
    return (f"this run differs from {where} in " +
            ", ".join(f"{flag_name(k)} ({saved[k]} in the checkpoint, {now[k]} now)" for k in differ) +
            f". A resumed run may change only {', '.join(flag_name(k) for k in RESUME_MAY_CHANGE)}; "
            f"to train with other settings, start a new run in another --run-dir"), changes


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
        kernels = None if cfg.kernels == "auto" else resolve_kernels(cfg.kernels)
        model_config = model_config_of(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    problem = kernels and triton_unusable(kernels, "cuda" if wants_cuda(cfg.device) else "cpu")
    if problem:  # fail here, not deep inside
        raise ConfigError(f"--kernels {cfg.kernels}: {problem}")
    if problem := sinks_problem(cfg.log_to):
        raise ConfigError(problem)
    if cfg.seq_len > model_config.block_size:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's block size {model_config.block_size}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in the run folder and --overwrite deletes it: pick one")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_file():
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file")
    if cfg.hellaswag and not Path(cfg.hellaswag).is_file():
        raise ConfigError(f"--hellaswag {cfg.hellaswag}: no such file")
    if cfg.run_dir and (problem := folder_write_problem(cfg.run_dir)):
        raise ConfigError(f"--run-dir {cfg.run_dir}: {problem}")
    if cfg.data_dir and Path(cfg.data_dir).exists() and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"--data-dir {cfg.data_dir}: not a folder")
    if cfg.data_dir and not Path(cfg.data_dir).exists() and (problem := folder_write_problem(cfg.data_dir)):
        raise ConfigError(f"--data-dir {cfg.data_dir}: {problem}")  # an existing one may be read-only if prepared


def with_init_shape(cfg: TrainConfig, source: GPTConfig) -> TrainConfig:
    """cfg with the model shape of --init's weights (the preset's and flags' shape give way to them)."""
    if source.layer_norm_eps != GPTConfig.layer_norm_eps:
        raise ConfigError(f"--init {cfg.init}: its LayerNorm epsilon is {source.layer_norm_eps}; train.py builds "
                          f"models with {GPTConfig.layer_norm_eps}")
    return replace(cfg, **{name: getattr(source, name) for name in INIT_SHAPE})


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that run but are likely not what was meant: one line each, for the run to print."""
    warnings = []
    if cfg.warmup_steps > cfg.max_steps:
        peak = cfg.max_lr * cfg.max_steps / cfg.warmup_steps
        warnings.append(f"warning: --warmup-steps {cfg.warmup_steps} exceeds --max-steps {cfg.max_steps}: the learning "
                        f"rate never reaches --max-lr {cfg.max_lr:.2e} (it ends at {peak:.2e}, still warming up)")
    return warnings


def kernel_choice(cfg: TrainConfig, device_type: str) -> tuple[str, dict | None]:
    """The --kernels value a run on `device_type` uses and, where cfg.kernels is "auto", {op: why it runs
    torch though Triton was wanted} (empty when none falls back); None where the kernels were named."""
    if cfg.kernels != "auto":
        return cfg.kernels, None
    choice, fallbacks = auto_kernels(model_config_of(cfg), device_type)
    return kernels_spec(choice), fallbacks


def resolve_config(cfg: TrainConfig, device: torch.device, world_size: int) -> TrainConfig:
    """Every "auto"/None that depends on the machine made concrete: this is what gets printed and saved."""
    on_cuda = device.type == "cuda"
    tokens_per_micro_step = cfg.micro_batch * cfg.seq_len * world_size
    total = cfg.total_batch or tokens_per_micro_step
    if total % tokens_per_micro_step:
        raise ConfigError(f"--total-batch {total} must be a multiple of micro_batch x seq_len x processes "
                          f"= {cfg.micro_batch} x {cfg.seq_len} x {world_size} = {tokens_per_micro_step}")
    return replace(
        cfg,
        device=str(device),
        kernels=kernel_choice(cfg, device.type)[0],
        dtype=cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_cuda else "float32"),
        compile=on_cuda if cfg.compile is None else cfg.compile,
        fused_adamw=on_cuda if cfg.fused_adamw is None else cfg.fused_adamw,
        total_batch=total,
        lr_decay_steps=cfg.lr_decay_steps or cfg.max_steps,
        run_dir=cfg.run_dir or str(Path("runs") / cfg.preset),
        data_dir=cfg.data_dir or str(gpt2_data.default_data_dir(cfg.data)),
    )

