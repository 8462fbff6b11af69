"""The shard file format (the llm.c token-file layout) and its writer and reader."""
import hashlib
import re
from pathlib import Path

import numpy as np

from gpt2_triton.atomic import atomic_write

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
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as an int32
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")


class DataError(ValueError):
    """The data on disk is not usable: a bad shard or manifest, or a source that is not text."""


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
