"""The generation loop: prefill, then plain decoding or speculative decoding with token trees.

Invariant between steps: ``context`` = prompt + every emitted token; the target's committed
cache holds all of it except the last token, which is the root of the next tree. One
speculative step: the drafter proposes a tree under that root, the target runs root + tree in
ONE forward pass, verification accepts the longest path the target agrees with plus the
target's own next token (bonus), and the target commits the K/V of root + accepted path.
Greedy output is therefore the target's own greedy output (DESIGN.md section 5); sampling uses
the lossless tree rule of runtime/sampling.py.

Text is produced incrementally (UTF-8 safe, runtime/tokenizer.py) and cut before stop strings.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, ContextLimitError
from .config import GenerationConfig, TreeBudget
from .session import ModelRunner
from .stats import GenerationStats, Trace, attach_drafter_trace, drafter_events
from .tokenizer import StopMatcher, Tokenizer
from .tree import TokenTree
from .verify import DEFAULT_TOPK, VerifyResult, argmax_rows, topk_rows, verify_greedy, verify_lossy, verify_sampling

Prompt = Any  # str | list of {"role", "content"} | list of token ids


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # generated token ids (EOS not included)
    stats: GenerationStats
    prompt_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def finish_reason(self) -> str:  # eos | stop | length | cancelled
        return self.stats.finish_reason


class TextStream:
    """Iterator over what a generation produces as tokens are accepted: text pieces
    (``Engine.stream``) or lists of token ids (``Engine.stream_tokens``). ``result`` (a
    GenerationResult) is set once the iteration ends or the stream is closed."""

    def __init__(self, steps: Iterator[tuple[str, list[int]]] | None = None, tokens: bool = False) -> None:
        self.result: GenerationResult | None = None
        self._steps: Iterator[tuple[str, list[int]]] = steps or iter(())
        self._tokens = tokens

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> Any:
        while True:
            text, toks = next(self._steps)
            if self._tokens and toks:
                return toks
            if not self._tokens and text:
                return text

    def close(self) -> None:
        self._steps.close()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Arm:
    """A speculative setup mode="auto" may choose: a name ("tree:model"), a mode, a drafter."""

    name: str
    mode: str  # "tree" | "chain"
    drafter: Any
    per_token_steps: bool = False  # the drafter runs a model step for every drafted token

    def draft_step(self) -> float | None:
        """Seconds per drafted token, for a drafter that runs a model step for each one."""
        return self.drafter.step_seconds if self.per_token_steps else None


class _DraftSteps(Mapping[str, "float | None"]):
    """Arm name -> its draft step now (Arm.draft_step), read by the gate when it needs one: one
    view for a whole generation instead of a dict built every step."""

    def __init__(self, arms: Mapping[str, Arm]) -> None:
        self._arms = arms

    def __getitem__(self, name: str) -> float | None:
        return self._arms[name].draft_step()

    def __iter__(self) -> Iterator[str]:
        return iter(self._arms)

    def __len__(self) -> int:
        return len(self._arms)


class Engine:
    """A target ModelRunner, a tokenizer and named drafters."""

    def __init__(self, target: ModelRunner, tokenizer: Tokenizer | None = None,
                 drafters: Mapping[str, Any] | None = None, *, default_drafters: Sequence[str] | None = None,
                 defaults: GenerationConfig | None = None, eos_token_ids: Sequence[int] | None = None,
                 draft_runners: Mapping[str, ModelRunner] | None = None, prefill_chunk: int = 512,
                 pipeline: bool = False, pipeline_max_ahead: int = 8, auto_alternatives: bool = True) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.drafters: dict[str, Any] = dict(drafters or {})
        # None: the first drafter given; (): plain decoding unless a call names drafters
        self.default_drafters = tuple(self.drafters)[:1] if default_drafters is None else tuple(default_drafters)
        self.defaults = defaults or GenerationConfig()
        eos = eos_token_ids if eos_token_ids is not None else (tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(int(e) for e in eos)
        self.runners: dict[str, ModelRunner] = {"target": target, **dict(draft_runners or {})}
        self.prefill_chunk = prefill_chunk
        # compute-IO pipeline (runtime/pipeline.py): the draft model keeps drafting on the main
        # thread while the target verifies on a worker; only for drafters with ``speculate``
        self.pipeline, self.pipeline_max_ahead = pipeline, pipeline_max_ahead
        self.last_result: GenerationResult | None = None
        self._gates: dict[tuple[str, ...], Any] = {}  # mode="auto": SpeculationGate per set of arms
        # mode="auto" also tries chains and (no drafter named) Token Recycling chains besides the
        # tree of the default drafter; a streamed target, where every step is a pass over storage,
        # keeps to the tree (see offload_engine.py)
        self.auto_alternatives = auto_alternatives

    @property
    def max_context(self) -> int:
        return self.target.max_context

    def providers(self) -> dict[str, str]:
        """Execution provider per model (see ``runners[name].report`` for why)."""
        return {name: r.provider for name, r in self.runners.items()}

    # -- public API ------------------------------------------------------------------------
    def reset_drafters(self) -> None:
        """Forget what drafters learned from earlier generations (Token Recycling's table), so
        the next generation drafts as in a freshly loaded engine; models stay loaded and auto
        mode keeps its measured speeds."""
        for d in self.drafters.values():
            forget = getattr(d, "forget", None)  # drafters/base.py: state across generations
            if forget is not None:
                forget()

    def config(self, config: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
        """``config`` (or the engine defaults) with keyword overrides; ``drafter`` may be a name
        or a list of names. None values are ignored."""
        drafter = overrides.pop("drafter", None)
        if drafter is not None:
            overrides["drafters"] = (drafter,) if isinstance(drafter, str) else tuple(drafter)
        known = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown generation option(s) {unknown}, expected some of {sorted(known)}")
        return (config or self.defaults).replace(**overrides)

    def generate(self, prompt: Prompt, config: GenerationConfig | None = None, **overrides: Any) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text, chat messages or token ids);
        ``overrides``: GenerationConfig fields (and ``drafter``)."""
        stream = self.stream_tokens(prompt, config, **overrides)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **overrides: Any) -> TextStream:
        """Like generate, yielding text pieces as tokens are accepted (never half a UTF-8
        character, never part of a stop string). Input errors are raised here, not on iteration."""
        return self._start(prompt, config, overrides, tokens=False)

    def stream_tokens(self, prompt: Prompt, config: GenerationConfig | None = None,
                      **overrides: Any) -> TextStream:
        """Like stream, yielding the list of token ids each step emitted (benchmarks)."""
        return self._start(prompt, config, overrides, tokens=True)

    def _start(self, prompt: Prompt, config: GenerationConfig | None, overrides: dict[str, Any],
               tokens: bool) -> TextStream:
        t_start = time.perf_counter()
        cfg = self.config(config, **overrides)
        ids = self.encode_prompt(prompt)
        self.check_context(len(ids), cfg.max_new_tokens)
        mode, names, drafter = self._resolve_mode(cfg)
        ts = TextStream(tokens=tokens)
        ts._steps = self._steps(ids, cfg, mode, names, drafter, t_start, ts)
        return ts

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt string, a list of chat messages, or token ids as given."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ConfigError("prompt: empty (give some text, chat messages or token ids)")
            ids = self._tok("a text prompt").encode(prompt)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            ids = self._tok("chat messages").encode_chat(prompt)
        elif isinstance(prompt, (Sequence, np.ndarray)) and len(prompt) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
            vocab = self.target.spec.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ConfigError(f"prompt: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        else:
            raise ConfigError("prompt: expected a non-empty string, a list of {'role', 'content'} "
                              f"messages or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ConfigError("prompt: encodes to no tokens")
        return ids

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.max_context
        if prompt_len + max_new_tokens > limit:
            what = "does not fit" if prompt_len >= limit else f"+ max_new_tokens={max_new_tokens} = " \
                                                             f"{prompt_len + max_new_tokens} tokens exceeds it"
            raise ContextLimitError(
                f"prompt of {prompt_len} tokens {what}: the context limit is {limit} tokens "
                "(shorten the prompt, lower max_new_tokens, or load with a larger max_context)")

    def _tok(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError(f"prompt: {what} needs a tokenizer; this engine has none (pass token ids)")
        return self.tokenizer

    def _resolve_mode(self, cfg: GenerationConfig) -> tuple[str, tuple[str, ...], Any]:
        names = cfg.drafters or self.default_drafters
        mode = cfg.mode
        if mode == "auto":
            mode = "tree" if names else "plain"
        if mode == "plain":
            return mode, (), None
        if not names:
            raise ConfigError(f"GenerationConfig.mode={mode!r} needs a drafter, but this engine has none "
                              "(a bundle without a draft model and no drafter configured)")
        unknown = [n for n in names if n not in self.drafters]
        if unknown:
            raise ConfigError(f"GenerationConfig.drafters: unknown drafter(s) {unknown}, "
                              f"available: {sorted(self.drafters)}")
        if len(names) == 1:
            return mode, names, self.drafters[names[0]]
        from .drafters.combined import CombinedDrafter

        return mode, names, CombinedDrafter([self.drafters[n] for n in names])

    # -- text layer ------------------------------------------------------------------------
    def _steps(self, ids: list[int], cfg: GenerationConfig, mode: str, names: tuple[str, ...], drafter: Any,
               t_start: float, ts: TextStream) -> Iterator[tuple[str, list[int]]]:
        """Per decoding step: (new text, new token ids), cut at EOS / stop strings / length."""
        stats = GenerationStats(mode=mode, drafters=names, prompt_tokens=len(ids))
        trace = Trace()
        dtrace = attach_drafter_trace(drafter)
        drafts = [r for name, r in self.runners.items() if name != "target"]
        forwards0 = [(r.forward_calls, r.forward_seconds) for r in drafts]
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        stop = StopMatcher(cfg.stop)
        out: list[int] = []
        pieces: list[str] = []
        finish = "cancelled"
        core = self._tokens(ids, cfg, mode, drafter, stats, trace)
        t_first = None
        try:
            for batch in core:
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_seconds = t_first - t_start
                text, n0 = "", len(out)
                for tok in batch:
                    if tok in self.eos_token_ids and not cfg.ignore_eos:
                        finish = "eos"
                        break
                    out.append(tok)
                    if detok is not None:
                        text += stop.feed(detok.add(tok))
                        if stop.hit is not None:
                            finish = "stop"
                            break
                    if len(out) >= cfg.max_new_tokens:
                        finish = "length"
                        break
                if finish != "cancelled" and detok is not None and finish != "stop":
                    text += stop.feed(detok.flush())
                    text += stop.flush()
                    finish = "stop" if stop.hit is not None else finish
                pieces.append(text)
                yield text, out[n0:]
                if finish != "cancelled":
                    break
        finally:
            core.close()
            t_end = time.perf_counter()
            stats.finish_reason = finish
            stats.generated_tokens = len(out)
            stats.decode_seconds = t_end - t_first if t_first is not None else 0.0
            stats.total_seconds = t_end - t_start
            for r, (calls, secs) in zip(drafts, forwards0):
                stats.draft_forwards += r.forward_calls - calls
                stats.draft_forward_seconds += r.forward_seconds - secs
            for name, r in self.runners.items():
                stats.providers[name] = r.provider
                if r.report.skipped:
                    stats.provider_notes[name] = r.report.describe()
            stats.trace = sorted(trace.events() + drafter_events(dtrace, trace.t0), key=lambda e: e.start)
            if dtrace is not None:
                drafter.trace = None
            ts.result = self.last_result = GenerationResult("".join(pieces), out, stats, ids)

    # -- token layer -----------------------------------------------------------------------
    def _tokens(self, ids: list[int], cfg: GenerationConfig, mode: str, drafter: Any,
                stats: GenerationStats, trace: Trace) -> Iterator[list[int]]:
        """Yields batches of emitted tokens (first: the prefill's token) until max_new_tokens."""
        runner = self.target
        now = time.perf_counter
        params = rng = None
        if not cfg.greedy:
            from .sampling import SamplingParams, make_rng, process_logits, sample

            params, rng = SamplingParams.from_config(cfg), make_rng(cfg.seed)

        # A runner that can return each row's top-k instead of its whole logits (a streamed
        # target, StreamingRunner.compact_logits) does so whenever that is all the step reads:
        # greedy verification and Token Recycling. Sampling and the lossy rollback read full rows,
        # and such a runner holds them for only ``full_logits_nodes`` rows: their trees fit that.
        full_only = params is not None or cfg.lossy_rollback
        compact = {} if full_only or not getattr(runner, "compact_logits", False) else {
            "top_k": max([DEFAULT_TOPK] + [int(getattr(d, "prompt_topk", 0) or 0) for d in self.drafters.values()])}
        full_rows = getattr(runner, "full_logits_nodes", None) if full_only else None

        def target_step(context: list[int], tree: TokenTree) -> VerifyResult:
            """Root + tree in one target pass, acceptance, commit of root + accepted path. An
            empty tree is a plain decoding step."""
            t0 = now()
            root = context[-1]
            if len(tree):
                logits = runner.forward([root] + tree.tokens, [-1] + [p + 1 for p in tree.parents], **compact)
            else:
                logits = runner.forward([root], **compact)
            if cfg.lossy_rollback and len(tree):
                result = verify_lossy(tree, logits, root, cfg.rollback_threshold)
            elif params is None:
                result = verify_greedy(tree, logits, root)
            else:
                result = verify_sampling(tree, logits, root, params, rng)
            runner.commit([0] + [i + 1 for i in result.accepted_nodes])
            t1 = now()
            trace.record("verify" if len(tree) else "decode", "target", t0, t1, len(tree) + 1)
            stats.target_seconds += t1 - t0
            if len(tree):
                stats.verifications += 1
                stats.drafted_tokens += len(tree)
                stats.accepted_tokens += result.num_accepted
            return result

        runner.reset()
        # a drafter that learns from the prompt (Token Recycling's hot start) gets the target's
        # top-k after every prompt token: the prefill then computes the logits of each distinct
        # token's last position, in chunks of at most 128 tokens so that they stay small
        # ([128, vocab] float32, 25 MB for SmolLM2), and no larger than a streamed target's
        # planned pass
        learn_k = int(getattr(drafter, "prompt_topk", 0) or 0) if mode != "plain" else 0
        chunk_size = (min(self.prefill_chunk, 128, getattr(runner, "max_nodes", 128), full_rows or 128)
                      if learn_k else self.prefill_chunk)
        t0 = now()
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start:start + chunk_size]
            if learn_k:  # the rows of each distinct token's last position (later rows win anyway)
                rows = sorted({t: i for i, t in enumerate(chunk)}.values())  # ends with len(chunk) - 1
                logits = runner.forward(chunk, logits_index=rows, **compact)
                drafter.observe_prompt([chunk[i] for i in rows], topk_rows(logits, learn_k))
                logits = logits[-1:]
            else:
                logits = runner.forward(chunk, logits_index=[len(chunk) - 1], **compact)
            runner.commit(np.arange(len(chunk)))
        t1 = now()
        trace.record("prefill", "target", t0, t1, len(ids))
        stats.prefill_seconds = t1 - t0
        stats.target_seconds += t1 - t0
        first = int(argmax_rows(logits)[-1]) if params is None else sample(process_logits(logits[-1], params), rng)
        context = list(ids) + [first]
        yield [first]
        produced = 1
        arms = self._arms(cfg, mode, drafter)
        helpers: dict[int, tuple[Any, Any]] = {}  # id(drafter) -> (its policy, its pipeline)

        def helpers_of(d: Any) -> tuple[Any, Any]:
            if id(d) not in helpers:
                policy = pipe = None
                if cfg.fallback.enabled:
                    from .policy import make_policy

                    policy = make_policy(cfg, runner, d)
                if self.pipeline and hasattr(d, "speculate"):
                    from .pipeline import PipelinedSpeculator

                    pipe = PipelinedSpeculator(d, target_step, policy, max_ahead=self.pipeline_max_ahead,
                                               learn=False)
                helpers[id(d)] = policy, pipe
            return helpers[id(d)]

        if mode != "plain":
            helpers_of(drafter)
        empty = TokenTree()
        gate = None
        # mode="auto", greedy: decode with whichever arm (or plain decoding) measures fastest.
        # Not when sampling: the timing-dependent choice would change which random draws a
        # seed's output takes.
        if arms:
            from .gate import SpeculationGate

            # one gate per set of arms for the engine's life: what one generation measured (the
            # rates, a backoff) carries over to the next
            key = tuple(arms)
            if key not in self._gates:
                self._gates[key] = SpeculationGate(key)
            gate = self._gates[key]
        draft_steps = _DraftSteps(arms)
        observers = list({id(a.drafter): a.drafter for a in arms.values()}.values()) or [drafter]
        try:
            while produced < cfg.max_new_tokens:
                room = runner.max_context - runner.past_len - 1  # positions left after the root
                depth_cap = min(cfg.max_new_tokens - produced - 1, room)
                t_step = now()
                arm = None
                if mode != "plain" and depth_cap > 0:
                    if gate is None:
                        arm = Arm(mode, mode, drafter)
                    else:
                        chosen = gate.choose(draft_steps)
                        arm = arms[chosen] if chosen is not None else None
                if arm is None:
                    result = target_step(context, empty)
                    if gate is not None:
                        for d in observers:  # e.g. recycling learns from plain steps too
                            self._observe(d, None, result, stats, trace, getattr(d, "name", "drafter"))
                        gate.record_plain(now() - t_step, len(result.tokens))
                        stats.auto_plain_steps += 1
                else:
                    d = arm.drafter
                    name = getattr(d, "name", "drafter")
                    policy, pipe = helpers_of(d)
                    if policy is not None:
                        policy.refresh()  # cost-aware: the latest measured costs (LLMCad: nothing)
                    budget = policy.budget() if policy is not None else cfg.tree
                    budget = dataclasses.replace(
                        budget, max_nodes=min(budget.max_nodes, room, (full_rows or room + 1) - 1),
                        max_depth=min(budget.max_depth, depth_cap),
                        branch_threshold=1.0 if arm.mode == "chain" else budget.branch_threshold)
                    t0 = now()
                    if pipe is not None:  # propose, then verify on a worker while the draft speculates
                        target_before = stats.target_seconds
                        result = pipe.step(context, budget)
                        stats.draft_seconds += now() - t0 - (stats.target_seconds - target_before)
                    else:
                        tree = d.propose(context, budget, stop=policy.should_verify if policy else None)
                        tree = fit_tree(tree, budget, chain=arm.mode == "chain")
                        t1 = now()
                        trace.record("draft", name, t0, t1, len(tree))
                        stats.draft_seconds += t1 - t0
                        result = target_step(context, tree)
                    self._observe(d, policy, result, stats, trace, name)
                    for other in observers:
                        if other is not d:
                            self._observe(other, None, result, stats, trace, getattr(other, "name", "drafter"))
                    if gate is not None:
                        gate.record_round(now() - t_step, len(result.tokens), arm.name)
                        stats.auto_rounds[arm.name] = stats.auto_rounds.get(arm.name, 0) + 1
                batch = result.tokens
                result = None  # its logits ([nodes, vocab]) must not outlive this round into the next pass
                context.extend(batch)
                produced += len(batch)
                yield batch
        finally:
            for _, pipe in helpers.values():
                if pipe is not None:
                    pipe.close()

    def _arms(self, cfg: GenerationConfig, mode: str, drafter: Any) -> dict[str, "Arm"]:
        """mode="auto" with greedy decoding: the speculative setups the gate chooses among (with
        plain decoding). The resolved drafter as a tree and as a chain; when the call named no
        drafter, also Token Recycling chains (free to draft: they win on repetitive text and
        where a draft model is too slow for its target). {} otherwise."""
        if cfg.mode != "auto" or mode == "plain" or not cfg.greedy:
            return {}
        from .drafters.model import ModelDrafter

        label = getattr(drafter, "name", "drafter")
        per_token = isinstance(drafter, ModelDrafter)
        arms = [Arm(f"tree:{label}", "tree", drafter, per_token)]
        if self.auto_alternatives:
            arms.append(Arm(f"chain:{label}", "chain", drafter, per_token))
            recycle = self.drafters.get("recycle")
            if not cfg.drafters and recycle is not None and recycle is not drafter:
                arms.append(Arm("chain:recycle", "chain", recycle))
        return {a.name: a for a in arms}

    @staticmethod
    def _observe(drafter: Any, policy: Any, result: VerifyResult, stats: GenerationStats,
                 trace: Trace, name: str) -> None:
        """Drafter and policy learn from a verification (also from empty-tree steps: token
        recycling fills its table from the target's top-k there)."""
        t0 = time.perf_counter()
        drafter.observe(result)
        if policy is not None:
            policy.observe(result)
        t1 = time.perf_counter()
        trace.record("observe", name, t0, t1)
        stats.draft_seconds += t1 - t0


def fit_tree(tree: TokenTree, budget: TreeBudget, chain: bool = False) -> TokenTree:
    """``tree`` within the budget's node and depth caps (and width 1 for chain mode): nodes are
    kept in index order while their parent is kept. Kept children of a parent are always a
    prefix of its children, so sampled-children distributions stay valid."""
    depths = tree.depths() if len(tree) else np.zeros(0, dtype=np.int64)
    is_chain = all(p == i - 1 for i, p in enumerate(tree.parents))
    if len(tree) <= budget.max_nodes and (len(tree) == 0 or depths.max() < budget.max_depth) \
            and (is_chain or not chain):
        return tree
    out = TokenTree()
    new: dict[int, int] = {-1: -1}
    has_child: set[int] = set()
    for i, (tok, par) in enumerate(zip(tree.tokens, tree.parents)):
        if len(out) >= budget.max_nodes:
            break
        if par not in new or depths[i] >= budget.max_depth or (chain and par in has_child):
            continue
        has_child.add(par)
        new[i] = len(out)
        out.tokens.append(tok)
        out.parents.append(new[par])
        out.probs.append(tree.probs[i] if i < len(tree.probs) else 1.0)
        out.sources.append(tree.sources[i] if i < len(tree.sources) else "")
    out.draft_dists = {new[p]: q for p, q in tree.draft_dists.items() if p in new}
    return out
