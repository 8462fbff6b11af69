"""--log-to: TensorBoard and W&B get the records metrics.jsonl gets (numeric fields as "<kind>/<field>" at
their step), only when asked for; a sink whose package is missing is refused before anything is written."""
import sys
import types

import pytest
from test_train import synthetic_documents, tiny_config

from gpt2_triton import training
from gpt2_triton.data import prepare_documents
from gpt2_triton.training import sinks
from gpt2_triton.training.errors import ConfigError
from gpt2_triton.training.metrics import read_metrics


class FakeWriter:  # torch.utils.tensorboard.SummaryWriter
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.texts, self.closed = log_dir, [], [], False
        FakeWriter.made.append(self)

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def add_text(self, name, text):
        self.texts.append(name)

    def close(self):
        self.closed = True


class FakeRun:  # what wandb.init returns
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((values, step))

    def finish(self):
        self.finished = True


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_documents(synthetic_documents(), tmp_path_factory.mktemp("data"), source="synthetic",
                             shard_tokens=1500, val_every=6, workers=0, verbose=False)


@pytest.fixture
def fake_packages(monkeypatch):
    runs = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    real = sinks.importlib.util.find_spec
    installed = ("wandb", "tensorboard")
    monkeypatch.setattr(sinks.importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace() if name in installed else real(name, *a))
    FakeWriter.made.clear()
    return runs


def test_sinks_get_the_metrics_records(data_dir, tmp_path, fake_packages, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    training.train(tiny_config(data_dir, run_dir, max_steps=3, val_every=3, log_to="tensorboard,wandb"))
    records = read_metrics(run_dir / "metrics.jsonl")
    want = [(name, value, r.get("step", 0)) for r in records for name, value in sinks.scalars(r).items()]
    assert {"train/loss", "train/lr", "train/grad_norm", "val/val_loss"} <= {name for name, _, _ in want}
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(run_dir / "tensorboard") and writer.closed and writer.texts == ["train_config"]
    assert writer.scalars == want
    (run,) = fake_packages
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(run_dir) and run.finished
    assert run.kwargs["config"]["log_to"] == "tensorboard,wandb"
    assert [(name, value, step) for values, step in run.logged for name, value in values.items()] == want


def test_missing_or_unknown_sink_is_refused_before_anything_is_written(data_dir, tmp_path, monkeypatch):
    real = sinks.importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for log_to, message in (("wandb", r"^--log-to wandb: wandb not installed \(pip install wandb\)$"),
                            ("tensorbord", r"^--log-to: unknown sink 'tensorbord'; choose from tensorboard, wandb$")):
        with pytest.raises(ConfigError, match=message):
            training.train(tiny_config(data_dir, tmp_path / "run", log_to=log_to))
    assert not (tmp_path / "run").exists()
