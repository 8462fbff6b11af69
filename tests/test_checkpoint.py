"""Checkpoints: round trip, an interrupted save keeps the old file, checksums (a changed file is refused, pruning
keeps the newest good one), a full disk, RNG states, load_model(init) and its one-line errors."""
import random

import numpy as np
import pytest
import torch

from gpt2_triton import GPT, GPTConfig
from gpt2_triton import checkpoint as ckpt
from gpt2_triton.atomic import OutOfSpaceError
from gpt2_triton.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    checkpoint_path,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    newest_verified_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpt2_triton.model.gpt import unwrap_model
from tests.helpers import disk_full, overwrite_tensor_bytes


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=300, pad_vocab_to=64))


def training_state(model, step):
    optimizer = model.configure_optimizer(0.1, 1e-3)
    _, loss = model(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8)))
    loss.backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "loader": [{"epoch": 0, "shard": 1, "offset": 128, "seed": 1337}], "rng": [rng_state()],
            "model_config": model.config.to_dict(), "kernels": model.kernels, "best_val_loss": 5.5}


def test_round_trip(tmp_path):
    model = tiny_model()
    state = training_state(model, step=7)
    path = save_checkpoint(checkpoint_path(tmp_path, 7), state)
    assert path.name == "ckpt_000007.pt"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["loader"] == state["loader"] and loaded["best_val_loss"] == 5.5
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    opt_a, opt_b = state["optimizer"]["state"], loaded["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert loaded["rng"] == state["rng"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = save_checkpoint(checkpoint_path(tmp_path, 1), {"step": 1, "weights": torch.arange(1000.0)})
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):  # write half the bytes, then die
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", half_save)
    for step in (1, 2):  # overwrite the same file, and write a newer one
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(checkpoint_path(tmp_path, step), {"step": step, "weights": torch.zeros(1000)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt"]  # no stray temp files
    assert latest_checkpoint(tmp_path) == good
    state = load_checkpoint(good)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(1000.0))


def test_stray_temp_file_is_never_latest(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 3), {"step": 3})
    (tmp_path / ".ckpt_000009.pt.tmp-123").write_bytes(b"half")  # left by a kill -9
    (tmp_path / "ckpt_notes.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "ckpt_000003.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "ckpt_000001.pt"
    bad.write_bytes(b"definitely not a zip archive")
    with pytest.raises(CheckpointError, match=r"corrupt or not a checkpoint \(UnpicklingError: Unsupported operand"):
        load_checkpoint(bad)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither ckpt_<step>.pt files nor config.json"):
        load_model(empty)


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["ckpt_000005.pt", "ckpt_000010.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000015.pt", "ckpt_000020.pt"]


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_unwrap_model():
    model = tiny_model()
    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model  # compiling is lazy: nothing runs here


def test_load_model_from_checkpoint_file_and_run_folder(tmp_path):
    model = tiny_model(seed=1)
    save_checkpoint(checkpoint_path(tmp_path, 1), training_state(tiny_model(seed=2), step=1))
    state = training_state(model, step=2)
    save_checkpoint(checkpoint_path(tmp_path, 2), state)
    idx = torch.randint(0, 300, (2, 10))
    expected = model.eval()(idx)
    (tmp_path / "config.json").write_text("{}")  # a run folder's own json files must not look like HF
    for init in (checkpoint_path(tmp_path, 2), tmp_path, str(tmp_path)):  # a file; a run folder -> latest
        loaded = load_model(init)
        assert not loaded.training and loaded.config == model.config
        torch.testing.assert_close(loaded(idx), expected, atol=0, rtol=0)


def test_load_model_rejects_foreign_file(tmp_path):
    save_checkpoint(tmp_path / "other.pt", {"weights": torch.ones(3)})
    with pytest.raises(ValueError, match="lacks.*model"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_load_model_from_hf_save_pretrained_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=40, vocab_size=300,
                                     bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (2, 32, 40)
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)


def test_load_model_uses_the_requested_kernels(tmp_path):
    save_checkpoint(tmp_path / "m.pt", training_state(tiny_model(), step=1))
    assert load_model(tmp_path / "m.pt", kernels="torch").kernels == {
        "layer_norm": "torch", "attention": "torch", "gelu_mlp": "torch", "cross_entropy": "torch", "linear": "torch",
        "embedding": "torch"}
    state = load_checkpoint(tmp_path / "m.pt")
    state["kernels"] = {**state["kernels"], "attention": "triton"}  # as a run with Triton attention saved it
    assert ckpt.model_from_checkpoint(state, kernels=None).kernels["attention"] == "triton"


def test_a_changed_checkpoint_fails_its_checksum(tmp_path):
    """1024 weights changed to other finite values: torch loads the file without a word; we refuse it."""
    state = training_state(tiny_model(), step=3)
    path = save_checkpoint(checkpoint_path(tmp_path, 3), state)
    assert load_checkpoint(path)[CHECKSUM_KEY].startswith("sha256:") and checkpoint_problem(path) is None
    weight = state["model"]["transformer.h.0.mlp.c_fc.weight"]
    overwrite_tensor_bytes(path, weight, (weight.reshape(-1)[:1024] + 0.5).numpy().tobytes())
    changed = torch.load(path, weights_only=True)["model"]["transformer.h.0.mlp.c_fc.weight"]
    assert torch.isfinite(changed).all() and not torch.equal(changed, weight)  # loads fine, silently wrong
    with pytest.raises(CheckpointError, match=r"ckpt_000003.pt is corrupt: its contents do not match the checksum"):
        load_checkpoint(path)
    assert "do not match the checksum" in checkpoint_problem(path)


def test_checkpoint_without_checksum_loads_with_a_note(tmp_path, capsys):
    state = training_state(tiny_model(), step=1)
    torch.save(state, tmp_path / "old.pt")  # as an earlier version saved it
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["step"] == 1 and CHECKSUM_KEY not in loaded
    assert "old.pt has no checksum (saved by an earlier version); loading it unverified" in capsys.readouterr().err
    assert checkpoint_problem(tmp_path / "old.pt") is None


def test_prune_never_removes_the_newest_checkpoint_that_verifies(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step, "w": torch.full((64,), float(step))})
    (checkpoint_path(tmp_path, 20)).write_bytes(b"random bytes, not a checkpoint")  # the newest is corrupt
    assert prune_checkpoints(tmp_path, keep=1) == [checkpoint_path(tmp_path, 5), checkpoint_path(tmp_path, 10)]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000015.pt", "ckpt_000020.pt"]
    skipped = []
    assert newest_verified_checkpoint(tmp_path, skipped) == checkpoint_path(tmp_path, 15)
    assert [p.name for p, _ in skipped] == ["ckpt_000020.pt"] and "corrupt or not a checkpoint" in skipped[0][1]


