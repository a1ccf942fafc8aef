"""The generation loop on tiny random models. The reference is independent of the runtime:
greedy decoding with onnxruntime directly on the full sequence (tests/runtime_models)."""
import numpy as np
import onnxruntime as ort
import pytest

from edgeinfer.errors import ConfigError, ContextLimitError
from edgeinfer.export.onnx_builder import build_model_onnx
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime.drafters.model import ModelDrafter
from edgeinfer.runtime.drafters.ngram import NgramDrafter
from edgeinfer.runtime.drafters.recycle import RecyclingDrafter
from edgeinfer.runtime.engine import Engine, fit_tree
from edgeinfer.runtime.config import GenerationConfig, TreeBudget
from edgeinfer.runtime.sampling import SamplingParams, process_logits
from edgeinfer.runtime.session import ModelRunner
from edgeinfer.runtime.tokenizer import Tokenizer
from edgeinfer.runtime.tree import TokenTree

from runtime_models import (byte_bpe_tokenizer, random_weights, raw_greedy, raw_logits,
                            same_or_near_tie, tiny_spec)

PROMPT = [1, 5, 9, 22, 7, 100, 3, 4, 5, 6, 7, 8, 1, 5, 9]
N = 40


class OracleDrafter:
    """Knows the reference continuation and proposes trees that are partly wrong: the main
    branch is corrupted at a varying depth, a wrong sibling comes first at the root, and the
    right token at depth 1 sometimes sits in a second child."""

    name = "oracle"

    def __init__(self, prompt, ref):
        self.seq, self.n0, self.calls, self.observed = list(prompt) + list(ref), len(prompt), 0, 0

    def propose(self, context, budget, stop=None):
        self.calls += 1
        k = len(context)
        truth = self.seq[k:k + budget.max_depth] if context == self.seq[:k] else []
        t = TokenTree()
        if budget.branch_threshold < 1.0:  # tree mode: a wrong first child at the root
            t.add((truth[0] + 1) % 256 if truth else 0, -1, 0.5, self.name)
        parent, bad_at = -1, self.calls % 4
        for d, tok in enumerate(truth):
            if len(t) >= budget.max_nodes:
                break
            if d == 1 and self.calls % 2:
                t.add((tok + 7) % 256, parent, 0.4, self.name)  # wrong sibling before the right one
                if len(t) >= budget.max_nodes:
                    break
            parent = t.add((tok + 3) % 256 if d == bad_at else tok, parent, 0.9, self.name)
        return t

    def observe(self, result):
        self.observed += 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    spec = tiny_spec(layers=2, vocab=320)
    w = random_weights(spec, 0)
    build_model_onnx(spec, w.__getitem__, QuantRecipe(), d / "target.onnx")
    build_model_onnx(spec.truncated(1), w.__getitem__, QuantRecipe(), d / "draft.onnx")
    ref, gaps = raw_greedy(d / "target.onnx", spec, PROMPT, N)
    return spec, d, ref, gaps


def make_engine(tiny, max_context=128, tokenizer=None, eos=()):
    spec, d, ref, _ = tiny
    target = ModelRunner(d / "target.onnx", spec, threads=1, max_context=max_context, kv_block=16, name="target")
    draft = ModelRunner(d / "draft.onnx", spec.truncated(1), threads=1, max_context=max_context, kv_block=16,
                        name="draft")
    same = ModelRunner(d / "target.onnx", spec, threads=1, max_context=max_context, kv_block=16, name="same")
    drafters = {"oracle": OracleDrafter(PROMPT, ref), "model": ModelDrafter(draft), "same": ModelDrafter(same),
                "ngram": NgramDrafter(), "recycle": RecyclingDrafter(spec.vocab_size)}
    return Engine(target, tokenizer, drafters, default_drafters=("model",), eos_token_ids=eos,
                  draft_runners={"draft": draft})


