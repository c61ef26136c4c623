"""Training loop: the loss goes down, resume is exact, the schedule is right."""

import dataclasses
import json

import pytest

from moekit.train import load_corpus, lr_at, preset, train, with_balance
from moekit.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_train_bytes=50_000)


def _tiny(balance="global", **train_kw):
    p = preset("tiny")
    return with_balance(p.lm, balance), p.loader, dataclasses.replace(p.train, **train_kw)


def test_a_few_steps_lower_the_loss(corpus):
    lm, loader, cfg = _tiny("global", steps=12)
    res = train(lm, loader, cfg, corpus, progress=False)
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 12
    # Byte-level LM starts near ln(256) = 5.55 and must clearly improve within 12 steps.
    assert losses[0] > 5.0
    assert sum(losses[-3:]) / 3 < losses[0] - 0.8
    assert res["final"]["val_loss_mean"] < 5.0
    assert set(res["final"]["val_loss"]) == set(corpus.domains)


def test_resume_reproduces_the_next_step_exactly(corpus, tmp_path):
    lm, loader, cfg = _tiny("aux_free", steps=4)  # aux_free: the bias buffer must be restored too
    full = train(lm, loader, cfg, corpus, run_dir=tmp_path / "full", progress=False)
    part = train(lm, loader, cfg, corpus, run_dir=tmp_path / "part", progress=False, stop_at=2)
    assert part["stopped_at"] == 2 and part["final"] is None
    meta = json.loads((tmp_path / "part" / "checkpoint.json").read_text())
    assert meta["step"] == 2
    resumed = train(lm, loader, cfg, corpus, run_dir=tmp_path / "part", resume=True, progress=False)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(full["history"], resumed["history"]):
        assert a["loss"] == b["loss"], (a, b)  # bit-exact, not approximately equal
        assert a["aux"] == b["aux"]
    assert resumed["final"]["val_loss"] == full["final"]["val_loss"]
    assert (tmp_path / "part" / "metrics.json").is_file()


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="balance"):
        with_balance(preset("tiny").lm, "local")
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
