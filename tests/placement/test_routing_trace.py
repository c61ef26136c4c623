"""Routing trace format: round trip, atomic writes, bad files, synthetic generator."""

import json
import os

import numpy as np
import pytest

from moekit.trace import RoutingTrace, load_trace, save_trace, synthetic_trace


def test_round_trip_keeps_counts_metadata_and_domains(tmp_path):
    tr = synthetic_trace(6, 3, 8, 2, 64, seed=1)
    tr.domains = np.array([0, 1, 0, 2, 1, 0])
    tr = RoutingTrace(tr.counts, {**tr.metadata, "domain_names": ["a", "b", "c"]}, tr.domains)
    path = tmp_path / "t.npz"
    save_trace(path, tr)
    back = load_trace(path)
    assert back.counts.dtype == np.int64 and np.array_equal(back.counts, tr.counts)
    assert back.metadata == json.loads(json.dumps(tr.metadata))
    assert np.array_equal(back.domains, tr.domains)
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"], "no temporary file left behind"


def test_synthetic_trace_is_seeded_and_shaped_like_top_k_routing():
    a = synthetic_trace(20, 4, 16, 2, 128, seed=3)
    b = synthetic_trace(20, 4, 16, 2, 128, seed=3)
    c = synthetic_trace(20, 4, 16, 2, 128, seed=4)
    assert np.array_equal(a.counts, b.counts) and not np.array_equal(a.counts, c.counts)
    assert a.counts.shape == (20, 4, 16)
    assert np.all(a.counts.sum(axis=2) == 2 * 128), "every token counts once per chosen expert"
    assert a.counts.max() <= 128, "no expert gets more than every token"
    # skewed per layer, and the popularity drifts: late steps differ from early ones
    share = a.counts.sum(axis=0) / a.counts.sum(axis=(0, 2))[:, None]
    assert np.all(share.max(axis=1) > 2.0 / 16)
    lognormal = synthetic_trace(5, 2, 16, 4, 64, popularity="lognormal", seed=0)
    assert lognormal.metadata["model"] == "synthetic-lognormal"


def test_drift_moves_popularity():
    tr = synthetic_trace(200, 1, 32, 1, 4096, drift=0.2, step_noise=0.0, burst_prob=0.0, seed=0)
    early, late = tr.counts[:20].sum(axis=0)[0], tr.counts[-20:].sum(axis=0)[0]
    assert np.corrcoef(early, late)[0, 1] < 0.9
    still = synthetic_trace(200, 1, 32, 1, 4096, drift=0.0, step_noise=0.0, burst_prob=0.0, seed=0)
    early, late = still.counts[:20].sum(axis=0)[0], still.counts[-20:].sum(axis=0)[0]
    assert np.corrcoef(early, late)[0, 1] > 0.95


@pytest.mark.parametrize(
    "counts, meta, match",
    [
        (np.zeros((2, 3)), {}, "counts: expected shape"),
        (-np.ones((1, 1, 4)), {"top_k": 1, "tokens_per_step": 1}, "negative"),
        (np.ones((1, 1, 4)), {"top_k": 1}, "missing"),
        (np.ones((1, 1, 4)), {"top_k": 9, "tokens_per_step": 1}, "top_k"),
        (np.ones((1, 1, 4)), {"top_k": 1, "tokens_per_step": 1, "num_experts": 5}, "num_experts"),
        (np.full((1, 1, 4), 0.5), {"top_k": 1, "tokens_per_step": 1}, "integer"),
    ],
)
def test_bad_traces_raise(counts, meta, match):
    with pytest.raises(ValueError, match=match):
        RoutingTrace(counts, meta)


def test_corrupt_or_wrong_files_raise_value_error(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a valid routing trace"):
        load_trace(junk)
    other = tmp_path / "other.npz"
    np.savez(other, something=np.ones(3))
    with pytest.raises(ValueError, match="counts"):
        load_trace(other)
    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, counts=np.ones((2, 2), dtype=np.int64), metadata=np.array("{}"))
    with pytest.raises(ValueError, match="expected shape"):
        load_trace(bad_shape)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.npz")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    tr = synthetic_trace(2, 1, 4, 1, 8, seed=0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError):
        save_trace(tmp_path / "t.npz", tr)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k"), ({"popularity": "uniform"}, "popularity"),
    ({"burst_prob": 2.0}, "burst_prob"), ({"drift": -1.0}, "drift"), ({"num_steps": 0}, "num_steps"),
])
def test_synthetic_trace_bad_arguments(kwargs, match):
    args = {"num_steps": 2, "num_layers": 1, "num_experts": 4, "top_k": 1, "tokens_per_step": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        synthetic_trace(**args)
