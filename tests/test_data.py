"""The token-shard pipeline: shard files, prepare (sources, split, determinism; it never deletes what is not
its own, refuses what is not text and a folder a live run reads), the data fingerprint, and the DataLoader."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_triton import data
from gpt2_triton.atomic import FolderLock
from gpt2_triton.data import (
    DataError,
    DataLoader,
    data_fingerprint,
    default_data_dir,
    ensure_prepared,
    is_prepared,
    load_manifest,
    prepare,
    prepare_documents,
    pystdlib_files,
    read_shard,
    split_text,
    write_shard,
)
from gpt2_triton.tokenizer import EOT_ID, get_encoding
from tests.helpers import disk_full

REPO = Path(__file__).resolve().parents[1]


def doc_tokens(docs):
    """What prepare must produce for these documents: EOT, then the document's tokens, for each."""
    enc = get_encoding()
    return np.array([t for d in docs for t in [EOT_ID] + enc.encode_ordinary(d)], dtype=np.int64)


def split_stream(data_dir, split):
    """A split's tokens, shards concatenated in manifest order."""
    shards = json.loads((data_dir / "manifest.json").read_text())["splits"][split]["shards"]
    return np.concatenate([read_shard(data_dir / s["file"]) for s in shards]).astype(np.int64)


def visible(folder):
    """The folder's entries, without dot-files (the prepare lock)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in visible(folder)}


# -----------------------------------------------------------------------------
# shard files

def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=1001).astype(np.uint16)
    tokens[:2] = (0, 2**16 - 1)
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [data.MAGIC, data.VERSION, 1001]
    assert path.stat().st_size == data.HEADER_BYTES + 2 * 1001


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif how == "version":
        raw[4:8] = np.int32(99).tobytes()
    elif how == "truncated":
        raw = raw[:-2]
    elif how == "oversized":
        raw += b"\0\0"
    elif how == "no header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("magic", "bad magic number 12345"), ("version", "unsupported format version 99"),
    ("truncated", "truncated file"), ("oversized", "oversized file"), ("no header", "shorter than"),
])
def test_read_shard_rejects_corrupt_file(tmp_path, how, message):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(50))
    _corrupt(path, how)
    with pytest.raises(ValueError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("tokens", [np.array([], dtype=np.int64), np.array([1, 2**16]), np.array([-1, 3])],
                         ids=["empty", "too-big", "negative"])
def test_write_shard_rejects_bad_tokens(tmp_path, tokens):
    with pytest.raises(ValueError, match="write_shard"):
        write_shard(tmp_path / "s.bin", tokens)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
@pytest.mark.parametrize("previous", [True, False], ids=["over-old-file", "new-file"])
def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail_in, previous):
    path = tmp_path / "s.bin"
    old = np.arange(10, dtype=np.uint16)
    if previous:
        write_shard(path, old)
    written = []

    def boom(*args):
        written.append(sorted(p.name for p in tmp_path.iterdir()))  # the temp file exists right now
        raise OSError("disk on fire")

    monkeypatch.setattr(os, fail_in, boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_shard(path, np.arange(1000, dtype=np.uint16))
    monkeypatch.undo()
    assert any(name.endswith(".tmp") for name in written[0]), "the write should have been midway"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["s.bin"] if previous else [])
    if previous:
        np.testing.assert_array_equal(read_shard(path), old)


# -----------------------------------------------------------------------------
# prepare

# Documents in the order the text source must yield them (sorted relative paths; .jsonl line by line).
TEXT_FILES = {
    "a.txt": "Hello world.\nSecond line of a.",
    "b.jsonl": [{"text": "first json doc", "id": 1}, {"text": "second <|endoftext|> json doc"}, None,
                {"text": "third, ünïcödé ✓"}],
    "c/d.txt": "def f(x):\n    return x + 1\n",
    "c/e/f.jsonl": [{"text": "deep " * 20}],
    "g.txt": "",
    "notes.md": "not a document",
}
TEXT_DOCS = ["Hello world.\nSecond line of a.", "first json doc", "second <|endoftext|> json doc",
             "third, ünïcödé ✓", "def f(x):\n    return x + 1\n", "deep " * 20, ""]


def make_text_corpus(root):
    for name, content in TEXT_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in content), encoding="utf-8")
        else:
            path.write_text(content, encoding="utf-8")
    return root


@pytest.fixture
def text_corpus(tmp_path):
    return make_text_corpus(tmp_path / "corpus")


def test_prepare_text_with_workers(tmp_path, text_corpus):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=7, val_every=3, workers=2, verbose=False)
    manifest = json.loads((out / "manifest.json").read_text())
    val_docs = [d for i, d in enumerate(TEXT_DOCS) if i % 3 == 0]
    train_docs = [d for i, d in enumerate(TEXT_DOCS) if i % 3 != 0]
    for split, docs in (("train", train_docs), ("val", val_docs)):
        expected = doc_tokens(docs)
        stream = split_stream(out, split)
        np.testing.assert_array_equal(stream, expected)
        assert np.count_nonzero(stream == EOT_ID) == len(docs) and stream[0] == EOT_ID
        info = manifest["splits"][split]
        assert info["tokens"] == len(expected) and info["documents"] == len(docs)
        sizes = [s["tokens"] for s in info["shards"]]
        assert all(n == 7 for n in sizes[:-1]) and 0 < sizes[-1] <= 7 and sum(sizes) == len(expected)
    assert manifest["source"] == f"text:{text_corpus}" and manifest["tokenizer"] == "gpt2"
    assert manifest["format_version"] == data.VERSION
    assert is_prepared(out) and is_prepared(out, source=f"text:{text_corpus}")
    assert not is_prepared(out, source="pystdlib")
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())

    # Deterministic: in-process tokenising, and a re-run, give the same bytes.
    again = prepare(f"text:{text_corpus}", tmp_path / "again", shard_tokens=7, val_every=3, workers=1, verbose=False)
    assert folder_bytes(again) == folder_bytes(out)
    prepare(f"text:{text_corpus}", again, shard_tokens=7, val_every=3, workers=1, verbose=False)
    assert folder_bytes(again) == folder_bytes(out)


def test_prepare_again_with_bigger_shards_removes_stale_ones(tmp_path, text_corpus):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=5, val_every=3, workers=1, verbose=False)
    assert len(list(out.glob("train_*.bin"))) > 2
    prepare(f"text:{text_corpus}", out, shard_tokens=1000, val_every=3, workers=1, verbose=False)
    assert [p.name for p in visible(out)] == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".prepare.lock"]  # no staging left
    assert is_prepared(out)


def test_val_tokens_cap_keeps_val_a_prefix(tmp_path):
    docs = ["one two three", "four", "five six seven eight nine ten", "eleven", "twelve thirteen"]
    sizes = [len(doc_tokens([d])) for d in docs]
    cap = sizes[0] + sizes[1] + 1  # the third document does not fit
    out = prepare_documents(iter(docs), tmp_path, shard_tokens=4, val_every=1, val_tokens=cap, workers=1,
                            verbose=False)
    np.testing.assert_array_equal(split_stream(out, "val"), doc_tokens(docs[:2]))
    np.testing.assert_array_equal(split_stream(out, "train"), doc_tokens(docs[2:]))


def test_is_prepared_detects_damage(tmp_path, text_corpus):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=7, val_every=3, workers=1, verbose=False)
    assert is_prepared(out)
    shard = out / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert not is_prepared(out)
    (out / "manifest.json").unlink()
    assert not is_prepared(out) and not is_prepared(tmp_path / "nowhere")


def test_prepare_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="train split got no documents"):
        prepare_documents(["only one"], tmp_path / "a", val_every=1, workers=1, verbose=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\" field"):
        prepare(f"text:{bad}", tmp_path / "b", workers=1, verbose=False)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        prepare(f"text:{tmp_path / 'missing'}", tmp_path / "c", workers=1, verbose=False)
    with pytest.raises(ValueError, match="unknown data source"):
        prepare("wikipedia", tmp_path / "d", verbose=False)


def test_failed_prepare_leaves_a_prepared_folder_as_it_was(tmp_path, text_corpus):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=7, val_every=3, workers=1, verbose=False)
    before = folder_bytes(out)

    def docs_then_network_error():
        yield from ["a new document", "another one"] * 20
        raise RuntimeError("connection reset")

    with pytest.raises(RuntimeError, match="connection reset"):
        prepare_documents(docs_then_network_error(), out, shard_tokens=5, val_every=3, workers=1, verbose=False)
    with pytest.raises(ValueError, match="train split got no documents"):
        prepare_documents(["only one"], out, val_every=1, workers=1, verbose=False)
    assert folder_bytes(out) == before and is_prepared(out, source=f"text:{text_corpus}")
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".prepare.lock"]  # staging removed


def test_prepare_sweeps_what_a_killed_prepare_left(tmp_path):
    out = tmp_path / "out"
    (out / ".staging-abc123").mkdir(parents=True)
    (out / ".staging-abc123" / "train_000000.bin").write_bytes(b"half a shard")
    (out / ".train_000003.bin.0123abcd.tmp").write_bytes(b"half a shard")
    prepare_documents(["one doc", "two docs", "three"], out, val_every=2, workers=1, verbose=False)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".prepare.lock"]
    assert is_prepared(out)


def test_ensure_prepared_prepares_once(tmp_path, text_corpus):
    source = f"text:{text_corpus}"
    assert ensure_prepared(source, tmp_path / "out", verbose=False, val_every=3, workers=1)
    before = folder_bytes(tmp_path / "out")
    assert not ensure_prepared(source, tmp_path / "out", verbose=False, val_every=3, workers=1)
    assert folder_bytes(tmp_path / "out") == before


PARAGRAPHS = [f"Paragraph {i}. " + "words and more words " * (i % 9 + 1) for i in range(300)]


def test_split_text_cuts_at_paragraphs_then_lines_then_spaces():
    text = "\n\n".join(PARAGRAPHS) + "\n"
    docs = split_text(text, min_chars=500)
    assert "".join(docs) == text and len(docs) > 10
    assert all(len(d) >= 500 and d.endswith("\n\n") for d in docs[:-1])  # cut only at blank lines
    lines = "\n".join(PARAGRAPHS)
    docs = split_text(lines, min_chars=500)
    assert "".join(docs) == lines and len(docs) > 10 and all(d.endswith("\n") for d in docs[:-1])
    one_line = " ".join(PARAGRAPHS)
    docs = split_text(one_line, min_chars=500)
    assert "".join(docs) == one_line and len(docs) > 10 and all(d.endswith(" ") for d in docs[:-1])
    assert split_text("word") == ["word"]
    short = "one\n\ntwo\n\nthree\n\nfour"  # shorter than min_chars: documents of >= len // 8 characters
    assert split_text(short) == ["one\n\n", "two\n\n", "three\n\n", "four"]


def test_single_txt_file_is_split_into_train_and_val(tmp_path):
    text = "\n\n".join(PARAGRAPHS) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    out = prepare(f"text:{path}", tmp_path / "out", workers=1, verbose=False)  # val_every=50 by default
    docs = split_text(text)
    assert len(docs) >= 8
    np.testing.assert_array_equal(split_stream(out, "val"), doc_tokens(docs[:1]))
    np.testing.assert_array_equal(split_stream(out, "train"), doc_tokens(docs[1:]))
    word = tmp_path / "word.txt"
    word.write_text("lonely", encoding="utf-8")
    with pytest.raises(ValueError, match="train split got no documents"):
        prepare(f"text:{word}", tmp_path / "w", workers=1, verbose=False)


def llmc_shard(path, tokens, version=1):
    """A shard exactly as llm.c's write_datafile writes it: 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, version, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_llmc_shard_folder_loads_without_a_manifest(tmp_path):
    rng = np.random.default_rng(0)
    val, train_a, train_b = (rng.integers(0, EOT_ID, n) for n in (100, 300, 200))
    llmc_shard(tmp_path / "fineweb_val_000000.bin", val)
    llmc_shard(tmp_path / "fineweb_train_000001.bin", train_a)
    llmc_shard(tmp_path / "fineweb_train_000002.bin", train_b)
    (tmp_path / "README.md").write_text("not a shard")
    assert is_prepared(tmp_path) and is_prepared(tmp_path, source="fineweb-edu")
    manifest = load_manifest(tmp_path)
    assert manifest["source"] == data.LLMC_SOURCE
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == ["fineweb_train_000001.bin",
                                                                          "fineweb_train_000002.bin"]
    assert manifest["splits"]["train"]["tokens"] == 500 and manifest["splits"]["val"]["tokens"] == 100
    loader = DataLoader(tmp_path, "val", 2, 8)
    x, y = loader.next_batch()
    assert torch.equal(x.flatten(), torch.from_numpy(val[:16]))
    assert torch.equal(y.flatten(), torch.from_numpy(val[1:17]))
    train_loader = DataLoader(tmp_path, "train", 2, 8)
    assert torch.equal(train_loader.next_batch()[0].flatten(), epoch_stream(train_loader, 0)[:16])
    (tmp_path / "fineweb_val_000000.bin").unlink()
    with pytest.raises(ValueError, match="llm.c-format shards but no val split"):
        load_manifest(tmp_path)
    llmc_shard(tmp_path / "llama_val_000000.bin", val, version=2)  # llm.c's uint32 llama-3 shards
    with pytest.raises(ValueError, match="unsupported format version 2"):
        load_manifest(tmp_path)
    assert not is_prepared(tmp_path)


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    prepare_documents(["one doc", "two docs", "three"], tmp_path / "a", val_every=2, workers=1, verbose=True)
    assert capsys.readouterr().err == ""  # not a terminal: quiet

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    prepare_documents(["one doc", "two docs", "three"], tmp_path / "b", val_every=2, workers=1, verbose=True)
    assert "prepare custom" in terminal.getvalue() and "tok" in terminal.getvalue()


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_DATA_DIR", raising=False)
    assert default_data_dir("pystdlib") == Path("data") / "pystdlib"
    monkeypatch.setenv("GPT2_DATA_DIR", str(tmp_path))
    assert default_data_dir("fineweb-edu") == tmp_path / "fineweb-edu"
    a, b = default_data_dir("text:x/corpus"), default_data_dir("text:y/corpus")
    assert a.parent == tmp_path and a.name.startswith("text-corpus-") and a != b


