"""Quantization quality on the real SmolLM2-135M (export issue): top-1 agreement of int8
block-32 with the fp32 export, teacher-forced over the first 512 tokens of the shipped
evaluation text (benchmarks/data/eval_text.txt; the full-text table is in the README).

The source is a Q4_1 GGUF, so the fp32 target holds Q4_1's grid; affine int8 blocks keep it
exactly and, with float32 activations (accuracy_level 0), agree on every position. The fast
int8-activation kernel (accuracy_level 4) and the zero-point scheme are measured too and must
stay in their measured ranges (a regression in either shows up here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeinfer.bundle import load_manifest
from edgeinfer.export.pipeline import export_model
from edgeinfer.models import default_model_path
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime.session import ModelRunner
from edgeinfer.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "eval_text.txt"
N_TOKENS = 512


def top1(bundle: Path, ids: list[int]) -> np.ndarray:
    m = load_manifest(bundle, verify=False)
    e = m.models["target"]
    runner = ModelRunner(bundle / e.onnx, e.spec, max_context=len(ids) + 8)
    out = []
    for i in range(0, len(ids) - 1, 128):
        part = ids[i:min(i + 128, len(ids) - 1)]
        out.append(runner.forward(part).argmax(axis=-1))
        runner.commit(list(range(runner.num_scratch)))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    src = default_model_path()
    root = tmp_path_factory.mktemp("quality")
    recipes = {"fp32": QuantRecipe("fp32"),
               "int8-affine-l0": QuantRecipe("int8", 32, affine=True, accuracy_level=0),
               "int8-affine-l4": QuantRecipe("int8", 32, affine=True, accuracy_level=4),
               "int8-sym-l4": QuantRecipe("int8", 32)}
    ids = None
    out = {}
    recipes["exact"] = None  # --exact: the lossless int4 recipe quant/exact.py derives from the source
    for name, recipe in recipes.items():
        export_model(src, recipe or QuantRecipe(), root / name, exact=recipe is None)
        if ids is None:
            m = load_manifest(root / name, verify=False)
            ids = Tokenizer.from_bundle(root / name, m).encode(TEXT.read_text())[:N_TOKENS]
        out[name] = top1(root / name, ids)
    return out


def agreement(scored, name: str) -> float:
    return float((scored[name] == scored["fp32"]).mean())


def test_int8_block32_reaches_99_percent_top1_agreement(scored):
    assert agreement(scored, "int8-affine-l0") >= 0.99


def test_int8_activation_kernel_and_zero_point_scheme_stay_in_measured_range(scored):
    # measured on this text (2491 tokens): affine level 4 95.6%, symmetric level 4 94.5%
    assert 0.90 <= agreement(scored, "int8-affine-l4") < 0.995
    assert 0.88 <= agreement(scored, "int8-sym-l4") < 0.99


def test_exact_target_agrees_everywhere(scored):
    """Every linear weight of the Q4_1 source is on its grid: the exact export computes what
    the fp32 one does (measured: 100% top-1 agreement on the whole text, perplexity equal)."""
    assert agreement(scored, "exact") >= 0.998