def test_plain_equals_independent_greedy(tiny):
    _, _, ref, gaps = tiny
    r = make_engine(tiny).generate(PROMPT, max_new_tokens=N, mode="plain")
    assert same_or_near_tie(r.tokens, ref, gaps) and r.finish_reason == "length"
    assert r.stats.verifications == 0 and r.stats.generated_tokens == N


@pytest.mark.parametrize("mode,drafter", [
    ("tree", "oracle"), ("chain", "oracle"), ("tree", "model"), ("chain", "model"), ("tree", "same"),
    ("tree", "ngram"), ("tree", "recycle"), ("tree", ["model", "ngram"]), ("auto", None)])
def test_speculative_greedy_is_lossless(tiny, mode, drafter):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny)
    r = eng.generate(PROMPT, max_new_tokens=N, mode=mode, drafter=drafter)
    assert same_or_near_tie(r.tokens, ref, gaps), (r.tokens, ref)
    s = r.stats
    assert s.mode == ("tree" if mode == "auto" else mode) and s.generated_tokens == N
    if drafter in ("oracle", "same"):
        assert s.verifications > 0 and s.accepted_tokens > 0 and s.mean_accepted > 1
        assert s.verifications < N - 1  # several tokens per target pass
    if drafter == "oracle":  # the oracle is partly wrong on purpose
        assert 0 < s.acceptance_rate < 1 and eng.drafters["oracle"].observed == s.verifications


@pytest.mark.parametrize("drafter", ["model", "same", "ngram"])
def test_pipelined_speculation_is_lossless_and_overlaps(tiny, drafter):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny)
    eng.pipeline = True
    # A tiny model's pass takes well under a millisecond, so in one generation the speculating
    # thread can miss every verification (seen once in six full runs): a few generations may run,
    # each must be lossless, and at least one must show the overlap.
    for attempt in range(5):
        r = eng.generate(PROMPT, max_new_tokens=N, drafter=drafter, mode="tree")  # "auto" may choose plain
        assert same_or_near_tie(r.tokens, ref, gaps), (r.tokens, ref)
        kinds = {e.phase for e in r.stats.trace}
        if drafter == "ngram":  # no draft model to speculate with: the plain speculative loop
            assert "draft" in kinds and "speculate" not in kinds
            return
        assert r.stats.verifications > 0 and "speculate" in kinds and "verify" in kinds
        verify = [(e.start, e.end) for e in r.stats.trace if e.phase == "verify"]
        spec = [(e.start, e.end) for e in r.stats.trace if e.phase == "speculate"]
        overlap = sum(max(0.0, min(b, d) - max(a, c)) for a, b in verify for c, d in spec)
        if overlap > 0:
            break
    assert overlap > 0  # the draft ran while the target verified


class _CountingRunner(ModelRunner):
    """The target, counting at every pass the VerifyResults still alive (each holds its pass's
    logits, [nodes, vocab]: a streamed target's budget counts only the one being computed)."""

    alive_at_pass: list[int]

    def forward(self, tokens, parents=None, logits_index=None):
        import gc

        from edgeinfer.runtime.verify import VerifyResult

        gc.collect()
        self.alive_at_pass.append(sum(isinstance(o, VerifyResult) for o in gc.get_objects()))
        return super().forward(tokens, parents, logits_index)


@pytest.mark.parametrize("pipeline", [False, True])
def test_no_earlier_verification_outlives_into_the_next_pass(tiny, pipeline):
    spec, d, ref, gaps = tiny
    eng = make_engine(tiny)
    target = _CountingRunner(d / "target.onnx", spec, threads=1, max_context=128, kv_block=16, name="target")
    target.alive_at_pass = []
    eng.target, eng.pipeline = target, pipeline
    r = eng.generate(PROMPT, max_new_tokens=N, mode="tree", drafter="recycle" if not pipeline else "model")
    assert same_or_near_tie(r.tokens, ref, gaps)
    assert r.stats.verifications > 3 and len(target.alive_at_pass) > 3
    assert max(target.alive_at_pass) == 0, target.alive_at_pass


