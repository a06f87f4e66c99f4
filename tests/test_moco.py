"""MoCo pieces (loss by hand, momentum rule, queue order) and the prompt encoder's shapes and init."""

import math

import pytest
import torch
import torch.nn.functional as F
from d4ir.synth.moco import MoCoQueue, info_nce, momentum_update
from d4ir.synth.prompt_encoder import PromptEncoder
from torch import nn

# --- info_nce --------------------------------------------------------------------------------------------

# Two queries in 2-d, tau = 0.5, negatives (0, 1) and (-1, 0).
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
K_POS = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
K_NEG = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])


def test_info_nce_matches_hand_computation():
    # row 0: logits pos 0.6/0.5 = 1.2, negatives 0 and -2 -> log(e^1.2 + e^0 + e^-2) - 1.2 = 0.294129
    # row 1: logits pos 2, negatives 2 and 0 -> log(2 e^2 + 1) - 2 = 0.758623
    row0 = math.log(math.exp(1.2) + 1.0 + math.exp(-2.0)) - 1.2
    row1 = math.log(2 * math.exp(2.0) + 1.0) - 2.0
    assert row0 == pytest.approx(0.294129, abs=1e-6) and row1 == pytest.approx(0.758623, abs=1e-6)
    loss = info_nce(Q, K_POS, K_NEG, tau=0.5)
    assert float(loss) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # the same as a (K+1)-way cross-entropy with the positive as class 0 (MoCo's form)
    logits = torch.cat([(Q * K_POS).sum(1, keepdim=True), Q @ K_NEG.T], 1) / 0.5
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))), abs=1e-6)


def test_info_nce_negatives_only_form():
    # row 0: log(e^0 + e^-2) - 1.2 = -1.073072; row 1: log(e^2 + e^0) - 2 = 0.126928
    loss = info_nce(Q, K_POS, K_NEG, tau=0.5, positive_in_denominator=False)
    assert float(loss) == pytest.approx((-1.073072 + 0.126928) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="at least one negative"):
        info_nce(Q, K_POS, K_NEG[:0], positive_in_denominator=False)


def test_info_nce_empty_queue_and_bad_shapes():
    assert float(info_nce(Q, K_POS, torch.empty(0, 2))) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="k_pos"):
        info_nce(Q, K_POS[:1], K_NEG)
    with pytest.raises(ValueError, match="k_neg"):
        info_nce(Q, K_POS, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="tau"):
        info_nce(Q, K_POS, K_NEG, tau=0.0)


# --- momentum_update -------------------------------------------------------------------------------------


def _tiny(fill: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(fill)
        net[1].running_mean.fill_(fill + 10)
    return net


def test_momentum_rule_is_exact():
    query, key = _tiny(3.0), _tiny(1.0)
    momentum_update(query, key, m=0.75)  # 0.75 * 1 + 0.25 * 3 = 1.5, exact in binary
    for p in key.parameters():
        assert torch.equal(p, torch.full_like(p, 1.5))
    assert torch.equal(key[1].running_mean, torch.full((2,), 13.0))  # buffers are copied
    for p in query.parameters():  # the query is untouched
        assert torch.equal(p, torch.full_like(p, 3.0))
    momentum_update(query, key, m=1.0)
    assert torch.equal(key[0].weight, torch.full((2, 2), 1.5))
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(query, key, m=1.5)
    with pytest.raises(ValueError, match="names"):
        momentum_update(query, nn.Linear(2, 2))


# --- MoCoQueue -------------------------------------------------------------------------------------------


def _keys(start: int, n: int) -> torch.Tensor:
    return torch.stack([torch.arange(start, start + n, dtype=torch.float32), torch.zeros(n)], 1)  # [n, 2]


def test_queue_keeps_last_k_in_order_across_wrap():
    q = MoCoQueue(2, 5, random_init=False)
    assert q.keys().shape == (0, 2)
    q.enqueue(_keys(0, 2))
    assert q.keys()[:, 0].tolist() == [0, 1]
    q.enqueue(_keys(2, 2))
    q.enqueue(_keys(4, 2))  # 6 keys into 5 slots: the batch of 2 does not divide K and wraps
    assert q.keys()[:, 0].tolist() == [1, 2, 3, 4, 5]
    q.enqueue(_keys(6, 2))
    assert q.keys()[:, 0].tolist() == [3, 4, 5, 6, 7]
    q.enqueue(_keys(8, 7))  # a batch larger than K: only its newest K survive
    assert q.keys()[:, 0].tolist() == [10, 11, 12, 13, 14]
    q.enqueue(_keys(15, 3))
    assert q.keys()[:, 0].tolist() == [13, 14, 15, 16, 17]
    with pytest.raises(ValueError, match="keys must be"):
        q.enqueue(torch.zeros(2, 3))


def test_queue_random_start_is_full_and_overwritten_oldest_first():
    q = MoCoQueue(4, 6, generator=torch.Generator().manual_seed(0))
    start = q.keys().clone()
    assert start.shape == (6, 4)
    assert torch.allclose(start.norm(dim=1), torch.ones(6))
    new = torch.full((4, 4), 7.0)
    q.enqueue(new)
    assert torch.equal(q.keys()[:2], start[4:]) and torch.equal(q.keys()[2:], new)
    # the state dict carries the ring, so a checkpoint restores the order
    r = MoCoQueue(4, 6, random_init=False)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.keys(), q.keys())


