"""Held-out evaluation: loss per domain and routing counts per layer, domain and expert.

All balance and specialization figures come from ``moekit.metrics`` (one definition each);
this module only collects the counts ``c[l, d, e]`` they are computed from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from moekit import metrics
from moekit.train.corpus import Corpus
from moekit.train.loader import eval_batches

__all__ = ["evaluate", "routing_summary"]


def routing_summary(counts_LDE: np.ndarray, top_k: int) -> dict:
    """Balance and specialization of held-out counts ``[L, D, E]``.

    ``max_vio_global``: MaxVio with the whole evaluation set as one window, mean over layers.
    ``max_vio_domain``: MaxVio of each domain's own window (mean over layers and domains): how
    unevenly a single-domain batch would load the experts.
    """
    c_LDE = np.asarray(counts_LDE, dtype=np.float64)
    spec = metrics.specialization(c_LDE, top_k)
    per_domain = np.stack([metrics.max_vio(c_LDE[:, d]) for d in range(c_LDE.shape[1])])
    return {
        "max_vio_global": float(metrics.max_vio(c_LDE.sum(axis=1)).mean()),
        "max_vio_global_per_layer": metrics.max_vio(c_LDE.sum(axis=1)).tolist(),
        "max_vio_domain": float(per_domain.mean()),
        **spec,
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, seq_len: int, seqs_per_domain: int,
             batch_size: int, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """Loss per held-out domain (nats/byte and bits/byte) and routing counts.

    Returns ``{"val_loss": {domain: nats}, "val_loss_mean", "val_bpb_mean", "counts_LDE":
    [L][D][E] list, **routing_summary}``. The model is put back in training mode afterwards.
    """
    was_training = model.training
    model.eval()
    num_layers = len(model.blocks)
    num_experts = model.cfg.moe.num_experts
    counts_LDE = torch.zeros(num_layers, len(corpus.domains), num_experts, dtype=torch.float64)
    loss_sum = torch.zeros(len(corpus.domains), dtype=torch.float64)
    tok_sum = torch.zeros(len(corpus.domains), dtype=torch.float64)
    for d, tokens in eval_batches(corpus, seq_len, seqs_per_domain, batch_size):
        tokens = tokens.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(tokens[:, :-1])
        ce = F.cross_entropy(out.logits_BSV.float().flatten(0, 1), tokens[:, 1:].flatten(),
                             reduction="sum")
        loss_sum[d] += float(ce)
        tok_sum[d] += tokens[:, 1:].numel()
        for layer, routing in enumerate(out.routings):
            counts_LDE[layer, d] += routing.tokens_per_expert.double().cpu()
    model.train(was_training)
    val = (loss_sum / tok_sum).tolist()
    mean = float(np.mean(val))
    return {
        "val_loss": dict(zip(corpus.domains, val)),
        "val_loss_mean": mean,
        "val_bpb_mean": mean / math.log(2),
        "counts_LDE": counts_LDE.tolist(),
        **routing_summary(counts_LDE.numpy(), model.cfg.moe.top_k),
    }