def test_max_new_tokens_and_context_end(tiny):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny, max_context=len(PROMPT) + 20)
    for n in (1, 2, 7, 20):
        r = eng.generate(PROMPT, max_new_tokens=n, drafter="same")
        assert len(r.tokens) == n and same_or_near_tie(r.tokens, ref[:n], gaps)
    with pytest.raises(ContextLimitError, match=r"prompt of 15 tokens \+ max_new_tokens=21 = 36 tokens exceeds"
                                                r" it: the context limit is 35 tokens"):
        eng.generate(PROMPT, max_new_tokens=21)


def test_eos_stops_and_is_not_returned(tiny):
    _, _, ref, _ = tiny
    eos = ref[6]
    first = ref.index(eos)
    for mode in ("plain", "tree"):
        r = make_engine(tiny, eos=(eos,)).generate(PROMPT, max_new_tokens=N, mode=mode, drafter="oracle")
        assert r.tokens == ref[:first] and r.finish_reason == "eos"
        r = make_engine(tiny, eos=(eos,)).generate(PROMPT, max_new_tokens=N, mode=mode, ignore_eos=True)
        assert len(r.tokens) == N


def test_stream_text_stop_strings_and_utf8(tiny):
    tok = Tokenizer(byte_bpe_tokenizer())
    eng = make_engine(tiny, tokenizer=tok)
    plain = eng.generate(PROMPT, max_new_tokens=N, mode="plain")
    assert plain.text == tok.decode(plain.tokens)
    for drafter in ("oracle", "model"):
        s = eng.stream(PROMPT, max_new_tokens=N, drafter=drafter)
        pieces = list(s)
        assert "".join(pieces) == s.result.text == plain.text and len(pieces) > 1
        assert s.result.tokens == plain.tokens
    # random tokens decode to broken UTF-8 too: pieces never end inside a character
    assert all(not p.endswith("\ufffd") or p == pieces[-1] for p in pieces[:-1])
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 3]
    cut = plain.text[:plain.text.index(stop)]
    for mode in ("plain", "tree"):
        r = eng.generate(PROMPT, max_new_tokens=N, mode=mode, drafter="oracle", stop=[stop, "\x00never"])
        assert r.text == cut and r.finish_reason == "stop"
        assert "".join(eng.stream(PROMPT, max_new_tokens=N, mode=mode, stop=[stop])) == cut


def test_stream_tokens_and_positional_config(tiny):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny)
    cfg = GenerationConfig(max_new_tokens=N, mode="tree", drafters=("same",))
    s = eng.stream_tokens(PROMPT, cfg)
    batches = list(s)
    assert [t for b in batches for t in b] == s.result.tokens and same_or_near_tie(s.result.tokens, ref, gaps)
    assert len(batches) == 1 + s.result.stats.verifications  # prefill token, then one batch per pass
    assert max(len(b) for b in batches) > 1
    assert eng.generate(PROMPT, cfg, max_new_tokens=3).tokens == s.result.tokens[:3]


