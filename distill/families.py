"""The restoration-network families: one table entry per architecture (a BasicSR-style registry).

A family is everything the tool needs to know about one architecture: its class, how to recognise its
official state_dict and read the variant from the keys, its half-width student, the registry names, the
size policy and output quantisation of its official test script, and DFMC's default teacher layers.
`registry.py` (names, loading), `inference.py` (size policy), `evaluate.py` (authors' metrics) and
`dfmc.py` (feature layers) read this table only. Adding an architecture is one `Family(...)` entry in
`FAMILIES`; its module provides the class (keyword constructor, `self.config` = its kwargs) and the two
functions `detect(state)` and `kwargs_from_state_dict(state)`; its half-width student is `halved(width kwarg)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from d4ir.distill import gcanet, ldnet, prenet
from d4ir.distill.airnet import AirNet, airnet_kwargs_from_state_dict
from d4ir.distill.gcanet import GCANet
from d4ir.distill.ldnet import LightDehazeNet
from d4ir.distill.prenet import PReNet
from d4ir.distill.restormer import Restormer
from torch import nn

State = dict[str, torch.Tensor]
QUANTIZE = ("round", "truncate")


@dataclass(frozen=True)
class Family:
    """One architecture.

    Args:
        cls: the nn.Module class; keyword constructor, `self.config` holds its kwargs.
        names: registry names -> default kwargs (any width by overriding them in `build`).
        detect: state_dict -> whether it is this family's official layout (keys only, cheap).
        kwargs_from_state_dict: state_dict -> constructor kwargs of the variant the keys describe; raises
            KeyError or ValueError (one line) for a state_dict it cannot describe.
        half_kwargs: a model's kwargs (possibly partial) -> the half-width student's kwargs.
        policy: (size policy, multiple) of the official test script: "crop", "pad" or "none" (any size).
        needs_multiple: whether the network fails on sizes that are not multiples (policy "none" refused).
        quantize: how the official test script turns the output into uint8: "round" or "truncate"
            (uint8(255 * out) after clamping to [0, 1]); the authors'-convention metrics score that image.
        contrastive_layers: DFMC's default teacher feature layers (module names); () means none.
        unread: what the keys of an official file cannot tell (loaded without a registry name, the family's
            first name's value is taken, with this warning).
    """

    cls: type[nn.Module]
    names: dict[str, dict]
    detect: Callable[[State], bool]
    kwargs_from_state_dict: Callable[[State], dict]
    half_kwargs: Callable[[dict], dict]
    policy: tuple[str, int] = ("none", 1)
    needs_multiple: bool = False
    quantize: str = "round"
    contrastive_layers: tuple[str, ...] = field(default=())
    unread: str = ""


def _airnet_detect(state: State) -> bool:
    return "E.E.queue" in state and "R.head.0.weight" in state


def without_encoder_first(kwargs: dict | None) -> dict | None:
    """AirNet kwargs as this version writes them: the `encoder_first` that configs and states of an older d4ir
    carry is dropped when it equals n_feats (else kept, for AirNet to refuse); any other kwargs pass as they are."""
    if not kwargs or "encoder_first" not in kwargs or kwargs["encoder_first"] != kwargs.get("n_feats", 64):
        return kwargs
    return {k: v for k, v in kwargs.items() if k != "encoder_first"}


def settings_without_encoder_first(settings: dict, key: str) -> dict:
    """Resume settings with the AirNet kwargs under `key` as this version writes them (`without_encoder_first`):
    what a resume compares, alike for this run and a state of an older d4ir."""
    return settings | {key: without_encoder_first(settings[key])} if key in settings else settings


def halved(key: str, default: int) -> Callable[[dict], dict]:
    """A family's `half_kwargs`: the same kwargs with its feature width `key` (`default` when they omit it) halved;
    a width under 2 cannot be halved."""
    def half(kwargs: dict) -> dict:
        width = int(kwargs.get(key, default))
        if width < 2:
            raise ValueError(f"cannot halve {key}={width}")
        return {**kwargs, key: width // 2}
    return half


def _airnet_half(kwargs: dict) -> dict:
    """Half the width (E_pre follows it; an encoder_first of older kwargs is dropped)."""
    return halved("n_feats", 64)(without_encoder_first(kwargs))


def _restormer_detect(state: State) -> bool:
    return "patch_embed.proj.weight" in state and "output.weight" in state


def restormer_kwargs_from_state_dict(state: State) -> dict:
    """Constructor kwargs matching a Restormer state_dict: dim and channels from the first/last convs,
    block and head counts from the key names, LayerNorm type from the presence of norm biases."""
    if "skip_conv.weight" in state:
        raise ValueError("dual-pixel Restormer checkpoints (skip_conv) are not supported")
    w = state["patch_embed.proj.weight"]  # [dim, C_in, 3, 3]
    dim = int(w.shape[0])

    def count(prefix: str) -> int:
        pat = re.compile(rf"^{prefix}\.(\d+)\.")
        return len({m.group(1) for k in state if (m := pat.match(k))})

    levels = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
    heads = [int(state[f"{lv}.0.attn.temperature"].shape[0]) for lv in levels]
    hidden = int(state["encoder_level1.0.ffn.project_in.weight"].shape[0]) // 2
    factor = 2.66 if int(dim * 2.66) == hidden else hidden / dim
    return dict(
        inp_channels=int(w.shape[1]),
        out_channels=int(state["output.weight"].shape[0]),
        dim=dim,
        num_blocks=[count(lv) for lv in levels],
        num_refinement_blocks=count("refinement"),
        heads=heads,
        ffn_expansion_factor=factor,
        bias="encoder_level1.0.attn.qkv.bias" in state,
        layernorm_type="WithBias" if "encoder_level1.0.norm1.body.bias" in state else "BiasFree",
    )


# Base key (what a checkpoint's "arch" field names) -> family. Detection tries the entries in this order.
FAMILIES: dict[str, Family] = {
    "airnet": Family(
        AirNet,
        names={"airnet": dict(n_feats=64, queue_size=1280, n_groups=5, n_blocks=5), "half-airnet": dict(n_feats=32)},
        detect=_airnet_detect, kwargs_from_state_dict=airnet_kwargs_from_state_dict, half_kwargs=_airnet_half,
        policy=("crop", 16), contrastive_layers=("E.E.encoder_q.E_pre",),
    ),
    "restormer": Family(
        Restormer,
        names={"restormer": dict(dim=48), "restormer-24": dict(dim=24), "restormer-12": dict(dim=12)},
        detect=_restormer_detect, kwargs_from_state_dict=restormer_kwargs_from_state_dict,
        half_kwargs=halved("dim", 48), policy=("pad", 8), needs_multiple=True,
        contrastive_layers=("encoder_level1", "encoder_level2"),
    ),
    "prenet": Family(
        PReNet,
        names={"prenet": dict(channels=32, stages=6, recurrent=True, recursive=False),
               "prenet-r": dict(recursive=True), "prn": dict(recurrent=False),
               "prn-r": dict(recurrent=False, recursive=True), "half-prenet": dict(channels=16)},
        detect=prenet.detect, kwargs_from_state_dict=prenet.kwargs_from_state_dict, half_kwargs=halved("channels", 32),
        quantize="truncate", contrastive_layers=("res_conv1",),
    ),
    # GCANet's dehaze and derain files have the same keys: the output rule (residual or not) is the name's
    "gcanet": Family(
        GCANet,
        names={"gcanet-dehaze": dict(channels=64, residual=True), "gcanet-derain": dict(channels=64, residual=False),
               "half-gcanet-dehaze": dict(channels=32, residual=True),
               "half-gcanet-derain": dict(channels=32, residual=False)},
        detect=gcanet.detect, kwargs_from_state_dict=gcanet.kwargs_from_state_dict, half_kwargs=halved("channels", 64),
        contrastive_layers=("res3", "res6"),
        unread="the output rule: taken as dehazing (net + input); a deraining file needs --arch gcanet-derain",
    ),
    "ldnet": Family(
        LightDehazeNet,
        names={"ldnet": dict(width=8), "half-ldnet": dict(width=4)},
        detect=ldnet.detect, kwargs_from_state_dict=ldnet.kwargs_from_state_dict, half_kwargs=halved("width", 8),
        contrastive_layers=("e_conv_layer4", "e_conv_layer7"),
    ),
}


def family_named(key: str) -> Family:
    """The family of a base key ('airnet', 'prenet', ...); KeyError for an unknown one."""
    return FAMILIES[key]


def family_key_of(model: nn.Module) -> str | None:
    """The base key of a model built from one of the families, or None for any other module."""
    for key, fam in FAMILIES.items():
        if isinstance(model, fam.cls):
            return key
    return None


def detect_family(state: State) -> str | None:
    """The base key of the first family whose official layout `state` has, or None."""
    return next((key for key, fam in FAMILIES.items() if fam.detect(state)), None)
