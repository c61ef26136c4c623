"""Expert parallelism with 2 and 4 gloo processes: outputs and all gradients equal the
single-process ``moekit.MoE`` (identity placement, replicas, ranks with zero tokens, a 2-D
DP x EP mesh), and applying a new plan moves exactly the weights and Adam state it says.

Each test starts real processes (see ep_worker.py for the checks themselves)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch.distributed as dist

_spec = importlib.util.spec_from_file_location("ep_launch", Path(__file__).with_name("ep_launch.py"))
ep_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ep_launch)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SCENARIOS = ["identity", "zero_tokens", "replicas", "grouped", "apply_plan", "fresh"]


def test_two_ranks():
    ep_launch.launch_forked(2, SCENARIOS)


def test_four_ranks_and_dp_x_ep_mesh():
    ep_launch.launch_forked(4, SCENARIOS + ["mesh"])
