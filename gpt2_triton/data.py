"""Token shards on disk: prepare them from a text source, then stream (x, y) batches from them.

    python -m gpt2_triton.data prepare pystdlib                  # offline default: the Python stdlib's .py files
    python -m gpt2_triton.data prepare fineweb-edu               # FineWeb-Edu sample-10BT (needs `datasets` + network)
    python -m gpt2_triton.data prepare text:path/to/corpus       # .txt (one doc per file) / .jsonl (one doc per line)

Shard format (the llm.c token-file layout): a header of 256 little-endian int32 -- [0] = MAGIC
(20240520), [1] = VERSION (1), [2] = token count, the rest zero -- then `count` uint16 tokens.
A prepared folder holds `train_000000.bin`, ..., `val_000000.bin`, ... and `manifest.json`, written
last, so a folder with a manifest whose shards all have the right size is complete (`is_prepared`).
A folder of llm.c shards (`<name>_train_000001.bin`, `<name>_val.bin`, ..., no manifest) loads too.

prepare() writes into a staging folder inside the output folder and moves the shards in only when
everything succeeded, so a failed prepare leaves a prepared folder as it was; one prepare at a time
per folder (a FolderLock; a second waits). It deletes only shards that the folder's previous manifest
lists, refuses a non-empty folder without a manifest (not ours) and a folder a live run is reading
(runs hold a shared DirLock on it). Each shard's SHA-256 goes into the manifest: with the names and
sizes it makes the data fingerprint that a checkpoint records (`data_fingerprint`).

Every document is preceded by <|endoftext|> (50256), as in build-nanogpt. Split rule: document i
(0-based, in source order) goes to val iff i % val_every == 0 and it still fits in val_tokens
(val stops at the first document that does not fit, so val is always a prefix of those documents).
pystdlib/text: val_every=50, no cap (every 50th document). fineweb-edu: val_every=1, val_tokens=1e8
(the first ~100M tokens are val, as build-nanogpt's first shard). A text source that is a single .txt
file is cut into documents at paragraph breaks (`split_text`), so it has a train and a val split.
"""
import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2_triton.atomic import (
    TEMP_PATTERN,
    DirLock,
    FolderLock,
    atomic_write,
    folder_write_problem,
    fsync_dir,
    remove_stale_temps,
    sigterm_raises,
)
from gpt2_triton.tokenizer import EOT_ID, get_encoding

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VOCAB_SIZE = 50257
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PREPARE_LOCK = ".prepare.lock"
STAGING_PREFIX = ".staging-"
LLMC_SOURCE = "llm.c"  # the "source" of a folder of llm.c shards without a manifest
# llm.c shard names: a dataset prefix, the split, an optional index (ours have no prefix, so never match)
LLMC_NAME = re.compile(r"^.+_(?P<split>train|val)(?:_(?P<index>\d+))?\.bin$")
TEXT_CHUNK_CHARS = 16384  # a single .txt file becomes documents of at least this many characters
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as an int32
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
# Characters that are not text: control characters other than \t \n \v \f \r, and U+FFFD (what an
# undecodable byte becomes). A text file with more than MAX_NOT_TEXT of them is refused, with any a warning.
NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
MAX_NOT_TEXT = 0.1


class DataError(ValueError):
    """The data on disk is not usable: a bad shard or manifest, or a source that is not text."""

# Per-source defaults for prepare(); every one can be overridden by argument or on the command line.
SOURCE_DEFAULTS = {
    "pystdlib": dict(shard_tokens=2**18, val_every=50, val_tokens=None),
    "text": dict(shard_tokens=10_000_000, val_every=50, val_tokens=None),
    "fineweb-edu": dict(shard_tokens=100_000_000, val_every=1, val_tokens=100_000_000),
}


# -----------------------------------------------------------------------------
# shard files

