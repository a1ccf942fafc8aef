"""The `edgeinfer` command line: a thin shell over the Python API.

It parses arguments, builds config objects, calls the library and prints. Errors raised by
the library (EdgeInferError) become one readable line on stderr and exit code 1; a traceback is
shown only with --debug.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .. import __version__
from ..bundle import SHARD_SPLITS
from ..errors import ConfigError, EdgeInferError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# -- helpers --------------------------------------------------------------------------------

class TqdmProgress:
    """Adapts the library's progress(stage, done, total) callback to tqdm bars."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=True,
                                          dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _recipe(fmt: str, block: int, symmetric: bool = True, outlier: str = "none",
            keep: Sequence[str] = (), affine: bool = False, accuracy_level: int = 4):
    from ..quant.recipe import QuantRecipe

    # The embedding follows the weight format (a tied LM head then shares one table) unless the
    # user keeps it at fp32 with --keep embed_tokens.weight.
    import fnmatch

    keep_embed = any(fnmatch.fnmatchcase("embed_tokens.weight", k) for k in keep)
    affine = affine and fmt in ("int4", "int8")  # fp32/fp16/fp8 have no integer blocks
    return QuantRecipe(fmt, block_size=block, symmetric=symmetric, outlier=outlier, keep=tuple(keep),
                       embed_format="fp32" if keep_embed else fmt, affine=affine,
                       accuracy_level=accuracy_level)


