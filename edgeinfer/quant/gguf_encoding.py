"""GGUF (GGML) encodings of our weight formats: the type mapping and float32 -> GGML bytes.

Mapping from a :class:`~edgeinfer.quant.recipe.WeightFormat` to a GGML tensor type:

==========  =================================================================================
fp32        F32
fp16        F16
int8        Q8_0 (symmetric, blocks of 32, one fp16 scale per block)
int4        Q4_0 (symmetric, blocks of 32) by default; Q4_1 (asymmetric, blocks of 32) for an
            asymmetric recipe; Q4_K (blocks of 256 in 8 sub-blocks of 32, 6-bit sub-block
            scales and mins) when asked for with ``int4_type="q4_k"``
fp8         no GGML type holds E4M3 with float32 block scales: it falls back to Q8_0 (8 bits,
            blocks of 32), the closest format llama.cpp runs, and says so in the note
==========  =================================================================================

GGML's quant types have a *fixed* block size (32, or 256 for K-quants); a recipe's block size
only shapes our ONNX encodings, so a different block size is reported in the note, never
refused. Only tensors whose rows (last axis) are a multiple of the GGML block can be quantized:
:func:`encoding_for_shape` falls back (K-quant -> its block-32 sibling -> F16) for the rest,
while :func:`encode` raises :class:`QuantizationError` for a ragged tensor.

Encoders: gguf-py's ``gguf.quants.quantize`` (F32, F16, Q8_0, Q4_0, Q4_1; its Q8_0 / Q4_0 /
Q4_1 bytes equal ggml's own quantizer's, tests/test_quant_gguf_ggml.py) wherever it supports
the type; gguf 0.19 only *dequantizes* Q4_K, so :func:`quantize_q4_k` below is our own NumPy
encoder of the Q4_K block layout (as read by gguf-py's ``Q4_K.dequantize_blocks`` and ggml's
``block_q4_K``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from ..errors import QuantizationError
from .recipe import WeightFormat

GGMLType = GGMLQuantizationType
INT4_TYPES: dict[str, GGMLQuantizationType] = {
    "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1, "q4_k": GGMLType.Q4_K}
# Types this module can encode; gguf-py encodes all but Q4_K.
SUPPORTED_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
                   GGMLType.Q4_K)
QK_K = 256  # elements per K-quant super-block
_Q4_K_SUB = 32  # elements per Q4_K sub-block (8 per super-block)

# general.file_type of a GGUF whose large tensors are mostly of one type.
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLType.F32: LlamaFileType.ALL_F32, GGMLType.F16: LlamaFileType.MOSTLY_F16,
    GGMLType.Q8_0: LlamaFileType.MOSTLY_Q8_0, GGMLType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLType.Q4_1: LlamaFileType.MOSTLY_Q4_1, GGMLType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M}


@dataclass(frozen=True)
class GgufEncoding:
    """The GGML type a tensor is written as, and why it differs from the request (if it does)."""

    ggml_type: GGMLQuantizationType
    note: str | None = None

    @property
    def block_size(self) -> int:
        """Elements per GGML block (1 for F32/F16)."""
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per GGML block."""
        return GGML_QUANT_SIZES[self.ggml_type][1]

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of this (NumPy-order) shape can be stored in this type."""
        return len(shape) > 0 and shape[-1] % self.block_size == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of this (NumPy-order) shape in this type."""
        if not self.fits(shape):
            raise QuantizationError(
                f"{self.ggml_type.name}: row length {shape[-1] if shape else 0} is not a multiple "
                f"of its block size {self.block_size}")
        n = int(np.prod(shape, dtype=np.int64))
        return n // self.block_size * self.type_size


def encoding_for_format(fmt: WeightFormat | str, *, block_size: int = 32, symmetric: bool = True,
                        int4_type: str | None = None) -> GgufEncoding:
    """The GGML type for our weight format (see the module docstring for the table).

    ``int4_type``: ``"q4_0"`` | ``"q4_1"`` | ``"q4_k"`` to override the int4 choice (None:
    Q4_0 if ``symmetric`` else Q4_1).
    """
    fmt = WeightFormat.parse(fmt)
    if int4_type is not None and int4_type.lower() not in INT4_TYPES:
        raise QuantizationError(
            f"gguf int4 type: {int4_type!r} is not one of {sorted(INT4_TYPES)}")
    if fmt is WeightFormat.FP32:
        return GgufEncoding(GGMLType.F32)
    if fmt is WeightFormat.FP16:
        return GgufEncoding(GGMLType.F16)
    notes = []
    if fmt is WeightFormat.INT8:
        t = GGMLType.Q8_0
        if not symmetric:
            notes.append("int8 is asymmetric in the recipe but GGUF Q8_0 is symmetric")
    elif fmt is WeightFormat.INT4:
        if int4_type is not None:
            t = INT4_TYPES[int4_type.lower()]
        else:
            t = GGMLType.Q4_0 if symmetric else GGMLType.Q4_1
    elif fmt is WeightFormat.FP8:
        t = GGMLType.Q8_0
        notes.append("fp8 has no GGUF type; written as Q8_0 (8-bit, blocks of 32)")
    else:  # pragma: no cover - WeightFormat is closed
        raise QuantizationError(f"format {fmt.value!r} has no GGUF encoding")
    native = GGML_QUANT_SIZES[t][0]
    if block_size != native and t is not GGMLType.Q4_K:
        notes.append(f"recipe block {block_size} -> GGUF {t.name} blocks of {native}")
    elif t is GGMLType.Q4_K and block_size != _Q4_K_SUB:
        notes.append(f"recipe block {block_size} -> Q4_K sub-blocks of {_Q4_K_SUB}")
    return GgufEncoding(t, "; ".join(notes) or None)


