"""One method per process: ``python -m edgeinfer.bench.worker`` and its parent-side handle.

Running each method in its own process isolates memory (peak RSS is the worker's own
VmHWM) and keeps one engine's threads and allocator state away from another's. The
parent interleaves requests across workers (A, B, A, B, ...), so only one computes at a time.

Protocol: JSON lines. The worker reads requests on stdin and answers on its original stdout;
it points fd 1 at stderr first, so whatever the engines print lands in the worker's log and
can never corrupt the protocol. Requests::

    {"cmd": "setup", "method": MethodSpec dict, "threads": int}
    {"cmd": "generate", "prompt_ids": [int], "max_new_tokens": int}
    {"cmd": "exit"}

Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""
from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import EdgeInferError
from .config import MethodSpec, RunResult


def _adapter(name: str):
    if name == "llama_cpp":
        from .anchors import LlamaCppMethod as cls
    elif name == "genai":
        from .anchors import GenaiMethod as cls
    elif name == "transformers":
        from .anchors import TransformersMethod as cls
    elif name == "edgeinfer":
        from .edgeinfer_method import EdgeinferMethod as cls
    else:
        raise EdgeInferError(f"bench worker: unknown adapter {name!r}")
    return cls


def _memory() -> dict[str, int]:
    """Peak and current RSS of this process, bytes.

    The peak is VmHWM from /proc/self/status: the high-water mark of *this* address space.
    ``ru_maxrss`` would be wrong here: Linux carries it across fork/exec, so a worker would
    inherit its parent's peak (e.g. the bandwidth probe's arrays).
    """
    status: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    status[key] = int(rest.split()[0]) * 1024  # kB
    except OSError:
        pass
    if "VmHWM" not in status:  # not Linux: the best available figure
        status["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
            1 if sys.platform == "darwin" else 1024)
    return {"peak_rss_bytes": status["VmHWM"], "rss_bytes": status.get("VmRSS", 0)}


def serve() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    method = None

    def answer(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.get("cmd")
        try:
            if cmd == "setup":
                spec = MethodSpec.from_dict(req["method"])
                t0 = time.perf_counter()
                method = _adapter(spec.adapter)(spec, int(req["threads"]))
                info = method.setup() or {}
                answer({"ok": True, "setup_s": time.perf_counter() - t0, "info": info, **_memory()})
            elif cmd == "generate":
                if method is None:
                    raise EdgeInferError("bench worker: generate before setup")
                res = method.generate(list(req["prompt_ids"]), int(req["max_new_tokens"]))
                answer({"ok": True, "result": res.to_dict(), **_memory()})
            elif cmd == "exit":
                if method is not None:
                    method.teardown()
                answer({"ok": True, **_memory()})
                return 0
            else:
                raise EdgeInferError(f"bench worker: unknown command {cmd!r}")
        except Exception as e:  # reported to the parent, which records and skips the method
            traceback.print_exc()
            answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


class WorkerError(EdgeInferError):
    """A bench worker failed, timed out or answered with an error."""


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, log_path: Path, timeout_s: float, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.timeout_s = timeout_s
        self.threads = threads
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.bench.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.log_path}: worker exited with code {self.proc.returncode}")
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.kill()
            raise WorkerError(f"{self.log_path}: no answer to {msg['cmd']!r} in {self.timeout_s} s")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerError(f"{self.log_path}: worker died (exit code {code}) during {msg['cmd']!r}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"{reply.get('error')} (log: {self.log_path})")
        return reply

    def setup(self, spec: MethodSpec) -> dict[str, Any]:
        return self.request({"cmd": "setup", "method": spec.to_dict(), "threads": self.threads})

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[RunResult, dict[str, Any]]:
        reply = self.request({"cmd": "generate", "prompt_ids": prompt_ids,
                              "max_new_tokens": max_new_tokens})
        return RunResult.from_dict(reply["result"]), reply

    def close(self) -> dict[str, Any]:
        reply: dict[str, Any] = {}
        try:
            if self.proc.poll() is None:
                reply = self.request({"cmd": "exit"})
                self.proc.wait(timeout=30)
        except (WorkerError, subprocess.TimeoutExpired, OSError, ValueError):
            self.kill()
        finally:
            self.log.close()
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(serve())
