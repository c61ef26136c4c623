"""moekit compare: same weights and data per arm, table + JSON + plot written."""

import dataclasses
import json

import pytest

from moekit.cli import main
from moekit.train import compare, load_corpus, preset


def test_compare_arms_share_weights_and_data_and_write_results(tmp_path):
    p = preset("tiny")
    base = dataclasses.replace(p, train=dataclasses.replace(p.train, steps=3))
    doc = compare(base, ["none", "global"], [0, 1], load_corpus(max_train_bytes=50_000),
                  tmp_path, progress=False, seeds_for={"none": 1, "global": 2})
    assert [(r["balance"], r["seed"]) for r in doc["rows"]] == [("none", 0), ("global", 0), ("global", 1)]
    # Before the first update the cross-entropy depends only on weights and data: it must be
    # identical across the arms of a seed, and differ between seeds.
    first = {name: run["history"][0]["loss"] for name, run in doc["runs"].items()}
    assert first["none-s0"] == first["global-s0"] != first["global-s1"]
    # The objectives then differ: no balance loss for none, a positive one otherwise.
    assert doc["runs"]["none-s0"]["history"][0]["aux"] == 0.0
    assert doc["runs"]["global-s0"]["history"][0]["aux"] > 0.0
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk["rows"] == doc["rows"]
    table = (tmp_path / "compare.md").read_text()
    assert table.count("\n") == 2 + 3 + 1  # header, 3 runs, 1 mean row
    assert "**global (mean)**" in table
    for name in ("compare.png", "none-s0/loss.png", "none-s0/expert_load.png", "global-s1/metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*/checkpoint.*"))


def test_cli_compare_rejects_unknown_multi_seed_arm(tmp_path, capsys):
    code = main(["compare", "--preset", "tiny", "--balance", "micro,global", "--seeds", "0,1",
                 "--multi-seed-arms", "seq", "--out-dir", str(tmp_path)])
    assert code == 2
    assert "--multi-seed-arms" in capsys.readouterr().err


def test_cli_train_tiny_writes_metrics_and_plots(tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--steps", "2", "--balance", "seq", "--name", "t",
                 "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["lm"]["moe"]["balance"] == "seq" and len(metrics["history"]) == 2
    assert (tmp_path / "t" / "loss.png").stat().st_size > 0
    assert (tmp_path / "t" / "checkpoint.safetensors").is_file()
    out = capsys.readouterr().out
    assert "val loss code" in out and "NMI" in out


@pytest.mark.parametrize("arg", ["--seeds", "--balance"])
def test_cli_compare_bad_lists(tmp_path, capsys, arg):
    value = "0,x" if arg == "--seeds" else "micro,,bogus"
    assert main(["compare", "--preset", "tiny", arg, value, "--out-dir", str(tmp_path)]) == 2
