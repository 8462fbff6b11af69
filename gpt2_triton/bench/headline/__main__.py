"""python -m gpt2_triton.bench.headline (as `python -m gpt2_triton.bench headline`; also each job's process)"""
from gpt2_triton.bench.headline.cli import main

main()
