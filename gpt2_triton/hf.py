"""Hugging Face GPT-2 and this project: load HF weights into our GPT (`from_pretrained`), and run a
transformers `GPT2LMHeadModel` on our kernels in place (`apply_kernels`, `remove_kernels`).

`apply_kernels(model, kernels="triton")` (or per op, the forms of `gpt2_triton.model.ops.resolve_kernels`) patches
the model's instances only, never transformers' classes:
- layer_norm: every nn.LayerNorm's forward calls our LayerNorm;
- gelu_mlp: every GPT2MLP's forward is our fused MLP on `.t()` views of the Conv1D weights (no copy),
  then the module's own dropout (tanh-GELU activations only, else HF's MLP stays);
- attention: the model's attention implementation becomes `gpt2_triton`, registered in transformers'
  attention-function registry with SDPA's mask rules. Our flash attention runs when it computes what HF
  would: self-attention with dropout 0 (eval mode, or attn_pdrop=0), head dim 16/32/64/128, and either
  no mask left after HF's mask logic (the dense kernel) or a mask that is causal attention within
  sequences: padding zeros in `attention_mask`, packed sequences (position_ids restarting) and KV-cache
  decode steps run the varlen kernel on the unpadded tokens (padding queries get 0, as with HF's
  flash-attention path; HF's SDPA gives them values no real token reads). Anything else (another
  mask, cross-attention, head_mask) runs HF's SDPA path. Per-call output_attentions returns no weights,
  as with HF's sdpa; a model whose config asks for attentions keeps HF's attention;
- cross_entropy: with `labels` the loss is ours (HF's causal-LM shift, ignore_index, num_items_in_batch):
  in train mode fused with lm_head, never building the logits (`logits` is then None); in eval mode the
  logits are built as usual and our cross-entropy reads them. Without labels HF's forward runs as is.
Use "torch" for an op to leave HF's code for it. A "triton" choice that cannot apply to this model
(e.g. a non-tanh GELU) leaves HF's code too; `applied_kernels(model)` says what runs each op.
"""
import contextlib
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2_triton.model import GPT, GPTConfig
from gpt2_triton.model.gpt import check_token_ids
from gpt2_triton.model.ops import build_ops, triton_unusable

# The ops the patch can put in HF's GPT-2; its Conv1D projections and embeddings stay HF's.
PATCHED_OPS = ("layer_norm", "attention", "gelu_mlp", "cross_entropy")

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
def from_pretrained(name_or_dir, kernels="torch", **config_overrides) -> GPT:
    """Our GPT with the weights of HF's GPT2LMHeadModel at `name_or_dir` (an HF model name, or a
    `save_pretrained` folder); `config_overrides` go to GPTConfig (e.g. pad_vocab_to=128)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("from_pretrained needs `transformers` (pip install transformers)") from e
    hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    config = config_from_hf(hf_model.config, **config_overrides)
    model = GPT(config, kernels=kernels)
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


# --- our kernels inside a transformers GPT2LMHeadModel ---------------------------------------------
ATTN_IMPLEMENTATION = "gpt2_triton"  # the name registered in transformers' attention/mask registries


@dataclass
class _Patch:
    applied: dict  # op -> "triton" | "hf": what runs each op now
    forwards: list = field(default_factory=list)  # modules whose instance forward we set
    attention_modules: list = field(default_factory=list)
    attn_implementation: str | None = None  # the implementation to restore


def triton_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention-interface function: q (B, H, q_len, D), k, v (B, H, kv_len, D) ->
    ((B, q_len, H, D), None).

    Our flash attention where it gives HF's result (see the module docstring); HF's SDPA otherwise.
    Without a mask and q_len == kv_len: the dense kernel. Padding (HF's 4-D mask), packed sequences
    (position_ids restarting) and decode steps against a KV cache: unpad -> varlen kernel -> repad.
    """
    attention = getattr(module, "_gpt2_triton_attention", None)
    B, H, q_len, D = query.shape
    kv_len = key.shape[2]
    usable = not (attention is None or dropout > 0 or is_causal is False or not getattr(module, "is_causal", True)
                  or kwargs.get("head_mask") is not None or key.shape != value.shape
                  or key.shape[:2] != query.shape[:2] or key.shape[3] != D or q_len > kv_len)
    if usable and attention_mask is None and q_len == kv_len:
        out = attention(query, key, value, causal=True, scale=scaling)  # (B, H, T, D)
        return out.transpose(1, 2), None
    plan = _varlen_plan(attention_mask, B, q_len, kv_len, kwargs.get("position_ids"), query.device) if usable else None
    if plan is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    rows_q, rows_k, cu_q, cu_k, max_q, max_k = plan
    packed_k, packed_v = (t.transpose(1, 2).reshape(B * kv_len, H, D)[rows_k] for t in (key, value))
    packed_q = query.transpose(1, 2).reshape(B * q_len, H, D)[rows_q]
    out = module._gpt2_triton_attention_varlen(packed_q, packed_k, packed_v, cu_q, cu_k, max_q, max_k, causal=True,
                                                scale=scaling)  # (total_q, H, D)
    padded = out.new_zeros((B * q_len, H, D)).index_copy(0, rows_q, out)  # padding queries get 0, as with FA2
    return padded.view(B, q_len, H, D), None


