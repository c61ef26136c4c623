"""Expert parallelism: forward+backward throughput per GPU and all-to-all time, EP=1 vs EP=P,
balanced vs Zipf-skewed routing, with and without a placement plan from moekit.placement.

    python benchmarks/bench_ep.py [--world 2] [--eps 1,2] [--out DIR] [--quick] [--device cpu]

Spawns ``--world`` processes (one per GPU, NCCL; or gloo on CPU for a smoke run). For every
model shape and EP size ``P`` dividing the world (consecutive ranks form an EP group), each
rank holds ``T`` tokens (weak scaling: tokens per GPU fixed) and times the routed-expert path
``y = experts(x, indices, weights); y.backward(dy)``:

- ``EP=1``: :class:`moekit.experts.GroupedExperts` with all ``E`` experts on every GPU (the
  layer's CUDA default backend), no communication;
- ``EP=P``: :class:`moekit.parallel.ExpertParallelExperts` (dispatch all-to-all, local experts
  on the same backend, combine all-to-all, autograd through both; replica gradients summed),
  with the deduplicated dispatch (default: each token once per destination rank) and, for
  balanced routing, also the simple one-row-per-assignment dispatch (``no-dedup``) and, for
  balanced routing and the plan without replicas, the fixed-size sync-free dispatch
  (``fixed``: ``max_tokens_per_rank = T``, every rank's rows to every rank, no host sync), and
  the deduplicated dispatch with this rank's own tokens computed on a side CUDA stream beside
  the exchange of the others (``overlap``: :mod:`moekit.parallel.overlap`), with the
  deduplicated exchange and with the fixed-size one (``overlap fixed``: no host sync).
  ``--variants`` picks them; ``fixed`` / ``overlap`` / ``overlap_fixed`` take the options
  ``:cN`` (the layer's GEMMs leave ``N`` SMs to the NCCL kernels, ``sm_carveout=N``) and
  ``:hp`` (the EP group's NCCL streams at high priority), and the overlap modes ``:rf``
  (``remote_first``: the exchanged rows' path on a high-priority stream), and the fixed-size
  modes ``:ce`` (their exchanges on the GPUs' copy engines, ``transport="copy_engine"``), and
  the overlap modes ``:nj`` (no weight-gradient join: autograd adds the two expert calls'
  weight gradients, as before ``join_weight_grads``), and ``overlap_fixed`` ``:of`` (the own
  rows' expert call launched before the exchange, ``own_first=True``), e.g.
  ``overlap_fixed:c16:hp:rf``, ``overlap_fixed:ce:rf:nj`` or ``overlap_fixed:ce:rf:of``.

Routing is synthetic so that its skew is controlled: ``balanced`` gives every expert exactly
``T*k/E`` assignments on every rank; ``zipf`` samples ``k`` distinct experts per token with
``p_e ~ 1/rank_e^s`` (expert popularity in a fixed random order). ``zipf+plan`` uses
``moekit.placement.plan`` made from the counts of *another* sample of the same distribution,
scored and timed on the measured one, twice: with replicas (``R = E + E/4`` slots, EPLB
style; in training their gradients must be summed) and without (``R = E``: the experts are
only rearranged over the GPUs). The plan is applied to a running layer with
:func:`moekit.parallel.apply_plan` (bytes moved are reported).

Figures: median step time over ranks' CUDA-event timings (the slowest rank sets the pace;
``fwd_ms`` the same for a forward alone under ``no_grad``, as a server runs it; with replicas
the step includes their gradient all-reduce, also timed alone as ``replica_grad_sync_ms``,
and ``step_ms_sync_once_per_4_micro`` is the step time per micro-batch when the gradients of
4 micro-batches accumulate before the one replica sum of the optimizer step),
``compute_only_ms_one_call`` / ``_two_calls`` / ``_two_calls_joined`` (the balanced row of
the first fixed-size variant of ``--variants``): this rank's expert work of a step with no
communication (one call over the group's rows as ``fixed`` computes them; two calls, own
rows and the others', as ``overlap fixed`` does, one backward through both, their weight
gradients added by autograd or joined by :mod:`moekit.experts.join`), so EP=1's step time
over it is the weak scaling the mode could reach if communication and synchronisation were
free; ``step_ms_back_to_back`` the mean over the steps queued without a sync between
them (the host runs ahead of the GPU as in a training loop; ``step_ms`` waits for every
step, so it also counts the GPU idling while the host launches the start of a step),
``host_launch_ms`` / ``host_fwd_launch_ms`` / ``fwd_only_host_launch_ms`` the host's time to
launch one synced step / its forward / a forward under ``no_grad`` (medians, slowest rank),
tokens/s per GPU, useful TFLOP/s per GPU (``18*T*k*D*F`` for forward+backward, DESIGN.md)
and the fraction of the dense bf16 peak; ``a2a_ms``: the four all-to-alls of a step (dispatch
and combine, forward and backward) timed alone with the same split sizes. Goals: EP=2 weak
scaling (balanced, EP=2 over EP=1 tokens/s per GPU) >= 85%; zipf+plan >= 90% of balanced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [  # name, T per GPU, D, F, E, K
    ("olmoe_like", 16384, 2048, 1024, 64, 8),
    ("deepseek_v3_slice", 8192, 7168, 2048, 32, 8),
    ("mixtral_like", 8192, 4096, 14336, 8, 2),
]
QUICK_SHAPES = [("tiny", 256, 64, 32, 8, 2)]
ZIPF_S = 1.2
MICRO = 4  # micro-batches per optimizer step in the gradient-accumulation row
PEAK_BF16_TFLOPS = 989.4  # H100/H200 SXM dense bf16


# ------------------------------------------------------------------------------ routing


def balanced_routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """``[T, k]`` distinct experts per token, every expert exactly ``T*k/E`` times (when it divides).

    Token ``t`` takes the window ``(t*k + j) mod E`` of a fixed random permutation of the
    experts, so a token's experts are spread over the EP ranks as with learned routing (with
    consecutive expert ids they would mostly share one rank, which flatters deduplication).
    """
    slots = torch.arange(num_tokens * top_k) % num_experts  # t*k + j mod E: distinct within a row
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(3))
    idx = perm[slots].view(num_tokens, top_k)
    return idx[torch.randperm(num_tokens, generator=gen)]


def zipf_routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator,
                 popularity: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` distinct experts per token, Gumbel-top-k of ``log p``, ``p ~ 1/rank^s``."""
    logp = -ZIPF_S * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))[popularity]
    gumbel = -torch.log(-torch.log(torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64)))
    return torch.topk(logp + gumbel, top_k, dim=1).indices


