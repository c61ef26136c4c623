"""MoE expert-compute speed on one GPU: moekit's grouped path against transformers' own
experts implementations, the balanced ``torch.bmm`` bound and the dense bf16 peak, in one run.

    python benchmarks/bench_layer.py [--out DIR] [--quick] [--shapes a,b] [--no-decode] [--no-prefill]

For every prefill shape (OLMoE-like, Qwen3-30B-A3B-like, Mixtral-like, a DeepSeek-V3 slice),
uniform and Zipf(1.2) routing, forward and forward+backward, it times:

- ``hf_eager`` / ``hf_grouped_mm``: ``transformers``' ``OlmoeExperts`` (the fused
  ``[E, 2F, D]`` / ``[E, D, F]`` layout moekit shares) with ``_experts_implementation`` set to
  ``eager`` (a Python loop over experts) and ``grouped_mm`` (sort + ``grouped_mm`` + un-sort);
- ``moekit``: :func:`moekit.experts.grouped.experts_grouped_mm` (the layer's CUDA default);
- ``bmm_bound``: the same FLOPs as a balanced ``torch.bmm`` over ``[E, T*k/E, D]`` with no
  routing at all (every expert gets the same number of tokens, nothing is gathered);
- ``sonic``: SonicMoE (PyPI ``sonic-moe``; CuTe-DSL grouped GEMMs from QuACK with the gather,
  the SwiGLU and the weighted scatter fused in) on the same routing and weights, through its
  ``moe_general_routing_inputs`` entry, with QuACK's default GEMM configuration (its autotuner
  pinned to that one configuration: the tuned mode compiles for minutes per shape). Skipped,
  with a note in the log, where it does not import.

Decode shapes (T in {1, 8, 64}, forward) add ``moekit_graph`` (the same call replayed from a
CUDA graph, as a server runs decode), ``moekit_graph_layers`` (the time of one call inside a
graph of eight calls over four layers' weights: a served model replays all its layers from one
graph, so the graph's launch is not paid per layer, and other layers' weights keep the L2 from
serving this one's), ``moekit_op`` (where the backend takes its decode path:
the same kernels called through the ``moekit::experts_decode`` custom op, which eager calls
skip) and the bound of reading every active expert's weights once at the device-to-device
copy bandwidth measured in the same run.

Useful FLOPs follow DESIGN.md: ``6*T*k*D*F`` forward, 3x for forward+backward. Times are
medians of CUDA-event-timed repetitions run back to back after warm-up (the host is not
synchronised between repetitions, as in a training loop); inputs are random (never zeros).
Prefill contenders other than transformers' are timed in ``--rounds`` interleaved rounds
(default 5, order reversed every other round) and reported as the median of the round medians,
with the per-round figures in ``ms_rounds`` and the SM clock read after each round in
``sm_clock_mhz_rounds`` (where NVML is available). ``ratio_to_bmm_bound`` divides the two
medians; ``ratio_to_bmm_bound_paired`` is the median over rounds of each round's ratio (moekit
and the bound run next to each other in every round, so a clock that moves between rounds
cancels). ``row_tiles_over_bound``: the 128-row tiles the grouped GEMMs run for the routed
counts over the bound's ``T*k/128`` (each expert's last tile is partly empty). ``--profile`` adds, per prefill shape, the
GPU time of every kernel of moekit's and the bound's fwd+bwd step (``torch.profiler``).
Writes ``layer_<gpu>_<date>.json`` with the exact command, versions and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from moekit.experts.grouped import DECODE_MAX_SLOTS, experts_grouped_mm

PREFILL = [  # name, T, D, F, E, K
    ("olmoe", 16384, 2048, 1024, 64, 8),
    ("qwen3_30b_a3b", 16384, 2048, 768, 128, 8),
    ("mixtral", 8192, 4096, 14336, 8, 2),
    ("deepseek_v3_slice", 8192, 7168, 2048, 32, 8),
]
DECODE_MODELS = [("olmoe", 2048, 1024, 64, 8), ("qwen3_30b_a3b", 2048, 768, 128, 8)]
DECODE_T = (1, 8, 64)
ZIPF_S = 1.2


# ------------------------------------------------------------------------------ timing


def time_ms(fn, budget_s: float = 0.6, max_reps: int = 50, warmup: int = 3) -> float:
    """Median CUDA-event time of ``fn()`` in ms, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = int(max(3, min(max_reps, budget_s / max(one, 1e-6))))
    # Back-to-back repetitions, one synchronisation at the end (as in training, where the host
    # runs ahead of the GPU): each event pair times one repetition on the stream.
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


