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
from gpt2_triton.data.cli import main
from gpt2_triton.data.loader import DataLoader
from gpt2_triton.data.manifest import (
    data_fingerprint,
    is_prepared,
    llmc_manifest,
    load_manifest,
    new_manifest,
    read_lock,
    summary,
)
from gpt2_triton.data.pipeline import (
    check_out_dir,
    default_data_dir,
    ensure_prepared,
    prepare,
    prepare_documents,
    prepare_lock,
    sweep_data_dir,
    tokenize_document,
    tokenized,
)
from gpt2_triton.data.shards import (
    HEADER_BYTES,
    HEADER_INTS,
    LLMC_NAME,
    LLMC_SOURCE,
    MAGIC,
    MANIFEST,
    MAX_SHARD_TOKENS,
    PREPARE_LOCK,
    SHARD_NAME,
    SPLITS,
    STAGING_PREFIX,
    VERSION,
    VOCAB_SIZE,
    DataError,
    ShardWriter,
    read_shard,
    shard_name,
    write_shard,
)
from gpt2_triton.data.sources import (
    MAX_NOT_TEXT,
    NOT_TEXT,
    SOURCE_DEFAULTS,
    TEXT_CHUNK_CHARS,
    check_text,
    iter_file_texts,
    iter_fineweb_edu,
    iter_text_documents,
    pystdlib_files,
    read_text_file,
    source_documents,
    source_kind,
    split_text,
    text_files,
)

__all__ = [
    "main", "DataLoader", "data_fingerprint", "is_prepared", "llmc_manifest", "load_manifest", "new_manifest",
    "read_lock", "summary", "check_out_dir", "default_data_dir", "ensure_prepared", "prepare",
    "prepare_documents", "prepare_lock", "sweep_data_dir", "tokenize_document", "tokenized", "HEADER_BYTES",
    "HEADER_INTS", "LLMC_NAME", "LLMC_SOURCE", "MAGIC", "MANIFEST", "MAX_SHARD_TOKENS", "PREPARE_LOCK",
    "SHARD_NAME", "SPLITS", "STAGING_PREFIX", "VERSION", "VOCAB_SIZE", "DataError", "ShardWriter", "read_shard",
    "shard_name", "write_shard", "MAX_NOT_TEXT", "NOT_TEXT", "SOURCE_DEFAULTS", "TEXT_CHUNK_CHARS",
    "check_text", "iter_fineweb_edu", "iter_file_texts", "iter_text_documents", "pystdlib_files",
    "read_text_file", "source_documents", "source_kind", "split_text", "text_files",
]