def test_stats_and_trace(tiny):
    eng = make_engine(tiny)
    assert eng.runners["draft"].forward_calls == 0
    r = eng.generate(PROMPT, max_new_tokens=N, drafter="model", mode="tree")
    s = r.stats
    assert s.prompt_tokens == len(PROMPT) and s.generated_tokens == N
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0 and 0 < s.ttft_seconds <= s.total_seconds
    assert s.providers == {"target": "CPUExecutionProvider", "draft": "CPUExecutionProvider"}
    assert s.draft_seconds > 0 and s.target_seconds > 0 and s.drafted_tokens >= s.accepted_tokens
    phases = {e.phase for e in s.trace}
    assert {"prefill", "draft", "verify", "observe"} <= phases and any(e.model == "draft" for e in s.trace)
    assert all(e.end >= e.start for e in s.trace) and s.trace == sorted(s.trace, key=lambda e: e.start)
    assert s.trace[0].phase == "prefill"
    d = s.to_dict()
    assert "trace" not in d and d["acceptance_rate"] == s.acceptance_rate
    # the draft model's forwards, counted by its runner, against the drafter's own trace of them
    assert s.draft_forwards == sum(e.model == "draft" for e in s.trace) > 0
    assert 0 < s.draft_forward_seconds <= s.draft_seconds  # inside the drafter's time (no pipeline)
    assert s.draft_forwards_per_token == pytest.approx(s.draft_forwards / N)
    assert s.draft_bound_tokens_per_s == pytest.approx((N - 1) / s.draft_forward_seconds)
    assert s.draft_bound_tokens_per_s >= s.decode_tokens_per_s  # the draft alone takes less time
    again = eng.generate(PROMPT, max_new_tokens=N, drafter="model", mode="tree").stats
    plain = eng.generate(PROMPT, max_new_tokens=N, mode="plain").stats
    assert plain.draft_forwards == 0 and plain.draft_bound_tokens_per_s == 0.0
    ngram = eng.generate(PROMPT, max_new_tokens=N, drafter="ngram", mode="tree").stats
    assert ngram.draft_forwards == 0
    # per call, not cumulative: the calls' counts add up to the runner's total
    assert again.draft_forwards > 0
    assert eng.runners["draft"].forward_calls == s.draft_forwards + again.draft_forwards


def test_sampling_seeded_and_distribution_matches_target(tiny):
    spec, d, _, _ = tiny
    eng = make_engine(tiny)
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=20)
    a, b = eng.generate(PROMPT, seed=7, **kw), eng.generate(PROMPT, seed=7, **kw)
    assert a.tokens == b.tokens  # reproducible
    # The distribution of (token 1, token 2) in tree mode (token 2 goes through verification
    # by the lossless rule) against the exact target distribution from raw logits.
    params = SamplingParams(temperature=2.0, top_k=2)
    sess = ort.InferenceSession(str(d / "target.onnx"), providers=["CPUExecutionProvider"])
    p1 = process_logits(raw_logits(sess, spec, PROMPT)[-1], params)
    exact = {}
    for t1 in np.flatnonzero(p1):
        p2 = process_logits(raw_logits(sess, spec, PROMPT + [int(t1)])[-1], params)
        for t2 in np.flatnonzero(p2):
            exact[(int(t1), int(t2))] = p1[t1] * p2[t2]
    runs = 500
    counts: dict = {}
    for seed in range(runs):
        r = eng.generate(PROMPT, max_new_tokens=2, temperature=2.0, top_k=2, seed=seed, drafter="same",
                         mode="tree")
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / runs - exact.get(k, 0.0)) for k in set(exact) | set(counts))
    assert tv < 0.1, (tv, counts, exact)
    # negative control: a rule that always keeps the draft's (= target's greedy) token would fail
    greedy_t2 = {t1: max((k for k in exact if k[0] == t1), key=exact.get) for t1, _ in exact}
    wrong = {}
    for (t1, t2), p in exact.items():
        wrong[greedy_t2[t1]] = wrong.get(greedy_t2[t1], 0.0) + p
    assert 0.5 * sum(abs(wrong.get(k, 0.0) - exact[k]) for k in exact) > 0.1


