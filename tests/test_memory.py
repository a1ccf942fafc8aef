"""Memory budgets: parsing and reading the cgroup / meminfo limits (edgeinfer.runtime.memory)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeinfer.errors import ConfigError
from edgeinfer.runtime import memory
from edgeinfer.runtime.memory import cgroup_memory, format_bytes, mem_available, parse_budget


@pytest.mark.parametrize("text, expected", [
    ("200MB", 200_000_000), ("200 MB", 200_000_000), ("1.5GiB", 3 * 2**29), ("512M", 512 * 2**20),
    ("512MiB", 512 * 2**20), ("64k", 65536), ("64kB", 64_000), ("1e9", 10**9), ("4096", 4096),
    ("2G", 2 * 2**30), ("1GB", 10**9), ("  300mb ", 300_000_000), (1234, 1234), (2.5e6, 2_500_000),
])
def test_parse_budget_units(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["", "MB", "200XB", "-5MB", "0", "1.2.3G", "ten MB", None, True, [1]])
def test_parse_budget_rejects_with_field_name(bad):
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_budget(bad)


def test_format_bytes():
    assert format_bytes(200 * 2**20) == "200.0 MiB"
    assert format_bytes(3 * 2**29) == "1.5 GiB"
    assert format_bytes(512) == "512 B"


def _fake_v1(tmp: Path, limits: dict[str, int], usage: int) -> tuple[Path, Path]:
    """A fake cgroup v1 memory hierarchy: mount at tmp/memory, this process in /a/b."""
    mnt = tmp / "memory"
    for rel, lim in limits.items():
        d = mnt / rel.strip("/") if rel != "/" else mnt
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(f"{lim}\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.max_usage_in_bytes").write_text(f"{usage + 5}\n")
    cg = tmp / "cgroup"
    cg.write_text("12:pids:/a/b\n4:memory:/a/b\n0::/\n")
    mi = tmp / "mountinfo"
    mi.write_text(f"30 25 0:27 / {mnt} rw,nosuid - cgroup cgroup rw,memory\n"
                  f"31 25 0:28 / {tmp / 'unified'} rw - cgroup2 cgroup2 rw\n")
    return cg, mi


def test_cgroup_v1_takes_tightest_ancestor_limit(tmp_path):
    unlimited = 9223372036854771712
    cg, mi = _fake_v1(tmp_path, {"/": unlimited, "/a": 300 << 20, "/a/b": 500 << 20}, usage=123456)
    got = cgroup_memory(cg, mi)
    assert got is not None and got.version == 1
    assert got.path == tmp_path / "memory" / "a" / "b"
    assert got.limit == 300 << 20  # the parent's limit is tighter
    assert got.usage == 123456 and got.peak() == 123461


def test_cgroup_v1_unlimited_is_none(tmp_path):
    unlimited = 9223372036854771712
    cg, mi = _fake_v1(tmp_path, {"/": unlimited, "/a": unlimited, "/a/b": unlimited}, usage=1)
    assert cgroup_memory(cg, mi).limit is None


def test_cgroup_v2_memory_max(tmp_path):
    mnt = tmp_path / "unified"
    d = mnt / "user.slice" / "app"
    d.mkdir(parents=True)
    (mnt / "user.slice" / "memory.max").write_text("max\n")
    (mnt / "user.slice" / "memory.current").write_text("10\n")
    (d / "memory.max").write_text(f"{256 << 20}\n")
    (d / "memory.current").write_text("4096\n")
    (d / "memory.peak").write_text("8192\n")
    cg = tmp_path / "cgroup"
    cg.write_text("0::/user.slice/app\n")
    mi = tmp_path / "mountinfo"
    mi.write_text(f"31 25 0:28 / {mnt} rw - cgroup2 cgroup2 rw\n")
    got = cgroup_memory(cg, mi)
    assert (got.version, got.limit, got.usage, got.peak()) == (2, 256 << 20, 4096, 8192)


def test_no_cgroup_files(tmp_path):
    assert cgroup_memory(tmp_path / "missing", tmp_path / "missing2") is None


def test_mem_available_matches_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:  1000 kB\nMemFree:  10 kB\nMemAvailable:  777 kB\n")
    assert mem_available(f) == 777 * 1024
    real = mem_available()
    assert real is None or real > 0


def test_resolve_budget_user_value_capped_by_cgroup(monkeypatch, tmp_path):
    cg, mi = _fake_v1(tmp_path, {"/": 9223372036854771712, "/a": 100 << 20, "/a/b": 100 << 20}, usage=1)
    fake = cgroup_memory(cg, mi)
    monkeypatch.setattr(memory, "cgroup_memory", lambda: fake)
    assert memory.resolve_budget("50MiB").bytes == 50 << 20
    capped = memory.resolve_budget("1GiB")
    assert capped.bytes == 100 << 20 and "cgroup v1" in capped.source
    assert memory.resolve_budget(None).bytes == 100 << 20


def test_resolve_budget_without_cgroup_uses_meminfo(monkeypatch):
    monkeypatch.setattr(memory, "cgroup_memory", lambda: None)
    b = memory.resolve_budget()
    assert b.bytes >= memory.mem_available() and "MemAvailable" in b.source


def test_working_set_subtracts_inactive_page_cache(tmp_path):
    cg, mi = _fake_v1(tmp_path, {"/": 9223372036854771712, "/a": 100 << 20, "/a/b": 100 << 20}, usage=80 << 20)
    (tmp_path / "memory" / "a" / "b" / "memory.stat").write_text(
        "cache 50000000\nrss 30000000\ninactive_file 9\ntotal_inactive_file 20971520\n")
    assert cgroup_memory(cg, mi).working_set() == 60 << 20


def test_lock_pages_on_fault_keeps_a_mapping_readable(tmp_path):
    import mmap
    import platform

    f = tmp_path / "weights.bin"
    data = bytes(range(256)) * 4096  # 1 MiB
    f.write_bytes(data)
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        assert m[:256] == data[:256]  # touched before
        covered = memory.lock_pages_on_fault(f)
        if platform.machine() in ("x86_64", "aarch64") and os.geteuid() == 0:
            assert covered >= len(data)
        assert m[:] == data  # dropped mappings fault back in from the file
        m.close()
    assert memory.file_mappings(f) == []


def test_return_freed_memory_on_glibc():
    import platform

    ok = memory.return_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert ok


def _cached_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore over a fresh shared mapping)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, page = os.path.getsize(path), os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        vec = (ctypes.c_ubyte * (-(-size // page)))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return sum(v & 1 for v in vec)
    finally:
        os.close(fd)


def test_lock_pages_on_fault_drops_the_files_page_cache(tmp_path):
    """Loading read the whole file; afterwards only what is touched again may stay charged."""
    import mmap
    import platform

    if platform.machine() not in ("x86_64", "aarch64") or os.geteuid() != 0:
        pytest.skip("mlock2 needs Linux on x86_64/aarch64 and root")
    f = tmp_path / "weights.bin"
    data = os.urandom(4 << 20)
    with open(f, "wb") as out:  # written and flushed: clean pages, as a bundle's files are
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    pages = (4 << 20) // os.sysconf("SC_PAGE_SIZE")
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        assert m[:] == data  # read it all, as a session loading its weights does
        assert _cached_pages(f) == pages
        assert memory.lock_pages_on_fault(f) >= len(data)
        assert _cached_pages(f) < pages // 8
        assert m[:4096] == data[:4096]  # what is touched again comes back
        m.close()


def test_trim_heap_gives_freed_heap_back():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    memory.trim_heap()
    keep = bytearray(64)  # noqa: F841 - a live block above the freed ones
    junk = [bytearray(1 << 15) for _ in range(1024)]  # 32 MiB in blocks below the mmap threshold
    keep2 = bytearray(64)  # pins the heap top so that free() alone cannot shrink it
    before = memory.process_rss()
    del junk
    assert memory.trim_heap()
    assert memory.process_rss() < before - (16 << 20)
    del keep2


def resident_bytes(lo: int, hi: int) -> int:
    """Resident bytes of the whole pages inside [lo, hi) of this process (mincore: exact for
    the range, where a mapping's Rss would also count whatever the kernel merged it with)."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-lo // page) * page, hi // page * page
    n = (hi - lo) // page
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * page


def _thp_enabled() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def test_avoid_huge_pages_keeps_a_sparsely_touched_buffer_small():
    """One element touched per 3 MiB row: with huge pages advised (as NumPy does for large
    arrays) a 2 MiB page each; after avoid_huge_pages only the 4 KiB pages touched. Both buffers
    are fresh anonymous mappings, so that what malloc does elsewhere in the process plays no part."""
    import mmap

    import numpy as np

    if not _thp_enabled():
        pytest.skip("transparent huge pages are off on this kernel: nothing to avoid")
    shape = (60, 3 * 4096 * 64)  # a SmolLM2 KV cache for 4096 tokens, 188 MB
    nbytes = 4 * shape[0] * shape[1]
    maps = [mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(2)]
    control, advised = (np.frombuffer(m, np.float32).reshape(shape) for m in maps)
    span = lambda a: (a.ctypes.data, a.ctypes.data + a.nbytes)  # noqa: E731
    for a in (control, advised):
        memory._madvise(*span(a), 14)  # MADV_HUGEPAGE, NumPy's advice
    assert memory.avoid_huge_pages(advised)
    for a in (control, advised):
        a[:, 0] = 1.0
    if resident_bytes(*span(control)) < 32 << 20:
        pytest.skip("the kernel gave the control buffer no huge pages here")
    assert resident_bytes(*span(advised)) < 4 << 20
    assert float(advised.sum()) == 60.0


def test_release_clean_file_pages_keeps_contents_and_written_mappings(tmp_path):
    import mmap

    d = tmp_path / "model"
    d.mkdir()
    clean, written = d / "clean.data", d / "written.data"
    data = os.urandom(2 << 20)
    for f in (clean, written):  # written and flushed: clean pages, as a bundle's files are
        with open(f, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    with open(clean, "rb") as f1, open(written, "r+b") as f2:
        # private writable mappings, as onnxruntime maps external data
        m1 = mmap.mmap(f1.fileno(), 0, access=mmap.ACCESS_COPY)
        m2 = mmap.mmap(f2.fileno(), 0, access=mmap.ACCESS_COPY)
        assert m1[:] == data and m2[:] == data  # loading reads it all
        m2[:4] = b"\0\0\0\0"  # a private copy of one page
        before = sum(f.get("Rss", 0) for _, _, p, f in memory._smaps() if p.startswith(str(d)))
        freed = memory.release_clean_file_pages(d)
        if not hasattr(memory, "_smaps") or before == 0:
            pytest.skip("no /proc/self/smaps here")
        assert freed >= len(data) - 8192  # the clean mapping's pages
        resident = {p: f.get("Rss", 0) * 1024 for _, _, p, f in memory._smaps() if p.startswith(str(d))}
        assert resident[os.path.realpath(clean)] < 64 << 10
        assert m1[:] == data  # faults back in from the file
        assert m2[:4] == b"\0\0\0\0" and m2[4:] == data[4:]  # the private copy survived
        m1.close()
        m2.close()


def test_lazy_zeros_is_a_writable_zero_array(monkeypatch):
    import mmap

    import numpy as np

    a = memory.lazy_zeros((3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.writeable and not a.any()
    a[1, 2] = 7.0
    assert float(a.sum()) == 7.0
    monkeypatch.delattr(mmap, "MAP_PRIVATE")  # as on Windows
    b = memory.lazy_zeros((4,), np.int64)
    assert isinstance(b.base, type(None)) or not isinstance(b.base, mmap.mmap)
    assert b.tolist() == [0, 0, 0, 0]
