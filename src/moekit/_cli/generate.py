"""``moekit generate``: greedy generation with offloaded experts, then the offload figures."""

from __future__ import annotations

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with a transformers MoE model whose experts live in CPU memory",
        description="Load a local transformers MoE model, keep the dense weights on the GPU and the "
        "routed experts in pinned CPU memory behind a GPU expert cache (moekit.offload), generate "
        "greedily and print hit rate (weights already on the GPU when needed), in-flight hit rate "
        "(prefetch copy still running then), prefetch precision/recall, H2D bytes per token, stall "
        "time, PCIe utilisation and tokens/s.")
    p.add_argument("--model", required=True, help="local model folder (config.json, weights, tokenizer)")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text (repeat for a batch)")
    p.add_argument("--offload", required=True, metavar="BUDGET",
                   help="GPU budget for the dense weights + expert slots (e.g. 20GB, 7.5GiB), or a bare "
                        "integer: that many GPU expert slots")
    p.add_argument("--policy", default="lru", help="cache policy: lru | lfu (default lru)")
    p.add_argument("--prefetch", default="none",
                   help="none | next_layer (next router on this layer's input) | layer_output (next router on "
                        "the decoder layer's output: later, more often right) | next_layer+layer_output (the first, "
                        "replaced by the second when it arrives) | layer_output2 (the next two MoE layers from the "
                        "decoder layer's output) (default none)")
    p.add_argument("--staging-slots", type=int, default=0,
                   help="GPU slots outside the cache where prefetched guesses wait: a guess enters the cache (and "
                        "evicts) only when a layer needs it, so a wrong guess evicts nothing; taken from the budget "
                        "when it is in bytes, on top of it when it is a slot count (default 0)")
    p.add_argument("--lead-chunks", type=int, default=2,
                   help="prefetch chunks kept queued on the copy stream; a large value queues whole guesses "
                        "at once (default 2)")
    p.add_argument("--cpu-compute", action="store_true",
                   help="compute a missing expert on the CPU when the measured cost model says it is faster")
    p.add_argument("--graphs", action="store_true",
                   help="replay the dense parts of each decode step (norms, attention, routers) from CUDA graphs, "
                        "with a static KV cache: less host time per step (needs CUDA)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the texts and figures to this JSON file")
    p.set_defaults(run=run)


def run(args) -> int:

    from rich.console import Console
    from rich.table import Table

    from moekit.hf.text import load_causal_lm
    from moekit.offload import graph_decode, offload
    from moekit.offload.session import generate_and_measure

    budget = args.offload.strip()
    slots, memory = (int(budget), None) if budget.isdigit() else (None, budget)
    model, tokenizer = load_causal_lm(args.model, args.dtype)
    handle = offload(model, cache_experts=slots, gpu_memory=memory, policy=args.policy,
                     prefetch=args.prefetch, cpu_compute=args.cpu_compute, device=args.device,
                     lead_chunks=args.lead_chunks, staging_slots=args.staging_slots)
    graphs = graph_decode(model) if args.graphs else None
    result = generate_and_measure(model, tokenizer, args.prompt, handle, args.max_new_tokens,
                                  static_cache=args.graphs)
    if graphs is not None:
        result["stats"].update({f"graph_{k}": v for k, v in graphs.stats().items()})
    console = Console()
    for prompt, text in zip(args.prompt, result["texts"]):
        console.print(f"[bold]{prompt}[/bold]{text}")
    table = Table(title=f"offload: {handle.num_slots} GPU expert slots (+{args.staging_slots} staging), "
                        f"policy={args.policy}, prefetch={args.prefetch}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("hit_rate", "inflight_hit_rate", "prefetch_precision", "prefetch_recall", "prefetch_lead_s",
                "h2d_bytes_per_token", "stall_s",
                "pcie_utilization", "copy_busy_fraction", "tokens_per_s", "decode_tokens_per_s", "cpu_computed", "cpu_busy_s",
                "demand_copies", "prefetch_copies", "staged_hits", "staged_misses", "graph_graphs", "graph_replays"):
        if key not in result["stats"]:
            continue
        value = result["stats"][key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    if args.json:
        from moekit._io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0
