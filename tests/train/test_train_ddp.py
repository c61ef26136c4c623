"""Global-batch balancing under 2-rank DDP (gloo) equals one process on the concatenated data."""

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moekit.train import MoELM, forward_backward, preset, with_balance
from moekit.train.loader import MicroBatch

sys.path.insert(0, str(Path(__file__).parent))
import _train_ddp_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(balance: str, world: int):
    lm = with_balance(preset("tiny").lm, balance)
    torch.manual_seed(0)
    model = MoELM(lm)
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, 256, (2 * world, 17), generator=gen)
    res = forward_backward(model, MicroBatch(tokens, torch.zeros(2 * world, dtype=torch.long)), 1.0, None)
    return model, res


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    mp.spawn(_train_ddp_worker.run, args=(2, _free_port(), ["global", "micro"], str(out)),
             nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("balance", ["global", "micro"])
def test_two_rank_ddp_against_one_process_on_concatenated_data(ddp_results, balance):
    dp = ddp_results[balance]
    model, res = _single_process(balance, 2)
    if balance == "global":
        # f counted over both ranks (all-reduced) equals f of the concatenated batch; P is
        # local, so the mean over ranks of the loss is the single-process loss, and DDP's
        # averaged gradients equal the single-process gradients.
        assert dp["aux_mean"].item() == pytest.approx(res["aux"].item(), rel=1e-5, abs=1e-7)
        for layer, blk in enumerate(model.blocks):
            assert torch.equal(dp["counts"][layer], blk.moe.global_balance.counts)
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(dp["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
        assert any("router" in n for n in dp["grads"])
    else:
        # Control: per-rank (micro-batch) balancing is NOT the concatenated-batch loss, so the
        # equality above is a real property of global balancing, not of the test setup.
        assert abs(dp["aux_mean"].item() - res["aux"].item()) > 1e-6


def test_trainer_under_ddp_equals_one_process_with_the_same_micro_batches(ddp_results):
    # With micro-batch balancing every micro-batch's loss is independent of how micro-batches
    # are grouped, so 2 ranks x 2 accumulated micro-batches must train exactly like 1 process
    # x 4 (the loader gives rank r, micro m the single-process slot m * 2 + r). This checks
    # the trainer's DDP path: no_sync accumulation, gradient averaging, all-reduced figures.
    import dataclasses

    from moekit.train import load_corpus, train

    dp = ddp_results["train"]
    p = preset("tiny")
    cfg = dataclasses.replace(p.train, steps=2, grad_accum=4)
    single = train(with_balance(p.lm, "micro"), p.loader, cfg, load_corpus(max_train_bytes=50_000),
                   progress=False)
    for a, b in zip(dp["history"], single["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["aux"] == pytest.approx(b["aux"], rel=1e-5)
        assert a["max_vio_batch"] == pytest.approx(b["max_vio_batch"], rel=1e-9)
    assert dp["final"]["val_loss_mean"] == pytest.approx(single["final"]["val_loss_mean"], rel=1e-4)
