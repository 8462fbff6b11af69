"""python -m gpt2_triton.sample: prints samples from a checkpoint / HF folder, deterministic for a seed;
bad flags are one-line errors before any model loads."""
import pytest
import torch

from gpt2_triton import sample


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)
    path = tmp_path_factory.mktemp("hf_tiny")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_sample_cli_is_deterministic(hf_dir, capsys):
    args = ["--init", str(hf_dir), "--prompt", "Hello, I'm a language model,", "--num-samples", "2",
            "--max-new-tokens", "6", "--top-k", "20", "--seed", "3", "--device", "cpu"]
    first = sample.main(args)
    printed = capsys.readouterr().out
    assert len(first) == 2 and all(s.startswith("Hello, I'm a language model,") for s in first)
    assert "--- sample 0 ---" in printed and first[1] in printed
    assert sample.main(args) == first
    assert sample.main(args[:-3] + ["7", "--device", "cpu"]) != first


@pytest.mark.parametrize("flag, value, rule", [
    ("--max-new-tokens", "-5", ">= 1"), ("--max-new-tokens", "0", ">= 1"), ("--num-samples", "0", ">= 1"),
    ("--top-k", "0", ">= 1"), ("--temperature", "0", "> 0"), ("--temperature", "nan", "> 0"), ("--seed", "-1", ">= 0"),
])
def test_bad_flags_are_rejected_before_loading(flag, value, rule, capsys):
    with pytest.raises(SystemExit) as excinfo:
        sample.main(["--init", "no-such-model", flag, value])
    assert excinfo.value.code == 2
    assert f"{flag} must be {rule}; got {value}" in capsys.readouterr().err


def test_missing_init_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: load_model: .*missing.pt does not exist$"):
        sample.main(["--init", str(tmp_path / "missing.pt"), "--device", "cpu"])