def encoding_for_shape(requested: GgufEncoding, shape: tuple[int, ...], *,
                       symmetric: bool = True) -> GgufEncoding:
    """The encoding a tensor of ``shape`` actually gets.

    1-D tensors (norms, biases) and anything whose rows are not a multiple of the GGML block
    fall back: Q4_K -> Q4_0 (Q4_1 if not ``symmetric``) when rows are a multiple of 32, else
    F16 (F32 for 1-D tensors). The returned note says what happened.
    """
    if requested.ggml_type in (GGMLType.F32, GGMLType.F16) and len(shape) >= 2:
        return requested
    if len(shape) < 2:
        return GgufEncoding(GGMLType.F32) if requested.ggml_type is not GGMLType.F32 else requested
    if requested.fits(shape):
        return requested
    row = shape[-1]
    fallbacks = []
    if requested.ggml_type is GGMLType.Q4_K:
        fallbacks.append(GGMLType.Q4_0 if symmetric else GGMLType.Q4_1)
    fallbacks.append(GGMLType.F16)
    for t in fallbacks:
        enc = GgufEncoding(t)
        if enc.fits(shape):
            why = (f"rows of {row} are not a multiple of {requested.ggml_type.name}'s block "
                   f"{requested.block_size}; written as {t.name}")
            note = "; ".join(n for n in (requested.note, why) if n)
            return GgufEncoding(t, note)
    raise AssertionError("F16 fits any shape")  # pragma: no cover


