"""prepare: tokenise a source in worker processes and publish its shards into a data folder."""
import hashlib
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2_triton.atomic import (
    TEMP_PATTERN,
    DirLock,
    FolderLock,
    folder_write_problem,
    fsync_dir,
    remove_stale_temps,
    write_json_atomic,
)
from gpt2_triton.data.manifest import is_prepared, new_manifest, read_manifest_file, summary
from gpt2_triton.data.shards import (
    MANIFEST,
    MAX_SHARD_TOKENS,
    PREPARE_LOCK,
    SHARD_NAME,
    SPLITS,
    STAGING_PREFIX,
    ShardWriter,
)
from gpt2_triton.data.sources import SOURCE_DEFAULTS, source_documents, source_kind
from gpt2_triton.tokenizer import EOT_ID, get_encoding


def tokenize_document(text: str) -> np.ndarray:
    """<|endoftext|> followed by the document's tokens, as uint16 (special tokens in the text stay text)."""
    tokens = [EOT_ID] + get_encoding().encode_ordinary(text)
    return np.array(tokens, dtype=np.uint16)


def tokenized(docs, workers: int, chunksize: int = 16):
    """Yield each document's tokens in order, tokenised by `workers` spawned processes (0/1: here).
    Documents go to the pool in blocks, so a fast source never queues the whole corpus in memory."""
    if workers <= 1:
        yield from map(tokenize_document, docs)
        return
    docs, block = iter(docs), workers * chunksize * 16
    with mp.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
        while chunk := list(itertools.islice(docs, block)):
            yield from pool.imap(tokenize_document, chunk, chunksize=chunksize)


def _ignore_sigint():
    """Tokeniser workers leave Ctrl-C to the main process, which stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_documents(docs, out_dir, source: str = "custom", shard_tokens: int = 10_000_000,
                      val_every: int = 50, val_tokens=None, workers=None, verbose: bool = True) -> Path:
    """Tokenise an iterable of document strings into train/val shards in `out_dir` (see the module
    docstring for the split rule); write the manifest last. Returns `out_dir`.

    The shards are written into a staging folder and moved in only when all went well: an error
    leaves a folder that was prepared before exactly as it was. Waits while another process
    prepares the same folder; refuses a folder that is not ours or that a live run reads."""
    out_dir = Path(out_dir)
    _check_prepare_options(shard_tokens, val_every, val_tokens)
    check_out_dir(out_dir)
    with prepare_lock(out_dir, verbose):
        return _prepare_documents_locked(docs, out_dir, source, shard_tokens, val_every, val_tokens, workers,
                                         verbose)


def _check_prepare_options(shard_tokens, val_every, val_tokens) -> None:
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS or val_every < 1 or (val_tokens is not None and val_tokens < 0):
        raise ValueError(f"prepare: need 1 <= shard_tokens <= {MAX_SHARD_TOKENS:,} (the shard header's int32 "
                         f"count), val_every >= 1, val_tokens >= 0; got {shard_tokens:,}, {val_every}, {val_tokens}")


def check_out_dir(out_dir: Path) -> None:
    """Before any work: `out_dir` can be written and holds nothing prepare may not replace (ValueError
    naming the folder otherwise)."""
    problem = folder_write_problem(out_dir)
    if problem:
        raise ValueError(f"prepare: output folder {out_dir}: {problem}")
    if out_dir.is_dir():
        _previous_shards(out_dir)


def prepare_lock(out_dir: Path, verbose: bool = True) -> FolderLock:
    """The folder's prepare lock, acquired (waiting, with a message, while another process holds it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out_dir / PREPARE_LOCK)
    if not lock.acquire():
        if verbose:
            print(f"waiting for another process preparing {out_dir} ({lock.owner()}) ...", file=sys.stderr,
                  flush=True)
        lock.acquire(blocking=True)
    return lock


def _is_ours(path: Path) -> bool:
    """A file prepare makes beside the shards: its lock, staging folders, atomic_write temps."""
    return path.name == PREPARE_LOCK or path.name.startswith(STAGING_PREFIX) or bool(TEMP_PATTERN.match(path.name))


def _previous_shards(out_dir: Path) -> set:
    """The shard files out_dir's manifest lists: the only files prepare may replace or delete there.
    ValueError for a folder that holds anything else without a manifest of ours, a manifest that is
    not one, or shard-named files the manifest does not list."""
    if (out_dir / MANIFEST).is_file():
        previous = read_manifest_file(out_dir)
        listed = {s["file"] for split in previous["splits"].values() for s in split["shards"]}
    else:
        listed = set()
        foreign = sorted(p.name for p in out_dir.iterdir() if not _is_ours(p))
        if foreign:
            raise ValueError(f"prepare: {out_dir} holds files and no {MANIFEST}, so it is not a data folder of ours "
                             f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); prepare into an "
                             f"empty or new folder")
    unlisted = sorted(p.name for p in out_dir.iterdir() if SHARD_NAME.match(p.name) and p.name not in listed)
    if unlisted:
        raise ValueError(f"prepare: {out_dir} holds {unlisted[0]}, which its {MANIFEST} does not list: a new shard "
                         f"could replace it; move it away or prepare into another folder")
    return listed


def _prepare_documents_locked(docs, out_dir: Path, source, shard_tokens, val_every, val_tokens, workers,
                              verbose) -> Path:
    workers = (os.cpu_count() or 1) if workers is None else workers
    readers = DirLock(out_dir)
    if not readers.acquire():
        raise ValueError(f"prepare: {out_dir} is being read by a live train.py; wait for it to end, or prepare "
                         f"into another folder")
    try:
        _sweep_staging(out_dir)
        previous = _previous_shards(out_dir)
        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=out_dir, ignore_cleanup_errors=True) as staging:
            manifest = _tokenize_into(docs, Path(staging), source, shard_tokens, val_every, val_tokens, workers,
                                      verbose)
            _publish(Path(staging), out_dir, manifest, previous)
    finally:
        readers.release()
    return out_dir


