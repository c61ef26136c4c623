"""One rank of the expert-parallel equivalence checks: ``run(rank, world, port, backend,
scenarios)``, called in forked processes by ep_launch.py (CPU tests), or as a script
``python ep_worker.py <backend> <scenario>...`` with RANK / WORLD_SIZE / MASTER_PORT in the
environment, one process per rank (GPU tests, as torchrun would start them).

Every check builds the single-process ``moekit.MoE`` on the whole batch (all ranks' tokens)
as the reference and compares the expert-parallel layer's outputs and ALL gradients with it.
A failed check raises, so the process exits non-zero and the test shows its traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

import moekit
from moekit.metrics import moves as count_moves
from moekit.parallel import (
    ExpertParallelMoE,
    apply_plan,
    broadcast_dense_parameters,
    dense_parameters,
    parallelize,
    reduce_gradients,
    resolve_group,
)

# the dispatch modes every scenario runs in: the deduplicated fast path, the simple
# per-assignment one, the fixed-size sync-free one (capacity above every batch used here), and
# the deduplicated and fixed-size ones with own tokens computed beside the exchange (overlap:
# a side stream on CUDA), the latter also with the own tokens' experts launched first
MODES = (dict(dedup=True), dict(dedup=False), dict(max_tokens_per_rank=100), dict(overlap=True),
         dict(max_tokens_per_rank=100, overlap=True), dict(max_tokens_per_rank=100, overlap=True, own_first=True))
# on GPUs also with SMs left free of the expert GEMMs in forward and backward and the remote
# path on a high-priority stream (on CPU these settings reach no kernel: the identity scenario
# checks once that they keep results)
GPU_MODES = (dict(max_tokens_per_rank=100, overlap=True, sm_carveout=8),
             dict(max_tokens_per_rank=100, overlap=True, sm_carveout=8, remote_first=True),
             dict(overlap=True, remote_first=True))
# on GPUs: the fixed-size exchanges on the copy engines (symmetric memory), with and without overlap
CE_MODES = (dict(max_tokens_per_rank=100, transport="copy_engine"),
            dict(max_tokens_per_rank=100, overlap=True, transport="copy_engine", sm_carveout=2),
            dict(max_tokens_per_rank=100, overlap=True, transport="copy_engine", remote_first=True),
            dict(max_tokens_per_rank=100, overlap=True, transport="copy_engine", remote_first=True, own_first=True))

# this process's rank and the world size: set by run() before any check runs
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))


def _close(a, b, name, tol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"rank {RANK}: {name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    if err > tol * scale:
        raise AssertionError(f"rank {RANK}: {name}: max abs error {err:.3e} (scale {scale:.2e}, tol {tol})")


def _batch(sizes, dim, device, dtype, seed):
    """The global batch and its targets (every rank builds the same ones) and this rank's slice."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), dim, generator=gen, dtype=torch.float64).to(device, dtype)
    g = torch.randn(sum(sizes), dim, generator=gen, dtype=torch.float64).to(device, dtype)
    lo = sum(sizes[:RANK])
    return x, g, slice(lo, lo + sizes[RANK])


def _reference(cfg, device, dtype, seed):
    torch.manual_seed(seed)
    return moekit.MoE(cfg).to(device, dtype)


def _check_grads(ref, ep, ep_modules, tol, ep_rank_size=None):
    """Dense grads equal the reference's; each local slot's grads equal its logical expert's."""
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        if name.startswith("experts."):
            continue
        _close(p.grad, ref_params[name].grad, f"grad {name}", tol)
    for i, m in enumerate(ep_modules):
        e = m.local_experts.to(ref.experts.w_in.device)
        _close(m.local.w_in.grad, ref.experts.w_in.grad[e], "grad w_in", tol)
        _close(m.local.w_out.grad, ref.experts.w_out.grad[e], "grad w_out", tol)


