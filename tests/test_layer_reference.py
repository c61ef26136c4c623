"""Every router: the MoE layer's outputs and all gradients equal a per-token reference.

The reference below re-implements each routing rule one token at a time in float64 with
plain Python selection, then sums ``weight * expert_mlp`` per token. It shares no routing or
expert code with the layer, so it checks the routers, the vectorised expert path and the
combine together.
"""

import copy
import math

import pytest
import torch

import moekit
from moekit.experts import expert_mlp

ROUTER_CASES = [
    ("topk", dict(score="softmax", norm_topk_prob=True)),
    ("topk", dict(score="softmax", norm_topk_prob=False)),
    ("topk", dict(score="sigmoid", routed_scaling_factor=2.5)),
    ("group_limited", dict(score="sigmoid", num_groups=4, topk_group=2)),
    ("moge", dict(num_groups=2)),
    ("null_experts", dict(num_null_experts=2)),
    ("top_p", dict(top_p=0.5)),
    ("beam", dict(beam_mask_coeff=0.1)),
    ("dense_to_sparse", dict(d2s_anneal_steps=10)),
    ("expert_choice", dict(capacity_factor=1.5)),
]


def _desc(values):
    return sorted(range(len(values)), key=lambda i: -float(values[i]))


def ref_weights(layer: moekit.MoE, x_TD: torch.Tensor, training: bool) -> torch.Tensor:
    """``[T, E]`` float64 combine weights, one token at a time (differentiable)."""
    cfg, r = layer.cfg, layer.router
    E, k = cfg.num_experts, cfg.top_k
    gate = r.gate.weight.double()
    x = x_TD.double()
    logits_TS = x @ gate.t()
    if cfg.router == "expert_choice":
        probs = logits_TS.softmax(-1)
        cap = min(x.shape[0], math.ceil(cfg.capacity_factor * x.shape[0] * k / E))
        W = torch.zeros_like(probs)
        for e in range(E):
            for t in _desc(probs[:, e].detach())[:cap]:
                W[t, e] = probs[t, e]
        return W
    bias = layer.aux_free.bias.double() if layer.aux_free is not None else torch.zeros(E, dtype=torch.float64)
    rows = []
    for t in range(x.shape[0]):
        lg = logits_TS[t]
        w_row = torch.zeros(E, dtype=torch.float64)
        if cfg.router in ("topk", "group_limited", "moge", "beam"):
            s = lg.softmax(-1) if cfg.score == "softmax" else lg.sigmoid()
            choice = s.detach() + bias
            if cfg.router == "topk" or cfg.router == "beam":
                sel = _desc(choice)[:k]
            elif cfg.router == "group_limited":
                per = E // cfg.num_groups
                gscore = [sum(sorted(choice[g * per:(g + 1) * per].tolist(), reverse=True)[:2])
                          for g in range(cfg.num_groups)]
                kept = _desc(gscore)[: cfg.topk_group]
                cand = [e for e in range(E) if e // per in kept]
                sel = sorted(cand, key=lambda e: -float(choice[e]))[:k]
            else:  # moge
                per, kg = E // cfg.num_groups, k // cfg.num_groups
                sel = [g * per + i for g in range(cfg.num_groups) for i in _desc(choice[g * per:(g + 1) * per])[:kg]]
            w = s[sel]
            if cfg.score == "sigmoid" or cfg.norm_topk_prob:
                w = w / w.sum()
            w = w * cfg.routed_scaling_factor
            if cfg.router == "beam":
                soft = (x[t] @ r.mask_proj.weight.double().t() + r.mask_proj.bias.double()).sigmoid()[sel]
                hard = (soft > 0.5).double()
                w = w * (hard + soft - soft.detach() if training else hard)
            w_row = w_row.index_put((torch.tensor(sel),), w)
        elif cfg.router == "null_experts":
            p = lg.softmax(-1)
            sel = _desc(p.detach() + torch.cat([bias, torch.zeros(cfg.num_null_experts, dtype=torch.float64)]))[:k]
            w = p[sel] / p[sel].sum() if cfg.norm_topk_prob else p[sel]
            real = [(e, i) for i, e in enumerate(sel) if e < E]
            if real:
                w_row = w_row.index_put((torch.tensor([e for e, _ in real]),), w[[i for _, i in real]])
        elif cfg.router == "top_p":
            p = lg.softmax(-1)
            sel, mass = [], 0.0
            for e in _desc(p.detach())[:k]:
                if sel and mass >= cfg.top_p:
                    break
                sel.append(e)
                mass += float(p[e].detach())
            w_row = w_row.index_put((torch.tensor(sel),), p[sel])
        elif cfg.router == "dense_to_sparse":
            if r.is_sparse:
                p = lg.softmax(-1)
                sel = _desc(p.detach())[:k]
                w_row = w_row.index_put((torch.tensor(sel),), p[sel] / p[sel].sum())
            else:
                g = (lg / r.temperature()).softmax(-1)
                sel = [e for e in _desc(g.detach()) if g[e] > cfg.d2s_threshold] or [_desc(g.detach())[0]]
                w_row = w_row.index_put((torch.tensor(sel),), g[sel])
        rows.append(w_row)
    return torch.stack(rows)


def ref_forward(layer: moekit.MoE, x: torch.Tensor, training: bool) -> torch.Tensor:
    cfg = layer.cfg
    x_TD = x.reshape(-1, cfg.dim)
    W = ref_weights(layer, x_TD, training)
    w_in, w_out = layer.experts.w_in.double(), layer.experts.w_out.double()
    out = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(cfg.dim, dtype=torch.float64)
        xt = x_TD[t:t + 1].double()
        for e in range(cfg.num_experts):  # every expert: a zero weight contributes nothing
            acc = acc + W[t, e] * expert_mlp(xt, w_in[e], w_out[e], cfg.activation)[0]
        if layer.shared is not None:
            sh = layer.shared
            acc = acc + expert_mlp(xt, sh.w_in.weight.double(), sh.w_out.weight.double(), cfg.activation)[0]
        out.append(acc)
    return torch.stack(out).reshape(x.shape)


def _compare(cfg, x, training=True, seed=0, prepare=None):
    torch.manual_seed(seed)
    layer = moekit.MoE(cfg)
    layer.train(training)
    if prepare is not None:
        prepare(layer)
    ref = copy.deepcopy(layer)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = layer(x1).hidden
    y_ref = ref_forward(ref, x2, training)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (y.double() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x1.grad.double(), x2.grad.double(), atol=2e-5, rtol=2e-4)
    params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        q = params[name]
        if p.grad is None:
            assert q.grad is None or torch.all(q.grad == 0), name
            continue
        torch.testing.assert_close(p.grad.double(), q.grad.double(), atol=2e-5, rtol=2e-4, msg=name)
    return layer


@pytest.mark.parametrize("router,extra", ROUTER_CASES)
@pytest.mark.parametrize("shared", [0, 1])
def test_layer_matches_per_token_reference(router, extra, shared):
    cfg = moekit.MoEConfig(dim=8, ffn_dim=6, num_experts=8, top_k=2, router=router, balance="none",
                           num_shared_experts=shared, **extra)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    _compare(cfg, x, training=router != "dense_to_sparse")


@pytest.mark.parametrize("router,extra", [c for c in ROUTER_CASES if c[0] not in ("moge", "expert_choice")])
@pytest.mark.parametrize("k", [1, 8])
def test_k_is_1_and_k_is_E(router, extra, k):
    if router == "group_limited":
        extra = dict(extra, topk_group=4)
    cfg = moekit.MoEConfig(dim=8, ffn_dim=4, num_experts=8, top_k=k, router=router, balance="none", **extra)
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(2))
    _compare(cfg, x, training=router != "dense_to_sparse")


