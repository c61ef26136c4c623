"""CPU tests of the decode-graph wrapper's rules (``moekit.offload.graphs``): which calls may
replay (the capture signature) and which modules are wrapped. The graphs themselves need a GPU:
``test_offload_graphs_gpu.py``."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_models import FAMILY_NAMES, tiny_model  # noqa: E402

from moekit.offload.graphs import graph_decode, graph_key, graph_targets  # noqa: E402


def _cache_kw(model) -> str:
    """The name ``model.forward`` takes its cache by (``cache`` since transformers 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attention_call(model, cache, tokens: int = 1, batch: int = 1):
    """The arguments ``transformers`` gives a decoder layer's ``self_attn`` in one decode step,
    recorded by a pre-hook on a real forward of ``model`` with ``cache``."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("call", (args, dict(kwargs)))

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(keep, with_kwargs=True)
    ids = torch.randint(3, 96, (batch, tokens))
    with torch.no_grad():
        model(ids, **{_cache_kw(model): cache}, use_cache=True)
    handle.remove()
    return seen["call"]


def test_a_static_cache_call_has_a_stable_key_and_a_dynamic_one_none():
    import transformers as T

    model = tiny_model("mixtral", seed=1)
    static = T.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 4)), **{_cache_kw(model): static}, use_cache=True)  # prefill
    a = _attention_call(model, static)
    b = _attention_call(model, static)
    with torch.no_grad():
        key_a, key_b = (graph_key(*c, max_tokens=8, device_type="cpu") for c in (a, b))
    assert key_a is not None and key_a == key_b  # the next step replays the same graph
    with torch.no_grad():
        assert graph_key(*a, max_tokens=8, device_type="cuda") is None  # tensors not on the graphs' device
        assert graph_key(*a, max_tokens=0, device_type="cpu") is None  # more tokens than allowed
    assert graph_key(*a, max_tokens=8, device_type="cpu") is None  # autograd on: never replayed

    other = T.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 4)), **{_cache_kw(model): other}, use_cache=True)
        assert graph_key(*_attention_call(model, other), max_tokens=8, device_type="cpu") != key_a  # another cache

    dynamic = T.DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 4)), **{_cache_kw(model): dynamic}, use_cache=True)
        # a dynamic cache re-binds its tensors in Python, which a replay would skip
        assert graph_key(*_attention_call(model, dynamic), max_tokens=8, device_type="cpu") is None


def test_keys_follow_shapes_values_and_unknown_objects():
    x = torch.zeros(2, 1, 8)
    with torch.no_grad():
        k1 = graph_key((x,), {"flag": True}, max_tokens=8, device_type="cpu")
        assert k1 == graph_key((torch.ones(2, 1, 8),), {"flag": True}, max_tokens=8, device_type="cpu")
        assert k1 != graph_key((torch.zeros(3, 1, 8),), {"flag": True}, max_tokens=8, device_type="cpu")
        assert k1 != graph_key((x,), {"flag": False}, max_tokens=8, device_type="cpu")
        assert k1 != graph_key((x.to(torch.float64),), {"flag": True}, max_tokens=8, device_type="cpu")
        assert k1 != graph_key((torch.zeros(2, 8, 1).transpose(1, 2),), {"flag": True}, max_tokens=8,
                               device_type="cpu")  # same shape, other strides
        assert graph_key((x,), {"thing": object()}, max_tokens=8, device_type="cpu") is None
        assert graph_key((x,), {}, max_tokens=1, device_type="cpu") is None  # 2 tokens > 1
        assert graph_key((), {"n": 3}, max_tokens=8, device_type="cpu") is None  # no tensor: nothing to size


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_targets_are_the_dense_parts_around_the_experts(family):
    from moekit.hf.families import block_family

    model = tiny_model(family, seed=2)
    targets = dict(graph_targets(model))
    names = set(targets)
    assert {"model.rotary_emb", "model.norm"} <= names
    for i, layer in enumerate(model.model.layers):
        block = next((n for n, c in layer.named_children() if block_family(c) is not None), None)
        if block is None:  # DeepSeek-V3's dense first layer: whole
            assert f"model.layers.{i}" in names
            continue
        assert {f"model.layers.{i}.self_attn", f"model.layers.{i}.input_layernorm",
                f"model.layers.{i}.post_attention_layernorm", f"model.layers.{i}.{block}.gate"} <= names
        assert f"model.layers.{i}.{block}" not in names and f"model.layers.{i}.{block}.experts" not in names
    if family in ("qwen2_moe", "deepseek_v3"):  # shared experts are dense: graphed
        assert any("shared_expert" in n for n in names)
    assert not any(n.endswith("experts") and "shared" not in n for n in names)


def test_targets_need_a_moe_model_and_graphs_need_cuda():
    import transformers as T

    dense = T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="model: expected a transformers model with supported MoE blocks"):
        graph_targets(dense)
    with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
        graph_decode(tiny_model("olmoe"), max_tokens=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            graph_decode(tiny_model("olmoe"))
