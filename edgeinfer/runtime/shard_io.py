"""Reading shard weights: O_DIRECT reads into owned buffers, and the prefetch ring.

Loading mechanism (chosen by measurement, see docs in streaming.py): weights are read with
O_DIRECT straight into page-aligned anonymous buffers this module allocates and are bound as
graph inputs without a copy; the page cache is never filled with them, so the process's
memory is exactly these buffers. :class:`StreamRing` reads the streamed parts in pass order
on a background thread into a ring of buffers: part i+1 loads while part i computes, and the
first parts of the next pass load while the draft drafts.
"""
from __future__ import annotations

import mmap
import os
from collections import OrderedDict
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ShardError
from .shard_graphs import ALIGN, ShardGraph


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous, page-aligned memory (pages are only charged once written)."""
    return mmap.mmap(-1, max(ALIGN, -(-nbytes // ALIGN) * ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class WeightReader:
    """Reads byte ranges of shard data files into aligned buffers, bypassing the page cache
    (O_DIRECT) where the file system allows it; otherwise reads normally and asks the kernel
    to drop the pages again (POSIX_FADV_DONTNEED). Large ranges are read as ``parallel``
    concurrent pieces (measured here: 4 pieces ~1.0 GB/s vs ~0.75 GB/s for one O_DIRECT
    stream on the virtio disk). Raises :class:`ShardError` naming the file on a missing file,
    a short read or a size that changed."""

    PIECE_MIN = 4 << 20  # ranges below this are read in one call

    def __init__(self, direct: bool = True, parallel: int = 4):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.parallel = max(1, parallel)
        self.bytes_read = 0
        self._pool = None

    def _open(self, path: Path) -> tuple[int, bool]:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except FileNotFoundError:
                raise ShardError(f"{path}: shard data file is missing") from None
            except OSError:
                pass  # tmpfs and a few others refuse O_DIRECT
        try:
            return os.open(path, os.O_RDONLY), False
        except FileNotFoundError:
            raise ShardError(f"{path}: shard data file is missing") from None
        except OSError as e:
            raise ShardError(f"{path}: cannot open shard data file ({e.strerror})") from None

    @staticmethod
    def _read_range(fd: int, view: memoryview, lo: int, hi: int, offset: int, path: Path) -> int:
        got = 0
        while lo + got < hi:
            try:
                n = os.preadv(fd, [view[lo + got:hi]], offset + lo + got)
            except OSError as e:
                raise ShardError(f"{path}: read failed at byte {offset + lo + got} ({e.strerror})") from None
            if n <= 0:
                break
            got += n
        return got

    def read(self, path: Path, start: int, end: int, buf: mmap.mmap, expect: FileStamp | None = None,
             checksum: bool = False) -> tuple[int, ...] | None:
        """Fill ``buf[:end - start]`` with bytes ``[start, end)`` of ``path`` (start aligned;
        the file may end before ``end``: the last tensor is not padded). ``expect``: the file's
        :func:`file_stamp` when the shard was planned; a file rewritten, replaced or truncated
        since then is an error. ``checksum``: also return the CRC-32 of each piece read
        (computed in the reading threads; same pieces for the same range)."""
        fd, direct = self._open(path)
        try:
            st = os.fstat(fd)
            if expect is not None and (st.st_size, st.st_mtime_ns, st.st_ino) != tuple(expect):
                what = (f"has {st.st_size} bytes, expected {expect[0]}" if st.st_size != expect[0]
                        else "was modified or replaced")
                raise ShardError(f"{path}: shard data file {what} since the model was loaded")
            want = min(end, st.st_size) - start
            length = -(-want // ALIGN) * ALIGN if direct else want
            view = memoryview(buf)
            pieces = min(self.parallel, max(1, length // self.PIECE_MIN))
            step = -(-length // pieces // ALIGN) * ALIGN
            bounds = [(lo, min(length, lo + step)) for lo in range(0, length, step)]

            def piece(lo: int, hi: int) -> tuple[int, int | None]:
                n = self._read_range(fd, view, lo, hi, start, path)
                crc = zlib.crc32(view[lo:min(hi, want)]) if checksum and n >= min(hi, want) - lo else None
                return n, crc

            if len(bounds) == 1:
                results = [piece(*bounds[0])]
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="edgeinfer-read")
                results = [f.result() for f in [self._pool.submit(piece, lo, hi) for lo, hi in bounds]]
            got = 0
            for (lo, hi), (n, _) in zip(bounds, results):
                got = lo + n
                if n < hi - lo:
                    break
            if got < want:
                raise ShardError(f"{path}: short read, {got} of {want} bytes at offset {start}")
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, want, os.POSIX_FADV_DONTNEED)
            self.bytes_read += want
            return tuple(c for _, c in results) if checksum else None
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


FileStamp = tuple[int, int, int]  # size, mtime (ns), inode


def file_stamp(path: Path) -> FileStamp:
    """What tells a file was rewritten, replaced or truncated; ShardError if it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard data file is missing") from None
    return st.st_size, st.st_mtime_ns, st.st_ino


def tensor_views(graph: ShardGraph, buf: mmap.mmap) -> dict[str, np.ndarray]:
    """NumPy views of ``graph``'s weights inside ``buf`` (which holds ``graph.span``)."""
    base = graph.span[0]
    out = {}
    for r in graph.tensors:
        count = r.length // r.dtype.itemsize
        out[r.input_name] = np.frombuffer(buf, dtype=r.dtype, count=count,
                                          offset=r.offset - base).reshape(r.shape)
    return out



