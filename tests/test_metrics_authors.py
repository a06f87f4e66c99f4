"""The authors' metric convention: uint8 quantisation, Y of rgb2ycbcr, ssim.m on Y*255, against independent
computations (a literal numpy/scipy transcription of ssim.m, and scikit-image with the same settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from d4ir.distill.evaluate import evaluate_model, format_table
from d4ir.distill.metrics import authors_scores, quantize_uint8, ssim_matlab
from d4ir.distill.prenet import PReNet
from d4ir.shards.pairs import Pair
from PIL import Image
from scipy.signal import correlate2d
from skimage import data
from skimage.metrics import structural_similarity


def _ssim_m(img1: np.ndarray, img2: np.ndarray) -> float:
    """Wang's ssim.m written out: fspecial('gaussian', 11, 1.5), filter2(..., 'valid'), K = [0.01 0.03], L = 255."""
    ax = np.arange(-5, 6)
    xx, yy = np.meshgrid(ax, ax)
    window = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(x: np.ndarray) -> np.ndarray:
        return correlate2d(x, window, mode="valid")

    mu1, mu2 = filt(img1), filt(img2)
    s1 = filt(img1 * img1) - mu1**2
    s2 = filt(img2 * img2) - mu2**2
    s12 = filt(img1 * img2) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())


def _y255(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr's Y on double [0,1] RGB [H,W,3], unrounded, times 255 (i.e. in 16..235)."""
    return 16 + rgb @ np.array([65.481, 128.553, 24.966])


def _photo_pair() -> tuple[np.ndarray, np.ndarray]:
    """A clean uint8 photo crop [40,52,3] and a float32 'restored' version with noise beyond [0,1]."""
    rng = np.random.default_rng(3)
    clean = data.astronaut()[100:140, 180:232]
    restored = (clean / 255 + 0.03 * rng.standard_normal(clean.shape)).astype(np.float32)
    return clean, restored


def test_quantize_truncates_like_numpy_uint8_and_rounds():
    x = torch.tensor([-0.2, 0.0, 0.5, 0.00391, 0.99, 1.0, 1.3], dtype=torch.float32)
    expect_trunc = np.uint8(255 * np.clip(x.numpy(), 0, 1)) / 255
    torch.testing.assert_close(quantize_uint8(x, "truncate"), torch.from_numpy(expect_trunc).float())
    expect_round = np.round(255 * np.clip(x.numpy(), 0, 1)) / 255
    torch.testing.assert_close(quantize_uint8(x, "round"), torch.from_numpy(expect_round).float())
    assert quantize_uint8(torch.tensor([0.5]), "truncate").item() * 255 == pytest.approx(127)  # 127.5 -> 127
    with pytest.raises(ValueError, match="quantize"):
        quantize_uint8(x, "floor")


def test_ssim_matlab_matches_a_literal_ssim_m_and_skimage():
    clean, restored = _photo_pair()
    ya = _y255(np.clip(restored.astype(np.float64), 0, 1))
    yb = _y255(clean / 255)
    got = ssim_matlab(torch.from_numpy(ya)[None, None], torch.from_numpy(yb)[None, None]).item()
    assert got == pytest.approx(_ssim_m(ya, yb), abs=1e-9)
    sk = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert got == pytest.approx(sk, abs=1e-6)
    assert 0.3 < got < 0.99
    # L = 255 on Y*255 is not L = 1 on it: the constants scale with the range
    assert ssim_matlab(torch.from_numpy(ya / 255)[None, None], torch.from_numpy(yb / 255)[None, None]).item() != got
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        ssim_matlab(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


def test_authors_scores_end_to_end():
    clean, restored = _photo_pair()
    saved = np.uint8(255 * np.clip(restored, 0, 1))  # PReNet's test script: truncation
    ya, yb = _y255(saved / 255.0), _y255(clean / 255.0)
    psnr = 10 * np.log10(1 / np.mean((ya / 255 - yb / 255) ** 2))
    got = authors_scores(torch.from_numpy(restored).permute(2, 0, 1)[None],
                         torch.from_numpy(clean / 255.0).permute(2, 0, 1)[None].float(), "truncate")
    assert got["psnr_y"].item() == pytest.approx(psnr, abs=1e-4)
    assert got["ssim_y"].item() == pytest.approx(_ssim_m(ya, yb), abs=1e-5)
    rounded = authors_scores(torch.from_numpy(restored).permute(2, 0, 1)[None],
                             torch.from_numpy(clean / 255.0).permute(2, 0, 1)[None].float(), "round")
    assert rounded["psnr_y"].item() != got["psnr_y"].item()


def test_eval_reports_both_conventions(tmp_path):
    clean, restored = _photo_pair()
    Image.fromarray(clean).save(tmp_path / "c.png")
    Image.fromarray(np.uint8(255 * np.clip(restored, 0, 1))).save(tmp_path / "d.png")
    pairs = [Pair("a", tmp_path / "d.png", tmp_path / "c.png")]
    net = PReNet(channels=4, stages=2).eval()
    result = evaluate_model(net, pairs, progress=False)
    assert result["authors_quantize"] == "truncate" and "truncated" in result["conventions"]["authors_ssim_y"]
    assert result["conventions"]["psnr"].startswith("ours: RGB")
    assert {"authors_psnr_y", "authors_ssim_y", "psnr_y"} <= set(result["images"][0])
    identity = evaluate_model(None, pairs, progress=False)
    assert identity["authors_quantize"] == "round"
    # the input is already uint8: quantising it changes nothing, so both Y PSNRs agree
    assert identity["mean"]["authors_psnr_y"] == pytest.approx(identity["mean"]["psnr_y"], abs=1e-9)
    table = format_table([("Y", "net", result), ("Y", "old", {"mean": {"psnr": 1.0}, "params": 0})], authors=True)
    assert f"| {result['mean']['authors_psnr_y']:.2f} | {result['mean']['authors_ssim_y']:.3f} |" in table
    assert "| Y | old | - | - | - |" in table


def test_run_report_prints_the_authors_table_with_its_convention(tmp_path):
    import json

    from d4ir.pipelines.report import build_report

    def write(folder, kind, method, mean, **extra):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "eval.json").write_text(json.dumps(
            {"type": kind, "method": method, "mean": mean, "params": 0, "count": 3, "images": [], **extra}))

    base = {"psnr": 30.0, "ssim": 0.9, "psnr_y": 31.0, "ssim_y": 0.91}
    write("input", "Input", "Degraded input", base)  # an eval.json from before the authors' metrics
    report = build_report(tmp_path).read_text()
    assert "authors' convention" not in report  # nothing to show: no table
    write("teacher", "Teacher", "PReNet", {**base, "authors_psnr_y": 37.46, "authors_ssim_y": 0.9792},
          authors_quantize="truncate")
    report = build_report(tmp_path).read_text()
    assert "Y in the authors' convention (the output saved as uint8" in report
    assert "| Teacher | PReNet | 37.46 | 0.979 | truncate |" in report
    assert "| Input | Degraded input | - | - | - |" in report
