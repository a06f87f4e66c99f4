"""The two sampling formulations of AirNet's modulated deformable conv 3x3, one chunk at a time.

Both compute, for the output pixels of a chunk (some images, or a band of rows of one image), the masked
columns S[p, ci, k] = m_k(p) * X_ci(y_k(p), x_k(p)) of the 9 taps and contract (C_in x 9) with the weight in
ONE matmul; the equations and the zero-outside bilinear rule are in distill/deform.py.

* `sample`: F.grid_sample-style bilinear sampling (torch.grid_sampler_2d, zeros, align_corners=True) on
  normalised coordinates g = y * 2 / (H' - 1) - 1 of an image zero-padded at the bottom/right to
  H' = 2^a + 1 rows and W' = 2^b + 1 columns (`pow2_pad`). With (H' - 1) / 2 a power of two the kernel's
  unnormalisation (g + 1) (H' - 1) / 2 is exact at every integer and monotone, so its floor(y) is floor(y)
  and the offset gradient at integer positions is torchvision's forward difference (see deform.py).
  torch.grid_sampler_2d is called directly so that CUDA never routes it to cuDNN's sampler, whose
  coordinate arithmetic is not documented.
* `gather`: floor, fractions and the 4 corner indices computed here in pixel units, the mask folded into
  the 4 bilinear weights, and one F.embedding_bag(mode="sum", per_sample_weights) over a channels-last copy of
  the image with a zero border (coordinates clamped to one pixel outside the image land on it): each
  sample's weights serve all C_in channels, and the rows come out already in im2col order [pixel, tap, C_in].
* `sample_export`: the `sample` formulation for ONNX export: the whole batch, plain normalisation by the
  image's own size, and pixel coordinates built from cumulative sums so that every size stays symbolic.

Coordinates are always at least float32 (half-precision inputs are sampled in float32); the matmul runs in
`mm_dtype` (the autocast dtype under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TAP_I = (-1, -1, -1, 0, 0, 0, 1, 1, 1)  # row offset i_k - 1 of tap k = 3 i_k + j_k
_TAP_J = (-1, 0, 1, -1, 0, 1, -1, 0, 1)  # column offset j_k - 1


def sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (coordinates need more than 8-11 mantissa bits), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pow2_plus_one(n: int) -> int:
    """Smallest 2^a + 1 >= n, and >= 2 (align_corners needs two samples per axis)."""
    return (1 << max(n - 2, 0).bit_length()) + 1


def _taps(offset: torch.Tensor, r0: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (y, x) [n,9,h,W] of the 9 taps of output rows r0..r0+h (torchvision's arithmetic:
    the integer r - 1 + i plus the offset, rounded once in `dtype`)."""
    n, _, h, w = offset.shape
    dev = offset.device
    off = offset.to(dtype).view(n, 9, 2, h, w)  # channel 2k = dy, 2k + 1 = dx of tap k
    ti = torch.tensor(_TAP_I, device=dev, dtype=dtype).view(1, 9, 1, 1)
    tj = torch.tensor(_TAP_J, device=dev, dtype=dtype).view(1, 9, 1, 1)
    rows = torch.arange(r0, r0 + h, device=dev, dtype=dtype).view(1, 1, h, 1)
    cols = torch.arange(w, device=dev, dtype=dtype).view(1, 1, 1, w)
    return (rows + ti) + off[:, :, 0], (cols + tj) + off[:, :, 1]


# -------------------------------------------------------------------------------------------------
# sample: grid_sample on a 2^a + 1 padded image
# -------------------------------------------------------------------------------------------------


def pow2_pad(x: torch.Tensor) -> torch.Tensor:
    """[n,C,H,W] -> [n,C,H',W'] zero-padded at the bottom/right to H' = 2^a + 1, W' = 2^b + 1, sampling dtype."""
    h, w = x.shape[-2:]
    return F.pad(x.to(sampling_dtype(x.dtype)), (0, _pow2_plus_one(w) - w, 0, _pow2_plus_one(h) - h))


