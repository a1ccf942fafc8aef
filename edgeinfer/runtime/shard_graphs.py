"""Shard graphs for offloading: each shard rewritten so that its weights are graph inputs.

Each shard graph (docs/TEAM_NOTES.md contract, split per layer by export/onnx_shards.py) is
read without its weights and rewritten once: its external-data initializers become inputs
``weight.{k}`` (small float initializers stored in the graph become ``inline.{k}``), and every
other name is made position-based, so that shards differing only in names and weight values
(every decoder layer of a model, usually) serialise identically and share ONE onnxruntime
session. The runtime binds the weights from its own buffers (shard_io.py).

Two shapes of graph get special treatment: an embedding that is a plain ``Gather`` on
``input_ids`` (its table can be bound as just the rows a pass needs), and an LM head whose one
big matmul can be cut out (:class:`HeadSplit`) so that the head's weight is read in row slices.

Needs ``onnx`` (to read and rewrite the graphs) in addition to onnxruntime.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError, ShardError

ALIGN = 4096  # O_DIRECT alignment of file offsets, lengths and buffer addresses
# Inputs every graph gets from the runner (not from the previous graph or the weights).
STANDARD_INPUTS = ("input_ids", "position_ids", "attention_bias", "attention_bias_sliding", "logits_index")
_FLOAT_TYPES = (1, 10, 11, 16)  # onnx FLOAT, FLOAT16, DOUBLE, BFLOAT16
_LAYER_SUFFIX = re.compile(r"^(past_key|past_value|present_key|present_value)\.\d+$")


@dataclass(frozen=True)
class TensorRef:
    """One weight of a shard: where it lies in the shard's data file."""

    input_name: str  # the graph input it is bound to ("weight.3")
    source_name: str  # its initializer name in the shard ("layers.3.mlp.up_proj.weight.T")
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # bytes into the data file
    length: int


@dataclass
class ShardGraph:
    """One shard, rewritten: ``model_bytes`` is a graph whose weights are the inputs
    ``weight.{k}``; ``signature`` is equal for shards that can share a session."""

    path: Path
    data_path: Path | None
    tensors: list[TensorRef]
    model_bytes: bytes
    signature: str
    inputs: list[str] = field(default_factory=list)  # canonical non-weight input names
    outputs: list[str] = field(default_factory=list)  # canonical output names
    span: tuple[int, int] = (0, 0)  # aligned [start, end) of the data file holding all tensors
    inline: dict[str, np.ndarray] = field(default_factory=dict)  # small float weights kept in the graph

    @property
    def nbytes(self) -> int:
        return self.span[1] - self.span[0]


def _canonical(name: str) -> str:
    m = _LAYER_SUFFIX.match(name)
    return m.group(1) if m else name


