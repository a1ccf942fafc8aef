"""Run a command inside a memory-capped cgroup (benchmarks and capped tests; needs root).

The cap counts page cache as well as anonymous memory, so a process that memory-maps or
reads a model larger than the cap is forced to re-read it from storage, as on a device with
little RAM. Both cgroup v1 (``memory.limit_in_bytes``; used here) and cgroup v2
(``memory.max``) are handled. Swap is not allowed to absorb the cap: v1 also sets
``memory.memsw.limit_in_bytes`` when the kernel has it, v2 sets ``memory.swap.max`` to 0.

This module is for measurement tooling; the runtime never creates cgroups itself.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import EdgeInferError
from .memory import _mounts, _read_int


class CgroupError(EdgeInferError):
    """A cgroup could not be created, configured or removed."""


def memory_cgroup_root(mountinfo: str | os.PathLike = "/proc/self/mountinfo") -> tuple[int, Path] | None:
    """(version, mount point) of a writable memory-controller hierarchy, v1 preferred."""
    mounts = _mounts(Path(mountinfo))
    for fstype, mnt, _root, opts in mounts:
        if fstype == "cgroup" and "memory" in opts.split(",") and os.access(mnt, os.W_OK):
            return 1, Path(mnt)
    for fstype, mnt, _root, _opts in mounts:
        if fstype == "cgroup2" and os.access(mnt, os.W_OK):
            ctl = Path(mnt) / "cgroup.controllers"
            if ctl.is_file() and "memory" in ctl.read_text().split():
                return 2, Path(mnt)
    return None


def drop_caches() -> None:
    """Write dirty pages back and drop the page cache (``sync; echo 3 > drop_caches``)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise CgroupError(f"/proc/sys/vm/drop_caches: cannot drop caches ({e.strerror}); needs root") from None


@dataclass(frozen=True)
class CgroupStats:
    usage: int  # bytes charged now
    peak: int | None  # high-water mark (v1 max_usage_in_bytes, v2 memory.peak)
    failcnt: int  # times the limit was hit (v1 memory.failcnt, v2 events "max")
    oom_kills: int  # processes the OOM killer ended in this cgroup


class MemoryCgroup:
    """A fresh cgroup with a memory limit; a context manager that removes it on exit.

    >>> with MemoryCgroup(200 * 2**20) as cg:
    ...     result = cg.run(["python", "-c", "..."])
    """

    def __init__(self, limit_bytes: int, name: str | None = None, parent: Path | None = None):
        found = memory_cgroup_root()
        if found is None:
            raise CgroupError("no writable cgroup memory controller (mount /sys/fs/cgroup/memory as root)")
        self.version, root = found
        self.limit = int(limit_bytes)
        self.path = Path(parent or root) / (name or f"edgeinfer-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupError(f"{self.path}: cannot create cgroup ({e.strerror})") from None
        try:
            if self.version == 1:
                self._write("memory.limit_in_bytes", self.limit)
                if (self.path / "memory.memsw.limit_in_bytes").exists():
                    self._write("memory.memsw.limit_in_bytes", self.limit)
                if (self.path / "memory.swappiness").exists():
                    self._write("memory.swappiness", 0)
            else:
                self._write("memory.max", self.limit)
                if (self.path / "memory.swap.max").exists():
                    self._write("memory.swap.max", 0)
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: int | str) -> None:
        try:
            (self.path / name).write_text(f"{value}\n")
        except OSError as e:
            raise CgroupError(f"{self.path / name}: cannot write {value!r} ({e.strerror})") from None

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", pid)

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stats(self) -> CgroupStats:
        if self.version == 1:
            oom = 0
            try:
                for line in (self.path / "memory.oom_control").read_text().splitlines():
                    if line.startswith("oom_kill "):
                        oom = int(line.split()[1])
            except OSError:
                pass
            return CgroupStats(_read_int(self.path / "memory.usage_in_bytes") or 0,
                               _read_int(self.path / "memory.max_usage_in_bytes"),
                               _read_int(self.path / "memory.failcnt") or 0, oom)
        events: dict[str, int] = {}
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                k, v = line.split()
                events[k] = int(v)
        except (OSError, ValueError):
            pass
        return CgroupStats(_read_int(self.path / "memory.current") or 0,
                           _read_int(self.path / "memory.peak"), events.get("max", 0),
                           events.get("oom_kill", 0))

    def run(self, cmd: Sequence[str], timeout: float | None = None, env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike | None = None, drop: bool = True) -> "CappedRun":
        """Run ``cmd`` inside this cgroup (it joins before exec, so every byte it maps counts);
        with ``drop``, the page cache is dropped first. Output is captured as text."""
        if drop:
            drop_caches()
        # The shell moves itself into the cgroup, then execs the command in place.
        wrapper = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(wrapper, capture_output=True, text=True, timeout=timeout,
                                  env=dict(env) if env is not None else None, cwd=cwd)
            rc, out, err, timed_out = proc.returncode, proc.stdout, proc.stderr, False
        except subprocess.TimeoutExpired as e:
            rc, timed_out = -9, True
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        wall = time.perf_counter() - t0
        s = self.stats()
        return CappedRun(returncode=rc, stdout=out, stderr=err, seconds=wall, limit=self.limit,
                         peak=s.peak, failcnt=s.failcnt, oom_kills=s.oom_kills, timed_out=timed_out)

    def reset_peak(self) -> None:
        """Restart the high-water mark and the fail counter (v1; v2 peak is per-open)."""
        if self.version == 1:
            self._write("memory.max_usage_in_bytes", 0)
            self._write("memory.failcnt", 0)

    def remove(self) -> None:
        """Move any remaining process to the parent, then delete the cgroup."""
        if not self.path.exists():
            return
        parent_procs = self.path.parent / "cgroup.procs"
        for pid in self.pids():
            try:
                parent_procs.write_text(f"{pid}\n")
            except OSError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        raise CgroupError(f"{self.path}: cannot remove cgroup (processes still inside?)")

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    limit: int
    peak: int | None  # cgroup high-water mark, bytes
    failcnt: int
    oom_kills: int
    timed_out: bool = False

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0 or self.returncode in (-9, 137) and not self.timed_out


def run_capped(cmd: Sequence[str], limit_bytes: int, timeout: float | None = None,
               env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               drop: bool = True) -> CappedRun:
    """Run ``cmd`` in a fresh cgroup limited to ``limit_bytes``; the cgroup is removed after."""
    with MemoryCgroup(limit_bytes) as cg:
        return cg.run(cmd, timeout=timeout, env=env, cwd=cwd, drop=drop)