def encode(x: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """float32 [..., n] -> the tensor data GGUFWriter stores for ``ggml_type``.

    F32 -> float32 [..., n]; F16 -> float16 [..., n]; quantized types -> uint8
    [..., n // block * type_size] (GGML block layout, row by row).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if ggml_type not in SUPPORTED_TYPES:
        raise QuantizationError(f"GGUF type {ggml_type.name} is not supported, expected one of "
                                f"{[t.name for t in SUPPORTED_TYPES]}")
    if not np.isfinite(x).all():
        raise QuantizationError(f"{ggml_type.name}: tensor has NaN or infinite values")
    enc = GgufEncoding(ggml_type)
    if x.ndim == 0 or not enc.fits(x.shape):
        raise QuantizationError(
            f"{ggml_type.name}: cannot encode shape {x.shape}, the last axis must be a multiple "
            f"of {enc.block_size}")
    if ggml_type is GGMLType.F16:
        if np.abs(x).max(initial=0.0) > np.finfo(np.float16).max:
            raise QuantizationError("F16: tensor has values beyond the float16 range (65504)")
        return x.astype(np.float16)
    if ggml_type is GGMLType.Q4_K:
        return quantize_q4_k(x)
    return np.asarray(gguf_quants.quantize(x, ggml_type))


# -- Q4_K ---------------------------------------------------------------------------------
# Block layout (144 bytes per 256 values), as read by gguf-py's Q4_K.dequantize_blocks:
#   d     fp16     super-block scale of the sub-block scales
#   dmin  fp16     super-block scale of the sub-block mins
#   scales[12]     8 six-bit scales sc[j] and 8 six-bit mins m[j]:
#                  byte j   (j<4) = sc[j] | (sc[j+4] >> 4) << 6
#                  byte 4+j (j<4) = m[j]  | (m[j+4]  >> 4) << 6
#                  byte 8+j (j<4) = (sc[j+4] & 15) | (m[j+4] & 15) << 4
#   qs[128]        4-bit codes; byte 32*c + l holds sub-block 2c's element l in its low
#                  nibble and sub-block 2c+1's element l in its high nibble
# value = d*sc[j] * q - dmin*m[j]
# Our encoder follows the idea of ggml's reference (not its code): per sub-block, try 21
# candidate steps around (max - min) / 15, refit scale and offset of each candidate's codes by
# least squares (offset <= 0), keep the lowest squared error; then round the sub-block
# scales and mins onto the 6-bit grids of the fp16 super-block scales and re-derive the codes.
# Measured RMS error equals ggml's quantize_row_q4_K_ref within 1% on Gaussian, uniform and
# heavy-tailed data (tests/test_quant_gguf_ggml.py); lower than Q4_1's on zero-centred data
# (Q4_K's offset is tied to min(x, 0), so all-positive blocks are its weak case).


@dataclass(frozen=True)
class Q4KFields:
    """The unpacked contents of Q4_K blocks: B super-blocks of 8 sub-blocks of 32."""

    d: np.ndarray  # float16 [B]
    dmin: np.ndarray  # float16 [B]
    sc: np.ndarray  # uint8 [B, 8], 0..63
    m: np.ndarray  # uint8 [B, 8], 0..63
    q: np.ndarray  # uint8 [B, 8, 32], 0..15

    def values(self) -> np.ndarray:
        """The values these fields represent: float32 [B, 256] (the encoder's intent)."""
        d = self.d.astype(np.float32)[:, None] * self.sc.astype(np.float32)
        dm = self.dmin.astype(np.float32)[:, None] * self.m.astype(np.float32)
        v = d[..., None] * self.q.astype(np.float32) - dm[..., None]
        return v.reshape(len(self.d), QK_K)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b > 0, else 0."""
    ok = b > 0
    return np.where(ok, a / np.where(ok, b, 1), 0).astype(np.float32)


def _codes(sub: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """4-bit codes of sub [..., 32] on the grid -offset + step * q, q in 0..15."""
    return np.clip(np.rint(_safe_div(sub + offset[..., None], step[..., None])), 0, 15)


def _fit_sub_blocks(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best (step >= 0, offset >= 0) per sub-block of sub [B, 8, 32], values ~ step*q - offset."""
    n = sub.shape[-1]
    lo = np.minimum(sub.min(axis=-1), 0.0)
    width = sub.max(axis=-1) - lo
    best_step, best_off = width / 15, -lo

    def sse(step: np.ndarray, off: np.ndarray) -> np.ndarray:
        q = _codes(sub, step, off)
        return ((step[..., None] * q - off[..., None] - sub) ** 2).sum(axis=-1)

    best = sse(best_step, best_off)
    sx = sub.sum(axis=-1)
    for k in np.linspace(-1.0, 1.0, 21):
        q = np.clip(np.rint(_safe_div(15 + k, width)[..., None] * (sub - lo[..., None])), 0, 15)
        sq, sqq, sqx = q.sum(axis=-1), (q * q).sum(axis=-1), (q * sub).sum(axis=-1)
        step = _safe_div(n * sqx - sq * sx, n * sqq - sq * sq)  # least squares: x ~ step*q + b
        b = (sx - step * sq) / n
        pos = b > 0  # the offset must stay <= 0: refit the step alone
        step = np.maximum(np.where(pos, _safe_div(sqx, sqq), step), 0.0)
        off = np.where(pos, 0.0, -b)
        err = sse(step, off)
        better = err < best
        best = np.where(better, err, best)
        best_step = np.where(better, step, best_step)
        best_off = np.where(better, off, best_off)
    return best_step.astype(np.float32), best_off.astype(np.float32)


def _fp16_scale(v: np.ndarray) -> np.ndarray:
    h = v.astype(np.float16)
    if not np.isfinite(h).all():
        raise QuantizationError("Q4_K: block scale beyond the float16 range")
    return h


def q4_k_fields(x: np.ndarray) -> Q4KFields:
    """Quantize float32 [..., n] (n % 256 == 0) into Q4_K fields, super-blocks in row order."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise QuantizationError(f"Q4_K: row length must be a multiple of {QK_K}, got shape {x.shape}")
    sub = x.reshape(-1, QK_K // _Q4_K_SUB, _Q4_K_SUB)  # [B, 8, 32]
    step, off = _fit_sub_blocks(sub)  # [B, 8] each
    d = _fp16_scale(step.max(axis=-1) / 63)  # [B]
    dmin = _fp16_scale(off.max(axis=-1) / 63)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(_safe_div(step, d32)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(off, dmin32)), 0, 63).astype(np.uint8)
    q = _codes(sub, d32 * sc, dmin32 * m).astype(np.uint8)
    return Q4KFields(d=d, dmin=dmin, sc=sc, m=m, q=q)


def pack_q4_k(f: Q4KFields) -> np.ndarray:
    """Q4_K fields -> uint8 [B, 144] blocks."""
    b = len(f.d)
    sc, m = f.sc, f.m
    scales = np.empty((b, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = f.q.reshape(b, 4, 2, _Q4_K_SUB)  # [B, chunk, low/high, 32]
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(b, 128)
    return np.concatenate([f.d.reshape(b, 1).view(np.uint8), f.dmin.reshape(b, 1).view(np.uint8),
                           scales, qs], axis=1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] (n % 256 == 0) -> uint8 [..., n // 256 * 144] Q4_K blocks."""
    x = np.asarray(x, dtype=np.float32)
    blocks = pack_q4_k(q4_k_fields(x))
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)


def dequantize(data: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """GGML tensor data -> float32 [..., n], via gguf-py (the reader side of the format)."""
    return np.asarray(gguf_quants.dequantize(np.asarray(data), ggml_type), dtype=np.float32)
