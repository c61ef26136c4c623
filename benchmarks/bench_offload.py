"""Offloaded MoE decoding: moekit's GPU expert cache vs transformers' device_map offloading.

A model built from a real published config (Mixtral-8x7B by default; fewer decoder layers so
that it fits host memory; random bf16 weights, nothing downloaded) decodes greedily at batch
1 and 8 with a GPU budget well below its expert bytes. In the same run:

- all-on-GPU: the plain ``transformers`` model entirely on the GPU (the speed ceiling);
- moekit ``offload`` with the same number of expert slots for lru / lfu / + next-layer prefetch /
  + CPU computation of misses, and a smaller budget where decoding is copy-bound;
- ``transformers``' own offloading (accelerate ``dispatch_model``, what ``from_pretrained(
  device_map=...)`` runs): ``auto`` placement under the same GPU budget, and experts mapped to
  the CPU;
- pinned and pageable host-to-device bandwidth, measured first.

Figures per run: decode tokens/s (decode steps only, after a warm-up generation), hit rate (weights
already on the GPU when needed) and in-flight hit rate (a prefetch copy still running then),
prefetch precision / recall, H2D bytes per token, stall, PCIe utilisation, and the copy bound
``B_h2d / (decode bytes copied per token)``. Prints a table and writes
``benchmarks/results/offload_<gpu>_<date>.json`` (or ``--out``).

    python benchmarks/bench_offload.py                 # on the GPU machine
    python benchmarks/bench_offload.py --preset tiny --device cpu   # a 1-minute dry run
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

# Published configs (config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B).
MIXTRAL_8X7B = dict(family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768, num_hidden_layers=32)
QWEN3_30B_A3B = dict(family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, num_hidden_layers=48)
TINY = dict(MIXTRAL_8X7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2)
PRESETS = {"mixtral-8x7b": MIXTRAL_8X7B, "qwen3-30b-a3b": QWEN3_30B_A3B, "tiny": TINY}

TEXT = [
    "The river rose through the night, and by morning the lower town was under water. ",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; ",
    "Mixture-of-Experts layers route each token to a few experts, so most weights stay idle per token. ",
    "Compute 17 * 23 = 391, then 391 + 209 = 600, and 600 / 25 = 24. Check: 24 * 25 = 600. ",
    "Le train de nuit pour Vienne partait a vingt-deux heures, et la gare etait presque vide. ",
    "SELECT name, count(*) FROM orders JOIN users ON orders.user_id = users.id GROUP BY name; ",
    "She tuned the violin, listened once more to the open strings, and began the slow movement. ",
]


def build_model(preset: dict, layers: int, device: str):
    import transformers as T

    cfg = dict(preset)
    family = cfg.pop("family")
    cfg["num_hidden_layers"] = layers
    config = (T.MixtralConfig if family == "mixtral" else T.Qwen3MoeConfig)(**cfg)
    with torch.device(device):  # random init on the device is fast; weights std = initializer_range
        model = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def set_experts_implementation(model, impl: str) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter(impl)
    else:  # earlier 5.x releases: the experts read it from the (shared) config at call time
        model.config._experts_implementation = impl


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    """``[batch, length]`` token ids from text bytes (a random-weight model has no tokenizer)."""
    rows = []
    for i in range(batch):
        data = (TEXT[i % len(TEXT)] * 4).encode()[:length]
        rows.append([3 + (b * 7 + i) % (vocab - 3) for b in data])
    return torch.tensor(rows)


class ForwardTimer:
    """Wall time of every forward pass of ``model`` (device synchronised at both ends)."""

    def __init__(self, model):
        self.seconds: list[float] = []
        self._t0 = 0.0
        self._handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._stop)]

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self._handles:
            h.remove()


def decode(model, ids: torch.Tensor, new_tokens: int, device: str, cache=None) -> dict:
    """Greedy generation; decode tokens/s over the steps after the prefill. cache: a
    ``transformers`` static cache to decode with (reset first; compiling disabled), default the
    dynamic cache ``generate`` makes."""
    timer = ForwardTimer(model)
    kw = {}
    if cache is not None:
        from moekit.offload.graphs import static_cache_kwargs

        cache.reset()
        kw = static_cache_kwargs(model, cache)
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             **kw)
    timer.close()
    steps = timer.seconds[1:]
    return {"decode_tokens_per_s": ids.shape[0] * len(steps) / sum(steps) if steps else float("nan"),
            "prefill_s": timer.seconds[0], "decode_steps": len(steps), "tokens": out[:, ids.shape[1]:].cpu()}


def measure_bandwidth(device: str) -> dict:
    from moekit.offload import measure_h2d_bandwidth

    out = {"pinned_h2d_bytes_per_s": measure_h2d_bandwidth(device, nbytes=256 * 2**20 if device == "cuda" else 2**24)}
    if device == "cuda":
        src = torch.empty(256 * 2**20, dtype=torch.uint8)
        dst = torch.empty_like(src, device=device)
        best = float("inf")
        for i in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0) if i else best
        out["pageable_h2d_bytes_per_s"] = src.numel() / best
    return out


def copy_engine_alone(model, device: str, chunk_bytes: int = 32 * 2**20, repeats: int = 5) -> dict:
    """Host-to-device bytes/s of the copies offloading issues, alone on one stream: one expert
    as its two tensors, and as ``chunk_bytes`` row chunks, ``repeats`` experts back to back."""
    if device != "cuda":
        return {}
    from moekit.offload.copies import chunk_rows

    w_in = model.model.layers[0].mlp.experts.gate_up_proj.detach()[:repeats].to("cpu").pin_memory()
    w_out = model.model.layers[0].mlp.experts.down_proj.detach()[:repeats].to("cpu").pin_memory()
    d_in, d_out = torch.empty_like(w_in[0], device=device), torch.empty_like(w_out[0], device=device)
    stream = torch.cuda.Stream()
    nbytes = repeats * (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()
    out = {}
    for label in ("whole_tensors", "chunks"):
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                for i in range(repeats):
                    for src, dst in ((w_in[i], d_in), (w_out[i], d_out)):
                        rows = src.shape[1] * src.element_size()
                        parts = [(0, src.shape[0])] if label == "whole_tensors" else chunk_rows(src.shape[0], rows, chunk_bytes)
                        for a, b in parts:
                            dst[a:b].copy_(src[a:b], non_blocking=True)
                end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        out[f"{label}_bytes_per_s"] = nbytes / best
    out["chunk_bytes"] = chunk_bytes
    del w_in, w_out, d_in, d_out
    return out


def routing_diagnostics(model, ids: torch.Tensor, device: str) -> list:
    """Why next-layer prediction is weak on random weights: per decoder layer, the RMS of the
    residual stream and of the attention and MoE updates, and per next layer the share of its
    true top-k found by the top-k (and top-k+1) of its router applied to (a) this layer's router
    input (``next_layer``) and (b) this decoder layer's output (``layer_output``)."""
    import torch.nn.functional as F

    layers = model.model.layers
    rec, hooks = {}, []

    def keep(name):
        def hook(module, args):
            rec[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])
        return hook

    for i, layer in enumerate(layers):
        hooks += [layer.register_forward_pre_hook(keep(f"h{i}")),
                  layer.post_attention_layernorm.register_forward_pre_hook(keep(f"r{i}")),
                  layer.mlp.register_forward_pre_hook(keep(f"x{i}"))]
    hooks.append(model.model.norm.register_forward_pre_hook(keep(f"h{len(layers)}")))
    with torch.no_grad():
        model(ids.to(device))
    for h in hooks:
        h.remove()
    k = model.config.num_experts_per_tok

    def rms(t):
        return float(t.pow(2).mean().sqrt())

    def top(layer, x, n):
        logits = F.linear(x.to(layer.mlp.gate.weight.dtype), layer.mlp.gate.weight).float()
        return logits.topk(n, dim=-1).indices

    def found(pred, true):
        return sum(len(set(p) & set(t)) for p, t in zip(pred.tolist(), true.tolist())) / true.numel()

    out = []
    for i in range(len(layers)):
        row = dict(layer=i, rms_residual=rms(rec[f"h{i}"]), rms_attention_update=rms(rec[f"r{i}"] - rec[f"h{i}"]),
                   rms_moe_update=rms(rec[f"h{i + 1}"] - rec[f"r{i}"]))
        if i + 1 < len(layers):
            nxt = layers[i + 1]
            true = top(nxt, rec[f"x{i + 1}"], k)
            late = nxt.post_attention_layernorm(rec[f"h{i + 1}"].to(nxt.mlp.gate.weight.dtype))
            row["cos_router_input_next"] = float(F.cosine_similarity(rec[f"x{i}"], rec[f"x{i + 1}"], dim=-1).mean())
            for label, src in (("next_layer", rec[f"x{i}"]), ("layer_output", late)):
                row[f"{label}_topk_recall"] = found(top(nxt, src, k), true)
                row[f"{label}_topk1_recall"] = found(top(nxt, src, k + 1), true)
        out.append(row)
        print("diag " + " ".join(f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}"
                                  for key, val in row.items()), flush=True)
    return out


