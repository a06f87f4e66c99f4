"""The GAN-based data-free baselines of the paper's Tables 1-2 as a stage-3 data source: DFSR (Zhang et al.,
CVPR 2021, "Data-free knowledge distillation for image super-resolution") adapted to restoration, and DFMC
(Wang et al., ISCAS 2024) = DFSR plus a contrastive regularisation (our reading: distill/dfmc.py).

A generator G maps noise to degraded inputs; student and generator play a min-max game, alternating:

    student step (every step):   x = G(z) detached, z ~ N(0, I_256), x [B,3,s,s] in [0, 1]
                                 L_S = L_kd(S(x), T(x)) (+ beta * L_CR(S(x), T(x), x) for DFMC)
    generator step (after every k-th student step; k = 50 in the official release):
                                 L_G = -log(1 + ||S(G(z)) - T(G(z))||), minimised over G's weights only

||.|| is the sum over batch, channels and pixels of squared differences ("l2", the official default) or of
absolute differences ("l1"), as in the release. The gradient of L_G flows through the frozen teacher and the
student into G; neither network changes in a generator step.

Facts from the official release (github.com/huawei-noah/Efficient-Computing,
Data-Efficient-Model-Compression/DFSR: zsnet.py `GeneratorINE1`, distillation.py):
- generator: z (256) -> Linear -> 128 x (s/4)^2 -> InstanceNorm(affine) -> [nearest x2 upsample, conv3x3
  128->128, InstanceNorm(affine, eps 0.8), LeakyReLU 0.2] -> [x2, conv3x3 128->64, InstanceNorm(affine,
  eps 0.8), LeakyReLU 0.2] -> conv3x3 64->C -> tanh -> (t + 1) / 2; Kaiming-normal Linear/conv weights.
- L_G = -log(1 + MSELoss(reduction='sum')(S(x), T(x))) (or the L1 sum), generator-loss weight 1.
- 50 student steps per generator step (--stu_step 50); generator Adam with lr 1e-3 (--lr_G default; the
  README's demo passes 1e-5) and default betas (0.9, 0.999), StepLR x0.1 every 10 epochs.
- for SR the generator makes LR images that a bicubic resize up-samples; that resize ends with
  round(255 v) / 255, whose gradient is zero, so in the release the adversarial term gives the generator
  no gradient and only the reconstruction term L_R (weight 0 by default, 1 in the README's demo) moves it.
- the student: SGD (lr 0.1, momentum 0.9, weight decay 1e-4, gradient clip 0.4) on the sum-reduced MSE to
  the detached teacher output.

Adaptations to restoration (ours):
- G makes the degraded input itself at the crop size s (a multiple of 4, >= 8): no resize, no clamp, no
  rounding; x = (tanh + 1) / 2 is differentiable end to end, so L_G really trains G.
- no reconstruction term: SR's L_R ties the teacher's output back to its input through the known
  degradation (bicubic down-sampling). Rain, haze and snow have no known forward operator, and an
  identity form ||G(z) - T(G(z))|| would reward inputs the teacher leaves unchanged, i.e. clean images,
  which teach the student nothing about removing weather. So L_G stands alone (the release's default).
- the student side is the trainer's (its KD loss, mean-reduced Eq. (8), and its Adam), so these baselines
  differ from D4IR only in where the batches come from.
- a generator step takes gradients with torch.autograd.grad w.r.t. G's weights only (no .grad of the
  networks is filled) and restores the buffers a train-mode forward updates (BatchNorm running statistics
  of AirNet's encoder), so teacher and student leave it exactly as they came in.

Randomness: next() draws z from the trainer's numpy Generator (saved in the trainer's checkpoint); the
generator step draws z from the source's own torch.Generator, seeded by (seed, rank) and saved in
state_dict(). G's initial weights depend on the seed only, so they agree across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from d4ir.shards.checks import check_choice, check_positive_ints
from torch import nn

from .dfmc import FEATURE_KINDS, build_features, contrastive_ratio
from .losses import kd_loss, parse_weights

Method = Literal["dfsr", "dfmc"]
METHODS: tuple[str, ...] = get_args(Method)
Norm = Literal["l2", "l1"]
NORMS: tuple[str, ...] = get_args(Norm)


@dataclass(frozen=True)
class DataFreeConfig:
    """Settings of the DFSR / DFMC data source (official DFSR values where the release has them).

    Args:
        method: "dfsr" (L_G and KD) or "dfmc" (plus the contrastive regularisation in the student's loss).
        z_dim: noise dimension (256).
        widths: G's channels after the Linear layer and after the second upsampling (128, 64).
        generator_lr, betas: Adam of the generator (1e-3, (0.9, 0.999)).
        student_steps_per_generator_step: k student steps, then one generator step (50).
        generator_norm: "l2" (sum of squared differences, official) or "l1" (sum of absolute differences).
        lr_decay_every, lr_decay: multiply the generator lr by lr_decay every lr_decay_every epochs
            (0 disables; the release used 0.1 every 10 of its epochs).
        loss: the student's KD terms (`distill.losses.parse_weights`; default {"l2": 1.0}, Eq. (8)).
        contrastive_weight: beta of L_CR (default: 0.1 for dfmc, AECR-Net's weight for this ratio; 0 for dfsr;
            `beta` is the value in force).
        contrastive_features: "teacher" (hooked teacher layers) or "random" (a fixed random conv net).
        contrastive_layers: teacher module names (default per architecture, see distill/dfmc.py).
        contrastive_layer_weights: w_i, one per feature map (default: equal, summing to 1).
        contrastive_eps: added to the negative distance.
        seed: seeds G's initial weights (and, with the rank, the generator step's noise).
    """

    method: Method = "dfsr"
    # the generator's fields get command-line names that say so (`--widths` would read as the student's)
    z_dim: int = field(default=256, metadata={"option": "--generator-z-dim"})
    widths: tuple[int, int] = field(default=(128, 64), metadata={"option": "--generator-widths"})
    generator_lr: float = 1e-3
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"option": "--generator-betas"})
    student_steps_per_generator_step: int = 50
    generator_norm: Norm = "l2"
    lr_decay_every: int = field(default=0, metadata={"option": "--generator-lr-decay-every"})
    lr_decay: float = field(default=0.1, metadata={"option": "--generator-lr-decay"})
    loss: str | dict | None = None
    contrastive_weight: float | None = None
    contrastive_features: str = "teacher"
    contrastive_layers: tuple[str, ...] | None = None
    contrastive_layer_weights: tuple[float, ...] | None = None
    contrastive_eps: float = 1e-7
    seed: int = 0

    @property
    def beta(self) -> float:
        """The contrastive weight in force: the given one, else the method's default. Resolved on read, not
        stored, so that `replace(config, method="dfmc")` gets DFMC's default (a stored 0.0 made it DFSR)."""
        if self.contrastive_weight is not None:
            return self.contrastive_weight
        return 0.1 if self.method == "dfmc" else 0.0

    def __post_init__(self) -> None:
        def fix(name: str, value) -> None:  # frozen: normalise lists (from JSON presets) to tuples
            object.__setattr__(self, name, value)

        for name in ("widths", "betas", "contrastive_layers", "contrastive_layer_weights"):
            if getattr(self, name) is not None:
                fix(name, tuple(getattr(self, name)))
        check_choice("method", self.method, METHODS, owner="DataFreeConfig.")
        if self.beta < 0 or self.contrastive_eps <= 0:
            raise ValueError("DataFreeConfig.contrastive_weight must be >= 0 and contrastive_eps > 0")
        check_positive_ints(self, ("z_dim", "student_steps_per_generator_step"), owner="DataFreeConfig.")
        if len(self.widths) != 2 or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"DataFreeConfig.widths must be two positive ints, got {self.widths!r}")
        if not self.generator_lr > 0:
            raise ValueError(f"DataFreeConfig.generator_lr must be > 0, got {self.generator_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"DataFreeConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_choice("generator_norm", self.generator_norm, NORMS, owner="DataFreeConfig.")
        if self.lr_decay_every < 0 or not 0.0 < self.lr_decay <= 1.0:
            raise ValueError("DataFreeConfig.lr_decay_every must be >= 0 and lr_decay in (0, 1]")
        if self.contrastive_features not in FEATURE_KINDS:
            raise ValueError(
                f"DataFreeConfig.contrastive_features must be one of {FEATURE_KINDS}, got {self.contrastive_features!r}"
            )
        weights = self.contrastive_layer_weights
        if weights is not None and (not weights or any(w < 0 for w in weights)):
            raise ValueError(f"DataFreeConfig.contrastive_layer_weights must be non-negative, got {weights!r}")
        parse_weights(self.loss)  # unknown KD terms fail here, not at the first step


class DFSRGenerator(nn.Module):
    """DFSR's generator (the release's GeneratorINE1 layout) at the crop size: z [B,z_dim] -> [B,C,s,s] in [0,1].

    Args:
        z_dim: noise dimension.
        crop: output side s, a multiple of 4 and at least 8 (instance norm needs more than one pixel at s/4).
        widths: channels after the Linear layer (and the first conv) and after the second conv.
        channels: output channels C.
    """

    def __init__(self, *, z_dim: int = 256, crop: int = 256, widths: tuple[int, int] = (128, 64),
                 channels: int = 3) -> None:
        super().__init__()
        if not isinstance(crop, int) or crop < 8 or crop % 4:
            raise ValueError(f"the DFSR generator needs a crop that is a multiple of 4 and >= 8, got {crop!r}")
        w0, w1 = widths
        self.side, self.w0 = crop // 4, w0
        self.project = nn.Linear(z_dim, w0 * self.side * self.side)
        self.norm0 = nn.InstanceNorm2d(w0, affine=True)
        self.conv1 = nn.Conv2d(w0, w0, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(w0, eps=0.8, affine=True)
        self.conv2 = nn.Conv2d(w0, w1, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(w1, eps=0.8, affine=True)
        self.out = nn.Conv2d(w1, channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.norm0(self.project(z).view(z.shape[0], self.w0, self.side, self.side))  # [B,w0,s/4,s/4]
        h = F.interpolate(h, scale_factor=2, mode="nearest")  # [B,w0,s/2,s/2]
        h = F.leaky_relu(self.norm1(self.conv1(h)), 0.2)
        h = F.interpolate(h, scale_factor=2, mode="nearest")  # [B,w0,s,s]
        h = F.leaky_relu(self.norm2(self.conv2(h)), 0.2)  # [B,w1,s,s]
        return (torch.tanh(self.out(h)) + 1.0) * 0.5  # [B,C,s,s] in [0, 1]


def _buffers(*modules: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for m in modules for b in m.buffers()]


class AdversarialSource:
    """Batches G(z) for the stage-3 trainer, the student's DFSR/DFMC loss, and the generator's Adam steps.

    Trainer loop: x = next(rng, device); loss = student_loss(student(x), teacher(x) [no grad], x); the
    student's step; then `if due(step): generator_step(student, teacher)`.

    Args:
        crop: side s of the generated batches (a multiple of 4, >= 8).
        batch_size: B of next() and of the generator step.
        config: a `DataFreeConfig` (default: DFSR with the official settings).
        device: where G, its optimizer and its batches live.
        teacher: the frozen teacher, needed by DFMC's "teacher" feature space.
        rank: this process's rank (seeds the generator step's noise).
    """

    def __init__(self, crop: int, batch_size: int, config: DataFreeConfig | None = None,
                 device: torch.device | str = "cpu", *, teacher: nn.Module | None = None, rank: int = 0) -> None:
        self.config = config = config or DataFreeConfig()
        if config.method == "dfsr" and config.contrastive_weight:
            raise ValueError("a contrastive_weight > 0 is DFMC: set method='dfmc' (--data dfmc)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.crop, self.batch_size, self.device, self.epoch = crop, batch_size, torch.device(device), 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.generator = DFSRGenerator(z_dim=config.z_dim, crop=crop, widths=config.widths)
        self.generator.to(self.device).train()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr, betas=config.betas)
        seed = int(np.random.SeedSequence([config.seed, rank]).generate_state(1)[0])
        self._noise = torch.Generator().manual_seed(seed)  # CPU: the same stream on every device
        self.weights = parse_weights(config.loss)
        self.features = None
        if config.beta:
            self.features = build_features(
                config.contrastive_features, teacher, config.contrastive_layers, config.seed, self.device
            )

    # ---- the student's side
    def next(self, rng: np.random.Generator, device: torch.device | str | None = None) -> torch.Tensor:
        """A detached batch G(z) [B,3,crop,crop] in [0, 1] on `device`, z drawn from the trainer's rng."""
        z = torch.from_numpy(rng.standard_normal((self.batch_size, self.config.z_dim), dtype=np.float32))
        with torch.no_grad():
            x = self.generator(z.to(self.device))
        return x.to(device if device is not None else self.device)

    def student_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_kd(S(x), T(x)) plus, for DFMC, beta * L_CR(anchor S(x), positive T(x), negative x); a scalar."""
        loss = kd_loss(student_out, teacher_out.detach(), self.weights)
        if self.features is not None:
            loss = loss + self.config.beta * self.contrastive_loss(student_out, teacher_out, x)
        return loss

    def contrastive_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """DFMC's L_CR alone (distill/dfmc.py); an error for DFSR, which has none."""
        if self.features is None:
            raise ValueError("this source has no contrastive term (method 'dfsr' or contrastive_weight 0)")
        return contrastive_ratio(
            student_out, teacher_out, x, self.features, self.config.contrastive_layer_weights,
            self.config.contrastive_eps,
        )

    def due(self, step: int) -> bool:
        """Whether a generator step follows student step `step` (0-based): after every k-th one."""
        return (step + 1) % self.config.student_steps_per_generator_step == 0

    def set_epoch(self, epoch: int) -> None:
        """Apply the generator's step decay for `epoch` (0-based); nothing else depends on the epoch."""
        self.epoch = epoch
        c = self.config
        lr = c.generator_lr * (c.lr_decay ** (epoch // c.lr_decay_every) if c.lr_decay_every else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- the generator's side
    def discrepancy(self, student: nn.Module, teacher: nn.Module, z: torch.Tensor, *, amp: bool = False
                    ) -> torch.Tensor:
        """||S(G(z)) - T(G(z))|| (sum over all elements, config.generator_norm), with the graph into G.

        A plain forward: a train-mode network's BatchNorm statistics move (generator_step restores them).
        """
        x = self.generator(z.to(self.device))  # [B,3,s,s]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            diff = student(x).float() - teacher(x).float()
        return diff.pow(2).sum() if self.config.generator_norm == "l2" else diff.abs().sum()

    def generator_step(self, student: nn.Module, teacher: nn.Module, *, z: torch.Tensor | None = None,
                       amp: bool = False, sync_grads: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
        """One Adam step of G on L_G = -log(1 + discrepancy); returns {"generator_loss", "discrepancy"}.

        student: the bare network (not a DDP wrapper: no reduction of its gradients is wanted here).
        z: the noise [B,z_dim] (default: drawn from the source's own generator).
        sync_grads: called with G after its gradients are set (e.g. an all-reduce across ranks).
        """
        if z is None:
            z = torch.randn(self.batch_size, self.config.z_dim, generator=self._noise)
        saved = _buffers(student, teacher)
        params = list(self.generator.parameters())
        try:
            d = self.discrepancy(student, teacher, z, amp=amp)
            loss = -torch.log1p(d)
            grads = torch.autograd.grad(loss, params)
        finally:
            with torch.no_grad():
                for buf, copy in saved:
                    buf.copy_(copy)
        for p, g in zip(params, grads):
            p.grad = g
        if sync_grads is not None:
            sync_grads(self.generator)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"generator_loss": float(loss.detach()), "discrepancy": float(d.detach())}

    # ---- checkpoints
    def state_dict(self) -> dict:
        """G, its Adam state, the generator step's noise state and the epoch (torch.load(weights_only=True)-safe)."""
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "noise": self._noise.get_state(),
            "epoch": self.epoch,
            "crop": self.crop,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() saved; a generator of another shape is a clear error."""
        saved = state.get("config", {})
        mine = {"crop": self.crop, "z_dim": self.config.z_dim, "widths": list(self.config.widths)}
        theirs = {"crop": state.get("crop"), "z_dim": saved.get("z_dim"), "widths": saved.get("widths")}
        if mine != theirs:
            raise ValueError(f"data-free source state is for a generator {theirs}, this one is {mine}")
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._noise.set_state(state["noise"])
        self.epoch = int(state["epoch"])