def sample_columns(
    xp: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, r0: int, groups: int = 1
) -> torch.Tensor:
    """Masked columns of output rows r0..r0+h of images xp [n,C,H',W'] (from `pow2_pad`): offset [n,18,h,W],
    mask [n,9,h,W] -> S [n, C*9, h*W] (row ci*9 + k). `groups` splits the channels into that many grid_sample
    batch entries (the CPU kernel parallelises over its batch only; C must be divisible by groups)."""
    n, c, hp, wp = xp.shape
    _, _, h, w = offset.shape
    y, x = _taps(offset, r0, xp.dtype)  # [n,9,h,W] pixel coordinates
    grid = torch.stack((x * (2.0 / (wp - 1)) - 1, y * (2.0 / (hp - 1)) - 1), dim=-1)  # [n,9,h,W,2], exact scales
    grid = grid.view(n, 9 * h, w, 2)
    if groups > 1:
        xp, grid = xp.view(n * groups, c // groups, hp, wp), grid.repeat_interleave(groups, dim=0)
    s = torch.grid_sampler_2d(xp, grid, 0, 0, True)  # bilinear, zeros, align_corners: [n*g, C/g, 9h, W]
    m = mask.to(s.dtype).view(n, 1, 9, h, w)
    s = s.view(n, c, 9, h, w)
    s = s * m if torch.is_grad_enabled() else s.mul_(m)  # [n,C,9,h,W]
    return s.view(n, c * 9, h * w)


def sample_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Co,C,3,3] -> [Co, C*9], column ci*9 + k: out [n,Co,h*W] = W_mat @ S."""
    return weight.reshape(weight.shape[0], -1)


# -------------------------------------------------------------------------------------------------
# gather: embedding_bag over a zero-bordered channels-last image, mask folded into the weights
# -------------------------------------------------------------------------------------------------


def border_channels_last(x: torch.Tensor) -> torch.Tensor:
    """[n,C,H,W] -> [n,(H+3)*(W+3),C]: channels-last in the sampling dtype, with zero rows/columns: one before
    the image and two after it (a clamped coordinate's far corner lands on the second)."""
    n, c = x.shape[:2]
    return F.pad(x.to(sampling_dtype(x.dtype)), (1, 2, 1, 2)).permute(0, 2, 3, 1).reshape(n, -1, c)


def _pixel_major_taps(offset: torch.Tensor, r0: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (y, x) [n,h,W,9] of the 9 taps, pixel-major (torchvision's rounding, as `_taps`)."""
    n, _, h, w = offset.shape
    dev = offset.device
    off = offset.to(dtype).view(n, 9, 2, h, w).permute(0, 3, 4, 1, 2)  # [n,h,W,9,2]
    rows = torch.arange(r0, r0 + h, device=dev, dtype=dtype).view(h, 1, 1)
    cols = torch.arange(w, device=dev, dtype=dtype).view(1, w, 1)
    ti = torch.tensor(_TAP_I, device=dev, dtype=dtype)
    tj = torch.tensor(_TAP_J, device=dev, dtype=dtype)
    return (rows + ti) + off[..., 0], (cols + tj) + off[..., 1]


def _clamp_box(t: torch.Tensor, size: int) -> torch.Tensor:
    """t clamped to [-1, size], with gradient 1 inside the closed interval (torch.clamp passes none at its
    bounds, but torchvision's gradient at y = -1 is the full difference X[0] - 0) and 0 outside it."""
    inside = (t >= -1) & (t <= size)
    return torch.where(inside, t, t.detach().clamp(-1, size))


def gather_columns(
    xb: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, r0: int, height: int
) -> torch.Tensor:
    """Masked columns of output rows r0..r0+h of images xb [n,(H+3)*(W+3),C] (from `border_channels_last`,
    H = height): offset [n,18,h,W], mask [n,9,h,W] -> S [n*h*W, 9*C] (pixel-major rows, column k*C + ci).

    Coordinates are clamped to [-1, H] x [-1, W] first: outside that box torchvision's value and gradients
    are zero, and at the box edge the clamped tap has fraction 0 and its far corner on a zero row/column,
    so value, gradient and the in-range cells are unchanged."""
    n, _, c = xb.shape
    _, _, h, w = offset.shape
    y, x = _pixel_major_taps(offset, r0, xb.dtype)  # [n,h,W,9]
    y, x = _clamp_box(y, height), _clamp_box(x, w)
    y0, x0 = y.floor(), x.floor()
    fy, fx = y - y0, x - x0  # d fy / d y = 1: the floor is piecewise constant, as in torchvision
    stride = w + 3
    base = (torch.arange(n, device=xb.device, dtype=torch.int64) * xb.shape[1]).view(n, 1, 1, 1)
    i00 = base + ((y0 + 1) * stride + (x0 + 1)).to(torch.int64)  # top-left corner in the bordered image
    if xb.shape[0] * xb.shape[1] < 2**31:  # int32 indices: half the index traffic
        i00 = i00.to(torch.int32)
    idx = torch.stack((i00, i00 + 1, i00 + stride, i00 + (stride + 1)), dim=-1)  # [n,h,W,9,4]
    m = mask.to(xb.dtype).permute(0, 2, 3, 1)  # [n,h,W,9]
    top, bottom = (1 - fy) * m, fy * m  # the mask folded into the bilinear weights
    wts = torch.stack((top * (1 - fx), top * fx, bottom * (1 - fx), bottom * fx), dim=-1)  # [n,h,W,9,4]
    s = F.embedding_bag(idx.view(-1, 4), xb.reshape(-1, c), per_sample_weights=wts.view(-1, 4), mode="sum")
    return s.view(n * h * w, 9 * c)


def gather_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Co,C,3,3] -> [Co, 9*C], column k*C + ci: out [n*h*W, Co] = S @ W_mat^T."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


# -------------------------------------------------------------------------------------------------
# sample_export: the sample formulation with symbolic sizes (ONNX GridSample + MatMul)
# -------------------------------------------------------------------------------------------------


def sample_export(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B,C,H,W] -> [B,Co,H,W] with one grid_sample over the whole batch; no Python arithmetic on sizes,
    so a traced graph keeps B, H and W dynamic. Forward only (used while exporting)."""
    dtype = x.dtype
    ones = torch.ones_like(offset[:, :1])  # [B,1,H,W]
    rows = ones.cumsum(2) - 1  # r
    cols = ones.cumsum(3) - 1  # c
    h_last = rows.amax(dim=(2, 3), keepdim=True)  # H - 1, [B,1,1,1]
    w_last = cols.amax(dim=(2, 3), keepdim=True)  # W - 1
    ti = torch.tensor(_TAP_I, dtype=dtype).view(1, 9, 1, 1)
    tj = torch.tensor(_TAP_J, dtype=dtype).view(1, 9, 1, 1)
    b = offset.shape[0]
    off = offset.reshape(b, 9, 2, offset.shape[2], offset.shape[3])
    y = rows + ti + off[:, :, 0]  # [B,9,H,W]
    xx = cols + tj + off[:, :, 1]
    grid = torch.stack((xx * 2 / w_last - 1, y * 2 / h_last - 1), dim=-1).flatten(1, 2)  # [B,9H,W,2]
    s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # [B,C,9H,W]
    s = s.unflatten(2, (9, -1)) * mask.unsqueeze(1)  # [B,C,9,H,W]
    w2 = weight.flatten(1)  # [Co, C*9]
    out = w2 @ s.flatten(1, 2).flatten(2, 3)  # [B,Co,H*W]
    return out.reshape(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
