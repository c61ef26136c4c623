"""Export a trained moekit LM (``moekit.train.MoELM``) as a ``transformers`` Mixtral model.

``moekit train`` produces a decoder-only MoE LM whose pieces are Mixtral's: RMSNorm before
attention and before the MoE FFN, rotary attention (rotating halves of each head, as
``transformers``' ``rotate_half``), softmax top-k routing with the chosen probabilities
renormalised, SwiGLU experts in the ``transformers`` 5.x fused layout, a final RMSNorm and an
output layer tied to the embedding. ``to_mixtral`` copies the weights into a
``MixtralForCausalLM`` (multi-head attention: as many key/value heads as heads), so that a model
trained here runs with ``transformers``' ``generate`` and with everything moekit builds on it:
``patch``, ``record_routing``, ``offload`` (and its prefetchers, which need a model whose routing
was learned).

Exact in float32 up to rounding: ``torch.nn.RMSNorm`` without ``eps`` uses the input dtype's
machine epsilon, which the exported config fixes to float32's. Routers other than softmax
top-k with renormalised weights (loss-free biases, sigmoid scores, shared or null experts,
scaling) have no Mixtral equivalent and raise ``ValueError``.
"""

from __future__ import annotations

import torch

__all__ = ["to_mixtral"]


def _check_exportable(lm) -> None:
    moe = lm.cfg.moe
    wanted = {"router": "topk", "score": "softmax", "activation": "swiglu", "norm_topk_prob": True,
              "routed_scaling_factor": 1.0, "num_shared_experts": 0, "capacity_factor": None}
    for name, value in wanted.items():
        if getattr(moe, name, value) != value:
            raise ValueError(f"lm: expected MoE layers with {name}={value!r} (Mixtral's routing), got "
                             f"{getattr(moe, name)!r}")
    if moe.balance == "aux_free":
        raise ValueError("lm: expected no loss-free routing biases (balance='aux_free' has no Mixtral equivalent)")


@torch.no_grad()
def to_mixtral(lm, max_position_embeddings: int = 4096):
    """``lm`` (a ``moekit.train.MoELM``) as a new ``transformers.MixtralForCausalLM`` in eval mode,
    float32, on the CPU; the weights are copied. max_position_embeddings: the config's value
    (rotary embeddings are computed, so it only bounds what ``transformers`` accepts)."""
    import transformers as T

    from moekit.hf.families import find_moe_blocks

    _check_exportable(lm)
    cfg, moe = lm.cfg, lm.cfg.moe
    head_dim = cfg.dim // cfg.num_heads
    config = T.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=moe.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        head_dim=head_dim, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        rope_theta=cfg.rope_theta, rms_norm_eps=torch.finfo(torch.float32).eps, tie_word_embeddings=True,
        max_position_embeddings=max_position_embeddings, router_jitter_noise=0.0, sliding_window=None,
        attention_dropout=0.0, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    hf = T.MixtralForCausalLM(config).float().eval()
    state = {k: v.detach().to("cpu", torch.float32) for k, v in lm.state_dict().items()}
    hf.model.embed_tokens.weight.copy_(state["embed.weight"])
    hf.model.norm.weight.copy_(state["norm.weight"])
    blocks = find_moe_blocks(hf)
    for i, (layer, block) in enumerate(zip(hf.model.layers, blocks)):
        p = f"blocks.{i}."
        q, k, v = state[p + "attn.qkv.weight"].chunk(3, dim=0)  # view(b, s, 3, H, hd): q, k, v row blocks
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(state[p + "attn.out.weight"])
        layer.input_layernorm.weight.copy_(state[p + "attn_norm.weight"])
        layer.post_attention_layernorm.weight.copy_(state[p + "moe_norm.weight"])
        block.module.gate.weight.copy_(state[p + "moe.router.gate.weight"])
        block.module.experts.gate_up_proj.copy_(state[p + "moe.experts.w_in"])
        block.module.experts.down_proj.copy_(state[p + "moe.experts.w_out"])
    hf.tie_weights()
    return hf
