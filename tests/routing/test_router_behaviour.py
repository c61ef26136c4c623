"""What each router promises, checked on its behaviour (not its code)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.routing import Routing, apply_capacity, expert_capacity, flops_saved


def _layer(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(dim=16, ffn_dim=8, num_experts=8, top_k=2, balance="none")
    base.update(kw)
    return moekit.MoE(moekit.MoEConfig(**base))


def test_moge_group_loads_are_exactly_equal():
    layer = _layer(router="moge", num_experts=16, top_k=4, num_groups=4)
    r = layer(torch.randn(3, 37, 16)).routing
    group_loads = r.tokens_per_expert.view(4, 4).sum(1)
    assert torch.all(group_loads == 3 * 37 * 4 // 4)
    assert group_loads.unique().numel() == 1


def test_group_limited_uses_at_most_topk_group_groups():
    layer = _layer(router="group_limited", score="sigmoid", num_experts=16, top_k=4, num_groups=4, topk_group=2)
    r = layer(torch.randn(64, 16)).routing
    groups_per_token = torch.stack([(r.indices // 4 == g).any(-1) for g in range(4)], -1).sum(-1)
    assert groups_per_token.max() <= 2


def test_null_experts_lower_true_experts_per_token_below_k():
    layer = _layer(router="null_experts", num_experts=8, top_k=4, num_null_experts=8)
    r = layer(torch.randn(256, 16)).routing
    mean_true = r.experts_per_token.float().mean().item()
    assert 0 < mean_true < 4
    assert torch.all(r.weights[r.indices < 0] == 0)
    assert flops_saved(r, 4) == pytest.approx(1 - mean_true / 4)


def test_top_p_uses_more_experts_on_uncertain_tokens():
    layer = _layer(router="top_p", top_k=8, top_p=0.6)
    gate = layer.router.gate.weight.detach()
    certain = 8.0 * gate[0] / gate[0].norm()  # aligned with expert 0's gate row: peaked probs
    uncertain = torch.zeros(16)  # all logits equal: flat probs
    r = layer(torch.stack([certain, uncertain])).routing
    n_certain, n_uncertain = r.experts_per_token.tolist()
    assert n_certain == 1 and n_uncertain == 5  # 5 * 1/8 >= 0.6 > 4 * 1/8
    # Chosen mass reaches p, and dropping the last chosen expert would not.
    p = r.probs.gather(1, r.indices.clamp(min=0)).masked_fill(r.indices < 0, 0).sum(-1)
    assert torch.all(p >= 0.6 - 1e-6)


def test_top_p_entropy_regulariser_is_added():
    plain = _layer(router="top_p", top_k=4)
    reg = _layer(router="top_p", top_k=4, top_p_entropy_coeff=0.1)
    x = torch.randn(10, 16)
    probs = plain(x).routing.probs
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert reg(x).aux_loss.item() == pytest.approx(0.1 * entropy.item(), rel=1e-5)


def test_beam_masks_skip_experts_at_inference_and_learn_to_turn_off():
    layer = _layer(router="beam", beam_mask_coeff=1.0)
    x = torch.randn(64, 16)
    assert flops_saved(layer.eval()(x).routing, 2) == 0.0  # masks start on
    layer.train()
    opt = torch.optim.SGD(layer.router.mask_proj.parameters(), lr=50.0)
    for _ in range(20):  # the regulariser alone pushes masks off
        opt.zero_grad()
        out = layer(x)
        out.aux_loss.backward()
        opt.step()
    r = layer.eval()(x).routing
    saved = flops_saved(r, 2)
    assert saved > 0.5
    assert (r.indices < 0).float().mean().item() == pytest.approx(saved)


def test_beam_straight_through_gradient_reaches_the_mask():
    layer = _layer(router="beam")
    out = layer(torch.randn(8, 16))
    out.hidden.sum().backward()
    assert layer.router.mask_proj.bias.grad.abs().sum() > 0


def test_expert_choice_a_later_token_changes_an_earlier_tokens_routing():
    layer = _layer(router="expert_choice", top_k=1, num_experts=4, capacity_factor=0.5)
    x = torch.randn(8, 16)
    before = layer(x).routing
    gate = layer.router.gate.weight.detach()
    e0 = before.indices[0][before.indices[0] >= 0]
    assert e0.numel() > 0
    # A new last token that expert e0 prefers over everything pushes token 0 out of e0.
    x2 = x.clone()
    x2[-1] = 50.0 * gate[e0[0]] / gate[e0[0]].norm()
    after = layer(x2).routing
    assert not torch.equal(before.indices[0], after.indices[0])
    assert torch.all(after.tokens_per_expert == layer.router.capacity(8))


def test_capacity_drops_in_gshard_priority_order():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    r = Routing(idx, torch.ones(4, 2), torch.full((4, 3), 1 / 3), torch.zeros(3, dtype=torch.int64))
    out = apply_capacity(r, capacity=2)
    # First choices first: tokens 0 and 1 take expert 0; token 2's first choice is dropped;
    # token 3's first choice (1) beats token 0's second choice (1) -> token 2's second choice dropped.
    assert out.indices.tolist() == [[0, 1], [0, 2], [-1, -1], [1, -1]]
    assert out.tokens_per_expert.tolist() == [2, 2, 1]
    assert torch.all(out.weights[out.indices < 0] == 0)


def test_layer_capacity_factor_bounds_every_expert():
    layer = _layer(capacity_factor=1.0, num_experts=4)
    with torch.no_grad():
        layer.router.gate.weight[0] += 3.0  # make expert 0 hot
    r = layer(torch.randn(40, 16) + 0.5).routing
    cap = expert_capacity(40, 2, 4, 1.0)
    assert r.tokens_per_expert.max() <= cap


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 20), E=st.integers(1, 9), data=st.data())
def test_topk_routing_invariants(T, E, data):
    k = data.draw(st.integers(1, E))
    score = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    torch.manual_seed(data.draw(st.integers(0, 100)))
    layer = moekit.MoE(moekit.MoEConfig(dim=4, ffn_dim=2, num_experts=E, top_k=k, score=score, balance="micro"))
    r = layer(torch.randn(T, 4)).routing
    assert r.indices.shape == (T, k) and r.indices.dtype == torch.int64
    assert r.tokens_per_expert.sum().item() == T * k
    if T:
        assert torch.all(r.indices.sort(-1).values.diff(dim=-1) > 0) if k > 1 else True  # distinct experts
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T))
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(T))


@pytest.mark.parametrize("kwargs,argument", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(router="nope"), "router"),
    (dict(balance="everywhere"), "balance"),
    (dict(score="relu"), "score"),
    (dict(router="group_limited", num_groups=3), "num_groups"),
    (dict(router="group_limited", num_groups=4, topk_group=5), "topk_group"),
    (dict(router="moge", num_groups=4, top_k=2), "top_k"),
    (dict(router="moge", num_groups=3), "num_groups"),
    (dict(router="top_p", top_p=1.5), "top_p"),
    (dict(router="null_experts", num_null_experts=0), "num_null_experts"),
    (dict(router="top_p", balance="aux_free"), "balance"),
    (dict(activation="relu"), "activation"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(dim=0), "dim"),
])
def test_bad_config_raises_value_error_naming_the_argument(kwargs, argument):
    base = dict(dim=16, ffn_dim=8, num_experts=8, top_k=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        moekit.MoEConfig(**base)


def test_bad_input_raises_value_error_naming_x():
    layer = _layer()
    with pytest.raises(ValueError, match=r"^x: expected last dimension 16"):
        layer(torch.randn(4, 15))
    with pytest.raises(ValueError, match=r"^x: expected a floating-point tensor"):
        layer(torch.ones(4, 16, dtype=torch.int64))
