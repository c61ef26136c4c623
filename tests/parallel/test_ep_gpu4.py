"""Expert parallelism over NCCL on 4 GPUs (issue 7's 4-GPU half): the gloo checks of
``test_ep_distributed.py`` at world 4 (outputs and all gradients equal the single-GPU
``moekit.MoE``, replicas, a rank with zero tokens, plan application, a 2 x 2 DP x EP mesh) on
NCCL, and the copy-engine transport (symmetric memory across 4 GPUs and over 2-rank
subgroups) with its no-host-sync check. One process per GPU, started as torchrun would; skipped without 4 CUDA devices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("ep_launch", Path(__file__).with_name("ep_launch.py"))
ep_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ep_launch)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 4,
                       reason="needs 4 CUDA devices"),
]

# NVLink multicast off (device notes): NCCL's NVLS path is not needed for all-to-all.
_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_nccl_four_gpus_equal_single_gpu_layer():
    """The base dispatch modes (ep_worker.MODES), with the DP x EP mesh that needs 4 ranks."""
    scenarios = ["identity", "zero_tokens", "replicas", "apply_plan", "fresh", "mesh"]
    out = ep_launch.launch_subprocess(4, "nccl", scenarios, timeout=110, extra_env=dict(_ENV, EP_MODES="base"))
    assert all(f"ok {s} world=4" in out for s in scenarios), out


def test_nccl_four_gpus_copy_engine_transport():
    """The fixed-size exchanges on the copy engines between 4 GPUs (ep_worker.CE_MODES, the
    transport of the benchmark's ``overlap_fixed:ce:rf``), bf16, one step with no host sync, and
    the mesh, whose EP groups are pairs of ranks (symmetric memory over a subgroup, as the
    benchmark's EP=2 groups inside a world of 4)."""
    scenarios = ["identity", "replicas", "grouped", "apply_plan", "bf16", "syncs", "mesh"]
    out = ep_launch.launch_subprocess(4, "nccl", scenarios, timeout=110, extra_env=dict(_ENV, EP_MODES="ce"))
    assert all(f"ok {s} world=4" in out for s in scenarios), out
