"""Memory budgets: parsing what the user asks for and reading what the system allows.

A *memory budget* is the most memory the whole process may hold at any moment, counted the
way a cgroup memory cap counts it: resident anonymous memory (weights copied into the heap,
ONNX Runtime's arenas, the KV cache, Python itself) plus the page cache the process causes
(file pages it reads or memory-maps). A budget therefore means the same thing whether it
comes from ``memory_budget="200MB"``, ``--memory-budget 200MB`` or a cgroup limit, and a
benchmark can check it with the cgroup's own peak counter.

Units: ``B``; decimal ``kB/KB``, ``MB``, ``GB``, ``TB`` (powers of 1000); binary ``KiB``,
``MiB``, ``GiB``, ``TiB`` and the bare letters ``K``, ``M``, ``G``, ``T`` (powers of 1024, as
the kernel reads ``memory.limit_in_bytes``). A number without a unit is bytes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
# cgroup v1 reports "no limit" as a huge page-aligned number (2**63 - 4096 on x86-64).
_UNLIMITED = 2**60


def parse_budget(value: str | int | float, field: str = "memory_budget") -> int:
    """Bytes from ``"200MB"``, ``"1.5GiB"``, ``"512M"``, ``"1e9"`` or a number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size such as '200MB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = _BUDGET_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{field}: cannot read {value!r}, expected a number with an optional unit "
                f"(B, KB, MB, GB, KiB, MiB, GiB, K, M, G), e.g. '200MB' or '1.5GiB'")
        n = float(m.group(1)) * _UNITS[unit]
    else:
        raise ConfigError(f"{field}: expected a size such as '200MB' or a number of bytes, got {value!r}")
    if not n > 0 or n != n or n == float("inf"):
        raise ConfigError(f"{field}: must be a positive size, got {value!r}")
    return int(n)


def format_bytes(n: float) -> str:
    """``n`` bytes in MiB/GiB with one decimal, e.g. ``'200.0 MiB'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# -- what the system says --------------------------------------------------------------------

@dataclass(frozen=True)
class CgroupMemory:
    """The memory controller of the cgroup this process is in."""

    version: int  # 1 or 2
    path: Path  # the cgroup's directory
    limit: int | None  # the tightest limit of this cgroup and its ancestors; None = unlimited
    usage: int  # bytes charged now (anonymous + page cache)

    def working_set(self) -> int:
        """Bytes charged now minus the inactive page cache the kernel would reclaim first
        (the "working set" of container tools): the part of ``usage`` a process really holds."""
        inactive = 0
        try:
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("total_inactive_file", "inactive_file"):
                    inactive = int(value)
                    if key == "total_inactive_file":
                        break
        except (OSError, ValueError):
            pass
        return max(0, self.usage - inactive)

    def peak(self) -> int | None:
        """The cgroup's high-water mark (v1 memory.max_usage_in_bytes, v2 memory.peak)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return _read_int(self.path / name)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, str]]:
    """(fstype, mount point, root inside the hierarchy, super options) per mount."""
    out = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a, b = left.split(), right.split()
        if len(a) >= 5 and len(b) >= 3:
            out.append((b[0], a[4].replace("\\040", " "), a[3], b[2]))
    return out


def cgroup_memory(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                  mountinfo: str | os.PathLike = "/proc/self/mountinfo") -> CgroupMemory | None:
    """The memory cgroup of this process (v1 memory controller preferred, else v2), or None
    when there is none this process can read."""
    try:
        entries = [ln.split(":", 2) for ln in Path(proc_cgroup).read_text().splitlines()]
    except OSError:
        return None
    mounts = _mounts(Path(mountinfo))
    for version in (1, 2):
        for parts in entries:
            if len(parts) != 3:
                continue
            _, controllers, rel = parts
            if version == 1 and "memory" not in controllers.split(","):
                continue
            if version == 2 and controllers != "":
                continue
            for fstype, mnt, root, opts in mounts:
                if version == 1 and not (fstype == "cgroup" and "memory" in opts.split(",")):
                    continue
                if version == 2 and fstype != "cgroup2":
                    continue
                sub = rel[len(root):] if root != "/" and rel.startswith(root) else rel
                path = Path(mnt) / sub.lstrip("/")
                limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
                usage_file = "memory.usage_in_bytes" if version == 1 else "memory.current"
                if not (path / usage_file).is_file():
                    continue
                limit = None
                p = path
                while True:  # the tightest limit on the way up to the mount point
                    lim = _read_int(p / limit_file)
                    if lim is not None and lim < _UNLIMITED:
                        limit = lim if limit is None else min(limit, lim)
                    if p == Path(mnt) or p.parent == p:
                        break
                    p = p.parent
                return CgroupMemory(version, path, limit, _read_int(path / usage_file) or 0)
    return None


