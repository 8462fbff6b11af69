"""Loading HF GPT-2 weights: a random small GPT2LMHeadModel round-trips through save_pretrained."""
import pytest
import torch

from gpt2 import GPT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=300,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path, model


def test_logits_and_loss_match_hf(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(str(path)).eval()
    assert ours.config.n_layer == 2 and ours.config.vocab_size == 300 and ours.config.block_size == 48
    idx = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = hf(idx, labels=idx)
        logits = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-6, rtol=1e-6)


def test_padded_vocab_load(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(str(path), pad_vocab_to=64).eval()
    assert ours.transformer.wte.weight.shape[0] == 320
    idx = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
