"""Edge export of the restoration networks (every registry architecture) to ONNX, checked with onnxruntime.

The graph is the bare network, [B,3,H,W] "degraded" in [0,1] -> [B,3,H,W] "restored" (not clamped), with
batch, height and width dynamic; the caller applies the architecture's official size policy as
`distill.inference.restore` does (AirNet: center-crop to multiples of 16; Restormer: reflect-pad to
multiples of 8 and crop back). `check_onnx` does exactly that on real photos and compares onnxruntime with
PyTorch.

AirNet's modulated deformable convs: two ways, both checked to <= 1e-4 against PyTorch.
* "deformconv" (default, opset >= 19): one ONNX DeformConv node per layer. onnxruntime runs it on the CPU,
  and it is the fast choice there: on a 1-group x 1-block AirNet at 64x64, one thread, the whole graph took
  74 ms with DeformConv against 221 ms with GridSample, whose kernel alone was 154 ms of it.
* "gridsample" (opset >= 16): distill.deform's sampling formulation, out = W_mat @ (m * GridSample(x,
  2 y / (H - 1) - 1)) with GridSample (bilinear, zeros, align_corners=1) and one MatMul per layer. GridSample
  is a standard op that far more runtimes implement than DeformConv, so this is the portable choice. The
  graph is forward-only: the exactness padding of the training path (deform.py) only matters for gradients.

INT8: `quantize_dynamic_int8` applies onnxruntime's dynamic quantization (int8 weights of Conv/MatMul,
activations quantized at run time).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from d4ir.distill import deform
from d4ir.distill.inference import crop_to_multiple, official_policy, pad_to_multiple
from d4ir.distill.registry import count_parameters, load_model
from d4ir.shards.errors import missing_extra
from torch import nn

_MIN_OPSET = {"gridsample": 16, "deformconv": 19}
DEFAULT_OPSET = {"gridsample": 17, "deformconv": 19}
DEFAULT_DEFORM_OP = "deformconv"


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote.

    Args:
        path: the .onnx file.
        bytes: its size.
        params: the PyTorch model's parameter count (registry.count_parameters, AirNet's MoCo key encoder
            included); onnx_params: the elements of the graph's initializers (what actually ships).
        max_diff: largest |onnxruntime - PyTorch| over the check images (None when not checked).
        opset: ONNX opset; deform_op: how AirNet's deformable convs were written.
        arch, name: the checkpoint's base architecture and registry name.
    """

    path: Path
    bytes: int
    params: int
    onnx_params: int
    max_diff: float | None
    opset: int
    deform_op: str
    arch: str
    name: str


def _onnx_modules():
    missing = missing_extra("export", ("onnx", "onnxruntime"), "ONNX export")
    if missing is not None:
        raise missing  # one line (exit 2) from the CLI, naming `pip install 'd4ir[export]'`
    import onnx
    import onnxruntime

    return onnx, onnxruntime


def export_onnx(
    model: nn.Module, path: str | Path, *, opset: int | None = None, deform_op: str = DEFAULT_DEFORM_OP,
    example_hw: tuple[int, int] = (32, 48),
) -> Path:
    """Trace `model` (eval mode, fp32, CPU) into `path` with dynamic batch, height and width.

    Args:
        model: an AirNet or Restormer (any module mapping [B,3,H,W] -> [B,3,H,W]).
        path: output .onnx file (parent folders are created).
        opset: ONNX opset (default 19 with DeformConv, 17 with GridSample; at least 19 / 16).
        deform_op: "deformconv" or "gridsample" (AirNet only; see the module docstring).
        example_hw: size of the tracing input (multiples of 16 fit every architecture's policy).
    """
    if deform_op not in _MIN_OPSET:
        raise ValueError(f"deform_op must be one of {tuple(_MIN_OPSET)}, got {deform_op!r}")
    opset = DEFAULT_OPSET[deform_op] if opset is None else opset
    if opset < _MIN_OPSET[deform_op]:
        raise ValueError(f"deform_op {deform_op!r} needs opset >= {_MIN_OPSET[deform_op]}, got {opset}")
    _onnx_modules()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval().float().cpu()
    x = torch.rand(2, 3, *example_hw, generator=torch.Generator().manual_seed(0))  # batch 2: no batch-1 folding
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with deform.using(onnx_op=deform_op), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation and tracer notes
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["degraded"], output_names=["restored"],
                              dynamic_axes={"degraded": axes, "restored": axes}, do_constant_folding=True)
    finally:
        model.train(was_training)
    return path


