"""The installed package, used from whatever folder this runs in (CI runs it outside the repo, next to
Hugging Face's `kernels` package, which transformers >= 5.25 requires):

    python tests/installed_smoke.py            # from any folder; exits non-zero on the first failure

- every file of gpt2-triton and of Hugging Face's `kernels` is as installed, and `kernels` (when installed)
  is not shadowed by anything of ours;
- our Triton ops import and run (through the interpreter on a CPU);
- GPT(..., kernels="triton") trains a step;
- transformers' GPT2LMHeadModel builds and loads our save_pretrained output in the same process, with our
  logits (when transformers is installed).
"""
import os
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported


def verify_installed_files(*distributions: str) -> None:
    """Every file each installed distribution's RECORD lists is present with its recorded SHA-256: one
    package's install did not overwrite or remove the other's files."""
    import base64
    import hashlib
    from importlib import metadata

    for name in distributions:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            print(f"{name}: not installed")
            continue
        checked = 0
        for f in dist.files or ():
            if f.hash is None:
                continue
            path = Path(f.locate())
            assert path.is_file(), f"{name}: {path} is missing"
            digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, path.read_bytes()).digest()).rstrip(b"=")
            assert digest.decode() == f.hash.value, f"{name}: {path} differs from what {name} installed"
            checked += 1
        print(f"{name} {dist.version}: {checked} installed files intact")


def main() -> None:
    verify_installed_files("gpt2-triton", "kernels")
    import gpt2_triton
    from gpt2_triton import GPT, GPTConfig
    from gpt2_triton.export import save_pretrained
    from gpt2_triton.kernels import layer_norm

    where = Path(gpt2_triton.__file__).resolve().parent
    print(f"gpt2_triton from {where}")
    try:
        import kernels as hf_kernels  # Hugging Face's package, if installed: ours must not shadow it
    except ImportError:
        hf_kernels = None
    if hf_kernels is not None:
        assert not hasattr(hf_kernels, "flash_attention"), f"`kernels` resolves to this project: {hf_kernels.__file__}"
        print(f"Hugging Face kernels {getattr(hf_kernels, '__version__', '?')} from {hf_kernels.__file__}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(5, 24, device=device)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    expected = torch.nn.functional.layer_norm(x, (24,), w, b)
    torch.testing.assert_close(layer_norm(x, w, b), expected, atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=96, pad_vocab_to=64)
    model = GPT(config, kernels="triton").to(device)
    optimizer = model.configure_optimizer(0.1, 1e-2)
    idx = torch.randint(0, config.vocab_size, (2, 16), device=device)
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    print(f"GPT(kernels='triton') trained a step: loss {loss.item():.4f}")

    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping the Hugging Face round trip")
        return
    hf_config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=96,
                                        bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is past 96
    transformers.GPT2LMHeadModel(hf_config)  # builds beside our package
    model = model.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pretrained(model, Path(tmp) / "hf")
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        with torch.no_grad():
            ours, theirs = model(idx.cpu()), hf_model(idx.cpu()).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    print(f"transformers {transformers.__version__}: GPT2LMHeadModel loads our save_pretrained output, same logits")


if __name__ == "__main__":
    main()
    print("ok")
