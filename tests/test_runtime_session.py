"""ModelRunner against an independent answer: onnxruntime run directly on the whole sequence
with an empty past and a plain causal mask (tests/runtime_models.raw_logits), for plain
decoding, tree passes, scratch nodes across calls, commits of tree paths, rollback, sliding
windows and KV capacity growth; each for the standard-Attention graph and for the in-place KV
layout (GroupQueryAttention writing into the bound cache), whose answer comes from the
standard graph of the same weights."""
import numpy as np
import onnxruntime as ort
import pytest

from edgeinfer.errors import BundleError, ContextLimitError
from edgeinfer.runtime.session import ModelRunner

from runtime_models import build_tiny_onnx, raw_greedy, raw_logits, tiny_spec

ATOL, RTOL = 2e-3, 1e-4
PROMPT = [1, 5, 9, 22, 7, 100, 3, 4, 5, 6, 7, 8]


@pytest.fixture(scope="module", params=["llama", "sliding", "llama-in-place", "sliding-in-place"])
def model(request, tmp_path_factory):
    """(spec, graph under test, session of the standard graph: the reference)."""
    spec = tiny_spec(layers=3, sliding_window=6 if request.param.startswith("sliding") else None)
    out = tmp_path_factory.mktemp(request.param)
    ref = build_tiny_onnx(spec, out)
    path = build_tiny_onnx(spec, out, name="in_place.onnx", in_place=True) if "in-place" in request.param else ref
    return spec, path, ort.InferenceSession(str(ref), providers=["CPUExecutionProvider"])


def runner(spec, path, bound=True, **kw):
    """bound=False: an in-place graph run as off the CPU provider (run(), presents sliced)."""
    kw.setdefault("max_context", 64)
    kw.setdefault("kv_block", 8)  # small blocks: the cache grows (re-lays out) during the tests
    r = ModelRunner(path, spec, threads=1, **kw)
    if not bound:
        r._io = None
    return r


def test_plain_decode_equals_raw_greedy(model):
    spec, path, sess = model
    ref, gaps = raw_greedy(sess, spec, PROMPT, 24)
    r = runner(spec, path)
    assert r.provider == "CPUExecutionProvider"
    logits = r.forward(PROMPT, logits_index=[len(PROMPT) - 1])
    r.commit(range(len(PROMPT)))
    assert logits.shape == (1, spec.vocab_size) and logits.dtype == np.float32
    out = [int(logits[0].argmax())]
    for step in range(23):
        logits = r.forward([out[-1]])
        r.commit([0])
        want = raw_logits(sess, spec, PROMPT + out)[-1]
        np.testing.assert_allclose(logits[0], want, atol=ATOL, rtol=RTOL)
        out.append(int(logits[0].argmax()))
    assert out == ref
    assert r.past_len == len(PROMPT) + 23 and r.cache.capacity >= r.past_len


def test_tree_pass_matches_each_branch(model):
    spec, path, sess = model
    r = runner(spec, path)
    r.forward(PROMPT, logits_index=[0])
    r.commit(range(len(PROMPT)))
    rng = np.random.default_rng(0)
    parents = [-1, 0, 0, 1, 1, 2, -1, 6, 7, 3]
    tokens = [int(t) for t in rng.integers(0, spec.vocab_size, len(parents))]
    logits = r.forward(tokens, parents)
    assert logits.shape == (len(tokens), spec.vocab_size)

    def path_tokens(i):
        p = []
        while i >= 0:
            p.append(tokens[i])
            i = parents[i]
        return p[::-1]

    for i in range(len(tokens)):
        want = raw_logits(sess, spec, PROMPT + path_tokens(i))[-1]
        np.testing.assert_allclose(logits[i], want, atol=ATOL, rtol=RTOL, err_msg=f"node {i}")
    # commit a branch, discard the rest, continue: the cache holds exactly that branch
    r.commit([0, 1, 3, 9])
    assert r.past_len == len(PROMPT) + 4 and r.num_scratch == 0
    nxt = r.forward([42], logits_index=[0])
    want = raw_logits(sess, spec, PROMPT + path_tokens(9) + [42])[-1]
    np.testing.assert_allclose(nxt[0], want, atol=ATOL, rtol=RTOL)


