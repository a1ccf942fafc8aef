"""CLI commands that run a bundle: run, chat, demo (and bench, delegated to edgeinfer.bench)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _load(args: argparse.Namespace):
    from ..api import load

    # With a memory budget, naming drafters decides whether the draft model is loaded at all.
    drafters = _csv(getattr(args, "drafter", None)) if args.memory_budget else None
    return load(args.bundle, providers=_csv(args.providers), draft_providers=_csv(args.draft_providers),
                drafters=drafters,
                threads=args.threads, draft_threads=args.draft_threads, max_context=args.max_context,
                verify_checksums=not args.no_verify, memory_budget=args.memory_budget,
                draft_lookahead=args.draft_lookahead)


def _gen_options(args: argparse.Namespace) -> dict[str, Any]:
    """Generation keyword options from the flags; None values leave the defaults."""
    from ..runtime.config import TreeBudget

    opts: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, mode=args.mode,
                                stop=tuple(args.stop) if args.stop else None)
    drafters = _csv(args.drafter)
    if drafters:
        opts["drafter"] = drafters
    if args.tree_nodes or args.tree_depth or args.branch_threshold is not None:
        base = TreeBudget()
        opts["tree"] = TreeBudget(max_nodes=args.tree_nodes or base.max_nodes,
                                  max_depth=args.tree_depth or base.max_depth,
                                  branch_threshold=base.branch_threshold if args.branch_threshold is None
                                  else args.branch_threshold)
    if args.lossy_rollback:
        opts["lossy_rollback"] = True
    return opts


def _prompt(args: argparse.Namespace, engine) -> Any:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise ConfigError("prompt: empty (give some text, or - to read it from stdin)")
    if not args.raw and engine.tokenizer is not None and engine.tokenizer.chat_template:
        return [{"role": "user", "content": text}]
    return text


def format_stats(stats) -> str:
    auto = bool(stats.auto_rounds or stats.auto_plain_steps)
    drafters = f" ({', '.join(stats.drafters)})" if stats.drafters else ""
    lines = [f"mode {'auto' if auto else stats.mode}{drafters}",
             f"prompt {stats.prompt_tokens} tokens, prefill {stats.prefill_tokens_per_s:.1f} tok/s, "
             f"time to first token {stats.ttft_seconds * 1000:.0f} ms",
             f"generated {stats.generated_tokens} tokens, decode {stats.decode_tokens_per_s:.1f} tok/s "
             f"({stats.finish_reason})"]
    if stats.verifications:
        lines.append(f"verifications {stats.verifications}, acceptance {stats.acceptance_rate:.0%}, "
                     f"mean accepted {stats.mean_accepted:.2f} per verification")
        lines.append(f"time: target {stats.target_seconds:.2f} s, drafting {stats.draft_seconds:.2f} s")
    if stats.draft_forwards:
        lines.append(f"draft model: {stats.draft_forwards} forward passes ({stats.draft_forwards_per_token:.2f} "
                     f"per token, {stats.draft_forward_seconds / stats.draft_forwards * 1000:.1f} ms each); "
                     f"alone they allow {stats.draft_bound_tokens_per_s:.1f} tok/s")
    if auto:
        rounds = ", ".join(f"{n} {k} rounds" for k, n in stats.auto_rounds.items())
        lines.append(f"auto mode: {rounds + ', ' if rounds else ''}{stats.auto_plain_steps} plain steps "
                     "(measuring each setup, then the fastest)")
    lines.append("providers: " + ", ".join(f"{k}={v}" for k, v in stats.providers.items()))
    for k, note in stats.provider_notes.items():
        if note:
            lines.append(f"  {k}: {note}")
    return "\n".join(lines)


def format_offload(engine) -> str:
    """Memory plan and per-pass streaming figures of a streamed target ('' otherwise)."""
    target = engine.target
    if not hasattr(target, "memory_report"):
        return ""
    rep = target.memory_report()
    mib = 2 ** 20
    lines = [f"memory budget {rep['budget'] / mib:.0f} MiB ({rep['budget_source']}), planned peak "
             f"{rep['planned_peak'] / mib:.0f} MiB, usage now {rep['usage_now'] / mib:.0f} MiB",
             f"resident: {target.describe_parts(rep['resident']) or 'none'}; streamed "
             f"{rep['streamed_bytes_per_pass'] / mib:.0f} MiB per pass"]
    passes = getattr(target, "passes", [])[1:]  # the first pass is the prefill
    if passes:
        n = len(passes)
        io = sum(p.io_seconds for p in passes) / n
        comp = sum(p.compute_seconds for p in passes) / n
        stall = sum(p.stall_seconds for p in passes) / n
        read = sum(p.streamed_bytes for p in passes) / n
        lines.append(f"per pass ({n} after prefill): read {read / mib:.0f} MiB, I/O {io * 1000:.0f} ms, "
                     f"compute {comp * 1000:.0f} ms, waiting for I/O {stall * 1000:.0f} ms")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    engine = _load(args)
    prompt = _prompt(args, engine)
    stream = engine.stream(prompt, **_gen_options(args))
    if args.json:
        for _ in stream:
            pass
        r = stream.result
        print(json.dumps({"text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason,
                          "stats": r.stats.to_dict()}))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print(format_stats(stream.result.stats), file=sys.stderr)
        offload = format_offload(engine)
        if offload:
            print(offload, file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _load(args)
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise ConfigError(f"{args.bundle}: this bundle has no chat template; use `edgeinfer run`")
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("edgeinfer chat — /reset clears the history, /stats shows the last stats, /exit quits",
              file=sys.stderr)
    last = None
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        if text == "/stats":
            print(format_stats(last) if last else "no generation yet", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        stream = engine.stream(history, **_gen_options(args))
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        last = stream.result.stats
        history.append({"role": "assistant", "content": stream.result.text})
        if args.stats:
            print(format_stats(last), file=sys.stderr)
    return 0


DEMO_PROMPT = "Write a short Python function that checks whether a number is prime, and explain it."


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the default bundle, plain decoding next to tree speculation."""
    from ..models import DEFAULT_BUNDLE_DIR, cache_dir

    bundle = Path(args.bundle) if args.bundle else cache_dir() / "bundles" / DEFAULT_BUNDLE_DIR
    if not (bundle / "manifest.json").is_file():
        from . import TqdmProgress
        from ..export.pipeline import default_pair_config, export_bundle

        print(f"exporting the default bundle to {bundle} ...", file=sys.stderr)
        progress = TqdmProgress(True)
        try:
            export_bundle(default_pair_config(bundle, overwrite=True), progress=progress)
        finally:
            progress.close()
    args.bundle = str(bundle)
    engine = _load(args)
    messages = [{"role": "user", "content": args.prompt or DEMO_PROMPT}]
    print(f"bundle: {bundle}\nprompt: {messages[0]['content']}\n")
    results = {}
    for mode in ("plain", "tree"):
        engine.generate(messages, max_new_tokens=8, mode=mode)  # warm-up
        r = engine.generate(messages, max_new_tokens=args.max_new_tokens, mode=mode)
        results[mode] = r
        print(f"== {mode} decoding ==\n{r.text}\n")
        print(format_stats(r.stats) + "\n")
    plain, tree = results["plain"], results["tree"]
    same = plain.tokens == tree.tokens
    speedup = tree.stats.decode_tokens_per_s / plain.stats.decode_tokens_per_s \
        if plain.stats.decode_tokens_per_s else float("nan")
    print(f"plain {plain.stats.decode_tokens_per_s:.1f} tok/s, tree {tree.stats.decode_tokens_per_s:.1f} tok/s: "
          f"{speedup:.2f}x; outputs {'identical' if same else 'DIFFER'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Side-by-side benchmark (edgeinfer.bench): Markdown table, JSON of every run, plots."""
    from ..bench import run_benchmark, to_markdown, write_outputs
    from ..bench.cliargs import config_from_args
    from . import TqdmProgress

    config = config_from_args(args)
    progress = TqdmProgress(True)
    try:
        report = run_benchmark(config, progress=lambda done, total: progress("bench", done, total))
    finally:
        progress.close()
    files = write_outputs(report)
    print(to_markdown(report))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def add_run_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    def engine_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--providers", help="execution providers in order, e.g. 'qnn,xnnpack,cpu' (default cpu)")
        sp.add_argument("--draft-providers", help="providers for the draft (default: as the target)")
        sp.add_argument("--threads", type=int, default=None, help="intra-op threads per model (default: ORT's)")
        sp.add_argument("--draft-threads", type=int, default=None,
                        help="threads of the draft model (default: the target's)")
        sp.add_argument("--max-context", type=int, default=None, help="context window (default min(model, 4096))")
        sp.add_argument("--draft-lookahead", type=int, default=None, metavar="N",
                        help="tokens guessed from the context (prompt lookup) that each draft forward "
                             "also runs; pays on repetitive text such as code (default 0: off)")
        sp.add_argument("--no-verify", action="store_true", help="skip bundle checksum verification on load")
        sp.add_argument("--memory-budget", metavar="SIZE",
                        help="memory budget, e.g. 200MB or auto (cgroup limit / available memory): the "
                             "target streams its layers from the bundle's shards (export --shards)")

    def gen_args(sp: argparse.ArgumentParser, max_new: int = 128) -> None:
        sp.add_argument("--max-new-tokens", type=int, default=max_new)
        sp.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
        sp.add_argument("--top-k", type=int, default=None)
        sp.add_argument("--top-p", type=float, default=None)
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--stop", action="append", help="stop string (repeatable)")
        sp.add_argument("--mode", choices=("auto", "plain", "chain", "tree"), default=None,
                        help="plain decoding, or speculation (default auto: the fastest of plain decoding, the "
                             "draft's tree and chain and Token Recycling chains, as measured while it runs)")
        sp.add_argument("--drafter", help="comma list of model,ngram,recycle (combined into one tree)")
        sp.add_argument("--tree-nodes", type=int, default=None, help="tree size budget")
        sp.add_argument("--tree-depth", type=int, default=None, help="tree depth budget")
        sp.add_argument("--branch-threshold", type=float, default=None,
                        help="draft probability that opens a new branch (default 0.3)")
        sp.add_argument("--lossy-rollback", action="store_true",
                        help="LOSSY: BiLD-style rollback, output may differ from the target's own")
        sp.add_argument("--stats", action="store_true", help="print speed and acceptance statistics")

    sp = add("run", cmd_run, "Generate from a prompt with a bundle, streaming to stdout.")
    sp.add_argument("bundle")
    sp.add_argument("prompt", help="the prompt, or - to read stdin")
    sp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    sp.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, stats")
    engine_args(sp)
    gen_args(sp)

    sp = add("chat", cmd_chat, "Interactive chat with history (the bundle's chat template).")
    sp.add_argument("bundle")
    sp.add_argument("--system", help="system message")
    engine_args(sp)
    gen_args(sp, max_new=512)

    from ..bench.cliargs import add_bench_arguments

    sp = add("bench", cmd_bench, "Benchmark edgeinfer (plain, chain, tree, each drafter) side by side "
             "with llama.cpp, onnxruntime-genai and transformers; writes Markdown, JSON and PNG plots.")
    add_bench_arguments(sp)

    sp = add("demo", cmd_demo, "The main job: build the default bundle if needed, then show plain "
             "decoding next to tree speculation with both speeds.")
    sp.add_argument("--bundle", help="bundle to use (default: the default pair in the cache)")
    sp.add_argument("--prompt", help="user message")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    engine_args(sp)
