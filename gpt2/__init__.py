"""GPT-2 exactly as OpenAI shipped it, with a switch that runs its hot ops as Triton kernels."""
from gpt2.config import GPTConfig
from gpt2.model import GPT

__all__ = ["GPTConfig", "GPT"]
