"""Modulated deformable convolution 3x3 (DCNv2, AirNet's DCN layer) by sampling + one matmul, with a switch.

The op (stride 1, padding 1, dilation 1, one offset group, no bias), for output pixel (r, c) of image b:

    out[b, o, r, c] = sum_{ci, k} W[o, ci, i_k, j_k] * m[b, k, r, c] * X[b, ci](y_k, x_k),
    y_k = (r - 1 + i_k) + offset[b, 2k, r, c],   x_k = (c - 1 + j_k) + offset[b, 2k + 1, r, c],

with the taps k = 3 i_k + j_k in row-major order of the 3x3 kernel (channel 2k is dy, 2k + 1 is dx), and
X(y, x) bilinear with every corner outside the image counted as zero (so X = 0 for y <= -1, y >= H,
x <= -1 or x >= W): with y0 = floor(y), fy = y - y0 (and the same for x),

    X(y, x) = (1-fy)(1-fx) X[y0, x0] + (1-fy) fx X[y0, x0+1] + fy (1-fx) X[y0+1, x0] + fy fx X[y0+1, x0+1].

This is torchvision's deform_conv2d (= mmcv's modulated_deform_conv2d). Gradients: dX/dy is taken on the cell
[y0, y0 + 1], so at an exact integer y it is the forward difference X[y + 1] - X[y] (and likewise in x); the
mask gradient is sum_ci (W^T g)[ci, k] X(y_k, x_k); the input gradient scatters the bilinear weights.

Formulation: S[p, ci, k] = m_k X_ci(y_k, x_k), the masked columns (9x the input), then out = W_mat @ S in ONE
matmul over (C_in x 9). Two ways to sample (distill/deform_kernels.py):
* "sample": grid_sample (bilinear, zeros, align_corners=True) on g = 2 y / (H' - 1) - 1. Where grid_sample's
  gradient differs from torchvision's: the kernel unnormalises with (g + 1) (H' - 1) / 2, which in floats can
  land just below an integer y; floor then takes the cell below and the offset gradient becomes the
  backward difference X[y] - X[y - 1]. That is AirNet's common case (its offsets start at zero, so every tap
  sits on an integer). Fix: zero-pad the image at the bottom/right to H' = 2^a + 1 (W' = 2^b + 1); then the
  scale is a power of two, the round trip is exact at integers and monotone, and floor agrees everywhere.
* "gather": corner indices and bilinear weights in pixel units (floor exactly as torchvision), the mask folded
  into the 4 weights, and one F.embedding_bag(mode="sum", per_sample_weights) over a channels-last image with a
  zero border: the weights of a sample are computed once for all channels.
Memory: S is built in chunks of at most `chunk_mib` (whole images, or row bands of one image); autograd keeps
only x, offset, mask and weight, and the backward recomputes each chunk under autograd (checkpoint style).

Switch `impl`: "auto" (default) | "gather" | "sample" | "torchvision". "auto" on a CPU is "sample" (the
fastest KD step at 1 and 2 threads on a quiet machine, docs/benchmarks.md), a fixed choice so that equal runs
repeat bit for bit: a timed choice differs between runs of a loaded machine, and the implementations agree only
to float rounding (two 2-thread distills differed by 1.1e-4 after 6 steps). On CUDA (never bit-repeatable:
atomics in the backward kernels), or on a CPU with `DeformConfig(measure=True)`, "auto" times every
implementation once per (device type, dtypes, C_in, C_out, H, W, grad needed) in this process, on one image and
a band of rows worth one chunk (forward, plus backward when a gradient is needed), and caches the fastest
(`auto_choices()` shows the times). All agree to float rounding, so weights trained with one run with another.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import torch
from d4ir.distill import deform_kernels as K
from torchvision.ops import deform_conv2d

IMPLS = ("auto", "gather", "sample", "torchvision")
ONNX_OPS = ("gridsample", "deformconv")
_MEASURED = ("gather", "sample", "torchvision")  # what "auto" chooses from
CPU_CHOICE = "sample"  # "auto" on a CPU unless DeformConfig.measure


@dataclass(frozen=True)
class DeformConfig:
    """Process-wide settings of `deform_conv3x3`.

    Args:
        impl: default implementation, one of IMPLS (a call or an AirNet may override it).
        chunk_mib: largest sampled-column tensor S per chunk, in MiB (a chunk's transient memory is a small
            multiple of it: S, its gradient, indices and weights).
        onnx_op: what ONNX export emits: "gridsample" (GridSample + MatMul, opset >= 16) or "deformconv"
            (one DeformConv node, opset >= 19).
        measure: "auto" times the implementations on a CPU too (faster for some shapes, but runs no longer
            repeat bit for bit); on CUDA it always does.
    """

    impl: str = "auto"
    chunk_mib: float = 32.0
    onnx_op: str = "gridsample"
    measure: bool = False

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"deform impl must be one of {IMPLS}, got {self.impl!r}")
        if not self.chunk_mib > 0:
            raise ValueError(f"deform chunk_mib must be > 0, got {self.chunk_mib}")
        if self.onnx_op not in ONNX_OPS:
            raise ValueError(f"deform onnx_op must be one of {ONNX_OPS}, got {self.onnx_op!r}")


_CONFIG = DeformConfig()
_AUTO: dict[tuple, dict] = {}


def get_config() -> DeformConfig:
    return _CONFIG


def configure(**changes) -> DeformConfig:
    """Replace fields of the process-wide DeformConfig (validated); returns the previous config."""
    global _CONFIG
    previous, _CONFIG = _CONFIG, replace(_CONFIG, **changes)
    return previous


@contextlib.contextmanager
def using(**changes):
    """`with using(impl="sample"): ...` sets DeformConfig fields for the block only."""
    previous = configure(**changes)
    try:
        yield _CONFIG
    finally:
        configure(**vars(previous))


def auto_choices() -> dict[str, dict]:
    """What "auto" measured so far: {key: {"choice": impl, "seconds": {impl: s}}}."""
    return {"/".join(map(str, k)): {"choice": v["choice"], "seconds": dict(v["seconds"])} for k, v in _AUTO.items()}


def clear_auto_cache() -> None:
    _AUTO.clear()


# -------------------------------------------------------------------------------------------------
# chunked forward and recomputing backward
# -------------------------------------------------------------------------------------------------


def _plan(shape: tuple[int, ...], elem: int, budget: float) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """[(b0, b1, [(r0, r1), ...])]: groups of whole images, or one image cut into row bands, so that each
    chunk's S (9 * C * rows * W elements) stays within `budget` bytes."""
    b, c, h, w = shape
    row = 9 * c * w * elem
    if row * h <= budget:
        n = max(1, int(budget // (row * h)))
        return [(b0, min(b0 + n, b), [(0, h)]) for b0 in range(0, b, n)]
    rows = max(1, int(budget // row))
    return [(b0, b0 + 1, [(r0, min(r0 + rows, h)) for r0 in range(0, h, rows)]) for b0 in range(b)]


def _prepare(kind: str, x: torch.Tensor) -> torch.Tensor:
    return K.border_channels_last(x) if kind == "gather" else K.pow2_pad(x)


def _columns(kind: str, prep: torch.Tensor, offset, mask, r0: int, height: int) -> torch.Tensor:
    """S of one chunk: "gather" [n*h*W, 9*C] (pixel-major), "sample" [n, C*9, h*W]."""
    if kind == "gather":
        return K.gather_columns(prep, offset, mask, r0, height)
    n, c = prep.shape[:2]
    threads = torch.get_num_threads() if prep.device.type == "cpu" else 1
    return K.sample_columns(prep, offset, mask, r0, threads if n < threads and c % threads == 0 else 1)


def _weight_matrix(kind: str, weight: torch.Tensor, mm_dtype) -> torch.Tensor:
    """[Co, 9*C] in the column order of `kind`'s S."""
    return (K.gather_weight(weight) if kind == "gather" else K.sample_weight(weight)).to(mm_dtype)


def _contract(kind: str, s: torch.Tensor, w_mat: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The ONE matmul over (C_in x 9): -> [n,Co,h,W] (a channels-last view for "gather")."""
    s = s.to(w_mat.dtype)
    if kind == "gather":
        return (s @ w_mat.t()).view(n, h, w, -1).permute(0, 3, 1, 2)
    return (w_mat @ s).view(n, -1, h, w)


def _forward(kind, x, offset, mask, weight, mm_dtype) -> torch.Tensor:
    """[B,Co,H,W] in mm_dtype, chunk by chunk, without autograd."""
    b, _, h, w = x.shape
    out = x.new_empty((b, weight.shape[0], h, w), dtype=mm_dtype)
    elem = torch.finfo(K.sampling_dtype(x.dtype)).bits // 8
    with torch.no_grad():
        w_mat = _weight_matrix(kind, weight, mm_dtype)
        for b0, b1, bands in _plan(tuple(x.shape), elem, _CONFIG.chunk_mib * 2**20):
            prep = _prepare(kind, x[b0:b1])
            for r0, r1 in bands:
                s = _columns(kind, prep, offset[b0:b1, :, r0:r1], mask[b0:b1, :, r0:r1], r0, h)
                out[b0:b1, :, r0:r1] = _contract(kind, s, w_mat, b1 - b0, r1 - r0, w)
    return out


class _Deform(torch.autograd.Function):
    """Saves only the inputs; backward recomputes each chunk's S under autograd, applies the matmul's two
    gradients by hand (dW += G^T S, dS = W^T G) and back-propagates dS through the sampling."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, kind, mm_dtype):
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.kind, ctx.mm_dtype = kind, mm_dtype
        return _forward(kind, x, offset, mask, weight, mm_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, offset, mask, weight = ctx.saved_tensors
        kind, mm = ctx.kind, ctx.mm_dtype
        needs = ctx.needs_input_grad[:4]
        grads = [torch.zeros_like(t) if need else None for t, need in zip((x, offset, mask), needs)]
        co, h = weight.shape[0], x.shape[2]
        w_mat = _weight_matrix(kind, weight.detach(), mm)  # [Co, 9*C]
        gw = torch.zeros(w_mat.shape, device=w_mat.device, dtype=torch.promote_types(weight.dtype, torch.float32))
        elem = torch.finfo(K.sampling_dtype(x.dtype)).bits // 8
        with torch.autocast(x.device.type, enabled=False):
            for b0, b1, bands in _plan(tuple(x.shape), elem, _CONFIG.chunk_mib * 2**20):
                n = b1 - b0
                with torch.enable_grad():
                    x_leaf = x[b0:b1].detach().requires_grad_(needs[0])
                    prep = _prepare(kind, x_leaf)
                g_prep = None
                for r0, r1 in bands:
                    off = offset[b0:b1, :, r0:r1].detach().requires_grad_(needs[1])
                    msk = mask[b0:b1, :, r0:r1].detach().requires_grad_(needs[2])
                    with torch.set_grad_enabled(any(needs[:3])):
                        s = _columns(kind, prep, off, msk, r0, h)
                    g = grad[b0:b1, :, r0:r1]
                    s_mm = s.detach().to(mm)
                    if kind == "gather":
                        g2 = g.permute(0, 2, 3, 1).reshape(-1, co).to(mm)  # [n*h*W, Co]
                        if needs[3]:
                            gw += g2.t() @ s_mm
                        g_s = g2 @ w_mat  # [n*h*W, 9*C]
                    else:
                        g2 = g.reshape(n, co, -1).to(mm)  # [n, Co, h*W]
                        if needs[3]:
                            gw += (g2 @ s_mm.transpose(1, 2)).sum(0)
                        g_s = w_mat.t() @ g2  # [n, 9*C, h*W]
                    del s_mm
                    wanted = [(i, t) for i, t in enumerate((prep, off, msk)) if needs[i]]
                    if not wanted:
                        continue
                    got = torch.autograd.grad(s, [t for _, t in wanted], g_s.to(s.dtype))
                    for (i, _), gi in zip(wanted, got):
                        if i == 0:
                            g_prep = gi if g_prep is None else g_prep.add_(gi)
                        else:
                            grads[i][b0:b1, :, r0:r1] = gi
                if needs[0]:
                    grads[0][b0:b1] = torch.autograd.grad(prep, x_leaf, g_prep)[0]
        g_weight = None
        if needs[3]:
            c = x.shape[1]
            gw4 = gw.view(co, 3, 3, c).permute(0, 3, 1, 2) if kind == "gather" else gw.view(co, c, 3, 3)
            g_weight = gw4.to(weight.dtype).contiguous()
        return (*grads, g_weight, None, None)


# -------------------------------------------------------------------------------------------------
# ONNX: DeformConv node
# -------------------------------------------------------------------------------------------------


class _DeformConvOnnx(torch.autograd.Function):
    """Traced as one ONNX DeformConv (opset 19) node; computes torchvision's op while tracing."""

    @staticmethod
    def forward(ctx, x, offset, weight, mask):
        return deform_conv2d(x, offset, weight, None, padding=1, mask=mask)

    @staticmethod
    def symbolic(g, x, offset, weight, mask):
        def const(v):
            return g.op("Constant", value_t=torch.tensor(v))

        c_out = g.op("Slice", g.op("Shape", weight), const([0]), const([1]))
        bias = g.op("ConstantOfShape", c_out, value_t=torch.tensor([0.0]))  # DeformConv's B: AirNet has none
        return g.op("DeformConv", x, weight, offset, bias, mask, kernel_shape_i=[3, 3], pads_i=[1, 1, 1, 1],
                    strides_i=[1, 1], dilations_i=[1, 1], group_i=1, offset_group_i=1)


# -------------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------------


def _check(x, offset, weight, mask) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"deform_conv3x3: x must be a float tensor [B,C,H,W], got {tuple(x.shape)} {x.dtype}")
    b, c, h, w = x.shape
    for name, t, shape in (("offset", offset, (b, 18, h, w)), ("mask", mask, (b, 9, h, w)),
                           ("weight", weight, (weight.shape[0], c, 3, 3))):
        if tuple(t.shape) != shape or t.device != x.device:
            raise ValueError(f"deform_conv3x3: {name} must be {list(shape)} on {x.device} for x {list(x.shape)}, "
                             f"got {list(t.shape)} on {t.device}")


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _run(impl, x, offset, weight, mask, grad: bool, mm_dtype) -> torch.Tensor:
    if impl == "torchvision":
        return deform_conv2d(x, offset, weight, None, padding=1, mask=mask)
    with torch.autocast(x.device.type, enabled=False):
        if grad:
            return _Deform.apply(x, offset, mask, weight, impl, mm_dtype)
        return _forward(impl, x, offset, mask, weight, mm_dtype)


def _timed(impl, x, offset, weight, mask, grad: bool, mm_dtype) -> float:
    """Seconds for one forward (+ backward) of `impl` on these inputs, after a warm-up on two rows."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for rows in (min(2, x.shape[2]), x.shape[2]):
        leaves = [t[:, :, :rows].detach().requires_grad_(grad and t.requires_grad) for t in (x, offset, mask)]
        w = weight.detach().requires_grad_(grad and weight.requires_grad)
        sync()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = _run(impl, leaves[0], leaves[1], w, leaves[2], grad, mm_dtype)
            if grad:
                torch.autograd.grad(out, [t for t in (*leaves, w) if t.requires_grad], torch.ones_like(out))
        sync()
    return time.perf_counter() - t0


def _auto(x, offset, weight, mask, grad: bool, mm_dtype) -> str:
    b, c, h, w = x.shape
    key = (x.device.type, str(x.dtype).replace("torch.", ""), str(mm_dtype).replace("torch.", ""), c,
           weight.shape[0], h, w, "grad" if grad else "nograd")
    if x.device.type == "cpu" and not _CONFIG.measure:
        key = (*key, "fixed")  # a measured choice of the same shape is another entry
        _AUTO.setdefault(key, {"choice": CPU_CHOICE, "seconds": {}})  # fixed: equal runs repeat (docstring)
    if key not in _AUTO:
        elem = torch.finfo(K.sampling_dtype(x.dtype)).bits // 8
        rows = max(2, min(h, int(_CONFIG.chunk_mib * 2**20 // (9 * c * w * elem))))
        seconds = {}
        for impl in _MEASURED:
            try:
                seconds[impl] = _timed(impl, x[:1, :, :rows], offset[:1, :, :rows], weight, mask[:1, :, :rows], grad,
                                       mm_dtype)
            except (RuntimeError, NotImplementedError):  # e.g. a dtype that one backend lacks
                continue
        _AUTO[key] = {"choice": min(seconds, key=seconds.get), "seconds": seconds}
    return _AUTO[key]["choice"]


def deform_conv3x3(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, *, impl: str | None = None
) -> torch.Tensor:
    """Modulated deformable conv 3x3 = deform_conv2d(x, offset, weight, None, padding=1, mask=mask).

    Args:
        x: [B,C,H,W] input.
        offset: [B,18,H,W]; channel 2k is dy and 2k + 1 dx of tap k (row-major 3x3).
        weight: [Co,C,3,3].
        mask: [B,9,H,W] modulation (AirNet: a sigmoid).
        impl: one of IMPLS; None: the process default (`configure(impl=...)`).
    Returns:
        [B,Co,H,W] (in the autocast dtype under autocast).
    """
    _check(x, offset, weight, mask)
    impl = _CONFIG.impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"deform impl must be one of {IMPLS}, got {impl!r}")
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        if _CONFIG.onnx_op == "deformconv":
            return _DeformConvOnnx.apply(x, offset, weight, mask)
        return K.sample_export(x, offset, weight, mask)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, offset, weight, mask))
    mm_dtype = _mm_dtype(x)
    if impl == "auto":
        impl = _auto(x, offset, weight, mask, grad, mm_dtype)
    return _run(impl, x, offset, weight, mask, grad, mm_dtype)
