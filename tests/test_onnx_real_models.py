"""fp32 ONNX exports of the real default models against transformers on the same GGUF.

Weights: edgeinfer's GGUF reader (dequantized to float32) -> build_model_onnx. Independent
answer: transformers loading the same GGUF (its own dequantizer) in float32, greedy with its
own KV cache. Rule (DESIGN.md section 5): identical greedy tokens, or at the first difference
the reference's top-2 logits are within 1e-3 relative (a numeric near-tie).
"""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.onnx_builder import build_model_onnx
from edgeinfer.models import default_model_path
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime.reference_decode import greedy_decode_session, make_session, run_tree, empty_kv

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
NEAR_TIE = 1e-3
CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue."]
RAW = ["The history of the printing press begins", "def fibonacci(n):\n    \"\"\"Return the n-th",
       "Once upon a time, in a small village by the mountains,", "The three primary colors are",
       "Photosynthesis is the process by which"]


class Exported:
    def __init__(self, key: str, out_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = default_model_path(key)
        ckpt = load_checkpoint(path)
        self.spec = ckpt.spec
        self.info = build_model_onnx(self.spec, ckpt.weights.get, QuantRecipe(), out_dir / "model.onnx")
        self.session = make_session(self.info.path)
        self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                        dtype=torch.float32).eval()

    def prompts(self) -> list[list[int]]:
        if self.tok.chat_template:  # SmolLM2: three chat prompts, two raw ones
            chats = [self.tok.apply_chat_template([{"role": "user", "content": c}],
                                                  add_generation_prompt=True, tokenize=True)
                     for c in CHAT]
            chats = [list(c["input_ids"]) if hasattr(c, "keys") else list(c) for c in chats]
            return chats + [self.tok(t)["input_ids"] for t in RAW[:2]]
        return [self.tok(t)["input_ids"] for t in RAW]

    def ref_greedy(self, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        """transformers greedy with its KV cache: tokens and the logits of each step."""
        import torch

        out, logits = [], []
        with torch.no_grad():
            res = self.ref(torch.tensor([ids]), use_cache=True)
            for _ in range(n):
                row = res.logits[0, -1].float().numpy()
                logits.append(row)
                out.append(int(np.argmax(row)))
                res = self.ref(torch.tensor([[out[-1]]]), past_key_values=res.past_key_values,
                               use_cache=True)
        return out, logits


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    cache: dict[str, Exported] = {}

    def get(key: str) -> Exported:
        if key not in cache:
            cache.clear()  # one real model in memory at a time
            cache[key] = Exported(key, tmp_path_factory.mktemp(key))
        return cache[key]

    return get


MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


@pytest.mark.parametrize("key", MODELS)
def test_greedy_tokens_match_transformers(exported, key):
    m = exported(key)
    for ids in m.prompts():
        ours = greedy_decode_session(m.session, m.spec, ids, NEW_TOKENS)
        ref, ref_logits = m.ref_greedy(ids, NEW_TOKENS)
        assert len(ours) == NEW_TOKENS
        diff = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if diff is not None:
            top2 = np.sort(ref_logits[diff])[-2:]
            assert top2[1] - top2[0] <= NEAR_TIE * abs(top2[1]), (
                f"{key}: greedy tokens differ at step {diff} without a near-tie "
                f"(top-2 {top2[1]:.5f} vs {top2[0]:.5f}); ours {ours[:diff + 1]}, ref {ref[:diff + 1]}")


@pytest.mark.parametrize("key", MODELS)
def test_prefill_logits_match_transformers(exported, key):
    import torch

    m = exported(key)
    ids = m.prompts()[0]
    ours = run_tree(m.session, m.spec, empty_kv(m.spec), ids, list(range(-1, len(ids) - 1)), 0).logits
    with torch.no_grad():
        ref = m.ref(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
