"""The embedded multi-domain corpus (``moekit/train/data``) as byte tensors.

The corpus ships as ``<domain>.<split>.txt.gz`` files plus ``manifest.json`` (provenance and
licence per domain, see ``SOURCES.md`` there). Text is tokenized as raw UTF-8 bytes, so the
vocabulary is the 256 byte values and a token id is a byte.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "Corpus", "load_corpus", "encode", "decode"]

VOCAB_SIZE = 256  # byte-level tokens


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``[N]`` uint8 tensor."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens: torch.Tensor) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 sequences are replaced)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    """Byte streams per domain.

    domains: domain names in a fixed order (index = domain id used everywhere else).
    train / val: ``{domain: [N] uint8}``; val holds held-out documents only.
    manifest: the parsed ``manifest.json`` (provenance, licence, sizes).
    """

    domains: tuple[str, ...]
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    manifest: dict

    def domain_id(self, name: str) -> int:
        if name not in self.domains:
            raise ValueError(f"domain: expected one of {list(self.domains)}, got {name!r}")
        return self.domains.index(name)


def _data_dir() -> Path:
    return Path(str(resources.files("moekit.train") / "data"))


def load_corpus(domains: list[str] | tuple[str, ...] | None = None,
                data_dir: str | Path | None = None, max_train_bytes: int | None = None) -> Corpus:
    """Load the shipped corpus (or one rebuilt into ``data_dir``).

    domains: subset and order of domains (default: all in manifest order).
    max_train_bytes: keep only the first N training bytes per domain (tests use this to stay
    fast); held-out data is never cut.
    """
    root = Path(data_dir) if data_dir is not None else _data_dir()
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"corpus manifest not found at {manifest_path}; "
                                "rebuild with scripts/build_corpus.py")
    manifest = json.loads(manifest_path.read_text())
    available = list(manifest["domains"])
    names = tuple(domains) if domains else tuple(available)
    unknown = [d for d in names if d not in available]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"domains: expected distinct names from {available}, got {list(names)}")
    if max_train_bytes is not None and max_train_bytes < 2:
        raise ValueError(f"max_train_bytes: expected >= 2 or None, got {max_train_bytes}")
    train, val = {}, {}
    for name in names:
        files = manifest["domains"][name]["files"]
        for split, out in (("train", train), ("val", val)):
            raw = gzip.decompress((root / files[split]["file"]).read_bytes())
            if split == "train" and max_train_bytes is not None:
                raw = raw[:max_train_bytes]
            out[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
    return Corpus(domains=names, train=train, val=val, manifest=manifest)
