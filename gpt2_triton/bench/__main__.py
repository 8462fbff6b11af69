"""python -m gpt2_triton.bench [attention varlen layer_norm gelu_mlp cross_entropy e2e] [--dtype bf16] [--quick]
[--out DIR]

python -m gpt2_triton.bench headline [--out DIR] [--budget-s 420]: the headline table in one budgeted run
(bench/headline/; `python -m gpt2_triton.bench headline --help`)."""
import argparse
import importlib
import sys

import torch

from gpt2_triton.bench.common import (
    CPU_THREADS,
    DTYPES,
    WARMUP_MS,
    check_rows,
    cpu_columns_note,
    environment,
    format_table,
    has_cuda,
    out_dir_for,
    write_results,
)
from gpt2_triton.bench.headline import main as headline
from gpt2_triton.kernels.utils import is_interpreter

BENCHES = ("attention", "varlen", "layer_norm", "gelu_mlp", "cross_entropy", "e2e")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["headline"]:
        return headline(argv[1:])
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gpt2_triton.bench", description=__doc__)
    p.add_argument("benches", nargs="*", metavar="bench",
                   help=f"any of {', '.join(BENCHES)} (default: all)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="tiny sizes; on CPU runs through the interpreter")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<device> in the current folder)")
    args = p.parse_args(argv)
    benches = args.benches or list(BENCHES)
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        p.error(f"unknown bench {unknown}; choose from {BENCHES}")
    if not has_cuda():
        if not is_interpreter():
            sys.exit("python -m gpt2_triton.bench: no CUDA GPU here; run with TRITON_INTERPRET=1 and --quick "
                     "to exercise the benchmarks on CPU (not performance)")
        if not args.quick:
            sys.exit("python -m gpt2_triton.bench: no CUDA GPU here; only --quick runs on CPU (not performance)")
    dtype = DTYPES[args.dtype] if has_cuda() else torch.float32  # the interpreter mis-loads bf16
    env = environment()
    out_dir = out_dir_for(args.out)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
          f"commit {env['git_commit']} | dtype {str(dtype).removeprefix('torch.')}")
    if not has_cuda():
        print(f"# CPU --quick: interpreter, tiny sizes; NOT performance. Timed on {CPU_THREADS} thread after a "
              f"{WARMUP_MS} ms warm-up.\n# {cpu_columns_note()}")
    failed = 0
    for name in benches:
        module = importlib.import_module(f"gpt2_triton.bench.{name}")
        rows = module.run(dtype, quick=args.quick)
        failed += len(check_rows(rows))
        print(f"\n## {name}\n{format_table(rows)}", flush=True)
        if hasattr(module, "accumulation_text"):
            print(module.accumulation_text(rows), flush=True)
        write_results(rows, out_dir, name, env)
        if hasattr(module, "plots"):
            module.plots(rows, out_dir, f"on {env['device']}")
    print(f"\nresults in {out_dir}" + (f"; {failed} sanity check(s) failed, listed under their tables" if failed else
                                         "; every row passed its sanity checks"))
    return out_dir


if __name__ == "__main__":
    main()
