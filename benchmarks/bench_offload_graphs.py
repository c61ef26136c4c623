"""Decode graphs (``moekit.offload.graph_decode``) against eager launches, offloaded Mixtral-8x7B.

The model and budget of ``bench_offload.py`` (Mixtral-8x7B config, 4 decoder layers, random
bf16 weights; 32 experts of 336 MiB). Every moekit run decodes with a static KV cache, once
with the dense parts launched eagerly and once replayed from CUDA graphs, the two in
alternating order, ``--repeats`` times (interleaved, so that the VM's drift hits both):

- lru at batch 1 with half (16), a quarter (8) and an eighth (4) of the expert slots: the copy
  bound at the measured hit rate, and the time per step with no copy running;
- lru and lfu + CPU compute at batch 8 with half the slots;
- every expert resident (32 slots), batch 1 and 8: the all-on-GPU ceiling of each mode;
- lru, 16 slots, batch 1 with the dynamic cache (the earlier sessions' setting, eager only);
- with ``--hf-slots N``: transformers' own offloading (``bench_offload.hf_runs``) under the GPU
  budget of N slots, in the same process (the "10x transformers' best offloading" comparison).

First, the plain model entirely on the GPU (transformers' eager experts, static cache) with and
without graphs, once per batch. Prints a table and writes a JSON (and PNG) beside ``--out``.

    python benchmarks/bench_offload_graphs.py --out $OUT/offload_graphs_h100_<date>.json
    python benchmarks/bench_offload_graphs.py --preset tiny --device cpu --repeats 1   # dry run (no graphs)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_offload as bench  # noqa: E402

# (label, policy, cpu_compute, slots as a fraction of all experts, batches)
VARIANTS = [("lru", "lru", False, 1 / 2, (1, 8)), ("lru", "lru", False, 1 / 4, (1,)),
            ("lru", "lru", False, 1 / 8, (1,)), ("lfu +cpu", "lfu", True, 1 / 2, (8,)),
            ("all resident", "lru", False, 1.0, (1, 8))]


def static_cache(model, length: int):
    """A ``transformers`` static KV cache of ``length`` positions, allocated by its first use."""
    import transformers as T

    return T.StaticCache(config=model.config, max_cache_len=length)


def run_mode(model, handle, cpu_model, args, name, batch, expert_bytes, bw, graphs_on: bool, kv_cache, **config):
    """One :func:`bench_offload.measure` run with decode graphs on or off (a fresh capture each
    time: the warm-up generation captures, the timed one replays)."""
    from moekit.offload import graph_decode

    graphs = graph_decode(model) if graphs_on else None
    try:
        run = bench.measure(model, handle, cpu_model, args, name, batch, expert_bytes, bw, kv_cache=kv_cache,
                            **config)
        if graphs is not None:
            run["graphs"] = graphs.stats()
    finally:
        if graphs is not None:
            graphs.remove()
    run.update(graphs_on=graphs_on, cache="static" if kv_cache is not None else "dynamic")
    print(f"  ^ graphs {'on' if graphs_on else 'off'}, {run['cache']} cache", flush=True)
    return run


def plain_runs(model, args) -> list:
    """The plain model on the GPU (transformers' eager experts), static cache, graphs off / on."""
    from moekit.offload import graph_decode

    runs = []
    bench.set_experts_implementation(model, "eager")
    for batch in args.batches:
        ids = bench.prompts(batch, args.prompt_len, model.config.vocab_size)
        kv = static_cache(model, args.prompt_len + max(args.warmup_tokens, args.new_tokens))
        for graphs_on in (False, True):
            graphs = graph_decode(model) if graphs_on and args.device == "cuda" else None
            bench.decode(model, ids, args.warmup_tokens, args.device, kv)
            res = bench.decode(model, ids, args.new_tokens, args.device, kv)
            runs.append(dict(name="all on GPU (transformers eager)", batch=batch, graphs_on=graphs is not None,
                             cache="static", decode_tokens_per_s=res["decode_tokens_per_s"], tokens=res["tokens"]))
            if graphs is not None:
                graphs.remove()
            bench.print_run(runs[-1])
    return runs


def moekit_runs(cpu_model, args, expert_bytes: int, total: int, bw: float) -> list:
    from moekit.offload import offload

    model = copy.deepcopy(cpu_model)
    handle = offload(model, cache_experts=total // 2, device=args.device)
    length = args.prompt_len + max(args.warmup_tokens, args.new_tokens)
    caches = {b: static_cache(model, length) for b in args.batches}
    modes = (False, True) if args.device == "cuda" else (False,)
    runs = []
    for repeat in range(args.repeats):
        for label, policy, cpu, share, batches in VARIANTS:
            slots = max(1, int(total * share))
            for batch in [b for b in batches if b in args.batches]:
                order = modes if repeat % 2 == 0 else modes[::-1]
                for graphs_on in order:
                    name = bench.run_name(policy, "none", 0, 2, cpu, slots, 0, total)
                    run = run_mode(model, handle, cpu_model, args, name, batch, expert_bytes, bw, graphs_on,
                                   caches[batch], policy=policy, prefetch="none", prefetch_extra=0, lead_chunks=2,
                                   cpu_compute=cpu, cache_experts=slots, staging_slots=0)
                    run.update(repeat=repeat, label=label)
                    runs.append(run)
                    bench.print_run(run)
        if 1 in args.batches:  # the earlier sessions' setting: dynamic cache, eager
            run = run_mode(model, handle, cpu_model, args, bench.run_name("lru", "none", 0, 2, False, total // 2, 0, total),
                           1, expert_bytes, bw, False, None, policy="lru", prefetch="none", prefetch_extra=0,
                           lead_chunks=2, cpu_compute=False, cache_experts=total // 2, staging_slots=0)
            run.update(repeat=repeat, label="lru")
            runs.append(run)
            bench.print_run(run)
    del model, handle
    gc.collect()
    return runs


def summarize(runs: list) -> dict:
    """Per (name, batch, cache, graphs): medians over the repeats of tokens/s, fraction of the copy
    bound, ms per step with no copy running and the engine's host ms per layer call; and per
    batch each variant's median over the all-resident median of the same mode."""
    ok = [r for r in runs if "error" not in r and "repeat" in r]
    out = {}
    def what(r):
        return (r["name"] if "resident" in r["name"] else f"{r['name']} [{r['slots']} slots]",
                r["batch"], r["cache"], r["graphs_on"])

    for key in sorted({what(r) for r in ok}, key=str):
        rs = [r for r in ok if what(r) == key]
        row = {"tok_s_all": [round(r["decode_tokens_per_s"], 2) for r in rs]}
        for f in ("decode_tokens_per_s", "fraction_of_copy_bound", "no_copy_ms_per_step", "step_ms",
                  "engine_host_ms_per_layer_call", "decode_hit_rate", "copy_busy_fraction"):
            vals = [r[f] for r in rs if isinstance(r.get(f), (int, float))]
            if vals and not (f == "fraction_of_copy_bound" and rs[0]["cpu_compute"]):
                row[f] = statistics.median(vals)
        out[f"{key[0]} @ batch {key[1]}, {key[2]} cache, graphs {'on' if key[3] else 'off'}"] = row
    for k, row in out.items():
        where = k.split(" @ ")[1]  # "batch B, <cache> cache, graphs <mode>"
        ceiling = out.get(f"moekit all experts resident @ {where}")
        if ceiling and "decode_tokens_per_s" in row:
            row["fraction_of_all_resident_same_mode"] = row["decode_tokens_per_s"] / ceiling["decode_tokens_per_s"]
    return out


def plot(doc: dict, path: str) -> None:
    """Median tokens/s per variant, graphs off / on side by side, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, batch in zip(axes, (1, 8)):
        names = sorted({k.split(", graphs")[0] for k in summary if f"@ batch {batch}," in k},
                       key=lambda n: (summary.get(n + ", graphs off", {}).get("decode_tokens_per_s", 0)))
        for j, mode in enumerate(("off", "on")):
            vals = [summary.get(f"{n}, graphs {mode}", {}).get("decode_tokens_per_s", 0) for n in names]
            ax.barh([i + (0.2 if j else -0.2) for i in range(len(names))], vals, height=0.4,
                    color="tab:gray" if mode == "off" else "tab:blue", label=f"graphs {mode}")
            for i, n in enumerate(names):
                row = summary.get(f"{n}, graphs {mode}", {})
                if row:
                    text = f"{row['decode_tokens_per_s']:.1f}"
                    if "fraction_of_copy_bound" in row and "resident" not in n:
                        text += f"  {row['fraction_of_copy_bound']:.2f} of copy bound"
                    if "no_copy_ms_per_step" in row and "resident" not in n:
                        text += f", no copy {row['no_copy_ms_per_step']:.1f} ms"
                    ax.text(row["decode_tokens_per_s"] * 1.05, i + (0.2 if j else -0.2), text, va="center", fontsize=7)
        hf = [k for k in summary if k.startswith("transformers") and k.endswith(f"@ batch {batch}")]
        for i, k in enumerate(hf, start=len(names)):  # transformers' own offloading, one run each
            value = summary[k]["decode_tokens_per_s"]
            ax.barh([i], [value], height=0.4, color="tab:red", label="transformers offloading" if i == len(names) else None)
            ax.text(value * 1.05, i, f"{value:.2f}", va="center", fontsize=7)
        names += hf
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.replace(f" @ batch {batch}", "") for n in names], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(0.3 if hf else 5, 40000)  # room for the labels right of the bars
        ax.set_xlabel("decode tokens/s (median of repeats, log)")
        ax.set_title(f"batch {batch}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{doc['model']['preset']} config, {doc['model']['layers']} layers, {doc['machine']['device']}: "
                 "dense parts eager (gray) vs replayed from CUDA graphs (blue); red: transformers' offloading", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b", choices=sorted(bench.PRESETS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8])
    p.add_argument("--reserve-bytes", type=int, default=2 * 2**30)
    p.add_argument("--hf-slots", type=int, default=0,
                   help="also run transformers' own offloading (accelerate device_map: auto, and experts on the "
                        "CPU) under the GPU budget of this many expert slots + dense weights + reserve (default 0: "
                        "skip)")
    p.add_argument("--hf-new-tokens", type=int, default=4, help="decode steps of the transformers offloading runs")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, metavar="JSON", help="only redraw the PNG of an existing result file")
    args = p.parse_args(argv)
    if args.plot:
        return bench.redraw(args.plot, plot)
    torch.manual_seed(0)
    bw = bench.measure_bandwidth(args.device)
    print(f"pinned H2D {bw['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s")
    model = bench.build_model(bench.PRESETS[args.preset], args.layers, args.device)
    experts = [q for n, q in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    total = sum(q.shape[0] for q in experts) // 2
    expert_bytes = sum(q.numel() * q.element_size() for q in experts) // total
    runs = plain_runs(model, args)
    model.to("cpu")
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    runs += moekit_runs(model, args, expert_bytes, total, bw["pinned_h2d_bytes_per_s"])
    if args.hf_slots:
        dense = sum(q.numel() * q.element_size() for q in model.parameters()) - total * expert_bytes
        budget = dense + args.hf_slots * expert_bytes + args.reserve_bytes
        for r in bench.hf_runs(model, args, budget):
            r.update(budget_slots=args.hf_slots, gpu_budget_bytes=budget)
            runs.append(r)
    ref = {r["batch"]: r["tokens"] for r in runs if r["name"].startswith("all on GPU") and not r["graphs_on"]}
    for r in runs:
        if "tokens" in r and r["batch"] in ref:
            r["token_match_vs_all_gpu_eager_static"] = float(
                (r["tokens"] == ref[r["batch"]][:, : r["tokens"].shape[1]]).float().mean())
            del r["tokens"]
    summary = summarize(runs)
    for r in runs:
        if r["name"].startswith("transformers") and "error" not in r:
            summary[f"{r['name']} [{r['budget_slots']} slots budget] @ batch {r['batch']}"] = {
                "decode_tokens_per_s": r["decode_tokens_per_s"]}
    for k, v in summary.items():
        print(f"{k}: " + json.dumps(v, default=lambda x: round(x, 4)))
    doc = {**bench.run_header(args.device),
           "model": {"preset": args.preset, "layers": args.layers, "experts": total, "expert_bytes": expert_bytes},
           "bandwidth": bw, "summary": summary, "runs": runs}
    out = args.out or bench.result_path("offload_graphs", doc, args.device)
    bench.write_result(doc, out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
