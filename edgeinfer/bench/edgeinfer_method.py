"""edgeinfer's own methods: plain, chain and tree decoding of a bundle, each drafter.

Runs inside a bench worker. Tokens are stamped as ``Engine.stream_tokens`` emits them (one
batch per target pass), so TTFT and decode time are measured exactly as for the anchors;
drafted / accepted counts come from the engine's GenerationStats.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bundle import MANIFEST_FILE
from ..errors import BundleError, ConfigError
from .anchors import Method, TokenClock
from .config import RunResult

# The runtime's drafters (edgeinfer.api.load): "model" needs a draft model in the bundle.
MODEL_DRAFTER = "model"
FREE_DRAFTERS = ("ngram", "recycle")


def target_weight_files(bundle: str | Path) -> tuple[str, ...]:
    """The target ONNX file of a bundle (weight_bytes adds its external data)."""
    path = Path(bundle) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        onnx = manifest["models"]["target"]["onnx"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: cannot read models.target.onnx ({e})") from None
    return (str(Path(bundle) / onnx),)


def available_drafters(bundle: str | Path | None) -> tuple[str, ...]:
    """Drafter names to measure: "model" when the bundle has a draft model (or will: the
    default bundle exported here has one), then the model-free drafters."""
    if bundle is None:
        return (MODEL_DRAFTER,) + FREE_DRAFTERS
    try:
        manifest = json.loads((Path(bundle) / MANIFEST_FILE).read_text())
        has_draft = bool((manifest.get("models", {}).get("draft") or {}).get("onnx"))
    except (OSError, ValueError, AttributeError):
        has_draft = False
    return ((MODEL_DRAFTER,) if has_draft else ()) + FREE_DRAFTERS


def export_default_bundle(source: Path, out: Path) -> None:
    """The default pair (pipeline.default_pair_config) made from ``source``."""
    from dataclasses import replace

    from ..export.pipeline import default_pair_config, export_bundle

    export_bundle(replace(default_pair_config(out), target=source))


class EdgeinferMethod(Method):
    """``edgeinfer.load(bundle)`` then ``Engine.stream_tokens(prompt ids, GenerationConfig)``.

    Options: ``mode`` (plain | chain | tree | auto), ``drafter`` (a name, or names joined by "+"
    for the runtime's combined drafter), ``max_nodes`` (tree node budget; depth follows),
    ``lookahead`` (EngineOptions.draft_lookahead, default 0).
    """

    def setup(self) -> dict[str, Any]:
        import edgeinfer
        from ..runtime.config import GenerationConfig, TreeBudget

        self.engine = edgeinfer.load(self.opts["bundle"], threads=self.threads,
                                     draft_lookahead=int(self.opts.get("lookahead", 0)))
        tree = TreeBudget()
        if self.opts.get("max_nodes"):
            n = int(self.opts["max_nodes"])
            tree = TreeBudget(max_nodes=n, max_depth=min(n, max(tree.max_depth, n // 2)))
        drafters = tuple(self.opts["drafter"].split("+")) if self.opts.get("drafter") else ()
        self.gen = GenerationConfig(temperature=0.0, mode=self.opts["mode"], drafters=drafters,
                                    tree=tree, ignore_eos=True)
        unknown = [d for d in drafters if d not in self.engine.drafters]
        if unknown:  # say so at setup, not on the first run
            raise ConfigError(f"{self.opts['bundle']}: drafter(s) {unknown} not available, "
                              f"the engine has {sorted(self.engine.drafters)}")
        return {"providers": self.engine.providers(), "tree_budget": {
            "max_nodes": tree.max_nodes, "max_depth": tree.max_depth,
            "branch_threshold": tree.branch_threshold}}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        gen = self.gen.replace(max_new_tokens=max_new_tokens)
        # every run drafts as a fresh engine would: runs repeat the same prompts, and a Token
        # Recycling table that saw a prompt's output before would draft it from memory
        self.engine.reset_drafters()
        clock = TokenClock()
        stream = self.engine.stream_tokens(prompt_ids, gen)
        batches = 0
        for toks in stream:
            clock.add(toks)
            batches += 1
        stats = stream.result.stats
        spec = self.opts["mode"] != "plain"
        return clock.result(len(prompt_ids), max_new_tokens, steps=max(batches - 1, 0) or None,
                            proposed=stats.drafted_tokens if spec else None,
                            accepted=stats.accepted_tokens if spec else None,
                            draft_forwards=stats.draft_forwards or None,
                            draft_forward_s=stats.draft_forward_seconds or None)