# -----------------------------------------------------------------------------
# fineweb-edu, through a fake `datasets` module

def fake_datasets(docs=None, error=None):
    module = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None, streaming=False):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        if error is not None:
            raise error
        return iter({"text": d, "id": i} for i, d in enumerate(docs))

    module.load_dataset = load_dataset
    return module


def test_fineweb_edu_streams_val_first(tmp_path, monkeypatch):
    docs = [f"educational document number {i}. " * (1 + i % 4) for i in range(30)]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(docs))
    val_tokens = 60
    out = prepare("fineweb-edu", tmp_path, shard_tokens=50, val_tokens=val_tokens, workers=1, verbose=False)
    val = split_stream(out, "val")
    n_val = 0
    while len(doc_tokens(docs[:n_val + 1])) <= val_tokens:
        n_val += 1
    np.testing.assert_array_equal(val, doc_tokens(docs[:n_val]))
    np.testing.assert_array_equal(split_stream(out, "train"), doc_tokens(docs[n_val:]))
    assert json.loads((out / "manifest.json").read_text())["source"] == "fineweb-edu"


def test_fineweb_edu_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'gpt2-triton\[fineweb\]'"):
        prepare("fineweb-edu", tmp_path, workers=1, verbose=False)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(error=ConnectionError("no route to host")))
    with pytest.raises(RuntimeError, match="network reachable.*no route to host"):
        prepare("fineweb-edu", tmp_path, workers=1, verbose=False)
    assert not is_prepared(tmp_path)


