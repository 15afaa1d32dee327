"""A small LLaMA-style decoder and its split into pipeline stages.

RMSNorm, rotary position embeddings, SwiGLU MLP, causal multi-head self-attention, pre-norm
residual blocks, byte-level vocabulary (256). The full model is always initialised from the seed
first and a stage then keeps its layers, so every stage (and every compression method) starts
from the same weights::

    cfg = ModelConfig(d_model=128, layers=4, heads=4, seq_len=128)
    stage = build_stage(cfg, stages=2, index=0, seed=0)   # embedding + layers 0, 1
    h = stage(tokens)                                      # (b, t, d): the boundary activation
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "Llama", "Stage", "layer_ranges", "build_stage"]


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    vocab: int = 256
    ffn_mult: float = 8 / 3          # SwiGLU hidden size: ffn_mult * d_model, rounded up to 32
    rope_base: float = 10000.0
    tie_embeddings: bool = False     # the head reuses the embedding matrix
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.heads} heads of "
                             "even size (rotary embeddings rotate pairs)")

    @property
    def ffn_hidden(self) -> int:
        return -(-int(self.ffn_mult * self.d_model) // 32) * 32


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (seq_len, head_dim), each frequency repeated for the two halves."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, heads, t, head_dim); rotates (x_i, x_{i + head_dim/2}) pairs by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    t = x.shape[-2]
    return x * cos[:t] + rotated * sin[:t]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.d_model // cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, self.head_dim, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        mask = torch.full((cfg.seq_len, cfg.seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + self.mask[:t, :t]
        y = F.softmax(scores, dim=-1) @ v                       # (b, heads, t, head_dim)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The whole decoder: tokens (b, t) -> logits (b, t, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init)
        # GPT-2 style: the projections that write into the residual stream start smaller.
        for block in self.blocks:
            for w in (block.attn.out.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=cfg.init_std / math.sqrt(2 * cfg.layers))
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Stage(nn.Module):
    """Layers [first, last) of the decoder; the first stage embeds tokens, the last one ends in
    the final norm and the head. forward: tokens (b, t) or h (b, t, d) -> h (b, t, d) or logits."""

    def __init__(self, model: Llama, first: int, last: int, is_first: bool,
                 is_last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.embed: Optional[nn.Embedding] = model.embed if is_first else None
        self.blocks = nn.ModuleList(model.blocks[first:last])
        self.norm: Optional[RMSNorm] = model.norm if is_last else None
        self.head: Optional[nn.Linear] = model.head if is_last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def layer_ranges(layers: int, stages: int) -> List[Tuple[int, int]]:
    """[first, last) of each stage: as even as possible, earlier stages take the remainder."""
    if not 1 <= stages <= layers:
        raise ValueError(f"{stages} stages need 1 to {layers} (the number of layers)")
    base, extra = divmod(layers, stages)
    ranges, first = [], 0
    for s in range(stages):
        last = first + base + (1 if s < extra else 0)
        ranges.append((first, last))
        first = last
    return ranges


def build_stage(cfg: ModelConfig, stages: int, index: int, seed: int) -> Stage:
    """Stage ``index`` of ``stages``, cut from the full model initialised from ``seed``."""
    if cfg.tie_embeddings and stages > 1:
        # The first and the last stage would each hold the matrix, and keeping the two copies
        # equal needs an all-reduce of its gradient between them: weight traffic, which mapl
        # does not carry (it compresses activations and their gradients).
        raise ValueError("tied embeddings need the embedding and the head on one stage: use "
                         "untied embeddings with more than one stage")
    torch.manual_seed(seed)
    model = Llama(cfg)
    first, last = layer_ranges(cfg.layers, stages)[index]
    return Stage(model, first, last, is_first=index == 0, is_last=index == stages - 1)