@dataclass
class StreamPart:
    name: str
    graph: ShardGraph
    start: int  # aligned byte range of graph.data_path holding this part
    end: int
    stamp: FileStamp = (0, 0, 0)  # the data file's size, mtime, inode when the runner was built
    rows: tuple[int, int] | None = None  # head chunk: rows [r0, r1) of the chunked weight
    crc: tuple[int, ...] | None = None  # CRC-32 of each piece, taken at load ("crc32" mode)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class StreamRing:
    """Streamed parts in pass order, cycled forever; slot g % k holds the g-th load. With k=2
    the load of part g+1 runs while part g computes; the load of g+2 starts when g is released.
    ``trace`` (if given) receives ("load", part name, start, end) perf_counter stamps."""

    def __init__(self, parts: list[StreamPart], slots: int, reader: WeightReader, checksum: bool,
                 trace: Any = None):
        self.parts, self.reader, self.checksum, self.trace = parts, reader, checksum, trace
        self.k = max(1, slots)
        size = max(p.nbytes for p in parts)
        self.bufs = [aligned_buffer(size) for _ in range(self.k)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="edgeinfer-shards")
        self.futures: dict[int, Future] = {}
        self.next_use = 0
        for g in range(self.k):
            self._schedule(g)

    def _schedule(self, g: int) -> None:
        self.futures[g] = self.pool.submit(self._load, self.parts[g % len(self.parts)], self.bufs[g % self.k])

    def _load(self, part: StreamPart, buf) -> float:
        t0 = time.perf_counter()
        g = part.graph
        crc = self.reader.read(g.data_path, part.start, part.end, buf, part.stamp, self.checksum)
        if self.checksum and crc != part.crc:
            raise ShardError(f"{g.data_path}: bytes {part.start}..{part.end} changed since load "
                             f"(checksum mismatch in {part.name}); the shard is corrupt")
        t1 = time.perf_counter()
        if self.trace is not None:
            self.trace.append(("load", part.name, t0, t1))
        return t1 - t0

    def acquire(self, name: str) -> tuple[Any, float, float]:
        """(buffer, load seconds, stall seconds) of the next part, which must be ``name``."""
        g = self.next_use
        part = self.parts[g % len(self.parts)]
        if part.name != name:
            raise RuntimeError(f"stream ring out of order: expected {part.name}, asked for {name}")
        t0 = time.perf_counter()
        buf = self.bufs[g % self.k]
        try:
            load_s = self.futures.pop(g).result()
        except ShardError:  # read ahead of time: the file may have been repaired since, retry once
            load_s = self._load(part, buf)
        return buf, load_s, time.perf_counter() - t0

    def release(self) -> None:
        g = self.next_use
        self.next_use += 1
        self._schedule(g + self.k)

    def set_parts(self, parts: list[StreamPart]) -> None:
        """A new pass order (e.g. a resident part now streams), in the same buffers: every
        part must fit them. Pending loads are dropped; the next acquire is the first part."""
        if not parts or max(p.nbytes for p in parts) > len(self.bufs[0]):
            raise ValueError("StreamRing.set_parts: a part does not fit the ring's buffers")
        self.parts = parts
        self.restart()

    def restart(self) -> None:
        """Back to the start of a pass (after an error): drop every pending load."""
        for f in self.futures.values():
            f.cancel()
        for f in self.futures.values():
            if not f.cancelled():
                try:
                    f.result()
                except Exception:
                    pass
        self.futures.clear()
        self.next_use = 0
        for g in range(self.k):
            self._schedule(g)

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


class RowReader:
    """Rows of an embedding table in a data file, read on demand (O_DIRECT, a few KiB each)
    and kept in a small LRU cache: a pass reads only the rows of its own tokens."""

    def __init__(self, reader: WeightReader, path: Path, ref: Any, stamp: FileStamp, cache_rows: int):
        self.reader, self.path, self.ref, self.stamp = reader, path, ref, stamp
        self.row_bytes = ref.length // ref.shape[0]
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_rows = cache_rows

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(table of the unique ids' rows [u, hidden], ids remapped into it, same shape)."""
        t, rb = self.ref, self.row_bytes
        uniq, inv = np.unique(ids, return_inverse=True)
        out = np.empty((len(uniq),) + t.shape[1:], dtype=t.dtype)
        scratch = None
        for k, tok in enumerate(uniq.tolist()):
            if not 0 <= tok < t.shape[0]:
                raise ValueError(f"token id {tok} outside the vocabulary of {t.shape[0]}")
            row = self.cache.get(tok)
            if row is None:
                off = t.offset + tok * rb
                s0, s1 = off // ALIGN * ALIGN, -(-(off + rb) // ALIGN) * ALIGN
                if scratch is None or len(scratch) < s1 - s0:
                    scratch = aligned_buffer(s1 - s0)
                self.reader.read(self.path, s0, s1, scratch, self.stamp)
                row = np.frombuffer(scratch, t.dtype, rb // t.dtype.itemsize, off - s0).copy()
                self.cache[tok] = row
                if len(self.cache) > self.cache_rows:
                    self.cache.popitem(last=False)
            else:
                self.cache.move_to_end(tok)
            out[k] = row.reshape(t.shape[1:])
        return out, inv.reshape(ids.shape).astype(np.int64)
