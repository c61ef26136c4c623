"""Named sizes of model, data and schedule.

- ``cpu``: the ``moekit train`` default. One 2k-token micro-batch took ~0.2 s forward +
  backward on an idle moment of the 2-core CPU, so 150 steps x 4 micro-batches is ~2-3 min
  plus evaluation; under heavy load from other processes it takes several times longer.
- ``cpu-compare``: one arm of ``moekit compare`` on CPU (half the tokens per step).
- ``gpu``: ~4.5 min per arm on one H100 (162 ms per 64k-token step measured).
- ``tiny``: tests (seconds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import moekit
from moekit.train.loader import LoaderConfig
from moekit.train.model import LMConfig
from moekit.train.trainer import TrainConfig

__all__ = ["Preset", "PRESETS", "BALANCE_ARMS", "preset", "with_balance"]

BALANCE_ARMS = ("none", "micro", "seq", "global", "aux_free")


@dataclass(frozen=True)
class Preset:
    lm: LMConfig
    loader: LoaderConfig
    train: TrainConfig
    description: str


def _lm(dim: int, layers: int, heads: int, experts: int, top_k: int, ffn: int) -> LMConfig:
    moe = moekit.MoEConfig(dim=dim, ffn_dim=ffn, num_experts=experts, top_k=top_k,
                           balance="global", balance_coeff=1e-2)
    return LMConfig(dim=dim, num_layers=layers, num_heads=heads, moe=moe)


def _presets() -> dict[str, Preset]:
    # grad_accum * world = 4 = number of domains: in single-domain mode each optimizer step
    # sees every domain once, one domain per micro-batch (Qiu et al.'s setting).
    return {
        "cpu": Preset(
            _lm(dim=128, layers=4, heads=4, experts=8, top_k=2, ffn=256),
            LoaderConfig(seq_len=128, micro_batch_size=16, mode="single"),
            TrainConfig(steps=150, grad_accum=4, lr=3e-3, warmup_steps=15, eval_every=75,
                        eval_seqs_per_domain=64, device="auto"),
            "4 layers, d=128, 8 experts top-2; 150 steps x 8k tokens (~3 min, 2 idle CPU cores)"),
        "cpu-compare": Preset(
            _lm(dim=128, layers=4, heads=4, experts=8, top_k=2, ffn=256),
            LoaderConfig(seq_len=128, micro_batch_size=8, mode="single"),
            TrainConfig(steps=120, grad_accum=4, lr=3e-3, warmup_steps=12, eval_every=60,
                        eval_seqs_per_domain=64, device="auto"),
            "cpu model, 120 steps x 4k tokens per arm (~2-3 min per arm on 2 CPU cores)"),
        "gpu": Preset(
            _lm(dim=384, layers=6, heads=6, experts=16, top_k=2, ffn=768),
            LoaderConfig(seq_len=512, micro_batch_size=32, mode="single"),
            TrainConfig(steps=1500, grad_accum=4, lr=2e-3, warmup_steps=100, eval_every=250,
                        eval_seqs_per_domain=128, device="cuda"),
            "6 layers, d=384, 16 experts top-2; 1500 steps x 64k tokens "
            "(~4.5 min per arm on one H100; 162 ms/step measured)"),
        "tiny": Preset(
            _lm(dim=32, layers=2, heads=2, experts=4, top_k=2, ffn=32),
            LoaderConfig(seq_len=32, micro_batch_size=4, mode="single"),
            TrainConfig(steps=8, grad_accum=2, lr=1e-2, warmup_steps=2, eval_every=100,
                        eval_seqs_per_domain=4, eval_batch_size=4, device="cpu", timing_warmup=0),
            "2 layers, d=32, 4 experts top-2 (tests)"),
    }


def preset(name: str) -> Preset:
    """The preset called ``name`` (one of ``cpu``, ``cpu-compare``, ``gpu``, ``tiny``)."""
    table = _presets()
    if name not in table:
        raise ValueError(f"preset: expected one of {sorted(table)}, got {name!r}")
    return table[name]


PRESETS = ("cpu", "cpu-compare", "gpu", "tiny")


def with_balance(lm: LMConfig, balance: str, coeff: float | None = None) -> LMConfig:
    """``lm`` with every MoE layer using ``balance`` (and ``balance_coeff`` when given)."""
    if balance not in BALANCE_ARMS:
        raise ValueError(f"balance: expected one of {list(BALANCE_ARMS)}, got {balance!r}")
    changes = {"balance": balance}
    if coeff is not None:
        changes["balance_coeff"] = coeff
    return dataclasses.replace(lm, moe=dataclasses.replace(lm.moe, **changes))