def mem_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where the file is missing)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_rss() -> int:
    """Resident set size of this process now, in bytes (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def process_peak_rss() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class MemoryBudget:
    """A budget in bytes and where it came from (for reports and error messages)."""

    bytes: int
    source: str  # "memory_budget='200MB'", "cgroup v1 limit (...)", "MemAvailable"

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


def current_usage() -> int:
    """What this process holds against the budget right now: the working set of its cgroup
    when it sits in a limited one (charge including page cache, minus inactive page cache that
    reclaim drops first), else this process's RSS."""
    cg = cgroup_memory()
    if cg is not None and cg.limit is not None:
        return cg.working_set()
    return process_rss()


def resolve_budget(value: str | int | float | None = None) -> MemoryBudget:
    """The budget to plan with: the user's value when given (it may not exceed a cgroup
    limit), else the cgroup limit, else this process's RSS plus MemAvailable."""
    cg = cgroup_memory()
    cg_limit = cg.limit if cg is not None else None
    if value is not None and value != "auto":
        n = parse_budget(value)
        if cg_limit is not None and n > cg_limit:
            return MemoryBudget(cg_limit, f"cgroup v{cg.version} limit {cg.path} (below memory_budget={value!r})")
        return MemoryBudget(n, f"memory_budget={value!r}")
    if cg_limit is not None:
        return MemoryBudget(cg_limit, f"cgroup v{cg.version} limit {cg.path}")
    avail = mem_available()
    if avail is None:
        raise ConfigError("memory_budget: no cgroup limit and no /proc/meminfo; give a budget such as '500MB'")
    return MemoryBudget(process_rss() + avail, "MemAvailable + current RSS")


# -- keeping a memory-mapped model resident ---------------------------------------------------

_MADV_DONTNEED = 4
_MADV_NOHUGEPAGE = 15
_MLOCK_ONFAULT = 1
_SYS_MLOCK2 = {"x86_64": 325, "aarch64": 284}