def moekit_runs(cpu_model, args, expert_bytes: int, num_experts_total: int, bw: float) -> tuple[list, dict]:
    from moekit.offload import offload

    model = copy.deepcopy(cpu_model)
    half = num_experts_total // 2
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    handle = offload(model, cache_experts=half, device=args.device)
    runs = []
    quarter, lo, whole = num_experts_total // 4, "layer_output", 10**6
    # (policy, prefetch, prefetch_extra, lead_chunks, cpu_compute, slots[, staging slots]); lead_chunks=whole:
    # every chunk of a guess is queued at once (a wrong guess costs a whole copy); 2: at most two
    # 32 MiB chunks queued ahead, the rest of a wrong guess dropped when the layer's routing is known
    variants = [("lru", "none", 0, 2, False, half), ("lfu", "none", 0, 2, False, half),
                ("lru", "next_layer", 0, whole, False, half), ("lru", lo, 0, whole, False, half),
                ("lfu", lo, 0, whole, False, half),
                ("lru", "next_layer", 0, 2, False, half), ("lru", lo, 0, 2, False, half),
                ("lru", lo, 1, 2, False, half), ("lfu", lo, 1, 2, False, half),
                ("lru", "next_layer+layer_output", 0, 2, False, half), ("lfu", "next_layer+layer_output", 0, 2, False, half),
                ("lfu", "none", 0, 2, True, half), ("lfu", lo, 1, 2, True, half),
                ("lru", "none", 0, 2, False, quarter), ("lfu", lo, 1, 2, False, quarter),
                ("lru", "none", 0, 2, False, num_experts_total)]
    if args.variants == "staging":  # staged prefetch against lru with the same cache and the same memory
        variants = staging_variants(args.slots or [half], args.staging, num_experts_total, args.preset)
    elif args.slots:  # tight budgets only: the caches and the prefetchers, nothing else
        variants = [(pol, pf, 0, lead, False, n) for n in args.slots
                    for pol, pf, lead in (("lru", "none", 2), ("lfu", "none", 2), ("lru", lo, whole),
                                          ("lru", lo, 2), ("lru", "next_layer", whole))]
    for policy, prefetch, extra, lead, cpu, slots, *more in variants:
        staging = more[0] if more else 0
        for batch in args.batches:
            name = run_name(policy, prefetch, extra, lead, cpu, slots, staging, num_experts_total)
            runs.append(measure(model, handle, cpu_model, args, name, batch, expert_bytes, bw, policy=policy,
                                prefetch=prefetch, prefetch_extra=extra, lead_chunks=lead, cpu_compute=cpu,
                                cache_experts=slots, staging_slots=staging))
            print_run(runs[-1])
    mem = {}
    costs = handle.engine.costs
    mem["cost_model"] = dict(h2d_bytes_per_s=costs.h2d_bytes_per_s, expert_bytes=costs.expert_bytes,
                             cpu_s_fixed=costs.cpu_s_fixed, cpu_s_per_token=costs.cpu_s_per_token)
    del model, handle
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return runs, mem


def run_name(policy, prefetch, extra, lead, cpu, slots, staging, num_experts_total) -> str:
    if slots == num_experts_total:
        return "moekit all experts resident"
    name = f"moekit {policy}"
    if prefetch != "none":
        name += f" +{prefetch}" + (f"+{extra}" if extra else "") + (" whole" if lead == 10**6 else "")
    return name + (f" staged {staging}" if staging else "") + (" +cpu" if cpu else "")


