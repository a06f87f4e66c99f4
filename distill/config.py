"""Stage 3's settings: `DistillConfig` (paper defaults, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from d4ir.shards.checks import check_choice, check_positive_ints, check_rate

from .datafree import DataFreeConfig
from .losses import parse_weights

DataSource = Literal["shards", "original", "web", "dfsr", "dfmc"]
DATA_SOURCES: tuple[str, ...] = get_args(DataSource)
# DataFreeConfig fields the trainer sets from its own config (not options of their own)
DATAFREE_DERIVED = ("datafree.method", "datafree.loss", "datafree.seed", "datafree.contrastive_layers",
                    "datafree.contrastive_layer_weights", "datafree.contrastive_eps", "datafree.betas")


@dataclass(frozen=True)
class DistillConfig:
    """Stage 3's settings (paper defaults).

    Args:
        student: registry name (`d4ir models`) or half (the teacher's architecture at half width; a TorchScript,
            torch.export or factory teacher has no architecture d4ir can halve and needs a registry name).
        student_kwargs: student constructor overrides, e.g. n_feats=24.
        data: shards (D4IR), original (the paper's "Data": the teacher's own degraded inputs, no ground
            truth), web (M0: the web degraded images directly), or the GAN baselines dfsr and dfmc (images from
            a generator trained against the student, distill/datafree.py).
        epochs: epochs in all (0: only evaluate the untrained student).
        joint_epochs: the first epochs, in which the prompt encoder trains with the student (Eq. 9).
        round_every: R, regenerate the shards every R epochs of the joint phase (0: never).
        iters_per_epoch: steps per epoch (default: one pass over the round's images).
        batch_size: random crops per step.
        crop: side of the random crops (with flips).
        lr: Adam (0.9, 0.999) learning rate of the student.
        encoder_lr: Adam learning rate of the prompt encoder in the joint phase.
        lr_halve_every: halve both learning rates every this many epochs.
        gamma: weight of L_cl in the joint phase (Eq. 9).
        loss: KD terms and their weights, e.g. l2=1 (Eq. 8) or l1=1,ssim=0.1.
        feedback_batch: images per step through the differentiable surrogate (0: no L_kd feedback).
        round: train on this existing round of RUN/shards only and regenerate nothing (reuse).
        skip_damaged_shards: train on the intact shards of a damaged round (warned, counted, epoch shortened)
            instead of refusing it.
        seed: seeds the student, crops and flips: CPU runs at the same thread count repeat exactly.
        amp: bf16 autocast (default: on for CUDA).
        num_workers: DataLoader workers decoding shards.
        datafree: the generator of the dfsr and dfmc baselines (its method, loss and seed are this config's).
    """

    student: str = "half"
    student_kwargs: dict | None = None
    data: DataSource = "shards"
    epochs: int = 200
    joint_epochs: int = 50
    round_every: int = 10
    iters_per_epoch: int | None = None
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-3
    encoder_lr: float = 1e-5
    lr_halve_every: int = 15
    gamma: float = 0.5
    loss: dict = field(default_factory=lambda: {"l2": 1.0})
    feedback_batch: int = 2
    round: int | None = None
    skip_damaged_shards: bool = False
    seed: int = 0
    amp: bool | None = None
    num_workers: int = 0
    datafree: DataFreeConfig = field(default_factory=DataFreeConfig)

    def __post_init__(self) -> None:
        check_choice("data", self.data, DATA_SOURCES)
        check_positive_ints(self, ("batch_size", "crop"))
        for name in ("epochs", "joint_epochs", "round_every", "lr_halve_every", "feedback_batch", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {self.iters_per_epoch}")
        if self.round is not None and self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")
        check_rate("lr", self.lr)
        check_rate("encoder_lr", self.encoder_lr, zero_ok=True)  # 0 freezes the prompt encoder
        object.__setattr__(self, "loss", parse_weights(self.loss))
        if self.data == "dfsr" and self.datafree.contrastive_weight:
            raise ValueError("contrastive_weight is DFMC's term: use data 'dfmc' (--data dfmc)")

    @property
    def joint(self) -> bool:
        """True when the prompt encoder trains: D4IR data, a joint phase, and a loss that reaches it."""
        return (self.data == "shards" and self.round is None and self.joint_epochs > 0
                and (self.gamma > 0 or self.feedback_batch > 0))

    def round_for_epoch(self, epoch: int) -> int:
        """The regeneration round training must be on when epoch `epoch` (0-based) starts."""
        if not self.round_every or not self.joint:
            return 0
        return min(epoch, self.joint_epochs) // self.round_every

    @property
    def regenerates(self) -> bool:
        """True when some epoch trains on a regeneration round: `round_for_epoch` grows with the epoch, so when
        the last epoch's round is above 0."""
        return bool(self.round_every and self.joint and min(self.epochs - 1, self.joint_epochs) >= self.round_every)
