"""Fixtures of the expert-parallel tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def gloo_world():
    """A one-rank gloo process group in this process (the layer's argument checks need one)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
