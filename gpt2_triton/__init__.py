"""gpt2-triton: GPT-2 (124M) whose hot paths are hand-written Triton kernels.

    from gpt2_triton import GPT, GPTConfig
    model = GPT.from_pretrained("gpt2")            # Hugging Face's weights (needs transformers)

Parts: `gpt2_triton.kernels` (the Triton ops and their PyTorch references), `gpt2_triton.model` (GPT-2 and
the switch that picks each op's implementation), `gpt2_triton.training` (the trainer `train.py` runs),
the tools beside them (`data`, `tokenizer`, `checkpoint`, `hf`, `export`, `sample`, `hellaswag`) and
`gpt2_triton.bench`. `python -m gpt2_triton.train` (or `gpt2-triton-train`) trains.
"""

__version__ = "0.1.0"  # pyproject.toml reads the package's version from here
__all__ = ["GPTConfig", "GPT"]


def __getattr__(name):  # lazy: data-prep workers import gpt2_triton.data without torch start-up
    if name in __all__:
        from gpt2_triton import model
        return getattr(model, name)
    raise AttributeError(f"module 'gpt2_triton' has no attribute {name!r}")
