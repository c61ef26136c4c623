"""Deterministic micro-batch sampling from the multi-domain corpus.

Every micro-batch is a pure function of ``(seed, step, micro, rank)``: there is no loader state
to save, a resumed run sees exactly the batches it would have seen, and ``world`` ranks with
``accum`` micro-batches each see, between them, the same sequences as one process running
``world * accum`` micro-batches (micro-batch slot ``s = micro * world + rank``).

Two mixing modes:

- ``single``: every micro-batch is drawn from ONE domain. Per optimizer step the domains are
  visited in a fresh random order, slot ``s`` taking domain ``order[s % D]``; with
  ``world * accum`` a multiple of ``D`` a global batch holds every domain equally often. This is
  the setting of Qiu et al. (2025) where micro-batch balancing hurts specialization.
- ``mixed``: every sequence picks its domain at random, so a micro-batch mixes domains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.train.corpus import Corpus

__all__ = ["LoaderConfig", "MicroBatch", "micro_batch", "eval_batches"]

_MODES = ("single", "mixed")


@dataclass(frozen=True)
class LoaderConfig:
    """seq_len: tokens per sequence; micro_batch_size: sequences per micro-batch on one rank;
    mode: ``single`` (one domain per micro-batch) or ``mixed``; seed: data order seed."""

    seq_len: int = 128
    micro_batch_size: int = 16
    mode: str = "single"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len: expected >= 1, got {self.seq_len}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: expected >= 1, got {self.micro_batch_size}")
        if self.mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class MicroBatch:
    """tokens_BS1: ``[B, S+1]`` int64 (inputs ``[:, :-1]``, targets ``[:, 1:]``);
    domain_B: ``[B]`` int64 domain id of each sequence."""

    tokens_BS1: torch.Tensor
    domain_B: torch.Tensor


def _generator(seed: int, *keys: int) -> torch.Generator:
    # One independent stream per (seed, keys): mix with large odd constants (splitmix-like)
    # so that neighbouring steps/ranks do not get correlated streams.
    h = seed & 0xFFFFFFFF
    for key in keys:
        h = (h * 0x9E3779B1 + key * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


def _windows(stream_N: torch.Tensor, starts_B: torch.Tensor, length: int) -> torch.Tensor:
    idx_BL = starts_B[:, None] + torch.arange(length)[None, :]
    return stream_N[idx_BL].long()


def micro_batch(corpus: Corpus, cfg: LoaderConfig, step: int, micro: int, rank: int = 0,
                world: int = 1) -> MicroBatch:
    """Micro-batch ``micro`` of optimizer step ``step`` on ``rank`` of ``world`` ranks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world={world}, got {rank}")
    slot = micro * world + rank
    num_domains = len(corpus.domains)
    b, length = cfg.micro_batch_size, cfg.seq_len + 1
    if cfg.mode == "single":
        order = torch.randperm(num_domains, generator=_generator(cfg.seed, step))
        domain_B = torch.full((b,), int(order[slot % num_domains]), dtype=torch.long)
    else:
        domain_B = torch.randint(num_domains, (b,), generator=_generator(cfg.seed, step, slot, 1))
    gen = _generator(cfg.seed, step, slot, 2)
    rows = []
    for d in domain_B.tolist():
        stream = corpus.train[corpus.domains[d]]
        if stream.numel() < length:
            raise ValueError(f"seq_len: expected < {stream.numel()} (size of domain "
                             f"{corpus.domains[d]!r}), got {cfg.seq_len}")
        start = torch.randint(stream.numel() - length + 1, (1,), generator=gen)
        rows.append(_windows(stream, start, length))
    return MicroBatch(tokens_BS1=torch.cat(rows), domain_B=domain_B)


def eval_batches(corpus: Corpus, seq_len: int, seqs_per_domain: int, batch_size: int):
    """Fixed held-out evaluation batches: yields ``(domain_id, tokens [b, seq_len+1])``.

    Sequences are evenly spaced, non-overlapping where the held-out text allows, so every run
    evaluates on exactly the same tokens.
    """
    length = seq_len + 1
    for d, name in enumerate(corpus.domains):
        stream = corpus.val[name]
        if stream.numel() < length:
            raise ValueError(f"seq_len: expected < {stream.numel()} (held-out size of {name!r})")
        last = stream.numel() - length
        starts = torch.linspace(0, last, seqs_per_domain).long()
        for i in range(0, seqs_per_domain, batch_size):
            yield d, _windows(stream, starts[i:i + batch_size], length)