def _varlen_plan(mask, B: int, q_len: int, kv_len: int, position_ids, device):
    """How HF's attention for these shapes splits into causal sequences, or None where it does not.

    The keys of row b that take part are those some query row of the 4-D bool mask keeps (all without
    a mask); position_ids that do not grow by 1 start a new sequence (packed rows, no cache);
    the queries are the last q_len positions. HF's mask must equal what that implies (same sequence,
    key kept, key position <= query position) on every query row that is not padding; then returns
    (rows_q, rows_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for the packed tensors.
    Host syncs: the check and the packing (nonzero), as HF's own flash-attention path has."""
    if mask is None:
        if q_len != 1:  # HF's SDPA would run is_causal, aligned top-left
            return None
        keep_k = torch.ones((B, kv_len), dtype=torch.bool, device=device)
    elif (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B)
          or tuple(mask.shape[2:]) != (q_len, kv_len)):
        return None
    else:
        keep_k = mask[:, 0].any(dim=1).expand(B, kv_len)  # (B, kv_len): keys some query sees
    starts = torch.zeros((B, kv_len), dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None and q_len == kv_len:
        starts[:, 1:] |= position_ids.expand(B, q_len).diff(dim=1) != 1
    seq = starts.flatten().cumsum(0).view(B, kv_len) - 1  # (B, kv_len): global sequence id of each position
    keep_q, seq_q = keep_k[:, kv_len - q_len:], seq[:, kv_len - q_len:]
    if mask is not None:
        pos = torch.arange(kv_len, device=device)
        implied = (seq_q[:, :, None] == seq[:, None, :]) & keep_k[:, None, :] & \
            (pos[None, None, :] <= pos[kv_len - q_len:][None, :, None])  # (B, q_len, kv_len)
        if not bool(((mask[:, 0] == implied) | ~keep_q[:, :, None]).all()):
            return None
    n_seqs = seq.numel() and int(seq[-1, -1]) + 1
    counts = [torch.zeros(n_seqs, dtype=torch.int32, device=device).index_add_(0, s.flatten(), k.flatten().int())
              for s, k in ((seq_q, keep_q), (seq, keep_k))]
    cu_q, cu_k = (torch.cat([c.new_zeros(1), c.cumsum(0, dtype=torch.int32)]) for c in counts)
    rows_q, rows_k = (k.flatten().nonzero()[:, 0] for k in (keep_q, keep_k))
    return rows_q, rows_k, cu_q, cu_k, int(counts[0].max()), int(counts[1].max())


def _register_attention():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, triton_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)  # None when causal-only


def _layer_norm_forward(layer_norm):
    def forward(self, x):  # nn.LayerNorm
        return layer_norm(x, self.weight, self.bias, self.eps)
    return forward


def _mlp_forward(gelu_mlp):
    def forward(self, hidden_states):  # GPT2MLP: dropout(c_proj(act(c_fc(x)))), Conv1D weights (in, out)
        out = gelu_mlp(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias)
        return self.dropout(out)
    return forward


