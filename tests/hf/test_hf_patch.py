"""moekit.hf.patch: every supported family keeps its logits and gradients, sharing storage."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import FAMILY_NAMES, tiny_model  # noqa: E402

from moekit.hf import PatchedMoE, find_moe_blocks, moe_config_of, patch  # noqa: E402


def _expert_tensors(model):
    out = []
    for b in find_moe_blocks(model):
        out += [b.module.gate.weight, b.module.experts.gate_up_proj, b.module.experts.down_proj]
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patch_keeps_logits_gradients_and_storage(family):
    model = tiny_model(family, seed=1)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    params_before = dict(model.named_parameters())
    expert_ptrs = [t.data_ptr() for t in _expert_tensors(model)]

    ref_logits = model(ids).logits
    ref_logits.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in params_before.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    names = patch(model)
    layers = [m for m in model.modules() if isinstance(m, PatchedMoE)]
    assert len(layers) == len(names) >= 2
    # same parameter objects: no copy, no new parameter memory
    after = {id(p) for p in model.parameters()}
    assert after == {id(p) for p in params_before.values()}
    ptrs = [t.data_ptr() for m in layers for t in (m.router.gate.weight, m.experts.w_in, m.experts.w_out)]
    assert ptrs == expert_ptrs

    logits = model(ids).logits
    torch.testing.assert_close(logits, ref_logits.detach(), atol=2e-5, rtol=1e-5)
    logits.square().mean().backward()
    for name, grad in ref_grads.items():
        p = params_before[name]
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grad, atol=2e-5, rtol=1e-4, msg=name)
    assert all(layer.experts.w_in.grad.abs().sum() > 0 for layer in layers)


def test_deepseek_config_and_correction_bias_are_shared():
    model = tiny_model("deepseek_v3")
    block = find_moe_blocks(model)[0]
    cfg = moe_config_of(block)
    assert (cfg.router, cfg.score, cfg.num_groups, cfg.topk_group, cfg.routed_scaling_factor) == \
        ("group_limited", "sigmoid", 4, 2, 2.5)
    bias = block.module.gate.e_score_correction_bias
    patch(model)
    layer = model.get_submodule(block.name)
    assert layer.aux_free.bias is bias and layer.shared is not None and layer.shared.gate is None
    ids = torch.randint(3, 96, (1, 6))
    before = model(ids).logits
    with torch.no_grad():
        bias.mul_(-5.0)  # the bias changes the selection, so the patched output must move
    assert not torch.allclose(model(ids).logits, before)


def test_qwen2_shared_expert_gate_is_kept():
    model = tiny_model("qwen2_moe")
    gate = find_moe_blocks(model)[0].module.shared_expert_gate
    patch(model)
    layer = next(m for m in model.modules() if isinstance(m, PatchedMoE))
    assert layer.shared.gate is gate and layer.cfg.norm_topk_prob is False


def test_model_without_moe_blocks_is_rejected():
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="model: expected a transformers model with MoE blocks"):
        patch(model)
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        find_moe_blocks(torch.nn.Linear(2, 2))
