"""Optional logging sinks beside metrics.jsonl: TensorBoard and Weights & Biases, fed the same records.

Only when asked for (`--log-to tensorboard,wandb`) and installed: a missing package is refused before the run
starts, in one line. W&B runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later).
Each record's numeric fields become scalars named "<kind>/<field>" at its "step".
"""
import importlib.util
import os
from pathlib import Path

SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package it needs


def parse_sinks(text: str) -> tuple:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); "" -> ()."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in SINKS:
            raise ValueError(f"--log-to: unknown sink {name!r}; choose from {', '.join(SINKS)}")
    return names


def sinks_problem(text: str) -> str | None:
    """Why the sinks in `text` cannot be used here (unknown, or their package is not installed), or None."""
    try:
        names = parse_sinks(text)
    except ValueError as e:
        return str(e)
    missing = [SINKS[n] for n in names if importlib.util.find_spec(SINKS[n]) is None]
    if missing:
        return f"--log-to {text}: {', '.join(missing)} not installed (pip install {' '.join(missing)})"
    return None


def scalars(record: dict) -> dict:
    """{"<kind>/<field>": value} for a record's numeric fields (step and booleans aside)."""
    kind = record["kind"]
    return {f"{kind}/{k}": v for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("train_config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict):
        import wandb
        self.run = wandb.init(project="gpt2-triton", name=Path(run_dir).name, dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"), resume="allow")

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


def open_sinks(text: str, run_dir: Path, config: dict) -> list:
    """The sinks `text` names, opened on the run folder (after the config check has refused missing ones)."""
    kinds = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
    return [kinds[name](run_dir, config) for name in parse_sinks(text)]