def check_equivalence(device, dtype, tol, *, sizes, phy2log=None, num_experts=8, top_k=2, balance="global",
                      shared=0, mask_last_rank=False, group=None, expert_dp_group=None, seed=0,
                      mesh_dim=None, backend="auto", **mode):
    """EP forward + backward == single-process MoE on the concatenated batch. backend: the
    EP layer's local expert backend (the reference keeps the default)."""
    cfg_ref = moekit.MoEConfig(dim=16, ffn_dim=16, num_experts=num_experts, top_k=top_k, num_shared_experts=shared,
                               balance="micro" if balance == "global" else balance, balance_coeff=0.1)
    cfg_ep = dataclasses.replace(cfg_ref, balance=balance, backend=backend)
    ref = _reference(cfg_ref, device, dtype, seed)
    torch.manual_seed(seed)
    ep = moekit.MoE(cfg_ep).to(device, dtype)
    ep.load_state_dict(ref.state_dict())
    if mask_last_rank:
        # the last EP rank's experts are never chosen: that rank receives zero tokens
        ep_size = dist.get_world_size(resolve_group(group, mesh_dim))
        per = (len(phy2log) if phy2log is not None else num_experts) // ep_size
        p2l = phy2log if phy2log is not None else torch.arange(num_experts)
        for m in (ref, ep):
            m.aux_free.bias[p2l[-per:]] = -1e4
    modules = parallelize(ep, group, None if phy2log is None else phy2log[None], expert_dp_group=expert_dp_group,
                          mesh_dim=mesh_dim, **mode)

    x, g, mine = _batch(sizes, cfg_ref.dim, device, dtype, seed + 1)
    x_ref = x.clone().requires_grad_()
    out_ref = ref(x_ref)
    ((out_ref.hidden * g).sum() + out_ref.aux_loss).backward()

    x_ep = x[mine].clone().requires_grad_()
    out = ep(x_ep)
    # sum over ranks of the EP losses == the reference loss (global balance: P stays local)
    aux = out.aux_loss / WORLD if balance == "global" else out.aux_loss * (sizes[RANK] / sum(sizes))
    ((out.hidden * g[mine]).sum() + aux).backward()
    reduce_gradients(ep, average=False)

    _close(out.hidden, out_ref.hidden[mine], "hidden", tol)
    _close(x_ep.grad, x_ref.grad[mine], "grad x", tol)
    _check_grads(ref, ep, modules, tol)
    return ref, ep, modules


def check_accumulation(device, dtype, tol, backend="auto", **mode):
    """Gradient accumulation: two micro-batches' backward passes, then ONE replica / DP
    gradient reduction (once per optimizer step) == the reference's accumulated gradients.
    backend: the expert backend of both layers."""
    gen = torch.Generator().manual_seed(17)
    p2l = torch.cat([torch.arange(8), torch.tensor([0, 0, 2, 5][:WORLD]), torch.tensor([1, 3, 4, 6][:WORLD])])
    p2l = p2l[torch.randperm(p2l.shape[0], generator=gen)]
    cfg = moekit.MoEConfig(dim=16, ffn_dim=12, num_experts=8, top_k=3, balance="none", backend=backend)
    ref = _reference(cfg, device, dtype, 4)
    ep = copy.deepcopy(ref)
    modules = parallelize(ep, None, p2l[None], **mode)
    for micro in range(2):
        sizes = [3 + micro + r for r in range(WORLD)]
        x, g, mine = _batch(sizes, cfg.dim, device, dtype, 200 + micro)
        (ref(x).hidden * g).sum().backward()
        (ep(x[mine]).hidden * g[mine]).sum().backward()
    reduce_gradients(ep, average=False)
    _check_grads(ref, ep, modules, tol)


