"""Where the time of moekit's grouped expert path goes, step by step, against the balanced
``torch.bmm`` bound's own steps, on one GPU.

    python benchmarks/bench_layer_steps.py [--out DIR] [--shapes a,b] [--routing uniform|zipf] [--tag TAG]

For every prefill shape of ``bench_layer.py`` (uniform routing unless ``--routing zipf``, bf16) it times, each on its
own (CUDA events, median of back-to-back repetitions after warm-up):

- moekit's forward steps: the routing sort, the gather of ``x``, the gate+up grouped GEMM, the
  activation, the down grouped GEMM, the weighted un-permute;
- its backward steps: the gather of ``dy``, the three data-gradient / two weight-gradient
  grouped GEMMs (``dau``, ``dx``, ``dw_out``, ``dw_in``), the fused activation backward, the
  un-permute of ``dx``;
- the same six GEMMs as balanced ``torch.bmm`` over ``[E, T*k/E, ...]`` and the bound's
  unfused SwiGLU forward and backward;
- the whole moekit call and the whole bound, forward+backward.

The step times do not add up to the whole exactly (the whole overlaps launches and allocator
work), but they show which steps the whole-call gap to the bound comes from. Writes
``layer_steps_<gpu>_<date>[_TAG].json``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_layer import (
    PREFILL,
    bmm_bound_fn,
    command_line,
    machine_info,
    make_weights,
    result_path,
    routing,
    run_log,
    step,
    time_ms,
    write_json,
)

from moekit.experts import steps
from moekit.experts.grouped import experts_grouped_mm, route_by_expert


def _gmm(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


def shape_steps(name, T, D, F_, E, K, gen, log, kind: str = "uniform") -> list[dict]:
    """Times of each step of moekit's path and of the bound, in ms, for one shape."""
    H, M = 2 * F_, T * K // E
    w_in, w_out = make_weights(D, F_, E, gen)
    w_in, w_out = w_in.detach(), w_out.detach()
    x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    dy = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx, w = routing(T, E, K, kind, gen)
    w = w.bfloat16()
    order, inv, offs = route_by_expert(idx, E)
    tok = order // K
    x_ND = x.index_select(0, tok)
    h_NH = _gmm(x_ND, w_in.transpose(-2, -1), offs)
    a_NF = steps.act_forward(h_NH, offs, "swiglu")
    y_ND = _gmm(a_NF, w_out.transpose(-2, -1), offs)
    dy_ND = dy.index_select(0, tok)
    dau_NF = _gmm(dy_ND, w_out, offs)
    dh_NH, aw_NF, _ = steps.act_backward(h_NH, dau_NF, w.reshape(-1), order, offs, "swiglu")
    dx_ND = _gmm(dh_NH, w_in, offs)
    x_EMD, a_EMF, dy_EMD = x_ND.view(E, M, D), a_NF.view(E, M, F_), dy_ND.view(E, M, D)
    dh_EMH, h_EMH = dh_NH.view(E, M, H), h_NH.view(E, M, H)
    w_in_t, w_out_t = w_in.transpose(-2, -1).contiguous(), w_out.transpose(-2, -1).contiguous()
    h_leaf = h_EMH.clone().requires_grad_()
    act_out = F.silu(h_leaf[..., :F_]) * h_leaf[..., F_:]
    dact = torch.randn_like(act_out)
    cases = {
        "route_by_expert": lambda: route_by_expert(idx, E),
        "fwd gather x": lambda: steps.permute_rows(x, order, inv, x.dtype),
        "fwd gmm gate+up": lambda: _gmm(x_ND, w_in.transpose(-2, -1), offs),
        "fwd act": lambda: steps.act_forward(h_NH, offs, "swiglu"),
        "fwd gmm down": lambda: _gmm(a_NF, w_out.transpose(-2, -1), offs),
        "fwd gather_sum": lambda: steps.gather_sum(y_ND, inv, w, torch.bfloat16),
        "bwd gather dy": lambda: steps.permute_rows(dy, order, inv, dy.dtype),
        "bwd gmm dau": lambda: _gmm(dy_ND, w_out, offs),
        "bwd act": lambda: steps.act_backward(h_NH, dau_NF, w.reshape(-1), order, offs, "swiglu"),
        "bwd gmm dw_out": lambda: _gmm(dy_ND.t(), aw_NF, offs),
        "bwd gmm dw_in": lambda: _gmm(dh_NH.t(), x_ND, offs),
        "bwd gmm dx": lambda: _gmm(dh_NH, w_in, offs),
        "bwd gather_sum": lambda: steps.gather_sum(dx_ND, inv, None, torch.bfloat16),
        # The weight gradients with the operands swapped (transposed results), and the gate+up
        # GEMM with a row-major copy of its weight: does the operand layout matter?
        # The permutation as torch's index_select (moekit's path before the Triton scatter).
        "alt index_select x": lambda: x.index_select(0, order // K),
        "alt gmm dw_out^T": lambda: _gmm(aw_NF.t(), dy_ND, offs),
        "alt gmm dw_in^T": lambda: _gmm(x_ND.t(), dh_NH, offs),
        "alt gmm gate+up rm": lambda: _gmm(x_ND, w_in_t, offs),
        "alt gmm down rm": lambda: _gmm(a_NF, w_out_t, offs),
        "bmm gate+up": lambda: torch.bmm(x_EMD, w_in.transpose(1, 2)),
        "bmm down": lambda: torch.bmm(a_EMF, w_out.transpose(1, 2)),
        "bmm dau": lambda: torch.bmm(dy_EMD, w_out),
        "bmm dw_out": lambda: torch.bmm(dy_EMD.transpose(1, 2), a_EMF),
        "bmm dw_in": lambda: torch.bmm(dh_EMH.transpose(1, 2), x_EMD),
        "bmm dx": lambda: torch.bmm(dh_EMH, w_in),
        "bound act fwd": lambda: F.silu(h_EMH[..., :F_]) * h_EMH[..., F_:],
        "bound act bwd": lambda: torch.autograd.grad(act_out, h_leaf, dact, retain_graph=True),
    }
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    wi, wo = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    x_b = x_EMD.clone().requires_grad_()
    cases["moekit fwd+bwd"] = step(lambda: experts_grouped_mm(xg, idx, wg, wi, wo, "swiglu"), [xg, wg, wi, wo], True, dy)
    cases["bound fwd+bwd"] = step(lambda: bmm_bound_fn(x_b, wi, wo), [x_b, wi, wo], True, dy_EMD)
    rows = []
    for what, fn in cases.items():
        ms = time_ms(fn, budget_s=0.15, warmup=2)
        rows.append(dict(shape=name, T=T, D=D, F=F_, E=E, K=K, routing=kind, step=what, ms=ms))
        log(f"  {name:18s} {what:18s} {ms:8.4f} ms")
    gemms = ["gate+up", "down", "dau", "dw_out", "dw_in", "dx"]
    ms = {r["step"]: r["ms"] for r in rows}
    log(f"  {name:18s} grouped GEMMs {sum(ms[k] for k in ms if k.startswith(('fwd gmm', 'bwd gmm'))):.3f} ms, bmm GEMMs "
        f"{sum(ms['bmm ' + g] for g in gemms):.3f} ms; moekit memory-bound steps "
        f"{sum(v for k, v in ms.items() if k.startswith(('fwd ', 'bwd ')) and ' gmm ' not in k) + ms['route_by_expert']:.3f}"
        f" ms, bound act {ms['bound act fwd'] + ms['bound act bwd']:.3f} ms")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for layer_steps_<gpu>_<date>.json")
    p.add_argument("--shapes", default="", help="comma-separated prefill shape names (default: all)")
    p.add_argument("--routing", default="uniform", choices=("uniform", "zipf"),
                   help="moekit's routing (the bound is always balanced)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layer_steps: error: needs a CUDA device", file=sys.stderr)
        return 2
    log, lines = run_log()
    gen = torch.Generator(device="cuda").manual_seed(0)
    info = machine_info()
    rows = []
    for name, T, D, F_, E, K in PREFILL:
        if not args.shapes or name in args.shapes.split(","):
            rows += shape_steps(name, T, D, F_, E, K, gen, log, args.routing)
            torch.cuda.empty_cache()
    path = result_path(args.out, "layer_steps", info, args.tag)
    write_json(path, dict(command=command_line(argv), machine=info, rows=rows, log=lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
