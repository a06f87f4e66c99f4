"""A Python-factory teacher for the tests: tinynet.py (a small residual conv net, plus broken variants) and its
safetensors weights, written into a folder that the test puts on sys.path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

FACTORY_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """x + conv(relu(conv(x))): a residual restorer of another architecture than the registry's."""

    def __init__(self, width=8, mode="ok"):
        super().__init__()
        self.a, self.b, self.mode = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 3, 3, padding=1), mode

    def forward(self, x):
        y = x + 0.1 * self.b(torch.relu(self.a(x)))
        if self.mode == "half":
            return y[..., ::2, ::2]
        if self.mode == "nan":
            return y * float("nan")
        if self.mode == "detached":
            return y.detach()
        return y


def make():
    return Net()


def make_half():
    return Net(mode="half")


def make_nan():
    return Net(mode="nan")


def make_detached():
    return Net(mode="detached")
'''


def write_factory(folder: Path) -> Path:
    """folder/tinynet.py and folder/tinynet.safetensors (seeded weights); returns the weights' path."""
    (folder / "tinynet.py").write_text(textwrap.dedent(FACTORY_MODULE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        conv_a, conv_b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)
    state = {f"{n}.{k}": v.detach().contiguous() for n, m in (("a", conv_a), ("b", conv_b))
             for k, v in m.state_dict().items()}
    weights = folder / "tinynet.safetensors"
    save_file(state, str(weights))
    return weights