def measure(model, handle, cpu_model, args, name: str, batch: int, expert_bytes: int, bw: float, kv_cache=None,
            **config) -> dict:
    """One moekit run: ``handle.reconfigure(**config)``, a warm-up generation that fills the
    cache, then the timed one; its figures (an ``error`` entry instead if it fails, so a one-shot
    device run keeps the others). The engine's host time per layer call (wall time inside
    ``engine.forward`` less its wait for the routing) is taken by wrapping the engine's method.
    kv_cache: a static ``transformers`` cache both generations decode with (:func:`decode`)."""
    slots, staging = config["cache_experts"], config["staging_slots"]
    try:
        handle.reconfigure(**config)
        engine_time = _time_engine(handle.engine)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ids = prompts(batch, args.prompt_len, cpu_model.config.vocab_size)
        decode(model, ids, args.warmup_tokens, args.device, kv_cache)  # fills the cache: steady state
        handle.reset_stats()
        engine_time.update(s=0.0, calls=0)
        res = decode(model, ids, args.new_tokens, args.device, kv_cache)
        s = handle.stats()
        dec = [r for r in handle.forward_log[1:]]
        dec_bytes = sum(r.h2d_bytes for r in dec)
        dec_s = sum(r.seconds for r in dec)
        dec_act = sum(r.activations for r in dec)
        dec_hit = sum(r.hits for r in dec) / dec_act if dec_act else float("nan")
        dec_late = sum(r.inflight_hits for r in dec) / dec_act if dec_act else float("nan")
        tokens = batch * len(dec)
        bound = bw * tokens / dec_bytes if dec_bytes else float("inf")
        step_ms, copy_ms = 1e3 * dec_s / max(len(dec), 1), 1e3 * dec_bytes / bw / max(len(dec), 1)
        return dict(name=name, batch=batch, slots=slots, staging_slots=staging, policy=config["policy"],
                    prefetch=config["prefetch"], cpu_compute=config["cpu_compute"],
                    **{k: s.get(k, 0) for k in ("staged_hits", "staged_inflight_hits", "staged_misses",
                                                "staged_dropped", "victim_hits")},
                    prefetch_extra=config["prefetch_extra"], lead_chunks=config["lead_chunks"],
                    copy_busy_fraction=s["copy_busy_fraction"],
                    copy_bandwidth_bytes_per_s=s["copy_bandwidth_bytes_per_s"],
                    host_wait_s=s["host_wait_s"], prefetch_bytes=s["prefetch_bytes"],
                    prefetch_useful=s["prefetch_useful"], prefetch_lead_s=s["prefetch_lead_s"],
                    prefetch_evicted_early=s.get("prefetch_evicted_early"),
                    wall_s=s["wall_s"], step_ms=step_ms, copy_ms_per_step=copy_ms, no_copy_ms_per_step=step_ms - copy_ms,
                    engine_host_ms_per_layer_call=(1e3 * (engine_time["s"] - s["host_wait_s"]) / engine_time["calls"]
                                                   if engine_time["calls"] else float("nan")),
                    cpu_busy_s=s.get("cpu_busy_s"),
                    decode_tokens_per_s=res["decode_tokens_per_s"], decode_hit_rate=dec_hit,
                    decode_inflight_hit_rate=dec_late, hit_rate=s["hit_rate"],
                    inflight_hit_rate=s["inflight_hit_rate"], inflight_hits=s["inflight_hits"],
                    prefetch_precision=s["prefetch_precision"],
                    prefetch_recall=s["prefetch_recall"], h2d_bytes_per_token=dec_bytes / max(tokens, 1),
                    decode_pcie_utilization=(dec_bytes / dec_s) / bw if dec_s else float("nan"),
                    pcie_utilization=s["pcie_utilization"], stall_s=s["stall_s"],
                    copy_bound_tokens_per_s=bound,
                    fraction_of_copy_bound=res["decode_tokens_per_s"] / bound if dec_bytes else None,
                    cpu_computed=s["cpu_computed"], demand_copies=s["demand_copies"],
                    prefetch_copies=s["prefetch_copies"],
                    misses=s["activations"] - s["hits"] - s["inflight_hits"],
                    activations=s["activations"], tokens=res["tokens"],
                    gpu_budget_bytes=handle.dense_bytes + (slots + staging) * expert_bytes + args.reserve_bytes,
                    peak_allocated_bytes=(torch.cuda.max_memory_allocated() if args.device == "cuda" else None))
    except Exception as exc:  # keep the other figures of a one-shot device run
        return dict(name=name, batch=batch, slots=slots, error=repr(exc))


def _time_engine(engine) -> dict:
    """Wrap ``engine.forward`` (the instance's attribute, which the offloaded layers call) to sum
    its wall seconds and calls into the returned dict."""
    acc = {"s": 0.0, "calls": 0}
    inner = getattr(engine.forward, "__wrapped__", engine.forward)  # replace an earlier run's wrapper, not nest

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            acc["s"] += time.perf_counter() - t0
            acc["calls"] += 1

    timed.__wrapped__ = inner
    engine.forward = timed
    return acc


# The engine A/B (``--variants engines``): (policy, prefetch, prefetch_extra, lead_chunks, cpu_compute,
# slots: "half" or "all", batches): the goal runs of both speed goals and the all-resident ceiling
# (the seventh session's list: the CPU-compute runs its worker thread changes, plain lru, lru +
# layer_output at batch 1 for the prefetch counters, and the all-resident ceiling on both engines
# in every repeat, pooled by :func:`pooled_ceilings`)
ENGINE_VARIANTS = [("lru", "none", 0, 2, False, "half", (1, 8)), ("lru", "layer_output", 0, 2, False, "half", (1,)),
                   ("lfu", "none", 0, 2, True, "half", (1, 8)), ("lfu", "layer_output", 1, 2, True, "half", (8,)),
                   ("lru", "none", 0, 2, False, "all", (1, 8))]


