"""A prepared folder's manifest: what it holds, its fingerprint, whether it is complete."""
import hashlib
import json
from pathlib import Path

from gpt2_triton.atomic import DirLock
from gpt2_triton.data.shards import (
    HEADER_BYTES,
    LLMC_NAME,
    LLMC_SOURCE,
    MAGIC,
    MANIFEST,
    SPLITS,
    VERSION,
    VOCAB_SIZE,
    DataError,
    read_shard,
)
from gpt2_triton.tokenizer import EOT_ID


def summary(data_dir) -> str:
    splits = load_manifest(data_dir)["splits"]
    return f"{data_dir}: " + ", ".join(
        f"{s}: {v['tokens']:,} tokens in {len(v['shards'])} shards ({v['documents'] or '?'} docs)"
        for s, v in splits.items())


def new_manifest(source: str, splits: dict, **options) -> dict:
    """A manifest.json: the shard format, the tokenizer, `source`, its prepare options and its splits."""
    return {"format_version": VERSION, "magic": MAGIC, "source": source, "tokenizer": "gpt2", "eot_id": EOT_ID,
            "vocab_size": VOCAB_SIZE, **options, "splits": splits}


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
    return new_manifest(LLMC_SOURCE, splits)


def load_manifest(data_dir) -> dict:
    """The folder's manifest.json; for a folder of llm.c shards without one, a manifest made from them."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        llmc = llmc_manifest(data_dir)
        if llmc is not None:
            return llmc
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; prepare it first "
                                "(python -m gpt2_triton.data prepare SOURCE)")
    return read_manifest_file(data_dir)


def read_manifest_file(data_dir) -> dict:
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
