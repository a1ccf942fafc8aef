"""Anchor adapters: llama-cpp-python, onnxruntime-genai and transformers (CPU).

Each adapter takes prompt token ids, decodes greedily for exactly ``max_new_tokens`` tokens
(end-of-sequence does not stop it, so output lengths are fixed) and stamps the time at
which each new token became available. These classes run inside a bench worker process
(edgeinfer.bench.worker), one method per process, so imports of heavy packages stay there.
"""
from __future__ import annotations

import json
import time
from typing import Any, Sequence

from ..errors import ConfigError
from .config import MethodSpec, RunResult


class TokenClock:
    """Time stamps of token arrivals, relative to the clock's creation (the call's start)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens: list[int] = []
        self.times: list[float] = []  # seconds since t0, one per token

    def add(self, tokens: Sequence[int]) -> None:
        now = time.perf_counter() - self.t0
        for t in tokens:
            self.tokens.append(int(t))
            self.times.append(now)

    def result(self, prompt_tokens: int, n: int, steps: int | None = None,
               proposed: int | None = None, accepted: int | None = None,
               draft_forwards: int | None = None, draft_forward_s: float | None = None) -> RunResult:
        """The first ``n`` tokens as a RunResult; prefill time = TTFT for every method."""
        toks, times = self.tokens[:n], self.times[:n]
        if not toks:
            raise ConfigError("bench: a method produced no tokens")
        ttft = times[0]
        return RunResult(tokens=toks, prompt_tokens=prompt_tokens, ttft_s=ttft,
                         prefill_s=ttft,
                         decode_s=times[-1] - ttft, steps=steps, proposed=proposed,
                         accepted=accepted, draft_forwards=draft_forwards, draft_forward_s=draft_forward_s)


class Method:
    """Base of every adapter: ``setup()``, ``generate(ids, n) -> RunResult``, ``teardown()``."""

    def __init__(self, spec: MethodSpec, threads: int):
        self.spec, self.opts, self.threads = spec, dict(spec.options), threads

    def setup(self) -> dict[str, Any]:
        return {}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class LlamaCppMethod(Method):
    """llama-cpp-python ``Llama.generate`` (greedy sampler), optionally prompt lookup."""

    def setup(self) -> dict[str, Any]:
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        calls: list[int] = []  # proposals per draft call (one call per target pass)

        class CountingLookup(LlamaPromptLookupDecoding):
            def __call__(self, input_ids, /, **kwargs):  # type: ignore[override]
                out = super().__call__(input_ids, **kwargs)
                calls.append(int(len(out)))
                return out

        self.calls = calls
        k = self.opts.get("lookup")
        self.draft = CountingLookup(max_ngram_size=2, num_pred_tokens=int(k)) if k else None
        self.llm = Llama(model_path=self.opts["model_path"], n_ctx=int(self.opts["n_ctx"]),
                         n_threads=self.threads, n_threads_batch=self.threads, n_batch=512,
                         seed=0, verbose=False, draft_model=self.draft)
        return {"llama_cpp_version": llama_cpp.__version__}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        self.calls.clear()
        self.llm.reset()  # no prompt-cache reuse between runs: every run pays its prefill
        clock = TokenClock()
        for tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                     repeat_penalty=1.0, reset=True):
            clock.add([tok])
            if len(clock.tokens) >= max_new_tokens:
                break
        n = len(clock.tokens)
        if self.draft is None:
            return clock.result(len(prompt_ids), max_new_tokens, steps=n - 1)
        steps = max(len(self.calls), 1)
        return clock.result(len(prompt_ids), max_new_tokens, steps=steps,
                            proposed=sum(self.calls), accepted=max(n - 1 - steps, 0))

    def teardown(self) -> None:
        self.llm.close()


class GenaiMethod(Method):
    """onnxruntime-genai ``Generator``: append the prompt ids, then one token per call."""

    def setup(self) -> dict[str, Any]:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(self.opts["model_dir"])
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads}}}}))
        self.model = og.Model(config)
        return {"onnxruntime_genai_version": og.__version__}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        import numpy as np

        og = self.og
        total = len(prompt_ids) + max_new_tokens
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        clock = TokenClock()
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        while len(clock.tokens) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            clock.add([int(gen.get_next_tokens()[0])])
        n = len(clock.tokens)
        del gen
        return clock.result(len(prompt_ids), max_new_tokens, steps=n - 1)


class TransformersMethod(Method):
    """transformers ``generate`` on CPU (float32), optionally prompt-lookup assisted."""

    def setup(self) -> dict[str, Any]:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.generation import candidate_generator as cg
        from transformers.generation.streamers import BaseStreamer

        torch.set_num_threads(self.threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(self.opts["model_dir"], dtype=torch.float32)
        self.model.eval()
        self.proposals: list[int] = []
        proposals = self.proposals
        original = cg.PromptLookupCandidateGenerator.get_candidates

        def counting(gen_self, input_ids, **kwargs):  # counts draft tokens per target pass
            cand, logits = original(gen_self, input_ids, **kwargs)
            proposals.append(int(cand.shape[1] - input_ids.shape[1]))
            return cand, logits

        cg.PromptLookupCandidateGenerator.get_candidates = counting  # this worker process only

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.clock: TokenClock | None = None
                self.puts = 0

            def put(self, value) -> None:
                self.puts += 1
                if self.puts > 1:  # the first put is the prompt
                    self.clock.add(value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        self.streamer_cls = Streamer
        return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> RunResult:
        torch = self.torch
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        streamer = self.streamer_cls()
        self.proposals.clear()
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  streamer=streamer, attention_mask=torch.ones_like(ids))
        eos = self.model.generation_config.eos_token_id
        kw["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
        if self.opts.get("lookup"):
            kw["prompt_lookup_num_tokens"] = int(self.opts["lookup"])
        streamer.clock = TokenClock()
        with torch.inference_mode():
            self.model.generate(ids, **kw)
        clock = streamer.clock
        steps = streamer.puts - 2  # puts: prompt, first token, then one per target pass
        if not self.opts.get("lookup"):
            return clock.result(len(prompt_ids), max_new_tokens, steps=steps)
        # The first target pass (prefill) already verifies a lookup draft, so it may yield
        # several tokens: passes = puts - 1, each yielding its accepted drafts + one token.
        passes = streamer.puts - 1
        n = min(len(clock.tokens), max_new_tokens)
        return clock.result(len(prompt_ids), max_new_tokens, steps=max(steps, 1),
                            proposed=sum(self.proposals[:passes]), accepted=max(n - passes, 0))
