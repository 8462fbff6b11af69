"""Checkpoints: atomic save with a checksum, verified load, the latest in a run folder, and `load_model(init)`.

A training checkpoint is a plain dict (see training/trainer.py): model and optimizer state, step, data-loader
position, RNG states, the model/train configs, the kernels choice, the data fingerprint, val losses and
`checksum`, a SHA-256 of everything else in it (each tensor's dtype, shape and bytes; every other
value). Every load checks it, so a file changed after it was saved is refused, not trained on.
Everything in it loads with `torch.load(weights_only=True)`.

Under `--shard full` a checkpoint is a folder `ckpt_<step>.dcp`: every rank's shard of the weights and AdamW
state as `torch.distributed.checkpoint` writes them, and `train_state.pt` (the rest of the dict, with the
SHA-256 of every file of the folder, under its own checksum). It is built in a hidden temp folder and renamed
into place when complete, so a save cut short is never taken for a checkpoint.

A run folder belongs to one run: its checkpoints, `train_config.json`, `metrics.jsonl` and
`loss.png` (`run_artifacts`), guarded while the run lives by a FolderLock on `RUN_LOCK`.
"""
import contextlib
import hashlib
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from gpt2_triton.atomic import TEMP_PATTERN, atomic_write, fsync_dir, remove_stale_temp_folders, temp_folder
from gpt2_triton.hf import from_pretrained
from gpt2_triton.messages import one_line
from gpt2_triton.model import GPT, GPTConfig

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
SHARDED_PATTERN = re.compile(r"^ckpt_(\d+)\.dcp$")  # --shard full: a torch.distributed.checkpoint folder
SHARDED_META = "train_state.pt"  # in it: everything but the weights and AdamW state, and each file's SHA-256
RUN_LOCK = ".lock"  # a FolderLock: held by the (rank-0) process of the live run
RUN_FILES = ("train_config.json", "metrics.jsonl", "loss.png")
CHECKSUM_KEY = "checksum"  # "sha256:<hex>" of every other entry of the checkpoint


class CheckpointError(ValueError):
    """Not a usable checkpoint: unreadable, changed since it was saved (checksum), or not one of ours."""


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:06d}.pt"