def engines_runs(cpu_model, args, expert_bytes: int, num_experts_total: int, bw: float) -> tuple[list, dict]:
    """This tree's offload engine against ``args.baseline`` (an importable copy of an earlier
    moekit, e.g. the fifth session's built by ``offload_device_run.sh engines``), each with its own
    copy of the model, in one process: every variant of :data:`ENGINE_VARIANTS` runs on both,
    the order of the two alternating between ``args.repeats`` repeats. Rows of the baseline are
    named ``... [<baseline>]``. Each model's GPU memory stays allocated while the other runs:
    ``other_engine_bytes`` is what a row's peak includes of the other."""
    import importlib

    from moekit.offload import offload

    engines = {}
    for tag, fn in ((args.baseline, importlib.import_module(args.baseline + ".offload").offload), ("new", offload)):
        model = copy.deepcopy(cpu_model)
        engines[tag] = (model, fn(model, cache_experts=num_experts_total // 2, device=args.device))
    runs = []
    for repeat in range(args.repeats):
        for policy, prefetch, extra, lead, cpu, which, batches in ENGINE_VARIANTS:
            slots = num_experts_total if which == "all" else num_experts_total // 2
            for batch in [b for b in batches if b in args.batches]:
                tags = list(engines) if repeat % 2 == 0 else list(engines)[::-1]
                for tag in tags:
                    model, handle = engines[tag]
                    other = next(h for t, (_, h) in engines.items() if t != tag)
                    name = run_name(policy, prefetch, extra, lead, cpu, slots, 0, num_experts_total)
                    name += f" [{tag}]" if tag != "new" else ""
                    run = measure(model, handle, cpu_model, args, name, batch, expert_bytes, bw, policy=policy,
                                  prefetch=prefetch, prefetch_extra=extra, lead_chunks=lead, cpu_compute=cpu,
                                  cache_experts=slots, staging_slots=0)
                    run.update(engine=tag, repeat=repeat,
                               other_engine_bytes=other.dense_bytes + other.num_slots * expert_bytes)
                    runs.append(run)
                    print_run(run)
    costs = engines["new"][1].engine.costs
    mem = {"cost_model": dict(h2d_bytes_per_s=costs.h2d_bytes_per_s, expert_bytes=costs.expert_bytes,
                              cpu_s_fixed=costs.cpu_s_fixed, cpu_s_per_token=costs.cpu_s_per_token)}
    del engines
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return runs, mem


def summarize_engines(runs: list, baseline: str) -> dict:
    """Per variant and batch: median tokens/s, fraction of the copy bound, no-copy and engine host
    milliseconds of both engines over the repeats, the ratio new / baseline, and each engine's
    tokens/s as a fraction of its own all-resident run."""
    import statistics

    ok = [r for r in runs if "error" not in r and r.get("engine")]
    out: dict = {}
    for key in sorted({(r["name"].replace(f" [{baseline}]", ""), r["batch"]) for r in ok}):
        row = {}
        for tag in (baseline, "new"):
            rs = [r for r in ok if r["engine"] == tag and r["batch"] == key[1]
                  and r["name"].replace(f" [{baseline}]", "") == key[0]]
            if not rs:
                continue
            med = {f: statistics.median(r[f] for r in rs) for f in (
                "decode_tokens_per_s", "step_ms", "no_copy_ms_per_step", "engine_host_ms_per_layer_call",
                "decode_hit_rate") if all(isinstance(r.get(f), (int, float)) for r in rs)}
            bounds = [r["fraction_of_copy_bound"] for r in rs if r.get("fraction_of_copy_bound") and not r["cpu_compute"]]
            if bounds:
                med["fraction_of_copy_bound"] = statistics.median(bounds)
            med["tok_s_all"] = [r["decode_tokens_per_s"] for r in rs]
            row[tag] = med
        if baseline in row and "new" in row:
            row["tok_s_ratio_new_over_baseline"] = row["new"]["decode_tokens_per_s"] / row[baseline]["decode_tokens_per_s"]
        out[f"{key[0]} @ batch {key[1]}"] = row
    for key, row in out.items():  # fraction of the same engine's all-resident speed
        batch = key.rsplit(" ", 1)[1]
        ceiling = out.get(f"moekit all experts resident @ batch {batch}", {})
        for tag in (baseline, "new"):
            if tag in row and tag in ceiling:
                row[tag]["fraction_of_own_all_resident"] = (row[tag]["decode_tokens_per_s"]
                                                            / ceiling[tag]["decode_tokens_per_s"])
    return out


def pooled_ceilings(runs: list) -> dict:
    """Per batch, the all-resident decode tokens/s of every repeat of both engines (the same code
    path: nothing is copied or computed on the CPU), pooled: values, median, min, max. One such
    run swung 412-809 tok/s within one process (s6), so a goal fraction is quoted against this
    median, the denominator measured as often as the runs it divides."""
    import statistics

    out = {}
    for r in runs:
        if "error" not in r and r["name"].startswith("moekit all experts resident"):
            out.setdefault(r["batch"], []).append(r["decode_tokens_per_s"])
    return {b: dict(values=v, median=statistics.median(v), min=min(v), max=max(v)) for b, v in sorted(out.items())}


def add_pooled_fractions(summary: dict, ceilings: dict, baseline: str) -> None:
    """Each variant's median tokens/s over the pooled all-resident median of its batch
    (``fraction_of_pooled_all_resident``), and the range of its repeats' fractions."""
    for key, row in summary.items():
        ceiling = ceilings.get(int(key.rsplit(" ", 1)[1]))
        for tag in (baseline, "new"):
            if ceiling and tag in row:
                row[tag]["fraction_of_pooled_all_resident"] = row[tag]["decode_tokens_per_s"] / ceiling["median"]
                row[tag]["fraction_of_pooled_all_resident_range"] = [min(row[tag]["tok_s_all"]) / ceiling["median"],
                                                                     max(row[tag]["tok_s_all"]) / ceiling["median"]]


def staging_variants(budgets: list[int], staging: int, total: int, preset: str) -> list[tuple]:
    """The staged-prefetch comparison at each cache size ``n`` of ``budgets``: lru with ``n`` and
    with ``n - staging`` slots (the same device memory as a staged run that keeps ``n`` slots in
    all), the s4 prefetch that takes cache slots, and staged prefetch with ``n - staging`` cache
    slots (same memory) and with ``n`` (``staging`` slots more memory); lead 2 chunks, and on the
    Qwen3 config also whole guesses."""
    lo, out = "layer_output", []
    for n in budgets:
        m = n - staging
        out += [("lru", "none", 0, 2, False, n), ("lru", "none", 0, 2, False, m), ("lru", lo, 0, 2, False, n),
                ("lru", lo, 0, 2, False, m, staging), ("lru", "layer_output2", 0, 2, False, m, staging),
                ("lru", lo, 0, 2, False, n, staging)]
        if preset != "qwen3-30b-a3b":  # the larger experts: also next_layer (8 ms more lead, weaker guess)
            out += [("lru", "next_layer", 0, 2, False, m, staging)]
        else:  # small experts, idle bus: every chunk of every guess queued at once (they land sooner)
            out += [("lru", lo, 0, 10**6, False, m, staging)]
    return out + [("lru", "none", 0, 2, False, total)]


def hf_runs(cpu_model, args, budget_bytes: int) -> list:
    """transformers' offloading (accelerate hooks) under the same GPU budget."""
    if args.device != "cuda":
        return [dict(name="transformers device_map", error="needs CUDA")]
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError as exc:
        return [dict(name="transformers device_map", error=repr(exc))]
    saved = dict(cpu_model.state_dict())  # keeps the CPU tensors alive while dispatch moves / metas them
    maps = {}
    maps["transformers device_map=auto"] = infer_auto_device_map(
        cpu_model, max_memory={0: budget_bytes, "cpu": 400 * 2**30},
        no_split_module_classes=cpu_model._no_split_modules, dtype=torch.bfloat16)
    experts_cpu = {}
    for name, module in cpu_model.named_modules():
        if name.endswith("mlp.experts"):
            experts_cpu[name] = "cpu"
    for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"):
        experts_cpu[name] = 0
    for i, layer in enumerate(cpu_model.model.layers):
        for child, _ in layer.named_children():
            if child != "mlp":
                experts_cpu[f"model.layers.{i}.{child}"] = 0
        experts_cpu[f"model.layers.{i}.mlp.gate"] = 0
    maps["transformers experts->cpu"] = experts_cpu
    runs = []
    for name, device_map in maps.items():
        on_gpu = sum(1 for v in device_map.values() if v == 0)
        try:
            model = dispatch_model(cpu_model, device_map=device_map, main_device=0)
            for batch in (1, 8):
                ids = prompts(batch, args.prompt_len, cpu_model.config.vocab_size)
                torch.cuda.reset_peak_memory_stats()
                res = decode(model, ids, args.hf_new_tokens, "cuda")
                runs.append(dict(name=name, batch=batch, decode_tokens_per_s=res["decode_tokens_per_s"],
                                 peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                                 modules_on_gpu=on_gpu, modules_on_cpu=len(device_map) - on_gpu,
                                 tokens=res["tokens"]))
                print_run(runs[-1])
        except Exception as exc:
            runs.append(dict(name=name, error=repr(exc)))
            print_run(runs[-1])
        finally:
            remove_hook_from_submodules(cpu_model)
            cpu_model.load_state_dict(saved, assign=True)
            cpu_model.to("cpu")
            gc.collect()
            torch.cuda.empty_cache()
    return runs


def summarize_goals(runs: list) -> dict:
    """The issue's goals, computed from the runs of this file (None where a run is missing)."""
    ok = [r for r in runs if "error" not in r]

    def best(prefix, batch, slots=None):
        rs = [r for r in ok if r["name"].startswith(prefix) and r["batch"] == batch
              and (slots is None or r.get("slots") == slots)]
        return max(rs, key=lambda r: r["decode_tokens_per_s"]) if rs else None

    def one(name, batch, slots):
        return next((r for r in ok if r["name"] == name and r["batch"] == batch and r.get("slots") == slots), None)

    out = {}
    all_gpu = {b: max([r for r in (best("all on GPU", b), best("moekit all experts resident", b)) if r],
                      key=lambda r: r["decode_tokens_per_s"], default=None) for b in (1, 8)}
    half = max((r.get("slots", 0) for r in ok if r["name"].startswith("moekit") and "resident" not in r["name"]),
               default=None)
    for b in (1, 8):
        mk, hf = best("moekit", b, half), best("transformers", b)
        if mk and hf:
            out[f"batch{b}_moekit_over_best_transformers_offload"] = mk["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        if mk and all_gpu[b]:
            out[f"batch{b}_half_budget_fraction_of_all_gpu"] = mk["decode_tokens_per_s"] / all_gpu[b]["decode_tokens_per_s"]
            out[f"batch{b}_all_gpu_ceiling"] = all_gpu[b]["name"]
        if mk:
            out[f"batch{b}_best_moekit_half_budget"] = mk["name"]
        lru = one("moekit lru", b, half)
        for pf in [r for r in ok if r["batch"] == b and r.get("slots") == half and r.get("prefetch", "none") != "none"
                   and not r.get("cpu_compute")]:
            if lru:  # strict (DESIGN.md: weights already on the GPU) and counting in-flight copies as hits
                out[f"batch{b}_hit_gain_points[{pf['name']}]_over_lru"] = 100 * (pf["decode_hit_rate"] - lru["decode_hit_rate"])
                out[f"batch{b}_hit_or_inflight_gain_points[{pf['name']}]_over_lru"] = 100 * (
                    pf["decode_hit_rate"] + pf["decode_inflight_hit_rate"] - lru["decode_hit_rate"])
                out[f"batch{b}_tok_s_ratio[{pf['name']}]_over_lru"] = pf["decode_tokens_per_s"] / lru["decode_tokens_per_s"]
    for b in (1, 8):  # the same hit gains at the other budgets (``--slots``), keyed by slot count
        for n in sorted({r["slots"] for r in ok if r.get("slots") not in (None, half)}):
            lru = one("moekit lru", b, n)
            for pf in [r for r in ok if r["batch"] == b and r.get("slots") == n
                       and r.get("prefetch", "none") != "none" and not r.get("cpu_compute")]:
                if lru:
                    out[f"batch{b}_hit_gain_points[{pf['name']}]_over_lru@{n}_slots"] = 100 * (
                        pf["decode_hit_rate"] - lru["decode_hit_rate"])
    for r in [r for r in ok if r.get("staging_slots")]:  # staged prefetch: same cache, same memory
        for label, n in (("same_cache", r["slots"]), ("same_memory", r["slots"] + r["staging_slots"])):
            lru = one("moekit lru", r["batch"], n)
            if lru:
                key = f"batch{r['batch']}_{label}[{r['name']} @{r['slots']}+{r['staging_slots']}]_vs_lru@{n}"
                out[key] = {"hit_gain_points": 100 * (r["decode_hit_rate"] - lru["decode_hit_rate"]),
                            "hit_or_inflight_gain_points": 100 * (r["decode_hit_rate"] + r["decode_inflight_hit_rate"]
                                                                  - lru["decode_hit_rate"]),
                            "tok_s_ratio": r["decode_tokens_per_s"] / lru["decode_tokens_per_s"]}
    copy_bound = [r for r in ok if r["name"].startswith("moekit") and r.get("decode_pcie_utilization", 0) > 0.5
                  and not r.get("cpu_compute")]
    if copy_bound:
        out["copy_bound_runs_fraction_of_bound_min"] = min(r["fraction_of_copy_bound"] for r in copy_bound)
        out["copy_bound_runs_fraction_of_bound_max"] = max(r["fraction_of_copy_bound"] for r in copy_bound)
    b8 = [r for r in ok if r["name"].startswith("moekit") and r["batch"] == 8]
    out["batch8_each_needed_expert_fetched_at_most_once"] = all(
        r["demand_copies"] <= r["misses"] - r["cpu_computed"] for r in b8) if b8 else None
    return out


def plot(doc: dict, path: str) -> None:
    """Bar chart of decode tokens/s per run and batch (log scale), with the copy bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if "error" not in r]

    def label(r):
        text = r["name"].replace("all on GPU (transformers ", "all-GPU HF ").replace(")", "")
        if not r.get("slots") or "resident" in r["name"]:
            return text
        return text + (f" [{r['slots']}+{r['staging_slots']} slots]" if r.get("staging_slots") else f" [{r['slots']} slots]")

    fig, axes = plt.subplots(1, 2, figsize=(15, 9), sharey=False)
    for ax, batch in zip(axes, (1, 8)):
        rs = [r for r in runs if r["batch"] == batch]
        colors = ["tab:orange" if r.get("staging_slots") else
                  "tab:gray" if r["name"].startswith("all on GPU") or "resident" in r["name"] else
                  "tab:red" if r["name"].startswith("transformers") else
                  "tab:green" if r.get("cpu_compute") else "tab:blue" for r in rs]
        ax.barh(range(len(rs)), [r["decode_tokens_per_s"] for r in rs], color=colors)
        for i, r in enumerate(rs):
            text, right = f"{r['decode_tokens_per_s']:.1f}", r["decode_tokens_per_s"]
            if "decode_hit_rate" in r and "resident" not in r["name"]:
                text += f"  hit {r['decode_hit_rate']:.2f}"
                if r.get("decode_inflight_hit_rate"):
                    text += f" (+{r['decode_inflight_hit_rate']:.2f} in flight)"
                if r.get("staging_slots"):
                    text += f"  staged hits {r['staged_hits']} (victims {r['victim_hits']})"
                text += f"  PCIe {r['decode_pcie_utilization']:.2f}"
                if r.get("prefetch", "none") != "none":
                    text += f"  P/R {r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}"
                if not r.get("cpu_compute"):
                    ax.plot([r["copy_bound_tokens_per_s"]], [i], marker="|", color="black", markersize=14)
                    right = max(right, r["copy_bound_tokens_per_s"])
            ax.text(right * 1.12, i, text, va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(0.5, 5000)
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels([label(r) for r in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (log)")
        ax.set_title(f"batch {batch}")
    model = doc["model"]
    fig.suptitle(f"{model['preset']} config, {model['layers']} layers, random bf16 weights, {doc['machine']['device']} "
                 f"(pinned H2D {doc['bandwidth']['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s)\n"
                 "blue: moekit cache, orange: staged prefetch [cache + staging slots], green: + CPU compute, "
                 "red: transformers/accelerate offload, gray: all on GPU; "
                 "| = PCIe copy bound at the measured hit rate\nhit = weights already on the GPU when needed, "
                 "in flight = a prefetch copy still running then (neither hit nor miss)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_staging(doc: dict, path: str) -> None:
    """The staged-prefetch comparison: per batch, strict hit rate (+ in-flight hits, hatched) and
    decode tokens/s of each moekit run, labelled with its cache + staging slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if "error" not in r and r["name"].startswith("moekit") and "resident" not in r["name"]]
    batches = sorted({r["batch"] for r in runs})
    fig, axes = plt.subplots(len(batches), 2, figsize=(16, 2.2 + 0.32 * len(runs)), squeeze=False)
    for row, batch in enumerate(batches):
        rs = [r for r in runs if r["batch"] == batch]
        labels = [r["name"].replace("moekit ", "") + f" [{r['slots']}" + (f"+{r['staging_slots']}" if r.get("staging_slots") else "")
                  + " slots]" for r in rs]
        colors = ["tab:orange" if r.get("staging_slots") else "tab:blue" for r in rs]
        y = range(len(rs))
        hit = [r["decode_hit_rate"] for r in rs]
        late = [r.get("decode_inflight_hit_rate", 0.0) for r in rs]
        ax = axes[row, 0]
        ax.barh(y, hit, color=colors)
        ax.barh(y, late, left=hit, color="none", edgecolor="gray", hatch="//")
        for i, r in enumerate(rs):
            ax.text(min(hit[i] + late[i], 0.9) + 0.01, i, f"{hit[i]:.3f}" + (f" (+{late[i]:.3f})" if late[i] else ""),
                    va="center", fontsize=7)
        ax.set_xlim(0, 1.08)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("strict hit rate (hatched: in-flight hits)")
        ax.set_title(f"batch {batch}: hit rate", fontsize=9)
        ax = axes[row, 1]
        tok = [r["decode_tokens_per_s"] for r in rs]
        ax.barh(y, tok, color=colors)
        for i, v in enumerate(tok):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        ax.set_xlim(0, max(tok) * 1.15)
        ax.set_yticks(list(y))
        ax.set_yticklabels([])
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s")
        ax.set_title(f"batch {batch}: decode speed", fontsize=9)
    model = doc["model"]
    fig.suptitle(f"{model['preset']} config, {model['layers']} layers, random bf16 weights, {doc['machine']['device']}; "
                 f"blue: cache only, orange: staged prefetch [cache + staging slots]", fontsize=9)
    fig.tight_layout(rect=(0.015, 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_engines(doc: dict, path: str) -> None:
    """The engine A/B: per batch, each variant's decode tokens/s on both engines (bars: median,
    dots: each repeat), labelled with the fraction of the copy bound and the milliseconds per
    step with no copy running."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, baseline = doc["engines"], doc.get("baseline", "moekit_s5")
    batches = sorted({int(k.rsplit(" ", 1)[1]) for k in summary})
    fig, axes = plt.subplots(len(batches), 1, figsize=(12, 3.2 * len(batches)), squeeze=False)
    for ax, batch in zip(axes[:, 0], batches):
        keys = [k for k in summary if k.endswith(f"@ batch {batch}")]
        for i, key in enumerate(keys):
            for j, (tag, color) in enumerate(((baseline, "tab:gray"), ("new", "tab:blue"))):
                med = summary[key].get(tag)
                if not med:
                    continue
                y = i + (0.2 if j else -0.2)
                ax.barh(y, med["decode_tokens_per_s"], height=0.38, color=color, label=tag if i == 0 else None)
                ax.plot(med["tok_s_all"], [y] * len(med["tok_s_all"]), "k.", markersize=4)
                text = f" {med['decode_tokens_per_s']:.1f}"
                if "fraction_of_copy_bound" in med and "resident" not in key:
                    text += f"  {med['fraction_of_copy_bound']:.2f} of bound"
                if "no_copy_ms_per_step" in med and "resident" not in key:
                    text += f"  no copy {med['no_copy_ms_per_step']:.1f} ms/step"
                if "engine_host_ms_per_layer_call" in med:
                    text += f"  engine host {med['engine_host_ms_per_layer_call']:.2f} ms/layer call"
                ax.text(max(med["tok_s_all"]), y, text, va="center", fontsize=7)
        pooled = (doc.get("all_resident_pooled") or {}).get(str(batch)) or (doc.get("all_resident_pooled") or {}).get(batch)
        if pooled:  # the goal line: a quarter of the pooled all-resident median
            ax.axvline(0.25 * pooled["median"], color="tab:red", linestyle="--", linewidth=1,
                       label=f"25 % of all-resident median ({pooled['median']:.0f}, n={len(pooled['values'])})")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([k.replace(f" @ batch {batch}", "").replace("moekit ", "") for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(10, 60000)
        ax.set_xlabel("decode tokens/s (log; bar: median, dots: repeats)")
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    model = doc["model"]
    fig.suptitle(f"{model['preset']} config, {model['layers']} layers, random bf16 weights, {doc['machine']['device']}: "
                 f"offload engine {baseline} (gray) vs this tree (blue), same process, interleaved", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def redraw(path: str, draw) -> int:
    """``draw(doc, png_path)`` for the result file ``path`` (its PNG beside it); returns 0."""
    with open(path) as fh:
        draw(json.load(fh), os.path.splitext(path)[0] + ".png")
    return 0


def print_run(run: dict) -> None:
    if "error" in run:
        print(f"{run['name']:<40} batch {run.get('batch', '-')}: ERROR {run['error']}", flush=True)
        return
    extra = ""
    if "hit_rate" in run:
        extra = (f" slots {run['slots']:>3}+{run.get('staging_slots', 0)} hit {run['decode_hit_rate']:.3f} "
                 f"inflight {run.get('decode_inflight_hit_rate', 0.0):.3f} P/R {run['prefetch_precision']:.2f}/"
                 f"{run['prefetch_recall']:.2f} pcie {run['decode_pcie_utilization']:.2f} "
                 f"bound {run['copy_bound_tokens_per_s']:.1f} cpu {run['cpu_computed']} stall {run['stall_s']:.2f}s "
                 f"busy {run['copy_busy_fraction']:.2f} copyBW {run['copy_bandwidth_bytes_per_s'] / 1e9:.1f} "
                 f"wait {run['host_wait_s']:.2f}s wall {run['wall_s']:.2f}s "
                 f"lead {run.get('prefetch_lead_s', float('nan')) * 1e3:.2f}ms")
        if run.get("prefetch_copies"):
            extra += (f" prefetch useful {run['prefetch_useful']} of {run['prefetch_copies']}, evicted early "
                      f"{run.get('prefetch_evicted_early')}")
        if run.get("cpu_computed"):
            extra += f" cpu_busy {run.get('cpu_busy_s') or 0:.2f}s"
        if run.get("staging_slots"):
            extra += (f" staged hit/inflight/miss/dropped {run['staged_hits']}/{run['staged_inflight_hits']}/"
                      f"{run['staged_misses']}/{run['staged_dropped']} victims {run['victim_hits']} "
                      f"useful {run['prefetch_useful']} of {run['prefetch_copies']}")
    print(f"{run['name']:<40} batch {run['batch']}: {run['decode_tokens_per_s']:8.2f} tok/s{extra}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (default 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--hf-new-tokens", type=int, default=4)
    p.add_argument("--reserve-bytes", type=int, default=2 * 2**30, help="budget share for activations / KV cache")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/offload_<gpu>_<date>.json)")
    p.add_argument("--slots", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help="comma-separated expert-slot counts: run only lru / lfu / prefetch at these budgets "
                        "(no CPU compute, no transformers offloading); default: the full matrix at half and a "
                        "quarter of the experts")
    p.add_argument("--variants", default="full", choices=("full", "staging", "engines"),
                   help="full: the whole matrix; staging: staged prefetch against lru with the same cache and "
                        "with the same memory, at --slots (default half the experts); engines: this tree's "
                        "engine against --baseline on the goal runs, interleaved")
    p.add_argument("--baseline", default="moekit_s5",
                   help="--variants engines: the importable package of the earlier moekit to compare with")
    p.add_argument("--repeats", type=int, default=2, help="--variants engines: repeats of each run per engine")
    p.add_argument("--staging", type=int, default=2, help="staging slots of the staged runs (default 2)")
    p.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8],
                   help="comma-separated batch sizes of the moekit runs (default 1,8)")
    p.add_argument("--quick", action="store_true",
                   help="skip transformers' offloading and its grouped_mm all-on-GPU rows (the eager rows stay: "
                        "they are the token reference)")
    p.add_argument("--plot", default=None, metavar="JSON", help="only redraw the PNG of an existing result file")
    args = p.parse_args(argv)
    if args.plot:
        return redraw(args.plot, {"staging": plot_staging, "engines": plot_engines}.get(args.variants, plot))
    preset = PRESETS[args.preset]
    torch.manual_seed(0)

    bandwidth = measure_bandwidth(args.device)
    bw = bandwidth["pinned_h2d_bytes_per_s"]
    print(f"pinned H2D {bw / 1e9:.1f} GB/s, pageable {bandwidth.get('pageable_h2d_bytes_per_s', float('nan')) / 1e9:.1f} GB/s")
    t0 = time.perf_counter()
    model = build_model(preset, args.layers, args.device)
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    num_experts_total = sum(p.shape[0] for p in experts) // 2
    expert_total_bytes = sum(p.numel() * p.element_size() for p in experts)
    expert_bytes = expert_total_bytes // num_experts_total
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - expert_total_bytes
    print(f"model: {args.preset} x {args.layers} layers, {num_experts_total} experts of {expert_bytes / 2**20:.0f} MiB "
          f"({expert_total_bytes / 2**30:.1f} GiB), dense {dense_bytes / 2**30:.2f} GiB, built in {time.perf_counter() - t0:.1f}s")

    copy_alone = copy_engine_alone(model, args.device)
    print("copy engine alone: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in copy_alone.items() if k.endswith("_s")))
    diagnostics = routing_diagnostics(model, prompts(8, args.prompt_len, model.config.vocab_size), args.device)
    runs = []
    default_impl = model.config._experts_implementation
    for impl in ("eager",) if args.quick else (default_impl, "eager"):  # transformers' default (grouped_mm on GPU) and its eager loop
        set_experts_implementation(model, impl)
        for batch in args.batches:
            ids = prompts(batch, args.prompt_len, model.config.vocab_size)
            decode(model, ids, args.warmup_tokens, args.device)
            res = decode(model, ids, args.new_tokens, args.device)
            runs.append(dict(name=f"all on GPU (transformers {impl})", batch=batch,
                             decode_tokens_per_s=res["decode_tokens_per_s"], tokens=res["tokens"]))
            print_run(runs[-1])
    set_experts_implementation(model, default_impl)
    model.to("cpu")
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    mk_runs, mem = (engines_runs if args.variants == "engines" else moekit_runs)(
        model, args, expert_bytes, num_experts_total, bw)
    runs += mk_runs
    budget = dense_bytes + (num_experts_total // 2) * expert_bytes + args.reserve_bytes
    if not args.slots and not args.quick:
        runs += hf_runs(model, args, budget)

    # moekit computes experts in transformers' eager order: compare tokens with the eager run
    ref = {r["batch"]: r["tokens"] for r in runs if r["name"] == "all on GPU (transformers eager)"}
    for r in runs:
        if "tokens" in r:
            r["token_match_vs_all_gpu_eager"] = float((r["tokens"] == ref[r["batch"]][:, : r["tokens"].shape[1]])
                                                      .float().mean())
            del r["tokens"]
    goals = summarize_goals(runs)
    for key, value in goals.items():
        print(f"goal {key}: {value}")
    engines = summarize_engines(runs, args.baseline) if args.variants == "engines" else None
    ceilings = pooled_ceilings(runs) if args.variants == "engines" else None
    if engines is not None:
        add_pooled_fractions(engines, ceilings, args.baseline)
    for key, value in (engines or {}).items():
        print(f"engines {key}: " + json.dumps(value, default=lambda v: round(v, 4)))
    for batch, value in (ceilings or {}).items():
        print(f"all-resident pooled @ batch {batch}: " + json.dumps(value, default=lambda v: round(v, 1)))
    doc = {
        **run_header(args.device),
        "model": {"preset": args.preset, "layers": args.layers, "config": preset, "dtype": "bfloat16",
                  "weights": "random: transformers' _init_weights (normal, std = initializer_range = 0.02; norms 1)", "expert_bytes": expert_bytes, "experts": num_experts_total,
                  "expert_total_bytes": expert_total_bytes, "dense_bytes": dense_bytes},
        "budget": {"half_expert_slots": num_experts_total // 2, "quarter_expert_slots": num_experts_total // 4,
                   "gpu_budget_bytes_for_transformers": budget, "reserve_bytes": args.reserve_bytes},
        "bandwidth": bandwidth,
        "copy_engine_alone": copy_alone,
        "routing_diagnostics": diagnostics,
        "memory": mem,
        "variants": args.variants,
        "baseline": args.baseline if args.variants == "engines" else None,
        "goals": goals,
        "engines": engines,
        "all_resident_pooled": ceilings,
        "runs": runs,
    }
    out = args.out or result_path("offload", doc, args.device)
    write_result(doc, out, {"staging": plot_staging, "engines": plot_engines}.get(args.variants, plot))
    return 0


def run_header(device: str) -> dict:
    """What every offload result file starts with: the exact command, the UTC time, the machine
    (GPU name on CUDA) and the versions."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    return {"command": " ".join([sys.executable, *sys.argv]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"device": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform()},
            "versions": _versions()}


def result_path(what: str, header: dict, device: str) -> str:
    """``benchmarks/results/<what>_<machine>_<date>.json``."""
    tag = "".join(ch if ch.isalnum() else "-" for ch in header["machine"]["device"].lower()).strip("-") or device
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{what}_{tag}_{dt.date.today().isoformat()}.json")


def write_result(doc: dict, out: str, draw) -> None:
    """Write ``doc`` to ``out`` atomically (numbers that JSON lacks, e.g. numpy floats, as
    floats) and ``draw(doc, png)`` beside it when matplotlib is installed."""
    from moekit._io import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=2, default=float))
    try:
        draw(doc, os.path.splitext(out)[0] + ".png")
    except ImportError:  # matplotlib is optional (the "plot" extra)
        pass
    print(f"wrote {out}")


def _versions() -> dict:
    import transformers

    try:
        import accelerate

        acc = accelerate.__version__
    except ImportError:
        acc = None
    try:
        rev = os.environ.get("MOEKIT_GIT_REV") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "accelerate": acc, "python": platform.python_version(), "moekit_git": rev}


if __name__ == "__main__":
    sys.exit(main())
