"""python -m gpt2_triton.data"""
from gpt2_triton.data.cli import main

main()