def test_expert_with_zero_tokens_gets_zero_gradient():
    cfg = moekit.MoEConfig(dim=8, ffn_dim=4, num_experts=6, top_k=2, balance="none")

    def starve_expert_5(layer):
        with torch.no_grad():
            layer.router.gate.weight[5] = -100.0  # with positive inputs expert 5 never wins

    x = torch.rand(9, 8) + 0.1
    layer = _compare(cfg, x, prepare=starve_expert_5)
    assert layer.router(x).routing.tokens_per_expert[5] == 0
    assert torch.all(layer.experts.w_in.grad[5] == 0) and torch.all(layer.experts.w_out.grad[5] == 0)
    assert layer.experts.w_in.grad[:5].abs().sum() > 0


def test_dense_to_sparse_reaches_top_k_after_annealing():
    cfg = moekit.MoEConfig(dim=8, ffn_dim=4, num_experts=8, top_k=2, router="dense_to_sparse",
                           balance="none", d2s_anneal_steps=3)
    layer = moekit.MoE(cfg).eval()
    x = torch.randn(20, 8)
    dense_experts = layer(x).routing.experts_per_token.float().mean()
    for _ in range(3):
        moekit.optimizer_step_done(layer)
    assert layer.router.is_sparse
    sparse = layer(x).routing.experts_per_token
    assert dense_experts > 2 and torch.all(sparse == 2)
    x2 = torch.randn(6, 8)
    torch.manual_seed(0)
    ref_layer = moekit.MoE(cfg).eval()
    for _ in range(3):
        moekit.optimizer_step_done(ref_layer)
    torch.testing.assert_close(ref_layer(x2).hidden.double(), ref_forward(ref_layer, x2, False), atol=2e-5, rtol=2e-5)


def test_compile_matches_eager_on_cpu():
    cfg = moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=2, balance="micro", num_shared_experts=1)
    torch.manual_seed(0)
    layer = moekit.MoE(cfg)
    x = torch.randn(2, 6, 16)
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    torch.testing.assert_close(compiled.hidden, eager.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, atol=1e-6, rtol=1e-5)
    assert torch.equal(compiled.routing.indices, eager.routing.indices)
