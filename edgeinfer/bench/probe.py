"""Memory-bandwidth probe and the bandwidth ceiling of plain decoding.

Plain (non-speculative) decoding of one token reads every weight once, so on a machine whose
decode is bandwidth-bound the best possible rate is ``bandwidth / bytes of weights``. The
probe streams a large NumPy array (bigger than any cache) with a max over its uint64 view
(read only; integer max vectorizes well, a float sum was measured ~30% slower here: it is
compute-bound) and a copy (read + write), split across ``threads`` threads (NumPy releases
the GIL in both), and keeps the best of several passes. A streaming kernel reaches less than
the hardware peak, so an engine can beat this ceiling a little: treat it as a yardstick.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np


@dataclass(frozen=True)
class BandwidthResult:
    read_gbps: float  # max over the array: bytes read / s, 1e9 bytes
    copy_gbps: float  # copy: (bytes read + bytes written) / s
    array_mb: int
    threads: int
    passes: int

    @property
    def best_gbps(self) -> float:
        return max(self.read_gbps, self.copy_gbps)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "best_gbps": self.best_gbps}


def _best_time(fn, passes: int) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(array_mb: int = 256, threads: int = 1, passes: int = 5) -> BandwidthResult:
    """Best-of-``passes`` streaming bandwidth in GB/s (1e9 bytes) over an ``array_mb`` array."""
    n = array_mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.uint64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        def read() -> None:
            list(pool.map(lambda c: int(src[c[0]:c[1]].max()), chunks))

        def copy() -> None:
            list(pool.map(lambda c: np.copyto(dst[c[0]:c[1]], src[c[0]:c[1]]), chunks))

        copy()  # touch every page of dst before timing
        t_read = _best_time(read, passes)
        t_copy = _best_time(copy, passes)
    nbytes = src.nbytes
    return BandwidthResult(read_gbps=nbytes / t_read / 1e9, copy_gbps=2 * nbytes / t_copy / 1e9,
                           array_mb=array_mb, threads=threads, passes=passes)


def weight_bytes(paths: Iterable[str | Path]) -> int:
    """Bytes of the weight files (an ONNX model counts with its external data files)."""
    total = 0
    for p in paths:
        p = Path(p)
        if p.is_dir():  # a model folder: its weight files
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()
                         and f.suffix in (".onnx", ".data", ".gguf", ".safetensors", ".bin"))
        elif p.is_file():
            total += p.stat().st_size
            data = p.with_name(p.name + ".data")  # ONNX external data beside model.onnx
            if p.suffix == ".onnx" and data.is_file():
                total += data.stat().st_size
    return total


def decode_ceiling_tps(bandwidth_gbps: float, nbytes: int) -> float | None:
    """Tokens/s if every weight byte is read once per token at ``bandwidth_gbps``."""
    return bandwidth_gbps * 1e9 / nbytes if nbytes > 0 else None
