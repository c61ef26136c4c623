"""The six grouped GEMMs of moekit's expert path, one by one: ``torch._grouped_mm`` (CUTLASS)
against moekit's Triton kernels (:mod:`moekit.experts.triton_gmm`) and the balanced
``torch.bmm`` twin (cuBLAS, equal groups), on one GPU, in one run.

    python benchmarks/bench_gmm.py [--out DIR] [--shapes a,b] [--routing uniform,zipf] [--tag TAG]

For every prefill shape of ``bench_layer.py`` (bf16, ``N = T*k`` sorted rows, group sizes from
uniform or Zipf(1.2) routing: both for the Qwen3 and DeepSeek shapes, which miss the layer's
1.05x floor, uniform only for OLMoE and Mixtral, checked for not getting slower; see
:data:`ROUTINGS`) and each GEMM (forward gate+up and down, backward ``dau``,
``dw_out``, ``dw_in``, ``dx``, with the operand layouts of :mod:`moekit.experts.grouped`):

1. every Triton configuration of :data:`M_CONFIGS` (M-grouped GEMMs) or :data:`K_CONFIGS`
   (the K-grouped weight gradients) is compiled and checked against ``torch._grouped_mm``
   (relative error);
2. ``grouped_mm``, every configuration that passed and ``bmm`` (the same FLOPs as
   ``[E, N/E, ...]`` batches) are timed in ``--rounds`` interleaved rounds (default 5, order
   reversed every other round, so a drift of the clocks lands on all alike; a single timing of
   a configuration moved by up to 10% between runs); the table shows the median of the round
   medians of ``grouped_mm``, the fastest configuration and ``bmm``, and the result file every
   configuration's rounds.

Also measures the dense bf16 matmul peak. Writes ``gmm_<gpu>_<date>[_TAG].json`` with the
exact command, versions and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch
from bench_layer import (
    PREFILL,
    command_line,
    dense_peak_tflops,
    interleaved,
    machine_info,
    result_path,
    routing,
    run_log,
    time_ms,
    write_json,
)

from moekit.experts import triton_gmm as tg
from moekit.experts.grouped import route_by_expert

GEMMS = ("gate+up", "down", "dau", "dw_out", "dw_in", "dx")
C = tg.GmmConfig
M_CONFIGS = (  # block_m, block_n, block_k, num_stages, num_warps
    C(128, 256, 64, 4, 8, flatten=True, epilogue_subtile=True),
    C(128, 256, 64, 3, 8, flatten=True),
    C(128, 256, 64, 3, 8, flatten=True, epilogue_subtile=True),
    C(128, 256, 128, 2, 8, flatten=True, epilogue_subtile=True),
    C(128, 128, 64, 5, 8, flatten=True),
    C(256, 128, 64, 3, 8, flatten=True, epilogue_subtile=True),
)
K_CONFIGS = (
    C(128, 256, 64, 4, 8, epilogue_subtile=True),
    C(128, 256, 64, 4, 8, flatten=True, epilogue_subtile=True),
    C(128, 256, 64, 3, 8, flatten=True),
    C(128, 256, 128, 2, 8, epilogue_subtile=True),
)
ROUNDS = 5
ROUTINGS = {"olmoe": ("uniform",), "qwen3_30b_a3b": ("uniform", "zipf"), "mixtral": ("uniform",),
            "deepseek_v3_slice": ("uniform", "zipf")}


def gemm_cases(T, D, F_, E, K, offs, gen) -> dict:
    """``{gemm: (grouped_mm fn, triton fn(config), bmm fn, flops)}`` for one shape."""
    N, H, M = T * K, 2 * F_, T * K // E

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    x, dy = rnd(N, D), rnd(N, D)
    a, dh = rnd(N, F_), rnd(N, H)
    w_in, w_out = rnd(E, H, D, scale=D ** -0.5), rnd(E, D, F_, scale=F_ ** -0.5)
    gmm = torch._grouped_mm
    m_ = tg.gmm_m_grouped
    k_ = tg.gmm_k_grouped
    x_b, dy_b, a_b, dh_b = x[:E * M].view(E, M, D), dy[:E * M].view(E, M, D), a[:E * M].view(E, M, F_), dh[:E * M].view(E, M, H)
    return {
        "gate+up": (lambda: gmm(x, w_in.transpose(-2, -1), offs=offs),
                    lambda c: m_(x, w_in, offs, w_is_ok=True, config=c),
                    lambda: torch.bmm(x_b, w_in.transpose(1, 2)), 2 * N * D * H),
        "down": (lambda: gmm(a, w_out.transpose(-2, -1), offs=offs),
                 lambda c: m_(a, w_out, offs, w_is_ok=True, config=c),
                 lambda: torch.bmm(a_b, w_out.transpose(1, 2)), 2 * N * F_ * D),
        "dau": (lambda: gmm(dy, w_out, offs=offs),
                lambda c: m_(dy, w_out, offs, w_is_ok=False, config=c),
                lambda: torch.bmm(dy_b, w_out), 2 * N * D * F_),
        "dw_out": (lambda: gmm(dy.t(), a, offs=offs),
                   lambda c: k_(dy, a, offs, config=c),
                   lambda: torch.bmm(dy_b.transpose(1, 2), a_b), 2 * N * D * F_),
        "dw_in": (lambda: gmm(dh.t(), x, offs=offs),
                  lambda c: k_(dh, x, offs, config=c),
                  lambda: torch.bmm(dh_b.transpose(1, 2), x_b), 2 * N * H * D),
        "dx": (lambda: gmm(dh, w_in, offs=offs),
               lambda c: m_(dh, w_in, offs, w_is_ok=False, config=c),
               lambda: torch.bmm(dh_b, w_in), 2 * N * H * D),
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor, n_valid: int) -> float:
    if out.shape[0] == ref.shape[0] and out.ndim == 2:  # M-grouped: rows past n_valid are unwritten
        out, ref = out[:n_valid], ref[:n_valid]
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def config_key(cfg: tg.GmmConfig) -> str:
    return "x".join(map(str, (cfg.block_m, cfg.block_n, cfg.block_k))) + f"_s{cfg.num_stages}_w{cfg.num_warps}" + \
        ("_flat" if cfg.flatten else "") + ("_sub" if cfg.epilogue_subtile else "")


def bench_gemm(name, gemm, fns, n_valid, log, rounds: int = ROUNDS) -> dict:
    grouped, triton_fn, bmm, flops = fns
    ref = grouped()
    per_config, contenders = {}, {"grouped_mm": grouped, "bmm": bmm}
    for cfg in K_CONFIGS if gemm.startswith("dw") else M_CONFIGS:
        key = config_key(cfg)
        try:
            err = rel_err(triton_fn(cfg), ref, n_valid)
        except Exception as e:  # a configuration that does not compile or fit is reported, not fatal
            per_config[key] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        per_config[key] = dict(rel_err=err)
        if err < 2e-2:
            contenders[key] = lambda c=cfg: triton_fn(c)
    ms_rounds: dict[str, list[float]] = {}
    for impl in interleaved(list(contenders), rounds):
        ms_rounds.setdefault(impl, []).append(time_ms(contenders[impl], budget_s=0.08, warmup=2))
    ms = {k: statistics.median(v) for k, v in ms_rounds.items()}
    for key in per_config:
        if key in ms:
            per_config[key].update(ms=ms[key], ms_rounds=ms_rounds[key])
    tried = [k for k in ms if k not in ("grouped_mm", "bmm")]
    best_key = min(tried, key=ms.__getitem__) if tried else None
    row = dict(gemm=gemm, flops=flops, grouped_mm_ms=ms["grouped_mm"], bmm_ms=ms["bmm"],
               triton_ms=ms.get(best_key), triton_config=best_key,
               ms_rounds={k: ms_rounds[k] for k in ("grouped_mm", "bmm", best_key) if k},
               configs=per_config, triton_rel_err=per_config[best_key]["rel_err"] if best_key else None)
    row["triton_vs_grouped_mm"] = ms["grouped_mm"] / ms[best_key] if best_key else None
    row["tflops"] = {k: flops / ms[v] / 1e9 for k, v in (("grouped_mm", "grouped_mm"), ("bmm", "bmm"),
                                                         ("triton", best_key)) if v}
    log(f"  {name:18s} {gemm:8s} grouped_mm {ms['grouped_mm']:7.3f}  triton {ms.get(best_key, float('nan')):7.3f} "
        f"({best_key})  bmm {ms['bmm']:7.3f} ms   " + " ".join(f"{k}={ms[k]:.3f}" for k in tried))
    return row


def print_table(rows) -> None:
    head = (f"{'shape':18s} {'routing':7s} {'gemm':8s} {'grouped_mm':>10s} {'triton':>8s} {'bmm':>8s} "
            f"{'gmm/tri':>7s} {'tri/bmm':>7s} {'TF/s tri':>8s}  config")
    print(head)
    print("-" * len(head))
    for r in rows:
        t = r["triton_ms"] or float("nan")
        print(f"{r['shape']:18s} {r['routing']:7s} {r['gemm']:8s} {r['grouped_mm_ms']:10.3f} {t:8.3f} {r['bmm_ms']:8.3f} "
              f"{r['grouped_mm_ms'] / t:7.3f} {t / r['bmm_ms']:7.3f} {r['tflops'].get('triton', float('nan')):8.1f}  "
              f"{r['triton_config']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for gmm_<gpu>_<date>.json")
    p.add_argument("--shapes", default="", help="comma-separated prefill shape names (default: all)")
    p.add_argument("--routing", default="uniform,zipf", help="comma-separated: uniform, zipf (each shape "
                   "keeps only those of its ROUTINGS entry)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds (>= 1)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        print(f"bench_gmm: error: --rounds: expected an integer >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gmm: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [s for s in args.shapes.split(",") if s]
    known = [s[0] for s in PREFILL]
    if any(n not in known for n in names):
        print(f"bench_gmm: error: --shapes: expected names from {known}, got {names}", file=sys.stderr)
        return 2
    kinds = [k for k in args.routing.split(",") if k]
    if any(k not in ("uniform", "zipf") for k in kinds):
        print(f"bench_gmm: error: --routing: expected uniform and/or zipf, got {kinds}", file=sys.stderr)
        return 2
    log, lines = run_log()
    info = machine_info()
    peak = dense_peak_tflops()
    log(f"{info['gpu']}: dense bf16 peak {peak:.0f} TFLOP/s")
    path = result_path(args.out, "gmm", info, args.tag)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, T, D, F_, E, K in PREFILL:
        if names and name not in names:
            continue
        for kind in [k for k in kinds if k in ROUTINGS[name]]:
            idx, _ = routing(T, E, K, kind, gen)
            _, _, offs = route_by_expert(idx, E)
            counts = torch.diff(offs, prepend=offs.new_zeros(1))
            log(f"{name} {kind}: rows per expert min {int(counts.min())} mean {T * K / E:.0f} max {int(counts.max())}")
            cases = gemm_cases(T, D, F_, E, K, offs, gen)
            for gemm in GEMMS:
                row = bench_gemm(name, gemm, cases[gemm], T * K, log, args.rounds)
                row.update(shape=name, routing=kind, T=T, D=D, F=F_, E=E, K=K, pct_peak_triton=(
                    100 * row["tflops"]["triton"] / peak if row["triton_ms"] else None))
                rows.append(row)
            del cases
            torch.cuda.empty_cache()
            write_json(path, dict(command=command_line(argv), machine=info, dense_bf16_tflops=peak,
                                  m_configs=[dataclasses.asdict(c) for c in M_CONFIGS],
                                  k_configs=[dataclasses.asdict(c) for c in K_CONFIGS], rows=rows, log=lines))
    print_table(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
