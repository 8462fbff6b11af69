"""python -m gpt2_triton.bench.static --out DIR [--python OTHER_PYTHON] [--quick] [--jobs N] [--only TEXT]
   python -m gpt2_triton.bench.static --budgets DIR/static.json   (budget tables for tests/test_static.py)
   python -m gpt2_triton.bench.static --predict-only [--batch B]   (predicted tok/s table; writes nothing)"""
import argparse
import json
import os
import sys

from gpt2_triton.bench.common import out_dir_for
from gpt2_triton.bench.static import predict, profile
from gpt2_triton.bench.static.native import ptxas_path


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gpt2_triton.bench.static",
                                description="Static performance profile at GPT-2 124M training shapes (no GPU).")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/static in the current folder)")
    p.add_argument("--python", action="append", default=[], metavar="OTHER_PYTHON",
                   help="also compile with this interpreter's triton (e.g. a venv with triton 3.6); repeatable")
    p.add_argument("--quick", action="store_true", help="only the first (hand-picked) autotune candidate per launch")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile workers per python")
    p.add_argument("--batch", type=int, default=16, help="micro-batch B of the GPT-2 shapes (default 16)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="compile only the cases whose id contains TEXT (repeatable); bytes and launches as always")
    p.add_argument("--budgets", metavar="STATIC_JSON",
                   help="print tests/test_static.py's budget tables from a profile's static.json, and exit")
    p.add_argument("--predict-only", action="store_true",
                   help="print the predicted throughput per GPU from the traced micro-step (no compiles), and exit")
    args = p.parse_args(argv)
    if args.predict_only:
        print(predict.markdown(predict.predict(batch=args.batch)))
        return
    if args.budgets:
        with open(args.budgets) as f:
            print(profile.budgets(json.load(f)))
        return
    if ptxas_path() is None:
        sys.exit("python -m gpt2_triton.bench.static: triton's NVIDIA backend or its ptxas is missing: "
                 "cannot compile for sm_90")
    profile.run(out_dir_for(args.out, device="static"), pythons=[None, *args.python], quick=args.quick,
                jobs=args.jobs, batch=args.batch, only=args.only)


if __name__ == "__main__":
    main()
