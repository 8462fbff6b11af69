"""GPT-2 exactly as OpenAI shipped it, readable top to bottom.

Pre-LN blocks, learned position embeddings, one batched QKV projection, tanh-GELU MLP, final
LayerNorm, lm_head tied to wte. Each hot op comes from `gpt2_triton.model.ops` (torch or Triton), chosen once
here at construction; the parameters and the state_dict are the same whichever runs. `generate`
keeps a KVCache per layer: one prefill, then one-token steps. Loading Hugging Face weights
(`gpt2_triton.hf.from_pretrained`), exporting (`gpt2_triton.export.save_pretrained`) and checkpoints sit
above this module and import it, never the reverse.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2_triton.kernels.utils import asserts_on_device, autocast_dtype, merge_heads, split_heads
from gpt2_triton.model.config import GPTConfig
from gpt2_triton.model.ops import Ops, build_ops


class LayerNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps
        self.layer_norm = ops.layer_norm

    def forward(self, x):  # every LayerNorm of GPT-2 feeds a matmul: write its input dtype in the same pass
        return self.layer_norm(x, self.weight, self.bias, self.eps, out_dtype=autocast_dtype(x.device.type))


class KVCache:
    """Keys and values of one layer for the positions seen so far, in buffers of `max_len` positions.

    `append(k, v)` stores the new positions and returns all of them: (B, nh, length, hs) each.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k = self.v = None  # (B, nh, max_len, hs), allocated by the first append

    def append(self, k, v):
        B, nh, T, hs = k.shape
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache: {self.length} cached + {T} new positions exceed max_len {self.max_len}")
        if self.k is None:
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


