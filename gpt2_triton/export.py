"""Export a GPT as a Hugging Face GPT-2 folder that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    python -m gpt2_triton.export --init runs/demo --out gpt2-demo-hf   # a run folder, a checkpoint or an HF dir

The folder holds `config.json` (GPT2Config's fields) and `model.safetensors` (Conv1D layout, padded vocab
rows dropped, the tied lm_head stored once as `transformer.wte.weight`, as transformers saves it). Both
files are written here, so exporting needs neither transformers nor the safetensors package. The folder
is built under a temp name beside `out` and renamed into place: `out` is never half-written.
"""
import argparse
import json
import os
import shutil
import struct
import tempfile
import uuid
from pathlib import Path

import torch

from gpt2_triton.atomic import atomic_write
from gpt2_triton.checkpoint import load_model, unwrap_model
from gpt2_triton.hf import CONV1D_SUFFIXES
from gpt2_triton.tokenizer import EOT_ID

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def hf_state_dict(model, dtype=None) -> dict:
    """Our state_dict renamed and laid out as GPT2LMHeadModel's: (in, out) Conv1D weights, wte cut to
    the real vocabulary, no separate lm_head (tied)."""
    config = model.config
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if key == "transformer.wte.weight":
            value = value[: config.vocab_size]
        if key.endswith(CONV1D_SUFFIXES):
            value = value.t()
        out[key] = value.detach().to(device="cpu", dtype=dtype or value.dtype).contiguous()
    return out


def hf_config(config, dtype: torch.dtype) -> dict:
    """config.json for transformers' GPT2Config. Dropout 0: our model trains without it."""
    eot = EOT_ID if config.vocab_size > EOT_ID else None  # <|endoftext|>, when the vocabulary has it
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "summary_activation": None,
        "summary_proj_to_labels": True,
        "summary_first_dropout": 0.0,
    }


def write_safetensors(f, tensors: dict) -> None:
    """The safetensors format: u64 little-endian header size, a JSON header of name -> dtype, shape and
    byte range, padded with spaces to 8 bytes, then the raw little-endian tensor bytes in that order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"write_safetensors: {name} has dtype {t.dtype}; supported {list(SAFETENSORS_DTYPES)}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors.values():
        f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_pretrained(model, out_dir, overwrite=False, dtype=None) -> Path:
    """Write `model` (a GPT) as a Hugging Face GPT-2 folder at out_dir; returns its path.

    Refuses a non-empty out_dir unless overwrite. dtype: the stored dtype (default: the model's).
    """
    model = unwrap_model(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"save_pretrained: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"save_pretrained: {out} is not empty; pass overwrite=True (--overwrite) to replace it")
    tensors = hf_state_dict(model, dtype)
    stored_dtype = tensors["transformer.wte.weight"].dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        with atomic_write(tmp / "config.json", "w") as f:
            json.dump(hf_config(model.config, stored_dtype), f, indent=2)
            f.write("\n")
        with atomic_write(tmp / "model.safetensors", "wb") as f:
            write_safetensors(f, tensors)
        if out.is_dir() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # an empty out_dir is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt2_triton.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="run folder, checkpoint file, save_pretrained folder or HF name")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="stored dtype (default: the model's)")
    args = p.parse_args(argv)

    model = load_model(args.init, kernels="torch", device="cpu")
    out = save_pretrained(model, args.out, overwrite=args.overwrite, dtype=DTYPES.get(args.dtype))
    print(f"wrote {out}: {model.num_params():,} parameters, vocab {model.config.vocab_size}, "
          f"context {model.config.block_size}")
    return out


if __name__ == "__main__":
    main()