def check_apply_plan(device, dtype, tol, **mode):
    """Train one Adam step, move to a new placement (weights + Adam state), train another:
    identical to the reference that never moved; the moved bytes are what the plan says."""
    num_experts, ep_size = 8, WORLD
    slots = num_experts + ep_size  # one spare slot per rank
    gen = torch.Generator().manual_seed(5)
    old = torch.cat([torch.arange(num_experts), torch.randint(0, num_experts, (ep_size,), generator=gen)])
    old = old[torch.randperm(slots, generator=gen)]
    new = torch.cat([torch.arange(num_experts), torch.zeros(ep_size, dtype=torch.long)])  # expert 0 is hot
    new = new[torch.randperm(slots, generator=gen)]
    cfg = moekit.MoEConfig(dim=16, ffn_dim=12, num_experts=num_experts, top_k=2, balance="none")
    ref = _reference(cfg, device, dtype, 3)
    ep = copy.deepcopy(ref)
    (module,) = parallelize(ep, None, old[None], **mode)
    # eps well above rounding noise: Adam's first step is lr * sign(grad) for tiny gradients, so
    # fp32 noise around zero (another summation order on GPU) would flip whole steps
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-3)
    opt_ep = torch.optim.Adam(ep.parameters(), lr=1e-2, eps=1e-3)
    sizes = [4 + r for r in range(WORLD)]
    for step in range(2):
        x, g, mine = _batch(sizes, cfg.dim, device, dtype, 100 + step)
        out_ref = ref(x)
        (out_ref.hidden * g).sum().backward()
        out = ep(x[mine])
        (out.hidden * g[mine]).sum().backward()
        reduce_gradients(ep, average=False)
        _close(out.hidden, out_ref.hidden[mine], f"hidden step {step}", tol)
        opt_ref.step(), opt_ep.step()
        opt_ref.zero_grad(set_to_none=True), opt_ep.zero_grad(set_to_none=True)
        if step == 0:
            report = apply_plan(ep, new[None], opt_ep)
            expected_moves = count_moves(old[None], new[None], ep_size)
            assert report.moves == expected_moves, (report.moves, expected_moves)
            row = module.local.w_in[0].numel() + module.local.w_out[0].numel()
            per_copy = row * module.local.w_in.element_size()
            assert report.weight_bytes_total == expected_moves * per_copy, report
            assert report.state_bytes_total == 2 * expected_moves * per_copy, report  # exp_avg, exp_avg_sq
            sent = torch.tensor([report.bytes_sent, report.bytes_received], device=device)
            dist.all_reduce(sent)
            assert sent.tolist() == [report.bytes_total] * 2, (sent, report)
            assert torch.equal(module.phy2log.cpu(), new)
        e = module.local_experts.to(device)
        _close(module.local.w_in, ref.experts.w_in[e], f"w_in after step {step}", tol)
        _close(module.local.w_out, ref.experts.w_out[e], f"w_out after step {step}", tol)
        for p_ep in (module.local.w_in, module.local.w_out):
            p_ref = ref.experts.w_in if p_ep is module.local.w_in else ref.experts.w_out
            for key in ("exp_avg", "exp_avg_sq"):
                _close(opt_ep.state[p_ep][key], opt_ref.state[p_ref][key][e], f"{key} step {step}", tol)


def check_fresh_layer(device, dtype, **mode):
    """ExpertParallelMoE built from a config: replicas start equal, gather_logical is consistent."""
    cfg = moekit.MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=2)
    p2l = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2]) if WORLD == 4 else None  # 2 slots per rank, replicas
    torch.manual_seed(100 + RANK)  # dense parameters differ per rank until broadcast
    layer = ExpertParallelMoE(cfg, phy2log=p2l, seed=7, **mode).to(device, dtype)
    broadcast_dense_parameters(layer)
    for p in dense_parameters(layer):
        parts = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(parts, p.detach().contiguous())
        assert all(torch.equal(q, parts[0]) for q in parts), "dense parameters differ after broadcast"
    w_in, w_out = layer.experts.gather_logical()
    e = layer.experts.local_experts.to(device)
    _close(layer.experts.local.w_in, w_in[e], "fresh w_in", 0)
    _close(layer.experts.local.w_out, w_out[e], "fresh w_out", 0)
    out = layer(torch.randn(3, 2, 8, device=device, dtype=dtype))
    assert out.hidden.shape == (3, 2, 8)


def check_fixed_bad_input(device, overlap=False):
    """max_tokens_per_rank: a non-positive value, and more tokens than promised, are refused
    (on every rank, before any collective) with a ValueError naming it."""
    from moekit.experts import ExpertsConfig
    from moekit.parallel import ExpertParallelExperts

    cfg = ExpertsConfig(8, 8, 2 * WORLD)
    for bad in (0, -3, 2.5, True):
        try:
            ExpertParallelExperts(cfg, dist.group.WORLD, max_tokens_per_rank=bad)
        except ValueError as e:
            assert "max_tokens_per_rank" in str(e), e
        else:
            raise AssertionError(f"max_tokens_per_rank={bad!r} accepted")
    module = ExpertParallelExperts(cfg, dist.group.WORLD, max_tokens_per_rank=4, overlap=overlap).to(device)
    x, idx, w = torch.randn(5, 8, device=device), torch.zeros(5, 1, dtype=torch.long, device=device), \
        torch.ones(5, 1, device=device)
    try:
        module(x, idx, w)
    except ValueError as e:
        assert "5 tokens" in str(e) and "max_tokens_per_rank=4" in str(e), e
    else:
        raise AssertionError("5 tokens accepted with max_tokens_per_rank=4")