def rank_routing(shape, routing: str, rank: int) -> torch.Tensor:
    """``[T, k]`` the routing rank ``rank`` uses in every case of ``shape`` (any rank can
    rebuild any other's)."""
    _, num_tokens, _, _, num_experts, top_k = shape
    gen = torch.Generator().manual_seed(1000 + rank)
    if routing == "balanced":
        return balanced_routing(num_tokens, num_experts, top_k, gen)
    popularity = torch.randperm(num_experts, generator=torch.Generator().manual_seed(7))
    return zipf_routing(num_tokens, num_experts, top_k, gen, popularity)


# ------------------------------------------------------------------------------ timing


def _timed(fn, device, iters: int, warmup: int, host_ms: list | None = None) -> float:
    """Median ms of ``fn()`` on this rank (CUDA events on GPU, perf_counter on CPU).
    host_ms: if given, the median host time of the calls (until ``fn`` returns, before the
    sync: on CUDA the time the host needs to launch one step) is appended to it."""
    for _ in range(warmup):
        fn()
    times, host = [], []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            host.append(times[-1])
    if host_ms is not None:
        host_ms.append(statistics.median(host))
    return statistics.median(times)


def _timed_back_to_back(fn, device, iters: int, warmup: int) -> float:
    """Mean ms of ``fn()`` over ``iters`` calls queued back to back with one sync at the end,
    as a training loop runs layer after layer: the host may run ahead of the GPU, so launch
    latency at the start of a call is hidden wherever nothing forces a sync (unlike
    :func:`_timed`, which waits for every call and so also counts the GPU idling at its start)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _max_over(value: float, device, group=None) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


# ------------------------------------------------------------------------------ variants

BASE_VARIANTS = ("plain", "fixed", "overlap", "overlap_fixed")


def parse_variant(label: str) -> dict:
    """``base[:cN][:hp][:rf][:ce][:nj][:of]`` -> settings. base: ``plain`` (Zipf without and with plans, and the
    per-assignment dispatch, all deduplicated otherwise), ``fixed`` (fixed-size sync-free
    dispatch), ``overlap`` (own tokens on a side stream beside the deduplicated exchange),
    ``overlap_fixed`` (both); ``cN``: the layer's GEMMs leave ``N`` SMs free
    (``sm_carveout=N``); ``hp``: the EP group's NCCL streams at high priority; ``rf``
    (overlap modes): the exchanged rows' path on a high-priority stream (``remote_first``);
    ``ce`` (fixed-size modes): the exchanges on the copy engines (``transport="copy_engine"``);
    ``nj`` (overlap modes): the two expert calls' weight gradients added by autograd
    (``join_weight_grads=False``); ``of`` (``overlap_fixed``): the own rows' expert call
    launched before the exchange (``own_first=True``)."""
    base, *opts = label.split(":")
    out = {"label": label, "fixed": "fixed" in base, "overlap": base.startswith("overlap"), "sm_carveout": None,
           "high_priority": False, "remote_first": False, "transport": "all_to_all", "join_weight_grads": True,
           "own_first": False}
    if base not in BASE_VARIANTS:
        raise ValueError(f"--variants: unknown dispatch {base!r} in {label!r}; expected one of {BASE_VARIANTS}")
    for opt in opts:
        if opt == "hp":
            out["high_priority"] = True
        elif opt == "rf" and out["overlap"]:
            out["remote_first"] = True
        elif opt == "ce" and out["fixed"]:
            out["transport"] = "copy_engine"
        elif opt == "nj" and out["overlap"]:
            out["join_weight_grads"] = False
        elif opt == "of" and out["overlap"] and out["fixed"]:
            out["own_first"] = True
        elif opt[:1] == "c" and opt[1:].isdigit():
            out["sm_carveout"] = int(opt[1:])
        else:
            raise ValueError(f"--variants: unknown option {opt!r} in {label!r}; expected cN (SM carveout), hp, "
                             f"rf / nj (overlap modes only), ce (fixed-size modes only) or of (overlap_fixed only)")
    if base == "plain" and opts:
        raise ValueError(f"--variants: {label!r}: options apply to fixed / overlap / overlap_fixed only")
    return out


# ------------------------------------------------------------------------------ one case


def _step_fn(module, x, idx, w, dy, is_ep, micro_batches: int = 1, host_fwd_ms: list | None = None):
    """One optimizer step's gradient work: ``micro_batches`` forward+backward passes
    (gradients accumulate), then the replica gradient sum once (as ``reduce_gradients`` is
    called once per optimizer step). host_fwd_ms: if given, each call appends the host time
    from its start until the (first) forward returned, ms."""
    def step():
        t0 = time.perf_counter()
        for p in module.parameters():
            p.grad = None
        x.grad = w.grad = None
        for i in range(micro_batches):
            y = module(x, idx, w)
            if i == 0 and host_fwd_ms is not None:
                host_fwd_ms.append((time.perf_counter() - t0) * 1e3)
            y.backward(dy)
        if is_ep:
            module.reduce_replica_grads()
    return step


def _a2a_ms(module, idx, x, device, iters, warmup) -> tuple[float, int]:
    """Time of the step's four all-to-alls alone (same splits) and the bytes this rank sends
    to other ranks per step."""
    from moekit.parallel import all_to_all, assignment_slots, dispatch_order, exchange_counts, row_dispatch

    if module.overlap and module.max_tokens_per_rank is not None:  # C rows to every other rank
        counts = torch.full((module.num_ranks, 1), module.max_tokens_per_rank, device=x.device, dtype=torch.long)
        counts[module.rank] = 0
        rows = torch.arange(x.shape[0], device=x.device).repeat(module.num_ranks - 1)
    elif module.overlap:  # deduplicated rows for the other ranks only
        from moekit.parallel.overlap import remote_rows

        rr = remote_rows(assignment_slots(idx, module.tables, module.rank), module.rank, module.num_ranks,
                         module.slots_per_rank)
        counts, rows = rr.send_counts_P2[:, :1], rr.token_ids_V
    elif module.max_tokens_per_rank is not None:  # fixed: every rank's C rows to every rank
        counts = torch.full((module.num_ranks, 1), module.max_tokens_per_rank, device=x.device, dtype=torch.long)
        rows = torch.arange(x.shape[0], device=x.device).repeat(module.num_ranks)
    elif module.dedup:  # one row per (token, destination rank)
        slot_TK = assignment_slots(idx, module.tables, module.rank)
        disp = row_dispatch(slot_TK, module.num_ranks, module.slots_per_rank)
        counts, rows = disp.send_counts_P2[:, :1], disp.token_ids_V
    else:  # one row per assignment
        order = dispatch_order(idx, module.tables, module.num_ranks, module.rank)
        counts, rows = order.send_counts_PS.sum(1, keepdim=True), order.token_ids_N
    recv = exchange_counts(counts.contiguous(), module.group)
    send_splits, recv_splits = torch.cat([counts.t(), recv.t()]).tolist()
    x_send = x.detach()[rows[:sum(send_splits)]]

    def four():
        for _ in range(2):  # forward and backward each run a dispatch and a combine all-to-all
            if module.exchange is not None:  # the copy engines: gather x's rows, swap them back
                include_self = not module.overlap
                sent = module.exchange.run([x.detach()], include_self, gather=True)[0]
                back = module.swap_fixed(include_self, sent)
            else:
                back = all_to_all(all_to_all(x_send, recv_splits, send_splits, module.group), send_splits,
                                  recv_splits, module.group)
        return back

    ms = _timed(four, device, iters, warmup)
    remote_rows = sum(n for p, n in enumerate(send_splits) if p != module.rank)
    return ms, 4 * remote_rows * x.shape[1] * x.element_size()


def _compute_only_ms(module, shape, routing, rank, device, dtype, iters, warmup) -> tuple[float, float, float]:
    """This rank's expert work per fwd+bwd step in the fixed-size modes with no communication
    at all (the other ranks' routing is rebuilt locally): one call over the group's ``P * C``
    rows (as ``fixed`` computes them) and two calls, this rank's rows then the others' (as
    ``overlap fixed`` does, one stream, one backward through both), their weight gradients
    added by autograd, and joined (:mod:`moekit.experts.join`). ms, this rank."""
    from moekit.experts.join import WeightGradJoin
    from moekit.parallel import assignment_slots
    from moekit.parallel.dispatch import local_slots

    num_tokens, dim, top_k = shape[1], shape[2], shape[5]
    first = rank - module.rank
    slots = [local_slots(assignment_slots(rank_routing(shape, routing, first + q).to(device), module.tables, q,
                                          module.replicated), module.rank, module.slots_per_rank)
             for q in range(module.num_ranks)]
    own_TK = slots[module.rank]
    rest_QK = torch.cat([t for q, t in enumerate(slots) if q != module.rank])
    rows = module.num_ranks * num_tokens
    x = torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.softmax(torch.randn(rows, top_k, device=device), -1).to(dtype).requires_grad_()
    dy = torch.randn(rows, dim, device=device, dtype=dtype)
    x_own, x_rest = x.detach()[:num_tokens].requires_grad_(), x.detach()[num_tokens:].requires_grad_()
    w_own, w_rest = w.detach()[:num_tokens].requires_grad_(), w.detach()[num_tokens:].requires_grad_()

    def one_call():
        for p in module.parameters():
            p.grad = None
        module.local(x, torch.cat([own_TK, rest_QK]), w).backward(dy)

    def two_calls(joined: bool):
        def run():
            for p in module.parameters():
                p.grad = None
            join = WeightGradJoin() if joined else None
            y_own = module.local_call(x_own, own_TK, w_own, join)
            y_rest = module.local_call(x_rest, rest_QK, w_rest, join)
            torch.autograd.backward([y_own, y_rest], [dy[:num_tokens], dy[num_tokens:]])
        return run

    return (_timed(one_call, device, iters, warmup), _timed(two_calls(False), device, iters, warmup),
            _timed(two_calls(True), device, iters, warmup))


def _profile(step, device, path: str | None) -> None:
    """Profile a few synced steps (every rank runs them: they are collective); rank 0 writes
    the operator table sorted by device time to ``path`` and, on CUDA, where each step's GPU
    time went (:mod:`ep_trace`: SM busy, SM idle waiting for the host's launches or for
    something else, the longest idle stretches) to ``<path minus .txt>_timeline.txt``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from ep_trace import STEP, format_timelines, step_timelines

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            with record_function(STEP):  # the range ends after the step's GPU work, as a synced step
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
    if path:
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=60))
            if device.type == "cuda":  # where the host time goes (the GPU idles when the host lags)
                f.write("\n\nSorted by host (CPU) time:\n")
                f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        if device.type == "cuda":
            fd, tmp = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            try:  # a diagnostic: a trace it cannot read must not stop the collective run of every rank
                prof.export_chrome_trace(tmp)
                with open(tmp) as f:
                    text = format_timelines(os.path.basename(path), step_timelines(json.load(f)))
            except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
                text = f"{os.path.basename(path)}: the trace could not be read: {e!r}\n"
            finally:
                os.remove(tmp)
            with open(path[:-4] + "_timeline.txt" if path.endswith(".txt") else path + "_timeline.txt", "w") as f:
                f.write(text)


