"""The bundle: what export writes and every runtime loads.

A bundle is a directory::

    manifest.json            this schema (versioned), validated on load
    tokenizer.json           a `tokenizers` JSON document
    chat_template.jinja      optional
    target/model.onnx (+ model.onnx.data)   the tree-verifiable graph (DESIGN.md section 3)
    target/layers/...        optional per-layer shards for offloading
    target/model.gguf        optional, for llama.cpp
    target/recycle_prior.i32 optional, Token Recycling's prior (runtime/recycle_prior.py)
    draft/...                the same for the draft

The manifest is plain JSON so that a runtime in another language can read it. Every file it
names has a size and a SHA-256; ``load_manifest(verify=True)`` checks them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import BundleError
from .spec import ModelSpec

FORMAT_NAME = "edgeinfer-bundle"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
ROLES = ("target", "draft")
# Graph metadata (ONNX metadata_props) naming a whole-model graph's KV layout: KV_IN_PLACE means
# present_key/value.{i} are the cache buffer itself, bound to the same memory as past_key/value.{i},
# with attention_bias [1, 1, n, total] over the valid positions only (export/onnx_layers.py
# GraphOptions.kv_in_place); absent, they hold only the n new nodes' K/V and attention_bias spans
# the whole bound past + n.
KV_LAYOUT_KEY = "edgeinfer.kv_layout"
KV_IN_PLACE = "in_place"


# How finely a target's layer shards are cut (export/onnx_shards.py): one shard per layer, its
# attention and MLP blocks, or about one weight matrix each. The manifest's "shards.layers"
# lists a path per layer, or a list of paths (the parts, in the order they run).
SHARD_SPLITS = ("layer", "block", "matrix")


def kv_in_place(metadata: Mapping[str, str]) -> bool:
    """Whether a graph's metadata (onnxruntime's custom_metadata_map, or ONNX metadata_props as
    a dict) names the in-place KV layout."""
    return metadata.get(KV_LAYOUT_KEY) == KV_IN_PLACE


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle root, forward slashes
    bytes: int
    sha256: str


@dataclass(frozen=True)
class RecyclePriorEntry:
    """Token Recycling's prior table (runtime/recycle_prior.py defines the file): ``file``
    relative to the bundle root, ``k`` ids per vocabulary token, and the ``context`` (token ids)
    every token was branched from when it was computed."""

    file: str
    k: int
    context: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "k": self.k, "context": list(self.context)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "RecyclePriorEntry":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object with 'file', 'k' and 'context'")
        f, k, ctx = d.get("file"), d.get("k"), d.get("context")
        if not isinstance(f, str) or not f:
            raise BundleError(f"{where}.file: expected a relative path, got {f!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise BundleError(f"{where}.k: expected a positive integer, got {k!r}")
        if not isinstance(ctx, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                for t in ctx):
            raise BundleError(f"{where}.context: expected a list of token ids, got {ctx!r}")
        return cls(f, k, tuple(ctx))


@dataclass(frozen=True)
class ModelEntry:
    """One model (target or draft) of a bundle."""

    spec: ModelSpec
    quant: dict[str, Any]  # the QuantRecipe as a dict (edgeinfer.quant.recipe)
    onnx: str | None  # relative path of the full tree-verify graph
    gguf: str | None = None
    shards: dict[str, Any] | None = None  # {"embed": path, "layers": [path or [paths]], "head": path}
    source: dict[str, Any] = field(default_factory=dict)  # {"name": basename, "format": "gguf"|"hf", ...}
    graph_inputs: tuple[str, ...] = ()  # names of the graph's non-KV inputs
    recycle_prior: RecyclePriorEntry | None = None  # Token Recycling's prior (target only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "quant": self.quant,
            "onnx": self.onnx,
            "gguf": self.gguf,
            "shards": self.shards,
            "source": self.source,
            "graph_inputs": list(self.graph_inputs),
            **({"recycle_prior": self.recycle_prior.to_dict()} if self.recycle_prior else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "ModelEntry":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object")
        for key in ("spec", "quant", "onnx"):
            if key not in d:
                raise BundleError(f"{where}: missing field {key!r}")
        try:
            spec = ModelSpec.from_dict(d["spec"], where=f"{where}.spec")
        except Exception as e:  # CheckpointError from the spec validator
            raise BundleError(str(e)) from None
        return cls(spec=spec, quant=dict(d["quant"]), onnx=d["onnx"], gguf=d.get("gguf"),
                   shards=d.get("shards"), source=dict(d.get("source") or {}),
                   graph_inputs=tuple(d.get("graph_inputs") or ()),
                   recycle_prior=None if d.get("recycle_prior") is None else
                   RecyclePriorEntry.from_dict(d["recycle_prior"], f"{where}.recycle_prior"))


@dataclass(frozen=True)
class Manifest:
    models: dict[str, ModelEntry]  # "target" and optionally "draft"
    tokenizer_file: str = "tokenizer.json"
    chat_template_file: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos_token: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    created_by: str = ""
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "created_by": self.created_by,
            "tokenizer": {
                "file": self.tokenizer_file,
                "chat_template_file": self.chat_template_file,
                "bos_token_id": self.bos_token_id,
                "eos_token_ids": list(self.eos_token_ids),
                "pad_token_id": self.pad_token_id,
                "add_bos_token": self.add_bos_token,
            },
            "generation": self.generation,
            "models": {k: v.to_dict() for k, v in self.models.items()},
            "files": [asdict(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_FILE) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: field 'format' must be {FORMAT_NAME!r}")
        version = d.get("version")
        if version != MANIFEST_VERSION:
            raise BundleError(
                f"{where}: unknown manifest version {version!r} (this edgeinfer reads version {MANIFEST_VERSION})")
        tok = d.get("tokenizer")
        if not isinstance(tok, dict) or "file" not in tok:
            raise BundleError(f"{where}: missing field 'tokenizer.file'")
        models = d.get("models")
        if not isinstance(models, dict) or "target" not in models:
            raise BundleError(f"{where}: field 'models' must contain a 'target'")
        unknown = set(models) - set(ROLES)
        if unknown:
            raise BundleError(f"{where}: unknown model role(s) {sorted(unknown)}, expected {ROLES}")
        try:
            files = tuple(FileEntry(**f) for f in d.get("files", []))
        except TypeError as e:
            raise BundleError(f"{where}: malformed 'files' entry ({e})") from None
        return cls(
            models={k: ModelEntry.from_dict(v, f"{where}: models.{k}") for k, v in models.items()},
            tokenizer_file=tok["file"],
            chat_template_file=tok.get("chat_template_file"),
            bos_token_id=tok.get("bos_token_id"),
            eos_token_ids=tuple(tok.get("eos_token_ids") or ()),
            pad_token_id=tok.get("pad_token_id"),
            add_bos_token=bool(tok.get("add_bos_token", False)),
            generation=dict(d.get("generation") or {}),
            files=files,
            created_by=str(d.get("created_by", "")),
            version=version,
        )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path) -> tuple[FileEntry, ...]:
    """Size and SHA-256 of every file under ``root`` except the manifest itself."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            out.append(FileEntry(p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p)))
    return tuple(out)


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_text(root / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")


def load_manifest(root: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and validate ``root/manifest.json``; with ``verify``, check every file's size and
    SHA-256 (sizes always)."""
    root = Path(root)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (is {root} an edgeinfer bundle?)")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    manifest = Manifest.from_dict(data, where=str(mpath))
    listed = {f.path for f in manifest.files}
    needed = ([manifest.tokenizer_file] + [m.onnx for m in manifest.models.values() if m.onnx]
              + [m.recycle_prior.file for m in manifest.models.values() if m.recycle_prior])
    for rel in needed:
        if rel not in listed:
            raise BundleError(f"{mpath}: file {rel!r} is used but not listed in 'files'")
    for f in manifest.files:
        p = root / f.path
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle (listed in manifest.json)")
        size = p.stat().st_size
        if size != f.bytes:
            raise BundleError(f"{p}: size {size} bytes, manifest.json says {f.bytes}")
        if verify and sha256_file(p) != f.sha256:
            raise BundleError(f"{p}: checksum mismatch (sha256 differs from manifest.json)")
    return manifest


# -- atomic writes --------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it is renamed to ``final``.

    On any exception the temporary directory is removed, so an interrupted export never
    leaves something that looks like a bundle. ``final`` must not exist unless
    ``overwrite`` (then the old directory is replaced only after the new one is complete).
    """
    final = Path(final)
    parent = final.parent if str(final.parent) else Path(".")
    if final.exists() and not overwrite:
        raise BundleError(f"{final}: already exists (pass overwrite/--force to replace it)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.partial-"))
    except OSError as e:
        raise BundleError(f"{final}: cannot write output here ({e.strerror})") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
