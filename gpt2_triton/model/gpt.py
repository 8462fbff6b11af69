"""GPT-2 exactly as OpenAI shipped it, readable top to bottom.

Pre-LN blocks, learned position embeddings, one batched QKV projection, tanh-GELU MLP, final
LayerNorm, lm_head tied to wte. Each hot op comes from `gpt2_triton.model.ops` (torch or Triton), chosen once
here at construction; the parameters and the state_dict are the same whichever runs. Each residual add
`x = x + f(x)` runs inside the LayerNorm that follows it (`ops.add_layer_norm`), with Triton's kernels also
the bias of the projection that ends f: a block hands the next its stream and its MLP's output still to be
added (and that bias). `generate`
keeps a KVCache per layer: one prefill, then one-token steps. Loading Hugging Face weights
(`gpt2_triton.hf.from_pretrained`), exporting (`gpt2_triton.export.save_pretrained`) and checkpoints sit
above this module and import it, never the reverse.
"""

import functools
import itertools

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gpt2_triton.kernels.utils import asserts_on_device, autocast_dtype
from gpt2_triton.model.config import GPTConfig
from gpt2_triton.model.ops import Ops, build_ops


class LayerNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps
        self.add_layer_norm = ops.add_layer_norm

    def forward(self, x, branch=None, branch_bias=None):
        """(x, ln(x)) for x = x + branch + branch_bias: every LayerNorm of GPT-2 follows a residual add (the
        first one's, of nothing) and runs it. Its output feeds a matmul: written in that matmul's dtype."""
        return self.add_layer_norm(x, branch, branch_bias, self.weight, self.bias, self.eps,
                                   out_dtype=autocast_dtype(x.device.type))


