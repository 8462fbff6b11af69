"""Sampling speed: tokens/s of GPT.generate with the KV cache vs recomputing the context every step.

    python -m gpt2_triton.bench.generate                  # GPT-2 124M on a GPU; a 6-layer, 384-wide GPT on CPU
    python -m gpt2_triton.bench.generate --model gpt2     # GPT-2 124M on CPU too (slow without the cache)
    TRITON_INTERPRET=1 python -m gpt2_triton.bench.generate --quick   # tiny sizes, keeps the code working on CPU

Random weights, greedy decoding (every run does the same work), batch 1, prompt 16, 256 new tokens:
the cache never fills (block_size >= 272), so every step after the prefill is a one-token step.
"""
import argparse
import contextlib

import torch

from gpt2_triton import GPT, GPTConfig
from gpt2_triton.bench.common import (
    DTYPES,
    Row,
    check_rows,
    cpu_columns_note,
    environment,
    format_table,
    has_cuda,
    out_dir_for,
    wall_clock_ms,
    write_results,
)

MODELS = {
    "gpt2": GPTConfig.from_preset("gpt2", pad_vocab_to=128),  # 124M
    "small": GPTConfig.from_preset("gpt2", n_layer=6, n_head=6, n_embd=384, block_size=512, pad_vocab_to=128),
    "tiny": GPTConfig.from_preset("tiny", vocab_size=512, block_size=64),
}
PROVIDERS = {"kv-cache": True, "recompute": False}  # provider -> use_cache


def setup(quick, model=None):
    """(config name, batch, prompt length, new tokens, kernel sets, warmup, reps)."""
    if quick:
        return "tiny", 1, 8, 4, ("torch", "triton"), 0, 1
    kernel_sets = ("torch", "triton") if has_cuda() else ("torch",)
    return model or ("gpt2" if has_cuda() else "small"), 1, 16, 256, kernel_sets, 1, 3


def run(dtype=torch.bfloat16, quick=False, model=None, progress=False):
    """The rows; `progress`: print a line as each one is measured (flushed, so a pipe shows it then)."""
    name, B, prompt_len, new_tokens, kernel_sets, warmup, reps = setup(quick, model)
    config = MODELS[name]
    device = "cuda" if has_cuda() else "cpu"
    autocast_dtype = dtype if device == "cuda" and dtype != torch.float32 else None
    dtype_name = f"{str(autocast_dtype).removeprefix('torch.')}-autocast" if autocast_dtype else "float32"
    rows = []
    for kernels in kernel_sets:
        torch.manual_seed(0)
        gpt = GPT(config, kernels=kernels).to(device).eval()
        idx = torch.randint(0, config.vocab_size, (B, prompt_len), device=device)
        case = f"{name} generate B{B} prompt{prompt_len} +{new_tokens} kernels={kernels}"
        shape = {"B": B, "prompt": prompt_len, "new_tokens": new_tokens, "n_layer": config.n_layer,
                 "n_embd": config.n_embd, "block_size": config.block_size}
        for provider, use_cache in PROVIDERS.items():
            def generate():
                with torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
                    gpt.generate(idx, new_tokens, temperature=0, use_cache=use_cache)
            try:
                med, p20, p80 = wall_clock_ms(generate, warmup, reps)
            except Exception as e:  # e.g. triton requested on CPU without the interpreter
                rows.append(Row("generate", case, provider, "generate", shape, dtype_name, None,
                                error=f"{type(e).__name__}: {e}"[:300]))
            else:
                rows.append(Row("generate", case, provider, "generate", shape, dtype_name, med, p20, p80,
                                extra={"tokens_per_s": round(B * new_tokens / (med * 1e-3), 1), "kernels": kernels}))
            if progress:
                print(progress_line(rows[-1]), flush=True)
    return rows


def progress_line(row) -> str:
    if row.error:
        return f"{row.case} | {row.provider}: {row.error}"
    return f"{row.case} | {row.provider}: {row.median_ms:,.1f} ms, {row.extra['tokens_per_s']:,.1f} tokens/s"


def summary(rows) -> str:
    lines = []
    for r in rows:
        if r.median_ms:
            lines.append(f"{r.case:<55} {r.provider:<10} {r.extra['tokens_per_s']:>9.1f} tokens/s")
    cached = {r.case: r.median_ms for r in rows if r.provider == "kv-cache" and r.median_ms}
    for r in rows:
        if r.provider == "recompute" and r.median_ms and r.case in cached:
            lines.append(f"{r.case}: kv-cache {r.median_ms / cached[r.case]:.1f}x the tokens/s of recompute")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt2_triton.bench.generate", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--model", choices=sorted(set(MODELS) - {"tiny"}), default=None,
                   help="default: gpt2 on a GPU, small on CPU")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype on a GPU (CPU: fp32)")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens; triton through the interpreter on CPU")
    p.add_argument("--out", default=None, help="results folder for generate.jsonl/.md/.png "
                                               "(default: bench/results/<device> in the current folder)")
    args = p.parse_args(argv)
    env = environment()
    print(f"# {env['device']} | torch {env['torch']} | threads {torch.get_num_threads()} | commit {env['git_commit']}",
          flush=True)
    rows = run(DTYPES[args.dtype], quick=args.quick, model=args.model, progress=True)
    check_rows(rows)
    print(format_table(rows, ours="kv-cache"))
    if not has_cuda():
        print(cpu_columns_note())
    print(summary(rows))
    out_dir = write_results(rows, out_dir_for(args.out), "generate", env)
    print(f"results in {out_dir}")
    return rows


if __name__ == "__main__":
    main()
