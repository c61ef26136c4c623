"""Corpus and loader: provenance, held-out split, single-domain micro-batches, DDP slots."""

import pytest
import torch

from moekit.train import LoaderConfig, decode, eval_batches, load_corpus, micro_batch


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_train_bytes=200_000)


def test_corpus_has_four_licensed_domains_with_held_out_text(corpus):
    assert len(corpus.domains) >= 4
    for name in corpus.domains:
        info = corpus.manifest["domains"][name]
        assert info["licence"] and info["source"]
        assert corpus.val[name].numel() > 100_000
        # Held-out documents are not in the training text.
        probe = bytes(corpus.val[name][5000:5400].tolist())
        full = load_corpus([name]).train[name]
        assert probe not in bytes(full.tolist())


def test_domains_look_different(corpus):
    text = {d: decode(corpus.train[d][:20000]) for d in corpus.domains}
    assert text["code"].count("def ") > 20
    assert "LORD" in text["scripture"]
    assert text["docs"].count(":func:") + text["docs"].count(":class:") > 5
    assert sum(ch.isdigit() for ch in text["arithmetic"]) > 0.4 * len(text["arithmetic"])


def _is_from(stream: torch.Tensor, row: torch.Tensor) -> bool:
    return bytes(row.to(torch.uint8).tolist()) in bytes(stream.tolist())


def test_single_domain_mode_gives_single_domain_micro_batches(corpus):
    cfg = LoaderConfig(seq_len=48, micro_batch_size=6, mode="single", seed=3)
    num_domains = len(corpus.domains)
    for step in range(3):
        seen = []
        for micro in range(num_domains):
            mb = micro_batch(corpus, cfg, step, micro)
            assert mb.tokens_BS1.shape == (6, 49) and mb.tokens_BS1.dtype == torch.int64
            assert mb.domain_B.unique().numel() == 1
            domain = corpus.domains[int(mb.domain_B[0])]
            # Every sequence really comes from that domain's text and from no other.
            for row in mb.tokens_BS1:
                assert _is_from(corpus.train[domain], row)
                assert not any(_is_from(corpus.train[o], row) for o in corpus.domains if o != domain)
            seen.append(domain)
        assert sorted(seen) == sorted(corpus.domains)  # one step = every domain once


def test_mixed_mode_mixes_domains(corpus):
    cfg = LoaderConfig(seq_len=16, micro_batch_size=32, mode="mixed")
    mb = micro_batch(corpus, cfg, 0, 0)
    assert mb.domain_B.unique().numel() == len(corpus.domains)
    for row, d in zip(mb.tokens_BS1, mb.domain_B.tolist()):
        assert _is_from(corpus.train[corpus.domains[d]], row)


def test_batches_are_deterministic_and_ranks_split_the_single_process_batch(corpus):
    cfg = LoaderConfig(seq_len=16, micro_batch_size=4)
    a = micro_batch(corpus, cfg, 5, 1)
    assert torch.equal(a.tokens_BS1, micro_batch(corpus, cfg, 5, 1).tokens_BS1)
    assert not torch.equal(a.tokens_BS1, micro_batch(corpus, cfg, 6, 1).tokens_BS1)
    # 2 ranks x 2 micro-batches == 1 process x 4 micro-batches (slot = micro * world + rank).
    for micro in range(2):
        for rank in range(2):
            dp = micro_batch(corpus, cfg, 7, micro, rank=rank, world=2)
            single = micro_batch(corpus, cfg, 7, micro * 2 + rank)
            assert torch.equal(dp.tokens_BS1, single.tokens_BS1)


def test_eval_batches_are_fixed_and_cover_every_domain(corpus):
    got = list(eval_batches(corpus, seq_len=32, seqs_per_domain=5, batch_size=2))
    assert [d for d, _ in got] == [d for d in range(len(corpus.domains)) for _ in range(3)]
    assert sum(t.shape[0] for _, t in got) == 5 * len(corpus.domains)


def test_bad_loader_input():
    with pytest.raises(ValueError, match="mode"):
        LoaderConfig(mode="round_robin")
    with pytest.raises(ValueError, match="domains"):
        load_corpus(["code", "klingon"])