ROUNDS = 5  # default rounds of the close contenders (moekit, the bound, SonicMoE), alternating order
SLOW = ("hf_eager", "hf_grouped_mm")  # 2-40x slower than the rest: timed once


def sm_clock_mhz() -> int | None:
    """The SM clock now (NVML, through ``torch.cuda.clock_rate``), or None where NVML is missing:
    a round that ran at a throttled clock shows up in the result file."""
    try:
        return int(torch.cuda.clock_rate())
    except Exception:
        return None


def interleaved(names: list, rounds: int):
    """``names`` once per round, in alternating order (forward, reversed, forward, ...): a drift
    of the GPU's clocks over the rounds lands on every contender alike."""
    for r in range(rounds):
        yield from (names if r % 2 == 0 else names[::-1])


def time_in_rounds(fns: dict, on_error, rounds: int = ROUNDS, clocks: dict | None = None) -> dict[str, list[float]]:
    """``{impl: [ms per round]}``: the transformers implementations once, the others in
    ``rounds`` rounds in alternating order (forward, reversed, forward, ...), so that a drift of
    the GPU's clocks over the run lands on every contender alike rather than on whichever
    runs last. An implementation that raises is reported through ``on_error`` and left out.
    ``clocks``, if given, receives ``{impl: [SM MHz read after each round]}``."""
    out: dict[str, list[float]] = {}
    close = [k for k in fns if k not in SLOW]
    failed: set[str] = set()
    for impl in [k for k in fns if k in SLOW] + list(interleaved(close, rounds)):
        if impl in failed:
            continue
        slow = impl == "hf_eager"
        # a close contender's budget is split over its rounds
        budget = 0.2 if slow else 0.35 if impl in SLOW else 0.35 / 2
        try:
            ms = time_ms(fns[impl], budget_s=budget, warmup=1 if slow else 3)
        except Exception as e:
            failed.add(impl)
            out.pop(impl, None)
            on_error(impl, e)
            continue
        finally:
            torch.cuda.empty_cache()
        out.setdefault(impl, []).append(ms)
        if clocks is not None:
            clocks.setdefault(impl, []).append(sm_clock_mhz())
    return out


def dense_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, max_reps=30)
    return 2 * 8192 ** 3 / ms / 1e9


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.randn(256 * 2 ** 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), max_reps=30)
    return 2 * src.numel() * 4 / ms / 1e6


# ------------------------------------------------------------------------------ inputs


def routing(T: int, E: int, K: int, kind: str, gen: torch.Generator):
    """``[T, K]`` distinct experts per token (uniform, or Zipf(1.2) via Gumbel top-k) and
    normalised random weights ``[T, K]``."""
    if kind == "zipf":
        logp = -ZIPF_S * torch.log(torch.arange(1, E + 1, device="cuda", dtype=torch.float32))
        logp = logp[torch.randperm(E, device="cuda", generator=gen)]
    else:
        logp = torch.zeros(E, device="cuda")
    gumbel = -torch.log(-torch.log(torch.rand(T, E, device="cuda", generator=gen).clamp_min(1e-20)))
    idx = torch.topk(logp + gumbel, K, dim=1).indices
    w = torch.softmax(torch.randn(T, K, device="cuda", generator=gen), dim=1)
    return idx, w


def make_weights(D, F, E, gen):
    w_in = (torch.randn(E, 2 * F, D, device="cuda", generator=gen) * D ** -0.5).bfloat16()
    w_out = (torch.randn(E, D, F, device="cuda", generator=gen) * F ** -0.5).bfloat16()
    return w_in.requires_grad_(), w_out.requires_grad_()


