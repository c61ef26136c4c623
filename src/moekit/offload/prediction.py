"""Prediction of the next layers' experts and its prefetch queue, the part of
:class:`~moekit.offload.engine.OffloadEngine` that guesses (see the engine's module doc, step 3).

``prefetch="next_layer"`` runs the next layer's router on this layer's input;
``"layer_output"`` runs the next layer's norm and router on the decoder layer's output (its
result goes to the host asynchronously and is read at the next poll); ``"layer_output2"`` adds
the layer after. A prediction is ranked by :func:`rank_predictions` and replaces the prefetch
queue, nearest layer first; each is scored (precision, recall) when its layer's routing is known.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["Predictor", "PredictionMixin", "rank_predictions"]

# x_TD -> (predicted indices [T, k] int64, predicted router probabilities [T, E]) of the next layer
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rank_predictions(counts_E: list[float], mass_E: list[float], extra: int) -> list[int]:
    """Experts to prefetch, best first: those in the predicted top-k of some token (most tokens
    first, then most probability mass), then ``extra`` more by probability mass."""
    order = sorted(range(len(counts_E)), key=lambda e: (-counts_E[e], -mass_E[e], e))
    chosen = [e for e in order if counts_E[e] > 0]
    rest = [e for e in order if counts_E[e] <= 0]
    return chosen + rest[:max(extra, 0)]



class PredictionMixin:
    """The engine's prediction methods. Uses the engine's ``num_experts``, ``host_w_in``,
    ``out_predictors``, ``prefetch_extra``, ``cuda``, ``device``, ``counters``, the queue state
    (``_queue``, ``_guard``, ``_predicted``, ``_queued_at``, ``_pending``, ``_pred_buf``) and
    :meth:`pump`."""

    def _count(self, indices: torch.Tensor, bins: int) -> torch.Tensor:
        """Tokens per bin ``[bins]`` (float32) of non-negative ``indices < bins``. Unlike
        ``torch.bincount``, which reads the maximum back to size its output, this never
        synchronises the host, so the host reaches :meth:`_to_host` early and pumps there."""
        flat = indices.reshape(-1)
        return torch.zeros(bins, dtype=torch.float32, device=flat.device).index_add_(
            0, flat, torch.ones(flat.shape, dtype=torch.float32, device=flat.device))


    def _set_prefetch(self, targets: list[tuple[int, list[float], list[float]]],
                      protected: set[tuple[int, int]]) -> None:
        """Replace the prefetch queue by the ranked predictions ``[(layer, counts_E, mass_E),
        ...]``, nearest layer first (its guesses are queued first)."""
        self._queue = []
        keys: list[tuple[int, int]] = []
        for layer, counts_E, mass_E in targets:
            if layer >= len(self.host_w_in):
                continue
            self._predicted[layer] = {e for e in range(self.num_experts) if counts_E[e] > 0}
            self._queued_at.setdefault(layer, time.perf_counter())  # a later prediction keeps the first's lead
            keys += [(layer, e) for e in rank_predictions(counts_E, mass_E, self.prefetch_extra)]
        if not keys:
            return
        self._guard = set(protected) | set(keys)
        self._queue = keys
        self.pump()

    def _prediction_tensor(self, predictor: Predictor, x_TD: torch.Tensor) -> torch.Tensor:
        idx_TK, probs_TE = predictor(x_TD)
        return torch.cat([self._count(idx_TK, self.num_experts), probs_TE.float().sum(0)])

    def predict_from_output(self, layer: int, h_TD: torch.Tensor) -> None:
        """Predict the experts of MoE layer ``layer + 1`` (and ``layer + 2``, ... with several
        out-predictors) from the output ``h_TD [T, D]`` of the decoder layer holding MoE layer
        ``layer`` (``prefetch="layer_output"``). Does not wait: the prediction goes to the host
        asynchronously and its prefetch starts when it has arrived (:meth:`poll`)."""
        predictors = self.out_predictors[layer]
        if predictors is None:
            return
        with torch.no_grad():
            t = torch.cat([self._prediction_tensor(p, h_TD) for p in predictors])
        arrived = None
        if self.cuda:
            if self._pred_buf is None or self._pred_buf.numel() < t.numel():
                self._pred_buf = torch.empty(t.numel(), dtype=torch.float32, pin_memory=True)
            # an unread earlier prediction is dropped: its host copy is overwritten after it in stream order
            host = self._pred_buf[:t.numel()]
            host.copy_(t, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(torch.cuda.current_stream(self.device))
            t = host
        self._pending = (layer + 1, t, arrived)

    def _read_prediction(self, pending: tuple, known: int = -1) -> list[tuple[int, list[float], list[float]]]:
        """Read an arrived ``layer_output`` prediction ``pending = (first target layer, host
        values, event)``; return its targets after ``known`` (the last layer whose routing is
        known) as ``[(layer, counts_E, mass_E), ...]`` for :meth:`_set_prefetch`. A target equal
        to ``known`` is only kept for scoring precision and recall; earlier ones are stale."""
        first, t, _ = pending
        host, e = t.tolist(), self.num_experts
        targets = []
        for i in range(len(host) // (2 * e)):
            layer, part = first + i, host[2 * e * i:2 * e * (i + 1)]
            if layer > known:
                targets.append((layer, part[:e], part[e:]))
            elif layer == known and layer < len(self.host_w_in):
                self._predicted[layer] = {j for j in range(e) if part[j] > 0}
        return targets
    def _score_prediction(self, layer: int, needed: list[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        c = self.counters
        c.predicted += len(predicted)
        c.predicted_used += len(predicted.intersection(needed))
        c.needed_after_prediction += len(needed)
