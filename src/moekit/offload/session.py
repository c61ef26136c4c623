"""Greedy generation with an offloaded model and the figures of the run (``moekit generate``)."""

from __future__ import annotations

import torch

from moekit.offload.api import OffloadHandle
from moekit.offload.graphs import static_cache_kwargs

__all__ = ["generate_and_measure", "decode_rate"]


def decode_rate(handle: OffloadHandle, batch_size: int) -> float:
    """Tokens/s of the decode steps logged by ``handle`` (forward passes of exactly
    ``batch_size`` tokens, i.e. one new token per sequence; the prefill is excluded)."""
    steps = [r for r in handle.forward_log if r.tokens == batch_size]
    seconds = sum(r.seconds for r in steps)
    return sum(r.tokens for r in steps) / seconds if seconds > 0 else float("nan")


def generate_and_measure(model, tokenizer, prompts: list[str], handle: OffloadHandle,
                         max_new_tokens: int = 32, static_cache: bool = False) -> dict:
    """Greedy ``model.generate`` on ``prompts`` (one batch, left-padded); returns the texts, the
    handle's stats of this call and ``decode_tokens_per_s``. static_cache: decode with a
    ``transformers`` static KV cache (what decode graphs replay, :mod:`moekit.offload.graphs`)
    instead of the dynamic one, with ``generate``'s own compiling disabled."""
    if not prompts or max_new_tokens < 1:
        raise ValueError(f"prompts / max_new_tokens: expected at least one prompt and >= 1 token, "
                         f"got {len(prompts)} / {max_new_tokens}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(handle.engine.device)
    handle.reset_stats()
    kw = {}
    if static_cache:
        import transformers as T

        length = enc["input_ids"].shape[1] + max_new_tokens
        kw = static_cache_kwargs(model, T.StaticCache(config=model.config, max_cache_len=length))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    stats = handle.stats()
    stats["decode_tokens_per_s"] = decode_rate(handle, len(prompts))
    return {"texts": tokenizer.batch_decode(new, skip_special_tokens=True), "stats": stats}