@dataclasses.dataclass
class PrefillCase:
    """One prefill shape's random inputs, for moekit (``x [T, D]`` routed by ``idx``/``w``) and
    for the balanced bound (``x_EMD [E, T*k/E, D]``, nothing routed), with their output
    gradients ``dy`` / ``dy_EMD``; the two contenders as calls and their differentiable inputs."""

    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    w_in: torch.Tensor
    w_out: torch.Tensor
    dy: torch.Tensor
    x_EMD: torch.Tensor
    dy_EMD: torch.Tensor

    @classmethod
    def make(cls, T, D, F, E, K, kind, gen) -> PrefillCase:
        w_in, w_out = make_weights(D, F, E, gen)
        x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
        idx, w = routing(T, E, K, kind, gen)
        w = w.bfloat16().requires_grad_()
        dy = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        x_EMD = torch.randn(E, T * K // E, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
        dy_EMD = torch.randn(E, T * K // E, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        return cls(x, idx, w, w_in, w_out, dy, x_EMD, dy_EMD)

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.x, self.w, self.w_in, self.w_out]

    @property
    def bound_inputs(self) -> list[torch.Tensor]:
        return [self.x_EMD, self.w_in, self.w_out]

    def moekit(self) -> torch.Tensor:
        return experts_grouped_mm(self.x, self.idx, self.w, self.w_in, self.w_out, "swiglu")

    def bound(self) -> torch.Tensor:
        return bmm_bound_fn(self.x_EMD, self.w_in, self.w_out)

    def steps(self, backward: bool) -> tuple:
        """``(moekit step, bound step)``: forward, or forward+backward to every input."""
        return (step(self.moekit, self.inputs, backward, self.dy),
                step(self.bound, self.bound_inputs, backward, self.dy_EMD))


def hf_experts(impl: str, D, F, E, K, w_in, w_out):
    """transformers' OLMoE experts module sharing moekit's weight tensors."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                      num_hidden_layers=1, num_attention_heads=1, vocab_size=128)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = OlmoeExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(w_in.detach(), requires_grad=True)
    mod.down_proj = torch.nn.Parameter(w_out.detach(), requires_grad=True)
    return mod


def bmm_bound_fn(x_EMD, w_in, w_out):
    h = torch.bmm(x_EMD, w_in.transpose(1, 2))
    g, u = h.chunk(2, dim=-1)
    return torch.bmm(F.silu(g) * u, w_out.transpose(1, 2))


def sonic_status() -> tuple[str | None, str]:
    """``(version, "")`` where SonicMoE (and its CuTe-DSL stack) imports, else ``(None, why)``."""
    try:
        import sonicmoe
    except Exception as e:  # ImportError, or the CUTLASS DSL failing to load its libraries
        return None, f"{type(e).__name__}: {e}"
    return sonicmoe.__version__, ""


def sonic_version() -> str | None:
    return sonic_status()[0]


def pin_quack_default_config() -> None:
    """Make every QuACK GEMM autotuner use QuACK's default configuration for this GPU.

    SonicMoE calls QuACK's GEMMs in their tuned mode, which compiles and times every candidate
    tile configuration on the first call of each shape (minutes). With a single candidate the
    autotuner skips the search, which is what ``tuned=False`` would select."""
    from quack import gemm_interface
    from quack.autotuner import AutotuneConfig

    default = AutotuneConfig(config=gemm_interface.default_config(torch.device("cuda")))
    for obj in vars(gemm_interface).values():
        if isinstance(getattr(obj, "configs", None), list) and hasattr(obj, "fn"):
            obj.configs = [default]


def sonic_fn(x, idx, w, w_in, w_out):
    """SonicMoE's experts on moekit's routing: ``() -> y [T, D]``.

    ``moe_general_routing_inputs`` takes the assignments as (token, expert, score) triples sorted
    by token, ``w1`` as ``[2F, D, E]`` and ``w2`` as ``[D, F, E]`` views (moekit's ``[E, 2F, D]``
    / ``[E, D, F]`` tensors permuted, no copy) and, with ``concat_layout=True``, gate and up
    concatenated as moekit stores them. Its routing metadata is computed inside each call, as
    moekit's sort is."""
    import sonicmoe
    from sonicmoe.enums import ActivationType

    T, K = idx.shape
    token_N = torch.arange(T, device=idx.device, dtype=torch.int32).repeat_interleave(K)
    stream = torch.cuda.current_stream().cuda_stream

    def run():
        out, _ = sonicmoe.moe_general_routing_inputs(
            x, w.reshape(-1), token_N, idx.reshape(-1).to(torch.int32), w_in.permute(1, 2, 0), None,
            w_out.permute(1, 2, 0), None, w_in.shape[0], stream, ActivationType.SWIGLU, False, True)
        return out

    return run


# ------------------------------------------------------------------------------ runs


def agreement(fn_a, fn_b, inputs, dy):
    """Relative Frobenius difference of two implementations' outputs and input gradients."""
    out = []
    for fn in (fn_a, fn_b):
        y = fn()
        out.append([y.detach(), *torch.autograd.grad(y, inputs, dy)])
    names = ("y", "dx", "dweights", "dw_in", "dw_out")
    return [(n, ((a.float() - b.float()).norm() / b.float().norm()).item()) for n, a, b in zip(names, *out)]


def step(fn, inputs, backward: bool, dy):
    if not backward:
        return fn
    return lambda: torch.autograd.grad(fn(), inputs, dy)


def run_prefill(name, T, D, F, E, K, kind, gen, peak, log, sonic: bool = False, rounds: int = ROUNDS):
    c = PrefillCase.make(T, D, F, E, K, kind, gen)
    x, idx, w, w_in, w_out, dy = c.x, c.idx, c.w, c.w_in, c.w_out, c.dy
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    # Row tiles the grouped GEMMs run over the bound's exact T*k/E rows per expert: each expert's
    # last tile of block_m rows is partly empty (the bound's never is).
    from moekit.experts.triton_gmm import DEFAULT_M_CONFIG  # needs Triton: imported where it runs

    block_m = DEFAULT_M_CONFIG.block_m
    row_tiles = (counts + block_m - 1).div(block_m, rounding_mode="floor").sum().item() / (T * K / block_m)
    impls = {"moekit": (c.moekit, c.inputs, dy)}
    for impl in ("grouped_mm", "eager"):
        try:
            mod = hf_experts(impl, D, F, E, K, w_in, w_out)
            impls[f"hf_{impl}"] = (lambda m=mod: m(x, idx, w), [x, w, mod.gate_up_proj, mod.down_proj], dy)
        except Exception as e:  # an older transformers without the class: say so in the file
            log(f"  hf_{impl} unavailable: {e!r}")
    impls["bmm_bound"] = (c.bound, c.bound_inputs, c.dy_EMD)
    if sonic:
        impls["sonic"] = (sonic_fn(x, idx, w, w_in, w_out), [x, w, w_in, w_out], dy)
        log("  sonic vs moekit (rel. Frobenius): " + ", ".join(
            f"{n}={e:.2e}" for n, e in agreement(impls["moekit"][0], impls["sonic"][0], [x, w, w_in, w_out], dy)))
    rows = []
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        flops = 6 * T * K * D * F * (3 if backward else 1)
        clocks: dict = {}
        per_round = time_in_rounds({k: step(fn, inputs, backward, g) for k, (fn, inputs, g) in impls.items()},
                                   lambda impl, e: log(f"  {impl} {mode} failed: {e!r}"), rounds, clocks)
        res = {impl: statistics.median(r) for impl, r in per_round.items()}
        # Per-round ratio to the bound (the two run next to each other in every round, so a clock
        # that moves between rounds cancels out), then the median over rounds.
        paired = {impl: statistics.median(a / b for a, b in zip(r, per_round["bmm_bound"]))
                  for impl, r in per_round.items() if "bmm_bound" in per_round and len(r) == len(per_round["bmm_bound"])}
        for impl, ms in res.items():
            rows.append(dict(shape=name, T=T, D=D, F=F, E=E, K=K, routing=kind, mode=mode, impl=impl, ms=ms,
                             ms_rounds=per_round[impl], sm_clock_mhz_rounds=clocks.get(impl),
                             tflops=flops / ms / 1e9, pct_peak=100 * flops / ms / 1e9 / peak,
                             speedup_vs_hf_grouped_mm=res.get("hf_grouped_mm", float("nan")) / ms,
                             speedup_vs_hf_eager=res.get("hf_eager", float("nan")) / ms,
                             speedup_vs_sonic=res.get("sonic", float("nan")) / ms,
                             ratio_to_bmm_bound=ms / res.get("bmm_bound", float("nan")),
                             ratio_to_bmm_bound_paired=paired.get(impl, float("nan")),
                             row_tiles_over_bound=row_tiles,
                             max_over_mean_tokens=(counts.max() / counts.float().mean()).item()))
        log("  " + f"{name:18s} {kind:7s} {mode:8s} " + "  ".join(f"{k}={v:.3f}" for k, v in res.items()))
    return rows


GRAPH_LAYERS, GRAPH_CALLS = 4, 8


def cuda_graph(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn()`` captured in a CUDA graph, after ``warmup`` calls on a side stream (Triton's
    autotuning and the allocator's first requests stay out of the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def layers_graph_ms(x, idx, w, D, F, E, gen) -> float:
    """Per-call time of ``GRAPH_CALLS`` decode calls captured in one CUDA graph, cycling over
    ``GRAPH_LAYERS`` layers' own weights, as a served model's graph replays its layers.

    A one-call graph also times the graph's launch (a few us, paid once per model step, not
    per layer), and calling one layer's weights back to back would serve part of them from the
    50 MB L2; four layers' active experts (>= 300 MB here) do not fit in it."""
    layers = [tuple(t.detach() for t in make_weights(D, F, E, gen)) for _ in range(GRAPH_LAYERS)]

    def calls():
        for i in range(GRAPH_CALLS):
            w_in, w_out = layers[i % GRAPH_LAYERS]
            experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu")

    graph = cuda_graph(calls, warmup=1)
    ms = time_ms(graph.replay) / GRAPH_CALLS
    del graph, layers
    torch.cuda.empty_cache()
    return ms


def run_decode(name, D, F, E, K, T, kind, gen, copy_gbs, log):
    w_in, w_out = make_weights(D, F, E, gen)
    w_in, w_out = w_in.detach(), w_out.detach()
    x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    idx, w = routing(T, E, K, kind, gen)
    w = w.bfloat16()
    active = int(torch.unique(idx).numel())
    weight_bytes = active * 3 * D * F * 2
    bound_ms = weight_bytes / (copy_gbs * 1e6)
    res = {}
    with torch.no_grad():
        res["moekit"] = time_ms(lambda: experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"))
        if idx.numel() <= DECODE_MAX_SLOTS:  # the same kernels through the custom op's dispatch
            res["moekit_op"] = time_ms(lambda: torch.ops.moekit.experts_decode(x, idx, w, w_in, w_out, "swiglu"))
        try:
            graph = cuda_graph(lambda: experts_grouped_mm(x, idx, w, w_in, w_out, "swiglu"))
            res["moekit_graph"] = time_ms(graph.replay)
        except Exception as e:
            log(f"  moekit_graph failed: {e!r}")
        try:  # a served model replays all its layers from one graph: time a call inside one
            res["moekit_graph_layers"] = layers_graph_ms(x, idx, w, D, F, E, gen)
        except Exception as e:
            log(f"  moekit_graph_layers failed: {e!r}")
        try:  # the per-slot decode kernels at every T (auto uses them up to DECODE_MAX_SLOTS)
            slots = cuda_graph(lambda: torch.ops.moekit.experts_decode(x, idx, w, w_in, w_out, "swiglu"), warmup=2)
            res["moekit_slots_graph"] = time_ms(slots.replay)
        except Exception as e:
            log(f"  moekit_slots_graph failed: {e!r}")
        for impl in ("grouped_mm", "eager"):
            try:
                mod = hf_experts(impl, D, F, E, K, w_in, w_out)
                res[f"hf_{impl}"] = time_ms(lambda m=mod: m(x, idx, w))
            except Exception as e:
                log(f"  hf_{impl} failed: {e!r}")
    flops = 6 * T * K * D * F
    log(f"  decode {name:14s} T={T:<3d} {kind:7s} bound={bound_ms:.4f} " + "  ".join(f"{k}={v:.4f}" for k, v in res.items()))
    return [dict(shape=f"{name}_decode", T=T, D=D, F=F, E=E, K=K, routing=kind, mode="fwd", impl=impl, ms=ms,
                 tflops=flops / ms / 1e9, active_experts=active, weight_bytes=weight_bytes,
                 weight_read_bound_ms=bound_ms, ratio_to_weight_read_bound=ms / bound_ms,
                 achieved_gbs=weight_bytes / ms / 1e6,
                 speedup_vs_hf_grouped_mm=res.get("hf_grouped_mm", float("nan")) / ms,
                 speedup_vs_hf_eager=res.get("hf_eager", float("nan")) / ms) for impl, ms in res.items()]


# ------------------------------------------------------------------------------ output


def kernel_times(fn, steps: int = 5) -> list[tuple[str, float, int]]:
    """``[(kernel name, GPU ms per step, launches per step)]`` of ``fn()``, largest first
    (``torch.profiler``, after warm-up). Kernel time, not wall time: idle gaps between kernels
    (host-bound stretches) do not count."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            t = totals.setdefault(ev.name, [0.0, 0])
            t[0] += ev.device_time_total / 1e3 / steps
            t[1] += 1
    return sorted(((k, v[0], v[1] // steps) for k, v in totals.items()), key=lambda r: -r[1])


def profile_shape(name, T, D, F_, E, K, path: str) -> dict:
    """Per-kernel GPU time of moekit's and the bound's fwd+bwd step on one prefill shape
    (uniform routing), written to ``path`` as a table; returns the two kernel lists."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    fns = dict(zip(("moekit", "bmm_bound"), PrefillCase.make(T, D, F_, E, K, "uniform", gen).steps(True)))
    out = {impl: kernel_times(fn) for impl, fn in fns.items()}
    with open(path, "w") as f:
        for impl, rows in out.items():
            f.write(f"{impl} {name} fwd+bwd, uniform routing: {sum(r[1] for r in rows):.3f} ms of kernel time per step\n")
            f.writelines(f"  {ms:8.3f} ms  x{n:<3d} {k[:110]}\n" for k, ms, n in rows)
            f.write("\n")
    return {impl: [dict(kernel=k, ms=ms, launches=n) for k, ms, n in rows] for impl, rows in out.items()}


def machine_info() -> dict:
    import triton
    import transformers

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        driver = "unknown"
    return dict(gpu=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=props.total_memory / 2 ** 30,
                driver=driver, torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                transformers=transformers.__version__, sonic_moe=sonic_version(), python=platform.python_version(), host=platform.node())


def gpu_slug(info: dict) -> str:
    """Short GPU name for result file names: ``h100``, ``h200`` or the last word of the name."""
    gpu = info["gpu"]
    return "h100" if "H100" in gpu else "h200" if "H200" in gpu else gpu.split()[-1].lower()


def print_table(rows):
    head = (f"{'shape':22s} {'routing':7s} {'mode':8s} {'impl':18s} {'ms':>9s} {'TFLOP/s':>8s} {'%peak':>6s} "
            f"{'vs hf_gmm':>9s} {'vs eager':>8s} {'vs sonic':>8s} {'/bound':>7s} {'paired':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        bound = r.get("ratio_to_bmm_bound", r.get("ratio_to_weight_read_bound", float("nan")))
        print(f"{r['shape']:22s} {r['routing']:7s} {r['mode']:8s} {r['impl']:18s} {r['ms']:9.4f} {r['tflops']:8.1f} "
              f"{r.get('pct_peak', float('nan')):6.1f} {r['speedup_vs_hf_grouped_mm']:9.2f} {r['speedup_vs_hf_eager']:8.2f} "
              f"{r.get('speedup_vs_sonic', float('nan')):8.2f} {bound:7.3f} "
              f"{r.get('ratio_to_bmm_bound_paired', float('nan')):7.3f}"
              + (f"  T={r['T']}" if "decode" in r["shape"] else ""))


def run_log() -> tuple:
    """``(log, lines)``: ``log(msg)`` prints at once and keeps the line for the result file."""
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    return log, lines


def result_path(out: str, what: str, info: dict, tag: str) -> str:
    """``<out>/<what>_<gpu>_<date>[_<tag>].json`` (the folder is made)."""
    os.makedirs(out, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    return os.path.join(out, f"{what}_{gpu_slug(info)}_{datetime.date.today().isoformat()}{suffix}.json")


def command_line(argv) -> str:
    """The command as run, for the result file."""
    return "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])


def write_json(path: str, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for layer_<gpu>_<date>.json")
    p.add_argument("--quick", action="store_true", help="OLMoE prefill and T=1 decode only")
    p.add_argument("--shapes", default="", help="comma-separated prefill shape names (default: all)")
    p.add_argument("--profile", action="store_true",
                   help="also write each prefill shape's kernel-time breakdown (moekit and the bound, fwd+bwd)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds of the close contenders (>= 1)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode shapes")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill shapes")
    p.add_argument("--no-sonic", action="store_true", help="skip the SonicMoE column")
    p.add_argument("--tag", default="", help="suffix of the result file name (layer_<gpu>_<date>_<tag>.json)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    if not torch.cuda.is_available():
        print("bench_layer: error: needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    log, lines = run_log()
    gen = torch.Generator(device="cuda").manual_seed(0)
    peak, copy_gbs = dense_peak_tflops(), copy_bandwidth_gbs()
    log(f"dense bf16 peak {peak:.1f} TFLOP/s, copy bandwidth {copy_gbs:.0f} GB/s")
    shapes = [s for s in PREFILL if not args.no_prefill and (not args.shapes or s[0] in args.shapes.split(","))]
    if args.quick:
        shapes = shapes[:1]
    info = machine_info()
    slug = gpu_slug(info)
    path = result_path(args.out, "layer", info, args.tag)
    version, why = sonic_status() if not args.no_sonic else (None, "--no-sonic")
    if version is None:
        log(f"sonic: column skipped, SonicMoE does not import here ({why})")
    else:
        pin_quack_default_config()
        log(f"sonic: SonicMoE {version}, QuACK default GEMM configuration")
    rows, profiles = [], {}

    def save():  # after every shape, so that a run cut short still leaves its figures
        write_json(path, dict(command=command_line(argv),
                              machine=info, dense_bf16_peak_tflops=peak, copy_bandwidth_gbs=copy_gbs,
                              flops_definition="6*T*k*D*F forward, 3x for forward+backward (DESIGN.md)",
                              rows=rows, kernel_profiles=profiles, log=lines))

    for name, D, F_, E, K in DECODE_MODELS[: 0 if args.no_decode else 1 if args.quick else None]:
        for T in DECODE_T[: 1 if args.quick else None]:
            for kind in ("uniform", "zipf"):
                rows += run_decode(name, D, F_, E, K, T, kind, gen, copy_gbs, log)
        save()
    for name, T, D, F_, E, K in shapes:
        for kind in ("uniform", "zipf"):
            rows += run_prefill(name, T, D, F_, E, K, kind, gen, peak, log, sonic=version is not None,
                                rounds=args.rounds)
        if args.profile:
            profiles[name] = profile_shape(name, T, D, F_, E, K,
                                           os.path.join(args.out, f"layer_profile_{name}_{slug}{'_' + args.tag if args.tag else ''}.txt"))
        save()
    print_table(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
