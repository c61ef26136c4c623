"""The `moekit` command: every subcommand has --help; bad input gives one line and exit 2."""

import json

import pytest

from moekit.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    names = _subcommands()
    assert "bench" in names
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: moekit " + name in capsys.readouterr().out


def test_bench_routers_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "routers.json"
    code = main(["bench", "routers", "--steps", "3", "--tokens", "32", "--experts", "4", "-o", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    arms = {r["arm"]: r for r in data["results"]}
    assert "topk / aux_free" in arms and "expert_choice / none" in arms
    assert arms["expert_choice / none"]["max_vio"] == pytest.approx(0.0)
    assert all(r["experts_per_token"] > 0 for r in data["results"])
    assert "MaxVio" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "never.json"
    assert main(["bench", "routers", "--top-k", "9", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moekit bench: error: --top-k: expected at most --experts=8, got 9"
    assert not out.exists()


def test_subpackages_load_on_first_use():
    import subprocess
    import sys

    code = ("import sys, moekit; assert 'moekit.hf' not in sys.modules; "
            "moekit.hf.patch; moekit.offload.offload; moekit.placement.rebalance_experts; "
            "moekit.placement.plan; moekit.trace.save_trace; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