def write_shard(path, tokens) -> str:
    """Write `tokens` (ints in [0, 65535]) as a shard, atomically: temp file in the same folder,
    flush + fsync, then os.replace. An interrupted write leaves any previous file at `path` intact.
    Returns the SHA-256 of the file's bytes."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"write_shard {path}: need a non-empty 1-D token array; got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= 2**16:
        raise ValueError(f"write_shard {path}: token ids must fit in uint16; got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    digest = hashlib.sha256()
    with atomic_write(path, "wb", size_hint=HEADER_BYTES + 2 * tokens.size) as f:
        for part in (header.tobytes(), tokens.astype("<u2", copy=False).tobytes()):
            f.write(part)
            digest.update(part)
    return digest.hexdigest()


def read_shard(path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 np.memmap; DataError if the file is not a valid shard."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"shard {path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"shard {path}: bad magic number {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise DataError(f"shard {path}: unsupported format version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count <= 0 or size != expected:
        problem = "truncated" if size < expected else "oversized" if count > 0 else "empty"
        raise DataError(f"shard {path}: {problem} file: {size} bytes, but the header's token count "
                         f"{count} needs {expected}")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Streams tokens of one split into fixed-size shards, writing each one as soon as it is full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = None  # allocated on first use: a split may stay empty
        self.filled = 0
        self.shards = []  # [{"file": name, "tokens": count}]

    def add(self, tokens: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty(self.shard_tokens, dtype=np.uint16)
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self._flush()

    def close(self) -> list:
        if self.filled:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = shard_name(self.split, len(self.shards))
        sha256 = write_shard(self.out_dir / name, self.buffer[:self.filled])
        self.shards.append({"file": name, "tokens": self.filled, "sha256": sha256})
        self.filled = 0


# -----------------------------------------------------------------------------
# sources: each is an iterator of document strings in a fixed order

def pystdlib_files(stdlib_dir=None) -> list:
    """The standard library's .py files, sorted by relative path, without tests and site-packages."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"pystdlib: standard library folder {root} not found")
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded]  # prune: never walk into them
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_file_texts(files):
    for path in files:
        yield Path(path).read_text(encoding="utf-8", errors="replace")


def text_files(root) -> list:
    """A .txt/.jsonl file, or every .txt/.jsonl file under a folder (recursive, sorted)."""
    root = Path(root)
    if root.is_file():
        if root.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"text source {root}: expected a .txt or .jsonl file (or a folder of them)")
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"text source {root}: no such file or folder")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"text source {root}: folder holds no .txt or .jsonl files")
    return files


