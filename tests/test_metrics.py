"""metrics.py equals the DESIGN.md definitions on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from moekit import metrics


def test_max_vio_hand_computed():
    assert metrics.max_vio([4, 2, 2, 0]).tolist() == [1.0]  # (4 - 2) / 2
    np.testing.assert_allclose(metrics.max_vio(torch.tensor([[1, 1], [3, 1]])), [0.0, 0.5])
    assert metrics.max_vio([0, 0]).tolist() == [0.0]


def test_cv_and_entropy():
    assert metrics.coefficient_of_variation([2, 2, 2]).tolist() == [0.0]
    assert metrics.load_entropy([1, 1, 1, 1])[0] == pytest.approx(1.0)
    assert metrics.load_entropy([4, 0, 0, 0])[0] == pytest.approx(0.0)


def test_specialization_hand_computed():
    # Two domains, three experts, one layer. Domain 0 -> [6, 2, 0], domain 1 -> [0, 2, 6].
    c = np.array([[6, 2, 0], [0, 2, 6]])
    out = metrics.specialization(c, k=2)
    assert out["top1_share"] == pytest.approx(0.75)
    assert out["topk_share"] == pytest.approx(1.0)
    p = c / c.sum()
    pd, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / (pd * pe)[nz])).sum()
    he = -(pe * np.log(pe)).sum()
    assert out["nmi"] == pytest.approx(mi / he)
    assert metrics.specialization(np.ones((2, 3)), k=1)["nmi"] == pytest.approx(0.0)


def test_gpu_loads_and_balancedness():
    load = np.array([[6.0, 2.0, 2.0]])
    # 4 slots on 2 GPUs: expert 0 replicated on both GPUs.
    phy2log = np.array([[0, 1, 0, 2]])
    np.testing.assert_allclose(metrics.gpu_loads(load, phy2log, 2), [[5.0, 5.0]])
    assert metrics.balancedness(load, phy2log, 2) == pytest.approx(1.0)
    assert metrics.balancedness(load, np.array([[0, 0, 1, 2]]), 2) == pytest.approx(5.0 / 6.0)


def test_moves_counts_new_gpu_expert_pairs():
    old = np.array([[0, 1, 2, 3]])
    assert metrics.moves(old, old, 2) == 0
    assert metrics.moves(old, np.array([[1, 0, 2, 3]]), 2) == 0  # a swap within a GPU moves nothing
    assert metrics.moves(old, np.array([[2, 1, 0, 3]]), 2) == 2


@pytest.mark.parametrize("bad", [[-1, 2], [math.nan, 1]])
def test_bad_counts_raise(bad):
    with pytest.raises(ValueError, match="counts"):
        metrics.max_vio(bad)


def test_bad_placement_raises():
    with pytest.raises(ValueError, match="num_gpus"):
        metrics.balancedness(np.ones((1, 3)), np.array([[0, 1, 2]]), 2)
    with pytest.raises(ValueError, match="replica"):
        metrics.balancedness(np.ones((1, 3)), np.array([[0, 1, 1, 0]]), 2)