def load_shard_graph(path: Path, symbolic_rows: frozenset[str] = frozenset()) -> ShardGraph:
    """Read ``path`` (not its weights) and rewrite it as described in the module docstring.
    Weights named in ``symbolic_rows`` (``weight.{k}``) get a free first dimension, so that a
    row slice of them can be bound (a gathered embedding, a chunk of the LM head)."""
    try:
        import onnx
        from onnx import helper
    except ImportError:  # pragma: no cover - onnx is part of the export extra
        raise BundleError("offloading reads shard graphs with the 'onnx' package: pip install onnx") from None
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard graph is missing")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ShardError(f"{path}: not a readable ONNX graph ({e})") from None
    g = model.graph
    tensors: list[TensorRef] = []
    keep = []
    locations = set()
    rename: dict[str, str] = {}
    inline: dict[str, np.ndarray] = {}
    for t in g.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            if t.data_type in _FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > 1:
                # a small float weight stored in the graph (a norm of a tiny model): an input
                # too, so that layers differing only in it still share one session
                rename[t.name] = f"inline.{len(inline)}"
                inline[rename[t.name]] = onnx.numpy_helper.to_array(t)
            else:
                keep.append(t)
            continue
        info = {e.key: e.value for e in t.external_data}
        locations.add(info.get("location"))
        k = len(tensors)
        rename[t.name] = f"weight.{k}"
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        length = int(info.get("length", 0)) or int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
        tensors.append(TensorRef(f"weight.{k}", t.name, dtype, tuple(int(d) for d in t.dims),
                                 int(info.get("offset", 0)), length))
    if len(locations) > 1:
        raise ShardError(f"{path}: weights spread over several data files {sorted(locations)}; "
                         "a shard must have one")
    data_path = path.parent / locations.pop() if locations else None
    # Small inline constants, every intermediate value and every node get position-based names,
    # so that shards differing only in names (layer 3 vs layer 4) serialise identically.
    weights = {t.source_name for t in tensors} | {t.name for t in g.initializer if t.name in rename}
    graph_inputs = [v for v in g.input if v.name not in weights]  # old IR lists initializers too
    io_names = {v.name for v in graph_inputs + list(g.output)}
    for k, t in enumerate(keep):
        rename[t.name] = f"const.{k}"
    for v in graph_inputs + list(g.output):
        rename.setdefault(v.name, _canonical(v.name))
    counter = 0
    for node in g.node:
        for name in list(node.input) + list(node.output):
            if name and name not in rename and name not in io_names:
                rename[name] = f"v.{counter}"
                counter += 1
    for k, node in enumerate(g.node):
        node.name = f"n.{k}"
        node.input[:] = [rename.get(n, n) if n else n for n in node.input]
        node.output[:] = [rename.get(n, n) if n else n for n in node.output]
    for t in keep:
        t.name = rename[t.name]
    del g.input[:]
    g.input.extend(graph_inputs)
    for v in list(g.input) + list(g.output):
        v.name = rename.get(v.name, v.name)
    for k, v in enumerate(g.output):  # output sizes may change (a head run on a row chunk)
        for j, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                d.dim_param = f"out{k}_{j}"
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    inputs = [v.name for v in g.input]
    for name, value in inline.items():
        g.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
    for ref in tensors:
        shape: list[int | str] = list(ref.shape)
        if ref.input_name in symbolic_rows and shape:
            shape[0] = "rows"
        g.input.append(helper.make_tensor_value_info(
            ref.input_name, helper.np_dtype_to_tensor_dtype(ref.dtype), shape))
    g.name = "shard"
    model.doc_string = ""
    data = model.SerializeToString()
    start = min((r.offset for r in tensors), default=0) // ALIGN * ALIGN
    end = -(-max((r.offset + r.length for r in tensors), default=0) // ALIGN) * ALIGN
    return ShardGraph(path, data_path, tensors, data, hashlib.sha256(data).hexdigest(),
                      inputs=inputs, outputs=[v.name for v in g.output], span=(start, end), inline=inline)


# -- weights that can be read in row slices ---------------------------------------------------

_ROW_SAFE_OPS = {"Unsqueeze", "Identity", "Div", "Mul", "Tanh", "Cast", "Add", "Sub"}
_SHAPE_OPS = {"Unsqueeze", "Identity"}  # a tail of only these changes no value (a copy per pass saved)


def _consumers(model, name: str) -> list:
    return [n for n in model.graph.node if name in n.input]


def row_gather_weight(graph: ShardGraph) -> str | None:
    """The weight input read only by ``Gather(weight, input_ids, axis=0)``: an embedding table
    whose rows can be read one by one (bound as a table of just the rows a pass needs)."""
    import onnx

    model = onnx.load_from_string(graph.model_bytes)
    for ref in graph.tensors:
        users = _consumers(model, ref.input_name)
        if users and len(ref.shape) == 2 and all(
                n.op_type == "Gather" and list(n.input) == [ref.input_name, "input_ids"]
                and all(a.i == 0 for a in n.attribute if a.name == "axis") for n in users):
            return ref.input_name
    return None


@dataclass
class HeadSplit:
    """An LM head cut around its one big matmul ``Y = A @ W`` so that W can be read in
    contiguous row slices: ``pre`` computes A (the normed hidden states), the runtime multiplies
    by W slice by slice, ``tail`` (None: Y is the output) applies what follows (e.g. softcap).

    layout "kn": W is [K, N] (MatMul): row slices of W are slices of K, partial products add up.
    layout "nk": W is [N, K] (Gemm transB=1): row slices of W give column slices of Y."""

    weight: str  # the weight input name (``weight.{k}``)
    layout: str  # "kn" | "nk"
    pre: bytes  # graph: the original inputs -> "head_matmul_a"
    tail: bytes | None  # graph: "head_matmul_y" -> the original outputs


def split_head(graph: ShardGraph) -> HeadSplit | None:
    """Cut ``graph`` (a rewritten head shard) as :class:`HeadSplit` describes, or None when its
    largest weight is not a plain float MatMul/Gemm operand followed by element-wise ops."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(graph.model_bytes)
    g = model.graph
    consts = {t.name for t in g.initializer}
    big = max(graph.tensors, key=lambda r: r.length, default=None)
    if big is None or len(big.shape) != 2 or big.dtype.kind != "f":
        return None
    users = _consumers(model, big.input_name)
    if len(users) != 1:
        return None
    mm = users[0]
    attrs = {a.name: a.i for a in mm.attribute if a.type == onnx.AttributeProto.INT}
    if mm.op_type == "MatMul" and list(mm.input)[1:] == [big.input_name]:
        layout = "kn"
    elif (mm.op_type == "Gemm" and list(mm.input)[1:] == [big.input_name] and attrs.get("transA", 0) == 0
          and float(next((a.f for a in mm.attribute if a.name == "alpha"), 1.0)) == 1.0):
        layout = "nk" if attrs.get("transB", 0) == 1 else "kn"
    else:
        return None
    a_name, y_name = mm.input[0], mm.output[0]
    outputs = {v.name for v in g.output}
    tail_nodes, frontier = [], [y_name]
    while frontier:
        value = frontier.pop()
        for n in _consumers(model, value):
            others = [i for i in n.input if i != value and i]
            if n.op_type not in _ROW_SAFE_OPS or any(o not in consts for o in others):
                return None
            if n not in tail_nodes:
                tail_nodes.append(n)
                frontier += list(n.output)
    if y_name not in outputs and not tail_nodes:
        return None
    keep = [n for n in g.node if n is not mm and n not in tail_nodes]
    if tail_nodes and all(n.op_type in _SHAPE_OPS for n in tail_nodes) and len(g.output) == 1:
        tail_nodes = []  # only a reshape to [1, m, vocab]: the runner's logits [m, vocab] are that
    keep.append(helper.make_node("Identity", [a_name], ["head_matmul_a"], name="n.head_matmul_a"))
    pre = onnx.ModelProto()
    pre.CopyFrom(model)
    del pre.graph.node[:]
    pre.graph.node.extend(keep)
    del pre.graph.output[:]
    pre.graph.output.append(helper.make_tensor_value_info("head_matmul_a", onnx.TensorProto.FLOAT, None))
    ins = [v for v in pre.graph.input if v.name != big.input_name]
    del pre.graph.input[:]
    pre.graph.input.extend(ins)
    tail = None
    if tail_nodes:
        used = {i for n in tail_nodes for i in n.input}
        t = onnx.ModelProto()
        t.CopyFrom(model)
        del t.graph.node[:]
        t.graph.node.extend(tail_nodes)
        del t.graph.input[:]
        t.graph.input.append(helper.make_tensor_value_info(y_name, onnx.TensorProto.FLOAT, None))
        inits = [x for x in t.graph.initializer if x.name in used]
        del t.graph.initializer[:]
        t.graph.initializer.extend(inits)
        for n in t.graph.node:
            n.input[:] = ["head_matmul_y" if i == y_name else i for i in n.input]
        t.graph.input[0].name = "head_matmul_y"
        tail = t.SerializeToString()
    return HeadSplit(big.input_name, layout, pre.SerializeToString(), tail)


def head_matmul_graph(layout: str) -> bytes:
    """``y = a @ w`` (layout "kn", w [k, N]) or ``y = a @ w.T`` ("nk", w [rows, K]) for one
    slice of a split head; a is float32 [m, K or k]."""
    import onnx
    from onnx import helper

    f = onnx.TensorProto.FLOAT
    if layout == "kn":
        node = helper.make_node("MatMul", ["a", "w"], ["y"], name="n.0")
    else:
        node = helper.make_node("Gemm", ["a", "w"], ["y"], name="n.0", transB=1)
    g = helper.make_graph([node], "head_slice", [helper.make_tensor_value_info("a", f, ["m", "k"]),
                                                 helper.make_tensor_value_info("w", f, ["r", "c"])],
                          [helper.make_tensor_value_info("y", f, ["m", "n"])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


# -- the stream index: the rewritten graphs stored ahead of time -------------------------------
#
# Rewriting a shard (load_shard_graph, row_gather_weight, split_head, head_matmul_graph) needs
# the onnx package, whose import alone holds ~11 MiB of a process (measured: Python objects
# and its C extension), a large share of a tight memory budget and a package the runtime
# otherwise does without. The export therefore writes the rewritten form next to the shards:
#
#   <dir>/stream.json               this index (STREAM_INDEX_FORMAT, version)
#   <dir>/graphs/<sha256>.onnx      every distinct rewritten graph once, named by its SHA-256
#                                   (the layers of a model share a handful)
#
# stream.json: {"format", "version", "embed": its shard path, "shards": {bundle-relative shard
# path: record},
# "embed_rows": record | null (the embed shard with a free row dimension for row gathers),
# "gather_weight": name | null, "head_split": {"weight", "layout", "pre", "tail"} | null,
# "head_matmul": sha | null}; a record is {"graph": sha, "data": data file name | null,
# "tensors": [{"input", "source", "dtype", "shape", "offset", "length"}], "inputs", "outputs",
# "span", "inline": {name: {"dtype", "shape", "values"}}}. Bundles without it are rewritten
# at load, as before.

STREAM_INDEX_FORMAT = "edgeinfer-stream-index"
STREAM_INDEX_VERSION = 1
STREAM_INDEX_FILE = "stream.json"


@dataclass
class StreamIndex:
    """The rewritten shard graphs of one target, keyed by bundle-relative shard path."""

    path: Path
    shards: dict[str, ShardGraph]
    embed_rows: ShardGraph | None
    gather_weight: str | None
    head_split: HeadSplit | None
    head_matmul: bytes | None

    def shard(self, root: Path, shard_path: Path) -> ShardGraph:
        key = Path(shard_path).relative_to(root).as_posix()
        try:
            return self.shards[key]
        except KeyError:
            raise ShardError(f"{self.path}: no entry for shard {key} (the index does not match the "
                             "manifest's shards; export the bundle again)") from None


def _record(graph: ShardGraph, graphs: dict[str, bytes]) -> dict:
    graphs[graph.signature] = graph.model_bytes
    return {"graph": graph.signature,
            "data": graph.data_path.relative_to(graph.path.parent).as_posix() if graph.data_path is not None else None,
            "tensors": [{"input": r.input_name, "source": r.source_name, "dtype": r.dtype.name,
                         "shape": list(r.shape), "offset": r.offset, "length": r.length} for r in graph.tensors],
            "inputs": list(graph.inputs), "outputs": list(graph.outputs), "span": list(graph.span),
            "inline": {k: {"dtype": v.dtype.name, "shape": list(v.shape), "values": v.reshape(-1).tolist()}
                       for k, v in graph.inline.items()}}


def _put(graphs: dict[str, bytes], data: bytes | None) -> str | None:
    if data is None:
        return None
    sha = hashlib.sha256(data).hexdigest()
    graphs[sha] = data
    return sha


def write_stream_index(root: Path, embed: Path, layers: list[Path], head: Path, out_dir: Path) -> str:
    """Rewrite every shard (needs onnx) and write the index and its graphs under ``out_dir``;
    returns the index path relative to ``root`` (the bundle root), for the manifest."""
    import json

    root, out_dir = Path(root), Path(out_dir)
    graphs: dict[str, bytes] = {}
    shards: dict[str, dict] = {}

    def rel(p: Path) -> str:
        return Path(p).relative_to(root).as_posix()

    emb = load_shard_graph(embed)
    gather = row_gather_weight(emb)
    embed_rows = load_shard_graph(embed, frozenset({gather})) if gather is not None else None
    hd = load_shard_graph(head)
    split = split_head(hd)
    for p, g in [(embed, emb), (head, hd)] + [(p, load_shard_graph(p)) for p in layers]:
        shards[rel(p)] = _record(g, graphs)
    index = {
        "format": STREAM_INDEX_FORMAT, "version": STREAM_INDEX_VERSION, "embed": rel(embed), "shards": shards,
        "embed_rows": _record(embed_rows, graphs) if embed_rows is not None else None,
        "gather_weight": gather,
        "head_split": None if split is None else {"weight": split.weight, "layout": split.layout,
                                                  "pre": _put(graphs, split.pre), "tail": _put(graphs, split.tail)},
        "head_matmul": _put(graphs, head_matmul_graph(split.layout)) if split is not None else None,
    }
    (out_dir / "graphs").mkdir(parents=True, exist_ok=True)
    for sha, data in graphs.items():
        (out_dir / "graphs" / f"{sha}.onnx").write_bytes(data)
    (out_dir / STREAM_INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return rel(out_dir / STREAM_INDEX_FILE)


def load_stream_index(root: Path, rel_path: str) -> StreamIndex:
    """Read an index written by :func:`write_stream_index` (no onnx needed). Raises
    ShardError naming the file and field on anything missing, unknown or inconsistent."""
    import json

    root = Path(root)
    path = root / rel_path
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ShardError(f"{path}: cannot read the stream index ({e.strerror or e})") from None
    except ValueError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != STREAM_INDEX_FORMAT:
        raise ShardError(f"{path}: 'format' must be {STREAM_INDEX_FORMAT!r}")
    if d.get("version") != STREAM_INDEX_VERSION:
        raise ShardError(f"{path}: unknown 'version' {d.get('version')!r}, this edgeinfer reads "
                         f"version {STREAM_INDEX_VERSION}")
    cache: dict[str, bytes] = {}

    def graph(sha: object, where: str) -> bytes:
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ShardError(f"{path}: {where} must name a graph by its SHA-256, got {sha!r}")
        if sha not in cache:
            gp = path.parent / "graphs" / f"{sha}.onnx"
            try:
                data = gp.read_bytes()
            except OSError:
                raise ShardError(f"{gp}: graph named in {path} ({where}) is missing") from None
            if hashlib.sha256(data).hexdigest() != sha:
                raise ShardError(f"{gp}: contents do not match its name (SHA-256); the file is corrupt")
            cache[sha] = data
        return cache[sha]

    def record(shard_path: Path, r: object, where: str) -> ShardGraph:
        try:
            tensors = [TensorRef(t["input"], t["source"], np.dtype(t["dtype"]), tuple(int(x) for x in t["shape"]),
                                 int(t["offset"]), int(t["length"])) for t in r["tensors"]]
            inline = {k: np.asarray(v["values"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])
                      for k, v in r["inline"].items()}
            data = shard_path.parent / r["data"] if r["data"] is not None else None
            span = (int(r["span"][0]), int(r["span"][1]))
            model = graph(r["graph"], f"{where}.graph")
            return ShardGraph(shard_path, data, tensors, model, r["graph"], inputs=list(r["inputs"]),
                              outputs=list(r["outputs"]), span=span, inline=inline)
        except ShardError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ShardError(f"{path}: {where} is malformed ({type(e).__name__}: {e})") from None

    try:
        shards = {k: record(root / k, r, f"shards[{k!r}]") for k, r in d["shards"].items()}
        rows = d["embed_rows"]
        embed_rows = record(root / d["embed"], rows, "embed_rows") if rows is not None else None
        hs = d["head_split"]
        split = None if hs is None else HeadSplit(
            hs["weight"], hs["layout"], graph(hs["pre"], "head_split.pre"),
            graph(hs["tail"], "head_split.tail") if hs["tail"] is not None else None)
        if split is not None and split.layout not in ("kn", "nk"):
            raise ShardError(f"{path}: head_split.layout must be 'kn' or 'nk', got {split.layout!r}")
        mm = graph(d["head_matmul"], "head_matmul") if d["head_matmul"] is not None else None
        gather = d["gather_weight"]
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from None
    if (split is None) != (mm is None) or (gather is None) != (embed_rows is None):
        raise ShardError(f"{path}: head_split/head_matmul and gather_weight/embed_rows must be given together")
    return StreamIndex(path, shards, embed_rows, gather, split, mm)