# -----------------------------------------------------------------------------
# pystdlib listing

def test_pystdlib_files_excludes_tests_and_site_packages(tmp_path):
    for rel in ["os.py", "abc.py", "json/__init__.py", "json/decoder.py", "json/tests/test_x.py", "test/test_os.py",
                "idlelib/editor.py", "idlelib/idle_test/test_editor.py", "site-packages/torch/x.py",
                "unittest/test/test_case.py", "distutils/tests/t.py", "readme.txt", "json/__pycache__/x.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    rel = [p.relative_to(tmp_path).as_posix() for p in pystdlib_files(tmp_path)]
    assert rel == ["abc.py", "idlelib/editor.py", "json/__init__.py", "json/decoder.py", "os.py"]


def test_pystdlib_files_real_stdlib_is_deterministic():
    files = pystdlib_files()
    assert files == pystdlib_files() and len(files) > 300
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    banned = {"test", "tests", "idle_test", "site-packages"}
    assert not any(banned.intersection(r.split("/")[:-1]) for r in rel)


# -----------------------------------------------------------------------------
# DataLoader

LOADER_DOCS = [f"document {i}: " + "alpha beta gamma delta " * (i % 7) for i in range(60)]


@pytest.fixture(scope="module")
def loader_dir(tmp_path_factory):
    """~800 train tokens in 13 small shards, so batches cross shard boundaries."""
    out = tmp_path_factory.mktemp("loader")
    return prepare_documents(LOADER_DOCS, out, shard_tokens=64, val_every=5, workers=1, verbose=False)


def epoch_stream(loader, epoch):
    shards = [loader.shard_tokens(k, epoch) for k in loader.shard_order(epoch)]
    return torch.from_numpy(np.concatenate(shards).astype(np.int64))


def documents(tokens):
    """The shard's pieces, each starting at an EOT (the first may be the tail of a document)."""
    starts = [0] + [i for i, t in enumerate(tokens.tolist()) if t == EOT_ID and i > 0]
    return [tuple(tokens[a:b].tolist()) for a, b in zip(starts, starts[1:] + [len(tokens)])]


def test_train_documents_reshuffle_per_epoch_within_each_shard(tmp_path):
    docs = [f"doc {i} " + "word " * (i % 5) for i in range(40)]
    out = prepare_documents(docs, tmp_path, shard_tokens=10_000, val_every=8, workers=1, verbose=False)
    loader = DataLoader(out, "train", 2, 8, seed=3)
    written = read_shard(loader.files[0])
    epochs = [loader.shard_tokens(0, e) for e in range(3)]
    assert all(sorted(documents(e)) == sorted(documents(written)) for e in epochs)  # same documents
    assert len({tuple(e.tolist()) for e in epochs} | {tuple(written.tolist())}) == 4  # each epoch its own order
    again = DataLoader(out, "train", 2, 8, seed=3)
    assert np.array_equal(again.shard_tokens(0, 1), epochs[1])  # deterministic in (seed, epoch, shard)
    assert not np.array_equal(DataLoader(out, "train", 2, 8, seed=4).shard_tokens(0, 1), epochs[1])
    val = DataLoader(out, "val", 2, 8)
    assert np.array_equal(val.shard_tokens(0, 2), read_shard(val.files[0]))  # val as written


def test_loader_batches_are_the_concatenated_stream(loader_dir):
    B, T = 3, 16
    loader = DataLoader(loader_dir, "train", B, T)
    stream = epoch_stream(loader, 0)
    steps = (len(stream) - 1) // (B * T)
    crossed = False
    for step in range(steps):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        window = stream[step * B * T: (step + 1) * B * T + 1]
        assert torch.equal(x.flatten(), window[:-1]) and torch.equal(y.flatten(), window[1:])
        assert torch.equal(x[:, 1:], y[:, :-1])
        crossed |= len(set(np.searchsorted(loader.starts, [step * B * T, (step + 1) * B * T], side="right"))) > 1
    assert crossed, "no batch spanned two shards; the test data is too coarse"
    assert loader.epoch == 0
    x, _ = loader.next_batch()  # the tail is skipped: epoch 1 starts at its own beginning
    assert loader.epoch == 1 and torch.equal(x.flatten(), epoch_stream(loader, 1)[:B * T])


def test_train_shards_reshuffle_per_epoch_and_val_stays_in_order(loader_dir):
    loader = DataLoader(loader_dir, "train", 2, 8, seed=1)
    orders = [tuple(loader.shard_order(e)) for e in range(4)]
    assert len(set(orders)) > 1 and all(sorted(o) == list(range(len(loader.files))) for o in orders)
    assert orders == [tuple(DataLoader(loader_dir, "train", 2, 8, seed=1).shard_order(e)) for e in range(4)]
    assert orders != [tuple(DataLoader(loader_dir, "train", 2, 8, seed=2).shard_order(e)) for e in range(4)]
    val = DataLoader(loader_dir, "val", 2, 8)
    assert all(list(val.shard_order(e)) == list(range(len(val.files))) for e in range(3))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_are_disjoint_and_cover_each_step(loader_dir, world_size):
    B, T = 2, 8
    loaders = [DataLoader(loader_dir, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    step_tokens = world_size * B * T
    steps_per_epoch = (int(loaders[0].starts[-1]) - 1) // step_tokens
    for step in range(steps_per_epoch + 2):  # into the second epoch
        batches = [ld.next_batch() for ld in loaders]
        epoch = loaders[0].epoch
        assert all(ld.epoch == epoch for ld in loaders)
        start = (step if epoch == 0 else step - steps_per_epoch) * step_tokens
        stream = epoch_stream(loaders[0], epoch)
        together = torch.cat([x.flatten() for x, _ in batches])
        assert torch.equal(together, stream[start:start + step_tokens])  # disjoint, in order, covering
        for x, y in batches:
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
        assert torch.equal(batches[-1][1].flatten()[-1], stream[start + step_tokens])


def test_epoch_ends_when_a_step_no_longer_fits(tmp_path):
    docs = ["val doc", "a" + " a" * 62]  # train: EOT + 63 tokens = exactly 64
    out = prepare_documents(docs, tmp_path, val_every=2, workers=1, verbose=False)
    assert len(split_stream(out, "train")) == 64
    loader = DataLoader(out, "train", 2, 8)  # 16 tokens a step: 3 steps fit (the 4th would need a 65th token)
    firsts = []
    for _ in range(7):
        x, _ = loader.next_batch()
        firsts.append((loader.epoch, x[0, 0].item()))
    stream = split_stream(out, "train")
    assert firsts == [(e, stream[s].item()) for e in (0, 1) for s in (0, 16, 32)] + [(2, stream[0].item())]


def test_state_dict_resumes_on_the_next_batch_across_epochs(loader_dir):
    B, T = 4, 8
    first = DataLoader(loader_dir, "train", B, T, seed=7)
    steps_per_epoch = (int(first.starts[-1]) - 1) // (B * T)
    for _ in range(steps_per_epoch - 2):
        first.next_batch()
    state = first.state_dict()
    assert all(type(v) is int for v in state.values()) and json.loads(json.dumps(state)) == state
    expected = [first.next_batch() for _ in range(5)]  # crosses into epoch 1
    assert first.epoch == 1
    resumed = DataLoader(loader_dir, "train", B, T, seed=0)  # the seed comes back with the state
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(5)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.state_dict() == first.state_dict()
    with pytest.raises(ValueError, match="outside the train split"):
        resumed.load_state_dict({**state, "offset": 10**6})


def test_val_reset_gives_the_same_batches(loader_dir):
    val = DataLoader(loader_dir, "val", 2, 8)
    first = [val.next_batch() for _ in range(4)]
    val.reset()
    again = [val.next_batch() for _ in range(4)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    stream = epoch_stream(val, 0)
    assert torch.equal(first[0][0].flatten(), stream[:16])


def test_pinned_batches_equal_plain_ones(loader_dir, monkeypatch):
    pinned = []

    def pin_memory(self):  # CPU-only torch cannot pin: record the call, return a copy
        pinned.append(self.shape)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    plain, pinning = DataLoader(loader_dir, "train", 2, 8), DataLoader(loader_dir, "train", 2, 8, pin_memory=True)
    for _ in range(3):
        (x, y), (px, py) = plain.next_batch(), pinning.next_batch()
        assert torch.equal(x, px) and torch.equal(y, py)
    assert pinned == [(2 * 8 + 1,)] * 3  # one buffer per batch; x and y are views of it


@pytest.mark.gpu
def test_pinned_batches_on_cuda(loader_dir):
    x, y = DataLoader(loader_dir, "train", 2, 8, pin_memory=True).next_batch()
    assert x.is_pinned() and y.is_pinned()
    assert torch.equal(x.to("cuda", non_blocking=True).cpu(), x)


def test_loader_errors(tmp_path, loader_dir):
    with pytest.raises(FileNotFoundError, match="prepare it first"):
        DataLoader(tmp_path, "train", 2, 8)
    with pytest.raises(ValueError, match="fewer than one step needs"):
        DataLoader(loader_dir, "val", 64, 64)
    with pytest.raises(ValueError, match="rank"):
        DataLoader(loader_dir, "train", 2, 8, rank=2, world_size=2)
    bad_dir = tmp_path / "bad"
    prepare_documents(LOADER_DOCS[:10], bad_dir, shard_tokens=32, val_every=5, workers=1, verbose=False)
    first = bad_dir / "train_000000.bin"
    tokens = np.array(read_shard(first))
    tokens[5] = 50257  # fits uint16, but is not a GPT-2 token (ids are 0..50256)
    write_shard(first, tokens)
    loader = DataLoader(bad_dir, "train", 1, 4)
    loader.load_state_dict({"epoch": 0, "shard": int(np.flatnonzero(loader.order == 0)[0]), "offset": 0,
                            "seed": loader.seed})
    with pytest.raises(ValueError, match=r"train_000000.bin: token id 50257 >= vocab size 50257"):
        loader.next_batch()



# -----------------------------------------------------------------------------
# what prepare may delete, what it refuses

def test_prepare_never_deletes_files_it_did_not_write(tmp_path, text_corpus, capsys):
    """A folder of the user's own shards without a manifest of ours: refused, untouched (by the CLI too)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    write_shard(mine / "train_mydata.bin", np.arange(100))
    write_shard(mine / "val_important.bin", np.arange(50))
    before = folder_bytes(mine)
    with pytest.raises(ValueError, match=r"holds files and no manifest.json, so it is not a data folder of ours "
                                         r"\(train_mydata.bin, val_important.bin\); prepare into an empty"):
        prepare(f"text:{text_corpus}", mine, workers=1, verbose=False)
    with pytest.raises(SystemExit, match="^error: prepare: .* is not a data folder of ours"):
        data.main(["prepare", f"text:{text_corpus}", "--out", str(mine), "--workers", "1"])
    assert folder_bytes(mine) == before


def test_auto_prepare_never_prepares_over_another_datasets_shards(tmp_path, text_corpus):
    """Shards named like ours, a backup beside them, the manifest gone: ensure_prepared refuses the folder."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train_000000.bin", "val_000000.bin", "train_backup.bin"):
        write_shard(other / name, np.arange(20))
    before = folder_bytes(other)
    with pytest.raises(ValueError, match="is not a data folder of ours"):
        ensure_prepared(f"text:{text_corpus}", other, verbose=False, workers=1)
    assert folder_bytes(other) == before


def test_prepare_deletes_only_what_its_manifest_listed(tmp_path, text_corpus):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=5, val_every=3, workers=1, verbose=False)
    (out / "notes.txt").write_text("mine")
    write_shard(out / "train_backup.bin", np.arange(7))
    prepare(f"text:{text_corpus}", out, shard_tokens=1000, val_every=3, workers=1, verbose=False)
    assert [p.name for p in visible(out)] == ["manifest.json", "notes.txt", "train_000000.bin", "train_backup.bin",
                                              "val_000000.bin"]
    write_shard(out / "train_000007.bin", np.arange(7))  # named like a shard of ours, but not listed
    with pytest.raises(ValueError, match="holds train_000007.bin, which its manifest.json does not list"):
        prepare(f"text:{text_corpus}", out, shard_tokens=2, val_every=3, workers=1, verbose=False)
    assert (out / "train_000007.bin").is_file() and is_prepared(out)


def test_prepare_refuses_a_folder_a_live_run_reads(tmp_path, text_corpus):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=7, val_every=3, workers=1, verbose=False)
    before = folder_bytes(out)
    reader = data.read_lock(out)  # what each process of a run holds while it trains
    try:
        with pytest.raises(ValueError, match="is being read by a live train.py; wait for it to end"):
            prepare(f"text:{text_corpus}", out, shard_tokens=3, val_every=3, workers=1, verbose=False)
        assert folder_bytes(out) == before
    finally:
        reader.release()
    prepare(f"text:{text_corpus}", out, shard_tokens=3, val_every=3, workers=1, verbose=False)
    assert folder_bytes(out) != before


def test_manifest_records_shard_hashes_and_the_fingerprint_follows_the_data(tmp_path, text_corpus):
    source = f"text:{text_corpus}"
    a = prepare(source, tmp_path / "a", shard_tokens=7, val_every=3, workers=1, verbose=False)
    for shard in load_manifest(a)["splits"]["train"]["shards"]:
        assert shard["sha256"] == hashlib.sha256((a / shard["file"]).read_bytes()).hexdigest()
    b = prepare(source, tmp_path / "b", shard_tokens=7, val_every=3, workers=1, verbose=False)
    fingerprint = data_fingerprint(a)
    assert fingerprint == data_fingerprint(b)  # the same data elsewhere
    assert set(fingerprint) == {"fingerprint", "train", "val"} and fingerprint["train"].endswith(" tokens")
    prepare(source, b, shard_tokens=11, val_every=3, workers=1, verbose=False)
    assert data_fingerprint(b)["fingerprint"] != fingerprint["fingerprint"]  # re-cut into other shards
    prepare(source, b, shard_tokens=7, val_every=4, workers=1, verbose=False)
    assert data_fingerprint(b)["fingerprint"] != fingerprint["fingerprint"]  # other documents in val


def test_binary_data_named_txt_is_refused(tmp_path, capsys):
    junk = tmp_path / "random.txt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"text source .*random.txt: [\d,]+ of its [\d,]+ characters \(\d+%\) are "
                                        r"not UTF-8 text or are control characters: it looks like binary data"):
        prepare(f"text:{junk}", tmp_path / "out", workers=1, verbose=False)
    assert not (tmp_path / "out").exists() or not list(visible(tmp_path / "out"))
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text " * 100)
    (folder / "b.txt").write_bytes("caf\xe9 in latin-1 ".encode("latin-1") * 20)  # a few undecodable bytes
    out = prepare(f"text:{folder}", tmp_path / "ok", val_every=2, workers=1, verbose=False)
    assert is_prepared(out)
    assert "warning: text source " + str(folder / "b.txt") + ": 20 characters are not UTF-8 text" in \
        capsys.readouterr().err


