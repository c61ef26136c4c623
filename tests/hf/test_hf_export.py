"""``moekit.hf.to_mixtral``: a moekit LM exported as a transformers Mixtral model gives the same
logits and routing, and runs with moekit's offloading; routers Mixtral cannot express raise."""

import dataclasses

import pytest
import torch

import moekit
from moekit.hf import find_moe_blocks, route_block, to_mixtral
from moekit.train.model import LMConfig, MoELM


def _lm(seed: int = 0, **moe):
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=64, dim=32, num_layers=3, num_heads=4,
                   moe=moekit.MoEConfig(dim=32, ffn_dim=24, num_experts=6, top_k=2, **moe))
    lm = MoELM(cfg).eval()
    with torch.no_grad():  # beyond the small init: a model whose layers change the stream as trained ones do
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return lm


@pytest.mark.parametrize("seed", [0, 1])
def test_exported_logits_and_routing_equal_the_moekit_model(seed):
    lm = _lm(seed)
    hf = to_mixtral(lm)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(seed))
    captured = {}
    hooks = [b.module.register_forward_pre_hook(lambda m, a, i=b.layer: captured.__setitem__(i, a[0]))
             for b in find_moe_blocks(hf)]
    with torch.no_grad():
        out = lm(tokens)
        logits = hf(tokens).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits, out.logits_BSV, rtol=1e-5, atol=1e-5)
    for i, block in enumerate(find_moe_blocks(hf)):  # the same experts, in the same order, for every token
        idx, _ = route_block(block.module, captured[i].reshape(-1, 32))
        ours = out.routings[i].indices
        assert torch.equal(idx.sort(-1).values, ours.sort(-1).values)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied, as in moekit


def test_exported_model_decodes_the_same_with_offloading():
    from moekit.offload import offload

    hf = to_mixtral(_lm(3))
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=8, do_sample=False)
        handle = offload(hf, cache_experts=4, prefetch="layer_output", device="cpu")
        got = hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected) and handle.stats()["activations"] > 0


@pytest.mark.parametrize("change", [{"score": "sigmoid"}, {"num_shared_experts": 1}, {"norm_topk_prob": False},
                                    {"balance": "aux_free"}, {"routed_scaling_factor": 2.0}])
def test_routers_without_a_mixtral_equivalent_are_rejected(change):
    lm = _lm(4)
    lm.cfg = dataclasses.replace(lm.cfg, moe=dataclasses.replace(lm.cfg.moe, **change))
    with pytest.raises(ValueError, match="lm: expected"):
        to_mixtral(lm)
