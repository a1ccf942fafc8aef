"""Execution providers: resolve a requested, ordered list against what the installed
onnxruntime offers and create a session with the first one that works.

Each attempt that is skipped is recorded with the reason (not installed in this onnxruntime,
or session creation failed with onnxruntime's message), so the caller can say which provider a
model ended up on and why a preferred one was passed over. Draft and target get separate
requests and separate reports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import onnxruntime as ort

from ..errors import ConfigError, ProviderError

CPU = "CPUExecutionProvider"

# Short names users type -> onnxruntime provider names.
ALIASES: dict[str, str] = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "cann": "CANNExecutionProvider",
    "azure": "AzureExecutionProvider",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def resolve_provider(name: str) -> str:
    """``"qnn"`` -> ``"QNNExecutionProvider"``; full onnxruntime names pass through."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"providers: expected a provider name, got {name!r}")
    if name.endswith("ExecutionProvider"):
        return name
    full = ALIASES.get(name.lower())
    if full is None:
        raise ConfigError(
            f"providers: unknown execution provider {name!r}, expected one of {sorted(ALIASES)} "
            "or a full onnxruntime name such as 'CPUExecutionProvider'")
    return full


# onnxruntime's session config entry that ends the intra-op threads' spinning with each run
# (see SessionSettings.stop_spinning)
STOP_SPINNING = ("session.force_spinning_stop", "1")


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime session options exposed to users."""

    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"  # disable | basic | extended | all
    log_severity: int = 3  # onnxruntime's own log: 0 verbose .. 4 fatal
    # onnxruntime's CPU arena keeps the largest pass's buffers (it grows in powers of two);
    # off, they are freed after each run. Measured for the SmolLM2 int4 affine draft: +33 MB
    # kept after a 25-node pass with the arena, +9 MB without, same step time (9.1 ms).
    memory_arena: bool = True
    # Stop the intra-op threads spinning when a run ends ("session.force_spinning_stop"): they
    # spin between ops inside a run (waking them costs more), but a target's pool that goes on
    # spinning after its pass takes the cores from the draft model's next step. Measured on 2
    # cores (SmolLM2 fp32 target, 2-thread int4 draft, 96 tokens): chain speculation 47 -> 66
    # tok/s, trees 49 -> 68, plain decoding unchanged (45); spinning off altogether costs plain
    # decoding 13%.
    stop_spinning: bool = True
    # After the session is created, give back the resident pages of the model's memory-mapped
    # external data that loading read and nothing wrote (memory.release_clean_file_pages):
    # pre-packing copied most weights, and pages still read fault back in. Measured for the
    # default SmolLM2 pair: 152 MB given back at load, 42 MB still after a generation (the
    # fp32 target's head reads its tied 113 MB table from the mapping at every step); step
    # times unchanged. Not an onnxruntime option: ModelRunner applies it.
    release_file_pages: bool = True

    def __post_init__(self) -> None:
        if self.graph_optimization not in _OPT_LEVELS:
            raise ConfigError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, "
                              f"got {self.graph_optimization!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        so.log_severity_level = self.log_severity
        so.enable_cpu_mem_arena = self.memory_arena
        if self.stop_spinning:
            so.add_session_config_entry(*STOP_SPINNING)
        return so


@dataclass(frozen=True)
class SkippedProvider:
    provider: str
    reason: str


@dataclass(frozen=True)
class ProviderReport:
    """Where one model ended up and why the providers before it were skipped."""

    model: str  # "target", "draft", ... (a label)
    requested: tuple[str, ...]  # resolved names, in order of preference
    chosen: str
    skipped: tuple[SkippedProvider, ...] = ()
    session_providers: tuple[str, ...] = ()  # what the session reports (chosen + CPU fallback)

    def describe(self) -> str:
        text = f"{self.model}: {self.chosen}"
        if self.skipped:
            text += " (" + "; ".join(f"skipped {s.provider}: {s.reason}" for s in self.skipped) + ")"
        return text


def create_session(onnx_path: str | os.PathLike, providers: Sequence[Any] = ("cpu",),
                   settings: SessionSettings | None = None, model: str = "model",
                   cpu_fallback: bool = True) -> tuple[ort.InferenceSession, ProviderReport]:
    """Create a session on the first requested provider that works.

    ``providers``: names/aliases or ``(name, options)`` pairs, in order of preference. With
    ``cpu_fallback`` the CPU provider is tried last even if not requested. A non-CPU provider is
    created together with CPU so that nodes it cannot run still have a home.
    """
    settings = settings or SessionSettings()
    requests: list[tuple[str, dict[str, Any]]] = []
    for p in providers:
        name, opts = (p if isinstance(p, tuple) else (p, {}))
        requests.append((resolve_provider(name), dict(opts)))
    if cpu_fallback and CPU not in [r[0] for r in requests]:
        requests.append((CPU, {}))
    if not requests:
        raise ConfigError("providers: the list is empty")
    available = ort.get_available_providers()
    skipped: list[SkippedProvider] = []
    for name, opts in requests:
        if name not in available:
            skipped.append(SkippedProvider(
                name, f"not installed in this onnxruntime {ort.__version__} (available: {', '.join(available)})"))
            continue
        chain = [(name, opts)] if name == CPU else [(name, opts), (CPU, {})]
        try:
            sess = ort.InferenceSession(os.fspath(onnx_path), sess_options=settings.session_options(),
                                        providers=[c[0] for c in chain],
                                        provider_options=[c[1] for c in chain])
        except Exception as e:  # onnxruntime raises several unrelated exception types
            msg = " ".join(str(e).split())
            skipped.append(SkippedProvider(name, f"session creation failed: {msg[:400]}"))
            continue
        active = tuple(sess.get_providers())
        if name not in active:  # onnxruntime silently dropped it (e.g. missing CUDA libraries)
            skipped.append(SkippedProvider(name, "session creation failed: onnxruntime could not "
                                                 f"initialise it and fell back to {', '.join(active)}"))
            continue
        report = ProviderReport(model, tuple(r[0] for r in requests), name, tuple(skipped), active)
        return sess, report
    detail = "; ".join(f"{s.provider}: {s.reason}" for s in skipped)
    raise ProviderError(f"{onnx_path}: no execution provider could run the {model} model ({detail})")
