"""HellaSwag scoring (build-nanogpt's): acc by total ending loss, acc_norm by mean; clear data errors."""
import json
import math
import time
import urllib.error

import pytest
import torch

from gpt2_triton import GPT, GPTConfig, hellaswag
from gpt2_triton.checkpoint import save_checkpoint
from gpt2_triton.tokenizer import get_encoding
from tests.helpers import overwrite_tensor_bytes

V = 50257
CONFIDENCE = [0.0, 4.0, 2.0, 1.0]  # the stub's logit on the true next token, per ending row


class StubModel:
    """forward(tokens (4, L)) -> logits (4, L, V): row i puts CONFIDENCE[i] on the true next token and 0
    elsewhere, so every token of row i costs l_i = log(e^c_i + V - 1) - c_i."""

    def __call__(self, tokens):
        logits = torch.zeros(*tokens.shape, V)
        for i, c in enumerate(CONFIDENCE):
            logits[i, torch.arange(tokens.size(1) - 1), tokens[i, 1:]] = c
        return logits


def per_token_loss(c):
    return math.log(math.exp(c) + V - 1) - c  # l = [10.82, 6.83, 8.83, 9.82] for c = [0, 4, 2, 1]


EXAMPLES = [  # " dog" is one token; so each ending has as many tokens as words
    # lengths [1,1,1,1]: totals = l -> argmin 1; means -> 1. label 1: acc right, acc_norm right
    {"ctx": "The cat sat on the", "endings": ["dog", "dog", "dog", "dog"], "label": 1},
    # lengths [1,5,1,1]: totals [10.8, 34.1, 8.8, 9.8] -> 2; means -> 1. label 2: acc right, acc_norm wrong
    {"ctx": "A man walks", "endings": ["dog", "dog dog dog dog dog", "dog", "dog"], "label": 2},
    # lengths [2,3,3,1]: totals [21.7, 20.5, 26.5, 9.8] -> 3; means -> 1. label 0: both wrong
    {"ctx": "Then", "endings": ["dog dog", "dog dog dog", "dog dog dog", "dog"], "label": 0},
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    return path


def test_render_example_masks_the_ending_tokens():
    enc = get_encoding()
    tokens, mask, label = hellaswag.render_example(EXAMPLES[1], enc)
    ctx = enc.encode(EXAMPLES[1]["ctx"])
    assert label == 2 and tokens.shape == mask.shape == (4, len(ctx) + 5)
    assert mask.sum(dim=1).tolist() == [1, 5, 1, 1]
    for row, ending in zip(range(4), EXAMPLES[1]["endings"]):
        n = len(enc.encode(" " + ending))
        assert tokens[row, : len(ctx)].tolist() == ctx
        assert tokens[row, len(ctx): len(ctx) + n].tolist() == enc.encode(" " + ending)  # leading space
        assert mask[row, len(ctx): len(ctx) + n].all() and not mask[row, len(ctx) + n:].any()
    cropped, cropped_mask, _ = hellaswag.render_example(EXAMPLES[1], enc, max_len=4)
    assert cropped.shape == (4, 4) and cropped_mask[1].tolist() == [1, 1, 1, 1]  # context cropped first


def test_predict_on_given_losses():
    # losses[i, t] is the loss of token t+1; the mask is over tokens, so mask[:, 1:] selects the losses
    losses = torch.tensor([[9.0, 0.3, 0.3], [9.0, 0.5, 0.0], [9.0, 2.0, 0.0], [9.0, 0.2, 0.9]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    # totals [0.6, 0.5, 2.0, 1.1] -> 1; means [0.3, 0.5, 2.0, 0.55] -> 0
    assert hellaswag.predict(losses, mask) == (1, 0)
    mask[3] = torch.tensor([0, 0, 1, 0])  # row 3: total = mean = 0.2, the lowest of both
    assert hellaswag.predict(losses, mask) == (3, 3)


def test_scores_match_hand_computation(jsonl):
    assert [round(per_token_loss(c), 2) for c in CONFIDENCE] == [10.82, 6.83, 8.83, 9.82]
    examples = hellaswag.load_examples(jsonl)
    result = hellaswag.evaluate_hellaswag(StubModel(), examples, "cpu")
    assert result["n"] == 3 and result["correct"] == 2 and result["correct_norm"] == 1
    assert result["acc"] == pytest.approx(2 / 3) and result["acc_norm"] == pytest.approx(1 / 3)
    # ranks take every world_size-th example; their counts add up to the whole
    parts = [hellaswag.evaluate_hellaswag(StubModel(), examples, "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert [p["n"] for p in parts] == [2, 1] and sum(p["correct"] for p in parts) == 2


def test_runs_with_a_real_tiny_model(jsonl):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=8)).train()
    result = hellaswag.evaluate_hellaswag(model, hellaswag.load_examples(jsonl, limit=2), "cpu")
    assert result["n"] == 2 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    assert model.training  # mode restored


def test_bad_file_and_limit(tmp_path, jsonl):
    assert len(hellaswag.load_examples(jsonl, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not an example"):
        hellaswag.load_examples(bad)


def test_no_network_and_no_file_is_a_clear_quick_error(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", offline)
    monkeypatch.setattr(hellaswag, "default_path", lambda: tmp_path / "cache" / "hellaswag_val.jsonl")
    with pytest.raises(RuntimeError, match=r"no data file at .*hellaswag_val.jsonl and downloading .* failed.*--data"):
        hellaswag.find_data()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hellaswag.find_data(tmp_path / "nowhere.jsonl")
    with pytest.raises(SystemExit, match="does not exist"):
        hellaswag.main(["--init", "gpt2", "--data", str(tmp_path / "nowhere.jsonl")])


def test_unreachable_server_fails_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(RuntimeError, match="pass --data PATH"):
        hellaswag.download(tmp_path / "h.jsonl", url="http://127.0.0.1:9/hellaswag_val.jsonl", timeout=2)
    assert time.time() - t0 < 10 and not (tmp_path / "h.jsonl").exists()


GOOD = {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 0}


@pytest.mark.parametrize("lines, message", [
    ([GOOD, "{not json"], r"bad.jsonl:2 is not valid JSON"),
    ([{**GOOD, "label": 4}], r"bad.jsonl:1: label must be 0, 1, 2 or 3; got 4"),
    ([{**GOOD, "label": -1}], r"bad.jsonl:1: label must be 0, 1, 2 or 3; got -1"),
    ([{**GOOD, "label": "two"}], r"bad.jsonl:1: label must be 0, 1, 2 or 3; got 'two'"),
    ([{**GOOD, "label": True}], r"bad.jsonl:1: label must be 0, 1, 2 or 3; got True"),
    ([{**GOOD, "endings": ["a", "b", "c", 5]}], r"bad.jsonl:1 is not an example .*list of 4 strings"),
    ([[1, 2]], r"bad.jsonl:1 is not an example"),
    (["", ""], r"bad.jsonl holds no examples"),
    ([], r"bad.jsonl holds no examples"),
], ids=["not-json", "label-4", "label-neg", "label-word", "label-bool", "ending-int", "a-list", "blank", "empty"])
def test_malformed_files_are_clear_errors(tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        hellaswag.load_examples(bad)
    with pytest.raises(SystemExit, match="^error: HellaSwag: .*bad.jsonl"):  # before any model is loaded
        hellaswag.main(["--init", "no-such-model", "--data", str(bad)])


def test_label_as_digit_string_and_limit_checks(tmp_path, jsonl, capsys):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({**GOOD, "label": "2"}) + "\n")
    assert hellaswag.load_examples(path)[0]["label"] == 2
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit must be >= 1"):
            hellaswag.load_examples(jsonl, limit=limit)
        with pytest.raises(SystemExit) as excinfo:
            hellaswag.main(["--init", "no-such-model", "--data", str(jsonl), "--limit", str(limit)])
        assert excinfo.value.code == 2 and f"--limit must be >= 1; got {limit}" in capsys.readouterr().err


def test_a_changed_checkpoint_is_refused_in_one_line(tmp_path, jsonl):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=8))
    path = save_checkpoint(tmp_path / "ckpt_000001.pt", {"model": model.state_dict(),
                                                         "model_config": model.config.to_dict()})
    args = ["--init", str(path), "--data", str(jsonl), "--device", "cpu"]
    assert hellaswag.main(args)["n"] == len(EXAMPLES)
    weight = model.transformer.h[0].mlp.c_fc.weight
    overwrite_tensor_bytes(path, weight, (weight.detach().reshape(-1)[:1024] * 2).numpy().tobytes())
    with pytest.raises(SystemExit, match=rf"^error: checkpoint {path} is corrupt: its contents do not match the "
                                         r"checksum saved with it \(the file changed after it was saved\)$"):
        hellaswag.main(args)


def test_the_cache_is_in_the_user_cache_folder_whatever_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert hellaswag.default_path() == tmp_path / "xdg" / "gpt2_triton" / "hellaswag" / "hellaswag_val.jsonl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cache = tmp_path / "home" / ".cache"
    assert hellaswag.default_path() == cache / "gpt2_triton" / "hellaswag" / "hellaswag_val.jsonl"
