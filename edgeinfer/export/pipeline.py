"""Pair export: target + draft checkpoints -> one bundle (DESIGN.md section 2).

The pipeline only orchestrates: checkpoint readers produce a :class:`Checkpoint` in canonical
form, the ONNX builder and GGUF writer consume it, and the bundle module writes the manifest.
Everything is built in a staging directory that is renamed into place at the end, so an
interrupted or failed export never leaves a directory that looks like a bundle.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..bundle import (SHARD_SPLITS, Manifest, ModelEntry, RecyclePriorEntry, atomic_write_text, file_entries,
                      staging_dir, write_manifest)
from ..errors import ConfigError, EdgeInferError
from ..models import DEFAULT_MODEL, default_model_path
from ..quant.recipe import QuantRecipe, WeightFormat
from ..spec import ModelSpec
from .checkpoint import Checkpoint, load_checkpoint
from .tokenizer_check import check_same_tokenizer

FORMATS = ("onnx", "gguf")
# progress(stage, done, total): stage is a short human label ("target: onnx")
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DraftFromTarget:
    """A draft derived from the target: its first ``num_layers`` layers (all if None),
    quantized with ``recipe``."""

    recipe: QuantRecipe = QuantRecipe(WeightFormat.INT4)
    num_layers: int | None = None

    @classmethod
    def parse(cls, text: str, block_size: int = 32) -> "DraftFromTarget":
        """Parse ``"int4"``, ``"layers=8"``, ``"layers=8,quant=int8,block=64"`` or
        ``"int4,affine,head=int8"`` (affine blocks; LM head and tied embedding in int8)."""
        fmt, layers, block, affine, head = "int4", None, block_size, False, None
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep and key == "affine":
                affine = True
                continue
            if not sep:
                key, value = "quant", key
            try:
                if key == "quant":
                    fmt = WeightFormat.parse(value, "--draft-from-target quant").value
                elif key == "head":
                    head = WeightFormat.parse(value, "--draft-from-target head").value
                elif key == "layers":
                    layers = int(value)
                elif key == "block":
                    block = int(value)
                else:
                    raise ConfigError(
                        f"--draft-from-target: unknown key {key!r} in {text!r}, expected quant=, "
                        "layers=, block=, head= or affine")
            except ValueError as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"--draft-from-target: {key}={value!r} is not an integer") from None
        if layers is not None and layers <= 0:
            raise ConfigError(f"--draft-from-target: layers must be positive, got {layers}")
        # The embedding table follows the weights' format: for a tied model the LM head and the
        # embedding then share one quantized table.
        fmt = WeightFormat.parse(fmt)
        if affine and fmt not in (WeightFormat.INT4, WeightFormat.INT8):
            raise ConfigError(f"--draft-from-target: affine needs quant=int4 or int8, got {fmt.value}")
        keep = ("lm_head.weight",) if head is not None else ()
        embed = head or fmt
        return cls(recipe=QuantRecipe(fmt, block_size=block, embed_format=embed, keep=keep,
                                      keep_format=head or WeightFormat.FP32, affine=affine),
                   num_layers=layers)


@dataclass(frozen=True)
class ExportConfig:
    out: Path
    target: Path | None = None  # None: the default model from the cache
    draft: Path | None = None  # another checkpoint sharing the tokenizer
    draft_from_target: DraftFromTarget | None = None
    target_recipe: QuantRecipe = QuantRecipe()
    draft_recipe: QuantRecipe = QuantRecipe(WeightFormat.INT4)  # for a separate draft checkpoint
    formats: tuple[str, ...] = ("onnx",)
    shards: bool = False  # also write per-layer shards of the target (for offloading)
    # how finely the shards cut a layer (bundle.SHARD_SPLITS): one weight matrix per shard keeps
    # the streaming pool at two matrices (SmolLM2 fp32: 6.8 instead of 27.2 MiB with prefetch),
    # which let its int4 affine draft fit at half the target's size; it costs ~0.3 ms per extra
    # onnxruntime run (plain streaming compute 69 -> 89 ms a pass, hidden behind the reads)
    shard_split: str = "matrix"
    overwrite: bool = False
    # Lossless target (quant/exact.py): linear weights on a 4-bit block grid as affine int4 with
    # float32 activations, the rest fp32; replaces target_recipe (which must be left at fp32).
    target_exact: bool = False
    # Token Recycling's prior (runtime/recycle_prior.py): the target's top-k after every vocabulary
    # token, computed with onnxruntime on the exported target (SmolLM2-135M fp32: ~70 s, 1.5 MiB)
    recycle_prior: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.target_exact and self.target_recipe.format is not WeightFormat.FP32:
            raise ConfigError(f"exact: the exact target replaces the quant format; got quant="
                              f"{self.target_recipe.format.value} as well (leave it at fp32)")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"formats: {bad or 'empty'} not allowed, expected a subset of {FORMATS}")
        if self.draft is not None and self.draft_from_target is not None:
            raise ConfigError("give either a draft checkpoint or --draft-from-target, not both")
        if self.recycle_prior and "onnx" not in self.formats:
            raise ConfigError("recycle_prior: computing the prior runs the target's ONNX graph; "
                              "add onnx to the formats or leave the prior out")
        if self.shard_split not in SHARD_SPLITS:
            raise ConfigError(f"shard_split: {self.shard_split!r} is not one of {', '.join(SHARD_SPLITS)}")


@dataclass
class ModelReport:
    role: str
    spec: ModelSpec
    recipe: QuantRecipe
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the user should know (the CLI prints them)


@dataclass
class ExportReport:
    out: Path
    models: dict[str, ModelReport]
    seconds: float


DEFAULT_DRAFT = "int4,affine,head=int8"  # --draft-from-target spec of the default pair


def default_pair_config(out: Path, overwrite: bool = False) -> ExportConfig:
    """The default bundle: SmolLM2-135M-Instruct dequantized to fp32 as the target, with a
    derived draft in affine int4 blocks (the source's Q4_1 grid held exactly) and an int8 head
    (the Q8_0 table held exactly). Measured on 2 cores: acceptance 0.96 at 6.8 ms per draft
    step, against 0.88 at 9 ms for a plain int8 copy; zero-point int4 accepts ~60%, first-k-layer
    copies under 10%. What the draft still misses comes from MatMulNBits' int8 activations."""
    return ExportConfig(out=out, target=default_model_path(DEFAULT_MODEL),
                        draft_from_target=DraftFromTarget.parse(DEFAULT_DRAFT),
                        target_recipe=QuantRecipe(WeightFormat.FP32), overwrite=overwrite,
                        recycle_prior=True)


def export_bundle(config: ExportConfig, progress: ProgressFn | None = None) -> ExportReport:
    t0 = time.perf_counter()
    target = load_checkpoint(config.target or default_model_path(DEFAULT_MODEL))
    target_recipe, notes = config.target_recipe, []
    if config.target_exact:
        target_recipe, notes = _exact_target_recipe(target, config.target_recipe.block_size, progress)
    plans: list[tuple[str, Checkpoint, ModelSpec, QuantRecipe]] = [
        ("target", target, target.spec, target_recipe)]
    if config.draft is not None:
        draft = load_checkpoint(config.draft)
        check_same_tokenizer(target.tokenizer.tokenizer_json, draft.tokenizer.tokenizer_json,
                             f"target {target.path.name}", f"draft {draft.path.name}")
        if draft.spec.vocab_size != target.spec.vocab_size:
            raise EdgeInferError(
                f"draft {draft.path}: vocab_size {draft.spec.vocab_size} differs from the target's "
                f"{target.spec.vocab_size}")
        plans.append(("draft", draft, draft.spec, config.draft_recipe))
    elif config.draft_from_target is not None:
        d = config.draft_from_target
        spec = target.spec if d.num_layers is None else target.spec.truncated(d.num_layers)
        plans.append(("draft", target, spec, d.recipe))

    reports: dict[str, ModelReport] = {}
    entries: dict[str, ModelEntry] = {}
    with staging_dir(config.out, overwrite=config.overwrite) as stage:
        for role, ckpt, spec, recipe in plans:
            r0 = time.perf_counter()
            entries[role] = _write_model(stage, role, ckpt, spec, recipe, config, progress)
            reports[role] = ModelReport(role, spec, recipe, seconds=time.perf_counter() - r0,
                                        notes=notes if role == "target" else [])
        tok = target.tokenizer
        atomic_write_text(stage / "tokenizer.json", tok.tokenizer_json)
        if tok.chat_template:
            atomic_write_text(stage / "chat_template.jinja", tok.chat_template)
        if config.recycle_prior:
            r0 = time.perf_counter()
            entries["target"] = dataclasses.replace(
                entries["target"], recycle_prior=_write_recycle_prior(stage, entries["target"], tok, progress))
            reports["target"].seconds += time.perf_counter() - r0
        files = file_entries(stage)
        manifest = Manifest(
            models=entries, chat_template_file="chat_template.jinja" if tok.chat_template else None,
            bos_token_id=tok.bos_token_id, eos_token_ids=tuple(tok.eos_token_ids),
            pad_token_id=tok.pad_token_id, add_bos_token=tok.add_bos_token,
            generation=dict(tok.generation_defaults), files=files,
            created_by=f"edgeinfer {__version__}")
        write_manifest(stage, manifest)
        for f in files:
            role = f.path.split("/", 1)[0]
            if role in reports:
                reports[role].files[f.path] = f.bytes
    return ExportReport(out=config.out, models=reports, seconds=time.perf_counter() - t0)


def _write_recycle_prior(stage: Path, target: ModelEntry, tok: Any,
                         progress: ProgressFn | None) -> RecyclePriorEntry:
    """Token Recycling's prior from the staged target graph (runtime/recycle_prior.py)."""
    from ..runtime.providers import CPU, SessionSettings
    from ..runtime.recycle_prior import DEFAULT_CHUNK, DEFAULT_PRIOR_K, compute_prior, prior_context, write_prior
    from ..runtime.session import ModelRunner
    from ..runtime.tokenizer import Tokenizer

    runtime_tok = Tokenizer.from_file(stage / "tokenizer.json", chat_template=tok.chat_template,
                                      bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
                                      add_bos_token=tok.add_bos_token)
    context = prior_context(runtime_tok)
    spec = target.spec
    runner = ModelRunner(stage / target.onnx, spec, (CPU,), name="target",
                         max_context=min(spec.max_position, len(context) + DEFAULT_CHUNK + 1),
                         settings=SessionSettings())
    step = None if progress is None else (lambda done, total: progress("target: recycle prior", done, total))
    table = compute_prior(runner, context, DEFAULT_PRIOR_K, progress=step)
    rel = "target/recycle_prior.i32"
    write_prior(stage / rel, table)
    return RecyclePriorEntry(rel, DEFAULT_PRIOR_K, tuple(context))


def _exact_target_recipe(target: Checkpoint, block_size: int,
                         progress: ProgressFn | None) -> tuple[QuantRecipe, list[str]]:
    from ..quant.exact import exact_recipe

    step = None if progress is None else (lambda done, total: progress("target: exact check", done, total))
    recipe, report = exact_recipe(target.spec.tensor_names(), target.weights.get, block_size, step)
    total = len(report.exact) + len(report.kept)
    notes = [f"exact: {len(report.exact)} of {total} linear weights stored as affine int4 blocks "
             f"(float32 activations), the rest fp32"]
    if report.kept:
        notes.append(f"exact: not on a 4-bit block grid, kept at fp32: {', '.join(report.kept[:4])}"
                     + (f" and {len(report.kept) - 4} more" if len(report.kept) > 4 else ""))
    return recipe, notes


def _write_model(stage: Path, role: str, ckpt: Checkpoint, spec: ModelSpec, recipe: QuantRecipe,
                 config: ExportConfig, progress: ProgressFn | None) -> ModelEntry:
    # Imported here: the builders pull in onnx / gguf, which the runtime does not need.
    from .onnx_builder import build_model_onnx
    from .onnx_layers import GraphOptions

    (stage / role).mkdir()
    get = ckpt.weights.get

    def stage_progress(label: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(f"{role}: {label}", done, total)

    onnx_rel = f"{role}/model.onnx"
    # GroupQueryAttention writing K/V into the runtime's cache in place (no per-step copy of the
    # cache; the builder falls back to the standard Attention where GQA cannot run the spec)
    options = GraphOptions(attention="gqa", kv_in_place=True)
    info = build_model_onnx(spec, get, recipe, stage / onnx_rel, progress=stage_progress("onnx"),
                            options=options)
    shards = None
    if config.shards and role == "target":
        from ..runtime.shard_graphs import write_stream_index
        from .onnx_shards import build_layer_shards

        shard_info = build_layer_shards(spec, get, recipe, stage / role / "layers",
                                        progress=stage_progress("shards"), split=config.shard_split)
        shards = shard_info.to_manifest(relative_to=stage)
        # the graphs rewritten for streaming, so that the runtime needs no onnx package
        shards["stream_index"] = write_stream_index(
            stage, shard_info.embed.path, [p.path for parts in shard_info.layers for p in parts],
            shard_info.head.path, stage / role / "layers" / "stream")
    gguf_rel = None
    if "gguf" in config.formats:
        from .gguf_writer import write_gguf

        gguf_rel = f"{role}/model.gguf"
        write_gguf(spec, get, ckpt.tokenizer, recipe, stage / gguf_rel, progress=stage_progress("gguf"))
    return ModelEntry(
        spec=spec, quant=recipe.to_dict(), onnx=onnx_rel, gguf=gguf_rel, shards=shards,
        source={"name": ckpt.path.name, "format": ckpt.kind},
        graph_inputs=tuple(getattr(info, "inputs", ())))


def export_model(checkpoint: Path, recipe: QuantRecipe, out: Path, formats: tuple[str, ...] = ("onnx",),
                 overwrite: bool = False, progress: ProgressFn | None = None,
                 exact: bool = False) -> ExportReport:
    """Quantize one model into a target-only bundle (``edgeinfer quantize``); ``exact``: the
    lossless recipe of quant/exact.py instead of ``recipe`` (its block size is used)."""
    return export_bundle(ExportConfig(out=out, target=checkpoint, target_recipe=recipe,
                                      formats=formats, overwrite=overwrite, target_exact=exact), progress)
