"""``moekit trace``: record a Hugging Face MoE model's routing on a text file into a trace."""

from __future__ import annotations

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="record per-step, per-layer expert counts of a transformers MoE model on a text",
        description="Run a local transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
        "DeepSeek-V3) over a text file in windows of --seq-len tokens and write the routing trace "
        "(.npz: counts [steps, layers, experts] + metadata) that `moekit plan` reads.")
    p.add_argument("--model", required=True, help="local model folder (config.json, weights, tokenizer)")
    p.add_argument("--text", required=True, help="UTF-8 text file to run through the model")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.npz)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    import os

    import torch
    from rich.console import Console

    from moekit.hf.text import load_causal_lm, trace_text
    from moekit.trace import save_trace

    if not os.path.isfile(args.text):
        raise ValueError(f"--text: expected a text file, got {args.text!r}")
    with open(args.text, encoding="utf-8") as fh:
        text = fh.read()
    model, tokenizer = load_causal_lm(args.model, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    trace = trace_text(model, tokenizer, text, args.seq_len, args.batch_size, args.max_steps,
                       progress=not args.no_progress)
    trace.metadata["model"] = os.path.basename(os.path.normpath(args.model))
    save_trace(args.output, trace)
    Console().print(f"trace: {trace.num_steps} steps x {trace.num_layers} MoE layers x {trace.num_experts} experts "
                    f"(top_k={trace.metadata['top_k']}, {trace.metadata['tokens_per_step']} tokens/step) -> {args.output}")
    return 0
