"""Build an Engine whose target streams its layers inside a memory budget.

Order matters: the draft is loaded first (it stays resident and becomes part of the measured
baseline), the budget is checked before anything large is loaded, and the streaming target is
planned from what is left (see offload.py for the planner, streaming.py for the runner).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..bundle import Manifest
from ..errors import BundleError
from .config import EngineOptions, GenerationConfig
from .engine import Engine
from .memory import current_usage, lock_pages_on_fault, resolve_budget, trim_heap
from .offload import activation_bytes, check_draft_fits, kv_bytes
from .session import ModelRunner
from .streaming import ShardPaths, StreamingRunner, target_floor_bytes
from .tokenizer import Tokenizer

# KV cache costs (2 * layers * kv_heads * head_dim * 4) bytes per token: SmolLM2 fp32 46 KB, so
# a streamed target gets a modest default context unless the caller asks for more.
DEFAULT_OFFLOAD_CONTEXT = 1024
# EngineOptions.offload_tree_nodes when not given: a draft model's trees stop early by its
# confidence; Token Recycling and prompt lookup fill whatever is planned, and with a pass
# streaming the target their extra nodes are nearly free (see config.py)
TREE_NODES_WITH_DRAFT, TREE_NODES_FREE = 24, 64
FREE_DRAFTER_GROWTH = 12 * 2**20  # see load_streaming_engine


def resident_draft_settings(settings: Any) -> Any:
    """The draft's session settings next to a streamed target: no arena, so a pass's buffers are
    freed after it instead of being kept at their largest (see SessionSettings.memory_arena)."""
    from .providers import SessionSettings

    return dataclasses.replace(settings or SessionSettings(intra_op_threads=1), memory_arena=False)


def draft_reserve_bytes(spec: Any, max_context: int, max_nodes: int) -> int:
    """What the resident draft still allocates after loading: its KV cache as the context grows;
    the buffers of the passes it runs while a target pass is under way (no arena, so they are
    freed after each pass; the pipeline's steps are one node, a catch-up after a rejection a few:
    8 bound them); and its per-node distributions (float32 [vocab] per expanded node, sampling
    only; at most one per tree node)."""
    return (kv_bytes(spec, max_context) + activation_bytes(spec, min(max_nodes, 8), max_context, 0)
            + max_nodes * spec.vocab_size * 4)


def load_streaming_engine(root: Path, manifest: Manifest, tokenizer: Tokenizer, opts: EngineOptions,
                          defaults: GenerationConfig | None, drafters: tuple[str, ...] | None,
                          draft_settings: Any, target_threads: int) -> Engine:
    target = manifest.models["target"]
    if not target.shards:
        raise BundleError(f"{root / 'manifest.json'}: memory_budget needs per-layer target shards; "
                          "export the bundle with --shards")
    spec = target.spec
    trim_heap()  # what loading the tokenizer left behind, before anything is measured
    ctx = opts.max_context or min(spec.max_position, DEFAULT_OFFLOAD_CONTEXT)
    budget = resolve_budget(opts.memory_budget)
    shards = ShardPaths.from_manifest(root, target.shards)
    available: dict[str, Any] = {}
    runners: dict[str, ModelRunner] = {}
    reserve = 0
    draft_entry = manifest.models.get("draft")
    want_model = drafters is None or "model" in drafters
    model_draft = draft_entry is not None and bool(draft_entry.onnx) and want_model
    tree_nodes = opts.offload_tree_nodes or (TREE_NODES_WITH_DRAFT if model_draft else TREE_NODES_FREE)
    nodes = tree_nodes + 1
    if model_draft:
        from .drafters.lookahead import make_lookahead
        from .drafters.model import ModelDrafter

        d = draft_entry.spec
        path = root / draft_entry.onnx
        data = path.with_name(path.name + ".data")
        reserve = draft_reserve_bytes(d, ctx, nodes)  # what it allocates after loading
        check_draft_fits(budget.bytes, current_usage(), data.stat().st_size if data.exists() else
                         path.stat().st_size, reserve, target_floor_bytes(shards, spec, budget.bytes, ctx, nodes))
        draft = ModelRunner(path, d, opts.draft_providers or opts.providers, max_context=ctx,
                            settings=resident_draft_settings(draft_settings), kv_block=opts.kv_block,
                            name="draft")
        if data.exists():
            lock_pages_on_fault(str(data))  # keep only the pages the draft really reads again
        draft.forward(list(range(nodes)))  # fault in what a pass reads, inside the measured baseline
        draft.reset()
        trim_heap()  # what session creation and pre-packing freed
        available["model"], runners["draft"] = (ModelDrafter(draft, lookahead=make_lookahead(opts.draft_lookahead)),
                                                draft)
    from .drafters import training_free_drafters

    # before the target is planned, so that its measured baseline holds them (Token Recycling's
    # table: vocab x 8 int32, 1.5 MiB for SmolLM2)
    available.update(training_free_drafters(root, manifest))
    if "model" not in available:
        # Measured at a 128 MiB cap, training-free drafters and 48-64-node trees: the process
        # holds 122-127 MiB after its passes where the plan expects ~112 (the heap's free chunks
        # that loading trimmed, touched again; runtime/streaming.py _guard), and one run in
        # five thrashed (the kernel evicting code pages: 2 s of compute a pass instead of
        # 0.16); plain streaming there held 118-125 MiB against ~117 planned and thrashed once
        # in three (1.10 tok/s instead of 2-2.8). With a draft model the runs stay under the
        # plan. So this growth is planned for here, at the cost of ~3 resident target shards.
        reserve += FREE_DRAFTER_GROWTH
    runner = StreamingRunner(shards, spec, budget.bytes, max_context=ctx, threads=target_threads,
                             max_nodes=nodes, reserve=reserve, guard=True,
                             full_logits_nodes=min(nodes, opts.offload_sampling_nodes + 1))
    # without a draft model: Token Recycling and prompt lookup merged into one tree (measured at a
    # 128 MiB cap, 48 tokens: target passes 42 -> 32 on a chat prompt, 38 -> 25 on a code prompt
    # and the same on a story, against Token Recycling alone; each pass streams the target)
    default = (tuple(drafters) if drafters is not None
               else ("model",) if "model" in available else ("recycle", "ngram"))
    if defaults is None:  # trees as large as a pass is planned for: verifying is I/O-bound here
        from .config import TreeBudget

        n = tree_nodes
        defaults = GenerationConfig(tree=TreeBudget(max_nodes=n, max_depth=max(8, n // 2)))
    return Engine(runner, tokenizer, available, default_drafters=default, defaults=defaults,
                  eos_token_ids=manifest.eos_token_ids, draft_runners=runners,
                  pipeline="model" in available, pipeline_max_ahead=opts.pipeline_max_ahead,
                  auto_alternatives=False)  # every step is a pass over storage: trees pay most