# --- PromptEncoder ---------------------------------------------------------------------------------------

TINY = {"prompt_tokens": 5, "prompt_dim": 12, "feat_dim": 6, "widths": (4, 8, 8), "token_rank": 3}


def test_encoder_shapes_and_normalised_features():
    torch.manual_seed(0)
    enc = PromptEncoder(**TINY)
    x = torch.rand(2, 3, 20, 18)
    feat, prompt = enc(x)
    assert feat.shape == (2, 6) and prompt.shape == (2, 5, 12)
    assert torch.allclose(feat.norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(enc.features(x), feat) and torch.allclose(enc.prompt(x), prompt)
    # without a base prompt every token has unit RMS (the scale of CLIP's layer-normed hidden states)
    assert torch.allclose(prompt.pow(2).mean(-1).sqrt(), torch.ones(2, 5), atol=1e-3)
    assert enc.config == {**TINY, "widths": [4, 8, 8]}
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        enc(torch.rand(2, 1, 20, 20))


def test_base_prompt_init_and_strength():
    torch.manual_seed(0)
    base = torch.randn(1, 5, 12) * 2.0
    enc = PromptEncoder(**TINY, base_prompt=base)
    x = torch.rand(3, 3, 16, 16)
    prompt = enc.prompt(x)
    assert torch.equal(prompt, base.expand(3, 5, 12))  # prompt == base at init
    assert torch.equal(enc.state_dict()["base_prompt"], base)  # saved with the weights
    enc.set_prompt_strength(0.5)
    residual = enc.prompt(x) - base
    want = 0.5 * float(base[0].pow(2).mean(-1).sqrt().median())
    assert torch.allclose(residual.pow(2).mean(-1).sqrt(), torch.full((3, 5), want), rtol=1e-3)
    assert not torch.allclose(residual[0], residual[1])  # image dependent
    with pytest.raises(ValueError, match="shape"):
        PromptEncoder(**TINY, base_prompt=torch.zeros(1, 77, 12))
    with pytest.raises(ValueError, match="strength"):
        enc.set_prompt_strength(-1.0)


def test_prompt_head_is_trainable_from_the_base_init():
    torch.manual_seed(0)
    base = torch.randn(1, 5, 12)
    enc = PromptEncoder(**TINY, base_prompt=base)
    x = torch.rand(2, 3, 16, 16)
    target = torch.randn(2, 5, 12)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    (enc.prompt(x) - target).pow(2).mean().backward()
    assert enc.prompt_gain.grad.abs().sum() > 0  # the zero-initialised last layer gets a gradient
    assert enc.mlp[0].weight.grad is None  # the prompt path does not touch the contrastive head
    opt.step()
    assert not torch.equal(enc.prompt(x), base.expand(2, 5, 12))