@pytest.mark.parametrize("manifest, message", [
    ([], "not a manifest"),
    ({"format_version": 1, "source": "x"}, "not a manifest"),
    ({"format_version": 1, "source": "x", "splits": {"train": {"shards": []}}}, "splits.train.shards must be"),
    ({"format_version": 1, "source": "x", "splits": {"train": {"shards": [{"file": "../secret.bin", "tokens": 9}]},
                                                     "val": {"shards": [{"file": "v.bin", "tokens": 9}]}}},
     "train shard '../secret.bin' is not a file name in .*; refusing a manifest that points outside its folder"),
    ({"format_version": 1, "source": "x", "splits": {"train": {"shards": [{"file": "/etc/passwd", "tokens": 9}]},
                                                     "val": {"shards": [{"file": "v.bin", "tokens": 9}]}}},
     "points outside its folder"),
    ({"format_version": 1, "source": "x", "splits": {"train": {"shards": [{"file": "t.bin", "tokens": "9"}]},
                                                     "val": {"shards": [{"file": "v.bin", "tokens": 9}]}}},
     "is not {\"file\": NAME, \"tokens\": N >= 1}"),
    ("not json", "not a valid manifest"),
], ids=["list", "no-splits", "empty-shards", "dotdot", "absolute", "tokens-str", "not-json"])
def test_malformed_manifests_are_errors_naming_the_file(tmp_path, manifest, message):
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=message) as excinfo:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(excinfo.value)
    assert not is_prepared(tmp_path)