def run_case(shape, ep, routing, plan_rows, groups, device, dtype, iters, warmup, rank, world,
             dedup: bool = True, profile_path: str | None = None, variant: dict | None = None) -> dict:
    """One row: ``variant`` (:func:`parse_variant`, ``None`` = the deduplicated default) picks
    the dispatch, the SM carveout and which of ``groups`` (``{"normal"|"hp": {ep: [groups]}}``)
    the layer uses."""
    from moekit.experts import ExpertsConfig, GroupedExperts
    from moekit.metrics import balancedness
    from moekit.parallel import ExpertParallelExperts, apply_plan

    name, num_tokens, dim, ffn, num_experts, top_k = shape
    cfg = ExpertsConfig(dim, ffn, num_experts)
    idx = rank_routing(shape, routing, rank)
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts).to(device)
    variant = variant or parse_variant("plain") | {"label": ""}
    fixed, overlap = variant["fixed"], variant["overlap"]
    group = groups["hp" if variant["high_priority"] else "normal"][ep][rank // ep] if ep > 1 else None
    if ep > 1:
        dist.all_reduce(counts, group=group)
    idx = idx.to(device)
    x = torch.randn(num_tokens, dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.softmax(torch.randn(num_tokens, top_k, device=device), -1).to(dtype).requires_grad_()
    dy = torch.randn(num_tokens, dim, device=device, dtype=dtype)
    row = {"shape": name, "T_per_gpu": num_tokens, "D": dim, "F": ffn, "E": num_experts, "k": top_k,
           "ep": ep, "routing": routing, "plan": plan_rows is not None, "dedup": dedup if ep > 1 else None,
           "fixed": fixed, "overlap": overlap, "variant": variant["label"] if ep > 1 else "",
           "sm_carveout": variant["sm_carveout"], "nccl_high_priority": variant["high_priority"],
           "remote_first": variant["remote_first"], "transport": variant["transport"],
           "join_weight_grads": variant["join_weight_grads"] if ep > 1 and overlap else None,
           "own_first": variant["own_first"] if ep > 1 and overlap else None}
    with torch.device(device):  # allocate (and randomly initialise) the weights on the device
        if ep == 1:
            module = GroupedExperts(cfg).to(dtype)
        else:
            layout = None if plan_rows is None else plan_rows[0]
            module = ExpertParallelExperts(cfg, group, layout, dedup=dedup,
                                           max_tokens_per_rank=num_tokens if fixed else None,
                                           overlap=overlap, sm_carveout=variant["sm_carveout"],
                                           remote_first=variant["remote_first"],
                                           transport=variant["transport"],
                                           join_weight_grads=variant["join_weight_grads"],
                                           own_first=variant["own_first"]).to(dtype)
    if ep > 1:
        if plan_rows is not None:
            skew_p2l = plan_rows[1]
            t0 = time.perf_counter()
            report = apply_plan(module, skew_p2l[None])
            if device.type == "cuda":
                torch.cuda.synchronize()
            row.update(apply_plan_s=_max_over(time.perf_counter() - t0, device, group), moves=report.moves,
                       bytes_moved=report.bytes_total, slots=int(skew_p2l.shape[0]),
                       extra_slots=int(skew_p2l.shape[0]) - num_experts)
        row["balancedness"] = balancedness(counts.cpu()[None], module.phy2log.cpu()[None], ep)
    if profile_path is not None:
        _profile(_step_fn(module, x, idx, w, dy, ep > 1), device, profile_path)
    host, host_fwd = [], []
    step_ms = _timed(_step_fn(module, x, idx, w, dy, ep > 1, host_fwd_ms=host_fwd), device, iters, warmup, host)
    row["rank_step_ms"] = step_ms
    row["step_ms"] = _max_over(step_ms, device)
    # the host's time to launch a synced step (and its forward): where it exceeds the GPU's
    # work queued so far, the GPU waits for it
    row["host_launch_ms"] = _max_over(host[0], device)
    row["host_fwd_launch_ms"] = _max_over(statistics.median(host_fwd[-iters:]), device)
    b2b_ms = _timed_back_to_back(_step_fn(module, x, idx, w, dy, ep > 1), device, iters, 2)
    row["step_ms_back_to_back"] = _max_over(b2b_ms, device)
    row["tokens_per_s_per_gpu_back_to_back"] = num_tokens / (row["step_ms_back_to_back"] / 1e3)
    with torch.no_grad():  # inference: forward only
        host = []
        row["fwd_ms"] = _max_over(_timed(lambda: module(x, idx, w), device, iters, warmup, host), device)
        row["fwd_only_host_launch_ms"] = _max_over(host[0], device)
    row["fwd_tokens_per_s_per_gpu"] = num_tokens / (row["fwd_ms"] / 1e3)
    if ep > 1 and module.replicated:  # training with replicas: their gradient all-reduce
        row["replica_grad_sync_ms"] = _max_over(_timed(module.reduce_replica_grads, device, iters, warmup), device)
        # gradient accumulation: the replica sum once per optimizer step of MICRO micro-batches
        accum_ms = _timed(_step_fn(module, x, idx, w, dy, True, MICRO), device, max(iters // 2, 3), 2)
        row[f"step_ms_sync_once_per_{MICRO}_micro"] = _max_over(accum_ms, device) / MICRO
    if ep > 1 and routing == "balanced" and plan_rows is None and variant.get("compute_only"):
        one, two, joined = _compute_only_ms(module, shape, routing, rank, device, dtype, iters, warmup)
        row["compute_only_ms_one_call"] = _max_over(one, device)
        row["compute_only_ms_two_calls"] = _max_over(two, device)
        row["compute_only_ms_two_calls_joined"] = _max_over(joined, device)
    if ep > 1:
        a2a_ms, remote_bytes = _a2a_ms(module, idx, x, device, iters, warmup)  # plain launches: no carveout
        row["a2a_ms"] = _max_over(a2a_ms, device)
        row["a2a_remote_bytes_per_rank"] = remote_bytes
    flops = 18.0 * num_tokens * top_k * dim * ffn
    row["tokens_per_s_per_gpu"] = num_tokens / (row["step_ms"] / 1e3)
    row["tflops_per_gpu"] = flops / (row["step_ms"] / 1e3) / 1e12
    if device.type == "cuda":
        row["fraction_of_bf16_peak"] = row["tflops_per_gpu"] / PEAK_BF16_TFLOPS
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def make_plans(shape, ep, extra_per_gpu, world) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A plan for uniform load (the layout in service) and one from the counts of another Zipf
    sample (over all ranks' tokens), both with ``R = E + ep*extra_per_gpu`` slots."""
    import moekit.placement as placement

    name, num_tokens, dim, ffn, num_experts, top_k = shape
    popularity = torch.randperm(num_experts, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(99)
    sample = zipf_routing(num_tokens * world, num_experts, top_k, gen, popularity)
    load = torch.bincount(sample.reshape(-1), minlength=num_experts).double().numpy()[None]
    cfg = placement.PlacementConfig(num_replicas=num_experts + ep * extra_per_gpu, num_gpus=ep)
    uniform = placement.plan(np.ones_like(load), cfg)
    skew = placement.plan(load, cfg, previous=uniform)
    return uniform.phy2log[0], skew.phy2log[0], skew.balancedness


# ------------------------------------------------------------------------------ driver


def worker(rank: int, args) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.world,
                            device_id=device if device.type == "cuda" else None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    eps = [ep for ep in args.eps if args.world % ep == 0]
    variants = [parse_variant(v) for v in args.variants]
    first_fixed = next((v for v in variants if v["fixed"]), None)
    if first_fixed:  # the compute-only ceilings (no communication: the same for every fixed-size variant)
        first_fixed["compute_only"] = True

    def make_groups(high_priority: bool) -> dict:
        # high priority: NCCL's blocks are scheduled before queued GEMM blocks as SMs free up
        opts = None
        if high_priority and device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        return {ep: [dist.new_group(list(range(g, g + ep)), pg_options=opts) for g in range(0, args.world, ep)]
                for ep in eps if ep > 1}

    groups = {"normal": make_groups(args.nccl_high_priority)}
    groups["hp"] = (make_groups(True) if any(v["high_priority"] for v in variants) and not args.nccl_high_priority
                    else groups["normal"])
    rows = []
    for shape in (QUICK_SHAPES if args.quick else SHAPES):
        if args.shapes and shape[0] not in args.shapes:
            continue
        for ep in eps:
            if shape[4] % ep:
                continue
            plain = next((v for v in variants if v["label"] == "plain"), None)
            cases = [("balanced", None, True, None)]  # EP=1, and the EP=P deduplicated anchor
            if (ep == 1 or plain) and not args.balanced_only:
                cases.append(("zipf", None, True, None if ep == 1 else plain))
            planned_bal = {}
            if ep > 1 and args.balanced_only:  # weak scaling only: no Zipf rows, no plans
                cases += [("balanced", None, True, v) for v in variants if v["label"] != "plain"]
            elif ep > 1:
                # a plan with replicas (R = E + E/4 slots, EPLB-style) and one that only
                # rearranges the experts (R = E: no replica gradients to sum in training)
                plans = {}
                for extra in (max(1, shape[4] // (4 * ep)), 0):
                    uniform, skew, planned_bal[extra * ep] = make_plans(shape, ep, extra, args.world)
                    plans[extra] = (uniform, skew)
                    if plain:
                        cases.append(("zipf", (uniform, skew), True, plain))
                if plain:
                    cases.append(("balanced", None, False, plain))
                # every other variant: balanced, and Zipf with the plan without replicas (R = E);
                # --skew-cases: also Zipf without a plan and with the plan with replicas
                for v in variants:
                    if v["label"] != "plain":
                        cases += [("balanced", None, True, v), ("zipf", plans[0], True, v)]
                        if args.skew_cases:
                            cases += [("zipf", None, True, v), ("zipf", plans[max(plans)], True, v)]
            for routing, plan_rows, dedup, variant in cases:
                prof = None
                label = variant["label"] if variant else ""
                if (args.profile and routing == "balanced" and dedup and plan_rows is None
                        and (ep == 1 or not variant or variant["overlap"])):  # EP=1, EP=P dedup, overlap modes
                    suffix = f"_{label.replace(':', '_')}" if label else ""
                    prof = os.path.join(args.out, f"ep_profile_{shape[0]}_ep{ep}{suffix}.txt") if rank == 0 else ""
                row = run_case(shape, ep, routing, plan_rows, groups, device, dtype, args.iters, args.warmup,
                               rank, args.world, dedup, prof, variant)
                if plan_rows is not None:
                    row["plan_balancedness_on_planning_sample"] = planned_bal[row["extra_slots"]]
                rows.append(row)
                if rank == 0:
                    print(_fmt(row), flush=True)
    if rank == 0:
        _write(rows, args, device)
    dist.barrier()
    dist.destroy_process_group()


def _plan_label(row: dict) -> str:
    return f"+plan R=E+{row['extra_slots']}" if row["plan"] else ""


def _row_label(row: dict, sep: str) -> str:
    """``EP=P``, routing, plan, dispatch variant, joined by ``sep`` (rows of earlier result
    files carry only the ``fixed`` / ``overlap`` flags)."""
    variant = row.get("variant")
    if variant is None:
        variant = " ".join(name for name in ("fixed", "overlap") if row.get(name))
    parts = [f"EP={row['ep']}", row["routing"]]
    if row["plan"]:
        parts.append(_plan_label(row)[1:])
    if row["dedup"] is False:
        parts.append("no-dedup")
    if variant and variant != "plain":
        parts.append(variant.replace(":", sep).replace("overlap_fixed", "overlap fixed"))
    return sep.join(parts)


def _fmt(row: dict) -> str:
    label = _row_label(row, " ")[len(f"EP={row['ep']} "):]
    extra = f" a2a {row['a2a_ms']:6.2f} ms" if "a2a_ms" in row else " " * 14
    bal = f" bal {row['balancedness']:.3f}" if "balancedness" in row else ""
    host = (f" host {row['host_launch_ms']:5.2f} fwd {row['host_fwd_launch_ms']:5.2f}"
            if "host_launch_ms" in row else "")
    return (f"{row['shape']:>18} EP={row['ep']} {label:<40} step {row['step_ms']:8.2f} ms "
            f"(b2b {row['step_ms_back_to_back']:7.2f}{host}){extra} {row['tokens_per_s_per_gpu'] / 1e3:8.1f} ktok/s/GPU "
            f"{row['tflops_per_gpu']:6.1f} TFLOP/s | fwd {row['fwd_ms']:7.2f} ms{bal}{_compute_only(row)}")


def _compute_only(row: dict) -> str:
    if "compute_only_ms_one_call" not in row:
        return ""
    joined = row.get("compute_only_ms_two_calls_joined")
    return (f" | no comm: 1 call {row['compute_only_ms_one_call']:.2f} ms, "
            f"2 calls {row['compute_only_ms_two_calls']:.2f} ms"
            + (f", 2 calls joined {joined:.2f} ms" if joined is not None else ""))


def _ratio(num: dict, den: dict, key: str) -> float:
    return num[key] / den[key]


def summarize(rows: list[dict]) -> list[dict]:
    """Weak-scaling efficiency and plan recovery per shape and EP size: for the deduplicated
    default (flat keys, as in earlier result files) and, under ``variants``, for every other
    dispatch variant run (its balanced row over EP=1 balanced: fwd+bwd with a sync per step,
    back to back, forward only; its Zipf + plan ``R = E`` row over its balanced row)."""
    out = []
    by = {(r["shape"], r["ep"], r["routing"], r.get("extra_slots", -1), r["dedup"] is not False): r
          for r in rows if r.get("variant", "") in ("", "plain")}
    # plan: -1 none, else the extra slots (0: the plan without replicas, > 0: with replicas)
    by_variant = {(r["shape"], r["ep"], r["routing"], r.get("extra_slots", -1) if r["plan"] else -1,
                   r["variant"]): r for r in rows if r.get("variant", "") not in ("", "plain")}
    tps, fwd, b2b = "tokens_per_s_per_gpu", "fwd_tokens_per_s_per_gpu", "tokens_per_s_per_gpu_back_to_back"
    for (shape, ep, routing, extra, dedup), r in by.items():
        if ep == 1 or routing != "balanced" or not dedup or extra != -1:
            continue
        base = by.get((shape, 1, "balanced", -1, True))
        skew = by.get((shape, ep, "zipf", -1, True))
        plans = sorted((k[3], v) for k, v in by.items() if k[:3] == (shape, ep, "zipf") and k[3] >= 0 and k[4])
        planned = plans[-1][1] if plans and plans[-1][0] > 0 else None  # the plan with replicas
        no_replicas = plans[0][1] if plans and plans[0][0] == 0 else None
        simple = by.get((shape, ep, "balanced", -1, False))
        s = {"shape": shape, "ep": ep}
        if "a2a_ms" in r:
            s["a2a_share_of_step_balanced"] = r["a2a_ms"] / r["step_ms"]
        if base:
            s["weak_scaling_efficiency_balanced"] = _ratio(r, base, tps)
            s["weak_scaling_efficiency_balanced_back_to_back"] = _ratio(r, base, b2b)
            if simple:
                s["weak_scaling_efficiency_balanced_no_dedup"] = _ratio(simple, base, tps)
            s["weak_scaling_efficiency_balanced_fwd_only"] = _ratio(r, base, fwd)
        if skew:
            s["zipf_no_plan_over_balanced"] = _ratio(skew, r, tps)
            s["zipf_no_plan_over_balanced_fwd_only"] = _ratio(skew, r, fwd)
        if planned:
            s["zipf_plan_over_balanced"] = _ratio(planned, r, tps)
            accum = planned.get(f"step_ms_sync_once_per_{MICRO}_micro")
            if accum:
                s[f"zipf_plan_over_balanced_sync_once_per_{MICRO}_micro"] = r["step_ms"] / accum
            s["zipf_plan_over_balanced_fwd_only"] = _ratio(planned, r, fwd)
        if no_replicas:
            s["zipf_plan_no_replicas_over_balanced"] = _ratio(no_replicas, r, tps)
            s["zipf_plan_no_replicas_over_balanced_fwd_only"] = _ratio(no_replicas, r, fwd)
        s["variants"] = {}
        for (v_shape, v_ep, routing_v, plan_v, label), bal in by_variant.items():
            if (v_shape, v_ep, routing_v, plan_v) != (shape, ep, "balanced", -1) or not base:
                continue
            v = {"weak_scaling_efficiency_balanced": _ratio(bal, base, tps),
                 **{f"ceiling_without_communication_{n}": base["step_ms"] / bal[f"compute_only_ms_{n}"]
                    for n in ("one_call", "two_calls", "two_calls_joined") if f"compute_only_ms_{n}" in bal},
                 "weak_scaling_efficiency_balanced_back_to_back": _ratio(bal, base, b2b),
                 "weak_scaling_efficiency_balanced_fwd_only": _ratio(bal, base, fwd)}
            if "a2a_ms" in bal:  # the exchanges timed alone over the synced step
                v["a2a_share_of_step_balanced"] = bal["a2a_ms"] / bal["step_ms"]
            zipf_plans = sorted((k[3], z) for k, z in by_variant.items()
                                if k[:3] == (shape, ep, "zipf") and k[4] == label)
            for extra_v, zipf in zipf_plans:  # no plan (-1), without replicas (0), with replicas (> 0)
                name = {-1: "zipf_no_plan", 0: "zipf_plan_no_replicas"}.get(extra_v, "zipf_plan")
                v[f"{name}_over_balanced"] = _ratio(zipf, bal, tps)
                v[f"{name}_over_balanced_fwd_only"] = _ratio(zipf, bal, fwd)
                if "balancedness" in zipf:
                    v[f"{name}_balancedness"] = zipf["balancedness"]
                accum = zipf.get(f"step_ms_sync_once_per_{MICRO}_micro")
                if accum:
                    v[f"{name}_over_balanced_sync_once_per_{MICRO}_micro"] = bal["step_ms"] / accum
            s["variants"][label] = v
        every = [s] + list(s["variants"].values())
        s["goal_weak_scaling_ge_0.85"] = max(d.get("weak_scaling_efficiency_balanced", 0) for d in every) >= 0.85
        s["goal_plan_recovery_ge_0.90"] = max(d.get(key, 0) for d in every for key in (
            "zipf_plan_over_balanced", "zipf_plan_no_replicas_over_balanced")) >= 0.90
        out.append(s)
    return out


def _write(rows, args, device) -> None:
    summary = summarize(rows)
    for s in summary:
        print(json.dumps(s))
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    tag = ("cpu" if device.type != "cuda" else gpu.lower().replace("nvidia ", "").split()[0])
    result = {
        "benchmark": "bench_ep",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
                     "python": platform.python_version()},
        "machine": {"device": gpu, "world": args.world, "host": platform.node(), "cpus": os.cpu_count()},
        "settings": {"zipf_s": ZIPF_S, "iters": args.iters, "warmup": args.warmup, "variants": args.variants,
                     "skew_cases": args.skew_cases,
                     "nccl_high_priority": args.nccl_high_priority,
                     "dtype": "bfloat16" if device.type == "cuda" else "float32",
                     "peak_bf16_tflops_assumed": PEAK_BF16_TFLOPS},
        "rows": rows,
        "summary": summary,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"ep_{tag}_{datetime.date.today().isoformat()}.json")
    fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


def plot(json_path: str) -> str:
    """Bar chart of tokens/s per GPU (forward+backward and forward only) relative to EP=1 with
    balanced routing, for every shape and case of a result file (dashed: the 0.85 weak-scaling
    goal); writes ``<json_path minus .json>.png`` and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        result = json.load(f)
    rows = result["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    most = max(sum(r["shape"] == shape for r in rows) for shape in shapes)
    # one panel per shape, stacked: a run with many variants has ~15 bars per shape
    fig, axes = plt.subplots(len(shapes), 1, figsize=(max(6.0, 0.62 * most + 1.5), 3.6 * len(shapes)),
                             squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        labels = [_row_label(r, "\n") for r in mine]
        base = next(r for r in mine if r["ep"] == 1 and r["routing"] == "balanced")
        pos = np.arange(len(mine))
        ax.bar(pos - 0.2, [r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] for r in mine], 0.4,
               label="forward+backward")
        ax.bar(pos + 0.2, [r["fwd_tokens_per_s_per_gpu"] / base["fwd_tokens_per_s_per_gpu"] for r in mine], 0.4,
               label="forward only")
        b2b = "tokens_per_s_per_gpu_back_to_back"
        if b2b in base:  # steps queued back to back (host ahead of the GPU)
            ax.plot(pos - 0.2, [r[b2b] / base[b2b] for r in mine], "_", color="crimson", ms=14, mew=2,
                    label="fwd+bwd, steps back to back")
        accum = [(i, base["step_ms"] / r[f"step_ms_sync_once_per_{MICRO}_micro"]) for i, r in enumerate(mine)
                 if f"step_ms_sync_once_per_{MICRO}_micro" in r]
        if accum:
            ax.plot([pos[i] - 0.2 for i, _ in accum], [v for _, v in accum], "kx", ms=7,
                    label=f"fwd+bwd, replica sync once per {MICRO} micro-batches")
        ax.axhline(0.85, color="k", ls="--", lw=0.8)
        ax.set_xticks(pos, labels, fontsize=6)
        ax.set_ylim(0, 1.3)
        ax.set_title(f"{shape} (T={mine[0]['T_per_gpu']}/GPU, D={mine[0]['D']}, F={mine[0]['F']}, "
                     f"E={mine[0]['E']}, k={mine[0]['k']})\nEP=1 balanced: "
                     f"{base['tokens_per_s_per_gpu'] / 1e3:.0f}k tok/s/GPU fwd+bwd", fontsize=8)
        ax.set_ylabel("tok/s per GPU / EP=1 balanced", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper right", ncols=2)
    fig.suptitle(f"moekit expert parallelism, {result['machine']['device']} x{result['machine']['world']}, "
                 f"{result['date_utc'][:10]}", fontsize=10)
    fig.tight_layout()
    out = json_path[:-5] + ".png" if json_path.endswith(".json") else json_path + ".png"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    p.add_argument("--world", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--eps", default="1,2,4,8", help="EP sizes to run (those dividing --world)")
    p.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run)")
    p.add_argument("--balanced-only", action="store_true",
                   help="balanced routing only: no Zipf rows, no placement plans (weak scaling of the variants)")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler operator tables (balanced routing) to --out")
    p.add_argument("--variants", default="plain,fixed,overlap,overlap_fixed",
                   help="EP>1 dispatch variants to run besides the balanced deduplicated one: plain (Zipf, plans, "
                        "no-dedup), fixed, overlap, overlap_fixed; the last three take options ':cN' (the layer's "
                        "GEMMs leave N SMs free), ':hp' (NCCL streams at high priority) and, for the overlap modes, "
                        "':rf' (remote path on a high-priority stream), for the fixed-size modes ':ce' (copy-engine "
                        "exchanges), for the overlap modes ':nj' (no weight-gradient join), for overlap_fixed ':of' "
                        "(own rows' experts launched before the exchange), e.g. "
                        "overlap_fixed:c16:hp:rf, overlap_fixed:c2:ce, overlap_fixed:ce:rf:nj")
    p.add_argument("--skew-cases", action="store_true",
                   help="for every variant other than plain, also Zipf routing without a plan and with the plan "
                        "with replicas (R = E + E/4), besides balanced and Zipf with the plan without replicas")
    p.add_argument("--nccl-high-priority", action="store_true",
                   help="EP groups' NCCL streams at high priority")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return 0
    os.makedirs(args.out, exist_ok=True)  # profiles are written before the result file
    args.eps = [int(e) for e in args.eps.split(",")]
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.variants = list(dict.fromkeys(v for v in args.variants.split(",") if v))  # each once
    try:
        for v in args.variants:
            parse_variant(v)
    except ValueError as e:
        raise SystemExit(f"bench_ep: error: {e}") from None
    if args.world is None:
        args.world = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.world < 1 or (args.device == "cuda" and args.world > torch.cuda.device_count()):
        raise SystemExit(f"bench_ep: error: --world {args.world} needs that many GPUs")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    mp.spawn(worker, args=(args,), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
