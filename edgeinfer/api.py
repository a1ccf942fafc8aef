"""The Python API: load a bundle, get an :class:`~edgeinfer.runtime.engine.Engine`.

    import edgeinfer
    engine = edgeinfer.load("bundle/", providers=["qnn", "cpu"])
    result = engine.generate("Hello", max_new_tokens=64)            # GenerationResult
    for piece in engine.stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="")

No torch, no onnx: onnxruntime, NumPy, tokenizers and jinja2 only.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from .bundle import Manifest, load_manifest
from .errors import BundleError
from .runtime.config import EngineOptions, GenerationConfig
from .runtime.engine import Engine, GenerationResult, TextStream
from .runtime.providers import SessionSettings
from .runtime.session import ModelRunner
from .runtime.tokenizer import Tokenizer

__all__ = ["load", "Engine", "EngineOptions", "GenerationConfig", "GenerationResult", "TextStream"]

DEFAULT_MAX_CONTEXT = 4096


def load(bundle_dir: str | os.PathLike, providers: Sequence[Any] | str | None = None, *,
         options: EngineOptions | None = None, defaults: GenerationConfig | None = None,
         drafters: Sequence[str] | None = None, **option_overrides: Any) -> Engine:
    """Load a bundle (validating its manifest, file sizes and checksums) into an Engine.

    ``providers``: execution providers for the target in order of preference (aliases such as
    "qnn", "nnapi", "coreml", "xnnpack", "dml", "cuda", "cpu"); CPU is always the last resort.
    ``option_overrides``: any :class:`EngineOptions` field (draft_providers, threads,
    draft_threads, inter_op_threads, graph_optimization, max_context, kv_block,
    verify_checksums, pipeline, pipeline_max_ahead, draft_lookahead, memory_budget,
    offload_tree_nodes, offload_sampling_nodes). With ``memory_budget`` the target streams its
    layers from the bundle's shards. ``drafters``: the default drafter names for speculative modes
    (default: "model" when the bundle has a draft model, otherwise plain decoding; a streamed
    target without a draft model that fits: "recycle" and "ngram" merged into one tree).
    """
    known = {f.name for f in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(option_overrides) - known)
    if unknown:
        raise TypeError(f"load() got unknown option(s) {unknown}; expected some of {sorted(known)}")
    changes = {k: v for k, v in option_overrides.items() if v is not None}
    if providers is not None:
        changes["providers"] = providers
    opts = dataclasses.replace(options or EngineOptions(), **changes)
    root = Path(bundle_dir)
    manifest = load_manifest(root, verify=opts.verify_checksums)
    tokenizer = Tokenizer.from_bundle(root, manifest)

    if opts.memory_budget is not None:
        from .runtime.offload_engine import load_streaming_engine

        return load_streaming_engine(root, manifest, tokenizer, opts, defaults, drafters,
                                     _settings(opts, _draft_threads(opts, beside_target=False)), opts.threads)
    target_entry = manifest.models["target"]
    spec = target_entry.spec
    max_context = opts.max_context or min(spec.max_position, DEFAULT_MAX_CONTEXT)
    if max_context > spec.max_position:
        raise BundleError(f"max_context={max_context} exceeds the target's max_position {spec.max_position}")
    target = ModelRunner(_onnx_path(root, manifest, "target"), spec, opts.providers,
                         max_context=max_context, settings=_settings(opts, opts.threads),
                         kv_block=opts.kv_block, name="target")
    available: dict[str, Any] = {}
    draft_runners: dict[str, ModelRunner] = {}
    draft_entry = manifest.models.get("draft")
    if draft_entry is not None and draft_entry.onnx:
        if draft_entry.spec.vocab_size != spec.vocab_size:
            raise BundleError(f"{root}: draft vocab_size {draft_entry.spec.vocab_size} differs from the "
                              f"target's {spec.vocab_size}")
        from .runtime.drafters.lookahead import make_lookahead
        from .runtime.drafters.model import ModelDrafter

        threads = _draft_threads(opts, beside_target=opts.pipeline)
        draft = ModelRunner(_onnx_path(root, manifest, "draft"), draft_entry.spec,
                            opts.draft_providers or opts.providers,
                            max_context=min(max_context, draft_entry.spec.max_position),
                            settings=_settings(opts, threads), kv_block=opts.kv_block, name="draft")
        draft_runners["draft"] = draft
        available["model"] = ModelDrafter(draft, lookahead=make_lookahead(opts.draft_lookahead))
    from .runtime.drafters import training_free_drafters

    available.update(training_free_drafters(root, manifest))
    default = tuple(drafters) if drafters is not None else (("model",) if "model" in available else ())
    return Engine(target, tokenizer, available, default_drafters=default, defaults=defaults,
                  eos_token_ids=manifest.eos_token_ids, draft_runners=draft_runners,
                  pipeline=opts.pipeline, pipeline_max_ahead=opts.pipeline_max_ahead)


def _draft_threads(opts: EngineOptions, beside_target: bool) -> int:
    """EngineOptions.draft_threads, or its default: the target's threads when the two take turns
    (a streamed target too: its passes mostly wait for reads, and its pipeline speculates only on
    confident leaves), one when the draft runs beside a resident target's pass (pipeline)."""
    if opts.draft_threads is not None:
        return opts.draft_threads
    return 1 if beside_target else opts.threads


def _settings(opts: EngineOptions, threads: int) -> SessionSettings:
    return SessionSettings(intra_op_threads=threads, inter_op_threads=opts.inter_op_threads,
                           graph_optimization=opts.graph_optimization)


def _onnx_path(root: Path, manifest: Manifest, role: str) -> Path:
    rel = manifest.models[role].onnx
    if not rel:
        raise BundleError(f"{root / 'manifest.json'}: models.{role} has no 'onnx' graph")
    return root / rel
