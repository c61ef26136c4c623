"""`moekit plan` end to end, in-process."""

import json

import numpy as np
import pytest

from moekit.cli import main
from moekit.placement import Plan
from moekit.trace import save_trace, synthetic_trace


@pytest.fixture()
def trace_path(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, synthetic_trace(30, 3, 16, 2, 128, seed=0))
    return path


def test_plan_from_trace_then_replan(trace_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "--trace", str(trace_path), "--replicas", "24", "--groups", "4", "--nodes", "2",
            "--gpus", "4", "-o", str(out)]
    assert main(args) == 0
    first = Plan.load(out)
    assert first.phy2log.shape == (3, 24) and first.nodes_per_group == 1.0
    assert "balancedness" in capsys.readouterr().out
    out2 = tmp_path / "plan2.json"
    assert main(args[:-1] + [str(out2), "--previous", str(out)]) == 0
    assert "moves 0" in capsys.readouterr().out
    assert main(args[:-1] + [str(out2), "--algorithm", "eplb", "--previous", str(out)]) == 0
    assert Plan.load(out2).algorithm == "eplb"


def test_plan_from_load_json(tmp_path, capsys):
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"load": np.random.default_rng(0).random((2, 8)).tolist()}))
    out = tmp_path / "p.json"
    assert main(["plan", "--load", str(load), "--replicas", "12", "--gpus", "4", "-o", str(out)]) == 0
    assert Plan.load(out).logcnt.sum().item() == 24


def test_evaluate_writes_results(trace_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["plan", "--evaluate", "--trace", str(trace_path), "--replicas", "24", "--gpus", "4",
                 "--window", "5", "--movement-aware", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["replans"] == 5 and len(data["balancedness"]) == 5
    assert "next-window balancedness" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--replicas", "25", "--gpus", "4"], "num_replicas"),
    (["--replicas", "8", "--gpus", "4"], "num_replicas: expected at least"),
    (["--replicas", "24", "--gpus", "4", "--nodes", "3"], "num_gpus: expected a multiple of num_nodes"),
    (["--replicas", "24", "--gpus", "4", "--window", "0"], "--window"),
])
def test_bad_input_is_one_line_and_exit_2(trace_path, tmp_path, capsys, extra, match):
    import re

    rc = main(["plan", "--trace", str(trace_path), "-o", str(tmp_path / "x.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("moekit plan: error:")
    assert re.search(match, err)
    assert not (tmp_path / "x.json").exists()


def test_corrupt_files_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    assert main(["plan", "--trace", str(bad), "--replicas", "8", "--gpus", "2", "-o", str(tmp_path / "o.json")]) == 2
    prev = tmp_path / "prev.json"
    prev.write_text("{not json")
    load = tmp_path / "load.json"
    load.write_text("[[1, 2, 3, 4]]")
    assert main(["plan", "--load", str(load), "--replicas", "4", "--gpus", "2", "--previous", str(prev),
                 "-o", str(tmp_path / "o.json")]) == 2
    assert "plan" in capsys.readouterr().err
