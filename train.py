"""Train GPT-2 on CPU, one GPU, or several with DDP (build-nanogpt's recipe).

    python train.py                               # demo on CPU, gpt2-124m on a GPU
    python train.py --preset demo --max-steps 50
    torchrun --nproc_per_node=8 train.py --preset gpt2-124m --micro-batch 32
    python train.py --preset demo --resume        # continue from the latest checkpoint in the run folder

`python train.py --help` lists every flag. The pieces live in `gpt2_triton.training`: the flags and checks
(config.py), the trainer and its loop (trainer.py), one optimizer step (step.py).
"""
from gpt2_triton.training import exit_on_errors, parse_config, train


def main(argv=None):
    with exit_on_errors():  # bad settings, data or run folder: one line, exit 1; Ctrl-C/SIGTERM: saved, exit 130/143
        cfg = parse_config(argv)  # parse: defaults <- preset <- flags, every value checked before anything is written
        return train(cfg)  # build (processes, run folder, data, model, optimizer, loaders), then loop to max_steps


if __name__ == "__main__":
    main()
