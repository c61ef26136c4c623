"""A small decoder-only MoE language model: RMSNorm, RoPE attention, ``moekit.MoE`` FFNs.

Pre-norm blocks ``x + attn(norm(x))`` then ``x + moe(norm(x))``; the output head is tied to
the token embedding. Shapes: ``B`` sequences, ``S`` positions, ``D`` model dim, ``V`` vocab,
``H`` heads, ``Dh = D / H``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import moekit

__all__ = ["LMConfig", "LMOutput", "MoELM", "lm_config_to_dict", "lm_config_from_dict"]


def _default_moe() -> moekit.MoEConfig:
    return moekit.MoEConfig(dim=128, ffn_dim=256, num_experts=8, top_k=2, balance="global",
                            balance_coeff=1e-2)


@dataclass(frozen=True)
class LMConfig:
    """vocab_size: tokens (256 for bytes); dim: model width (must equal ``moe.dim``);
    num_layers: blocks, each with one MoE FFN; num_heads: attention heads (``dim % heads == 0``);
    rope_theta: RoPE base; moe: the MoE layer config shared by every block."""

    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    rope_theta: float = 10000.0
    moe: moekit.MoEConfig = field(default_factory=_default_moe)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"num_heads: expected a divisor of dim={self.dim} giving an even "
                             f"head dim, got {self.num_heads}")
        if self.moe.dim != self.dim:
            raise ValueError(f"moe.dim: expected {self.dim} (the model dim), got {self.moe.dim}")


def lm_config_to_dict(cfg: LMConfig) -> dict:
    return dataclasses.asdict(cfg)


def lm_config_from_dict(d: dict) -> LMConfig:
    d = dict(d)
    d["moe"] = moekit.MoEConfig(**d["moe"])
    return LMConfig(**d)


class LMOutput(NamedTuple):
    """logits_BSV: ``[B, S, V]``; aux_loss: scalar sum of the layers' (already scaled) balance
    losses; routings: one ``moekit.Routing`` per layer (tokens flattened ``T = B * S``)."""

    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor
    routings: list


def _rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    # Rotate pairs (first half, second half) of each head dim by position-dependent angles.
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHSd * cos_Sd + rotated * sin_Sd


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def _cos_sin(self, seq_len: int, device, dtype):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device,
                                                      dtype=torch.float32) / self.head_dim))
        angles_Sh = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
        angles_Sd = torch.cat([angles_Sh, angles_Sh], dim=-1)
        return angles_Sd.cos().to(dtype), angles_Sd.sin().to(dtype)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self._cos_sin(s, x_BSD.device, q.dtype)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y_BHSd.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, dp_group=None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.moe_norm = nn.RMSNorm(cfg.dim)
        self.moe = moekit.MoE(cfg.moe, dp_group=dp_group)

    def forward(self, x_BSD: torch.Tensor):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        # [B, S, D] goes in whole: balance="seq" treats dim 0 as sequences.
        out = self.moe(self.moe_norm(x_BSD))
        return x_BSD + out.hidden, out.aux_loss, out.routing


class MoELM(nn.Module):
    """Decoder-only LM. forward(tokens_BS int64) -> :class:`LMOutput`."""

    def __init__(self, cfg: LMConfig, dp_group=None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, dp_group) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self._init_dense()

    def _init_dense(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2L). The MoE
        # layers keep their own initialisation.
        nn.init.normal_(self.embed.weight, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.02)
            nn.init.normal_(blk.attn.out.weight, std=0.02 / math.sqrt(2 * self.cfg.num_layers))

    def forward(self, tokens_BS: torch.Tensor) -> LMOutput:
        if tokens_BS.ndim != 2 or tokens_BS.dtype != torch.long:
            raise ValueError(f"tokens: expected int64 [B, S], got {tokens_BS.dtype} "
                             f"{tuple(tokens_BS.shape)}")
        x_BSD = self.embed(tokens_BS)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        routings = []
        for blk in self.blocks:
            x_BSD, layer_aux, routing = blk(x_BSD)
            aux = aux + layer_aux.float()
            routings.append(routing)
        logits_BSV = F.linear(self.norm(x_BSD), self.embed.weight)
        return LMOutput(logits_BSV, aux, routings)
