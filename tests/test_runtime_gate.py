"""SpeculationGate decisions on given timings (runtime/gate.py)."""
import pytest

from edgeinfer.runtime.gate import SpeculationGate


def run(gate, spec_rate, plain_rate, steps):
    """Drive the gate for ``steps`` steps at fixed rates; returns the decisions."""
    out = []
    for _ in range(steps):
        if gate.speculate():
            out.append("s")
            gate.record_round(3 / spec_rate, 3)  # 3 tokens a round
        else:
            out.append("p")
            gate.record_plain(1 / plain_rate)
    return "".join(out)


def test_probe_then_keep_speculating_when_it_wins():
    g = SpeculationGate(min_tokens=0, plain_probe=2, min_rounds=3, refresh=8)
    d = run(g, spec_rate=120.0, plain_rate=80.0, steps=30)
    assert d.startswith("pp" + "s" * 8 + "p" + "s" * 8 + "p")  # one plain step every 8 rounds
    assert g.switches == 0 and abs(g.plain_rate - 80.0) < 1e-9


def test_switch_to_plain_when_speculation_loses_then_try_again_with_backoff():
    g = SpeculationGate(min_tokens=0, plain_probe=2, min_rounds=3, plain_steps=5, max_backoff=1)
    d = run(g, spec_rate=60.0, plain_rate=80.0, steps=2 + 4 + 5 + 4 + 10 + 4 + 10)
    # each try: one catch-up round (not counted) + 3 counted; plain for 5, then 10 (capped)
    assert d == "pp" + "ssss" + "p" * 5 + "ssss" + "p" * 10 + "ssss" + "p" * 10
    assert g.switches == 3 and g.plain_steps_taken == 27


def test_a_won_try_resets_the_backoff():
    g = SpeculationGate(min_tokens=0, plain_probe=1, min_rounds=2, plain_steps=2, refresh=1000)
    assert run(g, 60.0, 80.0, 1 + 3 + 2 + 3 + 4) == "p" + "sss" + "pp" + "sss" + "pppp"
    assert run(g, 100.0, 80.0, 4) == "ssss"  # speculation wins now
    assert g._losses == 0
    d = run(g, 40.0, 80.0, 12)  # the mean falls below plain again: plain for the base length
    assert d.startswith("s") and "spp" + "s" in d


def test_a_draft_step_as_slow_as_a_plain_step_never_probes():
    g = SpeculationGate(min_tokens=0, plain_probe=2, plain_steps=4, max_backoff=2)
    d = []
    for _ in range(2 + 4 + 8 + 16):
        if g.speculate(draft_step=0.0125):  # plain steps take 1/80 s = 0.0125 s
            d.append("s")
        else:
            d.append("p")
            g.record_plain(1 / 80.0)
    assert d == ["p"] * 30 and g.switches == 3  # re-checked after 4, 8 and 16 plain steps
    assert g.speculate(draft_step=0.004) and g.speculate(draft_step=None)


def test_a_close_race_stays_speculative_within_the_margin():
    g = SpeculationGate(min_tokens=0, plain_probe=1, min_rounds=2, margin=0.05, refresh=1000)
    assert run(g, spec_rate=77.0, plain_rate=80.0, steps=20) == "p" + "s" * 19  # 77 > 0.95 * 80
    g = SpeculationGate(min_tokens=0, plain_probe=1, min_rounds=2, margin=0.05, plain_steps=4, refresh=1000)
    assert run(g, spec_rate=75.0, plain_rate=80.0, steps=8) == "p" + "sss" + "pppp"


def test_the_catch_up_round_after_plain_steps_is_not_counted():
    g = SpeculationGate(min_tokens=0, plain_probe=1, min_rounds=2, refresh=1000)
    g.record_plain(1 / 50.0)
    assert g.speculate()
    g.record_round(3 / 10.0, 3)  # 10 tok/s: the draft catching up with the context
    for _ in range(5):
        assert g.speculate()
        g.record_round(3 / 60.0, 3)
    assert g.switches == 0 and abs(g.spec_rate - 60.0) < 1e-9


def run_arms(gate, rates, plain_rate, steps, tokens=3):
    """Drive a multi-arm gate at fixed per-arm rates; returns the arm of each step ("p": plain)."""
    out = []
    for _ in range(steps):
        arm = gate.choose()
        if arm is None:
            out.append("p")
            gate.record_plain(1 / plain_rate)
        else:
            out.append(arm)
            gate.record_round(tokens / rates[arm], tokens, arm)
    return out


