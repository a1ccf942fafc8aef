"""``prepare_anchors``: the model files each method needs, built once into the model cache.

Layout under ``cache_dir()/bench/<model stem>/``::

    hf/                      Hugging Face folder made from the GGUF (transformers, float32)
    gguf/<stem>.<PREC>.gguf  llama.cpp precisions (llama_model_quantize, requantizing allowed)
    genai-int4/, genai-fp32/ onnxruntime-genai model builder output
    bundle-<rev>/            an edgeinfer bundle (the exporter), when none was given; <rev> is
                             models.BUNDLE_LAYOUT_REVISION, so older layouts are rebuilt
    prepare.json             wall time of each build step (kept, so cached runs report them)

Each artifact is built in a temporary sibling and renamed at the end, so an interrupted
build never looks finished. Heavy steps run in a subprocess (their logs go to a file in the
artifact root, not to our stdout). A step that cannot run (package missing, unsupported
source) is recorded as a note and its methods are skipped.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, EdgeInferError
from ..models import KNOWN_MODELS, cache_dir, default_model_path

Progress = Callable[[int, int], None]
_QUANT_FTYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                 "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


@dataclass
class Prepared:
    root: Path
    source: Path
    source_format: str  # "gguf" | "hf"
    artifacts: dict[str, str] = field(default_factory=dict)  # need -> path
    timings: dict[str, float] = field(default_factory=dict)  # need -> wall seconds of its build
    notes: list[str] = field(default_factory=list)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # tokenizer_json, chat_template, ids

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "source": str(self.source),
                "source_format": self.source_format, "artifacts": dict(self.artifacts),
                "timings": dict(self.timings), "notes": list(self.notes),
                "tokenizer": {k: v for k, v in self.tokenizer.items() if k != "chat_template"}}


def resolve_source(model: str) -> tuple[Path, str]:
    """(path, "gguf" | "hf") of a known model key, a GGUF file or a Hugging Face folder."""
    if model in KNOWN_MODELS:
        return default_model_path(model), "gguf"
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p, "gguf"
    if p.is_dir() and (p / "config.json").is_file():
        return p, "hf"
    raise CheckpointError(f"{model}: expected a known model key {sorted(KNOWN_MODELS)}, a .gguf "
                          "file or a Hugging Face folder with config.json")


def gguf_tokenizer_meta(path: Path) -> dict[str, Any]:
    """Chat template and special token ids from a GGUF's metadata (gguf-py)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key: str) -> Any:
        f = fields.get(key)
        return f.contents() if f is not None else None

    eos = get("tokenizer.ggml.eos_token_id")
    return {"chat_template": get("tokenizer.chat_template"),
            "bos_token_id": get("tokenizer.ggml.bos_token_id"),
            "eos_token_ids": [int(eos)] if eos is not None else [],
            "add_bos_token": bool(get("tokenizer.ggml.add_bos_token") or False)}


def hf_tokenizer_meta(folder: Path) -> dict[str, Any]:
    """Chat template and special token ids from a Hugging Face folder's JSON files."""
    def load(name: str) -> dict[str, Any]:
        p = folder / name
        return json.loads(p.read_text()) if p.is_file() else {}

    tc, cfg, gen = load("tokenizer_config.json"), load("config.json"), load("generation_config.json")
    template = tc.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
    return {"chat_template": template, "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
            "eos_token_ids": eos_ids, "add_bos_token": bool(tc.get("add_bos_token", False))}


def _run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with output appended to ``log``; wall seconds; CheckpointError on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise CheckpointError(f"{log}: command {cmd[2:4]} failed with exit code {rc}")
    return time.perf_counter() - t0


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_HF_FROM_GGUF = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
m = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
# A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model whose
# config no longer says "gguf quantized" (the weights are plain float32 now).
cfg = m.config
if getattr(cfg, "quantization_config", None) is not None:
    del cfg.quantization_config
fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
missing, unexpected = fresh.load_state_dict(m.state_dict(), strict=False)
assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
fresh.tie_weights()
fresh.generation_config = m.generation_config
fresh.save_pretrained(out)
tok.save_pretrained(out)
"""

_QUANTIZE = """
import ctypes, sys, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], getattr(llama_cpp, sys.argv[3])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.allow_requantize = True
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(rc)
"""


class _Builder:
    def __init__(self, prep: Prepared):
        self.prep = prep
        self.log = prep.root / "prepare.log"
        self.timing_file = prep.root / "prepare.json"
        self.saved: dict[str, float] = (json.loads(self.timing_file.read_text())
                                        if self.timing_file.is_file() else {})

    def _record(self, need: str, seconds: float | None, path: Path) -> None:
        if seconds is not None:
            self.saved[need] = seconds
            self.timing_file.write_text(json.dumps(self.saved, indent=1))
        if need in self.saved:
            self.prep.timings[need] = self.saved[need]
        self.prep.artifacts[need] = str(path)

    def hf(self) -> None:
        if self.prep.source_format == "hf":
            self.prep.artifacts["hf"] = str(self.prep.source)
            return
        final = self.prep.root / "hf"
        secs = None
        if not (final / "config.json").is_file():
            t0 = time.perf_counter()
            _atomic_dir(final, lambda tmp: _run_logged(
                [sys.executable, "-c", _HF_FROM_GGUF, str(self.prep.source), str(tmp)], self.log))
            secs = time.perf_counter() - t0
        self._record("hf", secs, final)

    def gguf(self, precision: str) -> None:
        need = f"gguf:{precision}"
        if self.prep.source_format != "gguf":
            raise CheckpointError(f"{self.prep.source}: llama.cpp precisions need a GGUF source "
                                  "(export one with the edgeinfer GGUF writer)")
        if precision == "source":
            self.prep.artifacts[need] = str(self.prep.source)
            return
        final = self.prep.root / "gguf" / f"{self.prep.source.stem}.{precision}.gguf"
        secs = None
        if not final.is_file():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_suffix(".tmp")
            secs = _run_logged([sys.executable, "-c", _QUANTIZE, str(self.prep.source), str(tmp),
                                _QUANT_FTYPES[precision]], self.log)
            tmp.rename(final)
        self._record(need, secs, final)

    def genai(self, precision: str) -> None:
        need = f"genai:{precision}"
        self.hf()
        final = self.prep.root / f"genai-{precision}"
        secs = None
        if not (final / "genai_config.json").is_file():
            def build(tmp: Path) -> None:
                nonlocal secs
                cache = tmp / "_builder_cache"
                secs = _run_logged([sys.executable, "-m", "onnxruntime_genai.models.builder",
                                    "-i", self.prep.artifacts["hf"], "-o", str(tmp), "-p", precision,
                                    "-e", "cpu", "-c", str(cache)], self.log)
                shutil.rmtree(cache, ignore_errors=True)
            _atomic_dir(final, build)
        self._record(need, secs, final)

    def bundle(self) -> None:
        from ..models import BUNDLE_LAYOUT_REVISION

        final = self.prep.root / f"bundle-{BUNDLE_LAYOUT_REVISION}"
        secs = None
        if not (final / "manifest.json").is_file():
            from .edgeinfer_method import export_default_bundle  # the exporter, if present

            t0 = time.perf_counter()
            export_default_bundle(self.prep.source, final)
            secs = time.perf_counter() - t0
        self._record("bundle", secs, final)


def _step(builder: _Builder, need: str) -> None:
    kind, _, arg = need.partition(":")
    if kind == "hf":
        builder.hf()
    elif kind == "gguf":
        builder.gguf(arg)
    elif kind == "genai":
        builder.genai(arg)
    elif kind == "bundle":
        builder.bundle()
    else:
        raise CheckpointError(f"prepare: unknown artifact {need!r}")


def prepare_anchors(model: str, needs: list[str], bundle: str | None = None,
                    progress: Progress | None = None) -> Prepared:
    """Build (or find cached) every artifact in ``needs``; failures become notes.

    ``needs`` items: "hf", "gguf:<PREC>", "genai:<int4|fp32>", "bundle". The tokenizer (for the
    prompt ids) comes from the given bundle, else the HF folder made here.
    """
    source, fmt = resolve_source(model)
    slug = source.stem if fmt == "gguf" else source.name
    root = cache_dir() / "bench" / slug
    root.mkdir(parents=True, exist_ok=True)
    prep = Prepared(root=root, source=source, source_format=fmt)
    if bundle is not None:
        prep.artifacts["bundle"] = str(Path(bundle))
        needs = [n for n in needs if n != "bundle"]
    builder = _Builder(prep)
    order = sorted(set(needs), key=lambda n: (n != "hf", n))
    for i, need in enumerate(order):
        if progress:
            progress(i, len(order))
        try:
            _step(builder, need)
        except (EdgeInferError, ImportError, OSError, KeyError) as e:  # a note, never a crash
            prep.notes.append(f"prepare {need}: skipped ({type(e).__name__}: {e})")
    if progress:
        progress(len(order), len(order))
    prep.tokenizer = _tokenizer_info(prep, builder)
    return prep


def _tokenizer_info(prep: Prepared, builder: _Builder) -> dict[str, Any]:
    """tokenizer.json path + chat template + special ids, bundle first, else HF folder."""
    bundle = prep.artifacts.get("bundle")
    if bundle and (Path(bundle) / "manifest.json").is_file():
        from ..bundle import MANIFEST_FILE, Manifest

        m = Manifest.from_dict(json.loads((Path(bundle) / MANIFEST_FILE).read_text()))
        tmpl = (Path(bundle) / m.chat_template_file).read_text() if m.chat_template_file else None
        return {"tokenizer_json": str(Path(bundle) / m.tokenizer_file), "chat_template": tmpl,
                "bos_token_id": m.bos_token_id, "eos_token_ids": list(m.eos_token_ids),
                "add_bos_token": m.add_bos_token, "from": "bundle"}
    if "hf" not in prep.artifacts:
        try:
            builder.hf()
        except (CheckpointError, OSError) as e:
            raise CheckpointError(f"{prep.source}: no tokenizer for the prompts: no bundle and the "
                                  f"Hugging Face folder could not be made ({e})") from None
    hf = Path(prep.artifacts["hf"])
    meta = gguf_tokenizer_meta(prep.source) if prep.source_format == "gguf" else hf_tokenizer_meta(hf)
    return {"tokenizer_json": str(hf / "tokenizer.json"), "from": "hf", **meta}
