"""HellaSwag validation, scored as in build-nanogpt.

For each example the 4 endings are tokenised after the context (ending prefixed with a space); the
model's cross-entropy is taken over the ending tokens only. Predicted ending: argmin of the total loss
(acc) and argmin of the mean loss per token (acc_norm, the number GPT-2 is usually quoted at).

    python -m gpt2_triton.hellaswag --init gpt2|HF_DIR|CHECKPOINT|RUN_DIR [--data PATH] [--kernels ...] [--limit N]
"""
import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from gpt2_triton.atomic import atomic_write
from gpt2_triton.checkpoint import load_model
from gpt2_triton.model.ops import device_problem
from gpt2_triton.tokenizer import get_encoding

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DOWNLOAD_TIMEOUT_S = 5.0


def default_path() -> Path:
    """Where the val file is cached: the user's cache folder ($XDG_CACHE_HOME, else ~/.cache), whatever the
    current folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "gpt2_triton" / "hellaswag" / "hellaswag_val.jsonl"


def download(path, url=HELLASWAG_URL, timeout=DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch the val jsonl to `path` (atomically); a clear error, fast, when offline."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise RuntimeError(
            f"HellaSwag: no data file at {path} and downloading {url} failed ({e}). "
            f"Download hellaswag_val.jsonl by hand and pass --data PATH.") from None
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def find_data(path=None, allow_download=True) -> Path:
    """A local HellaSwag jsonl: `path` if given (must exist), else the cache, downloaded if needed."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"HellaSwag: data file {path} does not exist")
        return path
    cached = default_path()
    if cached.is_file():
        return cached
    if not allow_download:
        raise FileNotFoundError(f"HellaSwag: no cached data at {cached}; pass --data PATH")
    return download(cached)


def load_examples(path, limit=None) -> list[dict]:
    """The examples of a HellaSwag jsonl (the first `limit` if given). ValueError naming the file and
    line for anything that is not an example: not JSON, no ctx / 4 string endings / label in 0..3;
    and for a file with no examples."""
    if limit is not None and limit < 1:
        raise ValueError(f"HellaSwag: limit must be >= 1 (or None for all); got {limit}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"HellaSwag: {path}:{line_no}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e})") from None
            if not isinstance(ex, dict) or not all(k in ex for k in ("ctx", "endings", "label")):
                raise ValueError(f"{where} is not an example with ctx, 4 endings, label")
            endings, label = ex["endings"], ex["label"]
            if not isinstance(ex["ctx"], str) or not isinstance(endings, list) or len(endings) != 4 \
                    or not all(isinstance(e, str) for e in endings):
                raise ValueError(f"{where} is not an example with ctx, 4 endings, label "
                                 f"(ctx must be a string and endings a list of 4 strings)")
            if isinstance(label, str) and label.strip().isdigit():
                label = int(label)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
                raise ValueError(f"{where}: label must be 0, 1, 2 or 3; got {ex['label']!r}")
            examples.append({**ex, "label": label})
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"HellaSwag: {path} holds no examples")
    return examples


def render_example(example: dict, enc, max_len=None):
    """-> tokens (4, L) int64, mask (4, L) (1 on ending tokens), label. Rows right-padded with 0.
    With max_len, rows longer than it keep their last max_len tokens (the context is cropped)."""
    ctx_tokens = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = enc.encode(" " + ending)
        row = ctx_tokens + end_tokens
        mask = [0] * len(ctx_tokens) + [1] * len(end_tokens)
        if max_len is not None and len(row) > max_len:
            row, mask = row[-max_len:], mask[-max_len:]
        rows.append(row)
        masks.append(mask)
    length = max(len(r) for r in rows)
    tokens = torch.zeros((4, length), dtype=torch.long)
    mask = torch.zeros((4, length), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(m)] = torch.tensor(m)
    return tokens, mask, int(example["label"])


def token_losses(logits, tokens):
    """Per-token CE of predicting tokens[:, 1:] from logits[:, :-1] -> (4, L-1)."""
    shift_logits = logits[:, :-1, :].float()
    shift_tokens = tokens[:, 1:]
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_tokens.reshape(-1),
                             reduction="none")
    return losses.view(tokens.size(0), -1)


def predict(losses, mask):
    """Per-token losses (4, L-1) and the mask (4, L) -> (pred by total loss, pred by mean loss)."""
    shift_mask = mask[:, 1:].to(losses.dtype)
    total = (losses * shift_mask).sum(dim=1)
    mean = total / shift_mask.sum(dim=1)
    return int(total.argmin()), int(mean.argmin())


@torch.no_grad()
def evaluate_hellaswag(model, examples, device, rank=0, world_size=1, autocast_dtype=None,
                       progress: bool = True) -> dict:
    """acc/acc_norm of `model` (called as model(tokens) -> logits (B, T, V)) on `examples`.

    Rank r takes examples[r::world_size]; under torch.distributed the counts are summed over ranks.
    With `progress`, rank 0 shows a progress bar when stderr is a terminal.
    """
    enc = get_encoding()
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    device_type = torch.device(device).type
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # n, correct, correct_norm
    shard = examples[rank::world_size]
    for example in tqdm(shard, desc="HellaSwag", leave=False, disable=None if progress and rank == 0 else True):
        tokens, mask, label = render_example(example, enc, max_len=block_size)
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(tokens)
        pred, pred_norm = predict(token_losses(logits, tokens), mask)
        counts += torch.tensor([1, int(pred == label), int(pred_norm == label)], device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    if was_training:
        model.train()
    n, correct, correct_norm = counts.tolist()
    return {"n": n, "correct": correct, "correct_norm": correct_norm,
            "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpt2_triton.hellaswag",
                                     description="HellaSwag val accuracy of a GPT-2 model", allow_abbrev=False)
    parser.add_argument("--init", required=True,
                        help="HF name (gpt2, ...), HF save_pretrained dir, checkpoint or run dir")
    parser.add_argument("--data", default=None, help="hellaswag_val.jsonl (default: cache, downloaded if needed)")
    parser.add_argument("--kernels", default="torch", help="torch | triton | op=impl,op=impl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples (>= 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1; got {args.limit}")
    problem = device_problem(args.device, args.kernels)
    if problem:
        parser.error(problem)

    try:
        path = find_data(args.data)
        examples = load_examples(path, args.limit)
        model = load_model(args.init, kernels=args.kernels, device=args.device)
    except (RuntimeError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    autocast_dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    t0 = time.time()
    result = evaluate_hellaswag(model, examples, args.device, autocast_dtype=autocast_dtype)
    print(f"HellaSwag {path.name}: {result['n']} examples, acc {result['acc']:.4f}, "
          f"acc_norm {result['acc_norm']:.4f} ({time.time() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
