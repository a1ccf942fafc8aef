"""The list of methods one invocation measures, and what each needs prepared.

Names are stable (they key the JSON and the Markdown table):

    edgeinfer plain | edgeinfer chain <drafter> | edgeinfer tree <drafter> [@<node budget>]
    edgeinfer auto                   (mode="auto" with the bundle's defaults, what `edgeinfer run`
                                      does: the fastest of plain decoding, the draft's tree and
                                      chain and Token Recycling chains, as measured while it runs,
                                      runtime/gate.py; learns during the warm-up)
    llama.cpp <PREC> [+lookup] | genai <int4|fp32> | transformers fp32 [+lookup]

``BenchConfig.methods`` holds fnmatch patterns on these names ("llama.cpp *", "edgeinfer tree*").
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .config import BenchConfig, MethodSpec
from .prepare import Prepared


@dataclass(frozen=True)
class Candidate:
    name: str
    family: str
    adapter: str
    needs: str  # the prepared artifact this method runs on ("bundle", "gguf:Q8_0", ...)
    options: tuple[tuple[str, object], ...] = ()
    speculative: bool = False
    budget: int | None = None


LLAMA_LOOKUP_PRECISIONS = ("Q8_0", "source")  # the first of these that is measured gets +lookup
LOOKAHEAD = 3  # guesses per draft forward of the "+lookahead" methods


def candidates(config: BenchConfig, drafters: tuple[str, ...]) -> list[Candidate]:
    """Every method the config asks for, filtered by ``config.methods`` patterns."""
    out: list[Candidate] = [Candidate("edgeinfer plain", "edgeinfer", "edgeinfer", "bundle",
                                      (("mode", "plain"),))]
    if drafters:
        out.append(Candidate("edgeinfer auto", "edgeinfer", "edgeinfer", "bundle",
                             (("mode", "auto"),), speculative=True))
    for d in drafters:
        out.append(Candidate(f"edgeinfer chain {d}", "edgeinfer", "edgeinfer", "bundle",
                             (("mode", "chain"), ("drafter", d)), speculative=True))
        out.append(Candidate(f"edgeinfer tree {d}", "edgeinfer", "edgeinfer", "bundle",
                             (("mode", "tree"), ("drafter", d)), speculative=True))
        if d == "model":  # the draft model with lookahead guesses (EngineOptions.draft_lookahead)
            out += [Candidate(f"edgeinfer lookahead {m} model", "edgeinfer", "edgeinfer", "bundle",
                              (("mode", m), ("drafter", d), ("lookahead", LOOKAHEAD)), speculative=True)
                    for m in ("chain", "tree")]
        if config.sweep:
            out += [Candidate(f"edgeinfer tree {d} @{b}", "edgeinfer", "edgeinfer", "bundle",
                              (("mode", "tree"), ("drafter", d), ("max_nodes", b)),
                              speculative=True, budget=b) for b in config.tree_budgets]
    if config.anchors:
        for p in config.gguf_precisions:
            out.append(Candidate(f"llama.cpp {p}", "llama.cpp", "llama_cpp", f"gguf:{p}"))
        lookup = next((p for p in LLAMA_LOOKUP_PRECISIONS if p in config.gguf_precisions),
                      config.gguf_precisions[0] if config.gguf_precisions else None)
        if lookup is not None:
            out.append(Candidate(f"llama.cpp {lookup} +lookup", "llama.cpp", "llama_cpp",
                                 f"gguf:{lookup}", (("lookup", config.lookup_tokens),), True))
        for p in config.genai_precisions:
            out.append(Candidate(f"genai {p}", "onnxruntime-genai", "genai", f"genai:{p}"))
        out.append(Candidate("transformers fp32", "transformers", "transformers", "hf"))
        out.append(Candidate("transformers fp32 +lookup", "transformers", "transformers", "hf",
                             (("lookup", config.lookup_tokens),), True))
    if config.methods:
        out = [c for c in out if any(fnmatch.fnmatchcase(c.name, pat) for pat in config.methods)]
    return out


def weight_files(c: Candidate, path: str) -> tuple[str, ...]:
    """Files read once per plain decode step of the method's target model."""
    if c.adapter == "edgeinfer":
        from .edgeinfer_method import target_weight_files

        return target_weight_files(path)
    return (path,)  # a GGUF file, a genai model folder or a Hugging Face folder


def to_spec(c: Candidate, prep: Prepared, n_ctx: int) -> MethodSpec | str:
    """The MethodSpec of a candidate, or a note saying why it is skipped."""
    path = prep.artifacts.get(c.needs)
    if path is None:
        why = next((n for n in prep.notes if n.startswith(f"prepare {c.needs}:")), None)
        return why or f"artifact {c.needs} not prepared"
    opts = dict(c.options)
    key = {"edgeinfer": "bundle", "llama_cpp": "model_path", "genai": "model_dir",
           "transformers": "model_dir"}[c.adapter]
    opts[key] = path
    if c.adapter == "llama_cpp":
        opts["n_ctx"] = n_ctx
    try:
        files = weight_files(c, path)
    except Exception as e:  # a malformed bundle: reported, the method skipped
        return f"weight files of {path}: {type(e).__name__}: {e}"
    return MethodSpec(name=c.name, family=c.family, adapter=c.adapter, options=opts,
                      weight_files=files, speculative=c.speculative, budget=c.budget)
