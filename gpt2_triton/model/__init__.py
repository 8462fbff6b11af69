"""GPT-2 as OpenAI shipped it (`gpt.py`), its configuration and presets (`config.py`) and the one switch
that picks each hot op's implementation, torch or Triton (`ops.py`). Nothing here knows about checkpoints,
Hugging Face or training: those sit above the model and import it."""
from gpt2_triton.model.config import GPTConfig
from gpt2_triton.model.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
