"""python -m gpt2_triton.data prepare SOURCE: tokenise a text source into train/val shards."""
import argparse
import signal
import time

from gpt2_triton.atomic import sigterm_raises
from gpt2_triton.data.manifest import summary
from gpt2_triton.data.pipeline import prepare
from gpt2_triton.data.shards import MAX_SHARD_TOKENS

DESCRIPTION = "Token shards on disk: prepare them from a text source, then stream (x, y) batches from them."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gpt2_triton.data", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", allow_abbrev=False, help="tokenise a source into train/val shards")
    p.add_argument("source", help="pystdlib | fineweb-edu | text:PATH")
    p.add_argument("--out", default=None, help="output folder (default: $GPT2_DATA_DIR/<name>, i.e. data/<name>)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default: per source)")
    p.add_argument("--val-every", type=int, default=None, help="every k-th document goes to val (default: per source)")
    p.add_argument("--val-tokens", type=int, default=None, help="cap on val tokens (default: per source)")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    args = parser.parse_args(argv)
    for flag, value, low, high in (("--shard-tokens", args.shard_tokens, 1, MAX_SHARD_TOKENS),
                                   ("--val-every", args.val_every, 1, None), ("--val-tokens", args.val_tokens, 0, None),
                                   ("--workers", args.workers, 0, None)):
        if value is not None and not (low <= value and (high is None or value <= high)):
            p.error(f"{flag} must be >= {low}" + (f" and <= {high:,} (a shard header stores the count as an "
                                                  f"int32)" if high else "") + f"; got {value:,}")
    t0 = time.perf_counter()
    try:
        with sigterm_raises():  # a kill by SIGTERM removes the staging folder, as Ctrl-C does
            out = prepare(args.source, args.out, shard_tokens=args.shard_tokens, val_every=args.val_every,
                          val_tokens=args.val_tokens, workers=args.workers)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    print(f"prepared in {time.perf_counter() - t0:.1f}s -- {summary(out)}")


if __name__ == "__main__":
    main()
