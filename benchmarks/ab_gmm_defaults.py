"""Same-process A/B of moekit's layer step (forward+backward, bf16, uniform routing, every prefill
shape of ``bench_layer.py``) under sets of Triton GEMM defaults, with the balanced ``bmm`` bound
timed in the same interleaved rounds (order forward, reversed, ...), so each set's ratio to the
bound comes from one run.

    PYTHONPATH=src python benchmarks/ab_gmm_defaults.py [--rounds 5]   # writes $OUT/gmm_defaults_ab.json

A set replaces ``triton_gmm.DEFAULT_M_CONFIG`` / ``DEFAULT_K_CONFIG`` for the duration of its
timings; ``current`` is the library's defaults as imported.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_layer as bl

from moekit.experts import triton_gmm
from moekit.experts.grouped import experts_grouped_mm

G = triton_gmm.GmmConfig
SETS = {  # name: (M-grouped default, K-grouped default)
    "current": (triton_gmm.DEFAULT_M_CONFIG, triton_gmm.DEFAULT_K_CONFIG),
    "s6_s4_flat_sub": (G(128, 256, 64, 4, 8, flatten=True, epilogue_subtile=True),
                       G(128, 256, 64, 4, 8, epilogue_subtile=True)),
}


def use(name: str) -> None:
    triton_gmm.DEFAULT_M_CONFIG, triton_gmm.DEFAULT_K_CONFIG = SETS[name]


def ab_shape(T, D, F, E, K, gen, rounds: int) -> dict:
    """``{variant: {median, rounds}}`` for one shape (variants: every set and ``bmm_bound``)."""
    w_in, w_out = bl.make_weights(D, F, E, gen)
    x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    idx, w = bl.routing(T, E, K, "uniform", gen)
    w = w.bfloat16().requires_grad_()
    dy = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    x_EMD = torch.randn(E, T * K // E, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    dy_EMD = torch.randn(E, T * K // E, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    moekit = bl.step(lambda: experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"), [x, w, w_in, w_out], True, dy)
    bound = bl.step(lambda: bl.bmm_bound_fn(x_EMD, w_in, w_out), [x_EMD, w_in, w_out], True, dy_EMD)
    variants = [*SETS, "bmm_bound"]
    ms = {k: [] for k in variants}
    for r in range(rounds):
        for k in (variants if r % 2 == 0 else variants[::-1]):
            if k in SETS:
                use(k)
            ms[k].append(bl.time_ms(bound if k == "bmm_bound" else moekit, budget_s=0.4, max_reps=40))
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {k: {"median": med[k], "rounds": ms[k], "ratio_to_bound": med[k] / med["bmm_bound"]} for k in variants}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 1)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        for name, T, D, F, E, K in bl.PREFILL:
            res = out[name] = ab_shape(T, D, F, E, K, gen, args.rounds)
            print(f"{name:18s} " + "  ".join(f"{k} {v['median']:.3f} ms ({v['ratio_to_bound']:.3f})"
                                             for k, v in res.items()), flush=True)
            torch.cuda.empty_cache()
    finally:
        use("current")
    bl.write_json(os.path.join(os.environ.get("OUT", "benchmarks/results"), "gmm_defaults_ab.json"),
                  {"command": bl.command_line(None), "machine": bl.machine_info(), "rows": out})


if __name__ == "__main__":
    main()