def split_text(text: str, min_chars: int = TEXT_CHUNK_CHARS) -> list[str]:
    """Cut one long text into documents at paragraph breaks (blank lines; failing those, line breaks;
    failing those, spaces), each at least min(min_chars, len(text) // 8) characters long except
    perhaps the last. Joined, the documents are the text."""
    min_chars = max(1, min(min_chars, len(text) // 8))
    for boundary in (r"\n[ \t]*\n\s*", r"\n\s*", r"\s+"):
        cuts = [m.end() for m in re.finditer(boundary, text) if 0 < m.end() < len(text)]
        if cuts:
            break
    docs, start = [], 0
    for cut in cuts:
        if cut - start >= min_chars:
            docs.append(text[start:cut])
            start = cut
    if start < len(text):
        docs.append(text[start:])
    return docs


def check_text(path, text: str, chars: int | None = None, not_text: int | None = None) -> None:
    """Refuse (DataError naming the file) a text source that is more than MAX_NOT_TEXT control characters
    or undecodable bytes (binary data named .txt); warn on stderr when it has any. `chars`/`not_text`:
    counts already made (a .jsonl file is counted line by line)."""
    chars = len(text) if chars is None else chars
    bad = len(NOT_TEXT.findall(text)) if not_text is None else not_text
    if chars and bad > MAX_NOT_TEXT * chars:
        raise DataError(f"text source {path}: {bad:,} of its {chars:,} characters ({bad / chars:.0%}) are not "
                        f"UTF-8 text or are control characters: it looks like binary data; convert it to UTF-8 "
                        f"text or leave it out")
    if bad:
        print(f"warning: text source {path}: {bad:,} characters are not UTF-8 text or are control characters "
              f"(undecodable bytes are read as U+FFFD)", file=sys.stderr, flush=True)


def read_text_file(path) -> str:
    """A .txt source file as UTF-8 text, checked by `check_text`."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    check_text(path, text)
    return text


def iter_text_documents(files):
    """One document per .txt file; one per non-empty line of a .jsonl file (its "text" field)."""
    for path in files:
        if path.suffix == ".txt":
            yield read_text_file(path)
            continue
        chars = not_text = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                chars, not_text = chars + len(line), not_text + len(NOT_TEXT.findall(line))
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({e!r})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: \"text\" must be a string; got {type(text).__name__}")
                yield text
        check_text(path, "", chars, not_text)


def iter_fineweb_edu(name="sample-10BT"):
    """FineWeb-Edu documents streamed from the Hugging Face Hub (`pip install gpt2-triton[fineweb]`)."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("fineweb-edu needs the `datasets` package: pip install 'gpt2-triton[fineweb]'") from e
    try:
        ds = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
        for doc in ds:
            yield doc["text"]
    except Exception as e:  # requests/httpx/hub errors share no base class
        raise RuntimeError(f"fineweb-edu: streaming HuggingFaceFW/fineweb-edu ({name}) from the Hugging Face "
                           f"Hub failed; is the network reachable? ({type(e).__name__}: {e})") from e


def source_documents(source: str):
    """The document iterator for a source name: 'pystdlib', 'fineweb-edu' or 'text:PATH'."""
    if source == "pystdlib":
        return iter_file_texts(pystdlib_files())
    if source == "fineweb-edu":
        return iter_fineweb_edu()
    if source.startswith("text:"):
        files = text_files(source[len("text:"):])
        if len(files) == 1 and files[0].suffix == ".txt":  # one document would leave train or val empty
            return iter(split_text(read_text_file(files[0])))
        return iter_text_documents(files)
    raise ValueError(f"unknown data source {source!r}; use 'pystdlib', 'fineweb-edu' or 'text:PATH'")


def source_kind(source: str) -> str:
    return "text" if source.startswith("text:") else source


# -----------------------------------------------------------------------------
# prepare: tokenise in worker processes, stream into shards

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
        previous = _read_manifest_file(out_dir)
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
    return _manifest(source, splits, shard_tokens=shard_tokens, val_every=val_every, val_tokens=val_tokens)


def _manifest(source: str, splits: dict, **options) -> dict:
    """A manifest.json: the shard format, the tokenizer, `source`, its prepare options and its splits."""
    return {"format_version": VERSION, "magic": MAGIC, "source": source, "tokenizer": "gpt2", "eot_id": EOT_ID,
            "vocab_size": VOCAB_SIZE, **options, "splits": splits}


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


def write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


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


def summary(data_dir) -> str:
    splits = load_manifest(data_dir)["splits"]
    return f"{data_dir}: " + ", ".join(
        f"{s}: {v['tokens']:,} tokens in {len(v['shards'])} shards ({v['documents'] or '?'} docs)"
        for s, v in splits.items())


def llmc_manifest(data_dir) -> dict | None:
    """A manifest for a folder of llm.c shards (`*_train_*.bin`, `*_val_*.bin`; files sorted by name,
    each validated by its header), or None if the folder has none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None
    found = {split: [] for split in SPLITS}
    for path in sorted(data_dir.iterdir()):
        m = LLMC_NAME.match(path.name)
        if m and path.is_file():
            found[m["split"]].append(path)
    if not any(found.values()):
        return None
    missing = [split for split, paths in found.items() if not paths]
    if missing:
        raise DataError(f"{data_dir}: llm.c-format shards but no {missing[0]} split "
                         f"(expected files named like <name>_{missing[0]}_000000.bin)")
    splits = {}
    for split, paths in found.items():
        shards = [{"file": p.name, "tokens": len(read_shard(p))} for p in paths]
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards), "documents": None}
    return _manifest(LLMC_SOURCE, splits)


def load_manifest(data_dir) -> dict:
    """The folder's manifest.json; for a folder of llm.c shards without one, a manifest made from them."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        llmc = llmc_manifest(data_dir)
        if llmc is not None:
            return llmc
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; prepare it first "
                                "(python -m gpt2_triton.data prepare SOURCE)")
    return _read_manifest_file(data_dir)


def _read_manifest_file(data_dir) -> dict:
    """data_dir's manifest.json, checked: DataError naming it for anything that is not a manifest of
    ours, or a shard entry that is not a plain file name (a manifest lists only files of its own folder)."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, not JSON
        raise DataError(f"{path}: not a valid manifest ({e}); prepare the data again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not a manifest (a JSON object with \"splits\"); prepare the data again")
    if manifest.get("format_version") != VERSION:
        raise DataError(f"{path}: format version {manifest.get('format_version')}, expected {VERSION}; "
                        f"prepare the data again")
    for split in SPLITS:
        entry = manifest["splits"].get(split)
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not shards:
            raise DataError(f"{path}: splits.{split}.shards must be a non-empty list; prepare the data again")
        for shard in shards:
            name, tokens = (shard.get("file"), shard.get("tokens")) if isinstance(shard, dict) else (None, None)
            if not isinstance(name, str) or not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                raise DataError(f"{path}: {split} shard entry {shard!r} is not {{\"file\": NAME, \"tokens\": N >= 1}}")
            if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise DataError(f"{path}: {split} shard {name!r} is not a file name in {data_dir}; refusing a "
                                f"manifest that points outside its folder")
    if not isinstance(manifest.get("source"), str):
        raise DataError(f"{path}: no \"source\" string; prepare the data again")
    return manifest


def data_fingerprint(data_dir) -> dict:
    """What the data folder holds, wherever it is: {"fingerprint": a hash of every shard's split, name,
    token count and (where the manifest records it) SHA-256, "train"/"val": "<n> shards, <tokens> tokens"}.
    A checkpoint records it; a resume on data with another fingerprint is refused."""
    splits = load_manifest(data_dir)["splits"]
    entries = [[split, s["file"], s["tokens"], s.get("sha256")] for split in SPLITS for s in splits[split]["shards"]]
    return {"fingerprint": hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16],
            **{split: f"{len(splits[split]['shards'])} shards, {sum(s['tokens'] for s in splits[split]['shards']):,} "
                      f"tokens" for split in SPLITS}}


def read_lock(data_dir) -> DirLock:
    """A shared DirLock on data_dir, held while a run reads it: prepare refuses the folder meanwhile.
    ValueError when a prepare is rewriting it now."""
    lock = DirLock(data_dir)
    if not lock.acquire(shared=True):
        raise ValueError(f"data folder {data_dir} is being prepared by another process; wait for it to finish")
    return lock


def is_prepared(data_dir, source=None) -> bool:
    """True if `data_dir` has a current manifest (for `source`, if given; llm.c shards count for any
    source) and every shard it lists has the size its token count implies."""
    try:
        manifest = load_manifest(data_dir)
    except (OSError, ValueError):
        return False
    if source is not None and manifest["source"] not in (source, LLMC_SOURCE):
        return False
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file() or path.stat().st_size != HEADER_BYTES + 2 * shard["tokens"]:
                return False
    return True


# -----------------------------------------------------------------------------
# loading batches

class DataLoader:
    """(x, y) batches of consecutive tokens from one split of a prepared folder.

    The split is read as one stream: its shards concatenated in the epoch's order (train: a
    permutation seeded by (seed, epoch), and within each shard its documents in an order seeded by
    (seed, epoch, shard); val: as written). Each step consumes world_size*B*T tokens;
    rank r takes the r-th window of B*T+1 tokens of the step, so ranks are disjoint. When fewer than
    world_size*B*T+1 tokens are left the epoch ends (the tail is skipped) and the next one begins.
    With pin_memory (for a CUDA run) the batches come in page-locked memory, so that
    `.to(device, non_blocking=True)` overlaps the copy with compute.
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, pin_memory: bool = False):
        if split not in SPLITS:
            raise ValueError(f"DataLoader: split must be one of {SPLITS}; got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"DataLoader: need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        self.data_dir = Path(data_dir)
        self.split, self.B, self.T = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pin_memory = pin_memory
        shards = load_manifest(data_dir)["splits"][split]["shards"]
        self.files = [self.data_dir / s["file"] for s in shards]
        self.sizes = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self.step_tokens = world_size * batch_size * seq_len
        if self.sizes.sum() < self.step_tokens + 1:
            raise ValueError(f"DataLoader: {split} split of {data_dir} has {self.sizes.sum()} tokens, fewer than "
                             f"one step needs (world_size*B*T+1 = {self.step_tokens + 1})")
        self._memmaps = [read_shard(f) for f in self.files]  # every header and size checked before step 1
        for path, tokens, size in zip(self.files, self._memmaps, self.sizes):
            if len(tokens) != size:
                raise DataError(f"shard {path}: holds {len(tokens):,} tokens, but the manifest lists {size:,}; "
                                f"prepare the data again")
        self._shards = {}  # shard index -> memmap whose token ids were checked
        self._shuffled = {}  # (epoch, shard index) -> that shard's documents in this epoch's order
        self.reset()

    def shard_order(self, epoch: int) -> np.ndarray:
        """Indices of the shards in the order epoch `epoch` reads them."""
        if self.split != "train":
            return np.arange(len(self.files))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def reset(self, epoch: int = 0) -> None:
        """Back to the start of `epoch` (val: every eval reads the same batches)."""
        self._set_epoch(epoch)
        self.pos = 0  # offset of the next step in this epoch's stream

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = self.shard_order(epoch)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes[self.order])])  # stream offset of each shard

    def _shard(self, index: int) -> np.ndarray:
        if index not in self._shards:
            tokens = self._memmaps[index]
            top = int(tokens.max())
            if top >= VOCAB_SIZE:
                raise DataError(f"shard {self.files[index]}: token id {top} >= vocab size {VOCAB_SIZE}; "
                                f"not GPT-2 tokens (prepare the data again)")
            self._shards[index] = tokens
        return self._shards[index]

    def shard_tokens(self, index: int, epoch: int) -> np.ndarray:
        """Shard `index` as epoch `epoch` reads it. Train: its documents (each starts at an
        <|endoftext|>; a shard may begin mid-document) in an order seeded by (seed, epoch, index), so
        no two epochs see the same sequence (unshuffled data gives a periodic loss).
        Val: as written."""
        tokens = self._shard(index)
        if self.split != "train":
            return tokens
        key = (epoch, index)
        if key not in self._shuffled:
            if len(self._shuffled) >= 4:  # a step spans few shards: keep only the recent ones
                self._shuffled.pop(next(iter(self._shuffled)))
            starts = np.flatnonzero(tokens == EOT_ID)
            if len(starts) == 0 or starts[0] != 0:
                starts = np.concatenate([[0], starts])
            ends = np.append(starts[1:], len(tokens))
            order = np.random.default_rng([self.seed, epoch, index]).permutation(len(starts))
            self._shuffled[key] = np.concatenate([tokens[starts[i]:ends[i]] for i in order])
        return self._shuffled[key]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this epoch's stream, as int64 (crossing shards as needed)."""
        parts = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo, hi = start - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            parts.append(self.shard_tokens(self.order[k], self.epoch)[lo:hi])
            start += hi - lo
            k += 1
        return np.concatenate(parts).astype(np.int64)

    def next_batch(self):
        """(x, y), each an int64 tensor (B, T); y[b, t] is the token after x[b, t]."""
        if self.pos + self.step_tokens + 1 > self.starts[-1]:
            self._set_epoch(self.epoch + 1)
            self.pos = 0
        start = self.pos + self.rank * self.B * self.T
        buf = torch.from_numpy(self._read(start, start + self.B * self.T + 1))
        if self.pin_memory:
            buf = buf.pin_memory()  # a fresh page-locked buffer per batch: none is reused mid-copy
        x = buf[:-1].view(self.B, self.T)
        y = buf[1:].view(self.B, self.T)
        self.pos += self.step_tokens
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position of the next step (the same on every rank): epoch, shard (index into the epoch's
        order), offset (token within that shard), seed."""
        k = int(np.searchsorted(self.starts, self.pos, side="right")) - 1
        return {"epoch": int(self.epoch), "shard": k, "offset": int(self.pos - self.starts[k]), "seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._set_epoch(int(state["epoch"]))
        k, offset = int(state["shard"]), int(state["offset"])
        if not (0 <= k < len(self.files) and 0 <= offset < self.starts[k + 1] - self.starts[k]):
            raise ValueError(f"DataLoader.load_state_dict: shard {k} / offset {offset} is outside the "
                             f"{self.split} split of {self.data_dir} ({len(self.files)} shards)")
        self.pos = int(self.starts[k]) + offset


# -----------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt2_triton.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise a source into train/val shards")
    p.add_argument("source", help="pystdlib | fineweb-edu | text:PATH")
    p.add_argument("--out", default=None, help="output folder (default: $GPT2_DATA_DIR/<name>, i.e. data/<name>)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default: per source)")
    p.add_argument("--val-every", type=int, default=None, help="every k-th document goes to val (default: per source)")
    p.add_argument("--val-tokens", type=int, default=None, help="cap on val tokens (default: per source)")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    args = parser.parse_args(argv)
    for flag, value, low, high in (("--shard-tokens", args.shard_tokens, 1, MAX_SHARD_TOKENS),
                                   ("--val-every", args.val_every, 1, None), ("--val-tokens", args.val_tokens, 0, None),
                                   ("--workers", args.workers, 0, None)):
        if value is not None and not (low <= value and (high is None or value <= high)):
            p.error(f"{flag} must be >= {low}" + (f" and <= {high:,} (a shard header stores the count as an "
                                                  f"int32)" if high else "") + f"; got {value:,}")
    t0 = time.perf_counter()
    try:
        with sigterm_raises():  # a kill by SIGTERM removes the staging folder, as Ctrl-C does
            out = prepare(args.source, args.out, shard_tokens=args.shard_tokens, val_every=args.val_every,
                          val_tokens=args.val_tokens, workers=args.workers)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    print(f"prepared in {time.perf_counter() - t0:.1f}s -- {summary(out)}")


if __name__ == "__main__":
    main()