def check_host_syncs(device, **mode):
    """GPU only: a training step (forward, backward, replica gradient sums) makes exactly one
    device-to-host sync, the split sizes after the count exchange, or none with fixed-size
    dispatch (``max_tokens_per_rank``)."""
    import warnings

    gen = torch.Generator().manual_seed(21)
    extra = torch.tensor([0, 3, 1, 5][:WORLD])  # one replica per rank: R = 8 + WORLD, a multiple of WORLD
    p2l = torch.cat([torch.arange(8), extra])[torch.randperm(8 + WORLD, generator=gen)]
    cfg = moekit.MoEConfig(dim=64, ffn_dim=32, num_experts=8, top_k=4, balance="none")
    layer = ExpertParallelMoE(cfg, phy2log=p2l, **mode).to(device, torch.bfloat16)
    x = torch.randn(96, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:4] for _ in range(96)]).to(device)
    w = torch.rand(96, 4, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer.experts(x, idx, w).float().square().sum().backward()
        layer.experts.reduce_replica_grads()

    import traceback

    step()  # warm-up: kernels compiled, index tables copied to the device once
    torch.cuda.synchronize()
    syncs, armed = [], []

    def record(message, category, filename, lineno, file=None, line=None):
        # count from the first op of the step on (switching the mode warns once by itself)
        if armed and "synchroniz" in str(message):  # where in our code the sync was asked for
            frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]]
            syncs.append(" < ".join(reversed(frames[-6:])))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        armed.append(True)
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    expected = 0 if mode.get("max_tokens_per_rank") else 1
    assert len(syncs) == expected, (f"rank {RANK}: {len(syncs)} host syncs per step, expected {expected}:\n"
                                    + "\n".join(syncs))


def _max_joined_calls(fn) -> int:
    """Run ``fn()``; return the most expert calls any one WeightGradJoin registered in it."""
    from moekit.experts.join import WeightGradJoin

    seen: dict[int, int] = {}
    register = WeightGradJoin.register

    def counting(self, w_in, w_out):
        register(self, w_in, w_out)
        seen[id(self)] = self.calls

    WeightGradJoin.register = counting
    try:
        fn()
    finally:
        WeightGradJoin.register = register
    return max(seen.values(), default=0)


def _modes(backend: str) -> tuple[dict, ...]:
    """The dispatch modes to run: ``MODES`` (and ``GPU_MODES``, ``CE_MODES`` on NCCL); the
    environment variable ``EP_MODES`` = ``base`` / ``gpu`` / ``ce`` keeps only that set."""
    which = os.environ.get("EP_MODES", "all")
    base = MODES if which in ("all", "base") else ()
    gpu = GPU_MODES if backend == "nccl" and which in ("all", "gpu") else ()
    ce = CE_MODES if backend == "nccl" and which in ("all", "ce") else ()
    return base + gpu + ce


def run(rank: int, world: int, port: int, backend: str, scenarios: list[str]) -> None:
    """Join a group of ``world`` ranks on 127.0.0.1:``port`` and run ``scenarios``."""
    global RANK, WORLD
    RANK, WORLD = rank, world
    device = torch.device("cuda", RANK) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=WORLD,
                            device_id=device if backend == "nccl" else None)
    f64 = torch.float32 if backend == "nccl" else torch.float64
    # the sorted CPU backend sums its outputs in fp32 even for fp64 inputs: fp32-level tolerance;
    # on GPU the checks run in fp32, whose grouped GEMMs may use TF32
    tol64 = 1e-3 if backend == "nccl" else 2e-6
    tol32 = 1e-3 if backend == "nccl" else 1e-4
    try:
        for scenario in scenarios:
            for mode in _modes(backend):
                _run_scenario(scenario, device, f64, tol64, tol32, mode)
            dist.barrier()
            if RANK == 0:
                print(f"ok {scenario} world={WORLD}", flush=True)
    finally:
        dist.destroy_process_group()


