"""Worker for test_train_ddp.py (imported by path so spawned processes can unpickle it)."""

import os

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, balances: list, out_path: str) -> None:
    """One process group for all checks (spawning is the slow part): a single forward/backward
    per balance in ``balances``, then two steps of the real trainer with micro balancing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {balance: _one(rank, world, balance) for balance in balances}
        results["train"] = _train(balance="micro")
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _one(rank: int, world: int, balance: str) -> dict:
    from moekit.train import MoELM, forward_backward, preset, with_balance
    from moekit.train.loader import MicroBatch

    lm = with_balance(preset("tiny").lm, balance)
    torch.manual_seed(0)
    model = MoELM(lm)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, 256, (2 * world, 17), generator=gen)  # same on every rank
    mine = MicroBatch(tokens[2 * rank:2 * rank + 2], torch.zeros(2, dtype=torch.long))
    res = forward_backward(ddp, mine, 1.0, None)
    aux = res["aux"].reshape(1).clone()
    dist.all_reduce(aux)
    counts = [blk.moe.global_balance.counts.clone() if blk.moe.global_balance is not None
              else torch.zeros(0) for blk in model.blocks]
    return {"aux_mean": aux / world, "counts": counts,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _train(balance: str) -> dict:
    """Two optimizer steps of the real trainer under DDP (world ranks x 2 micro-batches)."""
    import dataclasses

    from moekit.train import load_corpus, preset, train, with_balance

    p = preset("tiny")
    cfg = dataclasses.replace(p.train, steps=2, grad_accum=2)
    res = train(with_balance(p.lm, balance), p.loader, cfg, load_corpus(max_train_bytes=50_000),
                progress=False)
    return {"history": res["history"], "final": res["final"]}