def _digest(state: dict) -> tuple[str, int]:
    """(checksum of every entry but CHECKSUM_KEY, bytes of tensor data in it)."""
    h, nbytes = hashlib.sha256(), 0

    def feed(obj):
        nonlocal nbytes
        if isinstance(obj, torch.Tensor):
            data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            h.update(f"T{obj.dtype}{tuple(obj.shape)}:".encode())
            h.update(data.numpy())
            nbytes += data.numel()
        elif isinstance(obj, dict):  # keys in a fixed order: optimizer state keys are ints, others strings
            h.update(f"d{len(obj)}:".encode())
            for key in sorted(obj, key=repr):
                feed(key)
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"{'l' if isinstance(obj, list) else 't'}{len(obj)}:".encode())
            for value in obj:
                feed(value)
        elif obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
            text = repr(obj)
            h.update(f"{type(obj).__name__}{len(text)}:{text}".encode())
        else:
            raise TypeError(f"checkpoint: cannot checksum a {type(obj).__name__}; a checkpoint holds tensors, "
                            f"dicts, lists, tuples, numbers, strings and None")

    feed({k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return "sha256:" + h.hexdigest(), nbytes


def save_checkpoint(path, state: dict) -> Path:
    """torch.save `state` plus its checksum to a temp file in the same folder, fsync, then os.replace: a
    kill at any point leaves either the old file or the new one, never a half-written `path`. A full
    disk is an OutOfSpaceError naming the folder and the size needed."""
    path = Path(path)
    checksum, nbytes = _digest(state)
    with atomic_write(path, "wb", size_hint=nbytes) as f:
        torch.save({**state, CHECKSUM_KEY: checksum}, f)
    return path


def _checksum_problem(state: dict) -> str | None:
    """Why `state` fails its checksum, or None (also None for a checkpoint saved before checksums)."""
    saved = state.get(CHECKSUM_KEY)
    if saved is None:
        return None
    try:
        actual, _ = _digest(state)
    except TypeError as e:
        return str(e)
    if actual != saved:
        return "its contents do not match the checksum saved with it (the file changed after it was saved)"
    return None


def _read(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        text = str(e)  # weights_only's refusal: keep its finding, not its advice to turn weights_only off
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: "
                              f"{one_line(text)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict at `path`, its checksum verified. CheckpointError (one line, naming the file) for
    a file that is unreadable or fails its checksum; one saved before checksums loads with a note.
    A sharded folder: its train_state.pt and "sharded": its path (the weights and AdamW state stay in the
    folder: `training.sharding.load_sharded_state` / `load_sharded_weights` read them)."""
    path = Path(path)
    if path.is_dir():
        return {**_sharded_meta(path, map_location), "sharded": str(path)}
    state = _read(path, map_location)
    problem = _checksum_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
    if CHECKSUM_KEY not in state:
        print(f"note: {path} has no checksum (saved by an earlier version); loading it unverified",
              file=sys.stderr, flush=True)
    return state


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint at `path` cannot be used (unreadable, or fails its checksum), or None. Reads
    the file through mmap and keeps nothing."""
    if Path(path).is_dir():
        return _sharded_problem(Path(path))
    try:
        return _checksum_problem(_read(Path(path), mmap=True))
    except (CheckpointError, OSError) as e:
        return str(e)


def list_checkpoints(run_dir) -> list[Path]:
    """`ckpt_<step>.pt` files and `ckpt_<step>.dcp` folders in run_dir, oldest step first (temp files and
    folders never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (p.is_file() and (m := CKPT_PATTERN.match(p.name)))
             or (p.is_dir() and not p.is_symlink() and (m := SHARDED_PATTERN.match(p.name)))]
    return [p for _, p in sorted(found)]


def remove_checkpoint(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sharded_checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:06d}.dcp"


def save_sharded_checkpoint(path, meta: dict | None, shards: dict, rank: int, world_size: int) -> Path | None:
    """Every rank calls (a collective): `shards` ({"model", "optimizer"}: this rank's, by name) through
    torch.distributed.checkpoint into a temp folder that rank 0 made; rank 0 adds `meta` (the rest of the
    training checkpoint) with every file's SHA-256 as train_state.pt and renames the folder to `path`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    with temp_folder(path.parent, path.name) if rank == 0 else contextlib.nullcontext() as tmp:
        holder = [str(tmp) if tmp else None]
        dist.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])
        dcp.save(shards, checkpoint_id=str(tmp))
        mine = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.name.startswith(f"__{rank}_")}
        digests = [None] * world_size
        dist.all_gather_object(digests, mine)
        if rank == 0:
            files = {k: v for d in digests for k, v in d.items()}
            files[".metadata"] = _file_digest(tmp / ".metadata")
            save_checkpoint(tmp / SHARDED_META, {**meta, "files": files, "world_size": world_size})
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        dist.barrier()  # no rank goes on (or prunes) before the folder is in place
    return path if rank == 0 else None


def load_sharded_weights(model, path) -> None:
    """A sharded folder's weights into a whole model in this process (sample, export, HellaSwag, --init)."""
    import torch.distributed.checkpoint as dcp
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what no_dist asks
        warnings.filterwarnings("ignore", r"torch\.distributed is .*uninitialized")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)  # this process reads it all, whoever wrote it
    model.load_state_dict(state["model"])


def _sharded_meta(path: Path, map_location="cpu") -> dict:
    """The train_state.pt of the checkpoint folder at `path`, verified, once every file it lists is there with the
    SHA-256 it had when saved; CheckpointError (or OSError) naming the problem otherwise."""
    meta = load_checkpoint(path / SHARDED_META, map_location)
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _file_digest(file) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} changed after it was saved")
    return meta


