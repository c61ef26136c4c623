"""Probe, on a CUDA machine, the ways a stream could wait for a value the host writes later (the
device-side wait the offload engine's CPU experts would need, docs/results/offload.md "Session
7"). Each way runs in its own process under a time limit, so a stream that is never released
costs that limit, not the session; every step prints a line before it runs, so the last line
shows where a way stopped.

Ways:
- ``attributes``: driver version and the device attributes that govern stream memory operations
  and mapped host memory;
- ``torch_pinned``: ``cuStreamWaitValue32`` on a counter in torch's pinned memory (device pointer
  from ``cuMemHostGetDevicePointer``): is a satisfied wait passed, is an unsatisfied one held,
  and released by a host write?
- ``driver_mapped``: the same on memory from ``cuMemHostAlloc(PORTABLE | DEVICEMAP)``;
- ``host_func``: ``cuLaunchHostFunc`` whose callback blocks until the host sets an event.

    python benchmarks/probe_host_wait.py [--timeout 12] [--out probe.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

WAYS = ("attributes", "torch_pinned", "driver_mapped", "host_func")
ATTRIBUTES = {"CAN_MAP_HOST_MEMORY": 19, "UNIFIED_ADDRESSING": 41, "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM": 91,
              "CAN_USE_STREAM_MEM_OPS_V1": 92, "CAN_USE_64_BIT_STREAM_MEM_OPS_V1": 93,
              "CAN_USE_STREAM_WAIT_VALUE_NOR_V1": 94, "PAGEABLE_MEMORY_ACCESS": 88}


def step(text: str) -> None:
    print(text, flush=True)


def _lib():
    lib = ctypes.CDLL("libcuda.so.1")
    for name, args in (("cuStreamWaitValue32_v2", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]),
                       ("cuMemHostGetDevicePointer_v2", [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]),
                       ("cuMemHostAlloc", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]),
                       ("cuLaunchHostFunc", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _wait_test(lib, torch, host_ptr: int, write) -> None:
    """A satisfied wait, then a held one released by ``write(1)``."""
    dptr = ctypes.c_uint64(0)
    rc = lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ctypes.c_void_p(host_ptr), 0)
    step(f"cuMemHostGetDevicePointer rc={rc} host=0x{host_ptr:x} device=0x{dptr.value:x}")
    if rc:
        return
    stream = torch.cuda.Stream()
    rc = lib.cuStreamWaitValue32_v2(ctypes.c_void_p(stream.cuda_stream), dptr, 0, 0)
    step(f"wait(>= 0) rc={rc}; synchronizing")
    stream.synchronize()
    step("satisfied wait passed")
    x = torch.zeros(1, device="cuda")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rc = lib.cuStreamWaitValue32_v2(ctypes.c_void_p(stream.cuda_stream), dptr, 1, 0)
        x.add_(1)
        done = torch.cuda.Event()
        done.record(stream)
    time.sleep(0.05)
    step(f"wait(>= 1) rc={rc}; held before the write: {not done.query()}")
    write(1)
    t0 = time.perf_counter()
    while not done.query() and time.perf_counter() - t0 < 3:
        time.sleep(0.001)
    step(f"released {done.query()} after {1e3 * (time.perf_counter() - t0):.2f} ms; x={x.item() if done.query() else '?'}")


def run_way(way: str) -> None:
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    lib = _lib()
    if way == "attributes":
        version = ctypes.c_int(0)
        lib.cuDriverGetVersion(ctypes.byref(version))
        step(f"driver version {version.value}")
        dev = ctypes.c_int(0)
        lib.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device())
        for name, attr in ATTRIBUTES.items():
            value = ctypes.c_int(-1)
            rc = lib.cuDeviceGetAttribute(ctypes.byref(value), attr, dev)
            step(f"{name} = {value.value} (rc={rc})")
    elif way == "torch_pinned":
        host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        view = host.numpy()
        _wait_test(lib, torch, host.data_ptr(), lambda v: view.__setitem__(0, v))
    elif way == "driver_mapped":
        ptr = ctypes.c_void_p(0)
        rc = lib.cuMemHostAlloc(ctypes.byref(ptr), 4, 0x01 | 0x02)  # PORTABLE | DEVICEMAP
        step(f"cuMemHostAlloc rc={rc}")
        if rc:
            return
        cell = ctypes.c_uint32.from_address(ptr.value)
        cell.value = 0
        _wait_test(lib, torch, ptr.value, lambda v: setattr(cell, "value", v))
    elif way == "host_func":
        gate, entered = threading.Event(), threading.Event()

        def hold(_) -> None:  # runs on the driver's thread; returns None, as the C type says
            entered.set()
            gate.wait(5.0)

        callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(hold)
        stream = torch.cuda.Stream()
        x = torch.zeros(1, device="cuda")
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            rc = lib.cuLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), ctypes.cast(callback, ctypes.c_void_p), None)
            x.add_(1)
            done = torch.cuda.Event()
            done.record(stream)
        time.sleep(0.05)
        step(f"cuLaunchHostFunc rc={rc}; callback entered: {entered.is_set()}; "
             f"held before the host sets the gate: {not done.query()}")
        gate.set()
        t0 = time.perf_counter()
        while not done.query() and time.perf_counter() - t0 < 3:
            time.sleep(0.0002)
        step(f"released {done.query()} after {1e3 * (time.perf_counter() - t0):.3f} ms; x={x.item() if done.query() else '?'}")
    else:
        raise ValueError(f"way: expected one of {WAYS}, got {way!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--way", choices=WAYS, default=None, help="run one way in this process")
    p.add_argument("--timeout", type=float, default=12.0, help="seconds per way (its own process)")
    p.add_argument("--out", default=None, help="JSON of every way's lines and exit status")
    args = p.parse_args(argv)
    if args.way:
        run_way(args.way)
        return 0
    results = {}
    for way in WAYS:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--way", way], capture_output=True,
                                  text=True, timeout=args.timeout)
            results[way] = {"rc": proc.returncode, "lines": proc.stdout.splitlines(),
                            "stderr_tail": proc.stderr.splitlines()[-3:]}
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            results[way] = {"rc": "timeout", "lines": out.splitlines()}
        print(f"[{way}] rc={results[way]['rc']}")
        for line in results[way]["lines"] + results[way].get("stderr_tail", []):
            print(f"  {line}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