def test_every_shard_is_checked_when_the_data_is_opened(tmp_path):
    out = prepare_documents(LOADER_DOCS, tmp_path / "d", shard_tokens=64, val_every=5, workers=1, verbose=False)
    shards = load_manifest(out)["splits"]["train"]["shards"]
    last = out / shards[-1]["file"]
    raw = bytearray(last.read_bytes())
    raw[0:4] = np.int32(7).tobytes()  # a bad header in the shard a run would reach last
    last.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"shard {last}: bad magic number 7"):
        DataLoader(out, "train", 2, 8)
    write_shard(last, np.arange(shards[-1]["tokens"] + 3))  # a valid shard, but not the size the manifest lists
    with pytest.raises(DataError, match=rf"shard {last}: holds [\d,]+ tokens, but the manifest lists"):
        DataLoader(out, "train", 2, 8)


def test_shard_tokens_out_of_range_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        data.main(["prepare", "pystdlib", "--out", str(tmp_path / "o"), "--shard-tokens", str(10**12)])
    assert excinfo.value.code == 2 and "--shard-tokens must be >= 1 and <= 2,147,483,647 (a shard header stores " \
        "the count as an int32); got 1,000,000,000,000" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard_tokens <= 2,147,483,647"):
        prepare_documents(["a", "b"], tmp_path / "o", shard_tokens=2**31, verbose=False)
    assert not (tmp_path / "o").exists()


