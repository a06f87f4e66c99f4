"""The teacher contract, checked up front on a small probe: RGB in [0, 1] in, an RGB image of the same size out,
finite values, and (reported, not required here) a gradient with respect to the input.

Every stage feeds a teacher batches [B, 3, H, W] in [0, 1] of varying B, H and W (random crops, the feedback
surrogate's images, whole test images), and compares its output with a student's pixel by pixel, so a network
that changes the size, returns NaN, or only accepts the shape it was exported with fails here, in one line naming
it, instead of in the middle of an epoch. The probe runs two seeded images, 2x3x32x32 and 1x3x32x48 (multiples of
16, the strictest size rule of the registry's networks; two batch sizes and a non-square one, so a program
exported for one fixed shape is caught), then one backward of a seeded projection of the first output.

Whether the gradient is needed depends on the training (`distill.teachers.check_gradients`): D4IR's feedback
loss and the DFSR/DFMC generator differentiate through the teacher; KD on fixed images does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

PROBE_SHAPES = ((2, 3, 32, 32), (1, 3, 32, 48))
PROBE_SEED = 0

log = logging.getLogger(__name__)


def _dims(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def one_line(err: BaseException) -> str:
    """An exception as one line (TorchScript and export errors span many)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found beyond the hard rules: whether gradients reach the input, and if not why."""

    differentiable: bool
    why_not: str = ""


def _gradient(x: torch.Tensor, out: torch.Tensor, gen: torch.Generator) -> str:
    """'' when a seeded projection of `out` [B,3,H,W] has a finite, non-zero gradient w.r.t. x; else the reason."""
    if not out.requires_grad:
        return "its output carries no gradient (torch.no_grad, .detach() or a step outside torch inside its forward)"
    weights = torch.rand(out.shape, generator=gen).to(out.device, out.dtype)
    try:
        (grad,) = torch.autograd.grad((out * weights).sum(), x, allow_unused=True)
    except RuntimeError as err:
        return f"its backward fails: {one_line(err)}"
    if grad is None:
        return "no gradient reaches its input (the input is detached inside its forward)"
    if not torch.isfinite(grad).all():
        return "its gradient with respect to the input is not finite"
    if not grad.abs().max() > 0:
        return "its gradient with respect to the input is zero everywhere (a rounding or a step inside its forward)"
    return ""


def check_contract(net: nn.Module, name: str) -> ProbeResult:
    """Run the probe on `net` (eval mode, on the CPU or wherever its weights are); a broken contract is a
    ValueError of one line naming `name`. Returns whether the network is differentiable w.r.t. its input."""
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(PROBE_SEED)
    why_not = ""
    for i, shape in enumerate(PROBE_SHAPES):
        x = torch.rand(shape, generator=gen).to(device).requires_grad_(i == 0)
        what = f"a {_dims(shape)} RGB batch in [0, 1]"
        try:
            with torch.enable_grad():
                out = net(x)
        except Exception as err:  # noqa: BLE001 - any failure of foreign code is the contract's
            raise ValueError(f"teacher {name} fails on {what}: {one_line(err)}") from err
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"teacher {name} returns a {type(out).__name__} for {what}, not an image tensor "
                             "[B,3,H,W]")
        if tuple(out.shape) != shape:
            raise ValueError(f"teacher {name} turns {what} into {_dims(out.shape)}: a teacher must return an RGB "
                             "image of its input's size")
        if not torch.isfinite(out).all():
            raise ValueError(f"teacher {name} returns NaN or infinite values for {what}")
        low, high = float(out.detach().min()), float(out.detach().max())
        if i == 0 and (low < -1.0 or high > 2.0):
            log.warning("teacher %s returns values in [%.3g, %.3g] for %s: an image in [0, 1] is expected "
                        "(does it take another input range?)", name, low, high, what)
        if i == 0:
            why_not = _gradient(x, out, gen)
    return ProbeResult(differentiable=not why_not, why_not=why_not)