@pytest.mark.parametrize("kw,err,match", [
    (dict(prompt=""), ConfigError, "prompt: empty"), (dict(prompt="   "), ConfigError, "prompt: empty"),
    (dict(prompt=[]), ConfigError, "prompt: expected"), (dict(prompt=[1, 999]), ConfigError, "outside the vocabulary"),
    (dict(prompt="hi"), ConfigError, "needs a tokenizer"),
    (dict(max_new_tokens=0), ConfigError, "max_new_tokens must be a positive integer, got 0"),
    (dict(temperature=-1.0), ConfigError, "temperature must be a number >= 0"),
    (dict(top_p=0.0), ConfigError, r"top_p must be a number in \(0.0, 1.0\]"),
    (dict(top_p=1.5), ConfigError, "top_p"), (dict(top_k=-2), ConfigError, "top_k"),
    (dict(mode="beam"), ConfigError, "mode must be one of"),
    (dict(drafter="nope"), ConfigError, r"unknown drafter\(s\) \['nope'\], available"),
    (dict(beams=4), ConfigError, r"unknown generation option\(s\) \['beams'\]"),
    (dict(prompt=list(range(200))), ContextLimitError, "prompt of 200 tokens does not fit: the context limit is 128"),
])
def test_bad_input(tiny, kw, err, match):
    eng = make_engine(tiny)
    prompt = kw.pop("prompt", PROMPT)
    kw.setdefault("max_new_tokens", 5)
    with pytest.raises(err, match=match):
        eng.stream(prompt, **kw)  # raised at the call, before iterating


def test_tree_mode_needs_a_drafter(tiny):
    spec, d, _, _ = tiny
    eng = Engine(ModelRunner(d / "target.onnx", spec, max_context=64))
    assert eng.generate(PROMPT, max_new_tokens=3).stats.mode == "plain"  # auto -> plain
    with pytest.raises(ConfigError, match="needs a drafter"):
        eng.generate(PROMPT, max_new_tokens=3, mode="tree")


def test_fit_tree():
    t = TokenTree()
    for tok, p in zip([1, 2, 3, 4, 5, 6], [-1, -1, 0, 0, 2, 4]):
        t.add(tok, p)
    t.draft_dists[0] = np.ones(4) / 4
    f = fit_tree(t, TreeBudget(max_nodes=4, max_depth=2))
    assert f.tokens == [1, 2, 3, 4] and f.parents == [-1, -1, 0, 0] and 0 in f.draft_dists
    c = fit_tree(t, TreeBudget(max_nodes=8, max_depth=8), chain=True)
    assert c.tokens == [1, 3, 5, 6] and c.parents == [-1, 0, 1, 2]
    assert fit_tree(t, TreeBudget(max_nodes=8, max_depth=8)) is t


class SlowOracle(OracleDrafter):
    """The oracle with a costly propose: speculation then loses to plain decoding."""

    name = "slow"

    def propose(self, context, budget, stop=None):
        import time

        time.sleep(0.02)
        return super().propose(context, budget, stop)


def test_auto_mode_decodes_plain_while_speculation_measures_slower(tiny):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny)
    eng.drafters["slow"] = SlowOracle(PROMPT, ref)
    r = eng.generate(PROMPT, max_new_tokens=N, mode="auto", drafter="slow")
    assert same_or_near_tie(r.tokens, ref, gaps), (r.tokens, ref)
    # 2 plain probe steps, a stint of each arm (one catch-up round + at least 3 counted, 16 tokens,
    # all losing), then plain: a named drafter gives two arms, its tree and its chain
    rounds = r.stats.auto_rounds
    assert set(rounds) == {"tree:slow", "chain:slow"} and min(rounds.values()) >= 4, rounds
    assert r.stats.verifications == sum(rounds.values()) and r.stats.auto_plain_steps >= 2
    g = next(iter(eng._gates.values()))
    assert g.switches >= 1 and g.current is None  # it lost and decodes plain now
    forced = eng.generate(PROMPT, max_new_tokens=N, mode="tree", drafter="slow")  # an explicit mode: no gate
    assert forced.stats.auto_plain_steps == 0 and forced.stats.verifications > 0 and not forced.stats.auto_rounds
    assert same_or_near_tie(forced.tokens, ref, gaps)


