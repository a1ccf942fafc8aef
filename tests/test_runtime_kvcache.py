"""KVCache against a plain Python-list reference: append (gather by node index), scratch
write + gather, truncate, growth re-layout across blocks, and the views the graph reads."""
import numpy as np
import pytest

from edgeinfer.runtime.kvcache import KVCache

L, H, D = 3, 3, 4


def kv(rng, n):
    return ([rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(L)],
            [rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(L)])


def check(cache, ref_k, ref_v):
    n = len(ref_k)
    assert cache.length == n
    for i in range(L):
        k, v = cache.keys[i], cache.values[i]
        assert k.flags["C_CONTIGUOUS"] and k.shape == (1, H, cache.capacity, D)
        want_k = np.stack([r[i] for r in ref_k], axis=1) if n else np.zeros((H, 0, D))
        want_v = np.stack([r[i] for r in ref_v], axis=1) if n else np.zeros((H, 0, D))
        np.testing.assert_array_equal(k[0, :, :n], want_k)
        np.testing.assert_array_equal(v[0, :, :n], want_v)
        assert np.isfinite(k).all() and np.isfinite(v).all()  # padding must be finite


def rows(ks, vs, idx):
    """Per token: list over layers of [H, D] arrays."""
    return [[k[0, :, j] for k in ks] for j in idx], [[v[0, :, j] for v in vs] for j in idx]


@pytest.mark.parametrize("block", [1, 4, 64])
def test_append_gather_truncate_against_reference(block):
    rng = np.random.default_rng(0)
    cache = KVCache(L, H, D, max_context=40, block=block)
    ref_k, ref_v = [], []
    # prefill 7, then accepted paths of various shapes, with rollbacks in between
    for n, idx in [(7, None), (5, [0, 2, 3]), (1, [0]), (4, []), (6, [0, 1, 2, 3, 4, 5]), (3, [1])]:
        ks, vs = kv(rng, n)
        cache.append(ks, vs, None if idx is None else np.array(idx, dtype=np.int64))
        rk, rv = rows(ks, vs, range(n) if idx is None else idx)
        ref_k += rk
        ref_v += rv
        check(cache, ref_k, ref_v)
        if len(ref_k) > 10:
            cache.truncate(len(ref_k) - 2)
            del ref_k[-2:], ref_v[-2:]
            check(cache, ref_k, ref_v)


def test_scratch_write_then_gather_path():
    rng = np.random.default_rng(1)
    cache = KVCache(L, H, D, max_context=32, block=4)
    ks, vs = kv(rng, 5)
    cache.append(ks, vs)
    ref_k, ref_v = rows(ks, vs, range(5))
    sk, sv = kv(rng, 6)  # six scratch nodes after the committed tokens
    cache.ensure(5 + 6)
    cache.write(5, sk, sv)
    check(cache, ref_k, ref_v)  # scratch is not committed
    path = [0, 3, 5]
    cache.gather(5 + np.array(path))
    rk, rv = rows(sk, sv, path)
    check(cache, ref_k + rk, ref_v + rv)


def test_growth_relayout_keeps_contents_and_is_in_place():
    rng = np.random.default_rng(2)
    cache = KVCache(L, H, D, max_context=100, block=8)
    base = cache.keys[0].ctypes.data
    ref_k, ref_v = [], []
    versions = {cache.layout_version}
    for _ in range(30):
        ks, vs = kv(rng, 3)
        cache.append(ks, vs)
        rk, rv = rows(ks, vs, range(3))
        ref_k += rk
        ref_v += rv
        versions.add(cache.layout_version)
        check(cache, ref_k, ref_v)
    assert cache.capacity == 100  # max_context caps the last block
    assert len(versions) == 11  # 8, 16, ..., 72 by blocks, then by an eighth: 88, 100 (capped)
    assert cache.keys[0].ctypes.data == base  # same preallocated buffer


def test_growth_is_geometric():
    cache = KVCache(1, 2, 4, max_context=5000, block=4)
    one = [np.ones((1, 2, 1, 4), np.float32)]
    for _ in range(4000):
        cache.append(one, one)
    assert cache.layout_version < 50  # block by block would re-lay out 1000 times
    assert cache.length <= cache.capacity <= cache.length * 9 // 8 + 8


def test_errors():
    cache = KVCache(L, H, D, max_context=10, block=4)
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="exceed max_context"):
        cache.ensure(11)
    ks, vs = kv(rng, 4)
    cache.append(ks, vs)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="gather"):
        cache.gather(np.array([2, 3]))  # committed positions
    with pytest.raises(ValueError, match="gather"):
        cache.ensure(8)
        cache.gather(np.array([6, 5]))  # not increasing
    assert cache.nbytes_used() == 2 * L * H * 4 * D * 4


def test_first_tokens_do_not_make_the_whole_cache_resident():
    """Each layer's row is sized for max_context and fills from its start: with huge pages (what
    NumPy asks for) 40 tokens made 178 of SmolLM2's 188 MB resident at 4096 tokens."""
    from pathlib import Path

    from test_memory import resident_bytes

    try:
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            pytest.skip("transparent huge pages are off on this kernel")
    except OSError:
        pytest.skip("not Linux")
    c = KVCache(30, 3, 64, 4096)
    c.ensure(40)
    c._all[:, :, :40] = 1.0
    resident = resident_bytes(c._buf.ctypes.data, c._buf.ctypes.data + c._buf.nbytes)
    assert resident < 8 << 20, resident  # 60 rows x 48 KiB touched, ~3 MB
    assert c.nbytes_used() == 0 and float(c._all[:, :, :40].sum()) == 60 * 3 * 40 * 64


def test_cache_pages_stay_lazy_when_malloc_serves_from_the_heap(tmp_path):
    """np.zeros of a large buffer is cleared up front when glibc takes it from a heap that held
    freed memory (a process with many mappings; here malloc is told never to map): the cache
    has a mapping of its own, so 40 tokens still leave it almost all unresident."""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt")
    script = tmp_path / "heap.py"
    script.write_text(
        "import ctypes, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import numpy as np\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.mallopt(-4, 0)\n"  # M_MMAP_MAX = 0
        "libc.mallopt(-1, 1 << 30)\n"  # M_TRIM_THRESHOLD: freed heap stays
        "junk = np.ones(30 << 20, np.float64); del junk\n"
        "from edgeinfer.runtime.kvcache import KVCache\n"
        "from test_memory import resident_bytes\n"
        "c = KVCache(30, 3, 64, 4096); c.ensure(40); c._all[:, :, :40] = 1.0\n"
        "control = np.zeros(c._buf.shape, np.float32); control[:, 0] = 1.0\n"
        "span = lambda a: (a.ctypes.data, a.ctypes.data + a.nbytes)\n"
        "print(resident_bytes(*span(c._buf)), resident_bytes(*span(control)))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cache, control = map(int, out.stdout.split())
    assert control > 100 << 20  # the condition really arose: np.zeros was cleared whole
    assert cache < 8 << 20, cache