def _policy_input(model: nn.Module, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [H,W,3] -> ([1,3,H',W'] float in [0,1] after the size policy, (H, W) to crop the output back to)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"check images must be uint8 [H,W,3] arrays, got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    policy, base = official_policy(model)
    if policy == "crop":
        x = crop_to_multiple(x, base)
    elif policy == "pad":
        h, w = x.shape[-2:]
        return pad_to_multiple(x, base), (h, w)
    return x, tuple(x.shape[-2:])


def check_onnx(path: str | Path, model: nn.Module, images: list[np.ndarray]) -> float:
    """Largest |onnxruntime - PyTorch| of the restored outputs over `images` (uint8 [H,W,3], each at its own
    size, through the architecture's size policy), on the CPU in fp32."""
    _, ort = _onnx_modules()
    if not images:
        raise ValueError("check_onnx needs at least one image")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval().float().cpu()
    worst = 0.0
    for image in images:
        x, (h, w) = _policy_input(model, image)
        with torch.no_grad():
            ref = model(x)[..., :h, :w].numpy()
        got = session.run(["restored"], {"degraded": x.numpy()})[0][..., :h, :w]
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime dynamic quantization of `src` (int8 weights, run-time activation scales) into `dst`."""
    _onnx_modules()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # its advice to pre-process first goes to the root logger
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
    return dst


def onnx_latency_ms(
    path: str | Path, height: int, width: int, *, threads: int = 1, reps: int = 5, warmup: int = 1
) -> list[float]:
    """Batch-1 onnxruntime (CPUExecutionProvider) latencies in ms of `reps` passes on a random [1,3,H,W] input,
    after `warmup` untimed ones, with `threads` intra-op threads. H and W should suit the architecture's size
    policy (multiples of 16 suit both)."""
    import time

    _, ort = _onnx_modules()
    if reps < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"onnx_latency_ms: reps >= 1, warmup >= 0 and threads >= 1 (got {reps}, {warmup}, {threads})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        session.run(["restored"], {"degraded": x})
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def default_check_images() -> list[np.ndarray]:
    """Crops of scikit-image's bundled photos at two sizes, one of them odd: 48x64 and 67x93 (H x W)."""
    from skimage import data

    astronaut, coffee, chelsea = data.astronaut(), data.coffee(), data.chelsea()
    return [astronaut[60:108, 180:244], coffee[120:168, 220:284], chelsea[90:157, 150:243], coffee[30:97, 300:393]]


def onnx_parameter_count(path: str | Path) -> int:
    onnx, _ = _onnx_modules()
    graph = onnx.load(str(path)).graph
    return int(sum(np.prod(t.dims) for t in graph.initializer))


def export_model(
    checkpoint_path: str | Path, out_path: str | Path, images: list[np.ndarray] | None = None, *,
    opset: int | None = None, deform_op: str = DEFAULT_DEFORM_OP, check: bool = True, tolerance: float = 1e-4,
    weights_key: str | None = None,
) -> ExportResult:
    """Load a checkpoint (ours or an official .pth), export it to ONNX and check it against PyTorch.

    Args:
        checkpoint_path: anything `distill.registry.load_model` reads.
        out_path: the .onnx file to write.
        images: uint8 [H,W,3] photos for the check (default: `default_check_images()`).
        opset, deform_op: see `export_onnx`.
        check: run onnxruntime on the images and compare with PyTorch.
        tolerance: largest accepted difference; a larger one raises ValueError (the file is kept).
        weights_key: the entry of an official .pth holding the weights (see `load_model`).
    """
    _onnx_modules()  # before any work: a missing extra is one line, not a traceback after loading the model
    model, info = load_model(checkpoint_path, weights_key=weights_key)
    path = export_onnx(model, out_path, opset=opset, deform_op=deform_op)
    max_diff = None
    if check:
        max_diff = check_onnx(path, model, images if images is not None else default_check_images())
        if not max_diff <= tolerance:
            raise ValueError(f"{path}: onnxruntime differs from PyTorch by {max_diff:.3g} > {tolerance:g}")
    return ExportResult(path=path, bytes=path.stat().st_size, params=count_parameters(model),
                        onnx_params=onnx_parameter_count(path), max_diff=max_diff,
                        opset=DEFAULT_OPSET[deform_op] if opset is None else opset, deform_op=deform_op,
                        arch=info["arch"], name=info["name"])
