"""benchmarks/bench_ep.py without running it: dispatch variant labels parse into the layer's
settings (bad ones are refused naming the flag), and the summary divides the right rows
(weak scaling over EP=1 balanced, plan recovery over the same variant's balanced row, the
goals over every variant run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ep.py"


def _bench():
    name = "bench_ep"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_variant_labels():
    parse = _bench().parse_variant
    assert parse("fixed") == {"label": "fixed", "fixed": True, "overlap": False, "sm_carveout": None,
                              "high_priority": False, "remote_first": False, "transport": "all_to_all",
                              "join_weight_grads": True, "own_first": False}
    assert parse("overlap_fixed:ce:rf:nj")["join_weight_grads"] is False
    assert parse("overlap_fixed:ce:rf:of")["own_first"] is True
    assert parse("overlap_fixed:c2:ce")["transport"] == "copy_engine"
    v = parse("overlap_fixed:c16:hp:rf")
    assert (v["fixed"], v["overlap"], v["sm_carveout"], v["high_priority"], v["remote_first"]) == (
        True, True, 16, True, True)
    assert parse("overlap:rf")["fixed"] is False
    for bad in ("fast", "fixed:rf", "overlap:c", "overlap:cx", "plain:hp", "fixed:x", "overlap:ce", "fixed:nj",
                "fixed:of", "overlap:of"):
        with pytest.raises(ValueError, match="--variants"):
            parse(bad)


def _row(ep, routing, tokens_per_s, variant="", plan=False, extra=None, fwd=None, b2b=None, dedup=True):
    row = {"shape": "s", "ep": ep, "routing": routing, "plan": plan, "dedup": dedup if ep > 1 else None,
           "variant": variant, "tokens_per_s_per_gpu": float(tokens_per_s),
           "fwd_tokens_per_s_per_gpu": float(fwd or tokens_per_s),
           "tokens_per_s_per_gpu_back_to_back": float(b2b or tokens_per_s), "step_ms": 1e3 / tokens_per_s}
    if plan:
        row["extra_slots"] = extra
    return row


def test_summary_divides_the_right_rows():
    rows = [_row(1, "balanced", 100, fwd=50, b2b=120), _row(1, "zipf", 90),
            _row(2, "balanced", 70, fwd=30, b2b=90),                      # deduplicated anchor
            _row(2, "zipf", 60, variant="plain"),
            _row(2, "zipf", 66, variant="plain", plan=True, extra=0),
            _row(2, "zipf", 50, variant="plain", plan=True, extra=2),
            _row(2, "balanced", 40, variant="plain", dedup=False),
            _row(2, "balanced", 80, variant="fixed") | {"compute_only_ms_one_call": 8.0,
                                                        "compute_only_ms_two_calls": 12.5,
                                                        "compute_only_ms_two_calls_joined": 11.0},
            _row(2, "zipf", 76, variant="fixed", plan=True, extra=0),
            _row(2, "balanced", 86, variant="overlap_fixed:c16:hp", fwd=45, b2b=108),
            _row(2, "zipf", 77.4, variant="overlap_fixed:c16:hp", plan=True, extra=0)]
    (s,) = _bench().summarize(rows)
    assert s["weak_scaling_efficiency_balanced"] == pytest.approx(0.70)
    assert s["weak_scaling_efficiency_balanced_back_to_back"] == pytest.approx(90 / 120)
    assert s["weak_scaling_efficiency_balanced_fwd_only"] == pytest.approx(30 / 50)
    assert s["weak_scaling_efficiency_balanced_no_dedup"] == pytest.approx(0.40)
    assert s["zipf_no_plan_over_balanced"] == pytest.approx(60 / 70)
    assert s["zipf_plan_no_replicas_over_balanced"] == pytest.approx(66 / 70)
    assert s["zipf_plan_over_balanced"] == pytest.approx(50 / 70)  # the plan with replicas
    assert set(s["variants"]) == {"fixed", "overlap_fixed:c16:hp"}
    best = s["variants"]["overlap_fixed:c16:hp"]
    assert best["weak_scaling_efficiency_balanced"] == pytest.approx(0.86)
    assert best["weak_scaling_efficiency_balanced_back_to_back"] == pytest.approx(108 / 120)
    assert best["weak_scaling_efficiency_balanced_fwd_only"] == pytest.approx(45 / 50)
    assert best["zipf_plan_no_replicas_over_balanced"] == pytest.approx(0.90)
    assert s["variants"]["fixed"]["zipf_plan_no_replicas_over_balanced"] == pytest.approx(0.95)
    # EP=1's 10 ms step over the EP=2 expert work without communication
    assert s["variants"]["fixed"]["ceiling_without_communication_one_call"] == pytest.approx(10 / 8.0)
    assert s["variants"]["fixed"]["ceiling_without_communication_two_calls"] == pytest.approx(10 / 12.5)
    assert s["variants"]["fixed"]["ceiling_without_communication_two_calls_joined"] == pytest.approx(10 / 11.0)
    assert "ceiling_without_communication_one_call" not in best
    assert s["goal_weak_scaling_ge_0.85"] is True and s["goal_plan_recovery_ge_0.90"] is True
    (s,) = _bench().summarize([r for r in rows if r["variant"] not in ("overlap_fixed:c16:hp", "fixed")])
    assert s["variants"] == {} and s["goal_weak_scaling_ge_0.85"] is False
    assert s["goal_plan_recovery_ge_0.90"] is True  # 66 / 70 = 0.94 without replicas


def test_summary_of_a_variant_under_skew():
    """--skew-cases: a variant's Zipf rows without a plan, with the plan without replicas and
    with replicas, each over the variant's balanced row, with their balancedness; the
    all-to-all share of the balanced step."""
    v = "overlap_fixed:ce:rf"
    rows = [_row(1, "balanced", 100), _row(1, "zipf", 90),
            _row(2, "balanced", 70) | {"a2a_ms": 2.0},
            _row(2, "balanced", 80, variant=v) | {"a2a_ms": 5.0},
            _row(2, "zipf", 48, variant=v) | {"balancedness": 0.6},
            _row(2, "zipf", 76, variant=v, plan=True, extra=0) | {"balancedness": 0.97},
            _row(2, "zipf", 72, variant=v, plan=True, extra=4) | {"balancedness": 0.99,
                                                                 "step_ms_sync_once_per_4_micro": 12.5}]
    (s,) = _bench().summarize(rows)
    assert s["a2a_share_of_step_balanced"] == pytest.approx(2.0 / (1e3 / 70))
    got = s["variants"][v]
    assert got["a2a_share_of_step_balanced"] == pytest.approx(5.0 / (1e3 / 80))
    assert got["zipf_no_plan_over_balanced"] == pytest.approx(0.6)
    assert got["zipf_no_plan_balancedness"] == 0.6
    assert got["zipf_plan_no_replicas_over_balanced"] == pytest.approx(0.95)
    assert got["zipf_plan_no_replicas_balancedness"] == 0.97
    assert got["zipf_plan_over_balanced"] == pytest.approx(0.9)
    assert got["zipf_plan_balancedness"] == 0.99
    assert got["zipf_plan_over_balanced_sync_once_per_4_micro"] == pytest.approx(12.5 / 12.5)
    assert s["goal_plan_recovery_ge_0.90"] is True
