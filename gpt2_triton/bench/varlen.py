"""Document-masked and variable-length attention vs FlexAttention, SDPA with a dense mask and dense causal.

The case: a GPT-2 training micro-batch, B x T = 16 x 1024 tokens, H12 D64, rows packed with documents
whose lengths follow a log-normal fitted to our prepared pystdlib shards (ln length mean 7.887, std
1.712: 719 documents, 5.58M tokens, median 3521, p10 374, p90 18719; `python -m
gpt2_triton.bench.varlen --data data/pystdlib` measures it again), and, for a second point, shorter
documents (log-normal with median 400 tokens, the ln std kept). Providers, each fwd, bwd, fwd+bwd:
- triton: flash_attention_qkv(documents=...) on the (B, T, 3C) projection (document-masked kernels);
- triton-varlen: flash_attention_varlen on the same tokens packed as sequences (documents cut at row ends);
- flex: FlexAttention with a document block mask (compiled; CUDA only: on CPU it has no backward);
- sdpa-dense-mask: SDPA with the (B, 1, T, T) bool mask;
- dense-causal (our kernel) and sdpa-causal: the whole causal triangle, attending across documents.
FLOPs are counted on the pairs each query may see (4 * H * D per pair forward, 2.5x backward), the same
for every provider. Each row's extra holds the fraction of tiles the document kernels compute against
dense causal, with the hand-picked GPU tiles.

    python -m gpt2_triton.bench.varlen [--dtype bf16]          # on a GPU
    python -m gpt2_triton.bench.varlen --data data/pystdlib --seq-len 128 --micro-batch 8 --batches 200
        # document lengths of a prepared dataset and the tiles a --doc-mask run at that shape skips
"""
import argparse
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2_triton.bench.common import (
    DTYPES,
    Reference,
    check_rows,
    environment,
    format_table,
    has_cuda,
    measure,
    out_dir_for,
    run_modes,
    write_results,
)
from gpt2_triton.kernels import reference
from gpt2_triton.kernels.utils import document_bounds, merge_heads, split_heads
from gpt2_triton.model.config import EOT_ID

MODES = ("fwd", "bwd", "fwd+bwd")
PYSTDLIB_LN_LENGTH = (7.887, 1.712)  # mean and std of ln(document length), measured (see the docstring)
SHORT_DOCS_LN_LENGTH = (math.log(400), 1.712)
CAUSAL_PROVIDERS = ("dense-causal", "sdpa-causal")  # attend across documents: the whole causal triangle
MODEL_LAYOUT = {  # provider -> its output as (B, T, C), for the check against the reference
    "triton-varlen": lambda out, B, T: out.reshape(B, T, -1),  # packed (B*T, H, D): every row one sequence run
    "sdpa-dense-mask": lambda out, B, T: merge_heads(out), "sdpa-causal": lambda out, B, T: merge_heads(out)}


# --- document lengths and tiles ---------------------------------------------------------------------
def document_starts(B: int, T: int, ln_length, seed: int = 0, device="cpu") -> torch.Tensor:
    """(B, T) bool: where documents begin in B rows cut from one stream of documents whose lengths are
    log-normal (ln_length = (mean, std) of ln length), as the loader cuts its token stream."""
    gen = np.random.default_rng(seed)
    starts = np.zeros(B * T, dtype=bool)
    pos = -int(gen.integers(0, 2 * T))  # the stream starts inside a document
    while pos < B * T:
        if pos >= 0:
            starts[pos] = True
        pos += max(1, int(round(gen.lognormal(*ln_length))))
    return torch.from_numpy(starts).view(B, T).to(device)


def measure_document_lengths(data_dir, split: str = "train") -> np.ndarray:
    """Token counts of the documents of a prepared dataset (each begins with EOT), its shards in order."""
    from gpt2_triton.data import read_shard  # lazy: the GPU image has no tokenizer packages, and --data only needs it
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in sorted(Path(data_dir).glob(f"{split}_*.bin"))])
    starts = np.flatnonzero(tokens == EOT_ID)
    return np.diff(np.append(starts, len(tokens)))


def first_tiles(dtype=torch.bfloat16, head_dim: int = 64) -> dict:
    """The hand-picked (first candidate) tiles of the forward, dQ and dK/dV kernels on a GPU."""
    from gpt2_triton.kernels.attention.core import bwd_dkdv_tiles, bwd_dq_tiles, fwd_tiles
    return {"fwd": fwd_tiles(head_dim, dtype)[0][:2], "dq": bwd_dq_tiles(head_dim, dtype)[0][:2],
            "dkdv": bwd_dkdv_tiles(head_dim, dtype)[0][:2]}


