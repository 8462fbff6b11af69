"""Checkpoints: atomic save, clear-error load, the latest in a run folder, and `load_model(init)`.

A training checkpoint is a plain dict (see train.py): model and optimizer state, step, data-loader
position, RNG states, the model/train configs, the kernels choice and val losses. Everything in it
loads with `torch.load(weights_only=True)`.

A run folder belongs to one run: its checkpoints, `train_config.json`, `metrics.jsonl` and
`loss.png` (`run_artifacts`), guarded while the run lives by a FolderLock on `RUN_LOCK`.
"""
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from gpt2_triton.atomic import atomic_write
from gpt2_triton.hf import from_pretrained
from gpt2_triton.model import GPT, GPTConfig

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
RUN_LOCK = ".lock"  # a FolderLock: held by the (rank-0) process of the live run
RUN_FILES = ("train_config.json", "metrics.jsonl", "loss.png")


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:06d}.pt"


def save_checkpoint(path, state: dict) -> Path:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a kill at any point
    leaves either the old file or the new one, never a half-written `path`."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"load_checkpoint: {path} is corrupt or not a checkpoint "
                           f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise RuntimeError(f"load_checkpoint: {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def list_checkpoints(run_dir) -> list[Path]:
    """`ckpt_<step>.pt` files in run_dir, oldest step first (temp files never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_file() and (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def run_artifacts(run_dir) -> list[Path]:
    """The files that show `run_dir` holds a run: checkpoints, train_config.json, metrics.jsonl, loss.png."""
    run_dir = Path(run_dir)
    return list_checkpoints(run_dir) + [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()]


def prune_checkpoints(run_dir, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns the deleted paths."""
    if keep < 1:
        return []
    old = list_checkpoints(run_dir)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


# --- RNG states -----------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG training touches (python, numpy, torch CPU, CUDA) as plain Python values: they
    pickle anywhere (e.g. dist.all_gather_object) and load with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *(v.item() if hasattr(v, "item") else v for v in np_state[2:])),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _as_tuples(x):
    """random.setstate wants tuples; a round trip through some serialisers gives lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- models ---------------------------------------------------------------------------------------
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_from_checkpoint(state: dict, kernels=None, device="cpu"):
    """A GPT built from a training checkpoint dict (its kernels choice unless `kernels` is given)."""
    missing = [k for k in ("model", "model_config") if k not in state]
    if missing:
        raise ValueError(f"load_model: checkpoint lacks {missing}; not a gpt2-triton training checkpoint")
    model = GPT(GPTConfig(**state["model_config"]), kernels=kernels or state.get("kernels", "torch"))
    model.load_state_dict(state["model"])
    return model.to(device)


def load_model(init, kernels="torch", device="cpu"):
    """A GPT from `init`: a HF name (`gpt2`, `gpt2-medium`, ...), a HF `save_pretrained` folder
    (has config.json), one of our checkpoint files, or a run folder (its latest checkpoint)."""
    path = Path(init)
    if path.is_file():
        model = model_from_checkpoint(load_checkpoint(path), kernels, device)
    elif path.is_dir() and latest_checkpoint(path) is not None:
        model = model_from_checkpoint(load_checkpoint(latest_checkpoint(path)), kernels, device)
    elif path.is_dir() and (path / "config.json").is_file():
        model = from_pretrained(str(path), kernels=kernels).to(device)
    elif path.is_dir():
        raise FileNotFoundError(f"load_model: {path} has neither ckpt_<step>.pt files nor config.json (HF)")
    elif os.sep in str(init) or str(init).endswith(".pt"):
        raise FileNotFoundError(f"load_model: {init} does not exist")
    else:
        model = from_pretrained(str(init), kernels=kernels).to(device)
    return model.eval()
