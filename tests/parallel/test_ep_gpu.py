"""Expert parallelism over NCCL on 2 GPUs (and 4, where there are): the same equivalence
checks as the gloo tests (outputs and all gradients equal the single-GPU ``moekit.MoE``, which
runs the CUDA expert backend), plus bf16, and exactly one device-to-host sync per training step
(none with the fixed-size dispatch). One process per GPU, started as torchrun would."""

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
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA devices"),
]

# NVLink multicast off (device notes): NCCL's NVLS path is not needed for all-to-all.
_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


SCENARIOS = ["identity", "zero_tokens", "replicas", "grouped", "apply_plan", "fresh", "bf16", "syncs"]


def test_nccl_two_gpus_equal_single_gpu_layer():
    """The five dispatch modes (ep_worker.MODES)."""
    out = ep_launch.launch_subprocess(2, "nccl", SCENARIOS, timeout=300, extra_env=dict(_ENV, EP_MODES="base"))
    assert all(f"ok {s} world=2" in out for s in SCENARIOS), out


def test_nccl_overlap_with_sm_carveout_and_remote_first():
    """The overlap modes with SMs left to NCCL and the remote path on a high-priority stream
    (ep_worker.GPU_MODES): a separate test, so that a failure here names these settings."""
    out = ep_launch.launch_subprocess(2, "nccl", SCENARIOS, timeout=300, extra_env=dict(_ENV, EP_MODES="gpu"))
    assert all(f"ok {s} world=2" in out for s in SCENARIOS), out


def test_nccl_copy_engine_transport():
    """The fixed-size dispatch with its rows moved by the copy engines (``transport=
    "copy_engine"``, symmetric memory), alone and with overlap (ep_worker.CE_MODES)."""
    out = ep_launch.launch_subprocess(2, "nccl", SCENARIOS, timeout=300, extra_env=dict(_ENV, EP_MODES="ce"))
    assert all(f"ok {s} world=2" in out for s in SCENARIOS), out


four_gpus = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA devices")


@four_gpus
def test_nccl_four_gpus_equal_single_gpu_layer():
    """Issue 7's 4-GPU half: the base dispatch modes (ep_worker.MODES) at world 4, with the
    2 x 2 DP x EP mesh."""
    scenarios = ["identity", "zero_tokens", "replicas", "apply_plan", "fresh", "mesh"]
    out = ep_launch.launch_subprocess(4, "nccl", scenarios, timeout=110, extra_env=dict(_ENV, EP_MODES="base"))
    assert all(f"ok {s} world=4" in out for s in scenarios), out


@four_gpus
def test_nccl_four_gpus_copy_engine_transport():
    """The copy-engine exchanges between 4 GPUs (ep_worker.CE_MODES, the transport of the
    benchmark's ``overlap_fixed:ce:rf``), bf16, one step with no host sync, and the mesh, whose
    EP groups are pairs of ranks (symmetric memory over a subgroup, as the benchmark's EP=2
    groups inside a world of 4)."""
    scenarios = ["identity", "replicas", "grouped", "apply_plan", "bf16", "syncs", "mesh"]
    out = ep_launch.launch_subprocess(4, "nccl", scenarios, timeout=110, extra_env=dict(_ENV, EP_MODES="ce"))
    assert all(f"ok {s} world=4" in out for s in scenarios), out
