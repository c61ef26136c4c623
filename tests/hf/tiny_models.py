"""Tiny random-initialised transformers MoE models of every supported family (test helper)."""

from __future__ import annotations

import torch

__all__ = ["FAMILY_NAMES", "tiny_config", "tiny_model"]

FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_config(family: str):
    """A config with 2-3 decoder layers, width 32, 4-8 experts, top-2 (DeepSeek-V3: one dense
    layer first, 8 experts in 4 groups, 2 groups kept, routed scale 2.5, one shared expert)."""
    import transformers as T

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, initializer_range=0.2,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        return T.MixtralConfig(**common, intermediate_size=48, num_local_experts=4)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, num_experts=6, norm_topk_prob=False)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24, head_dim=8,
                                num_experts=6, norm_topk_prob=True)
    if family == "olmoe":
        return T.OlmoeConfig(**common, intermediate_size=24, num_experts=6)
    if family == "deepseek_v3":
        common = dict(common, num_hidden_layers=3, num_key_value_heads=4)
        return T.DeepseekV3Config(**common, intermediate_size=48, moe_intermediate_size=24, first_k_dense_replace=1,
                                  n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1,
                                  kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8, routed_scaling_factor=2.5)
    raise ValueError(f"family: expected one of {FAMILY_NAMES}, got {family!r}")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised causal LM of ``family`` in eval mode. DeepSeek-V3's
    ``e_score_correction_bias`` (zeros at init) gets random values so that it matters."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype).eval()
    for module in model.modules():
        bias = getattr(getattr(module, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.rand_like(bias) * 0.2)
    return model
