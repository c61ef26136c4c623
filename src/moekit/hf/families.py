"""Which ``transformers`` MoE blocks moekit understands, and how to read each one.

A *family* describes one Hugging Face sparse-MoE block class (``transformers`` 5.x layout):
the routed experts are a fused module ``block.experts`` with ``gate_up_proj [E, 2F, D]``
(rows ``[:F]`` gate, ``[F:]`` up) and ``down_proj [E, D, F]``, called as
``experts(x_TD, top_k_index_TK, top_k_weights_TK)``; the router is ``block.gate`` with a
``weight [E, D]``. What differs between families is the scoring (softmax or DeepSeek-V3's
sigmoid + group-limited selection + ``e_score_correction_bias`` + ``routed_scaling_factor``),
whether the top-k weights are renormalised, and the shared experts (Qwen2-MoE: one MLP with a
sigmoid gate per token; DeepSeek-V3: an ungated MLP).

Blocks are matched by class name, so a model from any ``transformers`` version with the 5.x
fused layout is recognised without importing every modelling module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Family", "FAMILIES", "MoEBlock", "find_moe_blocks", "route_block", "predict_block", "block_family"]


@dataclass(frozen=True)
class Family:
    """One supported block class.

    name: family name ("mixtral", ...). block_class: the ``transformers`` class name.
    score: "softmax" or "sigmoid". group_limited: DeepSeek-V3 group-limited selection.
    shared_attr: attribute of the block holding the shared experts MLP (None: no shared
    experts). shared_gate_attr: attribute of the ``[D] -> [1]`` sigmoid gate of the shared
    experts (Qwen2-MoE), None when ungated.
    """

    name: str
    block_class: str
    score: str = "softmax"
    group_limited: bool = False
    shared_attr: str | None = None
    shared_gate_attr: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", "MixtralSparseMoeBlock"),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    Family("olmoe", "OlmoeSparseMoeBlock"),
    Family("deepseek_v3", "DeepseekV3MoE", score="sigmoid", group_limited=True, shared_attr="shared_experts"),
)
_BY_CLASS = {f.block_class: f for f in FAMILIES}


@dataclass
class MoEBlock:
    """A supported MoE block found in a model.

    name: its qualified module name (``model.layers.3.mlp``). module: the block.
    family: its :class:`Family`. layer: index among the model's MoE blocks (0-based, in
    module order, which is the order the blocks run in a decoder stack).
    """

    name: str
    module: nn.Module
    family: Family
    layer: int

    @property
    def num_experts(self) -> int:
        return int(self.module.gate.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.setting("top_k", "num_experts_per_tok"))

    def setting(self, *names: str):
        """The first of ``names`` found on the router, the block, or the block's config (where
        ``transformers`` releases keep routing settings differs between 5.x versions)."""
        owners = (self.module.gate, self.module, getattr(self.module, "config", None),
                  getattr(self.module.experts, "config", None))
        for name in names:
            for owner in owners:
                if owner is not None and hasattr(owner, name):
                    return getattr(owner, name)
        raise ValueError(f"model: block {self.name} has none of {names}; unsupported transformers version")


def block_family(module: nn.Module) -> Family | None:
    """The :class:`Family` of a ``transformers`` MoE block, or None for any other module."""
    return _BY_CLASS.get(type(module).__name__)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All supported Hugging Face MoE blocks of ``model`` in execution order.

    Raises ``ValueError`` naming the supported classes when there is none.
    """
    blocks = []
    for name, module in model.named_modules():
        family = block_family(module)
        if family is not None:
            _check_block(name, module, family)
            blocks.append(MoEBlock(name, module, family, len(blocks)))
    if not blocks:
        supported = ", ".join(f.block_class for f in FAMILIES)
        raise ValueError(f"model: expected a transformers model with MoE blocks of a supported family "
                         f"({supported}), found none in {type(model).__name__}")
    return blocks


def _check_block(name: str, module: nn.Module, family: Family) -> None:
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    for attr, owner in (("gate_up_proj", experts), ("down_proj", experts), ("weight", gate)):
        if owner is None or not isinstance(getattr(owner, attr, None), torch.Tensor):
            raise ValueError(f"model: block {name} ({family.block_class}) lacks the transformers 5.x fused layout "
                             f"(missing {attr}); expected transformers>=5")
    act = getattr(getattr(module.experts, "config", None), "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"model: block {name} uses hidden_act={act!r}; expected 'silu' (SwiGLU experts)")


def route_block(block: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``block``'s own router on ``x_TD [T, D]``: ``(indices [T, k] int64, weights [T, k])``.

    Uses the Hugging Face router module itself, so the choice is exactly the block's (same
    logits dtype, same tie-breaking). Handles routers that return ``(logits, weights,
    indices)`` (transformers >= 5.x) and DeepSeek-V3 routers of earlier 5.x releases that
    return only logits and leave the selection to ``block.route_tokens_to_experts``. Calls the
    router's ``forward`` directly, so forward hooks (routing recorders, transformers' router
    logits capture) do not see these extra calls (they serve predictions).
    """
    out = block.gate.forward(x_TD)
    if isinstance(out, tuple) and len(out) == 3:
        _, weights_TK, indices_TK = out
        return indices_TK, weights_TK
    indices_TK, weights_TK = block.route_tokens_to_experts(out)
    return indices_TK, weights_TK


def predict_block(block: MoEBlock, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block``'s router on ``x_TD [T, D]`` as a prediction: ``(indices [T, k] int64,
    probabilities [T, E] float32)``, the probabilities being the family's scores (softmax, or
    DeepSeek-V3's per-expert sigmoid) of the router logits. Like :func:`route_block`, it calls
    the router's ``forward`` directly, so routing recorders do not see it."""
    module = block.module
    out = module.gate.forward(x_TD)
    if isinstance(out, tuple) and len(out) == 3:
        logits, _, indices_TK = out
    else:
        logits = out
        indices_TK, _ = module.route_tokens_to_experts(out)
    logits_TE = logits.float().reshape(-1, block.num_experts)
    probs_TE = logits_TE.sigmoid() if block.family.score == "sigmoid" else logits_TE.softmax(dim=-1)
    return indices_TK, probs_TE
