"""JSON files of the placement tools: atomic writes, one clear error for a bad file."""

from __future__ import annotations

import json
import os


import numpy as np

from moekit._io import atomic_write_json

__all__ = ["write_json", "read_json", "read_load"]


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, then ``os.replace``)."""
    atomic_write_json(path, obj)


def read_json(path: str | os.PathLike, what: str):
    """Parsed JSON of ``path``; ``FileNotFoundError`` / ``ValueError`` naming ``what``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path!r}: not valid JSON ({exc})") from exc


def read_load(path: str | os.PathLike) -> np.ndarray:
    """A load file: JSON ``[[...] per layer]`` (or ``[...]``) or ``{"load": ...}`` -> float64 array."""
    data = read_json(path, "load")
    if isinstance(data, dict):
        if "load" not in data:
            raise ValueError(f"load {os.fspath(path)!r}: expected a list or an object with key 'load'")
        data = data["load"]
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load {os.fspath(path)!r}: expected numbers [layers][experts] ({exc})") from exc
