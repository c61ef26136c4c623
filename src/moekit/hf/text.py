"""Load a local ``transformers`` MoE model and trace its routing on a text file.

Used by ``moekit trace`` and ``moekit generate``; nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import os

import torch
from rich.progress import Progress

from moekit.hf.record import record_routing
from moekit.trace import RoutingTrace

__all__ = ["DTYPES", "load_causal_lm", "trace_text"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str | os.PathLike, dtype: str = "bfloat16"):
    """``(model, tokenizer)`` from a local folder with ``config.json``, weights and a tokenizer;
    the model in eval mode on the CPU. ``ValueError`` when the folder is not such a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model: expected a local model folder with config.json, got {path!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, KeyError) as exc:
        raise ValueError(f"model: cannot load {path!r} ({exc})") from exc
    return model.eval(), tokenizer


def trace_text(model, tokenizer, text: str, seq_len: int = 256, batch_size: int = 1,
               max_steps: int | None = None, progress: bool = True) -> RoutingTrace:
    """Routing trace of ``model`` over ``text``: the text is tokenised, cut into windows of
    ``seq_len`` tokens (the last, shorter one is dropped unless it is the only one) and run in
    batches of ``batch_size`` windows, one step per batch. Counts ``[steps, layers, experts]``."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len / batch_size: expected positive integers, got {seq_len} / {batch_size}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("text: expected some text, got an empty file")
    windows = max(ids.numel() // seq_len, 1)
    ids = ids[: windows * seq_len] if ids.numel() >= seq_len else ids
    chunks_WS = ids.view(windows, -1)
    batches = list(torch.split(chunks_WS, batch_size))
    if max_steps is not None:
        batches = batches[:max_steps]
    device = next(model.parameters()).device
    with record_routing(model) as rec, torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tracing", total=len(batches))
        for batch_BS in batches:
            model(input_ids=batch_BS.to(device))
            bar.advance(task)
    trace = rec.trace()
    trace.metadata.update(seq_len=int(chunks_WS.shape[1]), batch_size=batch_size)
    return trace
