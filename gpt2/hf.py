"""Load Hugging Face GPT-2 weights (`gpt2`, `gpt2-medium`, ... or a `save_pretrained` directory)."""
import torch

from gpt2.config import GPTConfig

# HF stores these as Conv1D (in_features, out_features): transpose into nn.Linear layout.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf_config, **overrides) -> GPTConfig:
    if hf_config.activation_function not in TANH_GELUS:
        raise ValueError(f"from_pretrained: activation {hf_config.activation_function!r} is not GPT-2's tanh GELU")
    return GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                     n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                     layer_norm_eps=hf_config.layer_norm_epsilon, **overrides)


@torch.no_grad()
def load_pretrained(model_cls, name_or_dir, kernels="torch", **config_overrides):
    """A `model_cls` (GPT) with the weights of HF's GPT2LMHeadModel at `name_or_dir`."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("from_pretrained needs `transformers` (pip install transformers)") from e
    hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    config = config_from_hf(hf_model.config, **config_overrides)
    model = model_cls(config, kernels=kernels)
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf_model.state_dict().items()
                if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    missing = set(ours) - set(hf_state) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"from_pretrained: {name_or_dir} lacks weights {sorted(missing)[:5]}")
    for key, value in hf_state.items():
        if key not in ours:
            raise ValueError(f"from_pretrained: unexpected weight {key} in {name_or_dir}")
        if key.endswith(CONV1D_SUFFIXES):
            value = value.t()
        target = ours[key]
        if key == "transformer.wte.weight":
            target = target[: value.size(0)]  # padded rows keep their init
        if target.shape != value.shape:
            raise ValueError(f"from_pretrained: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value)
    return model
