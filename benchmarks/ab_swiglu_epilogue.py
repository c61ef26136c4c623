"""Same-process A/B of moekit's layer, forward and forward+backward, bf16, uniform routing,
every prefill shape of ``bench_layer.py``: the SwiGLU in the gate+up GEMM's epilogue (and, at
commit a5c0f1e, its backward in the ``dau`` GEMM's epilogue) against the GEMM + activation
kernels. Each variant is timed in four interleaved rounds (order forward, reversed, ...); the
outputs and all gradients of the fused and the unfused path are compared first.

    PYTHONPATH=src python benchmarks/ab_swiglu_epilogue.py      # writes $OUT/swiglu_ab.json

The variants switch the fusion off by replacing the module's ``*_supported`` predicates for
the duration of a timing: a benchmark-only device, not an option of the library.
"""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_layer as bl  # noqa: E402

from moekit.experts import triton_gmm_swiglu as ts  # noqa: E402
from moekit.experts.grouped import experts_grouped_mm  # noqa: E402

orig_f, orig_b = ts.gate_up_swiglu_supported, ts.dau_swiglu_supported
VARIANTS = ("unfused", "fwd_fused", "both_fused")


def use(v):
    ts.gate_up_swiglu_supported = orig_f if v != "unfused" else (lambda *a: False)
    ts.dau_swiglu_supported = orig_b if v == "both_fused" else (lambda *a: False)


out = {}
gen = torch.Generator(device="cuda").manual_seed(0)
for name, T, D, F, E, K in bl.PREFILL:
    w_in, w_out = bl.make_weights(D, F, E, gen)
    x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    idx, w = bl.routing(T, E, K, "uniform", gen)
    w = w.bfloat16().requires_grad_()
    dy = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    fns = {"fwd": lambda: experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"),
           "fwd+bwd": lambda: torch.autograd.grad(experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"),
                                                  [x, w, w_in, w_out], dy)}
    use("both_fused"); y1 = fns["fwd"](); g1 = fns["fwd+bwd"](); use("unfused"); y0 = fns["fwd"](); g0 = fns["fwd+bwd"]()  # noqa: E702
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    diff = rel(y1, y0)
    res = {"rel_diff_fused_vs_unfused": {"y": diff} | {n: rel(a, b) for n, a, b in zip(("dx", "dw", "dw_in", "dw_out"), g1, g0)}}
    for mode, fn in fns.items():
        rounds = {k: [] for k in VARIANTS}
        for r in range(4):
            for k in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                use(k)
                rounds[k].append(bl.time_ms(fn, budget_s=0.4, max_reps=30))
        res[mode] = {k: {"median": statistics.median(v), "rounds": v} for k, v in rounds.items()}
    out[name] = res
    print(name, {k: f"{v:.1e}" for k, v in res["rel_diff_fused_vs_unfused"].items()},
          {m: {k: round(v["median"], 3) for k, v in res[m].items()} for m in fns}, flush=True)
    del w_in, w_out, x
    torch.cuda.empty_cache()
use("both_fused")
json.dump(dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, rows=out),
          open(os.path.join(os.environ.get("OUT", "/tmp"), "swiglu_ab.json"), "w"), indent=1)
