"""Same-process A/B of moekit's layer step (bf16, uniform routing, the prefill shapes of
``bench_layer.py``) under variants of the expert path's switches, with the balanced ``bmm``
bound timed in the same interleaved rounds, so every variant's ratio to the bound comes from
one run.

    PYTHONPATH=src python benchmarks/ab_layer.py [--variants a,b] [--shapes a,b] [--modes fwd,fwd+bwd]
                                                 [--rounds 7]        # writes $OUT/layer_ab.json

Variants (:data:`VARIANTS`) set module switches for the duration of a timing and restore them:

- ``current``: the library as imported;
- ``gmm_configs_s6``: the sixth session's Triton GEMM defaults (4 stages; K-grouped unflattened);
- ``swiglu_fused`` / ``swiglu_unfused``: the SwiGLU in the gate+up GEMM's epilogue on every
  shape / on none (``grouped.FUSED_SWIGLU_MIN_DIM``).

Rounds run the variants and the bound in alternating order (forward, reversed, ...): the H100
runs these steps at its power limit, with SM clocks between about 1200 and 1980 MHz from round
to round, and the alternation spreads that over every contender. Before timing, the outputs and
all gradients of each variant are compared with ``current`` (relative Frobenius difference).

This script replaces ``ab_swiglu_epilogue.py`` (which made ``results/swiglu_ab_h100_2026-11-28.json``
at commit c3fb3a3) and ``ab_gmm_defaults.py`` (``results/gmm_defaults_ab_h100_2026-11-28_s7.json``
at commit b827be4); see those commits for the exact scripts.
"""
import argparse
import contextlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_layer as bl

from moekit.experts import grouped, triton_gmm

G = triton_gmm.GmmConfig


@contextlib.contextmanager
def _patched(module, **values):
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


VARIANTS = {
    "current": contextlib.nullcontext,
    "gmm_configs_s6": lambda: _patched(
        triton_gmm, DEFAULT_M_CONFIG=G(128, 256, 64, 4, 8, flatten=True, epilogue_subtile=True),
        DEFAULT_K_CONFIG=G(128, 256, 64, 4, 8, epilogue_subtile=True)),
    "swiglu_fused": lambda: _patched(grouped, FUSED_SWIGLU_MIN_DIM=0),
    "swiglu_unfused": lambda: _patched(grouped, FUSED_SWIGLU_MIN_DIM=10 ** 9),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ab_shape(T, D, F, E, K, gen, variants, modes, rounds: int) -> dict:
    """``{"rel_diff": {variant: {y, dx, dw, dw_in, dw_out}}, mode: {variant or "bmm_bound":
    {median, rounds, ratio_to_bound}}}`` for one shape."""
    case = bl.PrefillCase.make(T, D, F, E, K, "uniform", gen)

    def outputs():
        y = case.moekit()
        return [y.detach(), *torch.autograd.grad(y, case.inputs, case.dy)]

    ref = outputs()
    res = {"rel_diff": {}}
    for v in variants:
        with VARIANTS[v]():
            res["rel_diff"][v] = {n: _rel(a, b) for n, a, b in zip(("y", "dx", "dw", "dw_in", "dw_out"), outputs(), ref)}
    fns = {"fwd": case.steps(False), "fwd+bwd": case.steps(True)}
    contenders = [*variants, "bmm_bound"]
    for mode in modes:
        fn, bound = fns[mode]
        ms = {k: [] for k in contenders}
        for k in bl.interleaved(contenders, rounds):
            with (contextlib.nullcontext() if k == "bmm_bound" else VARIANTS[k]()):
                ms[k].append(bl.time_ms(bound if k == "bmm_bound" else fn, budget_s=0.4, max_reps=40))
        med = {k: statistics.median(v) for k, v in ms.items()}
        res[mode] = {k: {"median": med[k], "rounds": ms[k], "ratio_to_bound": med[k] / med["bmm_bound"]}
                     for k in contenders}
    return res


def _names(arg: str, known, what: str) -> list[str]:
    names = [n for n in arg.split(",") if n]
    if any(n not in known for n in names):
        raise SystemExit(f"ab_layer: error: {what}: expected names from {list(known)}, got {names}")
    return names or list(known)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="", help=f"comma-separated, from {list(VARIANTS)} (default: all)")
    p.add_argument("--shapes", default="", help="comma-separated prefill shape names (default: all)")
    p.add_argument("--modes", default="fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 1)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    variants = _names(args.variants, VARIANTS, "--variants")
    shapes = _names(args.shapes, [s[0] for s in bl.PREFILL], "--shapes")
    modes = _names(args.modes, ("fwd", "fwd+bwd"), "--modes")
    if not torch.cuda.is_available():
        raise SystemExit("ab_layer: error: needs a CUDA device")
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, T, D, F, E, K in bl.PREFILL:
        if name not in shapes:
            continue
        res = out[name] = ab_shape(T, D, F, E, K, gen, variants, modes, args.rounds)
        for mode in modes:
            print(f"{name:18s} {mode:8s} " + "  ".join(f"{k} {v['median']:.3f} ({v['ratio_to_bound']:.3f})"
                                                     for k, v in res[mode].items()), flush=True)
        print(f"{name:18s} rel. diff vs current: " + "  ".join(
            f"{v}: " + ",".join(f"{n}={e:.1e}" for n, e in d.items()) for v, d in res["rel_diff"].items()), flush=True)
        torch.cuda.empty_cache()
    bl.write_json(os.path.join(os.environ.get("OUT", "benchmarks/results"), "layer_ab.json"),
                  {"command": bl.command_line(None), "machine": bl.machine_info(), "rounds": args.rounds, "rows": out})


if __name__ == "__main__":
    main()
