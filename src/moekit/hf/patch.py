"""Swap Hugging Face MoE blocks for moekit layers that share the same weight storage.

``patch(model)`` replaces every supported block (see :mod:`moekit.hf.families`) by a
:class:`PatchedMoE`, a :class:`moekit.MoE` whose parameters *are* the Hugging Face parameter
objects (no copy, no new memory):

- ``router.gate.weight`` is ``block.gate.weight`` ``[E, D]``;
- ``experts.w_in`` is ``block.experts.gate_up_proj`` ``[E, 2F, D]`` and ``experts.w_out`` is
  ``block.experts.down_proj`` ``[E, D, F]`` (moekit's expert layout is the transformers 5.x one);
- DeepSeek-V3: ``aux_free.bias`` is ``block.gate.e_score_correction_bias`` (a selection-only
  bias, as in moekit's loss-free balancing), group-limited sigmoid routing with the block's
  ``n_group`` / ``topk_group`` / ``routed_scaling_factor``;
- the shared experts (Qwen2-MoE's gated one, DeepSeek-V3's) are the block's own MLP modules.

Differences that remain (documented, not silent): moekit computes router logits in fp32 for
every family, while Mixtral / Qwen / OLMoE compute them in the activation dtype; in fp32 the
outputs agree to rounding, in bf16 the expert choice can differ where two logits tie after
rounding to bf16. Mixtral's training-time router jitter is not reproduced. The state-dict names
of a patched block are moekit's (``experts.w_in`` ...), so save the unpatched model.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.hf.families import MoEBlock, find_moe_blocks
from moekit.layer import MoE, MoEConfig

__all__ = ["PatchedMoE", "HFSharedExperts", "patch", "moe_config_of"]


class HFSharedExperts(nn.Module):
    """A Hugging Face shared-expert MLP (``gate_proj`` / ``up_proj`` / ``down_proj``) used as
    moekit's ``MoE.shared``: ``x_TD [T, D] -> [T, D]``, times ``sigmoid(gate(x))`` when the
    block has a shared-expert gate (Qwen2-MoE). The modules are the block's own (shared
    parameters)."""

    def __init__(self, mlp: nn.Module, gate: nn.Module | None = None):
        super().__init__()
        self.mlp = mlp
        self.gate = gate

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.mlp(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD


def moe_config_of(block: MoEBlock) -> MoEConfig:
    """The :class:`MoEConfig` that reproduces ``block``'s routing and expert shapes."""
    gate, experts = block.module.gate, block.module.experts
    num_experts, dim = gate.weight.shape
    ffn_dim = experts.down_proj.shape[-1]
    if tuple(experts.gate_up_proj.shape) != (num_experts, 2 * ffn_dim, dim):
        raise ValueError(f"model: block {block.name} gate_up_proj has shape {tuple(experts.gate_up_proj.shape)}, "
                         f"expected {(num_experts, 2 * ffn_dim, dim)}")
    fam = block.family
    kw = dict(dim=int(dim), ffn_dim=int(ffn_dim), num_experts=int(num_experts), top_k=block.top_k,
              score=fam.score, balance="none", balance_coeff=0.0, activation="swiglu",
              norm_topk_prob=bool(block.setting("norm_topk_prob") if fam.name != "mixtral" else True))
    if fam.group_limited:
        if not kw["norm_topk_prob"]:
            raise ValueError(f"model: block {block.name} has norm_topk_prob=False with sigmoid scores; "
                             "moekit always renormalises sigmoid top-k weights (expected norm_topk_prob=True)")
        kw.update(router="group_limited", num_groups=int(block.setting("num_group", "n_group")),
                  topk_group=int(block.setting("topk_group")),
                  routed_scaling_factor=float(block.setting("routed_scaling_factor")), balance="aux_free",
                  bias_update_rate=0.0)
    return MoEConfig(**kw)


class PatchedMoE(MoE):
    """A :class:`moekit.MoE` standing in for a Hugging Face block: ``forward(hidden [B, S, D])``
    returns the hidden tensor only (what the decoder layer expects). ``family`` names the
    replaced block's family."""

    def __init__(self, cfg: MoEConfig, block: MoEBlock):
        with torch.device("meta"):  # no allocation: every tensor is replaced by the block's
            super().__init__(cfg)
        self.family = block.family.name
        hf = block.module
        self.router.gate.weight = hf.gate.weight
        self.experts.w_in = hf.experts.gate_up_proj
        self.experts.w_out = hf.experts.down_proj
        if self.aux_free is not None:
            bias = hf.gate.e_score_correction_bias
            self.aux_free.bias = bias
            self.aux_free.counts = torch.zeros(cfg.num_experts, dtype=torch.float64, device=bias.device)
        fam = block.family
        if fam.shared_attr is not None:
            gate = getattr(hf, fam.shared_gate_attr) if fam.shared_gate_attr else None
            self.shared = HFSharedExperts(getattr(hf, fam.shared_attr), gate)
        left = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if left:  # a moekit layer gained a tensor this adapter does not map yet: fail loudly
            raise ValueError(f"model: cannot map {left} of block {block.name} onto moekit's MoE")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden_states).hidden


def patch(model: nn.Module) -> list[str]:
    """Replace every supported Hugging Face MoE block of ``model`` by a :class:`PatchedMoE`
    sharing its parameters (in place). Returns the qualified names of the replaced blocks.

    Raises ``ValueError`` for a model without supported blocks.
    """
    blocks = find_moe_blocks(model)
    for block in blocks:
        layer = PatchedMoE(moe_config_of(block), block)
        layer.train(block.module.training)
        parent_name, _, child = block.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return [b.name for b in blocks]
