"""Text sources: each an iterator of document strings in a fixed order."""
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

from gpt2_triton.data.shards import DataError

TEXT_CHUNK_CHARS = 16384  # a single .txt file becomes documents of at least this many characters
# Characters that are not text: control characters other than \t \n \v \f \r, and U+FFFD (what an
# undecodable byte becomes). A text file with more than MAX_NOT_TEXT of them is refused, with any a warning.
NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
MAX_NOT_TEXT = 0.1

# Per-source defaults for prepare(); every one can be overridden by argument or on the command line.
SOURCE_DEFAULTS = {
    "pystdlib": dict(shard_tokens=2**18, val_every=50, val_tokens=None),
    "text": dict(shard_tokens=10_000_000, val_every=50, val_tokens=None),
    "fineweb-edu": dict(shard_tokens=100_000_000, val_every=1, val_tokens=100_000_000),
}


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
