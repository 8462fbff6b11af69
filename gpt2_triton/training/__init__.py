"""Training GPT-2: the configuration and its flags (`config`), processes (`distributed`), one optimizer step
(`step`), the run folder (`run_dir`), the trainer and its loop (`trainer`) and what it logs (`metrics`).
`gpt2_triton.train` (and `train.py` at the repository root, calling it) is the command line over these.

Names load on first use: `gpt2_triton.training.step` (what the bench times) needs neither the tokenizer
nor the data tools that the trainer imports.
"""
import importlib

_NAMES = {
    "ConfigError": "errors", "NonFiniteError": "errors",
    "TrainConfig": "config", "build_parser": "config", "make_config": "config", "parse_config": "config",
    "accumulate_gradients": "step", "train_step": "step", "StepSettings": "step", "model_loss": "step",
    "Trainer": "trainer", "TrainingInterrupted": "trainer",
    "exit_on_errors": "trainer", "train": "trainer",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"gpt2_triton.training.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'gpt2_triton.training' has no attribute {name!r}")