def attention_after_cache(q, k, v):
    """Causal attention of the last T positions (q) over all S cached ones (k, v): q (B, nh, T, hs),
    k, v (B, nh, S, hs), S > T. Always torch SDPA: the Triton kernel needs equal q and k lengths."""
    T, S = q.size(2), k.size(2)
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.attention, self.attention_qkv = ops.attention, ops.attention_qkv

    def forward(self, x, kv_cache=None):
        T = x.size(1)
        qkv = self.c_attn(x)  # (B, T, 3C): q | k | v, heads side by side
        if kv_cache is None:  # training and plain inference: one op, its backward writes one dqkv
            return self.c_proj(self.attention_qkv(qkv, self.n_head, causal=True))  # (B, T, C)
        q, k, v = split_heads(qkv, self.n_head)  # (B, nh, T, hs) each
        k, v = kv_cache.append(k, v)  # (B, nh, S, hs): cached positions, then these T
        if k.size(2) == T:
            y = self.attention(q, k, v, causal=True)  # prefill (B, nh, T, hs)
        else:
            y = attention_after_cache(q, k, v)  # decode step: T new queries after S - T cached positions
        return self.c_proj(merge_heads(y))  # (B, T, C): heads side by side again


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.gelu_mlp = ops.gelu_mlp

    def forward(self, x):  # c_proj(gelu_tanh(c_fc(x)))
        return self.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, ops)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, ops)
        self.mlp = MLP(config, ops)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, kernels="torch"):
        super().__init__()
        self.config = config
        self.ops = build_ops(kernels)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.layer_norm_eps, self.ops),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)

    @property
    def kernels(self) -> dict:
        return dict(self.ops.choice)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJECTION", False):
                std *= (2 * self.config.n_layer) ** -0.5  # one per residual add: 2 per block
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False) -> int:
        """Parameters, the tied wte/lm_head once; padded vocab rows not counted."""
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def check_idx(self, idx, name="idx", allow_ignore=False):
        """Clear errors for bad token tensors (int64 or int32 ids, shape (B, T)); the id range is
        checked without a host sync on GPUs (see `check_token_ids`)."""
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"GPT: {name} must be a torch.Tensor; got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT: {name} must be int64 (or int32) token ids; got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"GPT: {name} must have shape (B, T); got {tuple(idx.shape)}")
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"GPT: sequence length {idx.size(1)} exceeds block_size {self.config.block_size}")
        if idx.numel() == 0:
            raise ValueError(f"GPT: {name} is empty: shape {tuple(idx.shape)}")
        check_token_ids(idx, self.config.vocab_size, f"GPT: {name}", ignore_index=-100 if allow_ignore else None)

    def hidden_states(self, idx, kv_caches=None):
        """Final (post ln_f) hidden states (B, T, C). With kv_caches (one KVCache per layer), idx holds
        the positions after the cached ones."""
        B, T = idx.size()
        start = kv_caches[0].length if kv_caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"GPT: {start} cached + {T} new positions exceed block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches else None)
        return self.transformer.ln_f(x)

    def logits(self, x):
        """lm_head on hidden states; the padded vocab rows never reach the logits."""
        return F.linear(x, self.lm_head.weight[: self.config.vocab_size])  # (..., V)

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) -> (logits or None, mean CE loss).
        Ids are int64 or int32 (targets are cast to int64 once); -100 in targets is ignored.

        With fused lm_head + cross-entropy (Triton) the logits are never built and None is returned.
        """
        self.check_idx(idx)
        x = self.hidden_states(idx)
        if targets is None:
            return self.logits(x)
        if targets.shape != idx.shape:
            raise ValueError(f"GPT: targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        self.check_idx(targets, "targets", allow_ignore=True)
        flat_x, flat_targets = x.view(-1, x.size(-1)), targets.reshape(-1).long()  # int32 targets: one cast
        if self.ops.fused_lm_head_loss:  # the whole padded (V_pad, C) lm_head: 16-byte aligned rows,
            # and rows >= vocab_size are masked inside the kernel (never classes, zero grad)
            return None, self.ops.linear_cross_entropy(flat_x, self.lm_head.weight, flat_targets,
                                                       num_classes=self.config.vocab_size)
        logits = self.logits(x)
        return logits, self.ops.cross_entropy(logits.view(-1, logits.size(-1)), flat_targets)

    def configure_optimizer(self, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=None):
        """AdamW with weight decay on matrices/embeddings (dim >= 2) only, as in GPT-2/nanoGPT."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    def flops_per_token(self, seq_len=None) -> int:
        """Training FLOPs per token (nanoGPT/PaLM): 6N + 12 * L * H * Q * T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T); only the last position's logits are computed.

        temperature 0 is greedy. Never emits a padded-vocab id. With use_cache, the context is run once
        (prefill) and then each step runs only the new token against the cached keys/values (those
        steps use torch SDPA whatever the kernels choice: q and k lengths differ). Once the
        sequence is longer than block_size the window slides and every position embedding shifts, so
        each step then recomputes the last block_size tokens, exactly as without the cache.
        """
        self.check_idx(idx[:, -self.config.block_size:])  # longer prompts are cropped
        if temperature < 0:
            raise ValueError(f"GPT.generate: temperature must be >= 0; got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"GPT.generate: top_k must be >= 1; got {top_k}")
        kv_caches = None
        for _ in range(max_new_tokens):
            if kv_caches is not None and idx.size(1) <= self.config.block_size:
                x = self.hidden_states(idx[:, -1:], kv_caches)  # one-token step
            else:  # prefill; past block_size every step recomputes the window (a full cache is of no use)
                kv_caches = self.new_kv_caches() if use_cache and idx.size(1) < self.config.block_size else None
                x = self.hidden_states(idx[:, -self.config.block_size:], kv_caches)
            logits = self.logits(x[:, -1, :]).float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id.to(idx.dtype)), dim=1)
        return idx

    def new_kv_caches(self) -> list:
        """One empty KVCache per layer, holding up to block_size positions."""
        return [KVCache(self.config.block_size) for _ in self.transformer.h]


def check_token_ids(ids, vocab_size: int, name: str, ignore_index=None) -> None:
    """Every id in [0, vocab_size) (or == ignore_index). On CPU a ValueError naming the range; on a GPU
    an asynchronous device-side assert, so the check never waits for the device. Skipped while
    torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    ok = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        ok |= ids == ignore_index
    if asserts_on_device(ids.device):
        torch._assert_async(ok.all(), f"{name} has ids outside [0, {vocab_size})")
        return
    if not bool(ok.all()):
        valid = ids if ignore_index is None else ids[ids != ignore_index]
        raise ValueError(f"{name} has ids outside [0, {vocab_size}): min {valid.min().item()}, "
                         f"max {valid.max().item()}")