# -- commands -------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from ..export.pipeline import DraftFromTarget, ExportConfig, default_pair_config, export_bundle

    if args.target is None and args.draft is None and args.draft_from_target is None and args.quant is None:
        from dataclasses import replace

        config = replace(default_pair_config(Path(args.out), overwrite=args.force), shards=args.shards,
                         shard_split=args.shard_split, formats=tuple((args.formats or "onnx").split(",")),
                         target_exact=args.exact,
                         recycle_prior=True if args.recycle_prior is None else args.recycle_prior)
    else:
        dft = DraftFromTarget.parse(args.draft_from_target, args.block_size) if args.draft_from_target else None
        config = ExportConfig(
            out=Path(args.out), target=Path(args.target) if args.target else None,
            draft=Path(args.draft) if args.draft else None, draft_from_target=dft,
            target_recipe=_recipe(args.quant or "fp32", args.block_size, not args.asymmetric, args.outlier,
                                  args.keep, args.affine, args.accuracy_level),
            draft_recipe=_recipe(args.draft_quant, args.block_size, not args.asymmetric, args.outlier,
                                 (), args.affine, args.accuracy_level),
            formats=tuple((args.formats or "onnx").split(",")), shards=args.shards,
            shard_split=args.shard_split, overwrite=args.force, target_exact=args.exact,
            recycle_prior=bool(args.recycle_prior))
    progress = TqdmProgress(not args.quiet)
    try:
        report = export_bundle(config, progress=progress)
    finally:
        progress.close()
    print(f"bundle written: {report.out}  ({report.seconds:.1f} s)")
    for role, m in report.models.items():
        size = sum(m.files.values())
        print(f"  {role:6s} {m.spec.arch}, {m.spec.num_layers} layers, {m.recipe.format.value}"
              f"{' affine' if m.recipe.affine else ''} (block {m.recipe.block_size}), {_human_bytes(size)} in {len(m.files)} files, {m.seconds:.1f} s")
        for note in m.notes:
            print(f"         {note}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..export.pipeline import export_model

    if args.quant is None and not args.exact:
        raise ConfigError("quantize: give --quant FORMAT or --exact")
    progress = TqdmProgress(not args.quiet)
    try:
        report = export_model(Path(args.model), _recipe(args.quant or "fp32", args.block_size, not args.asymmetric,
                                                        args.outlier, args.keep, args.affine,
                                                        args.accuracy_level),
                              Path(args.out), tuple(args.formats.split(",")), overwrite=args.force,
                              progress=progress, exact=args.exact)
    finally:
        progress.close()
    m = report.models["target"]
    print(f"quantized bundle written: {report.out}  ({report.seconds:.1f} s, "
          f"{_human_bytes(sum(m.files.values()))})")
    for note in m.notes:
        print(f"  {note}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..inspect import inspect_path, report_to_json

    report = inspect_path(args.path, tensors=True)
    if args.json:
        print(report_to_json(report))
        return 0
    print(f"{report.path}  ({report.kind})")
    for m in report.models:
        print(f"  {m.role}: {m.arch}, {m.num_parameters / 1e6:.1f} M parameters, {m.num_layers} layers, "
              f"hidden {m.hidden_size}, vocab {m.vocab_size}, weights {m.quant}, "
              f"{_human_bytes(m.bytes_on_disk)} on disk"
              + (f", KV cache written {m.kv_layout}" if m.kv_layout == "in place" else ""))
        if m.shards:
            print(f"    shards for offloading: {m.shards['layers']} layers x {m.shards['shards_per_layer']} "
                  f"shard(s), the largest {_human_bytes(m.shards['largest_shard_bytes'])}")
        if m.recycle_prior:
            print(f"    Token Recycling prior: the target's top-{m.recycle_prior['k']} after each of its "
                  f"{m.vocab_size} tokens ({len(m.recycle_prior['context'])}-token context), "
                  f"{m.recycle_prior['file']}")
        shard_dir = f"{m.role}/layers/"
        in_dir = {p: b for p, b in m.files.items() if p.startswith(shard_dir)}
        for path, size in sorted(m.files.items()):
            if path not in in_dir:
                print(f"    {path:40s} {_human_bytes(size):>10s}")
        if in_dir:  # the shard files, one line (--json lists each)
            print(f"    {shard_dir + f' ({len(in_dir)} files)':40s} {_human_bytes(sum(in_dir.values())):>10s}")
        if args.tensors:
            for t in m.tensors:
                print(f"    {t.name:50s} {t.format:22s} {str(list(t.shape)):18s} {_human_bytes(t.bytes):>10s}")
        elif m.tensors:
            by_fmt: dict[str, int] = {}
            for t in m.tensors:
                by_fmt[t.format] = by_fmt.get(t.format, 0) + t.bytes
            print("    tensor bytes by format: " + ", ".join(
                f"{k} {_human_bytes(v)}" for k, v in sorted(by_fmt.items(), key=lambda kv: -kv[1])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeinfer",
        description="Fast on-device LLM inference: export quantized tree-verifiable bundles, "
                    "run them with token-tree speculation.")
    p.add_argument("--version", action="version", version=f"edgeinfer {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
        return sp

    def quant_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--block-size", type=int, default=32, help="block size for int4/int8/fp8 (default 32)")
        sp.add_argument("--asymmetric", action="store_true", help="asymmetric (zero-point) int4/int8 blocks")
        sp.add_argument("--affine", action="store_true",
                        help="int4/int8 blocks with a float offset each (GGUF Q4_1 style); weights that "
                             "already lie on a block grid (a quantized GGUF source) are kept exactly")
        sp.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                        help="MatMulNBits accuracy_level of int4/int8 weights: 4 (default) quantizes "
                             "activations to int8 inside the kernel (fast), 0 keeps them float32 (exact)")
        sp.add_argument("--outlier", choices=("none", "scale", "reorder"), default="none",
                        help="outlier-aware quantization (default none)")
        sp.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                        help="keep matching tensors at fp32, e.g. 'lm_head.weight' or 'layers.0.*' (repeatable)")
        sp.add_argument("--exact", action="store_true",
                        help="lossless: linear weights that lie on a 4-bit block grid (a Q4_0/Q4_1/Q4_K "
                             "GGUF source) as affine int4 blocks with float32 activations, the rest fp32; "
                             "same output as fp32 from about a third of the bytes")
        sp.add_argument("--force", action="store_true", help="replace an existing output directory")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    sp = add("export", cmd_export, "Export a target (+ draft) pair into a bundle. With no model "
             "arguments: the default pair (SmolLM2-135M-Instruct fp32 target, derived int4 affine draft).")
    sp.add_argument("--target", help="target checkpoint: Hugging Face folder or .gguf file")
    sp.add_argument("--draft", help="draft checkpoint sharing the target's tokenizer")
    sp.add_argument("--draft-from-target", metavar="SPEC",
                    help="derive the draft from the target: 'int4', 'layers=8', 'layers=8,quant=int8,block=64', "
                         "'int4,affine,head=int8' (the default pair's)")
    sp.add_argument("--quant", choices=("fp32", "fp16", "int8", "int4", "fp8"),
                    help="target weight format (default fp32)")
    sp.add_argument("--draft-quant", choices=("fp32", "fp16", "int8", "int4", "fp8"), default="int4",
                    help="weight format of a --draft checkpoint (default int4)")
    sp.add_argument("--formats", help="comma list of onnx,gguf (default onnx)")
    sp.add_argument("--shards", action="store_true", help="also write per-layer target shards (offloading)")
    sp.add_argument("--shard-split", choices=SHARD_SPLITS, default="matrix",
                    help="how finely --shards cuts each layer: one shard per layer, its attention and MLP "
                         "blocks, or one per weight matrix (the default: least memory for the weights in "
                         "flight when streaming, more onnxruntime runs per pass)")
    sp.add_argument("--recycle-prior", action=argparse.BooleanOptionalAction, default=None,
                    help="store Token Recycling's prior: the target's top-8 after every vocabulary token, "
                         "so that its drafts start full instead of empty (one pass over the vocabulary "
                         "at export, ~70 s for SmolLM2-135M; default: on for the default pair, off otherwise)")
    sp.add_argument("--out", required=True, help="output bundle directory")
    quant_args(sp)

    sp = add("quantize", cmd_quantize, "Quantize one model into a target-only bundle.")
    sp.add_argument("model", help="Hugging Face folder or .gguf file")
    sp.add_argument("--quant", choices=("fp32", "fp16", "int8", "int4", "fp8"),
                    help="weight format (required unless --exact)")
    sp.add_argument("--formats", default="onnx", help="comma list of onnx,gguf (default onnx)")
    sp.add_argument("--out", required=True, help="output bundle directory")
    quant_args(sp)

    sp = add("inspect", cmd_inspect, "Describe a bundle, GGUF file or Hugging Face folder.")
    sp.add_argument("path")
    sp.add_argument("--tensors", action="store_true", help="list every tensor")
    sp.add_argument("--json", action="store_true", help="print JSON")

    from .run import add_run_commands

    add_run_commands(add)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except EdgeInferError as e:
        if getattr(args, "debug", False):
            raise
        print(f"edgeinfer: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("edgeinfer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
