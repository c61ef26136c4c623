"""Training loop: gradient accumulation, AdamW with warm-up + cosine decay, bf16 autocast on
GPU, atomic checkpoints with exact resume, and data parallelism under ``torchrun``.

Data parallel: when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU, NCCL on
GPU) the model is wrapped in DDP and every rank draws its own micro-batches (see
``loader.micro_batch``); the MoE layers all-reduce their global-batch counts over the WORLD
group. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import moekit
from moekit import metrics
from moekit._io import atomic_write_text
from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.corpus import Corpus
from moekit.train.evaluate import evaluate
from moekit.train.loader import LoaderConfig, MicroBatch, micro_batch
from moekit.train.model import LMConfig, MoELM, lm_config_to_dict

__all__ = ["TrainConfig", "lr_at", "train", "forward_backward", "build_optimizer"]


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps; grad_accum: micro-batches per step and rank; lr: peak learning
    rate, reached after warmup_steps, then cosine decay to ``lr * min_lr_ratio`` at ``steps``;
    eval_every: steps between held-out evaluations (and one at the end);
    eval_seqs_per_domain / eval_batch_size: size of the held-out evaluation;
    checkpoint_every: steps between checkpoints (0: only at the end); seed: model init seed;
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``; timing_warmup: steps left out
    of the step-time figures."""

    steps: int = 200
    grad_accum: int = 4
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_seqs_per_domain: int = 32
    eval_batch_size: int = 32
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "auto"
    timing_warmup: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "eval_every", "eval_seqs_per_domain", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup_steps / checkpoint_every: expected >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or the router bias)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def _unwrap(model: torch.nn.Module) -> MoELM:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def forward_backward(model: torch.nn.Module, mb: MicroBatch, grad_scale: float,
                     amp_dtype: torch.dtype | None, sync: bool = True) -> dict:
    """One micro-batch: forward, ``(ce + aux) * grad_scale`` backward.

    ``sync=False`` skips the DDP gradient all-reduce (all but the last micro-batch of a step).
    Returns ``ce`` and ``aux`` (floats, unscaled) and ``counts_LE`` ([L, E] float64 tensor).
    """
    device = next(model.parameters()).device
    tokens = mb.tokens_BS1.to(device, non_blocking=True)
    ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else nullcontext()
    with ctx:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(tokens[:, :-1])
        ce = F.cross_entropy(out.logits_BSV.float().flatten(0, 1), tokens[:, 1:].flatten())
        ((ce + out.aux_loss) * grad_scale).backward()
    counts = torch.stack([r.tokens_per_expert.detach() for r in out.routings])
    return {"ce": ce.detach(), "aux": out.aux_loss.detach(), "counts_LE": counts.double()}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: expected cpu (no CUDA device here), got cuda")
        if dist.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)


