"""Block-wise INT4 / INT8 / FP8 weight quantization: the one definition of each format.

A linear weight ``W`` float32 ``[N=out, K=in]`` (Hugging Face layout, ``y = x @ W.T``) is cut
into blocks of ``block_size`` consecutive elements along K; the last block of a row is padded
with zeros when K is not a multiple of the block size (the padding never changes a scale, a
zero point or a stored code of a real element).

Integer formats follow onnxruntime's own quantizer (``quantize_matmul_{4,8}bits``, MLAS
``BlockwiseQuantizer``) so that our codes equal what ORT would produce, bit for bit:

* codes are unsigned, ``0 .. 2**bits - 1``; dequantized value ``(q - zp) * scale`` (float32);
* symmetric: ``zp = 2**(bits-1)`` (MatMulNBits' default) and ``scale = -m / 2**(bits-1)``
  where ``m`` is the block's value of largest magnitude (the negative one on a tie), so ``m``
  maps exactly to code 0 and the scale may be negative;
* asymmetric: ``lo = min(min, 0)``, ``hi = max(max, 0)``, ``scale = (hi - lo) / (2**bits - 1)``,
  ``zp = clamp(roundf(-lo / scale))``;
* ``q = clamp(roundf(w * (1 / scale) + zp))`` in float32, ``roundf`` = half away from zero;
  a zero scale (all-zero block) uses reciprocal 0, so no NaN ever appears.

Affine INT blocks (``affine=True``, GGUF Q4_1 / Q4_K style) add a float32 offset per block:
``w ~ (q - 2**(bits-1)) * scale + offset`` with the implied symmetric zero point (so MatMulNBits
needs no zero-point tensor; the graph adds ``blocksum(x) @ offsets``). Each block is first
tested for lying on an affine grid ``lo + j * step`` with ``j <= 2**bits - 1`` (as the weights of
a checkpoint that was already block-quantized do, e.g. a dequantized Q4_1/Q4_K/Q8_0 GGUF): such
a block is stored *exactly* with ``scale = step``. Any other block gets
``scale = (max - min) / (2**bits - 1)``. Codes are ``roundf((w - min) / scale) + shift`` with
``shift = (2**bits - 1 - used) // 2`` (``used = roundf((max - min) / scale)``), centring a grid
of few levels in the code range, and ``offset = min + (2**(bits-1) - shift) * scale``. (Measured:
uncentred codes 0..15 of a Q4_1 grid in int8 blocks wreck MatMulNBits' accuracy_level 4 kernel,
perplexity 32000 instead of 29; centred they are fine.)
Re-quantizing an already quantized checkpoint therefore adds no error wherever the new format
can hold the old grid, instead of rounding a second time.
When every block's grid contains zero at a whole code (``offset == (2**(bits-1) - z) * scale``
for an integer ``z``, as for a symmetric source such as Q8_0 or Q4_0), the codes are shifted by
``2**(bits-1) - z`` and the tensor is returned *symmetric*, without offsets, if they all still
fit and no element moves further from ``w``: the same values, without the offset term's nodes
and bytes (measured: the int8 head of the default draft, a Q8_0 table, 1.40 -> 1.25 ms a step,
3.4 MiB less held).

FP8 is E4M3 (``ml_dtypes.float8_e4m3fn``, max 448) with one float32 scale per block,
``scale = amax / 448``, ``q = fp8(w / scale)`` (round to nearest even), ``w ~ float(q) * scale``;
an all-zero block has scale 0 and codes 0.

:func:`quantize_reference` is written to be obviously correct (one block at a time);
:func:`quantize` is the vectorized path used in practice; tests hold them bit-exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QuantizationError
from .recipe import BLOCK_SIZES, WeightFormat

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_dtype() -> np.dtype:
    import ml_dtypes  # export-time dependency only

    return np.dtype(ml_dtypes.float8_e4m3fn)


def format_bits(fmt: WeightFormat) -> int:
    """Bits of one stored code of a block format (4 or 8)."""
    fmt = WeightFormat.parse(fmt)
    if fmt is WeightFormat.INT4:
        return 4
    if fmt in (WeightFormat.INT8, WeightFormat.FP8):
        return 8
    raise QuantizationError(f"format {fmt.value!r} is not block-quantized")


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A block-quantized 2-D weight.

    format:      INT4 | INT8 | FP8
    q:           INT4/INT8: uint8 codes [N, n_blocks, block_size] (one code per byte, unpacked);
                 FP8: float8_e4m3fn [N, n_blocks, block_size]. Padding of a ragged last block
                 holds the code of 0.0.
    scales:      float32 [N, n_blocks]
    zero_points: uint8 [N, n_blocks] for asymmetric INT formats, else None (symmetric INT
                 uses 2**(bits-1); FP8 has none)
    shape:       (N, K) of the original weight
    input_scale: float32 [K] or None (outlier "scale"): the graph feeds ``x * input_scale`` to
                 this weight; ``q`` encodes ``W / input_scale`` (powers of two, exact)
    input_perm:  int64 [K] or None (outlier "reorder"): the graph feeds ``x[..., input_perm]``
                 and ``q`` encodes ``W[:, input_perm]``
    offsets:     float32 [N, n_blocks] or None (affine INT blocks, symmetric zero point
                 implied): added to every dequantized value of the block
    """

    format: WeightFormat
    block_size: int
    symmetric: bool
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    shape: tuple[int, int]
    input_scale: np.ndarray | None = None
    input_perm: np.ndarray | None = None
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        fmt = WeightFormat.parse(self.format)
        object.__setattr__(self, "format", fmt)
        n, k = self.shape
        nb = -(-k // self.block_size)
        if self.q.shape != (n, nb, self.block_size):
            raise QuantizationError(
                f"QuantizedTensor.q: shape {self.q.shape}, expected {(n, nb, self.block_size)}")
        if self.scales.shape != (n, nb) or self.scales.dtype != np.float32:
            raise QuantizationError(
                f"QuantizedTensor.scales: {self.scales.dtype} {self.scales.shape}, "
                f"expected float32 {(n, nb)}")
        want_q = _fp8_dtype() if fmt is WeightFormat.FP8 else np.dtype(np.uint8)
        if self.q.dtype != want_q:
            raise QuantizationError(f"QuantizedTensor.q: dtype {self.q.dtype}, expected {want_q}")
        for field in ("input_scale", "input_perm"):
            v = getattr(self, field)
            if v is not None and v.shape != (k,):
                raise QuantizationError(f"QuantizedTensor.{field}: shape {v.shape}, expected ({k},)")
        if self.offsets is not None and (
                fmt is WeightFormat.FP8 or not self.symmetric or self.offsets.shape != (n, nb)
                or self.offsets.dtype != np.float32):
            raise QuantizationError(
                f"QuantizedTensor.offsets: {self.offsets.dtype} {self.offsets.shape}, expected "
                f"float32 {(n, nb)} on a symmetric INT tensor")
        want_zp = fmt is not WeightFormat.FP8 and not self.symmetric
        if want_zp != (self.zero_points is not None):
            raise QuantizationError(
                f"QuantizedTensor.zero_points: {'required' if want_zp else 'not allowed'} for "
                f"{fmt.value} {'symmetric' if self.symmetric else 'asymmetric'}")

    @property
    def bits(self) -> int:
        return format_bits(self.format)

    @property
    def affine(self) -> bool:
        return self.offsets is not None

    @property
    def n_blocks(self) -> int:
        return self.q.shape[1]

    def zero_point_array(self) -> np.ndarray:
        """uint8 [N, n_blocks] zero points, the implied ones included (INT formats only)."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: the weight as the graph sees it (in the outlier-transformed domain).

        ``x' @ dequantize().T`` is what the encoded node computes, where ``x'`` is
        :meth:`transform_input` of ``x``.
        """
        n, k = self.shape
        if self.format is WeightFormat.FP8:
            w = self.q.astype(np.float32) * self.scales[:, :, None]
        else:
            zp = self.zero_point_array().astype(np.int32)[:, :, None]
            w = (self.q.astype(np.int32) - zp).astype(np.float32) * self.scales[:, :, None]
            if self.offsets is not None:
                w = w + self.offsets[:, :, None]
        return np.ascontiguousarray(w.reshape(n, -1)[:, :k])

    def transform_input(self, x: np.ndarray) -> np.ndarray:
        """x float32 [..., K] -> the activation the quantized weight is multiplied with."""
        if self.input_perm is not None:
            x = x[..., self.input_perm]
        if self.input_scale is not None:
            x = x * self.input_scale
        return x

    def effective_weight(self) -> np.ndarray:
        """float32 [N, K] ``E`` with ``x @ E.T == transform_input(x) @ dequantize().T``
        (up to float rounding): the quantized weight in the original input order/scale."""
        w = self.dequantize()
        if self.input_scale is not None:
            w = w * self.input_scale
        if self.input_perm is not None:
            inv = np.empty_like(self.input_perm)
            inv[self.input_perm] = np.arange(self.input_perm.size)
            w = w[:, inv]
        return w


# -- shared scalar rules ---------------------------------------------------------------------

def _roundf(x: np.ndarray) -> np.ndarray:
    """C ``roundf`` (half away from zero) of float32 values; ``x - trunc(x)`` is exact."""
    x = np.asarray(x, dtype=np.float32)
    r = np.trunc(x)
    return r + np.where(np.abs(x - r) >= 0.5, np.sign(x), np.float32(0))


def _check(w: np.ndarray, fmt: WeightFormat, block_size: int) -> np.ndarray:
    if WeightFormat.parse(fmt) not in (WeightFormat.INT4, WeightFormat.INT8, WeightFormat.FP8):
        raise QuantizationError(f"format {WeightFormat.parse(fmt).value!r} is not block-quantized")
    if block_size not in BLOCK_SIZES:
        raise QuantizationError(f"block_size: {block_size} is not one of {BLOCK_SIZES}")
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise QuantizationError(
            f"weight: expected a non-empty 2-D [N, K] array, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise QuantizationError("weight: contains NaN or Inf, cannot quantize")
    return w.astype(np.float32, copy=False)


# -- reference: one block at a time ----------------------------------------------------------

def _int_block_reference(v: np.ndarray, bits: int,
                         symmetric: bool) -> tuple[np.ndarray, float, int]:
    """v float32 [<=block_size] -> (codes uint8 [len(v)], scale float32, zero point)."""
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    mn, mx = np.float32(v.min()), np.float32(v.max())
    if symmetric:
        m = mx if abs(mx) > abs(mn) else mn
        scale = np.float32(-m) / np.float32(mid)
        zp = mid
    else:
        lo, hi = min(mn, np.float32(0)), max(mx, np.float32(0))
        scale = (hi - lo) / np.float32(qmax)
        zp_f = np.float32(0) - lo / scale if scale != 0 else lo
        zp = int(min(max(_roundf(zp_f), 0), qmax))
    recip = np.float32(1) / scale if scale != 0 else np.float32(0)
    t = v * recip + np.float32(zp)  # float32 multiply, then float32 add
    return np.clip(_roundf(t), 0, qmax).astype(np.uint8), np.float32(scale), zp


GRID_TOLERANCE = 1e-3  # largest distance of a grid point from an integer code, in codes
GRID_DIVISORS = 4  # the smallest gap between a block's values may span up to this many steps


def _grid_step_reference(v: np.ndarray, qmax: int) -> np.float32 | None:
    """The step of the affine grid ``min + j * step`` (``j <= qmax``) that block ``v`` lies
    on, or None. The step is ``(max - min) / s`` where ``s`` is the range measured in units of
    ``smallest gap / d`` for d = 1 .. GRID_DIVISORS (a level between two used ones may be
    unused); every value must then sit within GRID_TOLERANCE codes of an integer."""
    f32 = np.float32
    u = np.unique(v)
    if u.size < 2 or u.size > qmax + 1:
        return None
    lo, rng = f32(u[0]), f32(u[-1] - u[0])
    gap = f32(np.diff(u).min())
    for d in range(1, GRID_DIVISORS + 1):
        steps = _roundf(rng / (gap / f32(d)))
        if steps > qmax:
            break
        step = f32(rng / steps)
        r = (v - lo) / step
        if np.all(np.abs(r - _roundf(r)) <= f32(GRID_TOLERANCE)):
            return step
    return None


def _affine_block_reference(v: np.ndarray, bits: int) -> tuple[np.ndarray, float, float]:
    """v float32 [<=block_size] -> (codes uint8, scale float32, offset float32) with
    ``v ~ (codes - 2**(bits-1)) * scale + offset``; exact when v lies on a grid."""
    f32 = np.float32
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    lo, hi = f32(v.min()), f32(v.max())
    if hi == lo:
        return np.full(v.size, mid, np.uint8), f32(0), lo
    step = _grid_step_reference(v, qmax)
    scale = step if step is not None else f32((hi - lo) / f32(qmax))
    shift = (qmax - int(min(_roundf((hi - lo) / scale), qmax))) // 2  # centre the used codes
    codes = np.clip(_roundf((v - lo) / scale) + f32(shift), 0, qmax).astype(np.uint8)
    return codes, scale, f32(lo + f32(mid - shift) * scale)


def quantize_reference(w: np.ndarray, fmt: WeightFormat, block_size: int,
                       symmetric: bool = True, affine: bool = False) -> QuantizedTensor:
    """Plain per-block loop; the definition the fast path is tested against. w: [N, K]."""
    fmt = WeightFormat.parse(fmt)
    w = _check(w, fmt, block_size)
    _check_affine(fmt, symmetric, affine)
    n, k = w.shape
    nb = -(-k // block_size)
    if affine:
        q = np.zeros((n, nb, block_size), dtype=np.uint8)
        scales = np.zeros((n, nb), dtype=np.float32)
        offsets = np.zeros((n, nb), dtype=np.float32)
        for r in range(n):
            for b in range(nb):
                codes, scales[r, b], offsets[r, b] = _affine_block_reference(
                    w[r, b * block_size:(b + 1) * block_size], format_bits(fmt))
                q[r, b, :] = codes[-1]  # padding repeats the last real element
                q[r, b, :codes.size] = codes
        return _symmetric_form(w, QuantizedTensor(fmt, block_size, True, q, scales, None, (n, k),
                                                  offsets=offsets))
    fp8 = fmt is WeightFormat.FP8
    q = np.zeros((n, nb, block_size), dtype=_fp8_dtype() if fp8 else np.uint8)
    scales = np.zeros((n, nb), dtype=np.float32)
    zps = np.zeros((n, nb), dtype=np.uint8)
    for r in range(n):
        for b in range(nb):
            v = w[r, b * block_size:(b + 1) * block_size]
            if fp8:
                scale = np.float32(np.abs(v).max()) / np.float32(FP8_MAX)
                scaled = v / scale if scale != 0 else np.zeros_like(v)
                q[r, b, :v.size] = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(q.dtype)
            else:
                codes, scale, zp = _int_block_reference(v, format_bits(fmt), symmetric)
                q[r, b, :] = zp  # padding holds the code of 0.0
                q[r, b, :v.size] = codes
                zps[r, b] = zp
            scales[r, b] = scale
    sym = True if fp8 else symmetric
    return QuantizedTensor(fmt, block_size, sym, q, scales, None if sym else zps, (n, k))


# -- fast path: all blocks at once -----------------------------------------------------------

def _check_affine(fmt: WeightFormat, symmetric: bool, affine: bool) -> None:
    if affine and (WeightFormat.parse(fmt) is WeightFormat.FP8 or not symmetric):
        raise QuantizationError("affine: needs an int4/int8 format and symmetric=True (the "
                                "per-block offset replaces the zero point)")


def _blocks(w: np.ndarray, block_size: int, edge: bool = False) -> np.ndarray:
    """[N, K] -> [N, n_blocks, block_size] with the ragged tail zero-padded (``edge``: padded
    with the row's last element, which changes no min / max / grid of the last block)."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = np.pad(w, ((0, 0), (0, nb * block_size - k)), mode="edge" if edge else "constant")
    return w.reshape(n, nb, block_size)


def _grid_steps(blk: np.ndarray, qmax: int) -> np.ndarray:
    """Vectorized :func:`_grid_step_reference`: float32 [n, n_blocks], NaN where no grid."""
    f32 = np.float32
    srt = np.sort(blk, axis=2)
    gaps = np.diff(srt, axis=2)
    distinct = (gaps > 0).sum(axis=2) + 1
    lo, rng = srt[:, :, 0], (srt[:, :, -1] - srt[:, :, 0]).astype(f32)
    gap = np.where(gaps > 0, gaps, f32(np.inf)).min(axis=2).astype(f32)
    out = np.full(lo.shape, np.nan, dtype=f32)
    todo = (distinct >= 2) & (distinct <= qmax + 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for d in range(1, GRID_DIVISORS + 1):
            steps = _roundf(rng / (gap / f32(d)))
            todo &= steps <= qmax
            if not todo.any():
                break
            step = (rng / steps).astype(f32)
            r = (blk - lo[:, :, None]) / step[:, :, None]
            ok = todo & np.all(np.abs(r - _roundf(r)) <= f32(GRID_TOLERANCE), axis=2)
            out[ok] = step[ok]
            todo &= ~ok
    return out


def _affine_rows(w: np.ndarray, bits: int, block_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w float32 [n, K] -> (q, scales, offsets) of affine blocks (see the module docstring)."""
    f32 = np.float32
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    blk = _blocks(w, block_size, edge=True)
    lo, hi = blk.min(axis=2), blk.max(axis=2)
    step = _grid_steps(blk, qmax)
    scales = np.where(np.isnan(step), ((hi - lo) / f32(qmax)).astype(f32), step).astype(f32)
    scales[hi == lo] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (blk - lo[:, :, None]) / scales[:, :, None]
        used = np.minimum(_roundf((hi - lo) / scales), f32(qmax))
    shift = np.where(scales != 0, (f32(qmax) - used) // 2, f32(0)).astype(f32)
    q = np.where(scales[:, :, None] != 0, np.clip(_roundf(t) + shift[:, :, None], 0, qmax),
                 f32(mid)).astype(np.uint8)
    return q, scales, (lo + (f32(mid) - shift) * scales).astype(f32)


def _symmetric_form(w: np.ndarray, qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` (affine) as a symmetric tensor without offsets when that holds the same grid (see
    the module docstring); ``qt`` itself otherwise."""
    f32 = np.float32
    bits = qt.bits
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    s_, off = qt.scales, qt.offsets
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s_ != 0, _roundf(f32(mid) - off / s_), f32(mid))
    if not np.all(np.where(s_ != 0, (f32(mid) - z) * s_ == off, off == 0)):
        return qt
    q = qt.q.astype(np.int32) + (mid - z.astype(np.int32))[:, :, None]
    n, k = qt.shape
    if qt.n_blocks * qt.block_size != k:  # padding holds the code of 0.0, as symmetric tensors do
        q.reshape(n, -1)[:, k:] = mid
    if q.min() < 0 or q.max() > qmax:
        return qt
    sym = QuantizedTensor(qt.format, qt.block_size, True, q.astype(np.uint8), s_, None, qt.shape)
    new, old = sym.dequantize(), qt.dequantize()
    if not np.all(np.abs(new - w) <= np.abs(old - w)):
        return qt
    return sym


_CHUNK = 1 << 22  # elements quantized at once (bounds temporary memory for big tables)


def quantize(w: np.ndarray, fmt: WeightFormat, block_size: int,
             symmetric: bool = True, affine: bool = False) -> QuantizedTensor:
    """Vectorized block quantization of w float32 [N, K]; bit-exact with quantize_reference."""
    fmt = WeightFormat.parse(fmt)
    w = _check(w, fmt, block_size)
    _check_affine(fmt, symmetric, affine)
    n, k = w.shape
    rows = max(1, _CHUNK // k)
    if affine:
        parts = [_affine_rows(w[i:i + rows], format_bits(fmt), block_size)
                 for i in range(0, n, rows)]
        q, scales, offsets = (np.concatenate([p[j] for p in parts]) for j in range(3))
        return _symmetric_form(w, QuantizedTensor(fmt, block_size, True, q, scales, None, (n, k),
                                                  offsets=offsets))
    if n <= rows:
        q, scales, zp = _quantize_rows(w, fmt, block_size, symmetric)
    else:
        parts = [_quantize_rows(w[i:i + rows], fmt, block_size, symmetric)
                 for i in range(0, n, rows)]
        q, scales = (np.concatenate([p[j] for p in parts]) for j in (0, 1))
        zp = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    sym = symmetric or fmt is WeightFormat.FP8
    return QuantizedTensor(fmt, block_size, sym, q, scales, zp, (n, k))


def _quantize_rows(w: np.ndarray, fmt: WeightFormat, block_size: int, symmetric: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w float32 [n, K] -> (q [n, n_blocks, block], scales [n, n_blocks], zero points | None)."""
    blk = _blocks(w, block_size)  # zero padding: changes no min(., 0) / max(., 0) / amax
    f32 = np.float32
    with np.errstate(divide="ignore", invalid="ignore"):
        if fmt is WeightFormat.FP8:
            scales = (np.abs(blk).max(axis=2) / f32(FP8_MAX)).astype(f32)
            scaled = np.where(scales[:, :, None] != 0, blk / scales[:, :, None], f32(0))
            q = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(_fp8_dtype())
            return q, scales, None
        bits = format_bits(fmt)
        qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
        mn, mx = blk.min(axis=2), blk.max(axis=2)
        if symmetric:
            m = np.where(np.abs(mx) > np.abs(mn), mx, mn)
            scales = (-m / f32(mid)).astype(f32)
            zp = np.full(scales.shape, mid, dtype=np.uint8)
        else:
            lo, hi = np.minimum(mn, f32(0)), np.maximum(mx, f32(0))
            scales = ((hi - lo) / f32(qmax)).astype(f32)
            zp_f = np.where(scales != 0, f32(0) - lo / scales, lo).astype(f32)
            zp = np.clip(_roundf(zp_f), 0, qmax).astype(np.uint8)
        recip = np.where(scales != 0, f32(1) / scales, f32(0)).astype(f32)
    t = blk * recip[:, :, None] + zp.astype(f32)[:, :, None]
    q = np.clip(_roundf(t), 0, qmax).astype(np.uint8)
    return q, scales, None if symmetric else zp


# -- byte layout -----------------------------------------------------------------------------

def pack_codes(q: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """uint8 codes [..., L] -> packed uint8 [..., ceil(L*bits/8)]: 4-bit codes two per byte,
    element 2i in the low nibble (MatMulNBits / GatherBlockQuantized layout). An odd L is
    padded with ``pad`` (ORT pads packed 4-bit zero points with 8)."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    if bits != 4:
        raise QuantizationError(f"bits: {bits} is not 4 or 8")
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full(q.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_codes(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: packed uint8 [..., B] -> codes uint8 [..., length]."""
    if bits == 8:
        return packed[..., :length].astype(np.uint8)
    out = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :length].astype(np.uint8)