def test_full_disk_and_unwritable_out_are_one_line_errors(tmp_path, text_corpus, monkeypatch):
    out = prepare(f"text:{text_corpus}", tmp_path / "out", shard_tokens=7, val_every=3, workers=1, verbose=False)
    before = folder_bytes(out)
    disk_full(monkeypatch, room=1000)
    with pytest.raises(SystemExit, match=r"^error: .*out/.staging-\w+ is out of space: writing (train|val)_000000.bin "
                                         r"needs about 1.0 kB \(.* free\); free some space and try again$"):
        data.main(["prepare", f"text:{text_corpus}", "--out", str(out), "--shard-tokens", "7", "--val-every", "3",
                   "--workers", "1"])
    monkeypatch.undo()
    assert folder_bytes(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == [
        ".prepare.lock"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=rf"^error: prepare: output folder {tmp_path}/file/data: {tmp_path}/file is "
                                         rf"a file, not a folder$"):
        data.main(["prepare", f"text:{text_corpus}", "--out", str(tmp_path / "file" / "data")])


def test_sweep_takes_only_what_a_dead_prepare_left(tmp_path):
    out = prepare_documents(["one doc", "two docs", "three"], tmp_path / "d", val_every=2, workers=1, verbose=False)
    (out / ".staging-abc123").mkdir()
    (out / ".manifest.json.0123abcd.tmp").write_text("{")
    lock = FolderLock(out / data.PREPARE_LOCK)  # a prepare is running there
    assert lock.acquire()
    try:
        assert data.sweep_data_dir(out) == []
    finally:
        lock.release()
    assert sorted(p.name for p in data.sweep_data_dir(out)) == [".manifest.json.0123abcd.tmp", ".staging-abc123"]
    assert data.sweep_data_dir(tmp_path) == []  # never prepared here: nothing of ours


def test_sigterm_during_prepare_removes_its_staging_folder(tmp_path, text_corpus):
    code = ("import sys, time\n"
            "from gpt2_triton.data import cli, pipeline\n"
            "real = pipeline.tokenize_document\n"
            "def slow(text):\n"
            "    print('tokenizing', flush=True); time.sleep(60); return real(text)\n"
            "pipeline.tokenize_document = slow\n"
            f"cli.main(['prepare', 'text:{text_corpus}', '--out', {str(tmp_path / 'out')!r}, '--workers', '1'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "tokenizing\n"
        assert any(p.name.startswith(".staging-") for p in (tmp_path / "out").iterdir())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".prepare.lock"]