def test_full_disk_during_save_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch):
    good = save_checkpoint(checkpoint_path(tmp_path, 1), {"step": 1, "w": torch.arange(1000.0)})
    disk_full(monkeypatch, room=1000)
    with pytest.raises(OutOfSpaceError, match=rf"^{tmp_path} is out of space: writing ckpt_000001.pt needs about "
                                              rf"4.0 kB \([\d,.]+ .B free\); free some space and try again$"):
        save_checkpoint(good, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt"]  # temp file removed
    assert load_checkpoint(good)["step"] == 1


def test_load_model_of_a_run_folder_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
    model = tiny_model(seed=1)
    save_checkpoint(checkpoint_path(tmp_path, 1), training_state(model, step=1))
    checkpoint_path(tmp_path, 2).write_bytes(b"\x00" * 100)
    assert load_model(tmp_path).config == model.config
    assert "note: skipping " + str(checkpoint_path(tmp_path, 2)) in capsys.readouterr().err
    checkpoint_path(tmp_path, 1).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        load_model(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["model_config"].update(flash=True), "has a model_config that is not a GPTConfig .*unexpected keyword"),
    (lambda s: s["model_config"].update(n_layer=3),
     r"do not fit its model_config \(3 layers\): 12 missing \(e.g. transformer.h.2.ln_1.weight\)$"),
    (lambda s: s["model_config"].update(n_embd=48, n_head=2), "do not fit its model_config .*size mismatch"),
    (lambda s: s.update(model_config=[1, 2]), "has a model_config that is not a GPTConfig"),
], ids=["unknown-key", "wrong-layer-count", "wrong-width", "not-a-dict"])
def test_crafted_checkpoint_configs_are_one_line_errors(tmp_path, change, message):
    state = training_state(tiny_model(), step=1)
    change(state)
    save_checkpoint(tmp_path / "crafted.pt", state)  # a valid checksum: crafted, not damaged
    with pytest.raises(CheckpointError, match=message) as excinfo:
        load_model(tmp_path / "crafted.pt")
    assert "\n" not in str(excinfo.value)


def test_a_bare_name_that_is_a_source_folder_is_taken_as_the_hf_name(tmp_path, monkeypatch, capsys):
    """`--init gpt2` in a source tree that has a gpt2/ package folder: the HF model, not the folder."""
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(ckpt, "from_pretrained", lambda name, kernels: loaded.append(name) or tiny_model())
    load_model("gpt2")
    assert loaded == ["gpt2"]
    assert "./gpt2 is a folder without ckpt_<step>.pt files or config.json, so 'gpt2' is taken as a Hugging Face " \
           "model name" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither ckpt_<step>.pt files nor config.json"):
        load_model("./gpt2")  # written as a path, it means the folder


def test_a_name_hugging_face_cannot_load_is_a_one_line_error(monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, without the network
    with pytest.raises(ValueError, match=r"^load_model: 'no-such-model-xyz' is not a checkpoint, run folder or HF "
                                         r"folder here, and Hugging Face could not load it as a model name \(") as e:
        load_model("no-such-model-xyz")
    assert "\n" not in str(e.value)
