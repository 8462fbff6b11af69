"""Train GPT-2: the command line of `train.py`, installed as `python -m gpt2_triton.train` and the console
script `gpt2-triton-train` (`pip install .`, no clone needed). `python -m gpt2_triton.train --help` lists
every flag; the pieces live in `gpt2_triton.training`."""
import sys
from pathlib import Path

from gpt2_triton.training import exit_on_errors, parse_config, train


def main(argv=None, prog="python -m gpt2_triton.train"):
    with exit_on_errors():  # bad settings, data or run folder: one line, exit 1; Ctrl-C/SIGTERM: saved, exit 130/143
        cfg = parse_config(argv, prog)  # defaults <- preset <- --config file <- flags, all checked before any write
        return train(cfg)  # build (processes, run folder, data, model, optimizer, loaders), then loop to max_steps


def script_main():
    """The console script (pyproject.toml's gpt2-triton-train), named in --help as it was run."""
    return main(prog=Path(sys.argv[0]).name)


if __name__ == "__main__":
    main()
