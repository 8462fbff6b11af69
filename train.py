"""Train GPT-2 on CPU, one GPU, or several with DDP (build-nanogpt's recipe).

    python train.py                               # demo on CPU, gpt2-124m on a GPU
    python train.py --preset demo --max-steps 50
    torchrun --nproc_per_node=8 train.py --preset gpt2-124m --micro-batch 32
    python train.py --preset demo --resume        # continue from the latest checkpoint in the run folder
    python train.py --config my_run.toml          # settings from a file (or a run's train_config.json)

`python train.py --help` lists every flag. The same command is installed as `python -m gpt2_triton.train`
and `gpt2-triton-train`. The pieces live in `gpt2_triton.training`: the flags and checks (config.py), the
trainer and its loop (trainer.py), one optimizer step (step.py).
"""
from gpt2_triton.train import main as train_main


def main(argv=None):
    return train_main(argv, prog="train.py")  # parse (defaults <- preset <- --config <- flags), build, loop


if __name__ == "__main__":
    main()