def _sweep_staging(out_dir: Path) -> list:
    """Remove staging folders and temp files a killed prepare left (the caller holds the prepare lock)."""
    stale = [p for p in out_dir.glob(STAGING_PREFIX + "*") if p.is_dir()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale + remove_stale_temps(out_dir)


def sweep_data_dir(data_dir) -> list:
    """What killed prepares left in data_dir (staging folders, temp files), removed when no prepare is
    running there; nothing happens in a folder prepare never used or cannot write. Returns the removed paths."""
    data_dir = Path(data_dir)
    if not (data_dir / PREPARE_LOCK).is_file():
        return []
    lock = FolderLock(data_dir / PREPARE_LOCK)
    try:
        if not lock.acquire():
            return []  # a prepare is running: its staging folder is alive
    except OSError:
        return []  # a read-only folder
    try:
        return _sweep_staging(data_dir)
    finally:
        lock.release()


def _tokenize_into(docs, staging: Path, source, shard_tokens, val_every, val_tokens, workers, verbose) -> dict:
    """Tokenise `docs` into shards in `staging`; returns their manifest."""
    writers = {split: ShardWriter(staging, split, shard_tokens) for split in SPLITS}
    docs_per_split = dict.fromkeys(SPLITS, 0)
    val_open, val_count, n_docs = True, 0, 0
    bar = tqdm(desc=f"prepare {source}", unit="tok", unit_scale=True, disable=None if verbose else True)
    for i, tokens in enumerate(tokenized(docs, workers)):
        to_val = val_open and i % val_every == 0
        if to_val and val_tokens is not None and val_count + len(tokens) > val_tokens:
            to_val = val_open = False  # val is full: it stays a prefix of the val documents
        split = "val" if to_val else "train"
        val_count += len(tokens) if to_val else 0
        writers[split].add(tokens)
        docs_per_split[split] += 1
        n_docs += 1
        bar.update(len(tokens))
    bar.close()

    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        if not shards:
            raise ValueError(f"prepare {source}: the {split} split got no documents ({n_docs} in all, "
                             f"val_every={val_every}, val_tokens={val_tokens}); need at least one in each")
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                         "documents": docs_per_split[split]}
    return new_manifest(source, splits, shard_tokens=shard_tokens, val_every=val_every, val_tokens=val_tokens)


def _publish(staging: Path, out_dir: Path, manifest: dict, previous: set) -> None:
    """Move the staged shards into out_dir and delete the `previous` manifest's shards that the new one
    does not list (nothing else). The old manifest goes first, the new one last: in between (renames
    only) the folder counts as unprepared, never as a mix of old and new."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    fsync_dir(out_dir)
    keep = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    for name in keep:
        os.replace(staging / name, out_dir / name)
    for name in previous - keep:  # shards of an earlier, larger prepare in the same folder
        (out_dir / name).unlink(missing_ok=True)
    write_json_atomic(out_dir / MANIFEST, manifest)

def default_data_dir(source: str) -> Path:
    """`$GPT2_DATA_DIR/<name>` (default `./data/<name>`); text:PATH gets `text-<basename>-<path hash>`."""
    root = Path(os.environ.get("GPT2_DATA_DIR", "data"))
    if source.startswith("text:"):
        path = Path(source[len("text:"):]).resolve()
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        return root / f"text-{path.stem or 'root'}-{digest}"
    return root / source


def prepare(source: str, out_dir=None, shard_tokens=None, val_every=None, val_tokens=None,
            workers=None, verbose: bool = True) -> Path:
    """Prepare `source` ('pystdlib', 'fineweb-edu', 'text:PATH') into shards; returns the folder.
    Unset options take the source's SOURCE_DEFAULTS."""
    out_dir = Path(out_dir) if out_dir is not None else default_data_dir(source)
    check_out_dir(out_dir)
    docs, opts = _documents_and_options(source, shard_tokens, val_every, val_tokens)
    return prepare_documents(docs, out_dir, source=source, workers=workers, verbose=verbose, **opts)


def _documents_and_options(source: str, shard_tokens=None, val_every=None, val_tokens=None):
    """`source`'s documents and its prepare options, the unset ones from SOURCE_DEFAULTS."""
    defaults = SOURCE_DEFAULTS.get(source_kind(source))
    docs = source_documents(source)  # raises for an unknown source
    opts = dict(shard_tokens=shard_tokens, val_every=val_every, val_tokens=val_tokens)
    return docs, {k: defaults[k] if v is None else v for k, v in opts.items()}


def ensure_prepared(source: str, out_dir, verbose: bool = True, shard_tokens=None, val_every=None,
                    val_tokens=None, workers=None) -> bool:
    """Prepare `source` into `out_dir` unless it is prepared already (checked again under the prepare
    lock, so two runs starting together prepare it once). True if it prepared it now."""
    out_dir = Path(out_dir)
    if is_prepared(out_dir, source=source):
        return False
    check_out_dir(out_dir)
    docs, opts = _documents_and_options(source, shard_tokens, val_every, val_tokens)
    _check_prepare_options(**opts)
    with prepare_lock(out_dir, verbose):
        if is_prepared(out_dir, source=source):
            return False
        if verbose:
            print(f"preparing {source} into {out_dir} ...", file=sys.stderr, flush=True)
        _prepare_documents_locked(docs, out_dir, source, workers=workers, verbose=verbose, **opts)
    if verbose:
        print(summary(out_dir), file=sys.stderr, flush=True)
    return True
