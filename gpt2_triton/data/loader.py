"""Streaming (x, y) batches from a prepared folder."""
from pathlib import Path

import numpy as np
import torch

from gpt2_triton.data.manifest import load_manifest
from gpt2_triton.data.shards import SPLITS, VOCAB_SIZE, DataError, read_shard
from gpt2_triton.tokenizer import EOT_ID


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
