"""python -m gpt2_triton.sample: prints samples from a checkpoint / HF folder, deterministic for a seed;
bad flags are one-line errors before any model loads."""
import pytest
import torch

from gpt2_triton import GPT, GPTConfig, sample
from gpt2_triton.checkpoint import save_checkpoint


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


def test_temperature_0_is_greedy_whatever_the_seed(hf_dir):
    from gpt2_triton.checkpoint import load_model
    args = ["--init", str(hf_dir), "--num-samples", "1", "--max-new-tokens", "5", "--temperature", "0",
            "--device", "cpu"]
    greedy = sample.main(args + ["--seed", "1"])
    assert sample.main(args + ["--seed", "2"]) == greedy
    model = load_model(str(hf_dir), device="cpu").eval()
    idx = torch.tensor([sample.get_encoding().encode("Hello, I'm a language model,")])
    for _ in range(5):
        idx = torch.cat([idx, model(idx)[:, -1, :model.config.vocab_size].argmax(-1, keepdim=True)], dim=1)
    assert greedy == [sample.get_encoding().decode(idx[0].tolist())]


def test_prefixes_of_flags_are_not_taken_for_them(capsys):
    with pytest.raises(SystemExit) as excinfo:
        sample.main(["--init", "no-such-model", "--max-new", "3"])
    assert excinfo.value.code == 2 and "unrecognized arguments: --max-new 3" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, rule", [
    ("--max-new-tokens", "-5", ">= 1"), ("--max-new-tokens", "0", ">= 1"), ("--num-samples", "0", ">= 1"),
    ("--top-k", "0", ">= 1"), ("--temperature", "-1.0", "0 (greedy) or >= 1e-06"),
    ("--temperature", "nan", "0 (greedy) or >= 1e-06"), ("--temperature", "1e-45", "0 (greedy) or >= 1e-06"),
    ("--seed", "-1", ">= 0"),
])
def test_bad_flags_are_rejected_before_loading(flag, value, rule, capsys):
    with pytest.raises(SystemExit) as excinfo:
        sample.main(["--init", "no-such-model", flag, value])
    assert excinfo.value.code == 2
    assert f"{flag} must be {rule}; got {value}" in capsys.readouterr().err


def test_missing_init_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: load_model: .*missing.pt does not exist$"):
        sample.main(["--init", str(tmp_path / "missing.pt"), "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        sample.main(["--init", "no-such-model", "--device", "cuda"])
    assert excinfo.value.code == 2
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_triton_kernels_on_cpu_without_the_interpreter_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as excinfo:
        sample.main(["--init", "no-such-model", "--device", "cpu", "--kernels", "triton"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "Triton kernels (layer_norm, attention, gelu_mlp, cross_entropy, linear, " \
        "embedding) need a CUDA GPU, and there is none. To run them on the CPU through Triton's interpreter " \
        "(slow), set TRITON_INTERPRET=1" in err


def tiny_checkpoint(path, **config_changes):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300, pad_vocab_to=64))
    return save_checkpoint(path, {"model": model.state_dict(), "kernels": "torch",
                                  "model_config": {**model.config.to_dict(), **config_changes}})


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is corrupt or not a checkpoint"),
    ("unknown key", "has a model_config that is not a GPTConfig"),
    ("layers", "its weights do not fit its model_config"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, damage, message):
    if damage == "truncate":
        path = tiny_checkpoint(tmp_path / "c.pt")
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path = tiny_checkpoint(tmp_path / "c.pt", **({"bias": False} if damage == "unknown key" else {"n_layer": 5}))
    with pytest.raises(SystemExit) as excinfo:
        sample.main(["--init", str(path), "--device", "cpu", "--max-new-tokens", "2"])
    text = str(excinfo.value.code)
    assert text.startswith("error: ") and message in text and str(path) in text and "\n" not in text
