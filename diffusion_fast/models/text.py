"""Prompt encoding: a word-level tokenizer and a small transformer that turns tokens into the context the
UNet's cross-attention reads.

The tokenizer lower-cases the prompt, turns punctuation into spaces and splits on whitespace; every word must
be in the vocabulary (an unknown word is a ValueError that lists the vocabulary; nothing is guessed). A prompt
becomes ``[<bos>, words..., <eos>, <pad>...]`` of fixed length; the empty prompt is ``[<bos>, <eos>, <pad>...]``
and is the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, set_op_backends

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
_PUNCT = re.compile(r"[^\w\s]")


def _excerpt(text: str, limit: int = 60) -> str:
    """``text`` cut to about ``limit`` characters for an error message (a prompt may be very long)."""
    return text if len(text) <= limit else text[:limit - 20] + f"... ({len(text)} characters)"


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary.

    Args:
        vocab: the words (special tokens ``<pad>``, ``<bos>``, ``<eos>`` are added first when missing).
        max_length: tokens per prompt, including ``<bos>`` and ``<eos>``; a longer prompt is a ValueError.
    """

    def __init__(self, vocab: Sequence[str], max_length: int) -> None:
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        if len(set(words)) != len(words):
            raise ValueError("vocab has duplicate words")
        for w in words:
            if not isinstance(w, str) or not w or w != w.lower() or _PUNCT.search(w) or w.split() != [w]:
                raise ValueError(f"vocab word {w!r} must be a non-empty lower-case word without punctuation")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for <bos> and <eos>), got {max_length!r}")
        self.vocab = list(SPECIAL_TOKENS) + words
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    @property
    def words(self) -> list[str]:
        """The vocabulary without the special tokens."""
        return self.vocab[len(SPECIAL_TOKENS):]

    def split(self, prompt: str) -> list[str]:
        """Normalise and split a prompt into words (no vocabulary check)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return _PUNCT.sub(" ", prompt.lower().replace("_", " ")).split()

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, length ``max_length``. ValueError for an unknown word or a prompt that is too
        long; the message quotes at most the start of the prompt, a few unknown words and the vocabulary."""
        words = self.split(prompt)
        unknown = list(dict.fromkeys(w for w in words if w not in self.ids))
        if unknown:
            shown = ", ".join(repr(_excerpt(w, 30)) for w in unknown[:5])
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            vocab = " ".join(self.words[:60]) + (f" ... ({len(self.words)} words)" if len(self.words) > 60 else "")
            raise ValueError(f"unknown word{'s' if len(unknown) > 1 else ''} {shown}{more} in prompt "
                             f"{_excerpt(prompt)!r}; the vocabulary is: {vocab}")
        if len(words) > self.max_length - 2:
            raise ValueError(f"prompt {_excerpt(prompt)!r} has {len(words)} words; at most {self.max_length - 2} fit")
        ids = [self.ids[BOS]] + [self.ids[w] for w in words] + [self.ids[EOS]]
        return ids + [self.ids[PAD]] * (self.max_length - len(ids))

    def __call__(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """``str`` or list of ``B`` strings -> ``[B, max_length]`` int64 token ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return {"vocab": self.words, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        return cls(d["vocab"], d["max_length"])


@dataclass
class TextConfig:
    """Configuration of :class:`TextEncoder`."""

    vocab_size: int
    max_length: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_length", "width", "layers", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TextConfig.{name} must be an int >= 1, got {v!r}")
        if self.width % self.heads != 0 or (self.width // self.heads) % 8 != 0:
            raise ValueError(f"TextConfig: width={self.width} / heads={self.heads} must give a head dim that "
                             "is a multiple of 8")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TextConfig keys {unknown}; known: {sorted(names)}")
        return cls(**d)


class TextBlock(nn.Module):
    """Pre-LN transformer layer: bidirectional self-attention and a GELU MLP, residual around each."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * mlp_ratio)
        self.fc2 = nn.Linear(width * mlp_ratio, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> context ``[B, L, width]`` (token + position embeddings, ``layers`` transformer
    layers, a final LayerNorm). All ``L`` positions, padding included, are part of the context."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        self.layers = nn.ModuleList(
            [TextBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)])
        self.final_layer_norm = nn.LayerNorm(config.width)

    def set_backend(self, backend: Optional[str] = None, *, attention: Optional[str] = None) -> TextEncoder:
        """Backend of the attention op (``"auto" | "torch" | "triton" | "cuda" | "sdpa"``). Returns ``self``."""
        set_op_backends(self, backend, attention=attention)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != cfg.max_length:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be [B, {cfg.max_length}] token ids, got {shape}")
        x = self.token_embedding(ids) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)