class KVCache:
    """Keys and values of every layer for N sequences, up to `max_len` positions each, for generation.

    Layer i keeps (N * max_len, nh, hs) buffers: sequence s holds rows s * max_len + [0, lengths[s]),
    which flash_attention_varlen reads as packed keys (cu_seqlens_k = s * max_len, seqused_k = lengths).
    `begin(new)` plans a step in which sequence s appends new[s] positions (after `restart(s)`: from 0);
    each layer then `attend`s its new tokens' queries to everything its sequence holds.
    """

    def __init__(self, n_layer: int, n_seq: int, max_len: int, device, varlen_plan=None):
        self.n_seq, self.max_len, self.device = n_seq, max_len, torch.device(device)
        self.varlen_plan = varlen_plan  # Ops.varlen_plan: what every layer's attention of a step shares
        self.lengths = [0] * n_seq  # positions each sequence holds (host ints: no sync to plan a step)
        self.keys, self.values = [None] * n_layer, [None] * n_layer  # (N * max_len, nh, hs), on first use
        self.step = None

    def restart(self, seq: int) -> None:
        """Sequence seq holds nothing again (its window slid: every position embedding changed)."""
        self.lengths[seq] = 0

    def begin(self, new: list) -> torch.Tensor:
        """Plan a step where sequence s appends new[s] tokens (packed one sequence after another); returns
        their positions (total_new,) int64."""
        for s, n in enumerate(new):
            if self.lengths[s] + n > self.max_len:
                raise ValueError(f"KVCache: {self.lengths[s]} cached + {n} new positions exceed max_len {self.max_len}")
        positions = [p for s, n in enumerate(new) for p in range(self.lengths[s], self.lengths[s] + n)]
        slots = [s * self.max_len + p for s, n in enumerate(new) for p in range(self.lengths[s], self.lengths[s] + n)]
        self.lengths = [length + n for length, n in zip(self.lengths, new)]
        as_tensor = functools.partial(torch.tensor, device=self.device)
        self.step = dict(
            slots=as_tensor(slots, dtype=torch.long),  # (total_new,) buffer row of each new token
            cu_seqlens_q=as_tensor([0, *itertools.accumulate(new)], dtype=torch.int32),
            cu_seqlens_k=as_tensor([s * self.max_len for s in range(self.n_seq + 1)], dtype=torch.int32),
            max_seqlen_q=max(new), max_seqlen_k=max(self.lengths),
            seqused_k=as_tensor(self.lengths, dtype=torch.int32))
        if self.varlen_plan is not None:  # built once per step, not once per layer
            step = self.step
            step["plan"] = self.varlen_plan(step["cu_seqlens_q"], step["cu_seqlens_k"], step["max_seqlen_q"],
                                            step["max_seqlen_k"], len(slots), self.n_seq * self.max_len, True,
                                            step["seqused_k"])
        return as_tensor(positions, dtype=torch.long)

    def attend(self, layer: int, q, k, v, attention_varlen):
        """Store this step's k, v (total_new, nh, hs) in layer's buffers; causal attention of q (total_new,
        nh, hs) to the positions of its own sequence -> (total_new, nh, hs)."""
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros((self.n_seq * self.max_len, *k.shape[1:]))
            self.values[layer] = v.new_zeros((self.n_seq * self.max_len, *v.shape[1:]))
        step = dict(self.step)
        slots = step.pop("slots")
        self.keys[layer][slots] = k
        self.values[layer][slots] = v
        return attention_varlen(q, self.keys[layer], self.values[layer], causal=True, **step)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops, layer: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.attention_qkv, self.attention_varlen, self.linear = ops.attention_qkv, ops.attention_varlen, ops.linear
        self.bias_in_norm = ops.bias_in_norm

    def forward(self, x, documents=None, kv_cache=None):
        """c_proj(attention(c_attn(x))) as (output, c_proj's bias where the next LayerNorm adds it, else None)."""
        qkv = self.linear(x, self.c_attn.weight, self.c_attn.bias)  # (B, T, 3C): q | k | v, heads side by side
        if kv_cache is None:  # training and plain inference: one op, its backward writes one dqkv
            if documents is None:
                y = self.attention_qkv(qkv, self.n_head, causal=True)  # (B, T, C)
            else:
                y = self.attention_qkv(qkv, self.n_head, causal=True, documents=documents)
        else:  # generation: x (1, total_new, C), the new tokens of every sequence packed one after another
            q, k, v = qkv[0].unflatten(-1, (3, self.n_head, self.n_embd // self.n_head)).unbind(1)  # (N, nh, hs)
            y = kv_cache.attend(self.layer, q, k, v, self.attention_varlen).flatten(1)[None]  # (1, total_new, C)
        if self.bias_in_norm:
            return self.linear(y, self.c_proj.weight), self.c_proj.bias
        return self.linear(y, self.c_proj.weight, self.c_proj.bias), None


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops, recompute_gelu: bool = False):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.gelu_mlp = functools.partial(ops.gelu_mlp, recompute=True) if recompute_gelu else ops.gelu_mlp
        self.bias_in_norm = ops.bias_in_norm

    def forward(self, x):
        """c_proj(gelu_tanh(c_fc(x))) as (output, c_proj's bias where the next LayerNorm adds it, else None)."""
        bias = self.c_proj.bias
        if self.bias_in_norm:
            return self.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, None), bias
        return self.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, bias), None


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops, layer: int, recompute_gelu: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, ops)
        self.attn = CausalSelfAttention(config, ops, layer)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, ops)
        self.mlp = MLP(config, ops, recompute_gelu)
        self.sharded = False  # FSDP2 frees this Block's weights when its forward returns (training.sharding)

    def forward(self, x, pending=(None, None), documents=None, kv_cache=None):
        """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), each add inside the LayerNorm after it. x: the
        residual stream; pending: (branch, bias) of the previous block's MLP, not yet added (None for the first
        block: (None, None)). Returns the stream and this block's pending MLP output."""
        x, h = self.ln_1(x, *pending)
        x, h = self.ln_2(x, *self.attn(h, documents, kv_cache))
        branch, bias = self.mlp(h)
        if self.sharded and bias is not None:  # the next LayerNorm reads it after this Block's weights are freed
            bias = bias.clone()
        return x, (branch, bias)


RECOMPUTE = ("none", "gelu", "block")


def _run_block(block, x, branch, bias, **kwargs):
    """block(x, (branch, bias)): the checkpoint keeps tensor arguments as saved tensors only when they
    are passed flat, not inside a tuple."""
    return block(x, (branch, bias), **kwargs)


