"""distill.export: ONNX round trips through onnxruntime (dynamic batch and size), the checkpoint entry point,
dynamic INT8 quantization, and clear errors. Skipped when the 'export' extra (onnx, onnxruntime) is absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from d4ir.distill import export as E  # noqa: E402
from d4ir.distill.airnet import DCNLayer  # noqa: E402
from d4ir.distill.registry import build, count_parameters, save_model  # noqa: E402

TINY = {
    "airnet": dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=4),
    "restormer": dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8]),
}


def _tiny(name: str):
    torch.manual_seed(0)
    model = build(name, **TINY[name]).eval()
    for m in model.modules():  # fractional offsets: the official zero init would hide the sampling
        if isinstance(m, DCNLayer):
            torch.nn.init.normal_(m.conv_offset_mask.weight, std=0.2)
    return model


def _photos() -> list[np.ndarray]:
    """Two real crops at different sizes, the second odd (67 x 93)."""
    images = E.default_check_images()
    return [images[0], images[2]]


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["restored"], {"degraded": x.numpy()})[0]


@pytest.mark.parametrize("name", ["airnet", "restormer"])
def test_round_trip_dynamic_batch_and_sizes(name, tmp_path):
    model = _tiny(name)
    path = E.export_onnx(model, tmp_path / f"{name}.onnx")  # AirNet: DeformConv nodes
    assert E.check_onnx(path, model, _photos()) <= 1e-4  # real photos at their own sizes, through the size policy
    g = torch.Generator().manual_seed(1)
    for batch, (h, w) in ((3, (16, 24)), (1, (40, 32))):  # one file, other batches and sizes than traced
        x = torch.rand(batch, 3, h, w, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = _ort(path, x)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4


def test_airnet_as_gridsample_or_deformconv_nodes(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _tiny("airnet")
    path = E.export_onnx(model, tmp_path / "gs.onnx", opset=16, deform_op="gridsample")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GridSample" in ops and "DeformConv" not in ops
    assert E.check_onnx(path, model, _photos()) <= 1e-4
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert np.abs(_ort(path, x) - model(x).numpy()).max() <= 1e-4  # dynamic batch and size here too
    default_ops = {n.op_type for n in onnx.load(str(E.export_onnx(model, tmp_path / "dc.onnx"))).graph.node}
    assert "DeformConv" in default_ops and "GridSample" not in default_ops


def test_export_model_from_a_checkpoint_and_int8(tmp_path):
    model = _tiny("airnet")
    ckpt = save_model(tmp_path / "student", model, "half-airnet")
    result = E.export_model(ckpt, tmp_path / "out" / "student.onnx", images=_photos())
    assert result.path.is_file() and result.bytes == result.path.stat().st_size
    assert result.params == count_parameters(model) and 0 < result.onnx_params < result.params  # MoCo keys dropped
    assert result.max_diff <= 1e-4 and result.name == "half-airnet"
    assert result.opset == 19 and result.deform_op == "deformconv"
    q = E.quantize_dynamic_int8(result.path, tmp_path / "student-int8.onnx")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort(q, x)
    assert np.isfinite(got).all() and 0 < np.abs(got - ref).max() < 0.1  # quantized: close, not equal
    with pytest.raises(ValueError, match="differs from PyTorch"):
        E.export_model(ckpt, tmp_path / "strict.onnx", images=_photos()[:1], tolerance=-1.0)


def test_clear_errors(tmp_path):
    model = _tiny("airnet")
    with pytest.raises(ValueError, match="needs opset >= 16"):
        E.export_onnx(model, tmp_path / "a.onnx", opset=15, deform_op="gridsample")
    with pytest.raises(ValueError, match="needs opset >= 19"):
        E.export_onnx(model, tmp_path / "a.onnx", opset=17, deform_op="deformconv")
    with pytest.raises(ValueError, match="deform_op must be one of"):
        E.export_onnx(model, tmp_path / "a.onnx", deform_op="dcn")
    path = E.export_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="uint8"):
        E.check_onnx(path, model, [np.zeros((16, 16, 3), np.float32)])


def test_the_export_command_writes_a_checked_onnx_and_an_int8_copy(tmp_path):
    from click.testing import CliRunner
    from d4ir.distill.registry import save_model
    from d4ir.pipelines.cli import main

    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "student", build("restormer", dim=8, num_blocks=(1, 1, 1, 1),
                                                  num_refinement_blocks=1, heads=(1, 1, 1, 1)))
    result = CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(tmp_path / "s.onnx"),
                                       "--int8", str(tmp_path / "s8.onnx")])
    assert result.exit_code == 0, result.output
    diff = float(result.output.split("largest difference from PyTorch ")[1].split(";")[0])
    assert diff <= 1e-4 and (tmp_path / "s.onnx").stat().st_size > 0 and (tmp_path / "s8.onnx").is_file()