def _sharded_problem(path: Path) -> str | None:
    """Why the checkpoint folder at `path` cannot be used, or None."""
    try:
        _sharded_meta(path)
    except (CheckpointError, OSError) as e:
        return str(e)
    return None


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def newest_verified_checkpoint(run_dir, skipped=None) -> Path | None:
    """The newest checkpoint in run_dir that reads and matches its checksum (None if none does). Each
    newer one that fails is appended to `skipped` as (path, why)."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
    return None


def run_artifacts(run_dir) -> list[Path]:
    """The files that show `run_dir` holds a run: checkpoints, train_config.json, metrics.jsonl, loss.png."""
    run_dir = Path(run_dir)
    return list_checkpoints(run_dir) + [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()]


def prune_checkpoints(run_dir, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, except the newest one that verifies when none of
    those `keep` does (so a corrupt newest file never costs the last good one); returns the deleted paths."""
    # sharded saves a kill cut short (their builder gone)
    remove_stale_temp_folders(run_dir, owns=lambda folder: bool(SHARDED_PATTERN.match(
        TEMP_PATTERN.match(folder.name)["name"])))
    ckpts = list_checkpoints(run_dir)
    if keep < 1 or len(ckpts) <= keep:
        return []
    old, kept = ckpts[:-keep], ckpts[-keep:]
    if not any(checkpoint_problem(p) is None for p in reversed(kept)):
        good = next((p for p in reversed(old) if checkpoint_problem(p) is None), None)
        if good is not None:
            old.remove(good)
    for p in old:
        remove_checkpoint(p)
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
def model_from_checkpoint(state: dict, kernels=None, device="cpu", where="checkpoint"):
    """A GPT built from a training checkpoint dict (its kernels choice unless `kernels` is given).
    CheckpointError, naming `where`, when its model_config or weights do not make a GPT."""
    missing = [k for k in ("model_config",) + (() if "sharded" in state else ("model",)) if k not in state]
    if missing:
        raise CheckpointError(f"load_model: {where} lacks {missing}; not a gpt2-triton training checkpoint")
    try:
        config = GPTConfig(**state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"load_model: {where} has a model_config that is not a GPTConfig "
                              f"({one_line(e)})") from None
    model = GPT(config, kernels=kernels or state.get("kernels", "torch"))
    if "sharded" in state:
        load_sharded_weights(model, state["sharded"])
        return model.to(device)
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"load_model: {where}: its weights do not fit its model_config ({one_line(e)})") from None
    wrong = [f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in
             (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if wrong:
        raise CheckpointError(f"load_model: {where}: its weights do not fit its model_config ({config.n_layer} "
                              f"layers): {', '.join(wrong)}")
    return model.to(device)


def _pretrained(name, kernels, device):
    """An HF model name or save_pretrained folder through transformers, any failure as one ValueError."""
    try:
        return from_pretrained(str(name), kernels=kernels).to(device)
    except (OSError, ValueError, ImportError) as e:
        what = (f"Hugging Face could not load the folder {name}" if Path(name).is_dir() else
                f"{str(name)!r} is not a checkpoint, run folder or HF folder here, and Hugging Face could not "
                f"load it as a model name")
        raise ValueError(f"load_model: {what} ({one_line(e)})") from None


def load_model(init, kernels="torch", device="cpu"):
    """A GPT from `init`: a HF name (`gpt2`, `gpt2-medium`, ...), a HF `save_pretrained` folder
    (has config.json), one of our checkpoint files, or a run folder (its newest checkpoint that
    verifies, with a note for each newer one skipped). A bare name that is a local folder holding
    neither (say the `gpt2/` of a source tree) is taken as the HF name, with a note. Raises
    FileNotFoundError or ValueError (CheckpointError for a bad checkpoint), in one line."""
    path = Path(init)
    if path.is_file() or (path.is_dir() and SHARDED_PATTERN.match(path.name)):  # a file, or a sharded folder
        model = model_from_checkpoint(load_checkpoint(path), kernels, device, where=path)
    elif path.is_dir() and list_checkpoints(path):
        skipped = []
        ckpt = newest_verified_checkpoint(path, skipped)
        for bad, why in skipped:
            print(f"note: skipping {bad}: {why}", file=sys.stderr, flush=True)
        if ckpt is None:
            raise CheckpointError(f"load_model: no checkpoint in {path} verifies: {skipped[0][1]}")
        model = model_from_checkpoint(load_checkpoint(ckpt), kernels, device, where=ckpt)
    elif path.is_dir() and (path / "config.json").is_file():
        model = _pretrained(path, kernels, device)
    elif path.is_dir() and not _is_path_like(init):
        print(f"note: ./{init} is a folder without ckpt_<step>.pt files or config.json, so {str(init)!r} is "
              f"taken as a Hugging Face model name", file=sys.stderr, flush=True)
        model = _pretrained(init, kernels, device)
    elif path.is_dir():
        raise FileNotFoundError(f"load_model: {path} has neither ckpt_<step>.pt files nor config.json (HF)")
    elif _is_path_like(init):
        raise FileNotFoundError(f"load_model: {init} does not exist")
    else:
        model = _pretrained(init, kernels, device)
    return model.eval()


def _is_path_like(init) -> bool:
    """Written as a path (a separator, a leading '.', a .pt file), not as an HF model name."""
    text = str(init)
    return os.sep in text or text.startswith(".") or text.endswith(".pt")
