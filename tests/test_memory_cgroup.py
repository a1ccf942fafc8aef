"""Real cgroup memory caps (edgeinfer.runtime.cgroup): a child that allocates past the cap is
stopped by the kernel, one that stays under is not, page cache counts, cgroups are removed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edgeinfer.runtime.cgroup import MemoryCgroup, memory_cgroup_root, run_capped
from edgeinfer.runtime.memory import cgroup_memory

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or memory_cgroup_root() is None,
                                reason="needs root and a writable cgroup memory controller")
MiB = 2**20

ALLOC = """
import sys
n = int(sys.argv[1])
blocks = []
for _ in range(n):
    b = bytearray(1 << 20)
    for i in range(0, len(b), 4096):  # touch every page
        b[i] = 1
    blocks.append(b)
print("allocated", n)
"""


def test_allocation_past_cap_is_killed_and_cgroup_removed():
    with MemoryCgroup(64 * MiB) as cg:
        path = cg.path
        r = cg.run([sys.executable, "-c", ALLOC, "200"], timeout=120, drop=False)
        assert path.is_dir()
    assert not path.exists()
    assert r.returncode != 0 and "allocated" not in r.stdout
    assert r.oom_killed and r.oom_kills >= 1
    assert r.peak is not None and r.peak <= 64 * MiB


def test_allocation_under_cap_runs_and_peak_is_reported():
    r = run_capped([sys.executable, "-c", ALLOC, "20"], 128 * MiB, timeout=120, drop=False)
    assert r.returncode == 0 and "allocated 20" in r.stdout
    assert not r.oom_killed
    assert 20 * MiB < r.peak <= 128 * MiB


def test_page_cache_counts_against_the_cap(tmp_path: Path):
    """Reading a file larger than the cap succeeds (clean pages are reclaimed) but the cap
    bounds the charge: the file's pages did count."""
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(96 * MiB))
    r = run_capped([sys.executable, "-c", f"import os\nfd = os.open({str(f)!r}, os.O_RDONLY)\n"
                    "while os.read(fd, 1 << 20): pass\nprint('ok')"], 48 * MiB, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout
    assert r.peak == pytest.approx(48 * MiB, rel=0.1)  # the reads filled the cap with page cache
    free = run_capped([sys.executable, "-c", "print('ok')"], 48 * MiB, timeout=120)
    assert free.peak < 32 * MiB


def test_child_sees_its_limit():
    code = ("from edgeinfer.runtime.memory import cgroup_memory, resolve_budget\n"
            "cg = cgroup_memory(); print(cg.version, cg.limit, resolve_budget().bytes)")
    r = run_capped([sys.executable, "-c", code], 300 * MiB, timeout=120, drop=False)
    assert r.returncode == 0, r.stderr
    version, limit, budget = r.stdout.split()
    assert int(limit) == 300 * MiB and int(budget) == 300 * MiB
    assert cgroup_memory() is not None  # and this process is unaffected