class GPT(nn.Module):
    """kernels: which implementation runs each hot op (model/ops.py). recompute: what backward computes again
    instead of keeping from the forward: "none"; "gelu" (each MLP's 4C-wide c_fc output); "block" (all of a
    Block but its inputs: torch.utils.checkpoint per Block, in training mode with grad enabled)."""

    def __init__(self, config: GPTConfig, kernels="torch", recompute="none"):
        super().__init__()
        if recompute not in RECOMPUTE:
            raise ValueError(f"GPT: recompute must be one of {RECOMPUTE}; got {recompute!r}")
        self.config = config
        self.recompute = recompute
        self.ops = build_ops(kernels)
        self.embedding = self.ops.embedding
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, self.ops, i, recompute == "gelu") for i in range(config.n_layer)]),
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

    def hidden_states(self, idx, doc_starts=None):
        """Final (post ln_f) hidden states (B, T, C) of idx (B, T). doc_starts: (B, T) bool, True where a
        document begins (e.g. idx == EOT_ID); attention then stays inside each document (the masks are
        built once here, for every layer)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size {self.config.block_size}")
        documents = None if doc_starts is None else self.ops.document_mask(doc_starts)
        x = self.embedding(idx, self.transformer.wte.weight, self.transformer.wpe.weight)  # (B, T, C)
        return self._blocks(x, documents=documents)

    def _blocks(self, x, **kwargs):
        """The residual stream x through every block and ln_f (which adds the last MLP's output)."""
        pending = (None, None)
        checkpointed = (self.recompute == "block" and self.training and torch.is_grad_enabled()
                        and kwargs.get("kv_cache") is None)
        for block in self.transformer.h:
            if checkpointed:  # keeps x and pending; the block's forward runs again in backward
                x, pending = checkpoint(_run_block, block, x, *pending, use_reentrant=False, **kwargs)
            else:
                x, pending = block(x, pending, **kwargs)
        return self.transformer.ln_f(x, *pending)[1]

    def extend(self, tokens, new: list, kv_cache: "KVCache"):
        """Final hidden states (total_new, C) of the next tokens of kv_cache's sequences: tokens (total_new,)
        packed one sequence after another, new[s] of them for sequence s, placed after the positions
        sequence s holds (attention through attention_varlen, q length != k length)."""
        for s, n in enumerate(new):
            if kv_cache.lengths[s] + n > self.config.block_size:
                raise ValueError(f"GPT: {kv_cache.lengths[s]} cached + {n} new positions exceed block_size "
                                 f"{self.config.block_size}")
        pos = kv_cache.begin(new)  # (total_new,)
        x = self.embedding(tokens, self.transformer.wte.weight, self.transformer.wpe.weight, pos)[None]  # (1, N, C)
        return self._blocks(x, kv_cache=kv_cache)[0]

    def logits(self, x):
        """lm_head on hidden states; the padded vocab rows never reach the logits."""
        return F.linear(x, self.lm_head.weight[: self.config.vocab_size])  # (..., V)

    def forward(self, idx, targets=None, doc_starts=None):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) -> (logits or None, mean CE loss).
        Ids are int64 or int32 (targets are cast to int64 once); -100 in targets is ignored.
        doc_starts: (B, T) bool, True where a document begins (`idx == EOT_ID` for GPT-2 data): each
        token then attends only to earlier tokens of its own document.

        With fused lm_head + cross-entropy (Triton) the logits are never built and None is returned.
        """
        self.check_idx(idx)
        if doc_starts is not None and (not isinstance(doc_starts, torch.Tensor) or doc_starts.dtype != torch.bool
                                       or doc_starts.shape != idx.shape or doc_starts.device != idx.device):
            raise ValueError(f"GPT: doc_starts must be a bool tensor shaped like idx {tuple(idx.shape)} on "
                             f"{idx.device}; got {getattr(doc_starts, 'dtype', type(doc_starts).__name__)} "
                             f"{tuple(getattr(doc_starts, 'shape', ()))}")
        x = self.hidden_states(idx, doc_starts)
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

    def optimizer_groups(self, weight_decay) -> list[dict]:
        """Weight decay on matrices/embeddings (dim >= 2) only, as in GPT-2/nanoGPT."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizer(self, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=None):
        """AdamW over `optimizer_groups`."""
        groups = self.optimizer_groups(weight_decay)
        params = [p for g in groups for p in g["params"]]
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
        """Sample max_new_tokens after each prompt; only the last position's logits are computed.

        idx: (B, T) ids, or a list of B prompts of different lengths (1-D tensors or lists of ids). Returns
        (B, T + max_new_tokens) for a tensor, a list of B 1-D tensors for a list. The prompts run packed
        one after another (no padding); greedy decoding gives each the tokens it gets alone.
        temperature 0 is greedy. Never emits a padded-vocab id. With use_cache, each prompt is run once
        (prefill) and then each step runs only its new token against the cached keys/values, through
        the chosen kernels' attention_varlen (query and key lengths differ). Once a sequence is longer
        than block_size its window slides and every position embedding shifts, so it recomputes its
        last block_size tokens at each step, exactly as without the cache.
        """
        prompts, as_list = self._prompts(idx)
        if temperature < 0:
            raise ValueError(f"GPT.generate: temperature must be >= 0; got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"GPT.generate: top_k must be >= 1; got {top_k}")
        B, block, device = len(prompts), self.config.block_size, prompts[0].device
        lengths = [p.numel() for p in prompts]
        out = prompts[0].new_zeros((B, max(lengths) + max_new_tokens))  # (B, longest prompt + new)
        for s, prompt in enumerate(prompts):
            out[s, :lengths[s]] = prompt
        rows = torch.arange(B, device=device)
        kv_cache = None
        for _ in range(max_new_tokens):
            if kv_cache is None or not use_cache:
                kv_cache = self.new_kv_cache(B, device)
            new, index = [], []  # tokens each sequence runs now, and where they are in `out`
            for s, length in enumerate(lengths):
                window = 1
                if kv_cache.lengths[s] != length - 1 or length > block:  # prefill, or the window slid
                    kv_cache.restart(s)
                    window = min(length, block)
                new.append(window)
                index.extend(range(s * out.size(1) + length - window, s * out.size(1) + length))
            x = self.extend(out.view(-1)[torch.tensor(index, device=device)], new, kv_cache)  # (total_new, C)
            last = torch.tensor(list(itertools.accumulate(new)), device=device) - 1  # each sequence's last token
            logits = self.logits(x[last]).float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]  # (B,)
            out[rows, torch.tensor(lengths, device=device)] = next_id.to(out.dtype)
            lengths = [length + 1 for length in lengths]
        return [out[s, :lengths[s]] for s in range(B)] if as_list else out

    def _prompts(self, idx):
        """generate's prompts as a list of 1-D id tensors (checked; longer ones are cropped to the window
        later), and whether they came as a list."""
        block = self.config.block_size
        if isinstance(idx, torch.Tensor):
            self.check_idx(idx[:, -block:] if idx.dim() == 2 else idx)
            return list(idx.unbind(0)), False
        if not isinstance(idx, (list, tuple)) or not idx:
            raise ValueError(f"GPT.generate: idx must be a (B, T) tensor or a non-empty list of prompts; got "
                             f"{type(idx).__name__}")
        device = self.lm_head.weight.device
        prompts = [torch.as_tensor(p, device=device) if not isinstance(p, torch.Tensor) else p for p in idx]
        for i, p in enumerate(prompts):
            if p.dim() != 1:
                raise ValueError(f"GPT.generate: prompt {i} must be 1-D ids; got shape {tuple(p.shape)}")
            self.check_idx(p[None, -block:], name=f"prompt {i}")
        if len({(p.device, p.dtype) for p in prompts}) > 1:
            raise ValueError("GPT.generate: the prompts must share one device and dtype")
        return prompts, True

    def new_kv_cache(self, n_seq: int, device=None) -> KVCache:
        """An empty KVCache for n_seq sequences of up to block_size positions, on the model's device."""
        return KVCache(self.config.n_layer, n_seq, self.config.block_size, device or self.lm_head.weight.device,
                       self.ops.varlen_plan)

    @classmethod
    def from_pretrained(cls, name_or_dir, kernels="torch", **config_overrides) -> "GPT":
        """GPT-2's weights from Hugging Face (a name such as "gpt2", or a save_pretrained folder), as in nanoGPT:
        `gpt2_triton.hf.from_pretrained`, imported when called (the adapter imports the model, not the reverse)."""
        from gpt2_triton.hf import from_pretrained
        return from_pretrained(name_or_dir, kernels=kernels, **config_overrides)


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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
