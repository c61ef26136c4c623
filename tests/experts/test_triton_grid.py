"""The persistent Triton GEMMs size their grid from the device's SM count less PyTorch's SM
carveout, so ``moekit.parallel.sm_carveout`` (the expert-parallel overlap's ``sm_carveout``)
leaves SMs free of them as it does of cuBLAS / CUTLASS GEMMs. Checked here without a GPU: the
SM count is stubbed, the carveout is PyTorch's real process-wide setting."""

import pytest
import torch

pytest.importorskip("triton")

from moekit.experts import triton_gmm as tg
from moekit.parallel import sm_carveout

pytestmark = pytest.mark.skipif(not hasattr(torch._C, "_set_sm_carveout_experimental"),
                                reason="this torch has no SM carveout")


class _OnCuda:
    """Stands in for a CUDA tensor: only ``device`` is read."""

    device = torch.device("cuda", 0)


def test_grid_follows_the_sm_carveout(monkeypatch):
    monkeypatch.setattr(tg, "_num_programs", lambda index: 132)
    t = _OnCuda()
    assert tg._programs_for(t) == 132
    with sm_carveout(8):
        assert tg._programs_for(t) == 124
        with sm_carveout(131):
            assert tg._programs_for(t) == 1
        assert tg._programs_for(t) == 124
    assert tg._programs_for(t) == 132


def test_grid_keeps_one_program():
    assert tg._after_carveout(132, None) == 132
    assert tg._after_carveout(132, 0) == 132
    assert tg._after_carveout(4, 10) == 1


def test_interpreter_grid_is_unchanged_by_the_carveout():
    with sm_carveout(2):
        assert tg._programs_for(torch.empty(1)) == 3