def test_scratch_nodes_across_forward_calls_and_logits_index(model):
    spec, path, sess = model
    r = runner(spec, path)
    r.forward(PROMPT, logits_index=[0])
    r.commit(range(len(PROMPT)))
    a = r.forward([10, 11])  # scratch 0 -> 1 (a chain from the root)
    b = r.forward([12, 13, 14], parents=[0, 2, -1])  # 2: child of 0, 3: child of 2, 4: root child
    c = r.forward([15])  # parents=None: continues after the last scratch node (4)
    assert r.num_scratch == 6
    seqs = {0: [10], 1: [10, 11], 2: [10, 12], 3: [10, 12, 13], 4: [14], 5: [14, 15]}
    got = {0: a[0], 1: a[1], 2: b[0], 3: b[1], 4: b[2], 5: c[0]}
    for node, seq in seqs.items():
        np.testing.assert_allclose(got[node], raw_logits(sess, spec, PROMPT + seq)[-1], atol=ATOL, rtol=RTOL)
    sel = r.forward([16, 17], parents=[3, 6], logits_index=[1])  # only the second node's logits
    np.testing.assert_allclose(sel[0], raw_logits(sess, spec, PROMPT + [10, 12, 13, 16, 17])[-1],
                               atol=ATOL, rtol=RTOL)
    r.commit([0, 2, 3, 6, 7])
    out = r.forward([18])
    np.testing.assert_allclose(out[0], raw_logits(sess, spec, PROMPT + [10, 12, 13, 16, 17, 18])[-1],
                               atol=ATOL, rtol=RTOL)


def test_truncate_discard_and_rollback(model):
    spec, path, sess = model
    r = runner(spec, path)
    r.forward(PROMPT + [30, 31, 32], logits_index=[0])
    r.commit(range(len(PROMPT) + 3))
    r.truncate(len(PROMPT))  # roll back the last three
    r.forward([40, 41])
    r.discard()
    assert r.num_scratch == 0 and r.past_len == len(PROMPT)
    out = r.forward([50])
    np.testing.assert_allclose(out[0], raw_logits(sess, spec, PROMPT + [50])[-1], atol=ATOL, rtol=RTOL)


def test_context_limit_and_bad_arguments(model):
    spec, path, _ = model
    r = runner(spec, path, max_context=16)
    r.forward(PROMPT, logits_index=[0])
    r.commit(range(len(PROMPT)))
    r.forward([1, 2])
    with pytest.raises(ContextLimitError, match=r"12 committed \+ 2 pending \+ 3 new tokens exceed the context limit of 16"):
        r.forward([3, 4, 5])
    if r.kv_in_place:
        fresh = runner(spec, path)
        with pytest.raises(ValueError, match="first call on an empty cache must be a chain"):
            fresh.forward([1, 2, 3], parents=[-1, 0, 0])
        fresh.forward([1, 2, 3], parents=[-1, 0, 1])  # a chain is fine
    with pytest.raises(ValueError, match="parent 5 of node 2"):
        r.forward([3], parents=[5])
    with pytest.raises(ValueError, match="logits_index"):
        r.forward([3], logits_index=[1])
    with pytest.raises(ValueError, match="not a root-to-node path"):
        r.commit([1])
    with pytest.raises(ValueError, match="scratch nodes"):
        r.commit([0, 7])
    r.commit([0, 1])
    assert r.past_len == 14


def test_graph_contract_checked(tmp_path, model):
    spec, path, _ = model
    with pytest.raises(BundleError, match="not found"):
        ModelRunner(tmp_path / "missing.onnx", spec)
    bigger = tiny_spec(layers=5, sliding_window=spec.sliding_window)
    with pytest.raises(BundleError, match="past_key.3"):
        ModelRunner(path, bigger)


def test_kv_layout_and_cache_contents_match_the_standard_graph(model, tmp_path):
    """The in-place graph's kernel writes the same K/V into the cache (at the scratch
    positions after the committed ones) as the runner copies from the standard graph's
    presents, also across a re-layout of the cache (kv_block 8)."""
    spec, path, sess = model
    ref_path = build_tiny_onnx(spec, tmp_path)
    r, unbound, ref = runner(spec, path), runner(spec, path, bound=False), runner(spec, ref_path)
    assert r.kv_in_place == (path.name == "in_place.onnx") and not ref.kv_in_place
    assert (r._io is not None) == r.kv_in_place and unbound._io is None
    parents = [-1, 0, 0, 1, -1, 4]
    logits = []
    for x in (r, unbound, ref):
        x.forward(PROMPT, logits_index=[0])
        x.commit(range(len(PROMPT)))
        x.forward([60, 61, 62, 63, 64, 65], parents)
        x.commit([0, 1, 3])
        logits.append(x.forward(list(range(70, 70 + 9))))  # grows the cache past a block boundary
    n = len(PROMPT) + 3 + 9
    assert r.cache.capacity >= n and r.past_len == ref.past_len == len(PROMPT) + 3
    for x, lg in zip((r, unbound), logits):
        np.testing.assert_allclose(lg, logits[-1], atol=ATOL, rtol=RTOL)
        for i in range(spec.num_layers):
            np.testing.assert_allclose(x.cache.keys[i][:, :, :n], ref.cache.keys[i][:, :, :n], atol=1e-5, rtol=0)
            np.testing.assert_allclose(x.cache.values[i][:, :, :n], ref.cache.values[i][:, :, :n], atol=1e-5, rtol=0)
