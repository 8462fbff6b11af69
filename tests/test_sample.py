"""python -m gpt2.sample: prints samples from a checkpoint / HF folder, deterministic for a seed."""
import pytest
import torch

from gpt2 import sample

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
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
