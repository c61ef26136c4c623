"""Rebalancing in the loop: expert-parallel training while routing drifts, replanning every N
steps, three placement policies side by side in the same run.

    python benchmarks/bench_ep_rebalance.py [--world 2] [--device cpu] [--steps 120] [--replan-every 10]

Spawns ``--world`` processes (gloo on CPU, NCCL on GPUs, one process per GPU) forming one
expert-parallel group. Each holds a stack of ``--layers`` :class:`moekit.parallel.ExpertParallelExperts`
with ``R = E + world * redundant_per_rank`` physical slots, trained with Adam. Per step and
layer, expert popularity comes from a seeded :func:`moekit.trace.synthetic_trace` (skewed,
drifting log-popularity, per-step noise, bursts); every rank samples its tokens' ``k``
distinct experts from that step's popularity (Gumbel-top-k, seeded by step and rank). The three
arms run interleaved, step by step, on the same tokens and the same routing:

- ``static``: the initial plan (made from step 0's popularity) for the whole run;
- ``eplb``: every ``N`` steps a full replan, ``plan(load, config, algorithm="eplb")`` (EPLB's
  algorithm, which ignores where experts are);
- ``moekit``: every ``N`` steps a movement-aware replan, ``plan(load, config, previous=current)``.

``load`` is the routed counts of the last ``N`` steps, all-reduced over ranks. A new plan is
installed with :func:`moekit.parallel.apply_plan` (weights and Adam state move; grads are
cleared before). Recorded per step and arm: the step time (forward + backward + gradient
reduction + optimizer step, the slowest rank) and the balancedness of that step's real routed
counts under the plan in service (:func:`moekit.metrics.balancedness`); per replan: planning
time, ``apply_plan`` time, moves and bytes moved (:class:`moekit.parallel.MoveReport`).

Issue 7 goal this run checks: movement-aware replans move at most 20% of the bytes that full
replans move. The 8-GPU run of the issue (OLMoE-like layer) is::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python benchmarks/bench_ep_rebalance.py --device cuda --world 8 --experts 64 --top-k 8 \\
        --dim 2048 --ffn 1024 --redundant-per-rank 2 --tokens 8192 --layers 2 --steps 200 --replan-every 20
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ARMS = ("static", "eplb", "moekit")
GOAL_BYTES_RATIO = 0.20  # issue 7: movement-aware replans move <= 20% of the bytes of full replans


@dataclass(frozen=True)
class LoopSettings:
    """Sizes of one run. tokens: per rank and step. redundant_per_rank: extra slots per rank
    (``R = E + world * redundant_per_rank``). skew / drift / step_noise / burst_prob: see
    :func:`moekit.trace.synthetic_trace` (drift: std of the log-popularity random walk per step).
    move_price: see :class:`moekit.placement.ReplanConfig`."""

    steps: int = 240
    replan_every: int = 10
    tokens: int = 512
    dim: int = 128
    ffn: int = 128
    num_experts: int = 16
    top_k: int = 4
    layers: int = 2
    redundant_per_rank: int = 2
    skew: float = 2.0
    drift: float = 0.1
    step_noise: float = 0.1
    burst_prob: float = 0.02
    lr: float = 1e-3
    seed: int = 0
    move_price: float = 0.003  # the movement-aware arm's ReplanConfig.move_price (0.003 is its default)

    def __post_init__(self) -> None:
        for name in ("steps", "replan_every", "tokens", "dim", "ffn", "num_experts", "top_k", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.redundant_per_rank < 0:
            raise ValueError(f"redundant_per_rank: expected >= 0, got {self.redundant_per_rank}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected <= num_experts={self.num_experts}, got {self.top_k}")


# ------------------------------------------------------------------------------ routing


def popularity(s: LoopSettings) -> np.ndarray:
    """``[steps, L, E]`` expert popularity per step (rows sum to 1), from a synthetic trace with
    many tokens per step so that its counts are the popularity, not a noisy sample of it."""
    from moekit.trace import synthetic_trace
    trace = synthetic_trace(s.steps, s.layers, s.num_experts, s.top_k, 1_000_000, skew=s.skew, drift=s.drift,
                            step_noise=s.step_noise, burst_prob=s.burst_prob, seed=s.seed)
    counts = trace.counts.astype(np.float64) + 1.0  # no expert is ever exactly unused
    return counts / counts.sum(axis=2, keepdims=True)


def sample_routing(p_LE: np.ndarray, tokens: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """``[L, T, k]`` distinct experts per token: Gumbel-top-k of ``log p`` per layer."""
    logp_L1E = torch.from_numpy(np.log(p_LE))[:, None, :]
    u = torch.rand(p_LE.shape[0], tokens, p_LE.shape[1], generator=gen, dtype=torch.float64)
    return torch.topk(logp_L1E - torch.log(-torch.log(u.clamp_min(1e-300))), top_k, dim=2).indices


# ------------------------------------------------------------------------------ model


class ExpertStack(nn.Module):
    """``L`` expert-parallel layers with residual connections: ``h <- h + experts_l(h)``.
    Routing is given (``indices_LTK`` / ``weights_LTK``) so that its drift is controlled."""

    def __init__(self, s: LoopSettings, group, phy2log_LR: torch.Tensor):
        super().__init__()
        from moekit.experts import ExpertsConfig
        from moekit.parallel import ExpertParallelExperts
        cfg = ExpertsConfig(s.dim, s.ffn, s.num_experts)
        self.layers = nn.ModuleList(ExpertParallelExperts(cfg, group, phy2log_LR[l]) for l in range(s.layers))
        for l, layer in enumerate(self.layers):
            layer.init_logical(s.seed * 101 + l)  # replicas (and every arm) start equal

    def forward(self, x_TD: torch.Tensor, indices_LTK: torch.Tensor, weights_LTK: torch.Tensor) -> torch.Tensor:
        h = x_TD
        for l, layer in enumerate(self.layers):
            h = h + layer(h, indices_LTK[l], weights_LTK[l])
        return h

    def phy2log(self) -> np.ndarray:
        return torch.stack([layer.phy2log.cpu() for layer in self.layers]).numpy()


def replan(arm: str, load_LE: np.ndarray, config, current_LR: np.ndarray, move_price: float) -> np.ndarray:
    """The arm's next ``phy2log [L, R]`` for the window load ``load_LE``."""
    from moekit.placement import ReplanConfig, plan
    if arm == "eplb":
        return plan(load_LE, config, algorithm="eplb").phy2log.numpy()
    if arm == "moekit":
        return plan(load_LE, config, previous=current_LR, replan=ReplanConfig(move_price=move_price)).phy2log.numpy()
    raise ValueError(f"arm: expected 'eplb' or 'moekit', got {arm!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the loop


def run_loop(s: LoopSettings, group=None, device: torch.device | None = None,
             dtype: torch.dtype = torch.float32, progress=None) -> dict:
    """Train the three arms for ``s.steps`` steps on this rank (collective over ``group``).

    Returns (on every rank) a dict with ``steps`` (per arm: ``step_ms`` [steps], slowest rank;
    ``balancedness`` [steps]; ``plan_index`` [steps], which replan was in service), ``replans``
    (per arm: a list of dicts: step, moves, bytes_total, weight_bytes, state_bytes, plan_s, apply_s,
    phy2log ``[L, R]``), ``expert_bytes`` (bytes of one expert's weights), ``global_counts``
    ``[steps, L, E]`` (routed counts summed over ranks), ``initial_phy2log`` ``[L, R]`` and
    ``logical_weight_abs_sum`` (per arm, per layer and weight: sum of |w| of the logical experts
    at the end; equal across arms, since placement does not change training). device: default CPU.
    """
    from moekit.metrics import balancedness
    from moekit.parallel import reduce_gradients
    from moekit.placement import PlacementConfig, plan

    device = device if device is not None else torch.device("cpu")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if s.num_experts % world or s.num_experts // world + s.redundant_per_rank > s.num_experts:
        raise ValueError(f"num_experts / redundant_per_rank: expected num_experts={s.num_experts} a multiple of "
                         f"world={world} and at most {s.num_experts} slots per rank, got "
                         f"{s.num_experts // world} + {s.redundant_per_rank}")
    config = PlacementConfig(num_replicas=s.num_experts + world * s.redundant_per_rank, num_gpus=world)
    pop_SLE = popularity(s)
    initial = plan(pop_SLE[0] * s.tokens * world * s.top_k, config).phy2log
    models, optims = {}, {}
    for arm in ARMS:
        # built on the CPU: init_logical draws from CPU generators (replicas start equal)
        models[arm] = ExpertStack(s, group, initial).to(device, dtype)
        optims[arm] = torch.optim.Adam(models[arm].parameters(), lr=s.lr)
    local_counts_SLE = torch.zeros(s.steps, s.layers, s.num_experts, dtype=torch.int64)
    step_ms = torch.zeros(len(ARMS), s.steps, dtype=torch.float64)
    plan_index = np.zeros((len(ARMS), s.steps), dtype=np.int64)
    placements = {arm: [initial.numpy()] for arm in ARMS}
    replans = {arm: [] for arm in ARMS}
    data_gen = torch.Generator(device=device)
    for step in range(s.steps):
        if step > 0 and step % s.replan_every == 0:
            window = local_counts_SLE[step - s.replan_every:step].sum(0).to(device)  # NCCL: device tensors
            dist.all_reduce(window, group=group)
            for arm in ARMS[1:]:
                replans[arm].append(_replan_and_apply(arm, window.cpu().double().numpy(), config, s.move_price,
                                                      models[arm], optims[arm], step, group, device))
                placements[arm].append(replans[arm][-1]["phy2log"])
        step_seed = (s.seed * 1_000_003 + step) * 4099 + rank
        gen = torch.Generator().manual_seed(step_seed)
        idx_LTK = sample_routing(pop_SLE[step], s.tokens, s.top_k, gen)
        local_counts_SLE[step] = torch.stack([torch.bincount(i.reshape(-1), minlength=s.num_experts)
                                              for i in idx_LTK])
        w_LTK = torch.softmax(torch.randn(s.layers, s.tokens, s.top_k, generator=gen), -1)
        # inputs and targets drawn where they are used: on the CPU, two [T, D] draws per step
        # (8192 x 2048) took longer than the three arms' GPU steps together; the routing, which
        # decides the plans and the bytes moved, stays on the CPU generator (the same on any device)
        x_TD = torch.randn(s.tokens, s.dim, generator=data_gen.manual_seed(step_seed), device=device, dtype=dtype)
        target_TD = torch.randn(s.tokens, s.dim, generator=data_gen, device=device, dtype=dtype)
        idx_LTK, w_LTK = idx_LTK.to(device), w_LTK.to(device, dtype)
        # On 4x H200 (2026-11-28) the arm timed first in every step, always `static` then, was
        # 20% slower before any replan, with the same placement as the others (the GPUs idle
        # through the routing draws on the CPU just before it: a likely cause, not verified).
        # The order rotates per step (the same on every rank: the arms' steps are collective),
        # so each arm is timed first equally often.
        shift = step % len(ARMS)
        for arm in ARMS[shift:] + ARMS[:shift]:
            a = ARMS.index(arm)
            model, opt = models[arm], optims[arm]
            dist.barrier(group=group)  # every rank starts the timed step together
            _sync(device)
            t0 = time.perf_counter()
            loss = (model(x_TD, idx_LTK, w_LTK).float() - target_TD.float()).pow(2).mean()
            loss.backward()
            reduce_gradients(model)
            opt.step()
            opt.zero_grad(set_to_none=True)  # grads do not travel with a new plan
            _sync(device)
            step_ms[a, step] = (time.perf_counter() - t0) * 1e3
            plan_index[a, step] = len(placements[arm]) - 1
        if progress is not None:
            progress(step + 1)
    step_ms, counts_SLE = step_ms.to(device), local_counts_SLE.to(device)
    dist.all_reduce(step_ms, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(counts_SLE, group=group)
    step_ms, counts = step_ms.cpu(), counts_SLE.cpu().double().numpy()
    steps = {}
    for a, arm in enumerate(ARMS):
        bal = [balancedness(counts[t], placements[arm][plan_index[a, t]], world) for t in range(s.steps)]
        steps[arm] = {"step_ms": step_ms[a].tolist(), "balancedness": bal, "plan_index": plan_index[a].tolist()}
    layer = models["static"].layers[0].local
    expert_bytes = (layer.w_in[0].numel() + layer.w_out[0].numel()) * layer.w_in.element_size()
    # where an expert lives does not change the math: every arm ends with the same logical weights
    checksum = {arm: [float(w.double().abs().sum()) for l in models[arm].layers for w in l.gather_logical()]
                for arm in ARMS}
    return {"steps": steps, "replans": replans, "expert_bytes": int(expert_bytes), "logical_weight_abs_sum": checksum,
            "initial_phy2log": initial.tolist(), "num_replicas": config.num_replicas, "world": world,
            "global_counts": counts.astype(np.int64).tolist()}


def _replan_and_apply(arm, load_LE, config, move_price, model, optim, step, group, device) -> dict:
    """Plan on rank 0 (broadcast, so every rank installs the same plan), apply it, time both."""
    from moekit.parallel import apply_plan
    current = model.phy2log()
    t0 = time.perf_counter()
    new_LR = torch.from_numpy(replan(arm, load_LE, config, current, move_price)) if dist.get_rank(group) == 0 \
        else torch.empty(current.shape, dtype=torch.int64)
    plan_s = time.perf_counter() - t0
    new_LR = new_LR.to(device)
    dist.broadcast(new_LR, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    new_LR = new_LR.cpu()
    dist.barrier(group=group)
    _sync(device)
    t0 = time.perf_counter()
    report = apply_plan(model, new_LR, optim)
    _sync(device)
    apply_s = time.perf_counter() - t0
    times = torch.tensor([plan_s, apply_s], dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return {"step": step, "moves": report.moves, "bytes_total": report.bytes_total,
            "weight_bytes": report.weight_bytes_total, "state_bytes": report.state_bytes_total,
            "plan_s": float(times[0]), "apply_s": float(times[1]), "phy2log": new_LR.numpy().tolist()}


# ------------------------------------------------------------------------------ summary


def summarize(result: dict, s: LoopSettings) -> dict:
    """Per arm: mean step time, tokens/s per rank (steps alone and with the replans' time),
    mean balancedness (all steps, and from the first replan on), replans, moves, bytes moved;
    and the issue-7 ratio: movement-aware bytes / full-replan bytes."""
    out = {}
    first = s.replan_every if s.steps > s.replan_every else 0
    for arm in ARMS:
        st, rp = result["steps"][arm], result["replans"][arm]
        ms = np.array(st["step_ms"])
        bal = np.array(st["balancedness"])
        replan_s = sum(r["plan_s"] + r["apply_s"] for r in rp)
        out[arm] = {
            "median_step_ms": float(np.median(ms)),
            "tokens_per_s_per_rank": s.tokens / (float(np.median(ms)) / 1e3),
            "tokens_per_s_per_rank_incl_replans": s.tokens * s.steps / (ms.sum() / 1e3 + replan_s),
            "mean_balancedness": float(bal.mean()),
            "mean_balancedness_after_first_replan": float(bal[first:].mean()),
            "replans": len(rp),
            "moves": sum(r["moves"] for r in rp),
            "bytes_moved": sum(r["bytes_total"] for r in rp),
            "weight_bytes_moved": sum(r["weight_bytes"] for r in rp),
            "plan_s_total": sum(r["plan_s"] for r in rp),
            "apply_s_total": sum(r["apply_s"] for r in rp),
        }
    full = out["eplb"]["bytes_moved"]
    ratio = out["moekit"]["bytes_moved"] / full if full else float("nan")
    return {"arms": out, "moekit_over_eplb_bytes": ratio,
            "goal_moekit_bytes_le_0.20_of_eplb": bool(full and ratio <= GOAL_BYTES_RATIO)}


def print_table(summary: dict, s: LoopSettings) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"rebalancing in the loop: {s.steps} steps, replan every {s.replan_every}, "
                        f"movement-aware move_price {s.move_price}")
    for col in ("arm", "median step ms", "k tok/s/rank", "incl. replans", "balancedness",
                "bal. after 1st replan", "replans", "moves", "MB moved", "plan s", "apply s"):
        table.add_column(col, justify="right")
    for arm, a in summary["arms"].items():
        table.add_row(arm, f"{a['median_step_ms']:.2f}", f"{a['tokens_per_s_per_rank'] / 1e3:.1f}",
                      f"{a['tokens_per_s_per_rank_incl_replans'] / 1e3:.1f}", f"{a['mean_balancedness']:.3f}",
                      f"{a['mean_balancedness_after_first_replan']:.3f}", str(a["replans"]), str(a["moves"]),
                      f"{a['bytes_moved'] / 1e6:.1f}", f"{a['plan_s_total']:.2f}", f"{a['apply_s_total']:.2f}")
    console = Console(width=160)  # all columns, also when stdout is not a terminal
    console.print(table)
    ok = "met" if summary["goal_moekit_bytes_le_0.20_of_eplb"] else "NOT met"
    console.print(f"movement-aware / full-replan bytes moved: {summary['moekit_over_eplb_bytes']:.3f} "
                  f"(goal <= {GOAL_BYTES_RATIO}: {ok})")


# ------------------------------------------------------------------------------ files


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot(result: dict, path: str) -> None:
    """Three panels over steps, one line per arm: tokens/s per rank (rolling median of 5 steps),
    balancedness of the real routed counts, cumulative bytes moved. Replans: dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result["settings"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    steps = np.arange(s["steps"])
    for arm, color in zip(ARMS, ("tab:gray", "tab:red", "tab:blue")):
        st, rp = result["steps"][arm], result["replans"][arm]
        ms = np.array(st["step_ms"])
        roll = np.array([np.median(ms[max(0, t - 4):t + 1]) for t in range(len(ms))])
        axes[0].plot(steps, s["tokens"] / roll * 1e3 / 1e3, color=color, label=arm)
        bal = np.array(st["balancedness"])
        axes[1].plot(steps, bal, color=color, lw=0.6, alpha=0.35)
        axes[1].plot(steps, [bal[max(0, t - 9):t + 1].mean() for t in range(len(bal))], color=color, label=arm)
        cum = np.zeros(len(steps))
        for r in rp:
            cum[r["step"]:] += r["bytes_total"]
        axes[2].step(steps, cum / 1e6, where="post", color=color, label=arm)
    for ax in axes:
        for t in range(s["replan_every"], s["steps"], s["replan_every"]):
            ax.axvline(t, color="k", ls=":", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("k tokens/s per rank\n(rolling median, 5 steps)")
    axes[1].set_ylabel("balancedness (mean/max rank load)\nper step, and mean of 10 steps")
    axes[2].set_ylabel("cumulative MB moved\n(weights + Adam state)")
    axes[2].set_xlabel("training step")
    axes[0].legend(fontsize=8)
    m = result["machine"]
    summ = result["summary"]
    fig.suptitle(f"moekit EP rebalancing in the loop, {m['device']} x{m['world']} ({m['backend']}); "
                 f"E={s['num_experts']} k={s['top_k']} R={result['num_replicas']} D={s['dim']} F={s['ffn']} "
                 f"L={s['layers']} move_price={s.get('move_price', 0.003)}\n"
                 f"movement-aware / full-replan bytes = {summ['moekit_over_eplb_bytes']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_result(result: dict, out_dir: str, suffix: str = "") -> str:
    tag = "cpu" if result["machine"]["backend"] == "gloo" else \
        result["machine"]["device"].lower().replace("nvidia ", "").split()[0]
    base = os.path.join(out_dir, f"ep_rebalance_{tag}_{datetime.date.today().isoformat()}{suffix and '_' + suffix}")
    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)

    _atomic_write(base + ".json", write_json)
    plot(result, base + ".png")
    return base


# ------------------------------------------------------------------------------ driver


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def worker(rank: int, args, s: LoopSettings) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                            world_size=args.world, device_id=device if device.type == "cuda" else None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if rank == 0:
        from rich.progress import Progress

        def progress(n: int) -> None:
            bar.update(task, completed=n)
            if not sys.stdout.isatty() and (n == 1 or n % s.replan_every == 0 or n == s.steps):  # a log
                print(f"step {n}/{s.steps}: {time.perf_counter() - t0:.1f} s", flush=True)

        with Progress() as bar:
            task = bar.add_task("steps (3 arms each)", total=s.steps)
            result = run_loop(s, None, device, dtype, progress=progress)
    else:
        result = run_loop(s, None, device, dtype)
    if rank == 0:
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        result.update(
            benchmark="bench_ep_rebalance",
            command=" ".join([os.path.basename(sys.executable)] + sys.argv),
            date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            wall_s=time.perf_counter() - t0,
            versions={"torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__,
                      "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
                      "python": platform.python_version()},
            machine={"device": dev_name, "world": args.world, "backend": backend, "host": platform.node(),
                     "cpu_model": _cpu_model(), "cpus": os.cpu_count(), "threads_per_rank": torch.get_num_threads(),
                     "load_average_at_end": os.getloadavg()},
            settings=dataclasses.asdict(s) | {"dtype": str(dtype).replace("torch.", "")},
        )
        result["summary"] = summarize(result, s)
        print_table(result["summary"], s)
        print(f"wrote {write_result(result, args.out, args.suffix)}.json/.png")
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LoopSettings()
    p.add_argument("--world", type=int, default=None, help="processes = EP size (default: GPUs, or 2 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    helps = {"steps": "training steps per arm", "replan_every": "N: replan every N steps from the last N steps' counts",
             "tokens": "tokens per rank and step", "redundant_per_rank": "extra slots per rank (R = E + world * this)",
             "skew": "synthetic_trace skew", "drift": "std of the log-popularity random walk per step",
             "move_price": "ReplanConfig.move_price of the movement-aware arm"}
    for f in dataclasses.fields(LoopSettings):
        flag = "--" + {"num_experts": "experts"}.get(f.name, f.name).replace("_", "-")
        default = getattr(defaults, f.name)
        p.add_argument(flag, dest=f.name, type=type(default), default=default,
                       help=f"{helps.get(f.name, f.name.replace('_', ' '))} (default {default})")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--suffix", default="", help="appended to the result file names (e.g. w4)")
    p.add_argument("--plot", metavar="JSON", help="only redraw the PNG of an existing result file")
    args = p.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.plot[:-5] + ".png")
        return 0
    try:
        s = LoopSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoopSettings)})
    except ValueError as exc:
        raise SystemExit(f"bench_ep_rebalance: error: {exc}")
    if args.world is None:
        args.world = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.world < 1 or (args.device == "cuda" and args.world > torch.cuda.device_count()):
        raise SystemExit(f"bench_ep_rebalance: error: --world {args.world} needs that many GPUs")
    if s.num_experts % args.world or s.num_experts // args.world + s.redundant_per_rank > s.num_experts:
        raise SystemExit(f"bench_ep_rebalance: error: --experts {s.num_experts} must be a multiple of --world "
                         f"{args.world}, and --redundant-per-rank at most {s.num_experts - s.num_experts // args.world}")
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        args.port = sock.getsockname()[1]
    mp.spawn(worker, args=(args, s), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
