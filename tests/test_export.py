"""gpt2_triton.export.save_pretrained / python -m gpt2_triton.export: a folder transformers loads with equal
logits and loss."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_triton import GPT, GPTConfig, export
from gpt2_triton.checkpoint import save_checkpoint
from gpt2_triton.export import save_pretrained
from gpt2_triton.hf import from_pretrained

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = GPTConfig.from_preset("tiny", vocab_size=97, block_size=24, n_embd=32, n_head=2, n_layer=2,
                               pad_vocab_to=64)


def make_model(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG).eval()


def test_transformers_loads_export_with_equal_logits_and_loss(tmp_path):
    model = make_model()
    out = save_pretrained(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 97 and config["n_positions"] == 24 and config["model_type"] == "gpt2"
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.transformer.wte.weight.shape == (97, 32)  # padded rows dropped
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    idx = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = hf(idx, labels=idx)
        logits = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(hf_out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_out.loss, loss, atol=1e-6, rtol=1e-6)
    back = from_pretrained(str(out)).eval()  # and our own loader reads it back
    with torch.no_grad():
        torch.testing.assert_close(back(idx), logits, atol=0, rtol=0)


def test_safetensors_file_matches_the_format():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = make_model()
    tensors = export.hf_state_dict(model, torch.bfloat16)
    buf = io.BytesIO()
    export.write_safetensors(buf, tensors)
    loaded = safetensors_torch.load(buf.getvalue())
    assert loaded.keys() == tensors.keys() and "lm_head.weight" not in loaded
    for name, t in tensors.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], t), name
    fc = model.transformer.h[1].mlp.c_fc.weight  # nn.Linear (out, in) -> Conv1D (in, out)
    assert torch.equal(loaded["transformer.h.1.mlp.c_fc.weight"], fc.t().to(torch.bfloat16))


def test_refuses_non_empty_dir_and_overwrites_when_asked(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    save_pretrained(make_model(0), out)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(make_model(1), out)
    save_pretrained(make_model(1), out, overwrite=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    torch.testing.assert_close(hf.transformer.wpe.weight, make_model(1).transformer.wpe.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or old folders left


def test_failed_export_leaves_previous_folder_intact(tmp_path, monkeypatch):
    out = save_pretrained(make_model(0), tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(f, tensors):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(1), out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(1), tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_exports_a_run_folder_without_transformers(tmp_path):
    model = make_model(2)
    run = tmp_path / "run"
    save_checkpoint(run / "ckpt_000010.pt", {"model": model.state_dict(), "model_config": CONFIG.to_dict(),
                                             "kernels": "torch"})
    out = tmp_path / "hf"
    code = ("import sys; sys.modules['transformers'] = None\n"  # importing transformers now fails
            "from gpt2_triton.export import main\n"
            f"main(['--init', {str(run)!r}, '--out', {str(out)!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        export.main(["--init", str(run), "--out", str(out)])
