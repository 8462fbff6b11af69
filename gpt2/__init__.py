"""GPT-2 exactly as OpenAI shipped it, with a switch that runs its hot ops as Triton kernels."""

__all__ = ["GPTConfig", "GPT"]


def __getattr__(name):  # lazy: data-prep workers import gpt2.data without torch/triton start-up
    if name == "GPTConfig":
        from gpt2.config import GPTConfig
        return GPTConfig
    if name == "GPT":
        from gpt2.model import GPT
        return GPT
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