def tile_counts(starts: torch.Tensor, block_m: int, block_n: int) -> dict:
    """Tiles (query tile x key tile) computed for a (B, T) batch with document starts, against dense causal:
    "documents": the document-masked kernels (programs per query tile of a row; transposed for dK/dV the
    same count); "varlen": the documents packed as sequences (a tile never spans two)."""
    B, T = starts.shape
    bounds = document_bounds(starts)  # (B, 2, T)
    m0 = torch.arange(0, T, block_m)
    last = torch.clamp(m0 + block_m, max=T) - 1
    hi = last // block_n + 1  # key tiles up to the diagonal
    dense = int(hi.sum()) * B
    lo = bounds[:, 0, m0] // block_n  # (B, tiles): first key tile of the first row's document
    documents = int((hi[None, :] - lo).sum())
    lengths = (bounds[:, 1] - bounds[:, 0])[bounds[:, 0] == torch.arange(T)]  # one entry per document
    varlen = 0
    for L in lengths.tolist():
        t0 = torch.arange(0, L, block_m)
        varlen += int(((torch.clamp(t0 + block_m, max=L) - 1) // block_n + 1).sum())
    return {"dense_causal": dense, "documents": documents, "varlen": varlen}


def tile_fractions(starts: torch.Tensor, tiles=None) -> dict:
    """Fraction of dense causal's tiles each document kernel computes, per kernel's GPU tile."""
    out = {}
    for kernel, (bm, bn) in (tiles or first_tiles()).items():
        if kernel == "dkdv":  # programs over key tiles: BLOCK_N keys, BLOCK_M queries per step
            bm, bn = bn, bm
        c = tile_counts(starts, bm, bn)
        out[kernel] = {"documents": round(c["documents"] / c["dense_causal"], 4),
                       "varlen": round(c["varlen"] / c["dense_causal"], 4)}
    return out


def data_tile_fraction(data_dir, micro_batch: int, seq_len: int, batches: int, seed: int = 1337, tiles=None):
    """tile_fractions over the first `batches` training batches of a prepared dataset, as the loader gives them."""
    from gpt2_triton.data import DataLoader  # lazy, as above
    loader = DataLoader(Path(data_dir), "train", micro_batch, seq_len, seed=seed)
    starts = torch.cat([loader.next_batch()[0] == EOT_ID for _ in range(batches)])
    B, T = starts.shape
    return (tile_fractions(starts, tiles), float(starts[:, 1:].sum()) / B,
            visible_pairs(starts) / (B * T * (T + 1) / 2))


# --- providers --------------------------------------------------------------------------------------
def _packed(qkv, n_head, starts):
    """q, k, v (total, H, D) and cu_seqlens of the documents of each row as sequences."""
    B, T, C3 = qkv.shape
    flat = starts.clone()
    flat[:, 0] = True
    begin = flat.flatten().nonzero()[:, 0]
    cu = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
    max_len = int(cu.diff().max())
    q, k, v = (t.transpose(1, 2).reshape(B * T, n_head, -1) for t in split_heads(qkv, n_head))
    return q, k, v, cu, max_len


def providers(starts, n_head: int) -> dict:
    from gpt2_triton.kernels import flash_attention_qkv, flash_attention_varlen
    B, T = starts.shape
    docs = document_bounds(starts)
    mask = reference.document_mask(docs, causal=True)  # (B, 1, T, T)

    def triton_varlen(qkv):
        q, k, v, cu, max_len = _packed(qkv, n_head, starts)
        return flash_attention_varlen(q, k, v, cu, cu, max_len, max_len, check_seqlens=False)

    def sdpa_mask(qkv):
        q, k, v = split_heads(qkv, n_head)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def sdpa_causal(qkv):
        q, k, v = split_heads(qkv, n_head)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = {"triton": lambda qkv: flash_attention_qkv(qkv, n_head, documents=docs),
           "triton-varlen": triton_varlen, "sdpa-dense-mask": sdpa_mask,
           "dense-causal": lambda qkv: flash_attention_qkv(qkv, n_head), "sdpa-causal": sdpa_causal}
    if has_cuda():
        from gpt2_triton.model import torch_ops
        block_mask = torch_ops.document_mask(starts)
        out["flex"] = lambda qkv: torch_ops.flash_attention_qkv(qkv, n_head, documents=block_mask)
    return out


def visible_pairs(starts) -> int:
    """(query, key) pairs the document mask keeps."""
    bounds = document_bounds(starts)
    return int((torch.arange(starts.shape[1], device=starts.device) - bounds[:, 0] + 1).sum())


def cases(quick):
    """(B, T, H, D, name, ln_length)."""
    if quick:
        return [(1, 64, 2, 16, "short documents", (math.log(20), 0.8))]
    return [(16, 1024, 12, 64, "pystdlib documents", PYSTDLIB_LN_LENGTH),
            (16, 1024, 12, 64, "short documents", SHORT_DOCS_LN_LENGTH)]


def run(dtype, quick=False):
    rows = []
    device = "cuda" if has_cuda() else "cpu"
    dtype_name = str(dtype).removeprefix("torch.")
    for B, T, H, D, name, ln_length in cases(quick):
        starts = document_starts(B, T, ln_length, seed=0, device=device)
        pairs = visible_pairs(starts)
        fwd_flops = 4 * H * D * pairs
        shape = {"B": B, "T": T, "H": H, "D": D, "documents": int(starts[:, 1:].sum()) + B,
                 "ln_length": list(ln_length)}
        extra = {"tiles": tile_fractions(starts.cpu(), first_tiles(dtype, D)),
                 "pairs_vs_causal": round(pairs / (B * T * (T + 1) / 2), 4)}
        case = f"documents B{B}-T{T}-H{H}-D{D} {name}"
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype, generator=gen).requires_grad_()
        docs = document_bounds(starts)
        refs = {"documents": Reference(lambda t: reference.flash_attention_qkv(t, H, documents=docs), [qkv]),
                "causal": Reference(lambda t: reference.flash_attention_qkv(t, H), [qkv])}
        for provider, fn in providers(starts, H).items():
            # dense-causal and sdpa-causal compute plain causal attention: checked against that reference
            ref = refs["causal" if provider in CAUSAL_PROVIDERS else "documents"]
            layout = MODEL_LAYOUT.get(provider, lambda out, B, T: out)  # as the reference's (B, T, C)
            errors = ref.errors(lambda fn=fn, layout=layout: layout(fn(qkv), B, T), [qkv])
            fns = run_modes(functools.partial(fn, qkv), [qkv], MODES)
            for mode, call in fns.items():
                flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}[mode]
                rows.append(measure("varlen", case, provider, mode, call, shape, dtype_name, flops=flops,
                                    grad_to_none=[qkv], quick=quick, extra=extra, max_err=errors))
            if has_cuda():
                torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt2_triton.bench.varlen", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="tiny sizes; on CPU runs through the interpreter")
    p.add_argument("--data", default=None, help="a prepared data folder: its document lengths and tiles skipped")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--out", default=None, help="results folder for varlen.jsonl/.md/.png "
                                               "(default: bench/results/<device> in the current folder)")
    args = p.parse_args(argv)
    if args.data:
        lengths = measure_document_lengths(args.data)
        ln = np.log(lengths)
        print(f"{args.data}: {len(lengths)} documents, {lengths.sum()} tokens; length mean {lengths.mean():.0f}, "
              f"median {np.median(lengths):.0f}, p10 {np.percentile(lengths, 10):.0f}, "
              f"p90 {np.percentile(lengths, 90):.0f}; ln length mean {ln.mean():.3f} std {ln.std():.3f}")
        fractions, per_row, pairs = data_tile_fraction(args.data, args.micro_batch, args.seq_len, args.batches)
        print(f"{args.batches} batches of {args.micro_batch}x{args.seq_len}: {per_row:.3f} document starts per row "
              f"after position 0; (query, key) pairs kept / causal {pairs:.4f}; tiles computed / dense causal "
              f"(GPU tiles {first_tiles()}): {fractions}")
        return fractions
    env = environment()
    rows = run(DTYPES[args.dtype] if has_cuda() else torch.float32, quick=args.quick or not has_cuda())
    check_rows(rows)
    print(format_table(rows))
    print(f"results in {write_results(rows, out_dir_for(args.out), 'varlen', env)}")
    return rows


if __name__ == "__main__":
    main()