def train(lm_cfg: LMConfig, loader_cfg: LoaderConfig, cfg: TrainConfig, corpus: Corpus,
          run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          name: str = "run", stop_at: int | None = None, checkpoint: bool = True) -> dict:
    """Train from scratch (or resume from ``run_dir``'s checkpoint) and evaluate.

    Writes ``run_dir/metrics.json`` and a checkpoint (rank 0 only) when ``run_dir`` is given.
    Returns the metrics dict: configs, per-step ``history``, ``evals`` and the ``final`` eval.
    stop_at: leave after this many completed steps with a checkpoint and no final evaluation
    (a time-boxed or pre-empted job; resume later with ``resume=True``); the schedule still
    runs to ``cfg.steps``. The result then has ``stopped_at`` and ``final = None``.
    checkpoint: False writes no checkpoint at all (comparison runs that only report figures).
    """
    if stop_at is not None and not 0 < stop_at <= cfg.steps:
        raise ValueError(f"stop_at: expected 1..{cfg.steps} (steps) or None, got {stop_at}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = _resolve_device(cfg.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if resume and run_dir is None:
        raise ValueError("resume: expected a run directory to resume from")
    torch.manual_seed(cfg.seed)  # same initial weights for every arm of a comparison
    model = MoELM(lm_cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    history: list[dict] = []
    evals: list[dict] = []
    start = 0
    if resume:
        meta = load_checkpoint(run_dir, model, optimizer)
        start, history, evals = int(meta["step"]), meta.get("history", []), meta.get("evals", [])
    ddp = world > 1
    train_model = (torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True) if ddp else model)
    train_model.train()
    tokens_per_step = world * cfg.grad_accum * loader_cfg.micro_batch_size * loader_cfg.seq_len
    bar = _progress(progress and rank == 0)
    task = bar.add_task(name, total=cfg.steps, completed=start, status="") if bar else None
    meta_common = {"lm": lm_config_to_dict(lm_cfg), "loader": dataclasses.asdict(loader_cfg),
                   "train": dataclasses.asdict(cfg), "world_size": world,
                   "domains": list(corpus.domains)}

    def _eval(step: int) -> dict:
        res = evaluate(model, corpus, loader_cfg.seq_len, cfg.eval_seqs_per_domain,
                       cfg.eval_batch_size, device, amp_dtype)
        res["step"] = step
        return res

    def _save(step: int) -> None:
        if checkpoint and run_dir is not None and rank == 0:
            save_checkpoint(run_dir, model, optimizer,
                            {"step": step, "history": history, "evals": evals, **meta_common})

    with bar or nullcontext():
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ce_sum = aux_sum = 0.0
            counts_LE = None
            for micro in range(cfg.grad_accum):
                mb = micro_batch(corpus, loader_cfg, step, micro, rank, world)
                res = forward_backward(train_model, mb, 1.0 / cfg.grad_accum, amp_dtype,
                                       sync=micro == cfg.grad_accum - 1)
                ce_sum, aux_sum = ce_sum + res["ce"], aux_sum + res["aux"]
                counts_LE = res["counts_LE"] if counts_LE is None else counts_LE + res["counts_LE"]
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moekit.optimizer_step_done(model)
            stats = torch.stack([ce_sum.double().cpu() / cfg.grad_accum,
                                 aux_sum.double().cpu() / cfg.grad_accum])
            if ddp:  # figures of the global batch, not of this rank
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu() / world
                counts_LE = counts_LE.to(device)
                dist.all_reduce(counts_LE)
                counts_LE = counts_LE.cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            history.append({"step": step + 1, "loss": float(stats[0]), "aux": float(stats[1]),
                            "lr": lr, "grad_norm": float(grad_norm), "step_time_s": dt,
                            "max_vio_batch": float(metrics.max_vio(counts_LE.cpu()).mean())})
            done = step + 1
            if done % cfg.eval_every == 0 and done < cfg.steps:
                evals.append(_eval(done))
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save(done)
            if bar:
                bar.update(task, completed=done, status=f"loss {stats[0]:.3f}  lr {lr:.1e}  "
                           f"{tokens_per_step / dt:,.0f} tok/s")
            if stop_at is not None and done == stop_at and done < cfg.steps:
                _save(done)
                return {"name": name, **meta_common, "stopped_at": done, "history": history,
                        "evals": evals, "final": None}
    final = _eval(cfg.steps) if (not evals or evals[-1]["step"] != cfg.steps) else evals[-1]
    if not evals or evals[-1]["step"] != cfg.steps:
        evals.append(final)
    _save(cfg.steps)
    times = np.array([h["step_time_s"] for h in history[cfg.timing_warmup:]] or
                     [h["step_time_s"] for h in history] or [float("nan")])
    result = {
        "name": name, **meta_common, "device": str(device), "device_name": _device_name(device),
        "torch": torch.__version__, "amp": str(amp_dtype),
        "tokens_per_step": tokens_per_step,
        "step_time_s_median": float(np.median(times)), "step_time_s_mean": float(times.mean()),
        "tokens_per_s": float(tokens_per_step / np.median(times)),
        "history": history, "evals": evals,
        "final": {k: v for k, v in final.items() if k != "counts_LDE"},
        "counts_LDE": final["counts_LDE"],
    }
    if run_dir is not None and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(run_dir) / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result
