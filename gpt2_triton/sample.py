"""Generate text: python -m gpt2_triton.sample --init gpt2|DIR|CHECKPOINT --prompt "..." [options]."""
import argparse

import torch

from gpt2_triton.checkpoint import load_model
from gpt2_triton.model.ops import device_problem
from gpt2_triton.tokenizer import get_encoding

MIN_TEMPERATURE = 1e-6  # logits / temperature must stay finite in float32; 0 is greedy (the most likely token)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt2_triton.sample", description=__doc__, allow_abbrev=False)
    p.add_argument("--init", required=True, help="HF name (gpt2, gpt2-medium, ...), save_pretrained dir, "
                                                 "our checkpoint file, or a run folder")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num-samples", type=int, default=3, help="samples to draw (>= 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample (>= 1)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (>= 1)")
    p.add_argument("--temperature", type=float, default=1.0, help=f"softmax temperature: 0 is greedy, else >= "
                                                                          f"{MIN_TEMPERATURE:g} (smaller ones overflow "
                                                                          f"float32 logits)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (>= 0)")
    p.add_argument("--kernels", default="torch", help="torch | triton | op=impl,...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for flag, value, ok, rule in (("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
                                  ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                                  ("--top-k", args.top_k, args.top_k >= 1, ">= 1"),
                                  ("--temperature", args.temperature,
                                   args.temperature == 0 or args.temperature >= MIN_TEMPERATURE,
                                   f"0 (greedy) or >= {MIN_TEMPERATURE:g}"),
                                  ("--seed", args.seed, args.seed >= 0, ">= 0")):
        if not ok:
            p.error(f"{flag} must be {rule}; got {value}")  # one line, exit 2, before the model loads
    problem = device_problem(args.device, args.kernels)
    if problem:
        p.error(problem)

    try:
        model = load_model(args.init, kernels=args.kernels, device=args.device).eval()
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    enc = get_encoding()
    prompt_ids = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=generator)
    samples = [enc.decode(row.tolist()) for row in out]
    for i, text in enumerate(samples):
        print(f"--- sample {i} ---\n{text}")
    return samples


if __name__ == "__main__":
    main()