def test_auto_mode_without_a_named_drafter_also_measures_token_recycling_chains(tiny):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny)
    eng.drafters["slow"] = SlowOracle(PROMPT, ref)
    eng.default_drafters = ("slow",)
    assert "recycle" in eng.drafters
    rounds: dict[str, int] = {}
    for _ in range(2):  # the gate lives with the engine: the second call goes on measuring
        r = eng.generate(PROMPT, max_new_tokens=N, mode="auto")
        assert same_or_near_tie(r.tokens, ref, gaps), (r.tokens, ref)
        for k, n in r.stats.auto_rounds.items():
            rounds[k] = rounds.get(k, 0) + n
    g = next(iter(eng._gates.values()))
    assert set(rounds) == {"tree:slow", "chain:slow", "chain:recycle"}, g.rates
    assert all(n >= 4 for n in rounds.values()), rounds  # every arm got a measured stint
    eng.auto_alternatives = False  # what a streamed target does: only the default tree
    r = eng.generate(PROMPT, max_new_tokens=N, mode="auto")
    assert set(r.stats.auto_rounds) <= {"tree:slow"} and same_or_near_tie(r.tokens, ref, gaps)


def test_reset_drafters_forgets_token_recycling_tables_and_keeps_output(tiny):
    _, _, ref, gaps = tiny
    eng = make_engine(tiny)
    rec = eng.drafters["recycle"]
    cold = eng.generate(PROMPT, max_new_tokens=N, mode="chain", drafter="recycle")
    assert (rec.adj >= 0).any()  # the table learned from the target's top-k
    warm = eng.generate(PROMPT, max_new_tokens=N, mode="chain", drafter="recycle")
    # the same prompt again: the table has seen its continuation and drafts it from memory
    assert warm.stats.accepted_tokens > cold.stats.accepted_tokens
    eng.reset_drafters()
    assert (rec.adj == -1).all()
    again = eng.generate(PROMPT, max_new_tokens=N, mode="chain", drafter="recycle")
    assert again.stats.accepted_tokens == cold.stats.accepted_tokens  # deterministic from a fresh table
    for r in (cold, warm, again):
        assert same_or_near_tie(r.tokens, ref, gaps)


@pytest.mark.parametrize("drafter", ["recycle", ["ngram", "recycle"]])
def test_token_recycling_learns_the_targets_topk_over_the_prompt(tiny, drafter):
    """Hot start: the prefill gives Token Recycling the target's top-k after every prompt token
    (checked against a full causal pass run directly in onnxruntime); plain decoding does not."""
    spec, d, ref, gaps = tiny
    eng = make_engine(tiny)
    eng.prefill_chunk = 6  # several chunks
    rec = eng.drafters["recycle"]
    eng.generate(PROMPT, max_new_tokens=1, mode="plain")
    assert (rec.adj == -1).all()
    eng.generate(PROMPT, max_new_tokens=1, mode="tree", drafter=drafter)  # the prefill only
    sess = ort.InferenceSession(str(d / "target.onnx"), providers=["CPUExecutionProvider"])
    logits = raw_logits(sess, spec, PROMPT)
    last = {t: i for i, t in enumerate(PROMPT)}  # a repeated token keeps its last position's row
    for t, i in last.items():
        row = logits[i]
        order = np.argsort(-row, kind="stable")
        want = order[:rec.k]
        got = rec.adj[t]
        # equal up to near-ties between neighbouring ranks (a batched pass rounds differently)
        top = row[want]
        for j in range(rec.k):
            if got[j] != want[j]:
                assert abs(row[got[j]] - top[j]) <= 1e-4 * max(1.0, abs(top[j])), (t, j)
    assert (rec.adj[[t for t in range(spec.vocab_size) if t not in last]] == -1).all()
    r = eng.generate(PROMPT, max_new_tokens=N, mode="tree", drafter=drafter)
    assert same_or_near_tie(r.tokens, ref, gaps)
