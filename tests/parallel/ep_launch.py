"""Launch ``ep_worker.py`` on ``world`` local processes: forked from the test process (CPU;
no second torch import, which dominates the runtime on 2 cores), or as fresh interpreters
(GPU; CUDA cannot be forked), the way torchrun starts them."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

WORKER = Path(__file__).with_name("ep_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("ep_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_forked(world: int, scenarios: list[str], timeout: float = 120.0) -> None:
    """Run the gloo worker on ``world`` forked ranks; raise with the failing rank's traceback."""
    worker = _load_worker()
    ctx = mp.start_processes(worker.run, args=(world, _free_port(), "gloo", scenarios), nprocs=world,
                             start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"expert-parallel workers hung for {timeout} s (a collective mismatch?)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_subprocess(world: int, backend: str, scenarios: list[str], timeout: float = 120.0, extra_env=None) -> str:
    """Run the worker on ``world`` ranks; return rank 0's output, raise with every rank's
    output if any rank fails or the group hangs past ``timeout`` seconds."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), backend, *scenarios], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            out += f"\n[rank {rank}: timed out after {timeout} s]"
        outputs.append(out)
        failed |= proc.returncode != 0
    if failed:
        report = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o[-4000:]}"
                           for r, (p, o) in enumerate(zip(procs, outputs)))
        raise AssertionError(f"expert-parallel worker failed:\n{report}")
    return outputs[0]
