"""MoCo pieces for the prompt encoder's contrastive loss (paper Eq. (3), He et al. 2020).

The key encoder follows the query encoder by a momentum average; negatives are the keys of earlier
batches, held in a first-in first-out queue of K feature vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from d4ir.shards.checks import check_positive_ints
from torch import Tensor, nn


@dataclass(frozen=True)
class MoCoConfig:
    """The contrastive loss's settings (paper Eq. (3), MoCo), shared by stage 1 and stage 3's joint phase.

    Args:
        queue_size: K, negative keys kept from earlier batches (best below the number of images, else crops
            of a query's own image come back as its negatives).
        tau: softmax temperature of Eq. (3).
        momentum: m, the key encoder's momentum (key = m * key + (1 - m) * query).
    """

    queue_size: int = 1024
    tau: float = 0.07
    momentum: float = 0.999

    def __post_init__(self) -> None:
        check_positive_ints(self, ("queue_size",), owner="MoCoConfig.")
        if not self.tau > 0:
            raise ValueError(f"MoCoConfig.tau must be > 0, got {self.tau}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"MoCoConfig.momentum must be in [0, 1], got {self.momentum}")


class MoCoQueue(nn.Module):
    """The last K keys, as buffers so that a checkpoint's state dict carries them.

    ``queue`` [K, dim] is a ring: ``ptr`` is the slot the next key goes to, ``count`` the number of keys
    enqueued so far. `keys` returns them oldest -> newest.

    Args:
        dim: feature width.
        size: K, the number of keys kept.
        random_init: start full of random unit vectors, as MoCo and AirNet do, so that the first batches
            already have K negatives (they count as the oldest keys and are overwritten first). When False
            the queue starts empty and `keys` returns only what was enqueued.
        generator: optional torch.Generator for the random start (reproducible runs).
    """

    def __init__(
        self, dim: int, size: int, *, random_init: bool = True, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"queue dim and size must be >= 1, got dim={dim}, size={size}")
        self.dim, self.size = int(dim), int(size)
        if random_init:
            start = F.normalize(torch.randn(self.size, self.dim, generator=generator), dim=1)
        else:
            start = torch.zeros(self.size, self.dim)
        self.register_buffer("queue", start)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        # Random start keys count as a full queue; an empty start as nothing.
        self.register_buffer("count", torch.tensor(self.size if random_init else 0, dtype=torch.long))

    def __len__(self) -> int:
        return min(int(self.count), self.size)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Append keys [B, dim] (detached), overwriting the oldest; B need not divide K, B may exceed K."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got {tuple(keys.shape)}")
        keys = keys.detach().to(self.queue.dtype)
        if keys.shape[0] > self.size:  # only the newest K survive
            self.ptr += keys.shape[0] - self.size
            self.count += keys.shape[0] - self.size
            keys = keys[-self.size :]
        n = keys.shape[0]
        slots = (int(self.ptr) + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[slots] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count += n

    def keys(self) -> Tensor:
        """Stored keys, oldest -> newest: [min(count, K), dim]."""
        n = len(self)
        if n < self.size:  # not yet wrapped: slots 0..n-1 in order
            return self.queue[:n]
        p = int(self.ptr) % self.size
        return torch.cat([self.queue[p:], self.queue[:p]], dim=0)


@torch.no_grad()
def momentum_update(query_enc: nn.Module, key_enc: nn.Module, m: float = 0.999) -> None:
    """key = m * key + (1 - m) * query for every parameter, in place; buffers (BN statistics) are copied.

    Args:
        query_enc: the encoder trained by gradient.
        key_enc: the momentum encoder, same architecture.
        m: momentum in [0, 1]; 0.999 in MoCo and the paper.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    q_params, k_params = dict(query_enc.named_parameters()), dict(key_enc.named_parameters())
    q_bufs, k_bufs = dict(query_enc.named_buffers()), dict(key_enc.named_buffers())
    if q_params.keys() != k_params.keys() or q_bufs.keys() != k_bufs.keys():
        raise ValueError("query and key encoders have different parameter or buffer names")
    for name, q in q_params.items():
        k = k_params[name]
        if k.shape != q.shape:
            raise ValueError(f"parameter {name}: key shape {tuple(k.shape)} != query {tuple(q.shape)}")
        k.mul_(m).add_(q.detach(), alpha=1.0 - m)
    for name, q in q_bufs.items():
        k_bufs[name].copy_(q)


def info_nce(
    q: Tensor, k_pos: Tensor, k_neg: Tensor, tau: float = 0.07, *, positive_in_denominator: bool = True
) -> Tensor:
    """Contrastive loss of Eq. (3), averaged over the batch.

    loss_b = -log( exp(q_b.k+_b / tau) / (exp(q_b.k+_b / tau) + sum_i exp(q_b.k-_i / tau)) )

    The positive is in the denominator (the default), which is MoCo's form (He et al. 2020, the paper Eq. (3)
    cites, and AirNet's code): a (K+1)-way cross-entropy with the positive as the right class. Eq. (3) as
    printed lists only the negatives; that form has no lower bound in the positive term (its gradient
    never fades once the positive wins, and the loss goes negative), so it is kept only as an option
    (``positive_in_denominator=False``) for comparison.

    Args:
        q: queries [B, F], L2-normalised (not renormalised here).
        k_pos: positive keys [B, F], one per query, normalised.
        k_neg: negative keys [K, F] shared by all queries (the queue), normalised; K may be 0 only with
            the positive in the denominator (the loss is then 0).
        tau: temperature (0.07 in the paper).
        positive_in_denominator: see above.
    Returns:
        scalar loss.
    """
    if q.ndim != 2 or k_pos.shape != q.shape:
        raise ValueError(f"q and k_pos must both be [B, F], got {tuple(q.shape)} and {tuple(k_pos.shape)}")
    if k_neg.ndim != 2 or k_neg.shape[1] != q.shape[1]:
        raise ValueError(f"k_neg must be [K, {q.shape[1]}], got {tuple(k_neg.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    pos = (q * k_pos).sum(dim=1, keepdim=True) / tau  # [B, 1]
    neg = q @ k_neg.to(q.dtype).T / tau  # [B, K]
    if positive_in_denominator:
        logits = torch.cat([pos, neg], dim=1)  # [B, 1+K], the positive is class 0
        return (torch.logsumexp(logits, dim=1) - pos[:, 0]).mean()
    if k_neg.shape[0] == 0:
        raise ValueError("the negatives-only form of Eq. (3) needs at least one negative key")
    return (torch.logsumexp(neg, dim=1) - pos[:, 0]).mean()


def moco_step(query_enc: nn.Module, key_enc: nn.Module, queue: MoCoQueue, xq: Tensor, xk: Tensor,
              config: MoCoConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One MoCo step of Eq. (3), the rule stage 1 and stage 3's joint phase share.

    q = Enc_q(x_q) [B, F]; the key encoder follows the query encoder by momentum, then k = Enc_k(x_k) [B, F]
    without gradient; the loss is InfoNCE of q against k and the queue's keys of earlier batches [K, F] (a
    copy, so that enqueueing k, done last here, cannot change them under autograd).

    Returns:
        (loss, q, k, negatives): the loss to back-propagate and what it was computed from (for logging).
    """
    q = query_enc.features(xq)
    with torch.no_grad():
        momentum_update(query_enc, key_enc, config.momentum)
        k = key_enc.features(xk)
    negatives = queue.keys().clone()
    loss = info_nce(q, k, negatives, config.tau)
    queue.enqueue(k)
    return loss, q, k, negatives
