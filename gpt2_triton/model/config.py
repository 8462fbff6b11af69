"""Model configuration: a dataclass and the named presets."""
from dataclasses import dataclass, fields, replace

EOT_ID = 50256  # <|endoftext|>, the last id of GPT-2's vocabulary: it begins every document


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # max sequence length (learned position embeddings)
    vocab_size: int = 50257  # real vocabulary; logits, sampling and loss only ever see these ids
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5
    pad_vocab_to: int = 1  # round the embedding table up to a multiple of this (64 or 128 -> 50304)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            if getattr(self, f) < 1:
                raise ValueError(f"GPTConfig: {f} must be >= 1; got {getattr(self, f)}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"GPTConfig: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32),  # tests and CPU
}
