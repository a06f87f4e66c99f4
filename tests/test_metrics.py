"""PSNR/SSIM against scikit-image on random and structured images, RGB and Y, with border crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from d4ir.distill.metrics import psnr, rgb_to_y, ssim
from skimage import data
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _to_torch(imgs: list[np.ndarray]) -> torch.Tensor:
    """list of [H,W,3] float arrays -> [B,3,H,W] float32."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()


def _sk_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None = -1) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1, channel_axis=channel_axis)


def _pairs() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Clean/restored pairs (float64 in [0,1]): random noise, and a photo crop with blur + noise."""
    rng = np.random.default_rng(0)
    clean, restored = [], []
    noise = rng.random((40, 52, 3))
    clean.append(noise)
    restored.append(np.clip(noise + 0.1 * rng.standard_normal(noise.shape), 0, 1))
    photo = data.astronaut()[100:140, 180:232].astype(np.float64) / 255  # [40,52,3]
    clean.append(photo)
    blurred = gaussian(photo, sigma=1.0, channel_axis=-1)
    restored.append(np.clip(blurred + 0.02 * rng.standard_normal(photo.shape), 0, 1))
    return clean, restored


def test_psnr_matches_skimage():
    clean, restored = _pairs()
    got = psnr(_to_torch(restored), _to_torch(clean))
    assert got.shape == (2,)
    for i in range(2):
        expect = peak_signal_noise_ratio(clean[i].astype(np.float32), restored[i].astype(np.float32), data_range=1)
        assert got[i].item() == pytest.approx(expect, abs=1e-4)
    assert torch.isinf(psnr(_to_torch(clean), _to_torch(clean))).all()


def test_ssim_matches_skimage_rgb():
    clean, restored = _pairs()
    a, b = _to_torch(restored), _to_torch(clean)
    got = ssim(a, b)
    assert got.shape == (2,)
    for i in range(2):
        # compare against the same float32 values the torch inputs hold
        expect = _sk_ssim(a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy())
        assert got[i].item() == pytest.approx(expect, abs=1e-4)
    assert ((got > 0.5) & (got < 1.0)).all()
    torch.testing.assert_close(ssim(b, b), torch.ones(2, dtype=torch.float64))


def test_y_channel_and_crop_border_match_skimage_on_luma():
    clean, restored = _pairs()
    a, b = _to_torch(restored), _to_torch(clean)
    w = np.array([65.481, 128.553, 24.966]) / 255
    for i in range(2):
        ya = 16 / 255 + a[i].permute(1, 2, 0).double().numpy() @ w
        yb = 16 / 255 + b[i].permute(1, 2, 0).double().numpy() @ w
        assert psnr(a, b, y_channel=True)[i].item() == pytest.approx(
            peak_signal_noise_ratio(yb, ya, data_range=1), abs=1e-5)
        assert ssim(a, b, y_channel=True)[i].item() == pytest.approx(_sk_ssim(ya, yb, None), abs=1e-4)
        c = 4
        assert ssim(a, b, y_channel=True, crop_border=c)[i].item() == pytest.approx(
            _sk_ssim(ya[c:-c, c:-c], yb[c:-c, c:-c], None), abs=1e-4)
        assert psnr(a, b, crop_border=c)[i].item() == pytest.approx(
            peak_signal_noise_ratio(b[i, :, c:-c, c:-c].double().numpy(), a[i, :, c:-c, c:-c].double().numpy(),
                                    data_range=1), abs=1e-5)
    y = rgb_to_y(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]).view(1, 3, 1, 2))
    torch.testing.assert_close(y.flatten(), torch.tensor([16 / 255, 235 / 255]), atol=1e-3, rtol=0)


def test_bad_input_is_a_clear_error():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match=r"\[B,C,H,W\]"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[..., :10, :10], x[..., :10, :10])
    with pytest.raises(ValueError, match="y_channel"):
        psnr(x[:, :1], x[:, :1], y_channel=True)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(x, x, crop_border=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu():
    clean, restored = _pairs()
    a, b = _to_torch(restored), _to_torch(clean)
    for fn in (psnr, ssim):
        torch.testing.assert_close(fn(a.cuda(), b.cuda(), y_channel=True).cpu(), fn(a, b, y_channel=True))
