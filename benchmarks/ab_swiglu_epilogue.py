"""Same-process A/B of moekit's layer, forward and forward+backward, bf16, uniform routing,
every prefill shape of ``bench_layer.py``: the SwiGLU in the gate+up GEMM's epilogue
(:mod:`moekit.experts.triton_gmm_swiglu`) on every shape against the GEMM + activation kernel.
Each variant is timed in ``--rounds`` interleaved rounds (default 4; order forward, reversed,
...); the outputs and all gradients of the fused and the unfused path are compared first.

    PYTHONPATH=src python benchmarks/ab_swiglu_epilogue.py [--rounds 4] [--shapes a,b]   # writes $OUT/swiglu_ab.json

The variants move ``grouped.FUSED_SWIGLU_MIN_DIM`` for the duration of a timing. The committed
``results/swiglu_ab_h100_2026-11-28.json`` was made by this script at commit c3fb3a3, which had a
third variant, ``both_fused`` (the activation backward in the ``dau`` GEMM's epilogue as well,
since dropped); its ``fwd_fused`` is this version's ``fused``.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_layer as bl

from moekit.experts import grouped
from moekit.experts.grouped import experts_grouped_mm

DEFAULT_MIN_DIM = grouped.FUSED_SWIGLU_MIN_DIM
VARIANTS = ("unfused", "fused")


def use(v):
    grouped.FUSED_SWIGLU_MIN_DIM = 0 if v == "fused" else 10 ** 9


def ab_shape(T, D, F, E, K, gen, rounds: int = 4) -> dict:
    """Differences fused vs unfused, then ``{mode: {variant: {median, rounds}}}`` for one shape."""
    w_in, w_out = bl.make_weights(D, F, E, gen)
    x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    idx, w = bl.routing(T, E, K, "uniform", gen)
    w = w.bfloat16().requires_grad_()
    dy = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    fns = {"fwd": lambda: experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"),
           "fwd+bwd": lambda: torch.autograd.grad(experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"),
                                                  [x, w, w_in, w_out], dy)}
    use("fused")
    y1, g1 = fns["fwd"](), fns["fwd+bwd"]()
    use("unfused")
    y0, g0 = fns["fwd"](), fns["fwd+bwd"]()

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    res = {"rel_diff_fused_vs_unfused": {"y": rel(y1, y0)} | {
        n: rel(a, b) for n, a, b in zip(("dx", "dw", "dw_in", "dw_out"), g1, g0)}}
    for mode, fn in fns.items():
        rounds = {k: [] for k in VARIANTS}
        for r in range(rounds):
            for k in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                use(k)
                rounds[k].append(bl.time_ms(fn, budget_s=0.4, max_reps=30))
        res[mode] = {k: {"median": statistics.median(v), "rounds": v} for k, v in rounds.items()}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (>= 1)")
    p.add_argument("--shapes", default="", help="comma-separated prefill shape names (default: all)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        for name, T, D, F, E, K in bl.PREFILL:
            if args.shapes and name not in args.shapes.split(","):
                continue
            res = out[name] = ab_shape(T, D, F, E, K, gen, args.rounds)
            print(name, {k: f"{v:.1e}" for k, v in res["rel_diff_fused_vs_unfused"].items()},
                  {m: {k: round(v["median"], 3) for k, v in res[m].items()} for m in ("fwd", "fwd+bwd")}, flush=True)
            torch.cuda.empty_cache()
    finally:
        grouped.FUSED_SWIGLU_MIN_DIM = DEFAULT_MIN_DIM
    bl.write_json(os.path.join(os.environ.get("OUT", "benchmarks/results"), "swiglu_ab.json"),
                  {"command": bl.command_line(None), "machine": bl.machine_info(), "rows": out})


if __name__ == "__main__":
    main()