def test_each_arm_gets_a_stint_then_the_fastest_runs_on():
    g = SpeculationGate(("a", "b", "c"), min_tokens=0, plain_probe=2, min_rounds=3, refresh=1000)
    d = run_arms(g, {"a": 90.0, "b": 150.0, "c": 120.0}, plain_rate=80.0, steps=2 + 12 + 10)
    assert d == ["p"] * 2 + ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["b"] * 10
    assert g.rates == pytest.approx({"a": 90.0, "b": 150.0, "c": 120.0}) and g.switches == 0


def test_when_every_arm_loses_plain_decoding_runs_and_an_arm_is_retried():
    g = SpeculationGate(("a", "b"), min_tokens=0, plain_probe=1, min_rounds=2, plain_steps=3, refresh=1000)
    d = run_arms(g, {"a": 50.0, "b": 70.0}, plain_rate=80.0, steps=1 + 6 + 3 + 3)
    assert d == ["p"] + ["a"] * 3 + ["b"] * 3 + ["p"] * 3 + ["a"] * 3  # the stalest arm
    assert g.switches == 2  # the retried stint lost too


def test_a_running_arm_that_slows_down_gives_way_to_a_faster_one():
    g = SpeculationGate(("a", "b"), min_tokens=0, plain_probe=1, min_rounds=2, refresh=1000, margin=0.05)
    rates = {"a": 100.0, "b": 120.0}
    d = run_arms(g, rates, plain_rate=80.0, steps=1 + 6 + 2)
    assert d[-2:] == ["b", "b"]
    rates["b"] = 60.0  # b's text stops suiting it: its mean falls below a's last rate, then a runs
    d = run_arms(g, rates, plain_rate=80.0, steps=6)
    assert "a" in d and d[-1] == "a" and g.switches == 0


def test_a_draft_step_bound_skips_an_arm_without_plain_steps():
    g = SpeculationGate(("model", "recycle"), min_tokens=0, plain_probe=1, min_rounds=2, refresh=1000)
    g.record_plain(1 / 80.0)
    steps = {"model": 0.02, "recycle": None}  # a 20 ms draft step cannot beat 12.5 ms plain steps
    assert g.choose(steps) == "recycle" and g.rates["model"] == 0.0 and g.switches == 0


def test_a_stale_arm_is_re_measured_after_a_while_and_kept_when_now_faster():
    # rounds of 3 tokens: a at 100 tok/s takes 30 ms a round, b's stint (3 rounds at 60) 150 ms
    g = SpeculationGate(("a", "b"), min_tokens=0, plain_probe=1, min_rounds=2, refresh=1000,
                        explore_seconds=0.15, explore_cost=1.2)
    rates = {"a": 100.0, "b": 60.0}  # b measures slow at first (e.g. an empty recycling table)
    d = run_arms(g, rates, plain_rate=80.0, steps=1 + 3 + 3)
    assert d == ["p"] + ["a"] * 3 + ["b"] * 3  # stints of a and b; b lost to a
    rates["b"] = 150.0  # b has warmed up
    d = run_arms(g, rates, plain_rate=80.0, steps=3 + 10 + 3 + 4)
    # a's stint, then a until 1.2 x b's last stint x how much slower b was (0.15 s x 1.2 x 100 /
    # 60 = 0.3 s = 10 rounds of a) have passed
    assert d[:13] == ["a"] * 13
    assert d[13:] == ["b"] * 7 and g.rates["b"] == pytest.approx(150.0)  # b's new stint, then b runs on


def test_a_stint_lasts_until_it_has_emitted_min_tokens():
    g = SpeculationGate(("a", "b"), plain_probe=1, min_rounds=2, min_tokens=12, refresh=1000)
    # 3 tokens a round: 1 catch-up round + 4 counted rounds (12 tokens) per stint
    assert run_arms(g, {"a": 100.0, "b": 120.0}, 80.0, 1 + 5 + 5) == ["p"] + ["a"] * 5 + ["b"] * 5


def test_after_plain_steps_the_stalest_arm_is_tried():
    g = SpeculationGate(("a", "b"), min_tokens=0, plain_probe=1, min_rounds=2, plain_steps=2, refresh=1000)
    d = run_arms(g, {"a": 70.0, "b": 50.0}, plain_rate=80.0, steps=1 + 3 + 3 + 2 + 3 + 4 + 3)
    # both lose; plain; a (measured before b) is retried, loses; plain x4; then b
    assert d == ["p"] + ["a"] * 3 + ["b"] * 3 + ["p"] * 2 + ["a"] * 3 + ["p"] * 4 + ["b"] * 3