def _lm_head_loss_forward(ops):
    def forward(self, *args, **kwargs):  # GPT2LMHeadModel
        """HF's forward; with labels, the loss from our cross-entropy (fused with lm_head in train mode)."""
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

        logits_to_keep = kwargs.get("logits_to_keep", 0)
        if (kwargs.get("labels") is None or len(args) > 1 or self.loss_function is not ForCausalLMLoss
                or not isinstance(logits_to_keep, int) or logits_to_keep != 0 or self.lm_head.bias is not None):
            return type(self).forward(self, *args, **kwargs)
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        return_dict = kwargs.pop("return_dict", None)
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        outputs = self.transformer(input_ids, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state  # (B, T, C)
        ignore_index = kwargs.get("ignore_index", -100)
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:  # position t predicts label t + 1
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device).long()  # (B*T,)
        weight = self.lm_head.weight  # (V, C)
        check_token_ids(targets, weight.size(0), "GPT2LMHeadModel: labels", ignore_index)
        if self.training:
            logits = None
            loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), weight, targets, ignore_index)
        else:
            logits = self.lm_head(hidden)  # (B, T, V)
            loss = ops.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, ignore_index)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None:  # HF: summed loss / num_items_in_batch (gradient accumulation)
            if torch.is_tensor(num_items):
                num_items = num_items.to(loss.device)
            loss = loss * (targets != ignore_index).sum() / num_items
        result = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()
    return forward


def _set_forward(module, forward, patch) -> bool:
    if "forward" in vars(module):  # someone else (e.g. a device-placement hook) owns this forward
        return False
    module.forward = types.MethodType(forward, module)
    patch.forwards.append(module)
    return True


def apply_kernels(model, kernels="triton"):
    """Run a transformers GPT2LMHeadModel on our kernels, in place; returns the model.

    kernels: "triton" | "torch" | {op: impl} as in gpt2_triton.model.ops ("torch" leaves HF's code for that op).
    Applying again replaces the previous choice; `remove_kernels` restores HF's code.
    """
    import transformers
    from transformers import GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError("apply_kernels needs transformers >= 5 (tested: 5.17, 5.24); "
                          f"found {transformers.__version__}")
    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"apply_kernels: expected a transformers GPT2LMHeadModel; got {type(model).__name__}")
    device_type = next(model.parameters()).device.type
    problem = triton_unusable(kernels, device_type)
    if problem:  # here, not deep inside the first forward
        raise RuntimeError(f"apply_kernels: the model is on {device_type}: {problem}")
    remove_kernels(model)
    ops = build_ops(kernels)
    patch = _Patch(applied={op: "hf" for op in PATCHED_OPS})
    config = model.config
    if ops.choice["layer_norm"] == "triton":
        forward = _layer_norm_forward(ops.layer_norm)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine and len(m.normalized_shape) == 1:
                if _set_forward(m, forward, patch):
                    patch.applied["layer_norm"] = "triton"
    if ops.choice["gelu_mlp"] == "triton" and config.activation_function in TANH_GELUS:
        forward = _mlp_forward(ops.gelu_mlp)
        for m in model.modules():
            if isinstance(m, GPT2MLP) and _set_forward(m, forward, patch):
                patch.applied["gelu_mlp"] = "triton"
    if ops.choice["attention"] == "triton" and _attention_applies(config):
        _register_attention()
        for m in model.modules():
            if isinstance(m, GPT2Attention):
                m._gpt2_triton_attention = ops.attention
                m._gpt2_triton_attention_varlen = ops.attention_varlen
                patch.attention_modules.append(m)
        patch.attn_implementation = config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        patch.applied["attention"] = "triton"
    if ops.choice["cross_entropy"] == "triton" and _set_forward(model, _lm_head_loss_forward(ops), patch):
        patch.applied["cross_entropy"] = "triton"
    model._gpt2_triton_patch = patch
    return model


def _attention_applies(config) -> bool:
    from gpt2_triton.kernels.attention import SUPPORTED_HEAD_DIMS
    head_dim = config.n_embd // config.n_head
    return head_dim in SUPPORTED_HEAD_DIMS and not getattr(config, "output_attentions", False)


def remove_kernels(model):
    """Undo `apply_kernels`: HF's own code runs every op again; returns the model."""
    patch = vars(model).pop("_gpt2_triton_patch", None)
    if patch is None:
        return model
    for m in patch.forwards:
        del m.forward
    for m in patch.attention_modules:
        del m._gpt2_triton_attention, m._gpt2_triton_attention_varlen
    if patch.attn_implementation is not None:
        model.set_attn_implementation(patch.attn_implementation)
    return model


def applied_kernels(model) -> dict:
    """{op: "triton" | "hf"}: what runs each op of a (possibly) patched GPT2LMHeadModel."""
    patch = vars(model).get("_gpt2_triton_patch")
    return dict(patch.applied) if patch else {op: "hf" for op in PATCHED_OPS}


@contextlib.contextmanager
def kernels_applied(model, kernels="triton"):
    """`with kernels_applied(model):` our kernels inside the block, HF's code after it."""
    apply_kernels(model, kernels)
    try:
        yield model
    finally:
        remove_kernels(model)
