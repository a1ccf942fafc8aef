"""SpeculationGate decisions on given timings (runtime/gate.py)."""
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
    g = SpeculationGate(plain_probe=2, min_rounds=3, refresh=8)
    d = run(g, spec_rate=120.0, plain_rate=80.0, steps=30)
    assert d.startswith("pp" + "s" * 8 + "p" + "s" * 8 + "p")  # one plain step every 8 rounds
    assert g.switches == 0 and abs(g.plain_rate - 80.0) < 1e-9


def test_switch_to_plain_when_speculation_loses_then_try_again_with_backoff():
    g = SpeculationGate(plain_probe=2, min_rounds=3, plain_steps=5, max_backoff=1)
    d = run(g, spec_rate=60.0, plain_rate=80.0, steps=2 + 4 + 5 + 4 + 10 + 4 + 10)
    # each try: one catch-up round (not counted) + 3 counted; plain for 5, then 10 (capped)
    assert d == "pp" + "ssss" + "p" * 5 + "ssss" + "p" * 10 + "ssss" + "p" * 10
    assert g.switches == 3 and g.plain_steps_taken == 27


def test_a_won_try_resets_the_backoff():
    g = SpeculationGate(plain_probe=1, min_rounds=2, plain_steps=2, refresh=1000)
    assert run(g, 60.0, 80.0, 1 + 3 + 2 + 3 + 4) == "p" + "sss" + "pp" + "sss" + "pppp"
    assert run(g, 100.0, 80.0, 4) == "ssss"  # speculation wins now
    assert g._losses == 0
    d = run(g, 40.0, 80.0, 12)  # the mean falls below plain again: plain for the base length
    assert d.startswith("s") and "spp" + "s" in d


def test_a_draft_step_as_slow_as_a_plain_step_never_probes():
    g = SpeculationGate(plain_probe=2, plain_steps=4, max_backoff=2)
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
    g = SpeculationGate(plain_probe=1, min_rounds=2, margin=0.05, refresh=1000)
    assert run(g, spec_rate=77.0, plain_rate=80.0, steps=20) == "p" + "s" * 19  # 77 > 0.95 * 80
    g = SpeculationGate(plain_probe=1, min_rounds=2, margin=0.05, plain_steps=4, refresh=1000)
    assert run(g, spec_rate=75.0, plain_rate=80.0, steps=8) == "p" + "sss" + "pppp"


def test_the_catch_up_round_after_plain_steps_is_not_counted():
    g = SpeculationGate(plain_probe=1, min_rounds=2, refresh=1000)
    g.record_plain(1 / 50.0)
    assert g.speculate()
    g.record_round(3 / 10.0, 3)  # 10 tok/s: the draft catching up with the context
    for _ in range(5):
        assert g.speculate()
        g.record_round(3 / 60.0, 3)
    assert g.switches == 0 and abs(g.spec_rate - 60.0) < 1e-9
