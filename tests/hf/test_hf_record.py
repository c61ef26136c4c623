"""moekit.hf.record_routing: per-step, per-layer counts, on HF and on patched models."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import FAMILY_NAMES, tiny_model  # noqa: E402

from moekit.hf import patch, record_routing  # noqa: E402
from moekit.trace import load_trace  # noqa: E402


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_trace_counts_sum_to_tokens_times_k(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(2))
    with record_routing(model) as rec, torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    trace = rec.trace()
    k, num_layers = trace.metadata["top_k"], trace.num_layers
    assert trace.num_steps == 3  # prefill + 2 decode steps
    np.testing.assert_array_equal(trace.counts.sum(-1), np.array([[15], [3], [3]]) * k * np.ones(num_layers, int))
    assert trace.metadata["tokens"] == [15, 3, 3]
    rec.save(tmp_path / "t.npz")
    np.testing.assert_array_equal(load_trace(tmp_path / "t.npz").counts, trace.counts)


def test_patched_and_unpatched_record_the_same_counts():
    model = tiny_model("deepseek_v3")
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with record_routing(model) as rec, torch.no_grad():
        model(ids)
        model(ids[:, :4])
    patch(model)
    with record_routing(model) as rec_patched, torch.no_grad():
        model(ids)
        model(ids[:, :4])
    np.testing.assert_array_equal(rec.trace().counts, rec_patched.trace().counts)
    assert rec.trace().counts.sum() == (14 + 8) * 2 * 2  # tokens * k * layers


def test_hooks_are_removed_and_empty_recording_is_an_error():
    model = tiny_model("olmoe")
    with record_routing(model) as rec:
        pass
    with pytest.raises(ValueError, match="no forward pass"):
        rec.trace()
    model(torch.tensor([[3, 4]]))
    assert all(not m._forward_hooks for m in model.modules())