def _run_scenario(scenario, device, f64, tol64, tol32, mode):
    kw = dict(mode)
    if scenario == "identity":
        check_equivalence(device, f64, tol64, sizes=[6] * WORLD, shared=1, **kw)
        if "max_tokens_per_rank" in kw:  # exactly full (no padding row) and mostly padding
            check_fixed_bad_input(device, kw.get("overlap", False))
            for cap in (6, 11):
                check_equivalence(device, f64, tol64, sizes=[6, 2, 6, 1][:WORLD], shared=1, balance="none",
                                  max_tokens_per_rank=cap, overlap=kw.get("overlap", False),
                                  transport=kw.get("transport", "all_to_all"), own_first=kw.get("own_first", False))
        if kw.get("overlap") and "sm_carveout" not in kw and device.type == "cpu":  # scoping keeps results
            check_equivalence(device, f64, tol64, sizes=[6, 0, 3, 6][:WORLD], shared=1, balance="none",
                              sm_carveout=2, remote_first=True, **kw)
            assert torch._C._get_sm_carveout_experimental() is None, "sm_carveout leaked past backward"
        check_equivalence(device, torch.float32, tol32, sizes=[5] * WORLD, num_experts=2 * WORLD, top_k=1,
                          balance="none", **kw)
        check_equivalence(device, torch.float32, tol32, sizes=[3] * WORLD, num_experts=WORLD * 2,
                          top_k=WORLD * 2, balance="none", **kw)
    elif scenario == "zero_tokens":
        sizes = [5, 0, 7, 3][:WORLD]
        check_equivalence(device, f64, tol64, sizes=sizes, balance="aux_free", mask_last_rank=True, **kw)
        # the per-token reference backend on the rank none of whose experts is chosen
        check_equivalence(device, f64, tol64, sizes=sizes, balance="aux_free", mask_last_rank=True,
                          backend="reference", **kw)
    elif scenario == "replicas":
        gen = torch.Generator().manual_seed(11)
        slots = 8 + 2 * WORLD  # R > E: hot experts 0 and 1 get extra replicas
        extra = torch.tensor([0, 0, 1, 0, 1, 2, 0, 3][: 2 * WORLD])
        p2l = torch.cat([torch.arange(8), extra])[torch.randperm(slots, generator=gen)]
        check_equivalence(device, f64, tol64, sizes=[9] * WORLD, phy2log=p2l, shared=1, **kw)
        check_equivalence(device, f64, tol64, sizes=[6, 0, 2, 5][:WORLD], phy2log=p2l, balance="aux_free",
                          mask_last_rank=True, **kw)
        check_accumulation(device, f64, tol64, **kw)
    elif scenario == "grouped":
        # the grouped-GEMM ops on the received rows (compact hand-off: valid rows only), with
        # replicas (local and cross-rank) and a rank without tokens; CPU kernels under gloo
        gen = torch.Generator().manual_seed(13)
        p2l = torch.cat([torch.arange(8), torch.tensor([0, 0, 3, 1, 2, 0, 5, 7][:2 * WORLD])])
        p2l = p2l[torch.randperm(p2l.shape[0], generator=gen)]
        check_equivalence(device, torch.float32, tol32, sizes=[7, 0, 5, 9][:WORLD], phy2log=p2l, top_k=3,
                          balance="none", backend="grouped_mm", **kw)
        # every rank has own and received rows here: in the overlap modes both expert calls
        # share one weight-gradient join (moekit.experts.join), unless it is switched off
        joined = _max_joined_calls(lambda: check_equivalence(device, torch.float32, tol32, sizes=[6] * WORLD,
                                                             top_k=8, balance="none", backend="grouped_mm", **kw))
        assert joined == (2 if kw.get("overlap") else 0), (kw, joined)
        if kw.get("overlap"):
            joined = _max_joined_calls(lambda: check_equivalence(
                device, torch.float32, tol32, sizes=[6] * WORLD, top_k=8, balance="none", backend="grouped_mm",
                join_weight_grads=False, **kw))
            assert joined == 0, (kw, joined)
        # joined weight gradients of two micro-batches accumulate into .grad, with replicas
        check_accumulation(device, torch.float32, tol32, backend="grouped_mm", **kw)
    elif scenario == "bf16":
        check_equivalence(device, torch.bfloat16, 5e-2, sizes=[64] * WORLD, num_experts=8, shared=1, **kw)
    elif scenario == "syncs":
        check_host_syncs(device, **kw)
    elif scenario == "apply_plan":
        check_apply_plan(device, f64, tol64, **kw)
    elif scenario == "fresh":
        check_fresh_layer(device, f64, **kw)
    elif scenario == "mesh":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (2, WORLD // 2), mesh_dim_names=("dp", "ep"))
        gen = torch.Generator().manual_seed(2)
        p2l = torch.cat([torch.arange(8), torch.tensor([0, 5])])[torch.randperm(10, generator=gen)]
        assert resolve_group(mesh, "ep") is mesh.get_group("ep")
        check_equivalence(device, f64, tol64, sizes=[4, 6, 0, 5][:WORLD], balance="none", group=mesh,
                          mesh_dim="ep", expert_dp_group=mesh.get_group("dp"), phy2log=p2l, **kw)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]), sys.argv[1],
        sys.argv[2:])