def _madvise(lo: int, hi: int, advice: int) -> bool:
    """madvise over the whole pages inside [lo, hi); False where unsupported or refused."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return False
    page = mmap.PAGESIZE
    lo, hi = -(-lo // page) * page, hi // page * page
    if hi <= lo:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(advice)) == 0
    except (OSError, AttributeError):
        return False


def avoid_huge_pages(buffer: Any) -> bool:
    """Ask the kernel not to back ``buffer`` (a NumPy array, before anything is written to it)
    with transparent huge pages.

    NumPy advises huge pages for every array of 4 MiB or more. A buffer that fills sparsely
    then becomes resident 2 MiB at a time: the KV cache keeps each layer's keys and values in
    a row sized for ``max_context`` and fills every row from its start, so its first tokens
    made nearly the whole buffer resident (measured: SmolLM2's 188 MB cache for 4096 tokens
    held 178 MB after 40 tokens, 3 MB with this advice; the same again for the draft's).
    Returns False where unsupported (not Linux)."""
    addr = buffer.__array_interface__["data"][0]
    return _madvise(addr, addr + buffer.nbytes, _MADV_NOHUGEPAGE)


def lazy_zeros(shape: tuple[int, ...], dtype: Any) -> Any:
    """A zero-filled NumPy array whose pages become resident only as they are written: its own
    private anonymous mapping (fresh pages read as zeros; nothing is cleared up front), advised
    against transparent huge pages (:func:`avoid_huge_pages`). ``np.zeros`` promises no such
    thing: glibc's calloc clears a block it takes from the heap (when a process already holds
    many mappings, or malloc is set never to map), which made a whole KV cache resident at
    once (measured: 179 of 188 MiB). Falls back to ``np.zeros`` where anonymous private
    mappings are not available (Windows, which has no huge pages to avoid either)."""
    import mmap

    import numpy as np

    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    flags = getattr(mmap, "MAP_PRIVATE", None)
    if flags is None or nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=flags | getattr(mmap, "MAP_ANONYMOUS", 0))
    arr = np.frombuffer(m, dtype=dtype).reshape(shape)  # keeps the mapping alive
    avoid_huge_pages(arr)
    return arr


def _smaps(path: str | os.PathLike = "/proc/self/smaps") -> list[tuple[int, int, str, dict[str, int]]]:
    """(start, end, mapped file, {field: kB}) per mapping of this process; [] off Linux."""
    out: list[tuple[int, int, str, dict[str, int]]] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5:
            try:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
            except ValueError:
                continue
            out.append((lo, hi, head[5] if len(head) == 6 else "", {}))
        elif out and line.endswith(" kB"):
            key, _, value = line.partition(":")
            out[-1][3][key] = int(value.split()[0])
    return out


def release_clean_file_pages(directory: str | os.PathLike) -> int:
    """Drop this process's resident pages of the files under ``directory`` that it has mapped
    and never written (no private copy): they stay in the page cache and fault back in if
    touched again. Returns the bytes of resident set given back (0 off Linux).

    onnxruntime memory-maps a model's external data and reads all of it while pre-packing the
    weights into its own buffers; afterwards a model may touch only a little of the file again
    (norm weights, the embedding rows of its tokens), yet every page read at load time stays
    in the process's resident set (measured: 152 MB for the default SmolLM2 pair, of which
    42 MB is never read again). A mapping with written pages (private anonymous copies,
    resident or swapped) is left alone: dropping those would lose the writes."""
    root = os.path.realpath(directory) + os.sep
    freed = 0
    for lo, hi, file, fields in _smaps():
        if not file.startswith(root) or fields.get("Rss", 0) == 0:
            continue
        if fields.get("Anonymous", 0) or fields.get("Swap", 0):  # private copies: written
            continue
        if _madvise(lo, hi, _MADV_DONTNEED):
            freed += fields["Rss"] * 1024
    return freed


def file_mappings(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of ``path`` (from /proc/self/maps)."""
    target = os.path.realpath(path)
    out = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def lock_pages_on_fault(path: str | os.PathLike) -> int:
    """Keep the pages of ``path`` that this process touches from now on resident.

    onnxruntime memory-maps a model's external data; after pre-packing, a model only reads a
    part of it again (scales, norms, embedding rows), but the kernel cannot tell, and under a
    tight cgroup cap it evicts those pages and reads them back on every step. This drops the
    current page mappings of ``path`` and the file's clean pages from the page cache (loading
    read all of it, and a cgroup charges that cache to the budget: measured 115 MB for the
    affine int4 draft, which made a 257 MiB budget look full), then locks the range with
    MLOCK_ONFAULT, so that exactly the pages touched afterwards (warm the model up with one
    forward pass) become unevictable, like llama.cpp's ``use_mlock`` but only for what is used.
    Returns the bytes of address space covered (0 where unsupported: needs Linux, and root or
    a large enough RLIMIT_MEMLOCK)."""
    import ctypes
    import platform

    nr = _SYS_MLOCK2.get(platform.machine())
    ranges = file_mappings(path)
    if nr is None or not ranges:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    covered = 0
    for lo, hi in ranges:
        addr, length = ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo)
        libc.madvise(addr, length, _MADV_DONTNEED)
        if libc.syscall(ctypes.c_long(nr), addr, length, ctypes.c_int(_MLOCK_ONFAULT)) == 0:
            covered += hi - lo
    if covered and hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return covered


def trim_heap() -> bool:
    """Give the heap's free memory back to the system now (glibc ``malloc_trim``). Loading leaves
    much of it behind: parsing a tokenizer JSON, creating onnxruntime sessions (measured: the
    SmolLM2 tokenizer leaves 14 MiB, which a tight budget cannot spare). False where glibc is
    not available."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Make glibc give large freed blocks back to the system at once (process-wide).

    By default glibc raises its mmap threshold after large blocks are freed, so that later
    blocks of that size come from heap arenas and stay with the process when freed: per-pass
    buffers (activations, logits) then ratchet the resident set up pass after pass (measured:
    +28 MB per 49-node tree pass of SmolLM2 with onnxruntime's arena off). A fixed threshold
    keeps the resident set at what is live. Returns False where glibc is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, threshold) == 1
    ok = mallopt(m_trim_threshold, 2 * threshold) == 1 and ok
    return ok
