"""On the GPU: decode graphs (``moekit.offload.graph_decode``) replay the dense parts of every
family's decode steps with the eager kernels, so greedy tokens *and* logits equal the eager
model's, with and without offloading; calls with a dynamic cache never replay the attention."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import FAMILY_NAMES, tiny_model  # noqa: E402

from moekit.offload import offload  # noqa: E402
from moekit.offload.graphs import GraphedCall, graph_decode, static_cache_kwargs  # noqa: E402

pytestmark = pytest.mark.gpu
NEW = 12


def _generate(model, ids, cache: str):
    """Greedy tokens ``[B, prompt + NEW]`` and the logits of every step ``[NEW, B, V]``, with a
    fresh static cache (passed in, so that transformers does not compile) or a dynamic one."""
    import transformers as T

    kw = {"max_new_tokens": NEW, "do_sample": False, "return_dict_in_generate": True, "output_logits": True,
          "disable_compile": True}
    if cache == "static":
        kw.update(static_cache_kwargs(model, T.StaticCache(config=model.config, max_cache_len=ids.shape[1] + NEW)))
    with torch.no_grad():
        out = model.generate(ids, **kw)
    return out.sequences, torch.stack(out.logits)


def _ids(seed: int, batch: int = 2):
    return torch.randint(3, 96, (batch, 6), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_graphed_decode_equals_eager_bit_for_bit(family, dtype):
    model = tiny_model(family, seed=30, dtype=dtype).cuda()
    ids = _ids(31)
    tokens, logits = _generate(model, ids, "static")
    own = model.generation_config.disable_compile
    graphs = graph_decode(model)
    assert model.generation_config.disable_compile is True  # transformers would compile on a static cache
    for _ in range(2):  # the first run captures (third call of each signature), the second only replays
        got_tokens, got_logits = _generate(model, ids, "static")
        torch.testing.assert_close(got_tokens, tokens, rtol=0, atol=0)
        torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    stats = graphs.stats()
    assert stats["graphs"] >= stats["modules"] and stats["replays"] > 0
    attn = graphs.calls["model.layers.1.self_attn"]
    assert attn.replays >= NEW - 3  # a new cache object each run: 2 eager steps, then captured
    graphs.remove()
    assert not any(isinstance(m.__dict__.get("forward"), GraphedCall) for m in model.modules())
    assert model.generation_config.disable_compile == own
    torch.testing.assert_close(_generate(model, ids, "static")[1], logits, rtol=0, atol=0)


def _eager_experts(model):
    """``model`` with transformers' eager loop over experts, the order of sums moekit's engine
    keeps (on CUDA in bf16 some families default to ``grouped_mm``, which rounds differently)."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter("eager")
    else:
        model.config._experts_implementation = "eager"
    return model


@pytest.mark.parametrize("prefetch", ["none", "layer_output"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_graphed_offloaded_decode_equals_eager_launches_and_the_plain_model(family, prefetch):
    model = tiny_model(family, seed=32, dtype=torch.bfloat16)
    ids = _ids(33)
    plain_tokens, plain_logits = _generate(_eager_experts(copy.deepcopy(model)).cuda(), ids, "static")
    handle = offload(model, cache_experts=4, policy="lru", prefetch=prefetch)
    tokens, logits = _generate(model, ids, "static")  # offloaded, dense parts launched eagerly
    torch.testing.assert_close(tokens, plain_tokens, rtol=0, atol=0)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    graphs = graph_decode(model)
    for _ in range(2):
        got_tokens, got_logits = _generate(model, ids, "static")
        torch.testing.assert_close(got_tokens, tokens, rtol=0, atol=0)
        torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    assert graphs.stats()["replays"] > 0 and handle.stats()["activations"] > 0
    gate = next(c for n, c in graphs.calls.items() if n.endswith(".gate"))
    assert gate.replays > 0  # the routers replay; the experts behind them stay with the engine


def test_gpu_dynamic_cache_never_replays_the_attention():
    model = tiny_model("qwen3_moe", seed=34).cuda()
    ids = _ids(35, batch=1)
    tokens, logits = _generate(model, ids, "dynamic")
    graphs = graph_decode(model)
    got_tokens, got_logits = _generate(model, ids, "dynamic")
    torch.testing.assert_close(got_tokens, tokens, rtol=0, atol=0)
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    assert all(c.replays == 0 for n, c in graphs.calls.items() if n.endswith("self_attn"))
    assert graphs.calls["model.layers.0.input_layernorm"].replays > 0  # stateless modules still replay


class _Scale(torch.nn.Module):
    """``x * w + 1`` (stateless), optionally reading a value on the host first (not capturable)."""

    def __init__(self, sync: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((8,), 2.0))
        self.sync = sync

    def forward(self, x):
        if self.sync:
            x = x + float(x.sum().item()) * 0  # a host read: capture must fail, the call stays eager
        return x * self.w + 1


def test_gpu_graphed_call_keeps_at_most_max_graphs_and_stays_right():
    from moekit.offload.graphs import GraphedCall, _Pool

    module = _Scale().cuda()
    call = GraphedCall(module.forward, _Pool(), max_tokens=64, warmup=1, max_graphs=2)
    with torch.no_grad():
        for rep in range(3):
            for rows in (1, 2, 3):  # three signatures, two graphs kept: the oldest is re-captured
                x = torch.randn(rows, 8, device="cuda")
                torch.testing.assert_close(call(x).clone(), x * 2 + 1, rtol=0, atol=0)
    assert len(call.graphs) == 2 and call.replays > 0
    with torch.no_grad():  # a graph's output is its buffer: the next replay of that signature overwrites it
        a = call(torch.zeros(3, 8, device="cuda"))
        b = call(torch.ones(3, 8, device="cuda"))
    assert a.data_ptr() == b.data_ptr() and bool((b == 3).all())


def test_gpu_a_call_that_synchronises_is_never_captured():
    from moekit.offload.graphs import GraphedCall, _Pool

    module = _Scale(sync=True).cuda()
    call = GraphedCall(module.forward, _Pool(), max_tokens=64, warmup=1)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 8, device="cuda")
            torch.testing.assert_close(call(x), x * 2 + 1, rtol=0, atol=0)
    assert call.replays == 0 and len(call.uncapturable) == 1 and call.eager_calls == 4
    torch.randn(4, device="cuda")  # no capture was tried: torch's state (the RNG's) is as before


def test_gpu_graphs_with_generates_own_static_cache():
    """``cache_implementation="static"``: generate makes (and may reuse) the cache itself; the
    graphs set ``disable_compile`` so that generate does not compile, and replay."""
    model = tiny_model("mixtral", seed=36, dtype=torch.bfloat16).cuda()
    ids = _ids(37)
    tokens, _ = _generate(model, ids, "static")
    graphs = graph_decode(model)
    for _ in range(2):
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
        torch.testing.assert_close(got, tokens, rtol=0, atol=0)
    assert graphs.calls["model.layers.0.self_attn"].replays > 0
