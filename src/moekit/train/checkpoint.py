"""Checkpoints: tensors in safetensors, everything else in JSON, both written atomically.

A checkpoint is two files in a run directory:

- ``checkpoint.safetensors``: model state (``model.<name>``, including loss-free balancing
  biases) and optimizer tensors (``optim.<param index>.<key>``);
- ``checkpoint.json``: format version, completed steps, configs, optimizer hyper-parameters,
  the metric history so far, and the sha256 of the tensor file.

Each file is written to a temporary name and moved into place with ``os.replace``; the JSON is
written last and names the tensor file's hash, so a crash between the two (or any corruption)
is detected on load and reported as a ``ValueError`` instead of resuming from mixed state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moekit._io import atomic_path, atomic_write_text

__all__ = ["CHECKPOINT_TENSORS", "CHECKPOINT_META", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"
_FORMAT = "moekit.train.checkpoint/1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict) -> Path:
    """Save ``model`` and ``optimizer`` state plus ``meta`` (JSON-serialisable) into ``run_dir``.

    Returns the path of the JSON file. ``meta`` should hold at least ``step``.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous()
    with atomic_path(run_dir / CHECKPOINT_TENSORS) as tmp:
        save_file(tensors, str(tmp))
        digest = _sha256(tmp)
    doc = {"format": _FORMAT, "tensors": CHECKPOINT_TENSORS, "sha256": digest,
           "param_groups": opt_state["param_groups"], **meta}
    meta_path = run_dir / CHECKPOINT_META
    atomic_write_text(meta_path, json.dumps(doc, indent=1) + "\n")
    return meta_path


def load_checkpoint(run_dir: str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint from ``run_dir`` into ``model`` / ``optimizer`` (each optional).

    Returns the JSON metadata. Raises ``FileNotFoundError`` when there is no checkpoint and
    ``ValueError`` when it is corrupt, truncated or does not match the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta_path, tensor_path = run_dir / CHECKPOINT_META, run_dir / CHECKPOINT_TENSORS
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint: no {CHECKPOINT_META} in {run_dir}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint: {meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "sha256" not in meta:
        raise ValueError(f"checkpoint: {meta_path} is not a {_FORMAT} file")
    if not tensor_path.is_file():
        raise FileNotFoundError(f"checkpoint: {meta_path} names {tensor_path}, which is missing")
    if _sha256(tensor_path) != meta["sha256"]:
        raise ValueError(f"checkpoint: {tensor_path} is corrupt (sha256 differs from {meta_path})")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint: cannot read {tensor_path} ({exc})") from None
    if model is not None:
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        expected = set(model.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"checkpoint: model tensors do not match (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        model.load_state_dict(state)
    if optimizer is not None:
        opt_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state["state"].setdefault(int(idx), {})[name] = value
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint: optimizer state does not match ({exc})") from None
    return meta
