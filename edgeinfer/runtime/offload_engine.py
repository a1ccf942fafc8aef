"""Build an Engine whose target streams its layers inside a memory budget.

Order matters: the draft is loaded first (it stays resident and becomes part of the measured
baseline), the budget is checked before anything large is loaded, and the streaming target is
planned from what is left (see offload.py for the planner, streaming.py for the runner).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundle import Manifest
from ..errors import BundleError
from .config import EngineOptions, GenerationConfig
from .engine import Engine
from .memory import current_usage, lock_pages_on_fault, resolve_budget
from .offload import activation_bytes, check_draft_fits, kv_bytes
from .session import ModelRunner
from .streaming import ShardPaths, StreamingRunner, target_floor_bytes
from .tokenizer import Tokenizer

# KV cache costs (2 * layers * kv_heads * head_dim * 4) bytes per token: SmolLM2 fp32 46 KB, so
# a streamed target gets a modest default context unless the caller asks for more.
DEFAULT_OFFLOAD_CONTEXT = 1024


def load_streaming_engine(root: Path, manifest: Manifest, tokenizer: Tokenizer, opts: EngineOptions,
                          defaults: GenerationConfig | None, drafters: tuple[str, ...] | None,
                          draft_settings: Any, target_threads: int) -> Engine:
    target = manifest.models["target"]
    if not target.shards:
        raise BundleError(f"{root / 'manifest.json'}: memory_budget needs per-layer target shards; "
                          "export the bundle with --shards")
    spec = target.spec
    ctx = opts.max_context or min(spec.max_position, DEFAULT_OFFLOAD_CONTEXT)
    nodes = opts.offload_tree_nodes + 1
    budget = resolve_budget(opts.memory_budget)
    shards = ShardPaths.from_manifest(root, target.shards)
    available: dict[str, Any] = {}
    runners: dict[str, ModelRunner] = {}
    reserve = 0
    draft_entry = manifest.models.get("draft")
    want_model = drafters is None or "model" in drafters
    if draft_entry is not None and draft_entry.onnx and want_model:
        from .drafters.model import ModelDrafter

        d = draft_entry.spec
        path = root / draft_entry.onnx
        data = path.with_name(path.name + ".data")
        extra = kv_bytes(d, ctx) + activation_bytes(d, nodes, ctx, d.vocab_size)
        check_draft_fits(budget.bytes, current_usage(), data.stat().st_size if data.exists() else
                         path.stat().st_size, extra, target_floor_bytes(shards, spec, budget.bytes, ctx, nodes))
        draft = ModelRunner(path, d, opts.draft_providers or opts.providers, max_context=ctx,
                            settings=draft_settings, kv_block=opts.kv_block, name="draft")
        if data.exists():
            lock_pages_on_fault(str(data))  # keep only the pages the draft really reads again
        draft.forward(list(range(nodes)))  # grow its arena to a full tree pass now, inside the plan
        draft.reset()
        available["model"], runners["draft"] = ModelDrafter(draft), draft
        reserve = kv_bytes(d, ctx) + (nodes + 16) * d.vocab_size * 4  # KV growth + draft distributions
    runner = StreamingRunner(shards, spec, budget.bytes, max_context=ctx, threads=target_threads,
                             max_nodes=nodes, reserve=reserve)
    from .drafters.ngram import NgramDrafter
    from .drafters.recycle import RecyclingDrafter

    available["ngram"] = NgramDrafter()
    available["recycle"] = RecyclingDrafter(spec.vocab_size)
    default = tuple(drafters) if drafters is not None else (("model",) if "model" in available else ("recycle",))
    return Engine(runner, tokenizer, available, default_drafters=default, defaults=defaults,
                  eos_token_ids=manifest.eos_token_ids, draft_runners=runners,
                  pipeline="model" in available, pipeline_max_ahead=opts.pipeline_max_ahead)
