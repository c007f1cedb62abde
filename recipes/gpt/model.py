"""A Llama-style decoder: RMSNorm, rotary attention with optional grouped-query heads, SwiGLU.

The architecture follows Llama 2/3 so numbers measured here (throughput, MFU, memory) carry over
to the models people actually train. Two layout choices serve distributed training: the blocks
live in ``model.layers`` (an ``nn.ModuleList``) so FSDP2 can ``fully_shard`` each block, and
the rotary tables are non-persistent buffers, recomputed rather than checkpointed, so a model
state dict holds only parameters.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F  # noqa: N812 (the universal PyTorch spelling)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ModelConfig(BaseModel):
    """Shape of the decoder. Defaults give the ~1M-parameter model of ``configs/tiny.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: Positive = 128  # width of the residual stream
    n_layers: Positive = 4
    n_heads: Positive = 4
    n_kv_heads: Positive | None = None  # grouped-query attention; None: as many as n_heads
    vocab_size: Positive = 256
    multiple_of: Positive = 32  # round the SwiGLU width up to a multiple of this
    ffn_dim_multiplier: PositiveFloat | None = None
    max_seq_len: Positive = 128  # longest sequence the RoPE table covers
    rope_theta: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-5
    tie_embeddings: bool = False
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Llama's SwiGLU width: 2/3 of 4*dim (same parameters as a 4*dim GELU MLP), rounded."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 so bf16 activations keep their scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine of each position's rotation angles, shape (seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position, in the real-valued "rotate half" form.

    Real arithmetic rather than complex numbers, because DTensor, torch.compile and bf16 all
    handle it without special cases.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    """Causal self-attention; ``n_kv_heads < n_heads`` shares each key/value head (GQA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # Expanding keeps every SDPA backend (flash included) available, unlike enable_gqa.
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.wo(y.transpose(1, 2).reshape(batch, seq, -1))
        return out


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out


class Block(nn.Module):
    """One pre-norm transformer block: the unit FSDP2 shards and torch.compile compiles."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        out: torch.Tensor = x + self.feed_forward(self.ffn_norm(x))
        return out


class Transformer(nn.Module):
    """The decoder. ``forward(tokens)`` returns next-token logits of shape (B, T, vocab)."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        # torch's default initialisers draw from the global RNG; init_weights replaces their
        # values anyway, so fork it and leave the caller's random stream as it was.
        with torch.random.fork_rng(devices=[]):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from ``seed`` alone, on the CPU, in registration order.

        A private generator keeps the global RNG untouched, and drawing on the CPU then copying
        makes the weights identical whatever the device, the world size or the parallelism.
        Output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream's
        variance does not grow with depth.
        """
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            scale = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
            values = torch.empty(param.shape, dtype=torch.float32)
            values.normal_(0.0, scale, generator=gen)
            param.copy_(values)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits: torch.Tensor = self.output(self.norm(h))
        return logits

    def num_params(self) -> int:
        """Parameters, counting a tied embedding/output matrix once. Works on the meta device."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward and backward), the PaLM-paper estimate used for MFU.

        6 FLOPs per token for every parameter that takes part in a matmul (all but the embedding
        lookup; the output head always does, tied or not), plus 12 * layers * dim * seq_len for
        the attention scores and their weighted sum.
        """
        lookup = self.cfg.vocab_size * self.cfg.dim
        matmul_params = self.num_params() - lookup
        if self.cfg.tie_embeddings:
            matmul_params += lookup
        attention = 12 * self.cfg.n_layers * self.cfg.dim * seq_len
        return float(6 * matmul_params + attention)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
